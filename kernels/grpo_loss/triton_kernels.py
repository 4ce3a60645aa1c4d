"""Triton kernel of the GRPO loss family: per-token loss, its derivative and the per-row sums, one
program per sequence (row of [B, T]).

Per token, with w the log importance weight (the token's log-ratio, or under GSPO the row's masked
mean log-ratio), r = exp(w) and A the advantage:
    clip family: l = -min(r' A, clamp(r, 1 - eps_low, 1 + eps_high) A), r' = min(r, delta) if delta
    cispo:       l = -sg(min(r, eps_high)) A logp
    sapo:        l = -sigmoid(tau (r - 1)) 4 / tau A
    + beta KL,   KL = k(logp, ref) (* r with TRL's bias correction)
The kernel writes m dl/dlogp (the derivative through w included at token level) and, per row,
[sum l m, sum m, sum KL m, sum low m, sum high m, sum r m, sum H m, sum m dl/dw, w_row, sum cispo m]
(STATS columns below). The host turns the row sums into the loss of the chosen normalization and the
per-row gradient scale (and, under GSPO, adds the row term m_t / count * sum m dl/dw).
torch.min's gradient at a tie (the common case: r inside the clip range) goes half to each side,
as in autograd.
"""

from __future__ import annotations

import triton
import triton.language as tl

CLIP_FAMILY, CISPO, SAPO = 0, 1, 2
KL_K3, KL_K2, KL_K1 = 0, 1, 2
STATS = ("loss", "count", "kl", "low", "high", "ratio", "entropy", "dl_dw", "w_row", "cispo")
NSTAT = len(STATS)
BLOCK_T = 1024


