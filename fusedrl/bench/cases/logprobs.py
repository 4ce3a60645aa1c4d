"""Cases of `logprobs_from_logits`: log-probability of the sampled token and entropy per position.

Shapes: "default" = one GRPO micro-batch of a Qwen-size vocabulary, B=4 x T=2048 x V=151936 (bf16
logits are 2.5 GB); "small" = B=2 x T=256 x V=32000 for a CPU.
Modes: "fwd" (rollout scoring: no grad), "fwd+bwd" (training: gradient of logp.sum() + entropy.sum()
with respect to the logits).
Minimal bytes (e = bytes per logit): fwd reads the logits once -> N V e; fwd+bwd also reads them
again and writes their gradient -> 3 N V e ([N] vectors ignored).
Providers: "eager" = `log_softmax(logits.float() / T).gather(...)` and `-(p log p).sum(-1)`, the plain
formula (`reference.naive`); "compile" = torch.compile of it; "torch" / "triton" / "cuda" =
fusedrl's function with that backend forced; "trl" = TRL's `selective_log_softmax` +
`entropy_from_logits` when trl is installed.
"""

from __future__ import annotations

import functools

import torch

from fusedrl.kernels import logprobs_from_logits
from fusedrl.kernels.logprobs import reference
from fusedrl.kernels.logprobs.api import SPEC

from ..providers import COMPILE, STANDARD, Impl, pick, require
from . import Case, CaseConfig

SHAPES = {"default": (4, 2048, 151936), "small": (2, 256, 32000)}
MODES = ("fwd", "fwd+bwd")
BYTES_PER_LOGIT = {"fwd": 1, "fwd+bwd": 3}
TRL = "trl"


def _naive(logits, labels):
    logp, entropy = reference.naive(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), 1.0, -100)
    return logp, entropy


def _trl_fn():
    require("trl")
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    return lambda logits, labels: (selective_log_softmax(logits, labels), entropy_from_logits(logits))


def _public(logits, labels):
    return logprobs_from_logits(logits, labels, return_entropy=True)


def _setup(mode, shape, dtype, device):
    B, T, V = shape
    logits = torch.randn(shape, device=device, dtype=dtype).mul_(3).requires_grad_(mode == "fwd+bwd")
    labels = torch.randint(0, V, (B, T), device=device)

    def impl(provider: str) -> Impl:
        fn, env = pick(provider, eager=_naive, public=_public, spec=SPEC, tensors=(logits,),
                       peers={TRL: _trl_fn})
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return fn(logits, labels)
        else:
            def call():
                logp, entropy = fn(logits, labels)
                return torch.autograd.grad(logp.sum() + entropy.sum(), logits)
        return Impl(call, env=env, inputs=(logits, labels), error_is_skip=provider == COMPILE)

    return impl


def cases(config: CaseConfig) -> list[Case]:
    shape = SHAPES[config.sizes]
    B, T, V = shape
    return [
        Case(op="logprobs_from_logits", mode=mode, shape=shape, dtype=dtype,
             bytes=BYTES_PER_LOGIT[mode] * B * T * V * dtype.itemsize, providers=STANDARD + (TRL,),
             setup=functools.partial(_setup, mode, shape, dtype, config.device))
        for mode in MODES for dtype in config.dtypes
    ]
