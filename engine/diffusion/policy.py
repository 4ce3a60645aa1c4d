"""`DiffusionPolicy`: a diffusers pipeline seen as an RL policy (denoiser + scheduler + text encoders + VAE).

    policy = load_policy("stabilityai/stable-diffusion-3.5-medium", device="cuda", dtype=torch.bfloat16,
                         lora=LoraOptions(rank=32, alpha=64))
    emb = policy.encode_prompts(["a cat", "a dog"])               # PromptEmbeddings [2, ...], cached per prompt
    v = policy.predict(latents, t, emb, guidance_scale=4.5)      # [2, C, h, w] fp32, CFG in one batched call
    images = policy.decode(latents)                              # [2, 3, H, W] fp32 in [0, 1]
    with policy.reference():                                     # adapter off (LoRA) or the frozen copy (full)
        v_ref = policy.predict(latents, t, emb, guidance_scale=4.5)
    policy.save_lora("out/lora")                                 # pipe.load_lora_weights("out/lora") loads it

Families (`policy.family`), picked from the pipeline class:
- "sd":   StableDiffusionPipeline (UNet2DConditionModel); the scheduler is replaced by a DDIMScheduler
          built from its config (DDPO); `predict` returns the UNet's output (epsilon / v / sample, as
          `scheduler.config.prediction_type` says).
- "sd3":  StableDiffusion3Pipeline (SD3Transformer2DModel + FlowMatchEulerDiscreteScheduler); `predict`
          returns the velocity.
- "flux": FluxPipeline (FluxTransformer2DModel + FlowMatchEulerDiscreteScheduler); latents are kept
          unpacked as [B, C, h, w] everywhere and packed into 2x2 patches only inside `predict`
          (a permutation: the mean log-prob over latent elements is the same either way).

Dtypes: frozen weights in `dtype` (default: bf16 on CUDA, fp32 on the CPU); trainable parameters in
fp32 (LoRA A/B, or the whole denoiser under full fine-tuning); the denoiser's inputs are cast to
`policy.compute_dtype`; `predict` returns fp32 and does the CFG combination in fp32, because the SDE /
DDIM step kernels do all their math in fp32.

Nothing here runs at `import fusedrl.engine`: diffusers, transformers and peft are imported in functions.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DiffusionPolicy", "LoraOptions", "PromptEmbeddings", "Schedule", "block_names", "load_policy"]

PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
# Defaults by family, overridden by a `fusedrl_policy.json` next to `model_index.json` (the tiny models).
_FAMILY_DEFAULTS = {
    "sd": {"guidance_scale": 7.5, "max_sequence_length": None},
    "sd3": {"guidance_scale": 4.5, "max_sequence_length": 256},
    "flux": {"guidance_scale": 3.5, "max_sequence_length": 512},
}
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


# ----------------------------------------------------------------------------- small value types


@dataclass
class LoraOptions:
    """LoRA through peft. `alpha` None means alpha = rank (scale 1).

    target_modules: module names (peft matching) in the denoiser; default its attention projections.
    text_encoder: also put LoRA on the CLIP text encoder(s) (TexForce); prompt embeddings are then not
        cached, and text encoders stay on the accelerator.
    denoiser: LoRA on the denoiser (default). False, with text_encoder=True: the text encoder(s) alone are
        trained, TexForce's own recipe; the frozen denoiser still passes the gradient to the embeddings.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS
    text_encoder: bool = False
    denoiser: bool = True
    text_encoder_target_modules: Sequence[str] = DEFAULT_TEXT_LORA_TARGETS
    init: str | bool = "gaussian"  # peft's init_lora_weights: B = 0, so the adapter starts as the identity

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraOptions.rank must be an int >= 1, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"LoraOptions.alpha must be > 0 or None, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraOptions.dropout must lie in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"LoraOptions.target_modules must be a non-empty list of names, "
                             f"got {self.target_modules!r}")
        if not (self.denoiser or self.text_encoder):
            raise ValueError("LoraOptions: denoiser=False leaves LoRA on nothing; set text_encoder=True to train the "
                             "text encoder(s) alone")

    def peft_config(self, targets: Sequence[str]):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
                          lora_dropout=self.dropout, init_lora_weights=self.init, target_modules=list(targets))


@dataclass
class PromptEmbeddings:
    """Text conditioning for a batch of B prompts.

    embeds: [B, L, D] the sequence embeddings (SD: CLIP hidden states; SD3: CLIP-L/G + T5 joint; Flux: T5).
    pooled: [B, P] pooled embeddings (SD3, Flux) or None (SD).
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: torch.Tensor | Sequence[int] | slice) -> PromptEmbeddings:
        """Rows `idx` (a slice, a list or a [k] int64 tensor)."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx, dtype=torch.long, device=self.embeds.device)
        return PromptEmbeddings(self.embeds[idx], None if self.pooled is None else self.pooled[idx])

    def to(self, *args, **kwargs) -> PromptEmbeddings:
        pooled = None if self.pooled is None else self.pooled.to(*args, **kwargs)
        return PromptEmbeddings(self.embeds.to(*args, **kwargs), pooled)

    def detach(self) -> PromptEmbeddings:
        return PromptEmbeddings(self.embeds.detach(), None if self.pooled is None else self.pooled.detach())

    @staticmethod
    def cat(parts: Sequence[PromptEmbeddings]) -> PromptEmbeddings:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return PromptEmbeddings(torch.cat([p.embeds for p in parts]), pooled)


