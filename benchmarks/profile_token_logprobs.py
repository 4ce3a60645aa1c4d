"""Where token_logprobs' forward + backward spends its GPU time: the CUDA kernels of one call, per strategy, and
TRL 1.16's chunked LM head on the same inputs (issue 3's Qwen-sized case: N = 8192, H = 4096, V = 151936, bf16,
head trained). Run on a GPU: python benchmarks/profile_token_logprobs.py [--frozen]"""

from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from fusedrl.bench.cases.token_logprobs import TRL_CHUNK
from fusedrl.bench.trl_peer import chunked_logprob_function
from fusedrl.kernels import token_logprobs

N, H, V = 8192, 4096, 151936
hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
weight = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / H**0.5).requires_grad_("--frozen" not in sys.argv)
labels = torch.randint(0, V, (N,), device="cuda")


def ours():
    logp, entropy = token_logprobs(hidden, weight, labels, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()


def trl():
    out = chunked_logprob_function().apply(hidden, weight, None, labels, 1.0, TRL_CHUNK, None, 1.0, ("entropy",))
    (out[0].sum() + out[1].sum()).backward()


for name, fn, strategy in (("fused", ours, "fused"), ("chunked", ours, "chunked"), ("trl", trl, None)):
    if strategy:
        os.environ["FUSEDRL_TOKEN_LOGPROBS"] = strategy
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"== {name}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
