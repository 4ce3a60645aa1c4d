"""What `fusedrl.patch_attention` and `fusedrl.patch_backbone` share: the patch record with its undo, and the
registry of active patches by model (weakly held), so that patching twice returns the first patch and
`unpatch_*` finds it under the wrappers users apply (torch.compile, DDP, PEFT)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def unwrap(model):
    """The model under torch.compile, DDP/FSDP(1) and PEFT wrappers."""
    for _ in range(8):
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel", "DataParallel") \
                and hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model) \
                and type(model).__module__.startswith("peft"):
            model = model.get_base_model()
        else:
            break
    return model


@dataclass
class ModelPatch:
    """patched: what now runs fusedrl; skipped: name -> why it was left alone; undo() restores the model."""

    patched: Any
    skipped: dict[str, str]
    _undo: Callable[[Any], None] = field(repr=False)  # takes the model: the patch holds it only by weakref
    _model: Any = field(repr=False, default=None)
    _registry: PatchRegistry | None = field(repr=False, compare=False, default=None)
    active: bool = True

    def undo(self) -> None:
        """Restore what the patch replaced. Idempotent."""
        if not self.active:
            return
        model = self._model() if self._model is not None else None
        if model is not None:
            self._undo(model)
            if self._registry is not None:
                self._registry.forget(model, self)
        self.active = False


class PatchRegistry:
    """model (unwrapped) -> its active patch of one kind."""

    def __init__(self) -> None:
        self._by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __copy__(self) -> PatchRegistry:  # a copied patch refers to the same registry (and copies no model)
        return self

    def __deepcopy__(self, memo) -> PatchRegistry:
        return self

    def active(self, base) -> ModelPatch | None:
        patch = self._by_model.get(base)
        return patch if patch is not None and patch.active else None

    def add(self, base, patch: ModelPatch) -> ModelPatch:
        patch._model, patch._registry = weakref.ref(base), self
        self._by_model[base] = patch
        return patch

    def forget(self, base, patch: ModelPatch) -> None:
        if self._by_model.get(base) is patch:
            del self._by_model[base]

    def undo(self, model) -> bool:
        """Undo the patch of `model` (under its wrappers). False when it has none."""
        patch = self.active(unwrap(model))
        if patch is None:
            return False
        patch.undo()
        return True
