"""Cases of `token_logprobs`: log-probs and entropy of the sampled tokens from hidden states + LM head.

Shapes (N tokens, H hidden, V vocabulary): "default" = N=8192, H=4096, V=131072 and a Qwen-like
V=151936, bf16 (the issue's sizes); "small" = N=512, H=64, V=4096 for a CPU. The head is trained
("fwd+bwd") or frozen ("fwd+bwd_frozen": no weight gradient, as with LoRA). Modes ending in
"_logp" compute the log-probs only (no entropy), as Liger-Kernel and Cut Cross-Entropy do: only
there do those two run, so that every provider of a case does the same work.
Compute-bound: counted in FLOPs, read against the bf16 matmul ceiling. A fused implementation does
the N x H x V matmul once forward; forward + backward does it 4 times with a trained head (forward,
recomputed tiles, dh, dW) and 3 times with a frozen one: 2 N H V flops each.
Providers: "eager" = logits = h W^T, log_softmax, gather, entropy (the naive formula);
"compile" = torch.compile of it; "torch" / "triton" = fusedrl's function ("triton": the fused
strategy, logits tiles by `tl.dot` inside the kernels; "triton_chunked": the chunked strategy, each
vocabulary chunk's logits by cuBLAS, reduced by Triton, the default on a GPU); "trl" = TRL 1.16's
`ChunkedLogProbFunction` (its fused LM head), when trl is installed; "liger" = Liger-Kernel's
fused linear cross-entropy and "cce" = Cut Cross-Entropy's `linear_cross_entropy` (its default
implementation: the Triton "cce" kernels on a GPU, "torch_compile" on a CPU), per token
(reduction="none"; log p = -loss), when installed.
"""

from __future__ import annotations

import functools

import torch

from fusedrl.kernels import token_logprobs
from fusedrl.kernels.logprobs import hidden_reference
from fusedrl.kernels.logprobs.api import HIDDEN_SPEC
from fusedrl.kernels.logprobs.hidden_op import ENV_STRATEGY

from .. import trl_peer
from ..providers import COMPILE, STANDARD, Impl, pick, require
from . import Case, CaseConfig

SHAPES = {"default": [(8192, 4096, 131072), (8192, 4096, 151936)], "small": [(512, 64, 4096)]}
MATMULS = {"fwd": 1, "fwd+bwd": 4, "fwd+bwd_frozen": 3}
LOGP_ONLY = "_logp"
TRL, LIGER, CCE = "trl", "liger", "cce"
CHUNKED = "triton_chunked"
TRL_CHUNK = 4096
PEERS = (TRL, LIGER, CCE)


def _naive(hidden, weight, labels):
    return hidden_reference.naive(hidden, weight, labels, None, 1.0, None, -100)


def _public(hidden, weight, labels):
    return token_logprobs(hidden, weight, labels, return_entropy=True)


def _public_logp(hidden, weight, labels):
    return token_logprobs(hidden, weight, labels), None


def _trl(entropy: bool):
    ChunkedLogProbFunction = trl_peer.chunked_logprob_function()
    outputs = ("entropy",) if entropy else ()

    def fn(hidden, weight, labels):
        out = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, TRL_CHUNK, None, 1.0, outputs)
        return out[0], out[1]

    return fn


def _liger():
    require("liger_kernel", "liger-kernel")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda hidden, weight, labels: (-liger_fused_linear_cross_entropy(hidden, weight, labels,
                                                                               reduction="none"), None)


def _cce():
    require("cut_cross_entropy", "cut-cross-entropy")
    from cut_cross_entropy import linear_cross_entropy

    def fn(hidden, weight, labels):
        impl = "cce" if hidden.is_cuda else "torch_compile"
        return -linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl), None

    return fn


def _setup(mode, shape, dtype, device):
    entropy = not mode.endswith(LOGP_ONLY)
    mode = mode.removesuffix(LOGP_ONLY)
    N, H, V = shape
    hidden = torch.randn(N, H, device=device, dtype=dtype).requires_grad_(mode != "fwd")
    weight = (torch.randn(V, H, device=device, dtype=dtype) / H**0.5).requires_grad_(mode == "fwd+bwd")
    labels = torch.randint(0, V, (N,), device=device)
    grads_of = [t for t in (hidden, weight) if t.requires_grad]

    def impl(provider: str) -> Impl:
        eager = _naive if entropy else lambda h, w, y: (_naive(h, w, y)[0], None)
        peers = {TRL: lambda: _trl(entropy), LIGER: _liger, CCE: _cce}
        fn, env = pick("triton" if provider == CHUNKED else provider, eager=eager,
                       public=_public if entropy else _public_logp, spec=HIDDEN_SPEC, tensors=(hidden, weight),
                       peers=peers)
        if provider in ("triton", CHUNKED):
            env = {**env, ENV_STRATEGY: "chunked" if provider == CHUNKED else "fused"}
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return fn(hidden, weight, labels)
        else:
            def call():
                logp, ent = fn(hidden, weight, labels)
                return torch.autograd.grad(logp.sum() + (0.0 if ent is None else ent.sum()), grads_of)
        return Impl(call, env=env, inputs=(hidden, weight, labels), error_is_skip=provider in (COMPILE,) + PEERS)

    return impl


def cases(config: CaseConfig) -> list[Case]:
    found = []
    for shape in SHAPES[config.sizes]:
        N, H, V = shape
        for base, matmuls in MATMULS.items():
            ours = STANDARD + (CHUNKED,)
            for mode, providers in ((base, ours + (TRL,)), (base + LOGP_ONLY, ours + PEERS)):
                for dtype in config.dtypes:
                    found.append(Case(
                        op="token_logprobs", mode=mode, shape=shape, dtype=dtype,
                        bytes=(N * H + V * H) * dtype.itemsize, flops=matmuls * 2 * N * H * V, providers=providers,
                        setup=functools.partial(_setup, mode, shape, dtype, config.device)))
    return found
