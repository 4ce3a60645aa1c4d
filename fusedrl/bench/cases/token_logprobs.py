"""Cases of `token_logprobs`: log-probs and entropy of the sampled tokens from hidden states + LM head.

Shapes (N tokens, H hidden, V vocabulary): "default" = N=8192, H=4096, V=131072 and a Qwen-like
V=151936, bf16 (the issue's sizes); "small" = N=512, H=64, V=4096 for a CPU. The head is trained
("fwd+bwd") or frozen ("fwd+bwd_frozen": no weight gradient, as with LoRA).
Compute-bound: counted in FLOPs, read against the bf16 matmul ceiling. A fused implementation does
the N x H x V matmul once forward; forward + backward does it 4 times with a trained head (forward,
recomputed tiles, dh, dW) and 3 times with a frozen one: 2 N H V flops each.
Providers: "eager" = logits = h W^T, log_softmax, gather, entropy (the naive formula);
"compile" = torch.compile of it; "torch" / "triton" = fusedrl's function; "trl" = TRL 1.16's
`ChunkedLogProbFunction` (its fused LM head), when trl is installed.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from fusedrl.kernels import token_logprobs
from fusedrl.kernels.logprobs import hidden_reference
from fusedrl.kernels.logprobs.api import HIDDEN_SPEC

from ..providers import COMPILE, STANDARD, Impl, Skip, pick
from . import Case, CaseConfig

SHAPES = {"default": [(8192, 4096, 131072), (8192, 4096, 151936)], "small": [(512, 64, 4096)]}
MATMULS = {"fwd": 1, "fwd+bwd": 4, "fwd+bwd_frozen": 3}
TRL = "trl"
TRL_CHUNK = 4096


def _naive(hidden, weight, labels):
    return hidden_reference.naive(hidden, weight, labels, None, 1.0, None, -100)


def _public(hidden, weight, labels):
    return token_logprobs(hidden, weight, labels, return_entropy=True)


def _trl():
    if importlib.util.find_spec("trl") is None:
        raise Skip("trl is not installed")
    from trl.kernels import ChunkedLogProbFunction

    def fn(hidden, weight, labels):
        out = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, TRL_CHUNK, None, 1.0, ("entropy",))
        return out[0], out[1]

    return fn


def _setup(mode, shape, dtype, device):
    N, H, V = shape
    hidden = torch.randn(N, H, device=device, dtype=dtype).requires_grad_(mode != "fwd")
    weight = (torch.randn(V, H, device=device, dtype=dtype) / H**0.5).requires_grad_(mode == "fwd+bwd")
    labels = torch.randint(0, V, (N,), device=device)
    grads_of = [t for t in (hidden, weight) if t.requires_grad]

    def impl(provider: str) -> Impl:
        fn, env = pick(provider, eager=_naive, public=_public, spec=HIDDEN_SPEC, tensors=(hidden, weight),
                       peers={TRL: _trl})
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return fn(hidden, weight, labels)
        else:
            def call():
                logp, entropy = fn(hidden, weight, labels)
                return torch.autograd.grad(logp.sum() + entropy.sum(), grads_of)
        return Impl(call, env=env, inputs=(hidden, weight, labels), error_is_skip=provider in (COMPILE, TRL))

    return impl


def cases(config: CaseConfig) -> list[Case]:
    found = []
    for shape in SHAPES[config.sizes]:
        N, H, V = shape
        for mode, matmuls in MATMULS.items():
            for dtype in config.dtypes:
                found.append(Case(
                    op="token_logprobs", mode=mode, shape=shape, dtype=dtype,
                    bytes=(N * H + V * H) * dtype.itemsize, flops=matmuls * 2 * N * H * V,
                    providers=STANDARD + (TRL,), setup=functools.partial(_setup, mode, shape, dtype, config.device)))
    return found
