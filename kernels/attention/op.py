"""Custom ops `fusedrl::flash_attention_fwd` -> (out, lse) and `fusedrl::flash_attention_bwd` ->
(dq, dk, dv) over the Triton kernels, with fake (meta) implementations, paired for autograd by
`FlashAttention`, so that torch.compile traces a call and its backward.

The forward op's name is part of the contract: a selective activation-checkpointing policy saves the
outputs of `torch.ops.fusedrl.flash_attention_fwd` by that name (out and the fp32 lse are all that the
backward needs besides q, k, v), so recomputation never reruns the attention forward. The engine's
"save_attention" policy does the same without a dispatch mode, through `FlashAttention`'s `saved`
argument (replay) and `api.checkpoint_hook`.

Layout: q [B, Hq, Nq, D], k / v [B, Hkv, Nkv, D], any strides (a non-unit stride of the head dim is
made contiguous first); key_padding_mask [B, Nkv] bool or None. Outputs are contiguous: out [B, Hq,
Nq, D] in q's dtype, lse [B, Hq, Nq] fp32; dq / dk / dv contiguous in the inputs' dtype.
"""

from __future__ import annotations

import torch

from ..device_guard import on_inputs_device
from ..tiles import device_limits
from . import triton_kernels as tk

LOG2E = tk.LOG2E


def _check_backend(backend: str) -> None:
    if backend != "triton":
        raise RuntimeError(f"flash_attention has no {backend!r} kernels (only triton); dispatch should not pick it")


def _head_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def config_for(q: torch.Tensor) -> tk.AttnConfig:
    """The tiles for q's device and dtype, decided at call time (never at import) from the device's properties
    (`kernels.tiles.device_limits`)."""
    if q.device.type != "cuda":  # the CPU interpreter
        return tk.tile_config(q.shape[-1], q.element_size(), None)
    limits = device_limits(q.device)
    return tk.tile_config(q.shape[-1], q.element_size(), limits.capability, limits.shared_memory)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 inputs follow torch's matmul setting (exact "ieee" by default, "tf32"
    after `torch.backends.cuda.matmul.allow_tf32 = True` / `set_float32_matmul_precision("high")`),
    so that fusedrl matches the precision of the torch formula it replaces. 16-bit inputs ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _kpm_arg(key_padding_mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    if key_padding_mask is None:
        return like, 0
    # bool and uint8 share a layout; Triton reads 0 / 1 bytes, a row's keys at stride 1 (a sliced or transposed
    # mask is made contiguous: only its row stride is passed)
    kpm = key_padding_mask.contiguous().view(torch.uint8)
    return kpm, kpm.stride(0)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fusedrl::flash_attention_fwd", mutates_args=())
@on_inputs_device
def flash_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
    causal: bool, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] fp32), both contiguous."""
    _check_backend(backend)
    q, k, v = (_head_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    out = torch.empty((B, Hq, Nq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Nq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    cfg = config_for(q)
    t = cfg.fwd
    kpm, stride_kpm = _kpm_arg(key_padding_mask, q)
    grid = (B * Hq * ((Nq + t.block_m - 1) // t.block_m),)
    tk._attn_fwd_kernel[grid](
        q, k, v, kpm, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), stride_kpm,
        Hq, Nq, Nkv, D, Hq // Hkv, scale * LOG2E,
        CAUSAL=causal, HAS_KPM=key_padding_mask is not None, DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=cfg.block_d, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out, lse


@flash_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, causal, scale, backend):
    B, Hq, Nq, D = q.shape
    return q.new_empty((B, Hq, Nq, D)), q.new_empty((B, Hq, Nq), dtype=torch.float32)


@torch.library.custom_op("fusedrl::flash_attention_bwd", mutates_args=())
@on_inputs_device
def flash_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: torch.Tensor | None, key_padding_mask: torch.Tensor | None, causal: bool, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq like q, dk like k, dv like v), contiguous. dlse: the gradient reaching lse, or None."""
    _check_backend(backend)
    q, k, v, out, dout = (_head_dim_contiguous(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    if q.numel() == 0 or k.numel() == 0:  # nothing attends: every gradient is 0
        return q.new_zeros((B, Hq, Nq, D)), k.new_zeros((B, Hkv, Nkv, D)), v.new_zeros((B, Hkv, Nkv, D))
    # every element is written by exactly one program: no memset
    dq = torch.empty((B, Hq, Nq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Hkv, Nkv, D), device=k.device, dtype=k.dtype)
    dv = torch.empty((B, Hkv, Nkv, D), device=v.device, dtype=v.dtype)
    cfg = config_for(q)
    group = Hq // Hkv
    prec = dot_precision(q.dtype)
    kpm, stride_kpm = _kpm_arg(key_padding_mask, q)
    has_kpm = key_padding_mask is not None
    qk_scale = scale * LOG2E

    delta = torch.empty((B, Hq, Nq), device=q.device, dtype=torch.float32)
    pre = 64
    tk._attn_bwd_preprocess_kernel[(B * Hq * ((Nq + pre - 1) // pre),)](
        out, dout, dlse.contiguous() if dlse is not None else lse, delta,
        *_strides(out), *_strides(dout), Hq, Nq, D,
        HAS_DLSE=dlse is not None, BLOCK_M=pre, BLOCK_D=cfg.block_d,
    )
    t = cfg.dkdv
    tk._attn_bwd_dkdv_kernel[(B * Hkv * ((Nkv + t.block_n - 1) // t.block_n),)](
        q, k, v, kpm, dout, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), stride_kpm,
        Hq, Hkv, Nq, Nkv, D, group, qk_scale, scale,
        CAUSAL=causal, HAS_KPM=has_kpm, DOT_PRECISION=prec,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=cfg.block_d, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    t = cfg.dq
    tk._attn_bwd_dq_kernel[(B * Hq * ((Nq + t.block_m - 1) // t.block_m),)](
        q, k, v, kpm, dout, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), stride_kpm,
        Hq, Nq, Nkv, D, group, qk_scale, scale,
        CAUSAL=causal, HAS_KPM=has_kpm, DOT_PRECISION=prec,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=cfg.block_d, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return dq, dk, dv


@flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, key_padding_mask, causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class FlashAttention(torch.autograd.Function):
    """(q, k, v, key_padding_mask, causal, scale, backend[, saved]) -> (out, lse); differentiable in q, k, v
    through out and lse both (a gradient reaching lse enters the backward as delta -= dlse).

    saved: the replay entry point of activation checkpointing ("save_attention" in
    `fusedrl.engine.checkpointing`): the (out, lse) of an earlier call with the same inputs, returned (as
    new aliases) instead of running the forward kernel. The node then saves exactly what a computed call
    saves (q, k, v, out, lse, key_padding_mask, in that order), which non-reentrant checkpointing requires
    of a recompute: it matches the recomputed saved tensors to the forward's by position."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal, scale, backend, saved=None):
        if saved is None:
            out, lse = flash_attention_fwd(q, k, v, key_padding_mask, causal, scale, backend)
        else:
            out, lse = saved[0].detach(), saved[1].detach()
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.args = (causal, scale, backend)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None, None, None, None, None
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = flash_attention_bwd(dout, q, k, v, out, lse, dlse, key_padding_mask, *ctx.args)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                None, None, None, None, None)
