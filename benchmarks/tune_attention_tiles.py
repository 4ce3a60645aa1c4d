"""Time flash attention with candidate tiles on this GPU (bf16, non-causal), patching the sm_90 table in place:

    python benchmarks/tune_attention_tiles.py [--dims 64,128,256] [--kernels fwd,dkdv,dq] > tiles.txt

A row per candidate: head dim, kernel, tile (BLOCK_M, BLOCK_N, warps, stages), median ms (the forward alone for
"fwd" candidates, forward + backward for "dkdv" / "dq"), each kernel's other tiles as in the table. The
2026-11-27 H200 sweep of the backward (results/2026-11-27_H200_attention_tiles.txt) chose the sm_90 backward
tiles of D = 64 and 128; the forward and D = 256 are unswept. Every candidate here fits sm_90's shared memory
(compiled ahead of time with Triton 3.8, 2026-11-27; 18 of the 60 spill registers, which the backward sweep showed
can still be the fastest); one that fails to launch prints a row saying so. About 4 s per candidate, compiling
included: ~4 minutes for all, less with --dims / --kernels.
"""

from __future__ import annotations

import argparse
import os

import torch

from fusedrl.bench.timing import measure
from fusedrl.kernels import flash_attention
from fusedrl.kernels.attention import triton_kernels as tk

SHAPES = {64: (4, 32, 4096, 64), 128: (4, 16, 4096, 128), 256: (2, 16, 4096, 256)}
CANDIDATES = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 4, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)],
        256: [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 32, 8, 3)],
    },
    "dkdv": {
        64: [(32, 128, 8, 3), (64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 3),
             (16, 64, 8, 2), (64, 64, 8, 3), (128, 128, 8, 2)],
        128: [(32, 128, 8, 3), (64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 3),
              (16, 64, 8, 2), (64, 64, 8, 3), (128, 128, 8, 2)],
        256: [(16, 32, 8, 2), (32, 32, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2)],
    },
    "dq": {
        64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 4, 3)],
        128: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 4, 3)],
        256: [(32, 32, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 16, 8, 2), (32, 32, 4, 2), (64, 32, 4, 3)],
    },
}
KERNELS = tuple(CANDIDATES)  # the order of tk.SM90's entries: (fwd, dkdv, dq)


def time_ms(q, k, v, backward: bool, reps: int = 10) -> float:
    """Median ms (fusedrl.bench.timing: GPU time with the queue kept full) of the forward, or forward + backward."""
    if not backward:
        return measure(lambda: flash_attention(q, k, v), q.device, reps, warmup=2).median_ms
    dout = torch.randn_like(q)
    return measure(lambda: torch.autograd.grad(flash_attention(q, k, v), (q, k, v), dout), q.device, reps,
                   warmup=2).median_ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="64,128,256", help="head dims to sweep (of %(default)s)")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="kernels to sweep (of %(default)s)")
    args = parser.parse_args(argv)
    dims = [int(d) for d in args.dims.split(",")]
    kernels = args.kernels.split(",")
    bad = [d for d in dims if d not in SHAPES] + [k for k in kernels if k not in KERNELS]
    if bad:
        parser.error(f"unknown head dim or kernel {bad}; head dims {sorted(SHAPES)}, kernels {KERNELS}")
    os.environ["FUSEDRL_BACKEND"] = "triton"
    for d in dims:
        B, H, N, D = SHAPES[d]
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        table = tk.SM90[d]
        print(f"# D={d} {B}x{H}x{N}x{D}; table: fwd {tuple(table[0])} dkdv {tuple(table[1])} dq {tuple(table[2])}",
              flush=True)
        for kind in kernels:
            slot = KERNELS.index(kind)
            for c in CANDIDATES[kind][d]:
                tk.SM90[d] = tuple(tk.Tiles(*c) if i == slot else t for i, t in enumerate(table))
                try:
                    ms = f"{time_ms(q, k, v, backward=kind != 'fwd'):.3f}"
                except Exception as exc:  # out of resources: a row saying so
                    ms = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                print(f"D={d} {kind} {c} {ms}", flush=True)
            tk.SM90[d] = table


if __name__ == "__main__":
    main()
