"""EXPERIMENTAL: generation with vLLM (`sampling.backend vllm`), in the training process ("colocated").

Not exercised against a real vLLM here (fusedrl's CI has no GPU and no vLLM; the tests drive this module with a
stand-in that follows vLLM's documented `LLM.generate` / `SamplingParams` / `RequestOutput` interface). What it
does:

- one `vllm.LLM` per process on the training model's weights (`model.name_or_path`, or the embedded default's
  folder), taking `sampling.vllm_gpu_memory` of the GPU;
- before each step's generation, if the policy changed since the last sync, the current weights are loaded into
  it: LoRA merged into a copy of the base weights (the policy untouched), FSDP2 shards gathered, under the plain
  transformers names vLLM's `load_weights` takes;
- `SamplingParams(n=group_size, ...)` per prompt with the run's temperature / top-p / top-k / max tokens / stop
  strings (kept in the text, as the transformers path keeps them), from the same prompt token ids;
- the result is the same `Rollout` as `generate_completions` returns. vLLM's log-probs come from its own
  kernels and precision, so the old log-probs are recomputed by the training model (`sampling.old_logprobs
  recompute`, which the config requires with this backend); the rollout's `old_logp` is zeros.

Where vLLM's internal layout differs from `llm.llm_engine.model_executor.driver_worker.worker.model_runner.model`
(it moves between vLLM versions), weight sync fails with a message naming this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .generation import Rollout, left_pad, tokenize_prompts

__all__ = ["VLLMGenerator", "merged_state_dict"]


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The causal LM's weights as transformers names them (`model.layers.0.self_attn.q_proj.weight`, ...), with
    each LoRA layer's delta (scale B A, peft's `get_delta_weight`) added out of place - the policy's own weights
    are not touched, so repeated syncs cannot drift them by rounding as an in-place merge / unmerge would -
    and FSDP2 shards gathered."""
    from ..checkpointing import unwrapped_name
    from ..distributed import full_tensor

    deltas: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or not hasattr(module, "get_delta_weight") or getattr(module, "disable_adapters", False):
            continue
        active = [a for a in module.active_adapters if a in lora_a]
        if active:
            deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in active)
    out = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "lora_" in name or "modules_to_save" in name:
                continue
            t = full_tensor(t).detach()
            t = t + deltas[name].to(t.dtype) if name in deltas else t.clone()
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            out[unwrapped_name(name)] = t
    return out


def _runner_model(llm: Any) -> Any:
    """The torch model inside a colocated vLLM engine (the layout TRL's colocate mode uses)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    except AttributeError as exc:
        raise RuntimeError("fusedrl.engine.llm.vllm_generation: this vLLM version keeps its model elsewhere; weight "
                           "sync is not supported with it (use sampling.backend hf)") from exc


class VLLMGenerator:
    """A colocated vLLM engine that samples G completions per prompt (see the module docstring).

    Args:
        model: the model folder or hub id the policy was loaded from.
        tokenizer: the policy's tokenizer (prompt tokens, decoding, EOS).
        dtype: "bfloat16" / "float16" / "float32" (vLLM's names), as the training model's weights.
        gpu_memory: the fraction of GPU memory vLLM may take (weights, KV cache).
        max_model_len: the longest prompt + completion.
        seed: vLLM's sampling seed.
        llm: an already built `vllm.LLM` (tests pass a stand-in).
    """

    def __init__(self, model: str, tokenizer: Any, *, dtype: str = "bfloat16", gpu_memory: float = 0.3,
                 max_model_len: int | None = None, seed: int = 0, llm: Any = None) -> None:
        if llm is None:
            import vllm

            llm = vllm.LLM(model=str(model), dtype=dtype, gpu_memory_utilization=gpu_memory,
                           max_model_len=max_model_len, seed=seed, enable_prefix_caching=True)
        self.llm = llm
        self.tokenizer = tokenizer
        self.synced_version: int | None = None

    def sync_weights(self, model: torch.nn.Module, version: int) -> bool:
        """Load the policy's current weights into vLLM unless `version` (the trainer's optimizer-step count) is
        the one loaded last. Every process calls it (FSDP2 gathers). Returns whether it loaded."""
        if version == self.synced_version:
            return False
        weights = merged_state_dict(model)
        _runner_model(self.llm).load_weights(weights.items())
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:  # cached prefixes were computed with the old weights
            reset()
        self.synced_version = version
        return True

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, group_size: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (), max_prompt_length: int | None = None,
                 answers: Sequence | None = None, device: torch.device | str = "cpu") -> Rollout:
        """G completions of each prompt as a `Rollout` (rows i*G .. i*G+G-1 belong to prompts[i]; old_logp
        zeros: recomputed by the trainer)."""
        from vllm import SamplingParams

        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        params = SamplingParams(n=group_size, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                                max_tokens=max_new_tokens, stop=list(stop) or None, include_stop_str_in_output=True)
        token_rows = tokenize_prompts(tok, list(prompts), max_prompt_length)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in token_rows], params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
        rows, completions, truncated, texts = [], [], [], []
        for ids, out in zip(token_rows, outputs):
            if len(out.outputs) != group_size:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} completions of a prompt, not {group_size}")
            for c in out.outputs:
                rows.append(ids)
                completions.append(list(c.token_ids))
                truncated.append(c.finish_reason == "length")
                texts.append(c.text)
        prompt_ids, prompt_mask = left_pad(rows, pad_id, device)
        C = max(1, max(len(c) for c in completions))
        comp_ids = torch.tensor([c + [pad_id] * (C - len(c)) for c in completions], dtype=torch.long)
        comp_mask = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in completions], dtype=torch.long)
        row_prompts = [p for p in prompts for _ in range(group_size)]
        row_answers = [a for a in (answers if answers is not None else [None] * len(prompts))
                       for _ in range(group_size)]
        return Rollout(prompt_ids, prompt_mask, comp_ids.to(device), comp_mask.to(device),
                       torch.zeros(comp_ids.shape, dtype=torch.float32, device=device),
                       torch.tensor(truncated, dtype=torch.bool, device=device), texts, row_prompts, row_answers)
