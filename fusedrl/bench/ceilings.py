"""The device's ceilings, measured before any op so that every result can be read as a fraction of them.

- copy bandwidth: `dst.copy_(src)` of a tensor far larger than the last-level cache, counted as
  read + write bytes (2 x size) per copy. The practical limit of a memory-bound kernel, which is
  what the fused elementwise/reduction ops are (it sits below the data-sheet HBM number).
- bf16 matmul TFLOP/s (GPU only): an n x n x n `torch.mm` in bf16, 2 n^3 flops per call; the limit of
  compute-bound ops (attention, lm_head). Not measured on the CPU, where no op is judged by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .timing import Timing, measure

COPY_BYTES = {"cuda": 1024 * 2**20, "cpu": 256 * 2**20}
MATMUL_N = 8192


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float
    copy_bytes: int
    copy_timing: Timing
    matmul_tflops: float | None = None
    matmul_n: int = MATMUL_N
    matmul_timing: Timing | None = None


def _measure_copy(size: int, device: torch.device, reps: int, warmup: int) -> Timing:
    src = torch.ones(size // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), device, reps, warmup, inputs=(src, dst))


def measure_ceilings(device: torch.device, reps: int, warmup: int) -> Ceilings:
    size = COPY_BYTES["cuda" if device.type == "cuda" else "cpu"]
    copy = _measure_copy(size, device, reps, warmup)
    copy_gbps = 2 * size / (copy.median_ms * 1e-3) / 1e9
    if device.type != "cuda":
        return Ceilings(copy_gbps, size, copy)
    a = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device=device)
    b = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device=device)
    mm = measure(lambda: torch.mm(a, b), device, reps, warmup, inputs=(a, b))
    tflops = 2 * MATMUL_N**3 / (mm.median_ms * 1e-3) / 1e12
    return Ceilings(copy_gbps, size, copy, tflops, MATMUL_N, mm)
