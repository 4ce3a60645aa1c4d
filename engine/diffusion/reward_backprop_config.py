"""The config of `fusedrl train reward-backprop` (AlignProp / DRaFT-K / DRaFT-LV / ReFL): every field with its
help text and checks, and the cross-field checks that run before any model is loaded.

Fields left `none` take a value that depends on the model; `resolve(cfg)` gives the values a run uses (the
embedded default, `model: none`, has its own: see EMBEDDED_LORA_TARGETS and EMBEDDED_LR).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..checkpointing import POLICIES
from ..config import Check, between, field, ge, gt, section
from ..prompt_data import FILE_TYPES
from ..runs import RunConfig
from .grpo_config import PROMPT_CACHE_HELP, check_lora_placement
from .policy import DEFAULT_LORA_TARGETS, DEFAULT_TEXT_LORA_TARGETS

__all__ = [
    "BackpropConfig", "EMBEDDED_LORA_TARGETS", "EMBEDDED_LR", "LoraConfig", "MemoryConfig", "OptimConfig",
    "PromptsConfig", "Resolved", "RewardBackpropConfig", "RewardConfig", "RewardBackpropRunConfig",
    "SamplingConfig", "resolve",
]

METHODS = ("alignprop", "draft", "draft-lv", "refl")
# The embedded tiny SD3-shaped model moves its images' brightness only 0.52 -> 0.535 through LoRA on the
# attention projections alone (100 steps, measured); with its output projection too: 0.52 -> 0.66.
EMBEDDED_LORA_TARGETS = (*DEFAULT_LORA_TARGETS, "proj_out")
EMBEDDED_LR = 3e-2  # tiny model, random weights: 1e-2 reaches 0.645 in 100 steps, 3e-2 0.66 (AlignProp: 1e-3)
DEFAULT_LR = 1e-3  # AlignProp's LoRA learning rate
DEFAULT_FULL_LR = 1e-5  # full fine-tuning of the denoiser
_WEIGHTLESS = {"brightness", "target_color"}
# Rewards that give no gradient to the pixels (rule-based on encoded JPEGs, or text rewards).
_NOT_DIFFERENTIABLE = {"jpeg_compressibility", "jpeg_incompressibility", "numeric_answer", "exact_match",
                       "regex_format", "sequence_classification"}


def _pair(lo_min: int = 0) -> Check:
    return Check(lambda v: lo_min <= v[0] <= v[1], f"must be [lo, hi] with {lo_min} <= lo <= hi")


@dataclass
class LoraConfig:
    """LoRA adapters (peft), saved in diffusers' format."""

    enabled: bool = field(True, "train LoRA adapters; false: full fine-tuning of the denoiser (fp32 weights)")
    rank: int = field(8, "LoRA rank", check=gt(0))
    alpha: float | None = field(None, "LoRA alpha (scale alpha / rank); none: alpha = rank", check=gt(0))
    dropout: float = field(0.0, "LoRA dropout", check=between(0, 0.99))
    target_modules: list[str] | None = field(
        None, "denoiser modules given LoRA (peft name matching); none: the attention projections "
        f"{list(DEFAULT_LORA_TARGETS)}, plus proj_out on the embedded tiny model")
    text_encoder: bool = field(False, "also LoRA on the CLIP text encoder(s) (TexForce); embeddings are then "
                               "recomputed with gradient at every step")
    text_encoder_target_modules: list[str] = field(list(DEFAULT_TEXT_LORA_TARGETS),
                                                   "text-encoder modules given LoRA (with lora.text_encoder)")
    denoiser: bool = field(True, "LoRA on the denoiser; false with lora.text_encoder: the text encoder(s) alone "
                           "(TexForce)")

    def __post_init__(self) -> None:
        check_lora_placement(self)


@dataclass
class PromptsConfig:
    """Training and eval prompts."""

    train: str | None = field(None, "training prompts: a .txt (a prompt a line), .jsonl or .csv file, or a datasets "
                              "dataset name; none: the built-in prompt list")
    eval: str | None = field(None, "eval prompts (same formats); none: the built-in eval prompts")
    column: str = field("prompt", "the JSONL field / CSV or dataset column holding the prompt")
    split: str = field("train", "the datasets split of the training prompts (eval prompts: the same split)")
    num_eval: int = field(4, "eval prompts used (the first N), one sample each", check=gt(0), resume_ok=True)

    def __post_init__(self) -> None:
        for name in ("train", "eval"):
            value = getattr(self, name)
            if value and Path(value).suffix.lower() in FILE_TYPES and not Path(value).is_file():
                raise ValueError(f"{name}: prompt file {value!r} does not exist")


