"""Triton kernels for the diffusion transition steps (flow SDE/CPS/Dance and DDIM), forward and backward.

All four steps are one affine Gaussian transition with per-sample coefficients:

    mean  = a x + b m  (+ c clamp(p x + q m, -clip, clip)   when the DDIM x0 is clipped)
    prev  = mean + scale z                                    (sampled; else prev is given, as data)
    logp  = cq MEAN_D((prev - mean)^2) + c0                   per sample
    kl    = MEAN_D((mean - ref)^2) / (2 std^2)                per sample

with x the latent, m the model output, D the elements per sample. `_coefficients` derives
(a, b, c, p, q, scale, std, cq, c0) from the sample's two schedule values inside the kernel, so a
step is one pass over memory plus a [B, C] partial-sum reduction: the forward reads x, m and z (or
prev) once and writes prev and mean once; the backward reads x, m, z/prev and the incoming
gradients once and writes dx, dm once. Coefficient launches on [B] tensors from the host would cost
more than the step itself at SD1.5 sizes, which is why they live here.

`level` is noise_level for "sde" and "dance", sin(noise_level pi / 2) for "cps" (computed on the host), eta for
DDIM.
Partial sums go to a [B, 2, C] fp32 buffer and a second small kernel finishes them in a fixed order,
so results are deterministic (no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

FLOW_SDE, FLOW_CPS, DDIM, FLOW_DANCE = 0, 1, 2, 3
PRED_EPSILON, PRED_SAMPLE, PRED_V = 0, 1, 2
# tl.constexpr so that @triton.jit code may read it (a plain float global fails to compile on a GPU)
LOG_SQRT_2PI = tl.constexpr(0.9189385332046727)

# 1024 elements x 4 iterations per program: at SD1.5 latents (D = 16384) that is 4 programs per
# sample (128 for B = 32), at SD3 latents (D = 262144) 64 per sample.
BLOCK = 1024
ITERS = 4
CHUNK = BLOCK * ITERS
NUM_WARPS = 4


@triton.jit
def _div(a, b):
    return tl.math.div_rn(a + 0.0 * b, b + 0.0 * a)  # broadcast python floats against fp32 scalars


@triton.jit
def _coefficients(p0, p1, level, sigma_max, MODE: tl.constexpr, PRED: tl.constexpr,
                  HAS_CLIP: tl.constexpr, CLIPPED_EPS: tl.constexpr):
    """Per-sample (a, b, c, p, q, scale, std, cq, c0); p0, p1 = (sigma, sigma_next) or (alpha_t, alpha_prev).

    Divisions use `div_rn` (IEEE round-to-nearest): Triton's default fp32 division is approximate
    (2 ulp), which on an H200 put the DDIM coefficients at 4.4-4.6x the error of the torch formula
    vs float64 (SD1.5 schedule); with div_rn they are within it. These are per-sample scalars: free.
    """
    c = 0.0
    p = 0.0
    q = 0.0
    if MODE == 0 or MODE == 3:  # flow "sde" (Flow-GRPO), "dance" (DanceGRPO: the same step with std = level)
        sigma = p0
        dt = p1 - sigma
        if MODE == 0:
            s = tl.where(sigma == 1.0, sigma_max, sigma)
            std = level * tl.sqrt_rn(_div(sigma, 1.0 - s))
        else:
            std = level + 0.0 * sigma
        a = 1.0 + _div(std * std, 2.0 * sigma) * dt
        b = (1.0 + _div(std * std * (1.0 - sigma), 2.0 * sigma)) * dt
        scale = std * tl.sqrt_rn(-dt)
        cq = _div(-0.5, scale * scale)
        c0 = -tl.log(scale) - LOG_SQRT_2PI
    elif MODE == 1:  # flow "cps"
        sigma = p0
        sigma_next = p1
        std = sigma_next * level
        # sqrt(sigma_next^2 - std^2) as sigma_next sqrt((1 - level)(1 + level)): equal in exact arithmetic, and never
        # negative: contracted to an fma, the difference left -(rounding of sigma_next^2) at level = 1, and NaN
        root = sigma_next * tl.sqrt_rn((1.0 - level) * (1.0 + level))
        a = (1.0 - sigma_next) + root
        b = -sigma * (1.0 - sigma_next) + (1.0 - sigma) * root
        scale = std
        cq = -1.0 + 0.0 * std
        c0 = 0.0 * std
    else:  # DDIM
        alpha_t = p0
        alpha_prev = p1
        beta_t = 1.0 - alpha_t
        variance = _div(1.0 - alpha_prev, beta_t) * (1.0 - _div(alpha_t, alpha_prev))
        std = level * tl.sqrt_rn(variance)
        # sqrt(1 - alpha_prev - std^2), written so that it is exactly 0 at alpha_t = 0, eta = 1 (zero terminal
        # SNR's first step) rather than the square root of a rounding residual
        keep = 1.0 - level * level * _div(1.0 - _div(alpha_t, alpha_prev), beta_t)
        direction = tl.sqrt_rn(tl.maximum((1.0 - alpha_prev) * keep, 0.0))
        sa_t = tl.sqrt_rn(alpha_t)
        sb_t = tl.sqrt_rn(beta_t)
        sa_p = tl.sqrt_rn(alpha_prev)
        # x0 = px x + pm m ; eps = ux x + um m
        if PRED == 0:
            px = _div(1.0, sa_t)
            pm = _div(-sb_t, sa_t)
            ux = 0.0 * sa_t
            um = 1.0 + 0.0 * sa_t
        elif PRED == 1:
            px = 0.0 * sa_t
            pm = 1.0 + 0.0 * sa_t
            ux = _div(1.0, sb_t)
            um = _div(-sa_t, sb_t)
        else:
            px = sa_t
            pm = -sb_t
            ux = sb_t
            um = sa_t
        c_x0 = sa_p
        if CLIPPED_EPS:  # eps re-derived from the (clipped) x0
            ux = _div(1.0, sb_t)
            um = 0.0 * sb_t
            c_x0 = sa_p - _div(direction * sa_t, sb_t)
        if HAS_CLIP:
            a = direction * ux
            b = direction * um
            c = c_x0
            p = px
            q = pm
        else:
            a = direction * ux + c_x0 * px
            b = direction * um + c_x0 * pm
        scale = std
        cq = _div(-0.5, std * std)
        c0 = -tl.log(std) - LOG_SQRT_2PI
    return a, b, c, p, q, scale, std, cq, c0


@triton.jit
def _step_fwd_kernel(
    x_ptr, m_ptr, p0_ptr, p1_ptr, noise_ptr, given_ptr, ref_ptr,
    prev_out_ptr, mean_out_ptr, part_ptr,
    D, C, level, sigma_max, clip,
    MODE: tl.constexpr, PRED: tl.constexpr, HAS_CLIP: tl.constexpr, CLIPPED_EPS: tl.constexpr,
    SAMPLED: tl.constexpr, HAS_REF: tl.constexpr, WANT_LOGP: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    row = tl.program_id(0)  # rows on the grid's first axis (2^31 - 1 programs; the second stops at 65535)
    pid_c = tl.program_id(1)
    p0 = tl.load(p0_ptr + row)
    p1 = tl.load(p1_ptr + row)
    a, b, c, p, q, scale, std, cq, c0 = _coefficients(p0, p1, level, sigma_max, MODE, PRED, HAS_CLIP, CLIPPED_EPS)
    base = row.to(tl.int64) * D
    acc_d = tl.zeros([BLOCK], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = (pid_c * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        mean = a * x + b * m
        if HAS_CLIP:
            mean += c * tl.minimum(tl.maximum(p * x + q * m, -clip), clip)
        tl.store(mean_out_ptr + base + offs, mean.to(mean_out_ptr.dtype.element_ty), mask=mask)
        if SAMPLED:
            z = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            prev = mean + scale * z
            tl.store(prev_out_ptr + base + offs, prev.to(prev_out_ptr.dtype.element_ty), mask=mask)
        elif WANT_LOGP:
            prev = tl.load(given_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if WANT_LOGP:
            d = prev - mean
            acc_d += tl.where(mask, d * d, 0.0)
        if HAS_REF:
            e = mean - tl.load(ref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            acc_k += tl.where(mask, e * e, 0.0)
    out = part_ptr + row.to(tl.int64) * 2 * C + pid_c
    tl.store(out, tl.sum(acc_d, axis=0))
    tl.store(out + C, tl.sum(acc_k, axis=0))


@triton.jit
def _step_finish_kernel(
    p0_ptr, p1_ptr, part_ptr, logp_ptr, kl_ptr, std_ptr,
    D, C, level, sigma_max,
    MODE: tl.constexpr, PRED: tl.constexpr, HAS_CLIP: tl.constexpr, CLIPPED_EPS: tl.constexpr,
    HAS_REF: tl.constexpr, WANT_LOGP: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    p0 = tl.load(p0_ptr + row)
    p1 = tl.load(p1_ptr + row)
    a, b, c, p, q, scale, std, cq, c0 = _coefficients(p0, p1, level, sigma_max, MODE, PRED, HAS_CLIP, CLIPPED_EPS)
    tl.store(std_ptr + row, std)
    base = part_ptr + row.to(tl.int64) * 2 * C
    acc_d = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        mask = offs < C
        acc_d += tl.load(base + offs, mask=mask, other=0.0)
        acc_k += tl.load(base + C + offs, mask=mask, other=0.0)
    inv_d = _div(1.0, (row * 0 + D).to(tl.float32))  # D == 1 arrives as a constant int, with no .to()
    if WANT_LOGP:
        tl.store(logp_ptr + row, cq * (tl.sum(acc_d, axis=0) * inv_d) + c0)
    if HAS_REF:
        tl.store(kl_ptr + row, _div(tl.sum(acc_k, axis=0) * inv_d, 2.0 * std * std))


@triton.jit
def _step_bwd_kernel(
    x_ptr, m_ptr, p0_ptr, p1_ptr, noise_ptr, given_ptr, ref_ptr,
    g_prev_ptr, g_mean_ptr, g_logp_ptr, g_kl_ptr,
    gx_ptr, gm_ptr, gref_ptr,
    D, level, sigma_max, clip,
    MODE: tl.constexpr, PRED: tl.constexpr, HAS_CLIP: tl.constexpr, CLIPPED_EPS: tl.constexpr,
    SAMPLED: tl.constexpr, HAS_G_PREV: tl.constexpr, HAS_G_MEAN: tl.constexpr,
    HAS_G_LOGP: tl.constexpr, HAS_G_KL: tl.constexpr, NEED_G_REF: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    row = tl.program_id(0)  # rows on the grid's first axis (2^31 - 1 programs; the second stops at 65535)
    pid_c = tl.program_id(1)
    p0 = tl.load(p0_ptr + row)
    p1 = tl.load(p1_ptr + row)
    a, b, c, p, q, scale, std, cq, c0 = _coefficients(p0, p1, level, sigma_max, MODE, PRED, HAS_CLIP, CLIPPED_EPS)
    inv_d = _div(1.0, (row * 0 + D).to(tl.float32))  # D == 1 arrives as a constant int, with no .to()
    # d logp / d mean = -2 cq (prev - mean) / D ; d kl / d mean = (mean - ref) / (std^2 D)
    coef_d = 0.0
    coef_k = 0.0
    if HAS_G_LOGP:
        coef_d = -2.0 * cq * inv_d * tl.load(g_logp_ptr + row)
    if HAS_G_KL:
        coef_k = _div(tl.load(g_kl_ptr + row) * inv_d, std * std)
    base = row.to(tl.int64) * D
    for i in range(ITERS):
        offs = (pid_c * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        mean = a * x + b * m
        if HAS_CLIP:
            y = p * x + q * m
            mean += c * tl.minimum(tl.maximum(y, -clip), clip)
        g = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_G_MEAN:
            g += tl.load(g_mean_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_G_PREV:  # a sampled prev = mean + scale z passes its gradient to mean
            g += tl.load(g_prev_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_G_LOGP:
            if SAMPLED:
                z = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
                prev = mean + scale * z
            else:
                prev = tl.load(given_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            g += coef_d * (prev - mean)
        if HAS_G_KL:
            e = coef_k * (mean - tl.load(ref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32))
            g += e
            if NEED_G_REF:
                tl.store(gref_ptr + base + offs, (-e).to(gref_ptr.dtype.element_ty), mask=mask)
        gx = a * g
        gm = b * g
        if HAS_CLIP:
            inside = (y >= -clip) & (y <= clip)  # torch.clamp passes the gradient on the bounds too
            gy = tl.where(inside, c * g, 0.0)
            gx += p * gy
            gm += q * gy
        tl.store(gx_ptr + base + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(gm_ptr + base + offs, gm.to(gm_ptr.dtype.element_ty), mask=mask)
