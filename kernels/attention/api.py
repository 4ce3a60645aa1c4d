"""Public attention function: validation, dispatch, the torch path."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import dispatch
from ..tiles import DeviceLimits, device_limits
from . import reference, xformers_path
from .op import FlashAttention
from .triton_kernels import MAX_HEAD_DIM

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _supports(tensors, backend: dispatch.Backend) -> str | None:
    """None when the Triton kernels serve (q, k, v), else why not. dtype (fp64) and device are checked by
    dispatch before this: "dtype torch.float64 is not supported by the triton kernels"."""
    if backend is not dispatch.Backend.TRITON:
        return None
    q = tensors[0]
    D = q.shape[-1] if q.ndim else 0
    if D > MAX_HEAD_DIM:
        return f"head dim D={D} is larger than the Triton kernels' maximum of {MAX_HEAD_DIM}"
    if any(t.dtype == torch.float64 for t in tensors):
        return "fp64 inputs run on the torch path (the kernels compute in fp32)"
    return None


def sdpa_is_faster(device_type: str, dtype: torch.dtype, limits: DeviceLimits, *, return_lse: bool,
                   key_padding_mask_given: bool, causal: bool, Nq: int, Nkv: int) -> bool:
    """True where the auto-selected Triton kernels give way to the torch path (SDPA): CUDA fp16/bf16 on
    Hopper or newer, when SDPA's own fast paths take the call (no lse wanted, no key padding mask, causal
    only when square). There torch picks cuDNN's attention, which measured faster than these kernels on an
    H200 (benchmarks/results/2026-11-27_H200_all_run1.csv: the Triton forward at 0.6-0.84x cuDNN's speed,
    forward + backward at 0.43-0.78x). `FUSEDRL_BACKEND=triton` still forces the kernels."""
    return (device_type == "cuda" and dtype in (torch.float16, torch.bfloat16) and limits.is_hopper_or_newer
            and not return_lse and not key_padding_mask_given and (not causal or Nq == Nkv))


# The checkpointing hook: None, except while a "save_attention" region of `fusedrl.engine.checkpointing` is
# active on some thread (kernels never import engine; the engine sets and clears it). Called instead of
# `FlashAttention.apply` on the Triton path as hook(q, k, v, key_padding_mask, causal, scale, backend) ->
# (out, lse), or None to let the call run as usual; it records the call's (out, lse) in the region's forward
# and replays them through `FlashAttention.apply(..., saved=(out, lse))` in its recompute.
checkpoint_hook = None

SPEC = dispatch.register_op(dispatch.OpSpec(name="flash_attention",
                                            backends=(dispatch.Backend.TORCH, dispatch.Backend.TRITON),
                                            supports=_supports))


def _check(q, k, v, causal, scale, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D], got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, Nkv, D], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    B, Hq, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}: batch and head dim must agree")
    if D == 0:
        raise ValueError("head dim D must be >= 1")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"q has {Hq} heads, k/v have {k.shape[1]}: the query heads must be a multiple of the "
                         "key/value heads (grouped-query attention)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be a finite float > 0 or None, got {scale!r}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor [B, Nkv] (True = a real key), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape [B, Nkv] = [{B}, {k.shape[2]}], got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


def _may_have_empty_rows(Nq: int, Nkv: int, causal: bool, key_padding_mask) -> bool:
    return key_padding_mask is not None or (causal and Nq > Nkv) or Nkv == 0


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        dispatch.log.debug("fusedrl: flash_attention's torch path: %s", message)


def attention_torch(q, k, v, *, causal: bool, scale: float, key_padding_mask, return_lse: bool):
    """The torch backend: on CUDA xformers when it works here (`xformers_path.why_not`), else SDPA
    (any of its backends) with an explicit bottom-right mask, or a chunked fp32 formula when the
    log-sum-exp is wanted (neither returns it)."""
    if q.device.type == "cuda":
        reason = xformers_path.why_not(q, key_padding_mask, return_lse)
        if reason is None:
            return xformers_path.attention(q, k, v, causal=causal, scale=scale), None
        _say_once(f"not xformers: {reason}")
    if return_lse:
        return reference.attention_chunked(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    Nq, Nkv = q.shape[-2], k.shape[-2]
    mask = reference.visible(Nq, Nkv, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    if causal and Nq == Nkv and key_padding_mask is None:
        mask = None  # SDPA's own causal path (top-left equals bottom-right for square problems)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    if mask is not None and _may_have_empty_rows(Nq, Nkv, causal, key_padding_mask):
        out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    return out, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that saves only its output and the row log-sum-exp for the backward.

    Args:
        q: [B, Hq, Nq, D] queries, fp16/bf16/fp32 (fp64 runs the torch path).
        k, v: [B, Hkv, Nkv, D] keys and values; Hq must be a multiple of Hkv (grouped-query
            attention: query head h uses key/value head h // (Hq // Hkv)). Nkv may differ from Nq
            (cross-attention, KV cache).
        causal: query i sees key j iff j <= i + (Nkv - Nq), aligned bottom-right as in flash-attn.
        scale: the score scale, default D ** -0.5.
        key_padding_mask: optional [B, Nkv] bool, True for real keys; padded keys are never seen.
        return_lse: also return the fp32 log-sum-exp of the scaled, masked scores.

    Returns:
        out [B, Hq, Nq, D] in q's dtype, or (out, lse [B, Hq, Nq] fp32, fp64 for fp64 input). A query that sees no key
        (all its keys padded, or causal with Nq > Nkv for the first rows) gets out = 0, lse = -inf.
        Both are differentiable in q, k, v (a loss may use lse too).

    Backends: Triton (CUDA tensors, fp16/bf16/fp32, D <= 256: `triton_kernels.py`, through the custom ops
    `fusedrl::flash_attention_fwd` / `_bwd` of `op.py`; fp32 dots follow torch's TF32 matmul setting) or
    torch (CPU, fp64, D > 256: on CUDA xformers' memory-efficient attention when it is installed and its
    C++ library loads, else SDPA with an explicit bottom-right mask; a chunked fp32 formula when lse is
    wanted). An auto-selected Triton that cannot serve the inputs falls back to torch; a forced
    `FUSEDRL_BACKEND=triton` raises a RuntimeError that says why. On Hopper (sm_90+) CUDA fp16/bf16
    calls that want no lse and pass no key padding mask take the torch path unless Triton is forced:
    SDPA's cuDNN kernels measured faster there (`sdpa_is_faster`).

    Equivalent PyTorch (Hq == Hkv, no mask):
        p = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, -1)
        out = (p @ v.float()).to(q.dtype); lse = torch.logsumexp(q @ k^T * scale, -1)
    """
    _check(q, k, v, causal, scale, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tensors = [q, k, v]
    backend = dispatch.select(SPEC, tensors)
    if (backend is dispatch.Backend.TRITON and dispatch.forced_backend() is None
            and sdpa_is_faster(q.device.type, q.dtype, device_limits(q.device), return_lse=return_lse,
                               key_padding_mask_given=key_padding_mask is not None, causal=causal,
                               Nq=q.shape[-2], Nkv=k.shape[-2])):
        _say_once("CUDA fp16/bf16 on Hopper: SDPA (cuDNN) measured faster than the Triton kernels")
        backend = dispatch.Backend.TORCH
    if backend is dispatch.Backend.TORCH:
        out, lse = attention_torch(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                   return_lse=return_lse)
    else:
        hook = checkpoint_hook
        served = None if hook is None else hook(q, k, v, key_padding_mask, causal, scale, backend.value)
        out, lse = served if served is not None else FlashAttention.apply(q, k, v, key_padding_mask, causal, scale,
                                                                          backend.value)
    return (out, lse) if return_lse else out
