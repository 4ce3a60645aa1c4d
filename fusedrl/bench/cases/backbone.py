"""Cases of the decoder ops `fusedrl.patch_backbone` fuses: `rms_norm`, `silu_mul` (SwiGLU's gate) and `rotary`.

Shapes: "default" = N = 10240 tokens (8 completions x 1280, issue 7's Qwen case) over Qwen2.5-1.5B's widths (RMSNorm
H = 1536; MLP I = 8960; 12 query and 2 key heads of 128) and Llama-3.1-8B's (H = 4096; I = 14336; 32 and 8 heads
of 128), bf16; "small" = N = 256 (2 x 128), H = 64, I = 192, 4 and 2 heads of 16. Shape columns: N x width, and
for rotary B x S x query heads x key heads x D.
Modes: "fwd", "fwd+bwd" (rms_norm: x and a trained weight get gradients; silu_mul: both inputs; rotary: q, k).
Minimal bytes (e = element size): rms_norm fwd reads x and writes y, 2 N H e; fwd+bwd also reads dy and x and
writes dx, 5 N H e (the weight and its gradient are H-sized, left out). silu_mul fwd reads gate and up and writes
y, 3 N I e; fwd+bwd also reads dy, gate and up and writes both gradients, 8 N I e. rotary fwd reads q, k, cos and
sin and writes both, (2 (Hq + Hkv) + 2) N D e; fwd+bwd twice that.
Providers: "eager" = transformers' formula (Qwen2RMSNorm's seven ops; `F.silu(gate) * up`; `apply_rotary_pos_emb`
with `rotate_half`), "compile" = torch.compile of it, "torch" / "triton" = fusedrl's function with that backend
forced, "liger" = Liger-Kernel's `LigerRMSNormFunction` (casting mode "llama") / `LigerSiLUMulFunction` /
`LigerRopeFunction`, when installed.
"""

from __future__ import annotations

import functools

import torch

from fusedrl.kernels import apply_rotary, rms_norm, silu_mul
from fusedrl.kernels.rms_norm import reference as rms_reference
from fusedrl.kernels.rms_norm.api import SPEC as RMS_SPEC
from fusedrl.kernels.rotary import reference as rotary_reference
from fusedrl.kernels.rotary.api import SPEC as ROTARY_SPEC
from fusedrl.kernels.swiglu import reference as swiglu_reference
from fusedrl.kernels.swiglu.api import SPEC as SWIGLU_SPEC

from ..providers import COMPILE, EAGER, Impl, pick, require
from . import Case, CaseConfig

N_TOKENS = {"default": 10240, "small": 256}
NORM_WIDTHS = {"default": (1536, 4096), "small": (64,)}
MLP_WIDTHS = {"default": (8960, 14336), "small": (192,)}
ROTARY_SHAPES = {"default": ((8, 1280, 12, 2, 128), (8, 1280, 32, 8, 128)), "small": ((2, 128, 4, 2, 16),)}
MODES = ("fwd", "fwd+bwd")
LIGER = "liger"
PROVIDERS = (EAGER, COMPILE, "torch", "triton", LIGER)
EPS = 1e-6
STREAMS = {("rms_norm", "fwd"): 2, ("rms_norm", "fwd+bwd"): 5, ("silu_mul", "fwd"): 3, ("silu_mul", "fwd+bwd"): 8}


def _liger_rms_norm():
    require("liger_kernel", "liger-kernel")
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama")


def _liger_silu_mul():
    require("liger_kernel", "liger-kernel")
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply


def _liger_rotary():
    require("liger_kernel", "liger-kernel")
    from liger_kernel.ops.rope import LigerRopeFunction

    return lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin)


def _rotary_inputs(shape, dtype, device, grad):
    """q, k as a transformers attention module has them (a projection's output viewed as [B, H, S, D]); the tables
    as its rotary embedding makes them."""
    B, S, Hq, Hkv, D = shape
    q, k = (torch.randn(B, S, H * D, device=device, dtype=dtype).view(B, S, H, D).transpose(1, 2).requires_grad_(grad)
            for H in (Hq, Hkv))
    freqs = torch.arange(S, device=device)[:, None] * (1e4 ** (-torch.arange(0, D, 2, device=device) / D))
    emb = torch.cat((freqs, freqs), dim=-1).expand(B, S, D)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


def _setup(op: str, mode: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    grad = mode == "fwd+bwd"
    if op == "rotary":
        inputs = _rotary_inputs(shape, dtype, device, grad)
        grads_of, outs = inputs[:2], [torch.randn_like(t) for t in inputs[:2]]
        fn_args = dict(eager=rotary_reference.apply_rotary, public=apply_rotary, spec=ROTARY_SPEC,
                       peers={LIGER: _liger_rotary})
        return _impl(inputs, grads_of, outs, grad, fn_args)
    N, W = shape
    if op == "rms_norm":
        inputs = (torch.randn(N, W, device=device, dtype=dtype).requires_grad_(grad),
                  (1 + 0.1 * torch.randn(W, device=device)).to(dtype).requires_grad_(grad))
        eager = lambda x, w: rms_reference.rms_norm(x, w, EPS)
        public, spec, liger = (lambda x, w: rms_norm(x, w, EPS)), RMS_SPEC, _liger_rms_norm
    else:
        inputs = tuple(torch.randn(N, W, device=device, dtype=dtype).requires_grad_(grad) for _ in range(2))
        eager, public, spec, liger = swiglu_reference.silu_mul, silu_mul, SWIGLU_SPEC, _liger_silu_mul
    fn_args = dict(eager=eager, public=public, spec=spec, peers={LIGER: liger})
    return _impl(inputs, inputs, [torch.randn(N, W, device=device, dtype=dtype)], grad, fn_args)


def _impl(inputs, grads_of, outs, grad: bool, fn_args: dict):
    def impl(provider: str) -> Impl:
        fn, env = pick(provider, tensors=inputs, **fn_args)
        if grad:
            def call():
                return torch.autograd.grad(fn(*inputs), grads_of, outs)
        else:
            def call():
                with torch.no_grad():
                    return fn(*inputs)
        return Impl(call, env=env, inputs=(*inputs, *outs), error_is_skip=provider in (COMPILE, LIGER))

    return impl


def cases(config: CaseConfig) -> list[Case]:
    N = N_TOKENS[config.sizes]
    found = []
    for op, widths in (("rms_norm", NORM_WIDTHS), ("silu_mul", MLP_WIDTHS)):
        for W in widths[config.sizes]:
            for mode in MODES:
                for dtype in config.dtypes:
                    found.append(Case(op=op, mode=mode, shape=(N, W), dtype=dtype,
                                      bytes=STREAMS[op, mode] * N * W * dtype.itemsize, providers=PROVIDERS,
                                      setup=functools.partial(_setup, op, mode, (N, W), dtype, config.device)))
    for shape in ROTARY_SHAPES[config.sizes]:
        B, S, Hq, Hkv, D = shape
        for mode in MODES:
            for dtype in config.dtypes:
                found.append(Case(op="rotary", mode=mode, shape=shape, dtype=dtype,
                                  bytes=(2 if mode == "fwd" else 4) * (Hq + Hkv + 1) * B * S * D * dtype.itemsize,
                                  providers=PROVIDERS,
                                  setup=functools.partial(_setup, "rotary", mode, shape, dtype, config.device)))
    return found
