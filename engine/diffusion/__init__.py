"""Diffusion policies and sampling with log-probs for RL post-training (Flow-GRPO, DanceGRPO, MixGRPO, DDPO).

    from fusedrl.engine.diffusion import load_policy, sample, recompute_logprobs

    policy = load_policy()                       # the embedded tiny SD3-shaped model (or a path / hub id)
    traj = sample(policy, ["a red apple"], group_size=4, num_steps=8, seed=0)
    out = recompute_logprobs(policy, traj, traj.sde_steps, with_reference=True)

- `policy`: `DiffusionPolicy` / `load_policy` (SD1.5 UNet + DDIM, SD3, Flux; LoRA or full fine-tuning).
- `sampling`: `sample` -> `Trajectory`, `recompute_logprobs` -> `LogProbs`.
- `prompts`: `load_prompts`, `prompt_batch`.
- `tiny`: the embedded default and the tiny test models (`tiny_model_dir`).

This package imports torch and fusedrl.kernels; diffusers, transformers and peft are imported when a
policy is built (`import fusedrl.engine` does not import this package).
"""

from .policy import DiffusionPolicy, LoraOptions, PromptEmbeddings, Schedule, load_policy
from .prompts import DEFAULT_EVAL_PROMPTS, DEFAULT_PROMPTS, load_prompts, prompt_batch
from .sampling import LogProbs, Trajectory, recompute_logprobs, sample
from .tiny import build_tiny_pipeline, save_tiny, tiny_model_dir

__all__ = [
    "DEFAULT_EVAL_PROMPTS", "DEFAULT_PROMPTS", "DiffusionPolicy", "LogProbs", "LoraOptions", "PromptEmbeddings",
    "Schedule", "Trajectory", "build_tiny_pipeline", "load_policy", "load_prompts", "prompt_batch",
    "recompute_logprobs", "sample", "save_tiny", "tiny_model_dir",
]
