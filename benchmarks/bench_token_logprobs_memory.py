"""Peak memory of token log-probs + entropy, forward and backward, on the CPU (issue: N = 4096 tokens,
V = 32000): the naive formula (build the [N, V] logits, log_softmax, gather) vs fusedrl's chunked torch
path, each in a fresh process (fusedrl.bench.rss). Only the growth of peak RSS during the call counts;
the inputs are built before. Target: fused / naive <= 0.25."""

from __future__ import annotations

import pytest

from fusedrl.bench.rss import peak_growth_mb

SETUP = """
N, H, V = 4096, 256, 32000
hidden = torch.randn(N, H, requires_grad=True)
weight = (torch.randn(V, H) / 16).requires_grad_()
labels = torch.randint(0, V, (N,))
"""
NAIVE = """
logp_all = torch.log_softmax(hidden @ weight.T, dim=-1)
logp = logp_all.gather(-1, labels[:, None])[:, 0]
entropy = -(logp_all.exp() * logp_all).sum(-1)
(logp.sum() + entropy.sum()).backward()
"""
FUSED = """
from fusedrl.kernels import token_logprobs
logp, entropy = token_logprobs(hidden, weight, labels, return_entropy=True)
(logp.sum() + entropy.sum()).backward()
"""


@pytest.mark.slow
def test_peak_memory_fused_vs_naive(benchmark):
    env = {"FUSEDRL_BACKEND": "torch", "TRITON_INTERPRET": "0"}
    naive = peak_growth_mb(SETUP, NAIVE, env)
    fused = benchmark.pedantic(peak_growth_mb, args=(SETUP, FUSED, env), rounds=1, iterations=1)
    benchmark.extra_info.update(naive_peak_mb=round(naive, 1), fused_peak_mb=round(fused, 1),
                                ratio=round(fused / naive, 3), logits_fp32_mb=4096 * 32000 * 4 / 2**20)
    print(f"\npeak RSS growth: naive {naive:.0f} MB, fused {fused:.0f} MB, ratio {fused / naive:.3f}")
    assert fused <= 0.25 * naive
