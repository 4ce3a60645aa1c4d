"""`on_inputs_device`: a custom op's implementation runs with the current CUDA device set to its inputs' device.

A Triton launch goes to the current device, with that device's current stream, whatever device its pointers are
on: on a model spread over GPUs (`device_map="auto"`, a reward model on `cuda:1`), a kernel for tensors on
`cuda:1` called while `cuda:0` is current ran on GPU 0 with GPU 1's addresses (an illegal memory access, or a
read racing an unsynchronised stream). The CUDA extension guards its own launches (`CUDAGuard`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["on_inputs_device"]


def on_inputs_device(fn: Callable) -> Callable:
    """Decorate a custom op's implementation (under `torch.library.custom_op`): when its first tensor argument is
    a CUDA tensor on another device than the current one, the call runs under `torch.cuda.device(that device)`."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or not first.is_cuda or first.device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(first.device):
            return fn(*args, **kwargs)

    return run