@dataclass
class Schedule:
    """The sampling schedule of one `sample` call, S steps, on the CPU.

    timesteps: [S] the denoiser's timestep input at each step (flow: sigma * 1000, fp32; DDIM: int64
        training timesteps).
    sigmas: [S + 1] fp32, flow families: step i goes from sigmas[i] to sigmas[i + 1] (the last is 0).
    alphas_cumprod, alphas_cumprod_prev: [S] fp32, DDIM: step i goes from alphas_cumprod[i] (at timesteps[i]) to
        alphas_cumprod_prev[i], at prev_t = max(timesteps[i] - T // S, 0) (DDIMScheduler.step and DDPO; the next
        timestep of the list only for "leading" spacing).
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None
    alphas_cumprod: torch.Tensor | None = None
    alphas_cumprod_prev: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.timesteps.shape[0]


# ----------------------------------------------------------------------------- helpers


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                 "fp32": torch.float32, "float32": torch.float32}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)} or a torch.dtype, got {dtype!r}")
        return names[dtype]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}")
    return dtype


def _read_policy_defaults(model: str | os.PathLike) -> dict:
    from .tiny import POLICY_DEFAULTS_FILE

    path = Path(model) / POLICY_DEFAULTS_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return {}


def _place(module: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Move `module` to `device`; cast to `dtype` only when its dtype differs (a model loaded with
    from_pretrained(dtype=...) is already right, and keeps its keep-in-fp32 modules; diffusers warns on
    every cast with `to()`). The meta device: cast only (a denoiser waiting for rank 0's weights)."""
    if dtype is not None and getattr(module, "dtype", dtype) != dtype:
        module.to(dtype=dtype)
    if torch.device(device).type != "meta":
        module.to(device)


def _denoiser_without_weights(model: str, subfolder: str, class_name: str, dtype: torch.dtype,
                              hub: dict[str, Any]) -> nn.Module:
    """The pipeline's denoiser (`subfolder`, a diffusers `class_name`) built from its config with the parameters on
    the meta device, in `dtype` as `from_pretrained(dtype=...)` loads it (keep-in-fp32 modules in fp32): what a
    process that takes its weights from rank 0 holds until then."""
    import diffusers

    from ..distributed import parameters_on_meta

    cls = getattr(diffusers, class_name)
    config = cls.load_config(model, subfolder=subfolder, **hub)
    with parameters_on_meta():
        denoiser = cls.from_config(config)
    denoiser.to(dtype=dtype)
    keep = getattr(denoiser, "_keep_in_fp32_modules", None) or []
    for name, module in denoiser.named_modules():
        if any(k in name.split(".") for k in keep):
            module.to(dtype=torch.float32)
    return denoiser.eval()


def _inject_lora(module: nn.Module, config) -> None:
    """Add a LoRA adapter named "default" to a transformers text encoder with peft directly, as diffusers'
    `add_adapter` does for its models (transformers' own `add_adapter` demands a newer peft than diffusers)."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, module, adapter_name="default")
    module.peft_config = {"default": config}


def _trainable(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


# ----------------------------------------------------------------------------- the policy


def rebuilt_from_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new plain `type(model)` built from `model.config` holding `state` (its whole tensors, wrapper-free names),
    with no random initialisation of weights about to be overwritten (built on the meta device, then the state
    assigned); buffers a state dict leaves out (persistent=False) are copied from `model`, where they are whole."""
    from ..checkpointing import unwrapped_name

    with torch.device("meta"):
        plain = type(model).from_config(model.config)
    plain.load_state_dict(state, assign=True)
    ours = {unwrapped_name(n): b for n, b in model.named_buffers()}
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, ours[name].detach().cpu(), persistent=False)
    return plain


