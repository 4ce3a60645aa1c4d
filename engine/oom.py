"""`is_out_of_memory`: whether an exception says a device (or the host) ran out of memory, whatever raised it."""

from __future__ import annotations

import torch

_MESSAGES = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or a RuntimeError (CUDA, cuBLAS, the CPU allocator) whose message says so."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _MESSAGES)
