"""Time flash attention's backward with candidate dK/dV and dQ tiles on this GPU (bf16, fwd+bwd, non-causal),
patching the sm_90 table in place: python benchmarks/tune_attention_tiles.py > tiles.txt. A row per candidate:
head dim, kernel, tile (BLOCK_M, BLOCK_N, warps, stages), median ms of forward + backward."""

from __future__ import annotations

import torch

from fusedrl.bench.timing import measure
from fusedrl.kernels import flash_attention
from fusedrl.kernels.attention import triton_kernels as tk

SHAPES = {64: (4, 32, 4096, 64), 128: (4, 16, 4096, 128)}
DKDV = [(32, 128, 8, 3), (64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 3),
        (16, 64, 8, 2), (64, 64, 8, 3), (128, 128, 8, 2)]
DQ = [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 4, 3)]


def time_ms(q, k, v, reps=10):
    """Median ms of forward + backward (fusedrl.bench.timing: GPU time with the queue kept full)."""
    dout = torch.randn_like(q)
    return measure(lambda: torch.autograd.grad(flash_attention(q, k, v), (q, k, v), dout), q.device, reps,
                   warmup=2).median_ms


def main():
    import os

    os.environ["FUSEDRL_BACKEND"] = "triton"
    for d, (B, H, N, D) in SHAPES.items():
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        fwd, dkdv0, dq0 = tk.SM90[d]
        for kind, cands in (("dkdv", DKDV), ("dq", DQ)):
            for c in cands:
                t = tk.Tiles(*c)
                tk.SM90[d] = (fwd, t, dq0) if kind == "dkdv" else (fwd, dkdv0, t)
                try:
                    ms = time_ms(q, k, v)
                except Exception as exc:  # out of resources: a row saying so
                    ms = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                print(f"D={d} {kind} {c} {ms}", flush=True)
            tk.SM90[d] = (fwd, dkdv0, dq0)


if __name__ == "__main__":
    main()
