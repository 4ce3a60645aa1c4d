"""What a GPU offers the Triton kernels' tiles: compute capability, shared memory per block and the
number of multiprocessors (how many programs a launch needs to fill the device).

Read at call time from `torch.cuda.get_device_properties` (cached per device index), never at import.
Kernels pick frozen tile settings from these numbers (no autotune by default), so that a
consumer card with less shared memory than a Hopper part (sm_86 / sm_89: 99 KB per block opt-in,
sm_80: 163 KB, sm_90: 227 KB) gets tiles that fit. Tests mock `device_limits`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceLimits:
    capability: tuple[int, int]
    shared_memory: int  # bytes a block may use (opt-in maximum)
    multiprocessors: int = 1  # streaming multiprocessors (SMs): how many programs run side by side

    @property
    def is_hopper_or_newer(self) -> bool:
        return self.capability >= (9, 0)


# CPU tensors under TRITON_INTERPRET=1: no limits that matter; tiles sized for the interpreter's speed.
INTERPRETER = DeviceLimits(capability=(0, 0), shared_memory=1 << 30)


@functools.cache
def _cuda_limits(index: int) -> DeviceLimits:
    props = torch.cuda.get_device_properties(index)
    return DeviceLimits(capability=(props.major, props.minor), shared_memory=props.shared_memory_per_block_optin,
                        multiprocessors=props.multi_processor_count)


def device_limits(device: torch.device) -> DeviceLimits:
    """The limits of `device` (a CUDA device), or INTERPRETER for anything else."""
    if device.type != "cuda":
        return INTERPRETER
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())
