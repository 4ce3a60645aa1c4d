"""TRL drop-in: `trl.GRPOTrainer` computes its per-token log-probs and entropies (and, on request, its
loss) with fusedrl's fused kernels.

    from fusedrl.integrations.trl import patch_grpo_trainer
    patch_grpo_trainer()             # log-probs and entropies through fusedrl.kernels.token_logprobs
    patch_grpo_trainer(loss=True)    # ... and the loss through fusedrl.kernels.grpo_loss
    patch_grpo_trainer(loss=True, backbone=True)   # ... and the trainer's model on fusedrl.patch_backbone
    trainer = GRPOTrainer(...)       # before or after creating the trainer, both work
    trainer.train()
    unpatch_grpo_trainer()           # or: with grpo_trainer_patched(loss=True): ...

Tested with TRL 1.16 (`trl>=1.16,<1.17`); other versions are refused, since the patch relies on
TRL's internals.

Where the patch goes. TRL 1.16 gives the policy and the reference model a "fused LM head"
(`trl.trainer.utils.add_fused_lm_head`): `model(..., labels=labels, fused_lm_head=True)` runs the
backbone, shifts the labels, picks the scored positions, reads the architecture's logit soft-capping
and logit scale from its config, gathers a ZeRO-3 or FSDP2-sharded head, and then makes one call,
`_ChunkedLogProbFunction.apply(hidden [M, H], weight [V, H], bias, labels [M], temperature, chunk,
softcap, logit_scale, outputs)`, that turns hidden states into log-probs and entropies; afterwards it
scatters them back to [B, T - 1] with zeros at ignored labels. That one call is the patch point:
`trl.trainer.utils._ChunkedLogProbFunction` is replaced by `FusedChunkedLogProb`, whose `apply` has
the same signature and results and calls `fusedrl.kernels.token_logprobs`. Everything around it stays
TRL's, so every architecture, PEFT set-up and sharding TRL supports keeps working, with TRL's label
shifting, masking and output shapes.

The replacement serves only the calls made inside `GRPOTrainer._get_per_token_logps_and_entropies`
(the one method through which GRPOTrainer computes log-probs: policy, old policy and reference
model), which the patch wraps to mark them; other TRL trainers that use the fused LM head (SFT, DPO,
KTO, RLOO) keep TRL's kernel. It also hands back to TRL's kernel the calls it cannot serve exactly
(see `FusedChunkedLogProb`). With `loss=True`, `GRPOTrainer._compute_loss` is replaced by one that
feeds the same log-probs to `fusedrl.kernels.grpo_loss` and keeps TRL's gradient-accumulation
scaling and logged metrics; configurations it does not cover run TRL's own `_compute_loss`.

With `backbone=True`, `GRPOTrainer.__init__` is wrapped: once TRL has built the trainer (and added the LoRA
adapter of a peft_config), `fusedrl.patch_backbone` runs on `trainer.model` and on the reference model, when there
is one, before accelerate wraps them for training (the reference of a DeepSpeed / FSDP run is prepared inside
`__init__` already: sharded, it is left alone). This applies to trainers created after the patch only.

The patch changes classes and a module attribute, not trainer instances, so it applies to trainers
created before or after it (the backbone: after), and `unpatch_grpo_trainer()` restores TRL exactly.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Iterator

import torch

from fusedrl.kernels.grpo_loss.reference import LOSS_TYPES

SUPPORTED_TRL = ">=1.16,<1.17"

log = logging.getLogger("fusedrl")

# Set while GRPOTrainer._get_per_token_logps_and_entropies runs: the fused LM head's calls made then
# are GRPOTrainer's. A ContextVar, so that threads (or tasks) running other trainers are not affected.
_IN_GRPO = contextvars.ContextVar("fusedrl_in_grpo_logps", default=False)

# (owner, attribute) -> the value the patch replaced, restored by unpatch_grpo_trainer().
_ORIGINALS: dict[tuple[object, str], object] = {}

# The fused LM head's per-token outputs that token_logprobs computes; TRL's others (log_sum_sq_probs,
# mean_logits, is_top1) make the call go to TRL's kernel.
_FUSED_OUTPUTS = frozenset(("log_probs", "entropy"))

# GRPO loss types that fusedrl.kernels.grpo_loss computes ("vespo" needs vLLM's importance ratios).
_FUSED_LOSS_TYPES = LOSS_TYPES

# Inputs that GRPOTrainer._compute_loss forwards from the batch to the model (vision-language models).
_MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                     "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")

_said: set[str] = set()


def _say_once(message: str) -> None:
    """A warning, once per message: a call fusedrl was asked to serve runs TRL's own code (the numbers are TRL's;
    the speed and memory are not fusedrl's). Python prints warnings with no logging configured."""
    if message not in _said:
        _said.add(message)
        log.warning("fusedrl: %s", message)


