"""`fusedrl.patch_backbone(model)`: run a transformers causal LM's RMSNorms, SwiGLU MLPs, rotary embeddings and peft
LoRA linears on fused code, and `fusedrl.unpatch_backbone(model)` to go back.

    import fusedrl
    patch = fusedrl.patch_backbone(model)   # transformers PreTrainedModel, also under PEFT / DDP / torch.compile
    print(patch.summary())                  # fused backbone: 57 rms_norm, 28 swiglu, 28 rotary, 112 lora
    patch.undo()

What changes is speed and memory: each module's fused forward computes what its stock one does (checked on two
rows of input when the model is patched), see `fusedrl.integrations.transformers_backbone`, up to rounding, with
one documented difference: a LoRA update is computed in the base layer's dtype (as autocast would), where peft
computes it in the adapter's (fp32 adapters on a bf16 model: the update, and so the adapter's gradients, differ at
bf16 precision, a few percent on a tiny model). The LM head is not touched: `fusedrl.kernels.token_logprobs` /
`fused_linear_grpo_loss` replace it in the loss.

This module imports neither transformers nor peft until it is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model_patch import ModelPatch, PatchRegistry, unwrap

__all__ = ["BackbonePatch", "patch_backbone", "unpatch_backbone"]

_patches = PatchRegistry()


@dataclass
class BackbonePatch(ModelPatch):
    """What `patch_backbone` did to a model, and how to undo it (every patched module's stock forward back).

    patched: kind ("rms_norm", "swiglu", "rotary", "lora") -> modules now fused (rotary: attention modules).
    skipped: module name -> why it was left alone.
    probes: the probes' outcomes (`patch_backbone(..., replay=patch.probes)` makes the same choices elsewhere).
    """

    probes: dict[str, str | None] = field(default_factory=dict, repr=False)

    def grow(self, patched: dict[str, int], skipped: dict[str, str], undo, probes: dict[str, str | None]) -> None:
        """Add what a later `patch_backbone` of the same model fused (its undo runs before this patch's own)."""
        for kind, n in patched.items():
            self.patched[kind] = self.patched.get(kind, 0) + n
        self.skipped.update(skipped)
        self.probes.update(probes)
        first = self._undo

        def both(model) -> None:
            undo(model)
            first(model)

        self._undo = both

    def summary(self) -> str:
        """One line for a log: what was fused, and how many modules were left alone (the first reason)."""
        done = ", ".join(f"{n} {kind}" for kind, n in self.patched.items() if n) or "nothing"
        if not self.skipped:
            return f"fused backbone: {done}"
        name, why = next(iter(self.skipped.items()))
        return f"fused backbone: {done}; {len(self.skipped)} module(s) left alone, e.g. {name}: {why}"


def patch_backbone(model, *, rms_norm: bool = True, swiglu: bool = True, rotary: bool = True,
                   lora: bool = True, replay: dict[str, str | None] | None = None) -> BackbonePatch:
    """Run `model`'s RMSNorms, SwiGLU MLPs, rotary embeddings and peft LoRA linears on fusedrl's fused code.

    Args:
        model: a torch module holding a transformers decoder (a causal LM, its PEFT wrapper, ...). Patch before
            FSDP sharding; DDP, activation checkpointing and torch.compile may come before or after.
        rms_norm, swiglu, rotary, lora: which kinds of module to patch. The rotary embedding is rebound in its
            modeling module (see `fusedrl.integrations.transformers_backbone`): every model of that architecture
            in the process uses the fused one while a patch holds it.
        replay: another process's `BackbonePatch.probes`: no probe runs here, and the modules fused are those that
            process fused. For a model whose parameters are on the meta device until FSDP2 fills them from rank 0's
            (which cannot be probed): every process then runs the same forwards.

    Returns:
        A `BackbonePatch` (what was patched and what was left alone, with why). Patching a patched model returns
        its patch, grown by the modules of its kinds added since (e.g. the LoRA linears of a `get_peft_model`
        applied after the first patch); a deep copy of a patched model gets a patch of its own over the fused
        forwards it carries.

    Raises:
        TypeError: `model` is not a torch module.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_backbone takes a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")
    base = unwrap(model)
    from fusedrl.integrations import transformers_backbone as integration

    kinds = tuple(kind for kind, on in zip(integration.KINDS, (rms_norm, swiglu, rotary, lora)) if on)
    probes = integration.ProbeLog(replay)
    existing = _patches.active(base)
    if existing is not None:  # modules added since the patch, of its kinds (the rotary is held once per patch)
        grown = tuple(k for k in existing.patched if k != "rotary")  # the kinds the patch was asked for
        added, skipped, undo = integration.patch_model(base, grown, adopt=False, probes=probes)
        existing.grow(added, skipped, undo, probes.outcomes)
        return existing
    patched, skipped, undo = integration.patch_model(base, kinds, probes=probes)
    return _patches.add(base, BackbonePatch(patched=patched, skipped=skipped, _undo=undo, probes=probes.outcomes))


def unpatch_backbone(model) -> bool:
    """Undo `patch_backbone(model)`. Returns False when the model was not patched."""
    return _patches.undo(model)