@dataclass
class SamplingConfig:
    """The sampler whose last steps carry gradients."""

    num_steps: int = field(8, "denoising steps S per sample", check=gt(0))
    batch_size: int = field(8, "prompts (one sample each) per micro-batch, on each process", check=gt(0))
    guidance_scale: float | None = field(None, "classifier-free guidance weight (Flux with a guidance embedding: "
                                         "its input); none: the model's default", check=ge(0))
    noise_level: float = field(0.0, "0: deterministic steps (flow Euler / DDIM eta=0, as DRaFT and AlignProp); "
                               "> 0: stochastic steps (Flow-GRPO SDE noise level a / DDIM eta), reparameterised so "
                               "gradients flow through the step mean", check=ge(0))
    sde_type: Literal["sde", "cps", "dance"] = field("sde", "flow models with noise_level > 0: Flow-GRPO's SDE, "
                                                     "coefficients-preserving sampling or DanceGRPO's SDE")
    height: int | None = field(None, "image height in pixels; none: the model's default", check=gt(0))
    width: int | None = field(None, "image width in pixels; none: the model's default", check=gt(0))


@dataclass
class BackpropConfig:
    """Which steps carry gradients, and the loss (see `method`)."""

    truncation_k: int = field(1, "draft: gradients flow through the last K denoising steps (DRaFT-K); 0: through "
                              "all steps (full DRaFT)", check=ge(0))
    k_range: tuple[int, int] | None = field(
        None, "random K drawn uniformly from [lo, hi] at every step (AlignProp's randomized truncation); alignprop: "
        "none means [1, num_steps]; draft: when set, replaces truncation_k", check=_pair(1))
    lv_samples: int = field(2, "draft-lv: extra re-denoisings of the final sample, each noised back to the last "
                            "step's level with fresh noise and denoised with gradient (DRaFT-LV's n)", check=gt(0))
    refl_range: tuple[int, int] | None = field(
        None, "refl: the step (0-based, < num_steps) where sampling stops is drawn uniformly from [lo, hi]; the clean "
        "image is predicted there in one step with gradient; none: the last quarter of the steps", check=_pair(0))
    refl_margin: float | None = field(None, "refl: loss relu(margin - reward) (ImageReward's ReFL uses 2.0); "
                                      "none: -reward")
    loss_scale: float = field(1.0, "loss = -loss_scale * mean reward (AlignProp's loss coefficient)", check=gt(0))


@dataclass
class MemoryConfig:
    """Activation checkpointing and offloading."""

    checkpointing: Literal[POLICIES] = field(  # POLICIES: the tuple of engine.checkpointing's policy names
        "full", "activation checkpointing of each denoising step with gradient: full (recompute it in backward: "
        "memory flat in K), save_attention / save_attention_and_matmuls (also keep attention outputs / matmuls, so "
        "that backward reruns less; a little memory per step), offload (saved tensors to CPU), none (keep every "
        "activation: memory linear in K)")
    checkpoint_vae: bool = field(True, "checkpoint the VAE decode too (recompute it in backward)")
    offload_text_encoders: bool = field(True, "keep frozen text encoders on the CPU except while encoding")
    offload_vae: bool = field(False, "keep the VAE on the CPU except while decoding (no-grad decodes only)")
    prompt_cache_gb: float = field(4.0, PROMPT_CACHE_HELP, check=ge(0), resume_ok=True)
    patch_attention: bool = field(False, "run the denoiser's attention on fusedrl's flash attention")
    fused_backbone: bool = field(True, "run the denoiser's RMSNorms (SD3.5 / Flux q-k norms) and LoRA linears on "
                                 "fused code (fusedrl.patch_backbone); modules it does not recognize stay stock, "
                                 "named in train.log (speed and memory only: may change on --resume)", resume_ok=True)