def check_trl_version() -> str:
    """The installed TRL version, if this integration supports it (`trl>=1.16,<1.17`).

    Raises:
        ImportError: TRL is not installed.
        RuntimeError: the installed TRL is outside the supported range (the message names both).
    """
    try:
        import trl
    except ImportError as exc:
        raise ImportError(f"fusedrl.integrations.trl needs TRL: pip install 'trl{SUPPORTED_TRL}'") from exc
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    installed = str(getattr(trl, "__version__", "unknown"))
    try:
        # prereleases=True accepts e.g. 1.16.1rc1; "<1.17" still refuses 1.17.0.dev0 (PEP 440).
        supported = SpecifierSet(SUPPORTED_TRL).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        supported = False
    if not supported:
        raise RuntimeError(
            f"fusedrl.integrations.trl supports trl{SUPPORTED_TRL}, but trl {installed} is installed. The patch "
            f"replaces TRL internals that other versions lay out differently; install trl{SUPPORTED_TRL} or run "
            "TRL without patch_grpo_trainer()."
        )
    return installed


def _fused_logprobs(hidden, weight, bias, targets, temperature, softcap, logit_scale, want_entropy):
    """TRL's chunked log-prob math through fusedrl.kernels.token_logprobs: (logp [M], entropy [M] | None), fp32."""
    from fusedrl.kernels import token_logprobs

    device = hidden.device
    # TRL projects in the autocast dtype when autocast is on (else in the hidden states' dtype): cast the
    # same way. A cast weight is a [V, H] copy held for the backward, as autocast's own matmul would hold;
    # a weight that does not require grad stays without grad, so no dW is computed for a frozen head.
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if logit_scale != 1.0:
        # TRL multiplies the raw logits h W^T + b by logit_scale before soft-capping; scaling the [M, H]
        # hidden states and the bias instead gives the same logits without touching the [V, H] weight.
        hidden = hidden * logit_scale
        bias = None if bias is None else bias * logit_scale
    # The kernel picks its own precision (fp32 accumulation); autocast must not recast inside its torch path.
    with torch.autocast(device.type, enabled=False):
        result = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                                ignore_index=-100, return_entropy=want_entropy)
    logp, entropy = result if want_entropy else (result, None)
    # TRL's kernel returns fp32 whatever the input dtype (fusedrl returns fp64 for fp64 input).
    return logp.float(), None if entropy is None else entropy.float()


