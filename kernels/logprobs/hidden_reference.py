"""Torch paths of log-probabilities (and entropy) from hidden states and the LM head.

z = cap(h W^T + b) / T, with cap(x) = softcap * tanh(x / softcap) when softcap is set (Gemma-style
logit soft-capping is applied to the raw logits, then the sampling temperature), then as in
`reference.py`: logp = log_softmax(z)[label], entropy = -sum p log p.

- `naive`: builds the [N, V] logits; the oracle of the tests.
- `ChunkedHiddenLogprobs`: the CPU path; rows in chunks, backward recomputes the logits chunk by
  chunk, so besides inputs and gradients it holds [N] statistics and one [chunk, V] block at a
  time; no dW when the weight does not require grad.
"""

from __future__ import annotations

import torch

from . import reference


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def logits_of(hidden, weight, bias, temperature: float, softcap: float | None) -> torch.Tensor:
    ct = _compute_dtype(hidden)
    raw = hidden.to(ct) @ weight.to(ct).T
    if bias is not None:
        raw = raw + bias.to(ct)
    if softcap is not None:
        raw = softcap * torch.tanh(raw / softcap)
    return raw / temperature


def naive(hidden, weight, labels, bias, temperature: float, softcap: float | None, ignore_index: int):
    """hidden [N, H], weight [V, H], labels [N] -> (logp [N], entropy [N]); autograd does the backward."""
    return reference.naive(logits_of(hidden, weight, bias, 1.0, softcap), labels, temperature, ignore_index)


class ChunkedHiddenLogprobs(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, labels [N]) -> (logp [N], entropy [N])."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature: float, softcap: float | None, ignore_index: int):
        N, V = hidden.shape[0], weight.shape[0]
        ct = _compute_dtype(hidden)
        logp = torch.zeros(N, dtype=ct, device=hidden.device)
        entropy = torch.zeros(N, dtype=ct, device=hidden.device)
        lse = torch.zeros(N, dtype=ct, device=hidden.device)
        keep = labels != ignore_index
        safe = torch.where(keep, labels, torch.zeros_like(labels))
        step = reference.rows_per_chunk(V)
        for start in range(0, N, step):
            rows = slice(start, start + step)
            scaled, lse[rows], entropy[rows] = reference.stats(logits_of(hidden[rows], weight, bias, 1.0, softcap),
                                                               temperature)
            logp[rows] = (scaled.gather(-1, safe[rows].unsqueeze(-1)).squeeze(-1) - lse[rows]).clamp(max=0)
        zero = torch.zeros((), dtype=ct, device=hidden.device)
        ctx.save_for_backward(hidden, weight, bias, safe, keep, lse, entropy)
        ctx.args = (temperature, softcap)
        return torch.where(keep, logp, zero), torch.where(keep, entropy, zero)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, safe, keep, lse, entropy = ctx.saved_tensors
        temperature, softcap = ctx.args
        N, V = hidden.shape[0], weight.shape[0]
        ct = lse.dtype
        zero = torch.zeros((), dtype=ct, device=hidden.device)
        g_logp = torch.where(keep, g_logp.to(ct), zero) if g_logp is not None else torch.zeros_like(lse)
        g_entropy = torch.where(keep, g_entropy.to(ct), zero) if g_entropy is not None else torch.zeros_like(lse)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=ct, device=weight.device) if need_w else None
        grad_b = torch.zeros(V, dtype=ct, device=weight.device) if need_b else None
        w = weight.to(ct)
        step = reference.rows_per_chunk(V)
        for start in range(0, N, step):
            rows = slice(start, start + step)
            h = hidden[rows].to(ct)
            raw = h @ w.T
            if bias is not None:
                raw = raw + bias.to(ct)
            capped = softcap * torch.tanh(raw / softcap) if softcap is not None else raw
            dz = reference.grad_of_scaled(capped / temperature, lse[rows], entropy[rows], g_logp[rows],
                                          g_entropy[rows], safe[rows]) / temperature
            if softcap is not None:
                dz = dz * (1 - (capped / softcap) ** 2)
            if need_h:
                grad_h[rows] = (dz @ w).to(hidden.dtype)
            if need_w:
                grad_w += dz.T @ h
            if need_b:
                grad_b += dz.sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)
