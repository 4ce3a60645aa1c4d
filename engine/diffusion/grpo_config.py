"""The config of `fusedrl train diffusion-grpo` (`DiffusionGRPOConfig`): every option, its help text and its
checks. Everything here is validated when the config is built, before any model or reward is loaded, so a bad
value fails at once with the field's dotted path (`sampling.group_size: must be >= 2; got 1`).

Importing this module imports no torch, diffusers or transformers (so `fusedrl train diffusion-grpo --help`
stays fast); checks that need a registry (reward names) import it inside the check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..checkpointing import CheckpointingSection
from ..config import Check, between, field, ge, gt, section
from ..prompt_data import FILE_TYPES
from ..runs import RunConfig

PROMPT_CACHE_HELP = ("host memory (GB, per process) for the frozen text encoders' prompt embeddings; the least "
                     "recently used are encoded again when next drawn (the same numbers); 0: encode every time")

__all__ = [
    "DiffusionGRPOConfig", "GRPOSection", "GRPORunConfig", "LoraSection", "MemorySection",
    "ModelSection", "OptimSection", "PromptsSection", "RewardSection", "SamplingSection",
]

# Attention projections of diffusers' denoisers (UNet, SD3 and Flux transformers), as peft module names.
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _looks_like_local_path(value: str) -> bool:
    """A model argument meant as a local folder (hub ids are `org/name` and never start like these)."""
    return value.startswith(("/", "./", "../", "~")) or os.sep + os.sep in value or value.count("/") > 1 or \
        (os.sep != "/" and os.sep in value)


def _reward_names_known(names: list[str]) -> bool:
    from ..rewards.registry import check_reward_name

    for name in names:
        check_reward_name(name)
    return True


@dataclass
class ModelSection:
    """The diffusers pipeline being trained."""

    model: str | None = field(None, "diffusers pipeline folder or hub id: SD1.5 family (UNet + DDIM), SD3 or Flux; "
                              "none: the embedded default, a tiny SD3-shaped flow model built from configs",
                              metavar="PATH_OR_ID")
    revision: str | None = field(None, "hub revision (branch, tag or commit) of `model.model`")
    variant: str | None = field(None, "weights variant of `model.model` (e.g. fp16)")
    device: str = field("auto", "where the denoiser runs: auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        "auto", "dtype of the frozen weights (auto: bf16 on CUDA, fp32 on the CPU); trainable weights are fp32")
    vae_dtype: Literal["auto", "fp32", "bf16", "fp16"] = field("auto", "dtype of the VAE (auto: as model.dtype)")
    max_sequence_length: int | None = field(None, "T5 tokens for SD3 / Flux (none: the pipeline's default)",
                                            check=gt(0))
    offload_text_encoders: bool = field(True, "keep the frozen text encoders on the CPU except while encoding "
                                        "(prompt embeddings are cached)")
    offload_vae: bool = field(False, "keep the VAE on the CPU except while decoding")
    prompt_cache_gb: float = field(4.0, PROMPT_CACHE_HELP, check=ge(0), resume_ok=True)
    patch_attention: bool = field(False, "run the denoiser's attention on fusedrl's flash attention")
    fused_backbone: bool = field(True, "run the denoiser's RMSNorms (SD3.5 / Flux q-k norms) and LoRA linears on "
                                 "fused code (fusedrl.patch_backbone); modules it does not recognize stay stock, "
                                 "named in train.log (speed and memory only: may change on --resume)", resume_ok=True)
    cpu_threads: int | None = field(None, "torch CPU threads while training (none: 1 for the embedded tiny model, "
                                    "whose ops are too small to share out, else torch's default)", check=gt(0),
                                    resume_ok=True)

    def __post_init__(self) -> None:
        if self.model is not None:
            path = Path(self.model).expanduser()
            if _looks_like_local_path(self.model) and not path.exists():
                raise ValueError(f"model: the folder {self.model!r} does not exist")
            if path.is_file():
                raise ValueError(f"model: {self.model!r} is a file; give the pipeline folder (with model_index.json)")
            if path.is_dir() and not (path / "model_index.json").is_file():
                raise ValueError(f"model: {self.model!r} has no model_index.json (not a diffusers pipeline folder)")
        if self.device != "auto" and not (self.device == "cpu" or self.device == "cuda"
                                          or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"device: must be auto, cpu, cuda or cuda:N; got {self.device!r}")


@dataclass
class LoraSection:
    """LoRA adapters (peft), or full fine-tuning."""

    enabled: bool = field(True, "train LoRA adapters; --no-lora.enabled: full fine-tuning of the denoiser (fp32 "
                          "weights; the KL reference is then a frozen copy)")
    rank: int = field(8, "LoRA rank", check=gt(0))
    alpha: float | None = field(None, "LoRA alpha (none: = rank, scale 1)", check=gt(0))
    dropout: float = field(0.0, "LoRA dropout", check=Check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    target_modules: list[str] | None = field(
        None, "denoiser modules that get LoRA (peft names); none: the attention projections to_q to_k to_v to_out.0, "
        "and for the embedded tiny model also its MLPs, adaLN modulations and output projection")
    text_encoder: bool = field(False, "also put LoRA on the CLIP text encoder(s) (TexForce)")
    text_encoder_target_modules: list[str] = field(DEFAULT_TEXT_LORA_TARGETS,
                                                   "text-encoder modules that get LoRA (with lora.text_encoder)")
    denoiser: bool = field(True, "LoRA on the denoiser; --no-lora.denoiser with --lora.text_encoder trains the "
                           "text encoder(s) alone (TexForce)")

    def __post_init__(self) -> None:
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules: give at least one module name, or none for the default")
        check_lora_placement(self)


def check_lora_placement(lora: Any) -> None:
    """The checks of where LoRA goes, shared by both diffusion trainers' LoRA sections (fields enabled, denoiser,
    target_modules, text_encoder, text_encoder_target_modules); a ValueError names the field."""
    if lora.text_encoder and not lora.text_encoder_target_modules:
        raise ValueError("text_encoder_target_modules: give at least one module name (with lora.text_encoder)")
    if lora.enabled and not lora.denoiser and not lora.text_encoder:
        raise ValueError("denoiser: false leaves LoRA on nothing; set lora.text_encoder to train the text "
                         "encoder(s) alone, or lora.enabled false for full fine-tuning")
    if not lora.denoiser and lora.target_modules is not None:
        raise ValueError("target_modules: names denoiser modules, but lora.denoiser is false")


@dataclass
class PromptsSection:
    """Training and evaluation prompts."""

    train: str | None = field(None, "training prompts: a .txt (a prompt per line), .jsonl or .csv file, or a "
                              "`datasets` dataset name; none: the built-in list", metavar="FILE_OR_DATASET")
    eval: str | None = field(None, "evaluation prompts, same forms (none: the built-in eval list when "
                             "prompts.train is none, else the first prompts.num_eval training prompts)",
                             metavar="FILE_OR_DATASET")
    column: str = field("prompt", "the JSONL field / CSV column / dataset column that holds the prompt")
    split: str = field("train", "dataset split of prompts.train")
    eval_split: str = field("test", "dataset split of prompts.eval")
    limit: int | None = field(None, "use only the first N training prompts (after a seeded shuffle)", check=gt(0))
    per_step: int = field(4, "prompts per training step, over all processes; each is sampled sampling.group_size "
                          "times", check=gt(0))
    num_eval: int = field(4, "evaluation prompts sampled at each evaluation", check=gt(0))
    eval_images_per_prompt: int = field(2, "images per evaluation prompt", check=gt(0))

    def __post_init__(self) -> None:
        for name in ("train", "eval"):
            value = getattr(self, name)
            if value is not None and Path(value).suffix.lower() in FILE_TYPES and not Path(value).is_file():
                raise ValueError(f"{name}: the prompt file {value!r} does not exist")


@dataclass
class SamplingSection:
    """Sampling with log-probs: steps, guidance, groups, the SDE window and noise, seeds."""

    steps: int = field(10, "denoising steps per image (few-step samplers work too)", check=gt(0))
    group_size: int = field(8, "G: images per prompt; advantages compare the images of a prompt",
                            check=Check(lambda v: v >= 2, "must be >= 2 (a group of one has no advantage)"))
    guidance_scale: float | None = field(None, "classifier-free guidance weight (none: the model's default; "
                                         "<= 1 disables CFG)", check=ge(0))
    noise_level: float | None = field(None, "SDE noise: Flow-GRPO's a for flow models (none: 0.7; DanceGRPO's eta "
                                      "under sde_type dance, none: 0.3), DDIM eta for the SD1.5 family (none: 1.0)",
                                      check=gt(0))
    sde_type: Literal["sde", "cps", "dance"] = field("sde", "flow models: Flow-GRPO's SDE step, the "
                                                     "coefficients-preserving step, or DanceGRPO's step (Flow-GRPO's "
                                                     "with a constant std)")
    sde_window: tuple[int, int] | None = field(
        None, "(start, end): only steps start <= i < end are SDE steps with log-probs (and trained); the others are "
        "deterministic ODE steps (MixGRPO / Flow-GRPO-Fast); none: every step", metavar="INT")
    window_shift_every: int = field(
        0, "move sde_window every N training steps, keeping its size (MixGRPO's sliding window); 0: it stays",
        check=ge(0))
    window_shift_stride: int = field(
        1, "steps the window moves each time: > 0 towards the last step (MixGRPO; its code's default moves by the "
        "window's size), < 0 towards the first (B2-DiffuRL's backward-progressive training, with sde_window at "
        "the end); it stops at either end",
        check=Check(lambda v: v != 0, "must not be 0"))
    same_initial_noise: bool = field(False, "all images of a group start from the same noise (DanceGRPO); with "
                                     "sde_window, they share the ODE steps before the window and branch at its "
                                     "start (B2-DiffuRL's branch sampling)")
    window_random_range: tuple[int, int] | None = field(
        None, "(lo, hi): each training step places sde_window's size at a seeded random start in [lo, hi - size] "
        "(Flow-GRPO-Fast's sde_window_size / sde_window_range); none: sde_window stays (or slides)", metavar="INT")
    height: int | None = field(None, "image height in px (none: the model's default)", check=gt(0))
    width: int | None = field(None, "image width in px (none: the model's default)", check=gt(0))
    micro_batch: int | None = field(None, "samples per denoiser call, in sampling and in training (the same "
                                    "micro-batches keep the on-policy ratio exactly 1); none: all at once",
                                    check=gt(0))
    eval_seed: int = field(1234, "seed of the evaluation samples (the same at every evaluation, so grids compare)")

    def __post_init__(self) -> None:
        if self.sde_window is not None:
            start, end = self.sde_window
            if not 0 <= start < end <= self.steps:
                raise ValueError(f"sde_window: must satisfy 0 <= start < end <= sampling.steps = {self.steps}; "
                                 f"got {list(self.sde_window)}")
        if self.window_shift_every and self.sde_window is None:
            raise ValueError("window_shift_every: moves sampling.sde_window, which is not set (none: every step is "
                             "an SDE step)")
        if self.window_random_range is not None:
            if self.sde_window is None:
                raise ValueError("window_random_range: places sampling.sde_window (its size), which is not set")
            if self.window_shift_every:
                raise ValueError("window_random_range: a random window does not also slide (window_shift_every)")
            lo, hi = self.window_random_range
            size = self.sde_window[1] - self.sde_window[0]
            if not 0 <= lo <= hi - size or hi > self.steps:
                raise ValueError(f"window_random_range: must satisfy 0 <= lo <= hi - {size} (sde_window's size) and "
                                 f"hi <= sampling.steps = {self.steps}; got {list(self.window_random_range)}")
        if self.sde_type == "cps":  # CPS's last step, into sigma = 0, has no noise: no log-prob to train on
            if self.sde_window is None and self.steps == 1:
                raise ValueError("steps: 1 step under sde_type cps is its last step, into sigma = 0, which has no "
                                 "noise (nothing to train); use 2 or more steps, or sde_type sde")
            if self.sde_window is not None and self.sde_window[1] - self.sde_window[0] == 1:
                last = self.sde_window[0] == self.steps - 1
                reaches = ((self.window_shift_every and self.window_shift_stride > 0)
                           or (self.window_random_range is not None and self.window_random_range[1] == self.steps))
                if last or reaches:
                    where = "at" if last else "that can reach"
                    raise ValueError(f"sde_window: a one-step window {where} the last step ({self.steps - 1}) holds "
                                     "only CPS's step into sigma = 0, which has no noise; widen it or keep it earlier")

    def window_at(self, step: int, seed: int = 0) -> tuple[int, int] | None:
        """The SDE window of training step `step` (1-based): sde_window moved by window_shift_stride once every
        window_shift_every steps, clamped so that it stays within [0, steps) at its size, or placed at a random start
        in window_random_range (drawn from `seed` and `step`: every process draws the same); None: every step."""
        if self.sde_window is None:
            return None
        start, end = self.sde_window
        size = end - start
        if self.window_random_range is not None:
            import random

            lo, hi = self.window_random_range
            start = random.Random(f"{seed}:sde_window:{step}").randint(lo, hi - size)
            return start, start + size
        if not self.window_shift_every:
            return start, end
        moved = start + self.window_shift_stride * ((step - 1) // self.window_shift_every)
        start = min(max(moved, 0), self.steps - size)
        return start, start + size


@dataclass
class RewardSection:
    """The reward: one registered reward, or several combined with weights."""

    names: list[str] = field(["brightness"], "registered reward names (fusedrl.engine.rewards.available_rewards()) or "
                             "image reward functions 'file.py:function' (called as fn(images, prompts=..., "
                             "metadata=...), see fusedrl.engine.rewards.function); several are combined with "
                             "reward.weights", check=Check(
                                 lambda v: len(v) > 0 and _reward_names_known(v), "must name at least one reward"),
                             metavar="NAME")
    weights: list[float] | None = field(None, "a weight per reward in reward.names (none: 1 each)")
    options: dict[str, dict[str, Any]] = field(
        {}, 'keyword arguments of each reward\'s factory, by name, e.g. {"pickscore": {"path": "/models/PickScore"}} '
        "(JSON on the command line)")
    normalize: Literal["total", "per_reward"] = field(
        "total", "several rewards: advantages of the weighted total, or the weighted sum of each reward's "
        "group-normalized advantages (MixGRPO)")
    pareto: Literal["none", "batch", "group"] = field(
        "none", "Parrot's Pareto selection: train only on the samples that no other sample of the step (batch) or "
        "of their prompt's group (group) beats on every reward (weights give each reward's direction: a negative "
        "one means lower is better); the others get no gradient. With one reward: only the best samples")
    device: str | None = field(None, "device of learned rewards (none: model.device)")
    background: bool = field(False, "score rewards in a background thread, overlapping the sampling of the next "
                             "prompts (asynchronous rewards)")

    def __post_init__(self) -> None:
        twice = sorted({n for n in self.names if self.names.count(n) > 1})
        if twice:  # rewards are keyed by name: the later one (and its weight) replaced the earlier, silently
            raise ValueError(f"names: {twice} listed more than once; give each reward once (with one weight)")
        if self.weights is not None and len(self.weights) != len(self.names):
            raise ValueError(f"weights: give one weight per reward in reward.names ({len(self.names)}); "
                             f"got {len(self.weights)}")
        unknown = sorted(set(self.options) - set(self.names))
        if unknown:
            raise ValueError(f"options: names {unknown} are not in reward.names {self.names}")


@dataclass
class OptimSection:
    """AdamW, gradient accumulation, clipping, mixed precision."""

    lr: float | None = field(None, "learning rate (AdamW); none: 3e-4 (Flow-GRPO's), or 2e-2 for the embedded tiny "
                             "model", check=gt(0))
    betas: tuple[float, float] = field((0.9, 0.999), "AdamW betas",
                                       check=Check(lambda b: all(0 <= x < 1 for x in b), "must be in [0, 1)"))
    weight_decay: float = field(1e-4, "AdamW weight decay", check=ge(0))
    eps: float = field(1e-8, "AdamW epsilon", check=gt(0))
    grad_accum: int = field(0, "micro-batches (each with all its trained timesteps) accumulated per optimizer step, "
                            "on each process; 0: all of a step's micro-batches (one update per step and inner epoch)",
                            check=ge(0))
    max_grad_norm: float | None = field(1.0, "clip the gradient norm to this (none: no clipping)", check=gt(0))
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        "no", "run the denoiser under torch.autocast in this dtype, in sampling and training alike (fp16 adds a "
        "gradient scaler)")


@dataclass
class GRPOSection:
    """The GRPO objective (Flow-GRPO / DanceGRPO / DDPO)."""

    clip_range: float = field(1e-4, "PPO clip range eps: ratios are clipped to [1 - eps, 1 + eps] (tiny, because "
                              "log-probs are means over latent elements)", check=gt(0))
    adv_clip_max: float = field(5.0, "clamp advantages to [-x, x]", check=gt(0))
    std: Literal["group", "batch", "none"] = field("group", "advantage scale: each group's reward std, the batch's, "
                                                   "or none (Dr. GRPO)")
    beta: float = field(0.0, "KL coefficient: loss += beta * KL(policy || reference) per step (Flow-GRPO's form); "
                        "the reference is the model with the LoRA adapter disabled (no second model)", check=ge(0))
    prompt_stats_buffer: int = field(
        0, "DDPO's per-prompt stat tracking: advantages from the mean and std of each prompt's last N rewards across "
        "steps (N = this; DDPO: 16), or of the step's batch while a prompt has fewer than prompt_stats_min_count; "
        "replaces grpo.std's group statistics; 0: off", check=ge(0))
    prompt_stats_min_count: int = field(16, "rewards a prompt needs before its own statistics are used",
                                        check=gt(0))
    timestep_fraction: float = field(1.0, "fraction of the SDE steps trained in each step: int(fraction x steps), at "
                                     "least one, as Flow-GRPO counts them (0.99 of 10: 9)",
                                     check=Check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    timestep_selection: Literal["first", "random"] = field(
        "first", "which SDE steps timestep_fraction trains: the first ones (Flow-GRPO), or a seeded random subset "
        "drawn anew each step (DDPO / DanceGRPO shuffle the timesteps)")
    inner_epochs: int = field(1, "passes over each step's samples (later passes are off-policy: the clip acts)",
                              check=gt(0))
    ema: bool = field(False, "keep an EMA of the trainable weights; evaluation and the saved lora_ema/ (full "
                      "fine-tuning: denoiser_ema/) use it")
    ema_decay: float = field(0.95, "EMA decay per optimizer step", check=between(0, 1))
    reference_ema_decay: float | None = field(
        None, "full fine-tuning with beta > 0: move the reference copy towards the policy with this EMA decay after "
        "each optimizer step (none: the reference stays the initial model)", check=between(0, 1))
    max_consecutive_skips: int = field(10, "stop when this many steps in a row were skipped (NaN/inf rewards, "
                                       "log-probs, loss or gradients)", check=gt(0))


@dataclass
class MemorySection(CheckpointingSection):
    """Memory-saving options."""


@dataclass
class GRPORunConfig(RunConfig):
    """The `run` section, with defaults sized for the embedded default (a few CPU minutes)."""

    steps: int = field(120, "optimisation steps in total (each samples prompts.per_step x sampling.group_size "
                       "images)", check=gt(0), resume_ok=True)
    eval_every: int = field(30, "evaluate (and save a sample grid) every N steps, and before the first; 0: never",
                            check=ge(0), resume_ok=True)
    checkpoint_every: int = field(40, "save a checkpoint (and lora/) every N steps and after the last; 0: only after "
                                  "the last", check=ge(0), resume_ok=True)


@dataclass
class DiffusionGRPOConfig:
    """`fusedrl train diffusion-grpo`."""

    model: ModelSection = section(ModelSection, "the diffusers pipeline")
    lora: LoraSection = section(LoraSection, "LoRA adapters or full fine-tuning")
    prompts: PromptsSection = section(PromptsSection, "training and evaluation prompts")
    sampling: SamplingSection = section(SamplingSection, "sampling with log-probs")
    reward: RewardSection = section(RewardSection, "the reward")
    optim: OptimSection = section(OptimSection, "optimizer")
    grpo: GRPOSection = section(GRPOSection, "the GRPO objective")
    memory: MemorySection = section(MemorySection, "memory savers")
    run: GRPORunConfig = section(GRPORunConfig, "run length, seed, logging, evaluation and checkpoint cadence")

    def __post_init__(self) -> None:
        if self.grpo.prompt_stats_buffer:
            if self.grpo.prompt_stats_min_count > self.grpo.prompt_stats_buffer:
                raise ValueError(f"grpo.prompt_stats_min_count ({self.grpo.prompt_stats_min_count}) exceeds "
                                 f"grpo.prompt_stats_buffer ({self.grpo.prompt_stats_buffer}): the buffers never fill")
            if self.grpo.std != "group":
                raise ValueError(f"grpo.std {self.grpo.std!r} has no effect with grpo.prompt_stats_buffer, whose "
                                 "statistics are each prompt's recent rewards (leave grpo.std at 'group')")
            if self.reward.normalize == "per_reward" and len(self.reward.names) > 1:
                raise ValueError("grpo.prompt_stats_buffer normalizes the weighted total; it does not combine with "
                                 "reward.normalize per_reward")
        if self.grpo.reference_ema_decay is not None and self.lora.enabled:
            raise ValueError("grpo.reference_ema_decay is for full fine-tuning (--no-lora.enabled); with LoRA the "
                             "reference is the adapter-off model")