class FusedChunkedLogProb:
    """Stands in for `trl.kernels.ChunkedLogProbFunction` in `trl.trainer.utils`, whose fused LM head
    calls only its `apply`.

    `apply(hidden [M, H], weight [V, H], bias [V] | None, targets [M], temperature, chunk_size,
    final_logit_softcapping, logit_scale, outputs)` returns (log_probs, entropy, log_sum_sq_probs,
    mean_logits, is_top1) like TRL's: fp32 [M] log_softmax(softcap(logit_scale (h W^T + b)) / T)[target]
    and its entropy (None when "entropy" is not in `outputs`), the other three None. The targets are
    all valid ids: TRL has already dropped (on Triton devices) or clamped to 0 (elsewhere) the ignored
    positions and zeroes them after the call, so there is no ignore_index to handle here.

    TRL's own kernel serves the call instead when it comes from outside GRPOTrainer's log-prob method,
    asks for outputs other than log-probs and entropy, or has inputs fusedrl cannot serve exactly:
    a DeepSpeed ZeRO-3 partitioned head (TRL's backward re-gathers it, a saved weight would be empty
    by then), a non-floating-point (quantized) head, or a soft-cap that is not > 0.
    """

    def __init__(self, original):
        from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS

        self.original = original
        self._default_outputs = OPTIONAL_OUTPUTS

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=None):
        outputs = self._default_outputs if outputs is None else outputs
        reason = self._fallback_reason(weight, final_logit_softcapping, outputs)
        if reason is not None:
            if _IN_GRPO.get():
                _say_once(f"GRPOTrainer log-probs use TRL's kernel: {reason}")
            return self.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                       final_logit_softcapping, logit_scale, outputs)
        logp, entropy = _fused_logprobs(hidden, weight, bias, targets, temperature, final_logit_softcapping,
                                        logit_scale, "entropy" in outputs)
        return logp, entropy, None, None, None

    @staticmethod
    def _fallback_reason(weight, softcap, outputs) -> str | None:
        if not _IN_GRPO.get():
            return "not called by GRPOTrainer"
        extra = set(outputs) - _FUSED_OUTPUTS
        if extra:
            return f"outputs {sorted(extra)} are not computed by fusedrl"
        if hasattr(weight, "ds_id"):
            return "the LM head is a DeepSpeed ZeRO-3 parameter"
        if not weight.is_floating_point():
            return f"the LM head weight is {weight.dtype}, not floating point"
        if softcap is not None and not softcap > 0:
            return f"final_logit_softcapping={softcap!r} is not > 0"
        return None


@contextlib.contextmanager
def _grpo_scope() -> Iterator[None]:
    """Marks the fused LM head's calls made inside as GRPOTrainer's (served by fusedrl)."""
    token = _IN_GRPO.set(True)
    try:
        yield
    finally:
        _IN_GRPO.reset(token)


