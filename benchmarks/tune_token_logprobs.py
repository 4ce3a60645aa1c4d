"""Time token_logprobs' chunked backward with chosen (row block R, vocabulary chunk C) shapes on this GPU, and the
memory each holds: which split of the 1% buffer budget makes cuBLAS fastest, and what a larger budget would buy.

    python benchmarks/tune_token_logprobs.py [--frozen] > blocks.txt

Issue 3's size (N = 8192, H = 4096, V = 131072, bf16, entropy on). A row per (R, C): median ms of forward +
backward, and the allocator's peak beyond the inputs and the returned gradients (MiB; the 1% bound is 40 MiB).
The forward's chunk is left as `chunk_columns` sizes it. (The 2026-11-27 H200 profile, results/
2026-11-27_H200_token_logprobs_profile.txt, showed the default R = 1024, C = 2688 GEMMs at ~70% of the ceiling.)
"""

from __future__ import annotations

import os
import sys

import torch

from fusedrl.bench.timing import measure
from fusedrl.kernels import token_logprobs
from fusedrl.kernels.logprobs import hidden_op

N, H, V = 8192, 4096, 131072
BLOCKS = [(1024, 2688), (2048, 1280), (1024, 4096), (2048, 2688), (4096, 1280), (8192, 640), (8192, 2048)]


def main() -> None:
    os.environ["FUSEDRL_TOKEN_LOGPROBS"] = "chunked"
    frozen = "--frozen" in sys.argv
    hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / H**0.5).requires_grad_(not frozen)
    labels = torch.randint(0, V, (N,), device="cuda")
    inputs = [t for t in (hidden, weight) if t.requires_grad]
    returned = sum(t.numel() * t.element_size() for t in inputs) + 4 * N * 4

    def step():
        logp, entropy = token_logprobs(hidden, weight, labels, return_entropy=True)
        return torch.autograd.grad(logp.sum() + entropy.sum(), inputs)

    original = hidden_op.backward_blocks
    print(f"# {'frozen' if frozen else 'trained'} head; default blocks {original(N, H, V, 2, True, not frozen)}")
    for R, C in BLOCKS:
        hidden_op.backward_blocks = lambda *args, R=R, C=C: (R, C)
        t = measure(step, hidden.device, reps=7, warmup=1)  # peak_mb: beyond the inputs, the gradients included
        print(f"R={R} C={C} {t.median_ms:.2f} ms, extra {t.peak_mb - returned / 2**20:.0f} MiB", flush=True)
    hidden_op.backward_blocks = original


if __name__ == "__main__":
    main()