class DiffusionPolicy:
    """A diffusers pipeline as a policy. Build with `load_policy` (or `DiffusionPolicy(pipe, ...)`).

    Attributes:
        family: "sd" (UNet + DDIM), "sd3" or "flux" (flow transformers + flow-matching Euler).
        pipe: the diffusers pipeline (its components are the ones used here).
        denoiser: the UNet / transformer being trained (LoRA injected in place by peft).
        scheduler: the pipeline's scheduler (a DDIMScheduler for "sd").
        device: where the denoiser runs; dtype: frozen weights' dtype; compute_dtype: denoiser inputs.
        lora: the LoraOptions in use, or None (full fine-tuning).
        defaults: family defaults (height, width, guidance_scale, max_sequence_length).
        is_flow: True for the flow-matching families.
        vae_scale_factor: pixels per latent pixel; latent_channels: C of the latents [B, C, h, w].
    """

    def __init__(
        self,
        pipe: Any,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        vae_dtype: torch.dtype | str | None = None,
        lora: LoraOptions | None = None,
        reference_copy: bool = False,
        offload_text_encoders: bool = True,
        offload_vae: bool = False,
        defaults: dict | None = None,
        patch_attention: bool = False,
        fused_backbone: bool = False,
        prompt_cache_gb: float = 4.0,
        sharded: bool = False,
        weights_from_rank0: bool = False,
    ) -> None:
        from .prompt_cache import PromptCache

        cls_name = type(pipe).__name__
        if cls_name not in PIPELINE_FAMILIES:
            raise TypeError(f"pipe must be one of {sorted(PIPELINE_FAMILIES)} (diffusers), got {cls_name}")
        if lora is not None and not isinstance(lora, LoraOptions):
            raise TypeError(f"lora must be a LoraOptions or None, got {type(lora).__name__}")
        if reference_copy and lora is not None:
            raise ValueError("reference_copy=True is for full fine-tuning (lora=None); with LoRA the reference "
                             "policy is the base model with the adapter disabled")
        if sharded and lora is not None:
            raise ValueError("sharded=True is for full fine-tuning (lora=None), which parallelize('fsdp') shards")
        if weights_from_rank0 and not sharded:
            raise ValueError("weights_from_rank0=True is for a denoiser that parallelize('fsdp') shards (sharded=True)")
        # FSDP2 gives every process its shards of rank 0's weights; True on every process when the others built the
        # denoiser with its parameters on the meta device (load_policy(sharded=True) under torchrun)
        self.weights_from_rank0 = weights_from_rank0
        self.family: str = PIPELINE_FAMILIES[cls_name]
        self.pipe = pipe
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = _parse_dtype(dtype, self.device)
        self.vae_dtype = _parse_dtype(vae_dtype, self.device) if vae_dtype is not None else self.dtype
        self.lora = lora
        self.is_flow = self.family in ("sd3", "flux")
        self.defaults = {**_FAMILY_DEFAULTS[self.family], **(defaults or {})}
        self._offload = self.device.type != "cpu"
        # sharded, when the trained fp32 denoiser and its reference copy would take more than half the GPU (a 12B
        # denoiser and its bf16 reference: 72 GB): they wait on the CPU for parallelize("fsdp"), which moves each
        # block's shard to the device, so no GPU ever holds the whole model (the host holds one per process)
        self._denoiser_device = self.device
        if sharded:
            from ..distributed import too_big_for_one_gpu, weights_on_this_process

            denoiser = pipe.unet if self.family == "sd" else pipe.transformer
            per_weight = 4 + (self.dtype.itemsize if reference_copy else 0)  # fp32 trained + the reference's
            nbytes = sum(p.numel() for p in denoiser.parameters()) * per_weight
            if not weights_on_this_process(denoiser):  # rank 0's weights come at parallelize("fsdp")
                self._denoiser_device = torch.device("meta")
            elif too_big_for_one_gpu(nbytes, self.device):
                self._denoiser_device = torch.device("cpu")
        self.offload_vae = offload_vae and self._offload
        self._cache = PromptCache(prompt_cache_gb)
        self._reference_model: nn.Module | None = None
        self._reference_master: list[torch.Tensor] | None = None  # the EMA reference in fp32 (update_reference_ema)
        self._use_reference = False
        self._ddp: nn.Module | None = None  # DistributedDataParallel(denoiser) after parallelize("ddp")
        self.strategy: str | None = None  # "ddp" / "fsdp" after parallelize

        if self.family == "sd":
            from diffusers import DDIMScheduler

            if not isinstance(pipe.scheduler, DDIMScheduler):
                pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            if pipe.scheduler.config.get("thresholding", False):
                raise ValueError("the pipeline's scheduler config has thresholding=True (dynamic thresholding clamps "
                                 "x0 by a per-sample quantile, for pixel-space models), which fusedrl's DDIM step "
                                 "does not compute: set it to false in scheduler/scheduler_config.json "
                                 "(clip_sample is supported)")
        self.scheduler = pipe.scheduler
        self.denoiser: nn.Module = pipe.unet if self.family == "sd" else pipe.transformer
        self.vae: nn.Module = pipe.vae
        self.text_encoders: list[nn.Module] = [
            m for m in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
            if m is not None]
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.denoiser.config.in_channels // (4 if self.family == "flux" else 1)
        if "height" not in self.defaults:
            # The pipelines' defaults: Flux 1024 px; SD / SD3 the denoiser's sample_size in latent pixels.
            size = 1024 if self.family == "flux" else self.denoiser.config.sample_size * self.vae_scale_factor
            self.defaults["height"] = self.defaults["width"] = size

        # Freeze everything, cast, then make the trainable part trainable (in fp32).
        for m in [self.denoiser, self.vae, *self.text_encoders]:
            m.requires_grad_(False)
            m.eval()
        _place(self.denoiser, self._denoiser_device, self.dtype)
        _place(self.vae, "cpu" if self.offload_vae else self.device, self.vae_dtype)
        self.lora_text_encoders: list[nn.Module] = []
        if lora is not None:
            if lora.denoiser:
                self.denoiser.add_adapter(lora.peft_config(lora.target_modules))
            if lora.text_encoder:
                # CLIP encoders only: diffusers' LoRA loaders take text_encoder(_2), never T5.
                names = ["text_encoder"] + (["text_encoder_2"] if self.family == "sd3" else [])
                for name in names:
                    te = getattr(pipe, name)
                    try:
                        _inject_lora(te, lora.peft_config(lora.text_encoder_target_modules))
                    except ValueError as exc:  # peft's NoMatchingPeftModuleError: say whose targets they were
                        exc.text_encoder = True
                        raise
                    self.lora_text_encoders.append(te)
            self.compute_dtype = self.dtype
        else:
            if reference_copy:
                self._reference_model = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
            _place(self.denoiser, self._denoiser_device, torch.float32)
            self.denoiser.requires_grad_(True)
            self.compute_dtype = torch.float32
        for p in self.trainable_parameters():
            p.data = p.data.float()
        self.text_encoder_trainable = any(_trainable(te) for te in self.text_encoders)
        offload_te = self._offload and offload_text_encoders and not self.text_encoder_trainable
        te_device = torch.device("cpu") if offload_te else self.device
        self._text_on_device = te_device == self.device
        for te in self.text_encoders:
            _place(te, te_device, self.dtype)
            for p in te.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if patch_attention:
            from fusedrl.attention import patch_attention as _patch

            _patch(self.denoiser)
        self.backbone_patch = None  # what fusedrl.patch_backbone fused in the denoiser (its summary() for a log)
        if fused_backbone:  # the reference too: same numbers, same speed and memory
            from ..distributed import patch_backbones

            self.backbone_patch = patch_backbones(self._denoisers(), weights_from_rank0=weights_from_rank0)[0]

    # ------------------------------------------------------------------ parameters and modes

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer should update (fp32): LoRA A/B, or the whole denoiser."""
        mods = [self.denoiser, *self.text_encoders]
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> DiffusionPolicy:
        """Set the trainable modules' train/eval mode (dropout in LoRA); frozen modules stay in eval."""
        for m in self._adapted_modules() if self.has_lora else [self.denoiser]:
            m.train(mode)
        return self

    def _adapted_modules(self) -> list[nn.Module]:
        """The modules that carry LoRA: the denoiser (unless lora.denoiser is False) and the LoRA text encoders."""
        return ([self.denoiser] if self.lora.denoiser else []) + self.lora_text_encoders

    @property
    def has_lora(self) -> bool:
        return self.lora is not None

    def trained_part(self) -> str:
        """What training changes, in words for a log: "full fine-tuning", "LoRA on the denoiser", ..."""
        if not self.has_lora:
            return "full fine-tuning"
        where = (["the denoiser"] if self.lora.denoiser else []) + (["the text encoder(s)"] if
                                                                    self.lora_text_encoders else [])
        return "LoRA on " + " and ".join(where)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside: the LoRA adapters (denoiser and text encoders) are off, so `predict` gives the base
        model's output: the reference policy for the KL term, with no second model in memory."""
        if not self.has_lora:
            raise RuntimeError("disable_adapter(): this policy has no LoRA adapter (full fine-tuning); "
                               "use reference() with a policy loaded with reference_copy=True")
        from diffusers.utils.peft_utils import set_adapter_layers

        mods = self._adapted_modules()
        for m in mods:
            set_adapter_layers(m, enabled=False)
        try:
            yield
        finally:
            for m in mods:
                set_adapter_layers(m, enabled=True)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside: `predict` runs the reference policy: the adapter-off base model (LoRA), or the frozen copy
        taken at load time (full fine-tuning with reference_copy=True; see `update_reference_ema`)."""
        if self.has_lora:
            with self.disable_adapter():
                yield
            return
        if self._reference_model is None:
            raise RuntimeError("reference(): no reference policy; load with reference_copy=True for full "
                               "fine-tuning, or use LoRA (the adapter-off model is the reference)")
        previous = self._use_reference
        self._use_reference = True
        try:
            yield
        finally:
            self._use_reference = previous

    @torch.no_grad()
    def update_reference_ema(self, decay: float) -> None:
        """Full fine-tuning: reference <- decay * reference + (1 - decay) * denoiser (an EMA reference)."""
        if self._reference_model is None:
            raise RuntimeError("update_reference_ema(): no reference copy (load with reference_copy=True)")
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        refs = list(self._reference_model.parameters())
        if self._reference_master is None:
            # A bf16 reference would round most of each small EMA step away (decay 0.99: ~2% of its elements moved):
            # the average runs in an fp32 copy, and the reference takes it in its own dtype.
            self._reference_master = [r.detach().float() if r.dtype != torch.float32 else r for r in refs]
        for m, r, p in zip(self._reference_master, refs, self.denoiser.parameters(), strict=True):
            m.lerp_(p.detach().float(), 1 - decay)
            if m is not r:
                r.copy_(m)

    def reference_state(self) -> list[torch.Tensor]:
        """The EMA reference's tensors (fp32), in parameter order, for a checkpoint; [] when no EMA step ran."""
        return list(self._reference_master or [])

    @torch.no_grad()
    def load_reference_state(self, tensors: list[torch.Tensor]) -> None:
        """Restore what `reference_state` returned (each process takes its shards under FSDP2)."""
        from ..distributed import shard_like

        refs = list(self._reference_model.parameters())
        if len(tensors) != len(refs):
            raise ValueError(f"the checkpoint's reference has {len(tensors)} tensors, the model {len(refs)}")
        self._reference_master = [shard_like(t, r.detach().float()) if r.dtype != torch.float32 else r
                                  for t, r in zip(tensors, refs)]
        for m, r, t in zip(self._reference_master, refs, tensors):
            r.copy_(m if m is not r else shard_like(t, r))

    # ------------------------------------------------------------------ several processes

    def parallelize(self, strategy: str) -> None:
        """Spread training over the processes of the default process group (call after activation
        checkpointing is applied, before the optimizer is built):

        - "ddp" (LoRA): DistributedDataParallel over the denoiser; every forward that back-propagates goes
          through it (one forward per backward, as the GRPO trainer does), so gradients are averaged during
          backward. Trainable text-encoder LoRA weights lie outside it: `unsynced_parameters()` lists them
          for the trainer to average (`engine.distributed.average_gradients`). With no LoRA on the denoiser
          (text encoders alone) nothing is wrapped, and the trainer averages all there is that way.
        - "fsdp" (full fine-tuning): FSDP2 `fully_shard` of every block (`block_names`) and of the denoiser,
          and of the frozen reference copy the same way; parameters become DTensor shards.
        """
        if strategy == "ddp":
            if not self.has_lora:
                raise ValueError("parallelize('ddp') is for LoRA; full fine-tuning uses 'fsdp'")
            from ..distributed import ddp_wrap

            if self.lora.denoiser:  # else nothing in the denoiser trains: DDP refuses such a module
                self._ddp = ddp_wrap(self.denoiser, self.device)  # no broadcast of SD3's 226 MB positional table
        elif strategy == "fsdp":
            if self.has_lora:
                raise ValueError("parallelize('fsdp') is for full fine-tuning; LoRA uses 'ddp'")
            from torch.distributed.fsdp import fully_shard

            from ..distributed import shard_from_rank0

            def shard(module: nn.Module) -> None:
                for name in block_names(module):
                    fully_shard(module.get_submodule(name))
                fully_shard(module)

            # every process gets its shards of rank 0's weights, one whole tensor on the GPU at a time
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                for module in self._denoisers():
                    shard_from_rank0(module, shard, self.device)
            self._denoiser_device = self.device
        else:
            raise ValueError(f"strategy must be 'ddp' or 'fsdp'; got {strategy!r}")
        self.strategy = strategy

    def _denoisers(self) -> list[nn.Module]:
        """The denoiser and, for full fine-tuning with a KL, its frozen reference copy (sharded alike)."""
        return [self.denoiser] + ([self._reference_model] if self._reference_model is not None else [])

    def no_sync(self) -> Any:
        """A context (around forward and backward) in which gradients accumulate on each process without being
        averaged: all but the last backward of an update. Under DDP only: FSDP2 reduce-scatters at every backward,
        since accumulating unsynchronised would hold every parameter's whole gradient on each GPU (48 GB for a
        12B-parameter fp32 denoiser), which sharding is there to avoid."""
        if self._ddp is not None:
            return self._ddp.no_sync()
        return contextlib.nullcontext()

    def reshard(self) -> None:
        """FSDP2: free the gathered root parameters that a forward without backward (sampling, evaluation, the
        reference) leaves behind; until then `named_parameters()` lists the gathered tensors, not the shards
        the optimizer holds. Nothing without FSDP2."""
        if self.strategy == "fsdp":
            for module in self._denoisers():
                module.reshard()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict, whole (under FSDP2 gathered by name: a collective)."""
        from ..distributed import optimizer_state

        return optimizer_state(optimizer, self.denoiser if self.strategy == "fsdp" else None)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Restore what `optimizer_state` returned (under FSDP2 each process takes its shards)."""
        from ..distributed import load_optimizer_state

        load_optimizer_state(optimizer, state, self.denoiser if self.strategy == "fsdp" else None)

    def plain_denoiser(self) -> nn.Module | None:
        """The denoiser without activation-checkpointing wrappers or FSDP2 shards, for `save_pretrained`: itself
        when it is plain, else a copy. Under FSDP2 a collective (every process calls it) whose copy only rank 0
        gets (others: None)."""
        from ..checkpointing import iter_wrappers, remove_checkpointing, unwrapped_name
        from ..distributed import rank_and_world, whole_on_rank0

        den = self.denoiser
        if self.strategy == "fsdp":
            state = whole_on_rank0((unwrapped_name(n), t) for n, t in den.state_dict().items())
            if rank_and_world()[0] != 0:
                return None
            return rebuilt_from_state(den, state)
        if any(True for _ in iter_wrappers(den)):
            plain = copy.deepcopy(den)
            remove_checkpointing(plain)
            return plain
        return den

    def unsynced_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters whose gradients no wrapper averages (text-encoder LoRA under DDP)."""
        if self.strategy != "ddp":
            return []
        return [p for te in self.text_encoders for p in te.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ text

    @contextlib.contextmanager
    def _modules_on_device(self, modules: Sequence[nn.Module], keep: bool) -> Iterator[None]:
        """Move `modules` to the accelerator for the block, then back to the CPU unless `keep`."""
        if keep or not self._offload:
            yield
            return
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to("cpu")

    def _text_encoders_on_device(self):
        return self._modules_on_device(self.text_encoders, keep=self._text_on_device)

    def _encode(self, prompts: list[str]) -> PromptEmbeddings:
        """The pipeline's encode_prompt; the text encoders must be on the device (_text_encoders_on_device)."""
        pipe, device = self.pipe, self.device
        msl = self.defaults.get("max_sequence_length")
        if self.family == "sd":
            embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
            return PromptEmbeddings(embeds)
        if self.family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=msl)
            return PromptEmbeddings(embeds, pooled)
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                               num_images_per_prompt=1, max_sequence_length=msl)
        return PromptEmbeddings(embeds, pooled)

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """Text embeddings of `prompts` (B strings) -> PromptEmbeddings [B, ...] on `device`.

        With frozen text encoders each distinct prompt is encoded (under no_grad) alone, and cached on the CPU up
        to prompt_cache_gb (least recently used evicted): a batched call's numerics depend on the batch, so a
        prompt's embedding would depend on the prompts it was first encoded with, and a resumed run (its cache
        starts empty) would drift from an uninterrupted one.
        The text encoders are on the accelerator only while encoding (offload_text_encoders). With trainable
        text encoders (LoRA on them) every call encodes, with grad when grad is enabled.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty")
        if self.text_encoder_trainable:
            with self._text_encoders_on_device():
                return self._encode(prompts)
        found = {p: self._cache.get(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, emb in found.items() if emb is None]
        if missing:
            with torch.no_grad(), self._text_encoders_on_device():
                for p in missing:
                    found[p] = self._encode([p]).to("cpu")
                    self._cache.put(p, found[p])
        return PromptEmbeddings.cat([found[p] for p in prompts]).to(self.device)

    def clear_prompt_cache(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------------ schedule

    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """-> (h, w) of the latents for an image of height x width px; ValueError when not a multiple of the
        latent grid (vae_scale_factor, times the patch size for transformers)."""
        mult = self.vae_scale_factor * (2 if self.family == "flux" else getattr(self.denoiser.config, "patch_size", 1))
        if self.family == "sd":
            mult = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % mult:
                raise ValueError(f"{name} must be a positive multiple of {mult} for this model, got {v!r}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def schedule(self, num_steps: int, height: int | None = None, width: int | None = None) -> Schedule:
        """Set the scheduler for `num_steps` steps and return the Schedule (CPU tensors).

        Flow families follow their pipelines: SD3 `set_timesteps(num_steps)` (with `mu` when the scheduler
        uses dynamic shifting); Flux sigmas = linspace(1, 1 / num_steps) with `mu` from the image size.
        DDIM follows DDPO: prev_t = max(t - T // num_steps, 0).
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        height = height or self.defaults["height"]
        width = width or self.defaults["width"]
        h, w = self.check_size(height, width)
        sch = self.scheduler
        if self.family == "sd":
            sch.set_timesteps(num_steps, device="cpu")
            t = sch.timesteps.long()
            T = sch.config.num_train_timesteps
            # every step goes to t - T // num_steps (DDIMScheduler.step and DDPO), not to the next timestep of the
            # list: the two agree for "leading" spacing only ("trailing" and "linspace" steps are not T // S apart)
            prev = (t - T // num_steps).clamp(0, T - 1)
            ac = sch.alphas_cumprod.float()
            return Schedule(t, alphas_cumprod=ac[t], alphas_cumprod_prev=ac[prev])
        import numpy as np

        kwargs: dict[str, Any] = {}
        cfg = sch.config
        if self.family == "flux" or cfg.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            patch = 2 if self.family == "flux" else self.denoiser.config.patch_size
            seq = (h // patch) * (w // patch)
            kwargs["mu"] = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        if self.family == "flux" and not cfg.get("use_flow_sigmas", False):
            sch.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", **kwargs)
        else:
            sch.set_timesteps(num_steps, device="cpu", **kwargs)
        return Schedule(sch.timesteps.float().clone(), sigmas=sch.sigmas.float().clone())

    # ------------------------------------------------------------------ denoiser

    def negative_embeddings(self, batch: int) -> PromptEmbeddings:
        """The unconditional embeddings of CFG (the empty prompt, as the pipelines use), [batch, ...]."""
        neg = self.encode_prompts([""])
        return PromptEmbeddings(neg.embeds.expand(batch, *neg.embeds.shape[1:]),
                                None if neg.pooled is None else neg.pooled.expand(batch, *neg.pooled.shape[1:]))

    def uses_cfg(self, guidance_scale: float) -> bool:
        """True when `predict` runs classifier-free guidance (guidance_scale > 1; never for a Flux model with
        a guidance embedding, which takes guidance_scale as an input instead)."""
        if self.family == "flux" and self.denoiser.config.guidance_embeds:
            return False
        return guidance_scale > 1.0

    def _forward(self, x: torch.Tensor, t: torch.Tensor, emb: PromptEmbeddings, guidance_scale: float) -> torch.Tensor:
        model = self._reference_model if self._use_reference else self.denoiser
        if model is self.denoiser and self._ddp is not None and torch.is_grad_enabled():
            model = self._ddp  # forwards that back-propagate go through DDP (its gradient hooks)
        if self.family == "sd":
            return model(x, t, encoder_hidden_states=emb.embeds, return_dict=False)[0]
        if self.family == "sd3":
            return model(hidden_states=x, timestep=t, encoder_hidden_states=emb.embeds,
                         pooled_projections=emb.pooled, return_dict=False)[0]
        B, C, h, w = x.shape
        packed = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)
        img_ids = self.pipe._prepare_latent_image_ids(B, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(emb.embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((B,), float(guidance_scale), device=x.device, dtype=torch.float32)
        out = model(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=emb.pooled,
                    encoder_hidden_states=emb.embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return out.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)

    def predict(
        self,
        latents: torch.Tensor,
        t: float | int | torch.Tensor,
        embeddings: PromptEmbeddings,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The denoiser's output at latents x_t, with classifier-free guidance.

        Args:
            latents: [B, C, h, w] any float dtype (cast to compute_dtype for the model).
            t: the timestep input, one value or [B] (a value of `Schedule.timesteps`).
            embeddings: PromptEmbeddings [B, ...] (the conditional prompts).
            guidance_scale: CFG weight; > 1 runs the unconditional and conditional halves as ONE batched call
                [uncond; cond] of 2B and returns uncond + g (cond - uncond) (computed in fp32). Flux with a
                guidance embedding feeds it to the model instead (no CFG).

        Returns:
            [B, C, h, w] fp32: velocity (flow) or the UNet's prediction (DDIM family).
        """
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise ValueError(f"latents must be a [B, C, h, w] tensor, got {getattr(latents, 'shape', type(latents))}")
        if not isinstance(embeddings, PromptEmbeddings):
            raise TypeError(f"embeddings must be PromptEmbeddings (from encode_prompts), "
                            f"got {type(embeddings).__name__}")
        B = latents.shape[0]
        if len(embeddings) != B:
            raise ValueError(f"embeddings has {len(embeddings)} rows but latents has batch {B}")
        if latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents has {latents.shape[1]} channels, the model takes {self.latent_channels}")
        if self._denoiser_device != self.device:
            raise RuntimeError(f"this policy was loaded with sharded=True: its denoiser waits on the "
                               f"{self._denoiser_device.type} device for parallelize('fsdp') (under torchrun), "
                               "which has not run")
        # the frozen reference copy keeps the load dtype (bf16 on CUDA) while the trained denoiser is fp32
        dtype = self.dtype if self._use_reference and self._reference_model is not None else self.compute_dtype
        x = latents.to(device=self.device, dtype=dtype)
        t = torch.as_tensor(t, device=self.device)
        t = (t.float() if self.is_flow else t.long()).reshape(-1).expand(B)
        emb = embeddings.to(device=self.device, dtype=dtype)
        cfg = self.uses_cfg(guidance_scale)
        if cfg:
            neg = self.negative_embeddings(B).to(device=self.device, dtype=dtype)
            x, t, emb = torch.cat([x, x]), torch.cat([t, t]), PromptEmbeddings.cat([neg, emb])
        out = self._forward(x, t, emb, guidance_scale).float()
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    # ------------------------------------------------------------------ VAE

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] fp32 in [0, 1] (H = h * vae_scale_factor).

        Differentiable when grad is enabled (reward backpropagation). With offload_vae the VAE sits on the
        CPU between calls; under grad it stays on the accelerator after the call, as backward needs it there.
        """
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise ValueError(f"latents must be a [B, C, h, w] tensor, got {getattr(latents, 'shape', type(latents))}")
        cfg = self.vae.config
        keep = not self.offload_vae or torch.is_grad_enabled()
        if self.offload_vae and keep:
            self.vae.to(self.device)
        with self._modules_on_device([self.vae], keep=keep):
            z = latents.to(device=self.device, dtype=self.vae_dtype) / cfg.scaling_factor
            if getattr(cfg, "shift_factor", None) is not None and self.is_flow:
                z = z + cfg.shift_factor
            image = self.vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ saving

    def lora_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """{pipeline save_lora_weights argument name: state dict} of the LoRA layers, in diffusers' format."""
        if not self.has_lora:
            raise RuntimeError("this policy has no LoRA adapter (full fine-tuning): save policy.denoiser with "
                               "save_pretrained instead")
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        out: dict[str, Any] = {}
        if self.lora.denoiser:
            from ..checkpointing import wrappers_lifted

            key = "unet" if self.family == "sd" else "transformer"
            with wrappers_lifted(self.denoiser):  # else peft leaves out the LoRA layers of checkpointed blocks
                sd = get_peft_model_state_dict(self.denoiser)
            out[f"{key}_lora_layers"] = convert_state_dict_to_diffusers(sd) if self.family == "sd" else sd
            out[f"{key}_lora_adapter_metadata"] = self.denoiser.peft_config["default"].to_dict()
        for name, te in zip(("text_encoder", "text_encoder_2"), self.lora_text_encoders):
            out[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(te))
            out[f"{name}_lora_adapter_metadata"] = te.peft_config["default"].to_dict()
        return out

    def save_lora(self, directory: str | os.PathLike) -> Path:
        """Save the LoRA weights to `directory` (pytorch_lora_weights.safetensors) with the pipeline's own
        `save_lora_weights`, so that `pipe.load_lora_weights(directory)` loads them. Returns the directory."""
        import inspect

        save = type(self.pipe).save_lora_weights
        accepted = set(inspect.signature(save).parameters)
        kwargs = {k: v for k, v in self.lora_state_dicts().items() if k in accepted}
        save(str(directory), safe_serialization=True, **kwargs)
        return Path(directory)


# ----------------------------------------------------------------------------- blocks

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks|down_blocks|up_blocks)\.\d+$|^mid_block$")


def block_names(denoiser: nn.Module) -> list[str]:
    """The names of the denoiser's repeated blocks (transformer blocks, or the UNet's down / mid / up
    blocks): the units of activation checkpointing and of FSDP2 sharding."""
    return [name for name, _ in denoiser.named_modules() if _BLOCK.match(name)]


# ----------------------------------------------------------------------------- loading


def load_policy(
    model: str | os.PathLike | Any | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    vae_dtype: torch.dtype | str | None = None,
    lora: LoraOptions | bool = True,
    reference_copy: bool = False,
    offload_text_encoders: bool = True,
    offload_vae: bool = False,
    max_sequence_length: int | None = None,
    patch_attention: bool = False,
    fused_backbone: bool = False,
    prompt_cache_gb: float = 4.0,
    sharded: bool = False,
    **from_pretrained_kwargs: Any,
) -> DiffusionPolicy:
    """Load a diffusers pipeline as a `DiffusionPolicy`.

    Args:
        model: a local folder or hub id (loaded with `DiffusionPipeline.from_pretrained`), a pipeline object,
            or None for the embedded default (`tiny.tiny_model_dir("sd3")`, built on first use).
        device: where the denoiser runs (default: cuda if available, else cpu).
        dtype: weights' dtype ("bf16", "fp16", "fp32" or a torch.dtype; default bf16 on CUDA, fp32 on CPU).
            Trainable parameters are fp32 whatever this is.
        vae_dtype: the VAE's dtype (default: dtype).
        lora: LoraOptions, True (LoraOptions(): rank 8 on to_q/to_k/to_v/to_out.0; the default), or False / None
            for full fine-tuning of the denoiser (fp32 weights).
        reference_copy: full fine-tuning only: keep a frozen copy of the initial denoiser (in `dtype`) as the
            reference policy (`policy.reference()`); `update_reference_ema` makes it an EMA.
        offload_text_encoders: keep frozen text encoders on the CPU except while encoding (only with an
            accelerator; prompt embeddings are cached).
        offload_vae: keep the VAE on the CPU except while decoding.
        max_sequence_length: T5 tokens for SD3 / Flux (default: the pipeline's, or the model folder's
            fusedrl_policy.json).
        patch_attention: run the denoiser's attention on fusedrl's flash attention (`fusedrl.attention`).
        fused_backbone: run the denoiser's RMSNorms and LoRA linears on fused code (`fusedrl.patch_backbone`).
        prompt_cache_gb: host memory for the frozen text encoders' prompt embeddings (least recently used evicted;
            0: encode at every call).
        sharded: full fine-tuning that `parallelize("fsdp")` will shard. Under torchrun with `model` a folder or
            hub id, only rank 0 reads the denoiser's weights; the other processes build it from its config with the
            parameters on the meta device, and FSDP2 gives each its shards of rank 0's (one host copy instead of
            one per process). A denoiser (and reference copy) that would take over half the GPU waits on rank 0's
            CPU until then, so no GPU holds the whole model.
        from_pretrained_kwargs: passed to `from_pretrained` (revision, variant, token, ...).
    """
    if isinstance(lora, bool):
        lora = LoraOptions() if lora else None
    from ..distributed import rank_and_world

    defaults: dict[str, Any] = {}
    weights_from_rank0 = False  # a pipeline object given is whole on every process
    if model is None:
        from .tiny import tiny_model_dir

        model = tiny_model_dir("sd3")
    if isinstance(model, (str, os.PathLike)):
        from diffusers import DiffusionPipeline

        hub_keys = ("revision", "token", "cache_dir", "local_files_only", "variant")
        index = DiffusionPipeline.load_config(str(model), **{k: v for k, v in from_pretrained_kwargs.items()
                                                             if k in hub_keys and k != "variant"})
        cls_name = index.get("_class_name")
        if cls_name not in PIPELINE_FAMILIES:
            raise ValueError(f"model {str(model)!r} is a {cls_name}; supported: {sorted(PIPELINE_FAMILIES)}")
        # Components recorded as [null, null] (SD3 without T5) must be passed as None explicitly.
        absent = {k: None for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is None}
        extra: dict[str, Any] = {**absent}
        if cls_name == "StableDiffusionPipeline":
            extra.update(safety_checker=None, requires_safety_checker=False)
        if Path(model).is_dir():
            defaults.update(_read_policy_defaults(model))
        dev = torch.device(device) if device is not None else _default_device()
        weights_from_rank0 = sharded and rank_and_world()[1] > 1
        if weights_from_rank0 and rank_and_world()[0] != 0:
            key = "unet" if cls_name == "StableDiffusionPipeline" else "transformer"
            extra[key] = _denoiser_without_weights(
                str(model), key, index[key][1], _parse_dtype(dtype, dev),
                {k: v for k, v in from_pretrained_kwargs.items() if k in hub_keys and k != "variant"})
        pipe = DiffusionPipeline.from_pretrained(str(model), dtype=_parse_dtype(dtype, dev),
                                                 **{**extra, **from_pretrained_kwargs})
    else:
        pipe = model
        source = getattr(getattr(pipe, "config", None), "_name_or_path", None)
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            defaults.update(_read_policy_defaults(source))
    if max_sequence_length is not None:
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be an int >= 1, got {max_sequence_length!r}")
        defaults["max_sequence_length"] = max_sequence_length
    return DiffusionPolicy(pipe, device=device, dtype=dtype, vae_dtype=vae_dtype, lora=lora,
                           reference_copy=reference_copy, offload_text_encoders=offload_text_encoders,
                           offload_vae=offload_vae, defaults=defaults, patch_attention=patch_attention,
                           fused_backbone=fused_backbone, prompt_cache_gb=prompt_cache_gb,
                           sharded=sharded, weights_from_rank0=weights_from_rank0)