@triton.jit
def _grpo_row_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, grad_ptr, stats_ptr,
    T, eps_low, eps_high, delta, beta, tau_pos, tau_neg,
    LOSS: tl.constexpr, KL: tl.constexpr, HAS_OLD: tl.constexpr, ADV_PER_TOKEN: tl.constexpr,
    SEQUENCE: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_KL: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, NSTAT: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * T
    w_row = tl.zeros([], tl.float32)
    if SEQUENCE:  # first pass: the row's masked mean log-ratio
        acc_lr = tl.zeros([BLOCK_T], tl.float32)
        acc_m = tl.zeros([BLOCK_T], tl.float32)
        if HAS_OLD:
            for start in range(0, T, BLOCK_T):
                offs = start + tl.arange(0, BLOCK_T)
                inb = offs < T
                m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
                lp = tl.load(logp_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
                old = tl.load(old_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
                acc_lr += (lp - old) * m
                acc_m += m
            w_row = tl.sum(acc_lr, axis=0) / tl.maximum(tl.sum(acc_m, axis=0), 1.0)
    a_row = tl.zeros([], tl.float32)
    if not ADV_PER_TOKEN:
        a_row = tl.load(adv_ptr + row).to(tl.float32)

    s_loss = tl.zeros([BLOCK_T], tl.float32)
    s_m = tl.zeros([BLOCK_T], tl.float32)
    s_kl = tl.zeros([BLOCK_T], tl.float32)
    s_low = tl.zeros([BLOCK_T], tl.float32)
    s_high = tl.zeros([BLOCK_T], tl.float32)
    s_ratio = tl.zeros([BLOCK_T], tl.float32)
    s_ent = tl.zeros([BLOCK_T], tl.float32)
    s_dw = tl.zeros([BLOCK_T], tl.float32)
    s_cispo = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        inb = offs < T
        m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        lp = tl.load(logp_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        if HAS_OLD:
            lr = lp - tl.load(old_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        else:  # old = logp.detach(): ratio 1, derivative 1
            lr = tl.zeros([BLOCK_T], tl.float32)
        if ADV_PER_TOKEN:
            adv = tl.load(adv_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        else:
            adv = tl.zeros([BLOCK_T], tl.float32) + a_row
        if SEQUENCE:
            w = tl.zeros([BLOCK_T], tl.float32) + w_row
        else:
            w = lr
        r = tl.exp(w)
        direct = tl.zeros([BLOCK_T], tl.float32)  # dl/dlogp other than through w
        if LOSS == 0:
            # min / max propagate NaN as torch.clamp and torch.min do (by default they return the other operand:
            # a NaN log-prob gave a finite loss)
            c2 = tl.minimum(tl.maximum(r, 1.0 - eps_low, propagate_nan=tl.PropagateNan.ALL), 1.0 + eps_high,
                            propagate_nan=tl.PropagateNan.ALL)
            d_c2 = tl.where((r >= 1.0 - eps_low) & (r <= 1.0 + eps_high), r, 0.0)
            if HAS_DELTA:
                r1 = tl.minimum(r, delta, propagate_nan=tl.PropagateNan.ALL)
                d_r1 = tl.where(r <= delta, r, 0.0)
            else:
                r1 = r
                d_r1 = r
            a = r1 * adv
            b = c2 * adv
            loss = -tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
            d_w = -adv * tl.where(a < b, d_r1, tl.where(a > b, d_c2, 0.5 * (d_r1 + d_c2)))
            # TRL counts clipping on the ratio after the delta clamp
            s_low += tl.where((r1 < 1.0 - eps_low) & (adv < 0.0), m, 0.0)
            s_high += tl.where((r1 > 1.0 + eps_high) & (adv > 0.0), m, 0.0)
        elif LOSS == 1:
            cr = tl.minimum(r, eps_high, propagate_nan=tl.PropagateNan.ALL)
            loss = -cr * adv * lp
            direct = -cr * adv
            d_w = tl.zeros([BLOCK_T], tl.float32)
            s_cispo += tl.where((r > eps_high) & (adv > 0.0), m, 0.0)
        else:
            tau = tl.where(adv > 0.0, tau_pos, tau_neg)
            sig = tl.sigmoid(tau * (r - 1.0))
            loss = -sig * 4.0 / tau * adv
            d_w = -4.0 * adv * sig * (1.0 - sig) * r
        if HAS_KL:
            d = tl.load(ref_ptr + base + offs, mask=inb, other=0.0).to(tl.float32) - lp
            if KL == 0:
                kl = tl.exp(d) - d - 1.0
                d_kl = 1.0 - tl.exp(d)
            elif KL == 1:
                kl = 0.5 * d * d
                d_kl = -d
            else:
                kl = -d
                d_kl = tl.zeros([BLOCK_T], tl.float32) + 1.0
            if BIAS_CORRECTION:
                d_w += beta * kl * r
                kl = kl * r
                d_kl = d_kl * r
            loss += beta * kl
            direct += beta * d_kl
            s_kl += kl * m
        if SEQUENCE:
            grad = m * direct
            s_dw += m * d_w
        else:
            grad = m * (direct + d_w)
        tl.store(grad_ptr + base + offs, grad, mask=inb)
        s_loss += tl.where(inb, loss * m, 0.0)
        s_m += m
        s_ratio += r * m
        if HAS_ENTROPY:
            s_ent += tl.load(ent_ptr + base + offs, mask=inb, other=0.0).to(tl.float32) * m
    out = stats_ptr + row.to(tl.int64) * NSTAT
    tl.store(out + 0, tl.sum(s_loss, axis=0))
    tl.store(out + 1, tl.sum(s_m, axis=0))
    tl.store(out + 2, tl.sum(s_kl, axis=0))
    tl.store(out + 3, tl.sum(s_low, axis=0))
    tl.store(out + 4, tl.sum(s_high, axis=0))
    tl.store(out + 5, tl.sum(s_ratio, axis=0))
    tl.store(out + 6, tl.sum(s_ent, axis=0))
    tl.store(out + 7, tl.sum(s_dw, axis=0))
    tl.store(out + 8, w_row)
    tl.store(out + 9, tl.sum(s_cispo, axis=0))
