"""Cases of `grpo_loss`: the per-token GRPO loss over one micro-batch of completions.

Shapes: "default" = B=64 completions x T=2048 tokens (131k tokens); "small" = 16 x 512.
Loss: "dapo" with a k3 KL term (beta 0.04) and TRL's bias correction, token-level ratios,
advantages per sequence: the defaults of a TRL GRPO run with a reference model.
Modes: "fwd" (the loss and its metrics), "fwd+bwd" (and its gradient to the log-probs).
Minimal bytes (fp32 inputs, a bool mask): fwd reads logp, old_logp, ref_logp (4 bytes each) and the mask (1)
-> 13 B T; fwd+bwd also writes dloss/dlogp -> 17 B T. (Rows measured before 2026-11-28 counted the mask as 4
bytes: 16 and 20 B T, their GB/s 23% and 18% high.)
Providers: "eager" = TRL's formula in torch (`reference.grpo_loss`), "compile" = torch.compile of
it, "torch" / "triton" = fusedrl's function with that backend forced ("cuda" skips: no CUDA kernel yet).
"""

from __future__ import annotations

import functools

import torch

from fusedrl.kernels import grpo_loss
from fusedrl.kernels.grpo_loss import reference
from fusedrl.kernels.grpo_loss.api import SPEC

from ..providers import COMPILE, STANDARD, Impl, pick
from . import Case, CaseConfig

SHAPES = {"default": (64, 2048), "small": (16, 512)}
MODES = ("fwd", "fwd+bwd")
BYTES_PER_TOKEN = {"fwd": 13, "fwd+bwd": 17}
OPTIONS = dict(beta=0.04, loss_type="dapo", eps_low=0.2, eps_high=0.28, delta=None, importance_level="token",
               use_bias_correction_kl=True, kl_estimator="k3", max_len=None, num_items=None, sapo_tau=(1.0, 1.05),
               entropy=None)


def _eager(logp, old, adv, mask, ref):
    return reference.grpo_loss(logp, old, adv, mask, ref_logp=ref, **OPTIONS)


def _public(logp, old, adv, mask, ref):
    return grpo_loss(logp, old, adv, mask, ref_logp=ref, **OPTIONS)


def _setup(mode, shape, device):
    B, T = shape
    logp = (-torch.rand(shape, device=device) * 3).requires_grad_(mode == "fwd+bwd")
    old = logp.detach() + 0.1 * torch.randn(shape, device=device)
    ref = logp.detach() + 0.1 * torch.randn(shape, device=device)
    adv = torch.randn(B, device=device)
    mask = torch.rand(shape, device=device) > 0.2
    args = (logp, old, adv, mask, ref)

    def impl(provider: str) -> Impl:
        fn, env = pick(provider, eager=_eager, public=_public, spec=SPEC, tensors=(logp,))
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    return fn(*args)
        else:
            def call():
                return torch.autograd.grad(fn(*args)[0], logp)
        return Impl(call, env=env, inputs=args, error_is_skip=provider == COMPILE)

    return impl


def cases(config: CaseConfig) -> list[Case]:
    shape = SHAPES[config.sizes]
    return [
        Case(op="grpo_loss", mode=mode, shape=shape, dtype=torch.float32,
             bytes=BYTES_PER_TOKEN[mode] * shape[0] * shape[1], providers=STANDARD,
             setup=functools.partial(_setup, mode, shape, config.device))
        for mode in MODES
    ]