def _scoped(method: Callable) -> Callable:
    """`method` (GRPOTrainer._get_per_token_logps_and_entropies) run inside `_grpo_scope()`."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with _grpo_scope():
            return method(*args, **kwargs)

    return wrapper


def _loss_fallback_reason(trainer) -> str | None:
    """Why `trainer`'s configuration needs TRL's own _compute_loss, or None when grpo_loss covers it."""
    if trainer.loss_type not in _FUSED_LOSS_TYPES:
        return f"loss_type={trainer.loss_type!r}"
    if trainer.importance_sampling_level not in ("token", "sequence"):
        return f"importance_sampling_level={trainer.importance_sampling_level!r}"
    if trainer.off_policy_mask_threshold is not None:
        return "off_policy_mask_threshold is set"
    if trainer.top_entropy_quantile < 1.0:
        return "top_entropy_quantile < 1"
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        return "vLLM importance-sampling correction"
    if trainer._entropy_bonus_enabled:
        return "entropy bonus (entropy_coef or adaptive entropy)"
    return None


def _fused_compute_loss(original: Callable) -> Callable:
    """GRPOTrainer._compute_loss with the loss (and its KL term) from fusedrl.kernels.grpo_loss.

    Mirrors TRL 1.16's method line by line around the loss: the same log-prob call, mask (with the tool
    mask), gradient-accumulation scaling per loss type, MoE auxiliary loss and logged metrics. Falls back
    to `original` for the configurations named in `_loss_fallback_reason`.
    """

    @functools.wraps(original)
    def _compute_loss(self, model, inputs):
        reason = _loss_fallback_reason(self)
        if reason is not None:
            _say_once(f"GRPOTrainer loss uses TRL's code: {reason} is not covered by fusedrl.kernels.grpo_loss")
            return original(self, model, inputs)
        from fusedrl.kernels import grpo_loss

        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **{key: inputs.get(key) for key in _MODEL_INPUT_KEYS})

        advantages = inputs["advantages"]
        if advantages.dim() == 2 and advantages.size(1) == 1:  # [B, 1], as TRL broadcasts it, is per sequence
            advantages = advantages.squeeze(1)
        old_logp = inputs.get("old_per_token_logps")  # None: logp.detach(), in grpo_loss as in TRL
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        dapo_like = self.loss_type in ("dapo", "cispo")
        loss, metrics = grpo_loss(
            logp, old_logp, advantages, mask,
            ref_logp=inputs["ref_per_token_logps"] if self.beta != 0.0 else None, beta=self.beta,
            loss_type=self.loss_type, eps_low=self.epsilon_low, eps_high=self.epsilon_high, delta=self.args.delta,
            importance_level=self.importance_sampling_level,
            use_bias_correction_kl=self.args.use_bias_correction_kl, max_len=self.max_completion_length,
            # dapo/cispo: the masked sum here, divided below by TRL's normalizer, which (unlike grpo_loss's
            # num_items) is not clamped to >= 1 after its rescaling.
            num_items=1.0 if dapo_like else None,
            sapo_tau=(self.args.sapo_temperature_pos, self.args.sapo_temperature_neg),
            entropy=entropies.detach())
        if dapo_like:
            # num_items_in_batch spans the generation batch; TRL rescales it to one accumulation window.
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = loss / normalizer
        else:
            loss = loss / accumulation

        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        _log_metrics(self, mode, metrics, logp.detach(), old_logp, advantages, mask)
        return loss

    return _compute_loss


def _log_metrics(trainer, mode, metrics, logp, old_logp, advantages, mask) -> None:
    """TRL's metrics for one micro-batch, averaged over all processes as TRL averages them.

    kl and entropy come from grpo_loss (token means, turned back into sums for the cross-process mean).
    The clip ratios are recomputed from the detached [B, T] log-ratios as TRL computes them (a few
    elementwise ops), because TRL also logs their per-sequence min / max, which grpo_loss does not return.
    """
    mask_count = mask.sum().float()

    def global_mean(local_sum, local_count):
        totals = trainer.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def global_masked_mean(x):
        if x.shape[1] == 1:  # one value per sequence
            return global_mean(x.sum(), torch.tensor(float(x.shape[0]), device=x.device))
        return global_mean((x * mask).sum(), mask_count)

    def masked_seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    metric_log = trainer._metrics[mode]
    if trainer.beta != 0.0:
        metric_log["kl"].append(global_mean(metrics["kl"] * mask_count, mask_count))
    metric_log["entropy"].append(global_mean(metrics["entropy"] * mask_count, mask_count))

    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_ratio = logp - (logp if old_logp is None else old_logp)
    if trainer.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    if trainer.loss_type == "cispo":
        metric_log["cispo_clip_ratio"].append(
            global_masked_mean(((ratio > trainer.epsilon_high) & (advantages > 0)).float()))
    elif trainer.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        from trl.trainer.utils import nanmax, nanmin

        if trainer.args.delta is not None:
            ratio = torch.clamp(ratio, max=trainer.args.delta)
        low = (ratio < 1 - trainer.epsilon_low) & (advantages < 0)
        high = (ratio > 1 + trainer.epsilon_high) & (advantages > 0)
        metric_log["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
        metric_log["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
        metric_log["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
        metric_log["clip_ratio/low_min"].append(nanmin(trainer.accelerator.gather(masked_seq_mean(low.float()))).item())
        metric_log["clip_ratio/high_max"].append(
            nanmax(trainer.accelerator.gather(masked_seq_mean(high.float()))).item())


def _replace(owner, name: str, value) -> None:
    """owner.name = value, remembering the original (the first time) for unpatch_grpo_trainer()."""
    key = (owner, name)
    if key not in _ORIGINALS:
        if name not in vars(owner):
            raise RuntimeError(f"{getattr(owner, '__name__', owner)}.{name} is missing: this TRL is laid out "
                               f"differently from trl{SUPPORTED_TRL}")
        _ORIGINALS[key] = vars(owner)[name]
    setattr(owner, name, value)


def _restore(owner, name: str) -> None:
    if (owner, name) in _ORIGINALS:
        setattr(owner, name, _ORIGINALS.pop((owner, name)))


def _targets():
    """(trl.trainer.utils, GRPOTrainer): the module and class the patch changes."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.grpo_trainer import GRPOTrainer

    return trl_utils, GRPOTrainer


