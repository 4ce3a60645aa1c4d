"""fusedrl.engine.llm: GRPO for Hugging Face causal LMs on fusedrl's fused kernels.

    from fusedrl.engine.llm import LLMGRPOConfig, build
    trainer = build(LLMGRPOConfig())               # the embedded default: a tiny model and a toy task
    for step in range(1, 51):
        print(trainer.step(step)["reward_mean"])

Pieces: `config` (LLMGRPOConfig, every option with its help), `data` (prompt records from JSONL/CSV/Parquet or a
`datasets` dataset), `generation` (G completions per prompt with model.generate, sampled log-probs recorded),
`rewards` (registered text rewards and Python callables), `policy` (hidden states + LM head -> fused log-probs
and GRPO loss; LoRA via peft; the KL reference), `trainer` (the step: rewards, advantages, micro-batched
updates, NaN/inf guards; DDP / FSDP2 under torchrun), `grpo` (`fusedrl train llm-grpo`), `tiny` (the embedded
default).
Importing this package imports no torch or transformers; the names below load their modules on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLMGRPOConfig": "config", "load_prompt_records": "data", "prompt_batch": "data", "PromptRecord": "data",
    "Rollout": "generation", "generate_completions": "generation", "Policy": "policy", "LoraSpec": "policy",
    "SeqBatch": "policy", "RewardTerm": "rewards", "build_reward_terms": "rewards", "LLMGRPOTrainer": "trainer",
    "OutOfMemoryAdvice": "trainer", "TooManySkips": "trainer", "plan_micro_batches": "trainer", "build": "grpo",
    "TRAINER": "grpo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
