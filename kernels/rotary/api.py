"""Public rotary embedding: validation, dispatch."""

from __future__ import annotations

import torch

from .. import dispatch
from . import reference
from .op import RotaryFunction

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SPEC = dispatch.register_op(
    dispatch.OpSpec(name="rotary", backends=(dispatch.Backend.TORCH, dispatch.Backend.TRITON))
)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    heads_first = x if unsqueeze_dim == 1 else x.transpose(1, 2)  # [B, H, S, D]
    if heads_first.stride(-1) != 1:
        heads_first = heads_first.contiguous()
    y = RotaryFunction.apply(heads_first, cos, sin)
    return y if unsqueeze_dim == 1 else y.transpose(1, 2)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of queries and keys, as transformers' `apply_rotary_pos_emb` (Llama, Qwen2/3,
    Mistral: the half-split layout) computes it.

    Args:
        q: [B, Hq, S, D] queries (unsqueeze_dim=1, transformers' layout) or [B, S, Hq, D] (unsqueeze_dim=2);
            fp32/fp16/bf16, any strides with D contiguous.
        k: the keys, [B, Hkv, S, D] or [B, S, Hkv, D].
        cos, sin: [B, S, D] or [1, S, D] (the rotary embedding module's output), D even.
        unsqueeze_dim: where cos and sin get their heads dimension: 1 or 2.

    Returns:
        (q_embed, k_embed), shaped and laid out as q and k, in the promoted dtype of each and cos. Differentiable in
        q and k; cos and sin (made without gradient by transformers) take the torch path when they require grad.

    Equivalent PyTorch:
        rotate_half = lambda x: torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    """
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (q, k as [B, H, S, D]) or 2 ([B, S, H, D]), got {unsqueeze_dim!r}")
    seq = 2 if unsqueeze_dim == 1 else 1
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[seq] != k.shape[seq] \
            or q.shape[-1] != k.shape[-1]:
        layout = "[B, H, S, D]" if unsqueeze_dim == 1 else "[B, S, H, D]"
        raise ValueError(f"q and k must be {layout} with one B, S and D, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, S, D = q.shape[0], q.shape[seq], q.shape[-1]
    if cos.shape != sin.shape or cos.ndim != 3 or cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (S, D):
        raise ValueError(f"cos and sin must both be [B, S, D] = [{B}, {S}, {D}] or [1, {S}, {D}], got cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if D % 2:
        raise ValueError(f"the head dimension D must be even (two halves rotate), got {D}")
    if cos.dtype != sin.dtype:  # the kernel's output dtype follows q and cos; sin's would have been dropped
        raise TypeError(f"cos and sin must have one dtype, got cos {cos.dtype}, sin {sin.dtype}")
    backend = dispatch.select(SPEC, [q, k, cos, sin])
    if backend is dispatch.Backend.TORCH or cos.requires_grad or sin.requires_grad:
        return reference.apply_rotary(q, k, cos, sin, unsqueeze_dim)
    cos = (cos if cos.stride(-1) == 1 else cos.contiguous()).expand(B, S, D)
    sin = (sin if sin.stride(-1) == 1 else sin.contiguous()).expand(B, S, D)
    return _rotate(q, cos, sin, unsqueeze_dim), _rotate(k, cos, sin, unsqueeze_dim)