def _patched_backbone_init(init: Callable) -> Callable:
    """GRPOTrainer.__init__, then fusedrl.patch_backbone on the trainer's model and reference model."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        from fusedrl.backbone import patch_backbone

        log.info("fusedrl (TRL GRPOTrainer): %s", patch_backbone(self.model).summary())
        if getattr(self, "ref_model", None) is not None:
            patch_backbone(self.ref_model)

    return __init__


def patch_grpo_trainer(*, loss: bool = False, backbone: bool = False) -> None:
    """Make `trl.GRPOTrainer` compute per-token log-probs and entropies with
    `fusedrl.kernels.token_logprobs` (and, with `loss=True`, its loss with `fusedrl.kernels.grpo_loss`; with
    `backbone=True`, run the models of the trainers it builds on `fusedrl.patch_backbone`).

    Idempotent; a second call switches the loss and backbone patches on or off as `loss` and `backbone` say.
    Affects existing and future GRPOTrainer instances until `unpatch_grpo_trainer()` (the backbone: future ones).

    Raises:
        RuntimeError: the installed TRL is not in `trl>=1.16,<1.17` (or is laid out differently).
    """
    check_trl_version()
    trl_utils, grpo = _targets()
    if (trl_utils, "_ChunkedLogProbFunction") not in _ORIGINALS:
        _replace(trl_utils, "_ChunkedLogProbFunction", FusedChunkedLogProb(trl_utils._ChunkedLogProbFunction))
        _replace(grpo, "_get_per_token_logps_and_entropies", _scoped(grpo._get_per_token_logps_and_entropies))
    if loss and (grpo, "_compute_loss") not in _ORIGINALS:
        _replace(grpo, "_compute_loss", _fused_compute_loss(grpo._compute_loss))
    elif not loss:
        _restore(grpo, "_compute_loss")
    if backbone and (grpo, "__init__") not in _ORIGINALS:
        _replace(grpo, "__init__", _patched_backbone_init(grpo.__init__))
    elif not backbone:
        _restore(grpo, "__init__")


def unpatch_grpo_trainer() -> None:
    """Undo `patch_grpo_trainer()`: TRL's own kernel and loss again. A no-op when not patched."""
    for owner, name in list(_ORIGINALS):
        _restore(owner, name)


def patched_state() -> dict[str, bool] | None:
    """None when GRPOTrainer is not patched, else {"loss": whether the loss is patched too, "backbone": whether new
    trainers' models are patched}."""
    if not _ORIGINALS:
        return None
    return {"loss": any(name == "_compute_loss" for _, name in _ORIGINALS),
            "backbone": any(name == "__init__" for _, name in _ORIGINALS)}


@contextlib.contextmanager
def grpo_trainer_patched(*, loss: bool = False, backbone: bool = False) -> Iterator[None]:
    """`with grpo_trainer_patched(loss=..., backbone=...):` patch_grpo_trainer() inside, the previous state after."""
    previous = patched_state()
    patch_grpo_trainer(loss=loss, backbone=backbone)
    try:
        yield
    finally:
        if previous is None:
            unpatch_grpo_trainer()
        else:
            patch_grpo_trainer(**previous)