@dataclass
class RewardConfig:
    """Differentiable rewards; several are summed with weights."""

    names: list[str] = field(["brightness"], "differentiable rewards by registry name (brightness, target_color, "
                             "aesthetic, clip_score, pickscore, hpsv2, imagereward), or differentiable image reward "
                             "functions 'file.py:function' (with options {\"differentiable\": true}; see "
                             "fusedrl.engine.rewards.function)")
    weights: list[float] | None = field(None, "one weight per reward; none: 1 each")
    paths: dict[str, str] = field({}, "weights location per reward name (local folder or hub id); unset: the "
                                  "reward's default (a JSON object on the command line)")
    options: dict[str, dict[str, Any]] = field({}, "keyword arguments per reward name, e.g. "
                                               '{"target_color": {"target": [1, 0, 0]}} (JSON on the command line)')

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("names: give at least one reward")
        from ..rewards import registry

        keys = []
        for name in self.names:
            try:
                key = registry.check_reward_name(name)
            except ValueError as exc:
                raise ValueError(f"names: {exc}") from None
            keys.append(key)
            if registry.is_function_spec(key):
                opts = next((v for k, v in self.options.items() if registry._key(k) == key), {})
                if opts.get("differentiable") is not True:
                    raise ValueError(f"names: the reward function {name!r} must be declared differentiable (its "
                                     f"gradient is what trains): --reward.options '{{\"{name}\": "
                                     "{\"differentiable\": true}}'")
            if key in _NOT_DIFFERENTIABLE:
                raise ValueError(f"names: reward {name!r} is not differentiable; reward backpropagation needs "
                                 "gradients from the reward (use diffusion-grpo for it)")
        if len(set(keys)) != len(keys):
            raise ValueError(f"names: a reward is listed twice: {self.names}")
        if self.weights is not None and len(self.weights) != len(self.names):
            raise ValueError(f"weights: {len(self.weights)} weights for {len(self.names)} rewards")
        for what, mapping in (("paths", self.paths), ("options", self.options)):
            stray = [k for k in mapping if registry._key(k) not in keys]
            if stray:
                raise ValueError(f"{what}: {stray} name no reward in names ({self.names})")
        for name, opts in self.options.items():  # the weightless rewards are cheap to build: check their options
            if registry._key(name) in _WEIGHTLESS:
                try:
                    registry.load_reward(name, **opts)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"options.{name}: {exc}") from None


@dataclass
class OptimConfig:
    """AdamW on the trainable parameters."""

    lr: float | None = field(None, f"learning rate; none: {DEFAULT_LR} with LoRA ({EMBEDDED_LR} on the embedded tiny "
                             f"model), {DEFAULT_FULL_LR} for full fine-tuning", check=gt(0))
    betas: tuple[float, float] = field((0.9, 0.999), "Adam betas",
                                       check=Check(lambda b: all(0 <= x < 1 for x in b), "must lie in [0, 1)"))
    weight_decay: float = field(1e-4, "AdamW weight decay", check=ge(0))
    eps: float = field(1e-8, "Adam epsilon", check=gt(0))
    max_grad_norm: float | None = field(1.0, "clip the gradient norm to this; none: no clipping", check=gt(0))
    grad_accum: int = field(1, "micro-batches per optimisation step", check=gt(0))
    warmup_steps: int = field(0, "linear learning-rate warm-up steps", check=ge(0))


@dataclass
class RewardBackpropRunConfig(RunConfig):
    """The `run` section with this trainer's defaults (short runs, eval grids)."""

    steps: int = field(100, "optimisation steps in total", check=gt(0), resume_ok=True)
    eval_every: int = field(25, "evaluate on the eval prompts (metrics and a sample grid) every N steps and before "
                            "the first; 0: never", check=ge(0), resume_ok=True)
    checkpoint_every: int = field(25, "save a checkpoint (and the LoRA) every N steps and after the last; 0: only "
                                  "after the last", check=ge(0), resume_ok=True)


