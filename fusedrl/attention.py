"""`fusedrl.patch_attention(model)`: run a diffusers or transformers model's attention on
`fusedrl.kernels.flash_attention`, and `fusedrl.unpatch_attention(model)` to go back.

    import fusedrl
    patch = fusedrl.patch_attention(model)    # transformers PreTrainedModel, or diffusers UNet / SD3 / Flux
    ...
    patch.undo()                              # or fusedrl.unpatch_attention(model)

- transformers (>= 5) models: "fusedrl" is registered with both AttentionInterface and AttentionMaskInterface and set
  with `model.set_attn_implementation("fusedrl")` (see `fusedrl.integrations.transformers_attention`).
- diffusers models: the stock AttnProcessor2_0 / JointAttnProcessor2_0 / FluxAttnProcessor processors are replaced
  through `set_attn_processor` (see `fusedrl.integrations.diffusers_attention`); others are left alone and reported.

Calls that flash_attention cannot express (general masks, dropout > 0, sliding windows, softcapping, sinks, ...) run
the stock attention instead, and the first one of each kind is logged at INFO level on the "fusedrl" logger
(`fallback_log=False` silences that for this model).

This module imports neither diffusers nor transformers until it is called.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model_patch import ModelPatch, PatchRegistry, unwrap

__all__ = ["AttentionPatch", "patch_attention", "unpatch_attention"]

_patches = PatchRegistry()


@dataclass
class AttentionPatch(ModelPatch):
    """What `patch_attention` did to a model, and how to undo it (the previous implementation name or processors).

    kind: "transformers" or "diffusers". patched: the configs (transformers) or attention processors (diffusers,
    name -> replaced stock class) that now run fusedrl. skipped: name -> why it was left alone.
    """

    kind: str = ""


def _kind(model) -> str | None:
    mod = type(model).__module__
    for cls in type(model).__mro__:
        m = cls.__module__
        if m.startswith("transformers.") and cls.__name__ == "PreTrainedModel":
            return "transformers"
        if m.startswith("diffusers.") and cls.__name__ == "ModelMixin":
            return "diffusers"
    if mod.startswith("diffusers.") and hasattr(model, "attn_processors"):
        return "diffusers"
    return None


def patch_attention(model, *, fallback_log: bool = True) -> AttentionPatch:
    """Make `model`'s attention run on `fusedrl.kernels.flash_attention`.

    Args:
        model: a transformers `PreTrainedModel` (causal LMs, encoders, ...; also under PEFT / DDP / torch.compile
            wrappers) or a diffusers model with attention processors (UNet2DConditionModel, SD3Transformer2DModel,
            FluxTransformer2DModel, ...).
        fallback_log: log (INFO, "fusedrl" logger) the first call of each kind that falls back to the stock attention.

    Returns:
        An `AttentionPatch` whose `undo()` restores the previous attention; `unpatch_attention(model)` does the same.
        Patching a patched model returns the existing patch.

    Raises:
        TypeError: `model` is neither, or it has no attention fusedrl can replace.
    """
    base = unwrap(model)
    existing = _patches.active(base)
    if existing is not None:
        return existing
    kind = _kind(base)
    if kind == "transformers":
        from fusedrl.integrations import transformers_attention as integration
    elif kind == "diffusers":
        from fusedrl.integrations import diffusers_attention as integration
    else:
        hint = " (for a pipeline, pass pipe.unet or pipe.transformer)" if hasattr(base, "components") else ""
        raise TypeError(f"patch_attention takes a transformers PreTrainedModel or a diffusers model with attention "
                        f"processors (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel), got "
                        f"{type(model).__module__}.{type(model).__name__}{hint}")
    patched, skipped, undo = integration.patch_model(base, fallback_log=fallback_log)
    return _patches.add(base, AttentionPatch(kind=kind, patched=patched, skipped=skipped, _undo=undo))


def unpatch_attention(model) -> bool:
    """Undo `patch_attention(model)`. Returns False when the model was not patched."""
    return _patches.undo(model)
