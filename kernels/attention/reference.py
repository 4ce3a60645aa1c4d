"""Torch attention: the float64 oracle for tests and the CPU path of `flash_attention`.

Masking rules, shared by every backend:
- causal, aligned bottom-right as in flash-attn: query i (of Nq) sees key j (of Nkv) iff
  j <= i + (Nkv - Nq). With Nq == Nkv that is the usual lower triangle; with Nq < Nkv (decoding
  with a KV cache) the last query sees every key. SDPA's `is_causal` aligns top-left instead.
- key_padding_mask [B, Nkv] bool: True = a real key, False = padding that no query sees.
- A query row that sees no key at all has output 0 and lse = -inf, and passes no gradient.
"""

from __future__ import annotations

import torch


def visible(Nq: int, Nkv: int, *, causal: bool, key_padding_mask: torch.Tensor | None,
            device: torch.device) -> torch.Tensor | None:
    """Bool mask [B or 1, 1, Nq, Nkv] of the (query, key) pairs that attend, or None when all do."""
    mask = None
    if causal:
        q_idx = torch.arange(Nq, device=device)[:, None]
        k_idx = torch.arange(Nkv, device=device)[None, :]
        mask = (k_idx <= q_idx + (Nkv - Nq))[None, None]
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


def expand_kv(k: torch.Tensor, Hq: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hq, N, D]: each K/V head serves Hq // Hkv consecutive query heads."""
    groups = Hq // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        scale: float | None = None,
                        key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq]) by the plain formula, in q's dtype
    (pass float64 for the oracle). Materializes the [Nq, Nkv] scores: for tests and small inputs."""
    Nq, Nkv, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = visible(Nq, Nkv, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - (-inf)) is NaN on rows that see nothing: give them probability 0 instead.
    probs = torch.where(torch.isfinite(lse)[..., None], torch.exp(scores - lse[..., None]), 0.0)
    return torch.matmul(probs, v), lse


def attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                      key_padding_mask: torch.Tensor | None,
                      rows_per_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_reference` in fp32 math (fp64 for fp64 input), a block of query rows at a time, so
    that the scores held at once are [B, Hq, rows_per_chunk, Nkv]. Differentiable through autograd
    (it keeps each block's probabilities for the backward: the CPU path, not a memory-lean one)."""
    Nq, Nkv = q.shape[-2], k.shape[-2]
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for start in range(0, max(Nq, 1), rows_per_chunk):
        stop = min(start + rows_per_chunk, Nq)
        # Rows [start, stop) of the bottom-right causal mask are the last rows of an (Nkv - Nq + stop)-query
        # problem; slicing the full mask keeps that alignment.
        q_blk = q[:, :, start:stop].to(math_dtype)
        scores = torch.matmul(q_blk, expand_kv(k, q.shape[1]).to(math_dtype).transpose(-1, -2)) * scale
        mask = visible(Nq, Nkv, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
        if mask is not None:
            mask = mask[:, :, start:stop] if mask.shape[2] == Nq else mask
            scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.where(torch.isfinite(lse)[..., None], torch.exp(scores - lse[..., None]), 0.0)
        outs.append(torch.matmul(probs, expand_kv(v, q.shape[1]).to(math_dtype)).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
