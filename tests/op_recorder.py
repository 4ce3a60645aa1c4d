"""A dispatch mode that counts the aten / custom ops run while it is active (the checkpointing tests' op counts)."""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class OpRecorder(TorchDispatchMode):
    """Counts the ops dispatched while active, by schema name."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = getattr(func, "_schema", None)
        self.counts[schema.name if schema is not None else str(func)] += 1
        return func(*args, **(kwargs or {}))