@dataclass
class RewardBackpropConfig:
    """`fusedrl train reward-backprop`."""

    model: str | None = field(None, "diffusers model folder or hub id (SD1.5-, SD3- or Flux-family pipeline); none: "
                              "the embedded tiny SD3-shaped model (random weights, learns the brightness reward)")
    revision: str | None = field(None, "hub revision of the model")
    device: str | None = field(None, "device; none: cuda when available, else cpu")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        "auto", "frozen weights' dtype (mixed precision; trainable parameters stay fp32); auto: bf16 on CUDA, fp32 on "
        "the CPU; fp16 uses a gradient scaler")
    cpu_threads: int | None = field(None, "torch threads when running on the CPU; none: 1 for the embedded tiny model "
                                    "(its ops are too small to gain from threads), else torch's default",
                                    check=gt(0), resume_ok=True)
    method: Literal["alignprop", "draft", "draft-lv", "refl"] = field(
        "alignprop", "alignprop: backprop through a random number K of final steps (k_range); draft: through the "
        "last K (truncation_k); draft-lv: K=1 plus lv_samples re-noised re-denoisings of the last step; refl: stop "
        "at a random late step, predict the clean image in one step with gradient")
    backprop: BackpropConfig = section(BackpropConfig, "gradient window and loss")
    sampling: SamplingConfig = section(SamplingConfig, "sampling")
    lora: LoraConfig = section(LoraConfig, "LoRA")
    prompts: PromptsConfig = section(PromptsConfig, "prompts")
    reward: RewardConfig = section(RewardConfig, "rewards")
    optim: OptimConfig = section(OptimConfig, "optimizer")
    memory: MemoryConfig = section(MemoryConfig, "memory")
    run: RewardBackpropRunConfig = section(RewardBackpropRunConfig, "run length, logging, eval and checkpoints")

    def __post_init__(self) -> None:
        S = self.sampling.num_steps
        bp = self.backprop
        problems = []
        if self.model is not None and self.model.startswith(("/", "./", "../", "~")) and \
                not Path(self.model).expanduser().is_dir():
            problems.append(f"model: no folder {self.model!r}")
        if bp.truncation_k > S:
            problems.append(f"backprop.truncation_k = {bp.truncation_k} exceeds sampling.num_steps = {S}")
        if bp.k_range is not None and bp.k_range[1] > S:
            problems.append(f"backprop.k_range = {list(bp.k_range)} exceeds sampling.num_steps = {S}")
        if bp.refl_range is not None and bp.refl_range[1] >= S:
            problems.append(f"backprop.refl_range = {list(bp.refl_range)}: steps are 0 .. sampling.num_steps - 1 "
                            f"= {S - 1}")
        if problems:
            raise ValueError("; ".join(problems))

    def unused_options(self) -> list[str]:
        """The backprop options set away from their defaults that `method` does not read (a config file shared by
        several methods may set them; the trainer names them in train.log, so that none seems to act)."""
        bp, defaults, out = self.backprop, BackpropConfig(), []
        for name, methods in _METHOD_OPTIONS.items():
            if self.method not in methods and getattr(bp, name) != getattr(defaults, name):
                out.append(f"backprop.{name} (for method {' / '.join(methods)})")
        if self.method == "draft" and bp.k_range is not None and bp.truncation_k != defaults.truncation_k:
            out.append("backprop.truncation_k (backprop.k_range replaces it)")
        return out


# the backprop options each method reads (the others must keep their defaults)
_METHOD_OPTIONS = {"truncation_k": ("draft",), "k_range": ("alignprop", "draft"), "lv_samples": ("draft-lv",),
                   "refl_range": ("refl",), "refl_margin": ("refl",)}


@dataclass(frozen=True)
class Resolved:
    """The values a run uses for the fields that depend on the model (`resolve`)."""

    embedded: bool
    lora_targets: tuple[str, ...]
    lr: float
    cpu_threads: int | None


def resolve(cfg: RewardBackpropConfig) -> Resolved:
    """Fill the model-dependent defaults (fields left none)."""
    embedded = cfg.model is None
    targets = tuple(cfg.lora.target_modules) if cfg.lora.target_modules else (
        EMBEDDED_LORA_TARGETS if embedded else DEFAULT_LORA_TARGETS)
    if cfg.optim.lr is not None:
        lr = cfg.optim.lr
    elif not cfg.lora.enabled:
        lr = DEFAULT_FULL_LR
    else:
        lr = EMBEDDED_LR if embedded else DEFAULT_LR
    threads = cfg.cpu_threads if cfg.cpu_threads is not None else (1 if embedded else None)
    return Resolved(embedded, targets, lr, threads)
