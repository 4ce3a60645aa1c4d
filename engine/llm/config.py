"""The config of `fusedrl train llm-grpo` (`LLMGRPOConfig`): every option, its help text and its checks.

Everything here is validated when the config is built, before any tokenizer or model is loaded, so a bad value
fails at once with the field's dotted path (`sampling.group_size: must be >= 2; got 1`). Checks that need the
tokenizer and the model's config (prompt + completion longer than the model's context) run in the trainer right
after those two small files are read and before any weight is loaded.

Importing this module imports no torch or transformers (so `fusedrl train llm-grpo --help` stays fast).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fusedrl.kernels.grpo_loss.reference import LOSS_TYPES

from ..checkpointing import CheckpointingSection
from ..config import Check, field, ge, gt, section
from ..prompt_data import FILE_TYPES
from ..runs.run import RunConfig

__all__ = [
    "GRPOSection", "LLMGRPOConfig", "LLMRunConfig", "LoraSection", "MemorySection",
    "ModelSection", "OptimSection", "PromptsSection", "RewardSection", "SamplingSection", "LOSS_TYPES",
]


# The embedded default's optimizer settings (a tiny model learning a toy task in a few CPU minutes).
EMBEDDED_LR = 3e-4
EMBEDDED_COMPLETION = 2
DEFAULT_COMPLETION = 256
LORA_LR = 1e-5
FULL_LR = 1e-6  # TRL's GRPOConfig default


def _reward_names_known(names: list[str]) -> bool:
    from ..rewards import available_rewards

    known = set(available_rewards())
    bad = [n for n in names if n.strip().lower().replace("-", "_") not in known]
    if bad:
        raise ValueError(f"unknown reward(s) {bad}; known: {', '.join(sorted(known))}")
    return True


def _is_local_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.count("/") > 1


@dataclass
class ModelSection:
    """The causal LM being trained."""

    name_or_path: str | None = field(
        None, "Hugging Face causal LM: a folder saved with save_pretrained or a hub id; none: the embedded default, "
        "a tiny model built from a config (model.tiny_*) with a character tokenizer", metavar="PATH_OR_ID")
    revision: str | None = field(None, "hub revision (branch, tag or commit) of model.name_or_path")
    trust_remote_code: bool = field(False, "let transformers run the model repository's own code")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        "auto", "dtype of the weights (auto: bf16 on CUDA with LoRA, fp32 on the CPU and for full fine-tuning, "
        "whose AdamW steps bf16 / fp16 weights cannot hold); LoRA weights are fp32; fp16 trains with loss scaling")
    device: str = field("auto", "where the model runs: auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    attn_implementation: str | None = field(None, "transformers attention implementation (sdpa, eager, "
                                            "flash_attention_2, ...); none: the model's default")
    patch_attention: bool = field(False, "run the model's attention on fusedrl's flash attention "
                                  "(fusedrl.patch_attention)")
    fused_backbone: bool = field(True, "run the model's RMSNorms, SwiGLU MLPs, rotary embedding and LoRA linears "
                                 "on fused code (fusedrl.patch_backbone); modules it does not recognize stay stock, "
                                 "named in train.log (speed and memory only: may change on --resume)", resume_ok=True)
    disable_dropout: bool = field(True, "set every dropout probability to 0 (as TRL does), so that the log-probs "
                                  "recomputed in training equal those recorded at sampling")
    tiny_arch: Literal["qwen2", "llama", "gpt2"] = field("qwen2", "embedded default: the architecture of the tiny "
                                                         "model (used only when model.name_or_path is none)")
    tiny_hidden_size: int = field(128, "embedded default: hidden size", check=gt(0))
    tiny_layers: int = field(2, "embedded default: decoder layers", check=gt(0))
    cpu_threads: int | None = field(None, "torch CPU threads while training (none: 1 for the embedded tiny model, "
                                    "whose ops are too small to share out, else torch's default)", check=gt(0),
                                    resume_ok=True)

    def __post_init__(self) -> None:
        if self.name_or_path is not None:
            path = Path(self.name_or_path).expanduser()
            if _is_local_path(self.name_or_path) and not path.exists():
                raise ValueError(f"name_or_path: the folder {self.name_or_path!r} does not exist")
            if path.is_file():
                raise ValueError(f"name_or_path: {self.name_or_path!r} is a file; give the model folder "
                                 "(with config.json)")
            if path.is_dir() and not (path / "config.json").is_file():
                raise ValueError(f"name_or_path: {self.name_or_path!r} has no config.json (not a transformers "
                                 "model folder)")
        if self.device != "auto" and not (self.device in ("cpu", "cuda")
                                          or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"device: must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.tiny_hidden_size % 4:
            raise ValueError(f"tiny_hidden_size: must be a multiple of 4 (4 attention heads); got "
                             f"{self.tiny_hidden_size}")


@dataclass
class LoraSection:
    """LoRA adapters (peft), or full fine-tuning."""

    enabled: bool | None = field(None, "train LoRA adapters (the KL reference is the model with the adapter "
                                 "disabled); --no-lora.enabled: full fine-tuning (the KL reference is then a frozen "
                                 "copy); none: LoRA for a given model, full fine-tuning for the embedded default (a "
                                 "random tiny model gives an adapter nothing to adapt)")
    rank: int = field(16, "LoRA rank", check=gt(0))
    alpha: float | None = field(None, "LoRA alpha (none: 2 x rank)", check=gt(0))
    dropout: float = field(0.0, "LoRA dropout (keep 0 for an exact on-policy ratio)",
                           check=Check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    target_modules: list[str] | None = field(
        None, "modules that get LoRA (peft names, e.g. q_proj v_proj); none: every linear layer but the LM head "
        "(peft's all-linear)")

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            if not self.target_modules:
                raise ValueError("target_modules: give at least one module name, or none for every linear layer")
            if any(m.split(".")[-1] in ("lm_head", "embed_out", "output") for m in self.target_modules):
                raise ValueError("target_modules: the LM head cannot carry LoRA here (the fused loss reads the head's "
                                 "weight directly); train it with --no-lora.enabled")


@dataclass
class PromptsSection:
    """Training prompts (and reference answers for verifiable rewards)."""

    train: str | None = field(
        None, "training prompts: a .jsonl/.json, .csv or .parquet file with a prompt column (and an answer column "
        "for answer-checking rewards), or a `datasets` dataset name / saved folder; none: the embedded toy task "
        "(a tiny arithmetic: 'a+b=' -> a + b for a, b in 0..4)", metavar="FILE_OR_DATASET")
    prompt_field: str = field("prompt", "the column that holds the prompt text")
    answer_field: str | None = field("answer", "the column that holds the reference answer (none: no answers; "
                                     "a missing column is allowed when no reward needs answers)")
    split: str = field("train", "dataset split of prompts.train")
    limit: int | None = field(None, "use only the first N prompts (after a seeded shuffle)", check=gt(0))
    per_step: int = field(8, "prompts per training step; each is sampled sampling.group_size times", check=gt(0))
    max_prompt_length: int | None = field(None, "keep only the last N tokens of longer prompts (none: refuse a "
                                          "prompt that leaves no room for the completion in the model's context)",
                                          check=gt(0))
    eval: str | None = field(None, "evaluation prompts (run.eval_every), the same forms and columns as "
                             "prompts.train; none: the first prompts.num_eval training prompts",
                             metavar="FILE_OR_DATASET")
    eval_split: str = field("test", "dataset split of prompts.eval")
    num_eval: int = field(32, "evaluation prompts used at each evaluation (the first N)", check=gt(0))

    def __post_init__(self) -> None:
        for name in ("train", "eval"):
            value = getattr(self, name)
            if value is not None:
                path = Path(value).expanduser()
                if path.suffix.lower() in FILE_TYPES and not path.is_file():
                    raise ValueError(f"{name}: the prompt file {value!r} does not exist")


@dataclass
class SamplingSection:
    """Generation of the completions (model.generate with a KV cache)."""

    group_size: int = field(8, "G: completions per prompt; advantages compare the completions of a prompt",
                            check=Check(lambda v: v >= 2, "must be >= 2 (a group of one has no advantage)"))
    max_completion_length: int | None = field(None, f"most tokens per completion; none: {EMBEDDED_COMPLETION} for "
                                              f"the embedded default, {DEFAULT_COMPLETION} otherwise", check=gt(0))
    temperature: float = field(1.0, "sampling temperature (the log-probs of training use the same)", check=gt(0))
    top_p: float = field(1.0, "nucleus sampling: keep the smallest token set of this probability", check=Check(
        lambda v: 0 < v <= 1, "must be in (0, 1]"))
    top_k: int = field(0, "keep the k most likely tokens (0: off)", check=ge(0))
    stop: list[str] = field([], "stop strings: a completion ends after the token that completes one (the stop "
                            "string stays in the text)", metavar="STR")
    batch_size: int | None = field(None, "completions per generate call (none: all of a step's at once)",
                                   check=gt(0))
    backend: Literal["hf", "vllm"] = field("hf", "generation backend: transformers' generate, or vLLM "
                                           "(EXPERIMENTAL, untested in fusedrl's CI: a colocated vllm.LLM per process, "
                                           "weights synced after each update; needs the vllm package and "
                                           "sampling.old_logprobs recompute)")
    vllm_gpu_memory: float = field(0.3, "backend vllm: the fraction of GPU memory vLLM may take (weights and KV "
                                   "cache)", check=Check(lambda v: 0 < v < 1, "must be in (0, 1)"))
    eval_seed: int = field(1234, "seed of the evaluation's completions (the same at every evaluation, so they "
                           "compare)")
    old_logprobs: Literal["sampling", "recompute"] = field(
        "sampling", "old log-probs of the ratio when a batch gets several updates (grpo.num_iterations or "
        "grpo.mini_batches > 1): recorded while sampling (no extra forward pass), or recomputed by a forward pass "
        "before training (TRL's way; use it when generation runs in another precision). With one update per batch "
        "the update is on policy and the ratio is 1, as in TRL")

    def __post_init__(self) -> None:
        if any(not s for s in self.stop):
            raise ValueError("stop: empty stop strings are not allowed")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("backend: 'vllm' needs the vllm package, which is not installed (pip install vllm); "
                             "use the default 'hf' (transformers' generate)")
        if self.backend == "vllm" and self.old_logprobs != "recompute":
            raise ValueError("old_logprobs: with backend 'vllm' the old log-probs must be recomputed by the training "
                             "model (vLLM's come from other kernels and precision): set sampling.old_logprobs "
                             "recompute")


@dataclass
class RewardSection:
    """The reward: registered text rewards and/or a Python function, combined with weights."""

    names: list[str] = field([], "registered reward names (numeric_answer, exact_match, regex_format, "
                             "sequence_classification, ...); none given and no reward.function: the embedded "
                             "task's reward (numeric_answer)", check=Check(lambda v: _reward_names_known(v),
                                                                           "unknown reward"), metavar="NAME")
    function: str | None = field(None, "a Python reward function, 'package.module:function' or "
                                 "'path/to/file.py:function', called as fn(completions, prompts=..., answers=...) "
                                 "-> a number per completion", metavar="MODULE:FUNCTION")
    weights: list[float] | None = field(None, "a weight per reward (reward.names, then reward.function); none: 1 "
                                        "each")
    options: dict[str, dict[str, Any]] = field(
        {}, 'keyword arguments of each registered reward\'s factory, by name, e.g. {"regex_format": {"pattern": '
        '"A: .*"}} (JSON on the command line)')
    device: str | None = field(None, "device of learned rewards (none: model.device)")

    def __post_init__(self) -> None:
        n = len(self.names) + (self.function is not None)
        if self.weights is not None and len(self.weights) != n:
            raise ValueError(f"weights: give one weight per reward ({n}: reward.names, then reward.function); "
                             f"got {len(self.weights)}")
        unknown = sorted(set(self.options) - set(self.names))
        if unknown:
            raise ValueError(f"options: names {unknown} are not in reward.names {self.names}")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function: must be 'module:function' or 'file.py:function'; got {self.function!r}")
        if self.function is not None:
            target = self.function.rsplit(":", 1)[0]
            if target.endswith(".py") and not Path(target).expanduser().is_file():
                raise ValueError(f"function: the file {target!r} does not exist")


@dataclass
class GRPOSection:
    """The GRPO objective (TRL 1.16's loss family, on fusedrl's fused linear loss)."""

    loss_type: Literal[LOSS_TYPES] = field(  # fusedrl.kernels.grpo_loss's loss types
        "dapo", "loss normalisation: grpo (mean of sequence means), bnpo, dr_grpo, dapo (TRL's default), cispo, "
        "sapo, luspo")
    beta: float = field(0.0, "KL coefficient (TRL's default 0: no reference forward pass); the reference is the "
                        "model with the LoRA adapter disabled, or a frozen copy for full fine-tuning", check=ge(0))
    eps_low: float = field(0.2, "lower clip range: ratios below 1 - eps_low are clipped", check=ge(0))
    eps_high: float | None = field(None, "upper clip range (none: = eps_low; DAPO uses 0.28); the ratio cap for "
                                   "cispo", check=ge(0))
    delta: float | None = field(None, "two-sided clipping: ratios are also capped at delta (> 1 + eps_high)",
                                check=gt(1))
    importance_level: Literal["token", "sequence"] = field("token", "importance ratio per token, or per sequence "
                                                           "(GSPO)")
    kl_estimator: Literal["k3", "k2", "k1"] = field("k3", "KL estimator (k3: TRL's)")
    use_bias_correction_kl: bool = field(True, "multiply the KL term by the importance ratio (TRL's default)")
    sapo_tau: tuple[float, float] = field((1.0, 1.05), "SAPO temperatures (positive, negative advantage)",
                                          check=Check(lambda t: all(x > 0 for x in t), "must be > 0"))
    scale_rewards: Literal["group", "batch", "none"] = field("group", "advantage scale: each group's reward std, "
                                                             "the batch's, or none (Dr. GRPO)")
    adv_clip: float | None = field(None, "clamp advantages to [-x, x] (none: no clamp)", check=gt(0))
    num_iterations: int = field(1, "passes over each step's completions (TRL's num_iterations; later passes are "
                                "off-policy, the clip acts)", check=gt(0))
    mini_batches: int = field(1, "optimizer updates per pass: the step's completions are split into this many "
                              "mini-batches", check=gt(0))
    mask_truncated_completions: bool = field(False, "completions that hit max_completion_length without ending "
                                             "get no loss (DAPO)")
    max_consecutive_skips: int = field(10, "stop when this many steps in a row were skipped (NaN/inf rewards, "
                                       "log-probs, loss or gradients)", check=gt(0))


@dataclass
class OptimSection:
    """AdamW and gradient clipping."""

    lr: float | None = field(None, f"learning rate (AdamW); none: {EMBEDDED_LR:g} for the embedded default, "
                             f"{LORA_LR:g} with LoRA, {FULL_LR:g} for full fine-tuning", check=gt(0))
    betas: tuple[float, float] = field((0.9, 0.99), "AdamW betas",
                                       check=Check(lambda b: all(0 <= x < 1 for x in b), "must be in [0, 1)"))
    weight_decay: float = field(0.0, "AdamW weight decay", check=ge(0))
    eps: float = field(1e-8, "AdamW epsilon", check=gt(0))
    max_grad_norm: float | None = field(1.0, "clip the gradient norm to this (none: no clipping)", check=gt(0))


@dataclass
class MemorySection(CheckpointingSection):
    """Memory-saving options."""

    token_budget: int | None = field(
        None, "micro-batching: most tokens (rows x padded length) per forward/backward; gradients of a mini-batch "
        "are accumulated over its micro-batches, the loss is the mini-batch's exactly; none: one micro-batch",
        check=gt(0))


@dataclass
class LLMRunConfig(RunConfig):
    """The `run` section, with defaults sized for the embedded default (a few CPU minutes)."""

    steps: int = field(400, "optimisation steps in total (each samples prompts.per_step x sampling.group_size "
                       "completions)", check=gt(0), resume_ok=True)
    checkpoint_every: int = field(100, "save a checkpoint (with lora/) every N steps and after the last; 0: only "
                                  "after the last", check=ge(0), resume_ok=True)
    samples_every: int = field(100, "write a few prompts and completions to train.log every N steps; 0: never",
                               check=ge(0), resume_ok=True)
    eval_every: int = field(100, "evaluate before the first step and every N steps: one completion per evaluation "
                            "prompt (prompts.eval; sampling.temperature, seed sampling.eval_seed) scored by the "
                            "rewards, as eval/* metrics and samples/step-*.jsonl (prompt, completion, answer, "
                            "rewards); 0: never", check=ge(0), resume_ok=True)


@dataclass
class LLMGRPOConfig:
    """`fusedrl train llm-grpo`."""

    model: ModelSection = section(ModelSection, "the causal LM")
    lora: LoraSection = section(LoraSection, "LoRA adapters or full fine-tuning")
    prompts: PromptsSection = section(PromptsSection, "training prompts")
    sampling: SamplingSection = section(SamplingSection, "generation")
    reward: RewardSection = section(RewardSection, "the reward")
    grpo: GRPOSection = section(GRPOSection, "the GRPO objective")
    optim: OptimSection = section(OptimSection, "optimizer")
    memory: MemorySection = section(MemorySection, "memory savers")
    run: LLMRunConfig = section(LLMRunConfig, "run length, seed, logging and checkpoint cadence")

    def __post_init__(self) -> None:
        # "none: automatic" fields get their values here, so that config.yaml shows what the run used.
        embedded = self.model.name_or_path is None
        if self.lora.enabled is None:
            self.lora.enabled = not embedded
        if self.sampling.max_completion_length is None:
            self.sampling.max_completion_length = EMBEDDED_COMPLETION if embedded else DEFAULT_COMPLETION
        if self.optim.lr is None:
            self.optim.lr = EMBEDDED_LR if embedded else LORA_LR if self.lora.enabled else FULL_LR
        if not self.lora.enabled and self.model.dtype in ("bf16", "fp16"):
            raise ValueError(f"model.dtype: full fine-tuning (lora.enabled false) updates the weights themselves, and "
                             f"in {self.model.dtype} AdamW's steps round away (at lr 1e-6 about 2% of bf16 weights "
                             "moved in 10 steps; fp16's Adam state underflows to NaN): use fp32 (or auto), or LoRA")
        if self.prompts.train is not None and not self.reward.names and self.reward.function is None:
            raise ValueError("reward.names / reward.function: give a reward for your prompts (the embedded task's "
                             "reward only fits the embedded prompts)")
        g = self.grpo
        eps_high = g.eps_high if g.eps_high is not None else g.eps_low
        if g.delta is not None and g.delta <= 1 + eps_high:
            raise ValueError(f"grpo.delta: must be > 1 + eps_high = {1 + eps_high:g}; got {g.delta:g}")
        rows = self.prompts.per_step * self.sampling.group_size
        if g.mini_batches > rows:
            raise ValueError(f"grpo.mini_batches: {g.mini_batches} is more than the {rows} completions of a step "
                             "(prompts.per_step x sampling.group_size)")
