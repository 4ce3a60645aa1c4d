"""The fused diffusion-step custom ops: `fusedrl::diffusion_step_fwd` and `fusedrl::diffusion_step_bwd`.

They take only tensors and plain scalars (torch.library custom ops accept no generator, no
float-or-tensor union, no optional or aliasing outputs) and run the Triton kernels or the CUDA
extension, as the `backend` argument says. Absent outputs come back as empty tensors; `api.py`
turns them into None. Fake (meta) implementations are registered and `DiffusionStep` (an
autograd.Function) pairs the two ops, so `torch.compile` traces through a step and its backward.

Layout: x, m, noise, given, ref are [B, D] contiguous; p0, p1 are [B] fp32.
"""

from __future__ import annotations

import torch

from ..device_guard import on_inputs_device
from . import triton_kernels as tk

EMPTY = (0,)


def _empty(like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return like.new_empty(EMPTY, dtype=dtype)


# ----------------------------------------------------------------------------- Triton launchers


def _triton_fwd(x, m, p0, p1, noise, given, ref, mode, pred, level, sigma_max, clip, clipped_eps,
                want_logp, out_dtype):
    B, D = x.shape
    C = triton_cdiv(D, tk.CHUNK)
    sampled = noise is not None
    mean = torch.empty((B, D), device=x.device, dtype=out_dtype)
    prev = torch.empty((B, D), device=x.device, dtype=out_dtype) if sampled else _empty(x, out_dtype)
    part = torch.empty((B, 2, C), device=x.device, dtype=torch.float32)
    std = torch.empty((B,), device=x.device, dtype=torch.float32)
    logp = torch.empty((B,), device=x.device, dtype=torch.float32) if want_logp else _empty(x)
    kl = torch.empty((B,), device=x.device, dtype=torch.float32) if ref is not None else _empty(x)
    consts = dict(MODE=mode, PRED=pred, HAS_CLIP=clip > 0, CLIPPED_EPS=clipped_eps)
    tk._step_fwd_kernel[(B, C)](
        x, m, p0, p1, noise if sampled else x, given if given is not None else x, ref if ref is not None else x,
        prev if sampled else mean, mean, part,
        D, C, level, sigma_max, clip,
        SAMPLED=sampled, HAS_REF=ref is not None, WANT_LOGP=want_logp,
        BLOCK=tk.BLOCK, ITERS=tk.ITERS, num_warps=tk.NUM_WARPS, **consts,
    )
    tk._step_finish_kernel[(B,)](
        p0, p1, part, logp if want_logp else std, kl if ref is not None else std, std,
        D, C, level, sigma_max,
        HAS_REF=ref is not None, WANT_LOGP=want_logp, BLOCK_C=min(1024, triton_next_pow2(C)), **consts,
    )
    return prev, mean, logp, kl, std


def _triton_bwd(x, m, p0, p1, noise, given, ref, g_prev, g_mean, g_logp, g_kl, mode, pred, level,
                sigma_max, clip, clipped_eps, need_g_ref):
    B, D = x.shape
    C = triton_cdiv(D, tk.CHUNK)
    gx = torch.empty_like(x)
    gm = torch.empty_like(m)
    # the kernel writes gref with the KL term's gradient; without one it is zero (as the CUDA launcher gives it)
    gref = (torch.empty_like if g_kl is not None else torch.zeros_like)(ref) if need_g_ref else _empty(x)
    tk._step_bwd_kernel[(B, C)](
        x, m, p0, p1, noise if noise is not None else x, given if given is not None else x,
        ref if ref is not None else x,
        g_prev if g_prev is not None else x, g_mean if g_mean is not None else x,
        g_logp if g_logp is not None else p0, g_kl if g_kl is not None else p0,
        gx, gm, gref if need_g_ref else gx,
        D, level, sigma_max, clip,
        MODE=mode, PRED=pred, HAS_CLIP=clip > 0, CLIPPED_EPS=clipped_eps, SAMPLED=noise is not None,
        HAS_G_PREV=g_prev is not None, HAS_G_MEAN=g_mean is not None, HAS_G_LOGP=g_logp is not None,
        HAS_G_KL=g_kl is not None, NEED_G_REF=need_g_ref,
        BLOCK=tk.BLOCK, ITERS=tk.ITERS, num_warps=tk.NUM_WARPS,
    )
    return gx, gm, gref


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fusedrl::diffusion_step_fwd", mutates_args=())
@on_inputs_device
def diffusion_step_fwd(
    x: torch.Tensor, m: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor,
    noise: torch.Tensor | None, given: torch.Tensor | None, ref: torch.Tensor | None,
    mode: int, pred: int, level: float, sigma_max: float, clip: float, clipped_eps: bool,
    want_logp: bool, out_dtype: torch.dtype, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (prev [B, D] or empty, mean [B, D], logp [B] or empty, kl [B] or empty, std [B])."""
    args = (x, m, p0, p1, noise, given, ref, mode, pred, level, sigma_max, clip, clipped_eps, want_logp, out_dtype)
    if backend == "cuda":
        from .. import cuda_ext

        return tuple(cuda_ext.ops().diffusion_step_fwd(*args))
    return _triton_fwd(*args)


@diffusion_step_fwd.register_fake
def _(x, m, p0, p1, noise, given, ref, mode, pred, level, sigma_max, clip, clipped_eps, want_logp, out_dtype,
      backend):
    B, D = x.shape
    prev = x.new_empty((B, D) if noise is not None else EMPTY, dtype=out_dtype)
    mean = x.new_empty((B, D), dtype=out_dtype)
    logp = x.new_empty((B,) if want_logp else EMPTY, dtype=torch.float32)
    kl = x.new_empty((B,) if ref is not None else EMPTY, dtype=torch.float32)
    return prev, mean, logp, kl, x.new_empty((B,), dtype=torch.float32)


@torch.library.custom_op("fusedrl::diffusion_step_bwd", mutates_args=())
@on_inputs_device
def diffusion_step_bwd(
    x: torch.Tensor, m: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor,
    noise: torch.Tensor | None, given: torch.Tensor | None, ref: torch.Tensor | None,
    g_prev: torch.Tensor | None, g_mean: torch.Tensor | None,
    g_logp: torch.Tensor | None, g_kl: torch.Tensor | None,
    mode: int, pred: int, level: float, sigma_max: float, clip: float, clipped_eps: bool,
    need_g_ref: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad x [B, D] in x.dtype, grad m [B, D] in m.dtype, grad ref [B, D] or empty)."""
    args = (x, m, p0, p1, noise, given, ref, g_prev, g_mean, g_logp, g_kl, mode, pred, level, sigma_max, clip,
            clipped_eps, need_g_ref)
    if backend == "cuda":
        from .. import cuda_ext

        return tuple(cuda_ext.ops().diffusion_step_bwd(*args))
    return _triton_bwd(*args)


@diffusion_step_bwd.register_fake
def _(x, m, p0, p1, noise, given, ref, g_prev, g_mean, g_logp, g_kl, mode, pred, level, sigma_max, clip,
      clipped_eps, need_g_ref, backend):
    gref = torch.empty_like(ref) if need_g_ref else x.new_empty(EMPTY, dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(m), gref


def _present(g: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None or g.numel() == 0 else g.contiguous()


class DiffusionStep(torch.autograd.Function):
    """Autograd over the two custom ops.

    An autograd.Function rather than `torch.library.register_autograd`: on every forward the latter
    re-reads the op schema argument by argument (`fill_defaults`, quadratic in the 16 arguments),
    measured at 68 us per call on this project's 2-core CI machine, more than the step's own GPU
    time at SD1.5 sizes. torch.compile traces this Function and the custom ops inside it alike.
    """

    @staticmethod
    def forward(ctx, x, m, p0, p1, noise, given, ref, mode, pred, level, sigma_max, clip, clipped_eps,
                want_logp, out_dtype, backend):
        prev, mean, logp, kl, std = diffusion_step_fwd(
            x, m, p0, p1, noise, given, ref, mode, pred, level, sigma_max, clip, clipped_eps, want_logp, out_dtype,
            backend)
        ctx.save_for_backward(x, m, p0, p1, noise, given, ref)
        ctx.scalars = (mode, pred, level, sigma_max, clip, clipped_eps)
        ctx.backend = backend
        ctx.sampled = noise is not None
        ctx.want_logp = want_logp
        ctx.mark_non_differentiable(std)
        return prev, mean, logp, kl, std

    @staticmethod
    def backward(ctx, g_prev, g_mean, g_logp, g_kl, g_std):
        x, m, p0, p1, noise, given, ref = ctx.saved_tensors
        need_g_ref = ref is not None and ctx.needs_input_grad[6]
        gx, gm, gref = diffusion_step_bwd(
            x, m, p0, p1, noise, given, ref,
            _present(g_prev) if ctx.sampled else None, _present(g_mean),
            _present(g_logp) if ctx.want_logp else None, _present(g_kl) if ref is not None else None,
            *ctx.scalars, need_g_ref, ctx.backend,
        )
        return (gx, gm, None, None, None, None, gref if need_g_ref else None) + (None,) * 9
