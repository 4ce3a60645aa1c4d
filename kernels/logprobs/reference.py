"""Torch paths of log-probabilities (and entropy) from logits.

- `naive`: the textbook formula, `log_softmax(logits / T).gather(labels)` and `-(p * log p).sum()`,
  in fp32 (fp64 for fp64 input). The oracle of the tests; it allocates several [N, V] temporaries.
- `ChunkedLogprobs`: the CPU path. Same numbers, but rows are processed in chunks and the backward
  recomputes the softmax from the logits, so besides its input and the gradient it holds only
  [N] statistics and one [chunk, V] block at a time (the memory bound of the Triton kernel).

Ignored rows (label == ignore_index) get logp = 0 and entropy = 0, and no gradient.
"""

from __future__ import annotations

import torch

# Elements per [rows, V] block: 4M fp32 = 16 MB, and a backward step keeps about six such temporaries
# alive. Measured (benchmarks/bench_token_logprobs_memory.py, N = 4096, V = 32000, H = 256, fwd + bwd):
# 16M-element blocks grew the peak RSS by 843 MB, 4M-element blocks by 441 MB, the naive formula by 2497 MB.
CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def naive(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int):
    """logits [N, V], labels [N] -> (logp [N], entropy [N]) in the compute dtype."""
    scaled = logits.to(_compute_dtype(logits)) / temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return torch.where(keep, logp, zero), torch.where(keep, entropy, zero)


def rows_per_chunk(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def stats(block: torch.Tensor, temperature: float):
    """One [rows, V] block -> (scaled block, lse [rows], entropy [rows]) in the compute dtype."""
    scaled = block.to(_compute_dtype(block)) / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    log_p = scaled - lse.unsqueeze(-1)
    # H = -sum p log p, not lse - sum p x: that difference of two large terms loses ~1e-6 in fp32.
    # p = 0 where x = -inf: keep 0 * -inf out of the sum (a NaN p stays NaN: `p > 0` would hide it).
    p = log_p.exp()
    entropy = -torch.where(p == 0, torch.zeros_like(p), p * log_p).sum(-1)
    return scaled, lse, entropy


def grad_of_scaled(scaled, lse, entropy, g_logp, g_entropy, labels) -> torch.Tensor:
    """d(g_logp . logp + g_entropy . H) / d scaled for one [rows, V] block of x = logits / T:
    d logp_y / dx = onehot(y) - p ;  d H / dx = -p (log p + H)."""
    log_p = scaled - lse.unsqueeze(-1)
    p = log_p.exp()
    log_term = torch.where(p == 0, torch.zeros_like(p), log_p + entropy.unsqueeze(-1))  # p = 0 at x = -inf
    g = -g_logp.unsqueeze(-1) * p - g_entropy.unsqueeze(-1) * p * log_term
    return g.scatter_add_(-1, labels.unsqueeze(-1), g_logp.unsqueeze(-1))


class ChunkedLogprobs(torch.autograd.Function):
    """(logits [N, V], labels [N]) -> (logp [N], entropy [N]), chunked over rows, backward by recompute."""

    @staticmethod
    def forward(ctx, logits, labels, temperature: float, ignore_index: int):
        N, V = logits.shape
        ct = _compute_dtype(logits)
        logp = torch.empty(N, dtype=ct, device=logits.device)
        entropy = torch.empty(N, dtype=ct, device=logits.device)
        lse = torch.empty(N, dtype=ct, device=logits.device)
        keep = labels != ignore_index
        safe = torch.where(keep, labels, torch.zeros_like(labels))
        step = rows_per_chunk(V)
        for start in range(0, N, step):
            rows = slice(start, start + step)
            scaled, lse[rows], entropy[rows] = stats(logits[rows], temperature)
            # clamped: rounding must not make a log-probability positive (the kernels do the same)
            logp[rows] = (scaled.gather(-1, safe[rows].unsqueeze(-1)).squeeze(-1) - lse[rows]).clamp(max=0)
        zero = torch.zeros((), dtype=ct, device=logits.device)
        logp = torch.where(keep, logp, zero)
        entropy = torch.where(keep, entropy, zero)
        ctx.save_for_backward(logits, safe, keep, lse, entropy)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logits, safe, keep, lse, entropy = ctx.saved_tensors
        T = ctx.temperature
        N, V = logits.shape
        grad = torch.empty_like(logits)
        ct = lse.dtype
        g_logp = torch.zeros(N, dtype=ct, device=logits.device) if g_logp is None else g_logp.to(ct)
        g_entropy = torch.zeros(N, dtype=ct, device=logits.device) if g_entropy is None else g_entropy.to(ct)
        zero = torch.zeros((), dtype=ct, device=logits.device)
        g_logp = torch.where(keep, g_logp, zero)
        g_entropy = torch.where(keep, g_entropy, zero)
        step = rows_per_chunk(V)
        for start in range(0, N, step):
            rows = slice(start, start + step)
            g = grad_of_scaled(logits[rows].to(ct) / T, lse[rows], entropy[rows], g_logp[rows], g_entropy[rows],
                               safe[rows])
            grad[rows] = (g / T).to(logits.dtype)
        return grad, None, None, None
