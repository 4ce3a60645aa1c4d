"""The Triton kernels compile for sm_90 (H100/H200) on every path their launchers take.

No GPU is needed (see tests/triton_aot.py); the interpreter-mode tests check the numbers, this checks
that the GPU compiler accepts the code.
"""

from __future__ import annotations

import itertools

import pytest

from .triton_aot import compile_kernels

MODULE = "fusedrl.kernels.diffusion_step.triton_kernels"
FLOW_SDE, FLOW_CPS, DDIM, FLOW_DANCE = 0, 1, 2, 3


def _types(kernel: str, data: str) -> dict[str, str]:
    """Pointer and scalar types as the launcher passes them: latents in `data`, [B] and partials fp32."""
    f32 = {"p0_ptr", "p1_ptr", "part_ptr", "logp_ptr", "kl_ptr", "std_ptr", "g_logp_ptr", "g_kl_ptr"}
    names = {
        "fwd": ["x_ptr", "m_ptr", "p0_ptr", "p1_ptr", "noise_ptr", "given_ptr", "ref_ptr", "prev_out_ptr",
                "mean_out_ptr", "part_ptr"],
        "finish": ["p0_ptr", "p1_ptr", "part_ptr", "logp_ptr", "kl_ptr", "std_ptr"],
        "bwd": ["x_ptr", "m_ptr", "p0_ptr", "p1_ptr", "noise_ptr", "given_ptr", "ref_ptr", "g_prev_ptr", "g_mean_ptr",
                "g_logp_ptr", "g_kl_ptr", "gx_ptr", "gm_ptr", "gref_ptr"],
    }[kernel]
    types = {name: "*fp32" if name in f32 else f"*{data}" for name in names}
    types.update(D="i32", C="i32", level="fp32", sigma_max="fp32", clip="fp32")
    return types


def _jobs() -> list[dict]:
    # Every (mode, prediction, clip, clipped eps) variant of the coefficients, each optional stream on
    # and off once, in bf16 (the GPU-only dtype) and fp16.
    variants = [(FLOW_SDE, 0, False, False), (FLOW_CPS, 0, False, False), (FLOW_DANCE, 0, False, False)]
    variants += [(DDIM, pred, clip, clipped) for pred in range(3) for clip, clipped in
                 ((False, False), (True, False), (True, True), (False, True))]
    jobs = []
    for (mode, pred, clip, clipped), data in itertools.product(variants, ("bf16", "fp16")):
        coeffs = dict(MODE=mode, PRED=pred, HAS_CLIP=clip, CLIPPED_EPS=clipped)
        for flag in (True, False):
            jobs.append(dict(kernel="_step_fwd_kernel", types=_types("fwd", data), constexprs=dict(
                coeffs, SAMPLED=flag, HAS_REF=flag, WANT_LOGP=not flag, BLOCK=1024, ITERS=4)))
            jobs.append(dict(kernel="_step_bwd_kernel", types=_types("bwd", data), constexprs=dict(
                coeffs, SAMPLED=flag, HAS_G_PREV=flag, HAS_G_MEAN=not flag, HAS_G_LOGP=True, HAS_G_KL=flag,
                NEED_G_REF=flag, BLOCK=1024, ITERS=4)))
        if data == "bf16":
            jobs.append(dict(kernel="_step_finish_kernel", types=_types("finish", data), constexprs=dict(
                coeffs, HAS_REF=True, WANT_LOGP=True, BLOCK_C=64)))
    # one element per sample (x of shape [B]): D == 1 at launch, and a single chunk (C == 1)
    coeffs = dict(MODE=FLOW_SDE, PRED=0, HAS_CLIP=False, CLIPPED_EPS=False)
    jobs.append(dict(kernel="_step_finish_kernel", types=_types("finish", "bf16"), ones=("D", "C"),
                     constexprs=dict(coeffs, HAS_REF=True, WANT_LOGP=True, BLOCK_C=64)))
    jobs.append(dict(kernel="_step_bwd_kernel", types=_types("bwd", "bf16"), ones=("D",), constexprs=dict(
        coeffs, SAMPLED=True, HAS_G_PREV=True, HAS_G_MEAN=True, HAS_G_LOGP=True, HAS_G_KL=True, NEED_G_REF=True,
        BLOCK=1024, ITERS=4)))
    jobs.append(dict(kernel="_step_fwd_kernel", types=_types("fwd", "bf16"), ones=("D", "C"), constexprs=dict(
        coeffs, SAMPLED=True, HAS_REF=True, WANT_LOGP=True, BLOCK=1024, ITERS=4)))
    return [dict(job, module=MODULE, arch=90) for job in jobs]


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    failures = compile_kernels(_jobs())
    assert not failures, "\n".join(f"{f['job']['kernel']} {f['job']['constexprs']}: {f['error']}" for f in failures)


def _logprobs_jobs() -> list[dict]:
    module = "fusedrl.kernels.logprobs.triton_kernels"
    scalars = dict(T="i32", V="i32", stride_b="i64", stride_t="i64", inv_temp="fp32", ignore_index="i32")
    jobs = []
    for data, labels in (("bf16", "i64"), ("fp16", "i32"), ("fp32", "i64")):
        fwd = dict(logits_ptr=f"*{data}", labels_ptr=f"*{labels}", logp_ptr="*fp32", entropy_ptr="*fp32",
                   lse_ptr="*fp32", **scalars)
        bwd = dict(logits_ptr=f"*{data}", labels_ptr=f"*{labels}", lse_ptr="*fp32", entropy_ptr="*fp32",
                   g_logp_ptr="*fp32", g_entropy_ptr="*fp32", grad_ptr=f"*{data}", **scalars)
        for flag in (True, False):
            jobs.append(dict(kernel="_logprobs_fwd_kernel", types=fwd,
                             constexprs=dict(WANT_ENTROPY=flag, BLOCK_V=4096)))
            jobs.append(dict(kernel="_logprobs_bwd_kernel", types=bwd,
                             constexprs=dict(HAS_G_LOGP=True, HAS_G_ENTROPY=flag, BLOCK_V=4096)))
    return [dict(job, module=module, arch=90) for job in jobs]


@pytest.mark.slow
def test_logprobs_kernels_compile_for_sm90():
    failures = compile_kernels(_logprobs_jobs())
    assert not failures, "\n".join(f"{f['job']['kernel']} {f['job']['constexprs']}: {f['error']}" for f in failures)


def _grpo_jobs() -> list[dict]:
    module = "fusedrl.kernels.grpo_loss.triton_kernels"
    jobs = []
    for data in ("bf16", "fp32"):
        types = dict(logp_ptr=f"*{data}", old_ptr=f"*{data}", adv_ptr=f"*{data}", mask_ptr="*fp32", ref_ptr=f"*{data}",
                     ent_ptr=f"*{data}", grad_ptr="*fp32", stats_ptr="*fp32", T="i32", eps_low="fp32",
                     eps_high="fp32", delta="fp32", beta="fp32", tau_pos="fp32", tau_neg="fp32")
        for loss, sequence in itertools.product(range(3), (False, True)):
            for flag in (True, False):
                jobs.append(dict(kernel="_grpo_row_kernel", types=types, constexprs=dict(
                    LOSS=loss, KL=0 if flag else 1, HAS_OLD=flag, ADV_PER_TOKEN=not flag, SEQUENCE=sequence,
                    HAS_DELTA=flag, HAS_KL=flag, BIAS_CORRECTION=flag, HAS_ENTROPY=not flag, NSTAT=10,
                    BLOCK_T=1024)))
        jobs.append(dict(kernel="_grpo_row_kernel", types=types, constexprs=dict(
            LOSS=0, KL=2, HAS_OLD=True, ADV_PER_TOKEN=False, SEQUENCE=False, HAS_DELTA=False, HAS_KL=True,
            BIAS_CORRECTION=False, HAS_ENTROPY=True, NSTAT=10, BLOCK_T=1024)))
    return [dict(job, module=module, arch=90) for job in jobs]


@pytest.mark.slow
def test_grpo_loss_kernel_compiles_for_sm90():
    failures = compile_kernels(_grpo_jobs())
    assert not failures, "\n".join(f"{f['job']['kernel']} {f['job']['constexprs']}: {f['error']}" for f in failures)


def _hidden_jobs() -> list[dict]:
    module = "fusedrl.kernels.logprobs.hidden_triton"
    scalars = dict(N="i32", V="i32", H="i32", stride_h="i32", stride_w="i32", inv_temp="fp32", softcap="fp32",
                   ignore_index="i32")
    tiles = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64)
    jobs = []
    for data in ("bf16", "fp16", "fp32"):
        fwd = dict(h_ptr=f"*{data}", w_ptr=f"*{data}", b_ptr=f"*{data}", labels_ptr="*i64", logp_ptr="*fp32",
                   entropy_ptr="*fp32", lse_ptr="*fp32", part_ptr="*fp32", split_cols="i32", **scalars)
        dz = dict(h_ptr=f"*{data}", w_ptr=f"*{data}", b_ptr=f"*{data}", labels_ptr="*i64", lse_ptr="*fp32",
                  entropy_ptr="*fp32", g_logp_ptr="*fp32", g_entropy_ptr="*fp32", dz_ptr=f"*{data}", v0="i32",
                  C="i32", stride_dz="i32", **scalars)
        precisions = ("ieee", "tf32") if data == "fp32" else ("ieee",)
        for flag in (True, False):
            for precision in precisions:
                jobs.append(dict(kernel="_hidden_fwd_kernel", types=fwd, constexprs=dict(
                    HAS_BIAS=flag, HAS_SOFTCAP=not flag, WANT_ENTROPY=flag, SPLIT=flag, DOT_PRECISION=precision,
                    **tiles)))
                jobs.append(dict(kernel="_hidden_dz_kernel", types=dz, constexprs=dict(
                    HAS_BIAS=flag, HAS_SOFTCAP=not flag, HAS_G_LOGP=True, HAS_G_ENTROPY=flag,
                    DOT_PRECISION=precision, **tiles)))
    combine = dict(part_ptr="*fp32", labels_ptr="*i64", logp_ptr="*fp32", entropy_ptr="*fp32", lse_ptr="*fp32",
                   N="i32", V="i32", S="i32", ignore_index="i32")
    for flag in (True, False):
        jobs.append(dict(kernel="_hidden_fwd_combine_kernel", types=combine,
                         constexprs=dict(WANT_ENTROPY=flag, BLOCK=256)))
    jobs = [dict(job, module=module, arch=90) for job in jobs]
    # the "chunked" strategy's row kernels read fp32 logits chunks; the bias and dz are in the input dtype
    from fusedrl.kernels.logprobs.hidden_chunked_triton import GPU_ROW_TILES

    rows = dict(BLOCK_N=GPU_ROW_TILES.block_n, BLOCK_V=GPU_ROW_TILES.block_v)
    chunk = dict(N="i32", v0="i32", C="i32", stride_z="i32", inv_temp="fp32", softcap="fp32", ignore_index="i32")
    chunk_jobs = []
    for data in ("bf16", "fp32"):
        fold = dict(z_ptr="*fp32", b_ptr=f"*{data}", labels_ptr="*i64", state_ptr="*fp32", logp_ptr="*fp32",
                    entropy_ptr="*fp32", lse_ptr="*fp32", V="i32", **chunk)
        dz = dict(z_ptr="*fp32", b_ptr=f"*{data}", labels_ptr="*i64", lse_ptr="*fp32", entropy_ptr="*fp32",
                  g_logp_ptr="*fp32", g_entropy_ptr="*fp32", dz_ptr=f"*{data}", stride_dz="i32", **chunk)
        for flag in (True, False):
            for first, last in ((flag, flag), (flag, not flag)):  # one chunk, middle, first and last chunks
                chunk_jobs.append(dict(kernel="_chunk_fold_kernel", types=fold, constexprs=dict(
                    HAS_BIAS=flag, HAS_SOFTCAP=not flag, WANT_ENTROPY=flag, FIRST=first, LAST=last, **rows)))
            chunk_jobs.append(dict(kernel="_chunk_dz_kernel", types=dz, constexprs=dict(
                HAS_BIAS=flag, HAS_SOFTCAP=not flag, HAS_G_LOGP=True, HAS_G_ENTROPY=flag, **rows)))
    chunked = "fusedrl.kernels.logprobs.hidden_chunked_triton"
    jobs += [dict(job, module=chunked, arch=90) for job in chunk_jobs]
    # the tiles the launcher picks on sm_90, 16-byte aligned as launched: no register spills
    from fusedrl.kernels.logprobs.hidden_triton import GPU_TILES

    t = GPU_TILES[0]
    launched = dict(BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_H=t.block_h)
    for job in [j for j in jobs if j["kernel"] in ("_hidden_fwd_kernel", "_hidden_dz_kernel")
                and j["types"]["h_ptr"] == "*bf16"]:
        jobs.append(dict(job, constexprs=dict(job["constexprs"], **launched), max_stack=0,
                         options=dict(num_warps=t.num_warps, num_stages=t.num_stages),
                         divisible=[n for n in job["types"] if n.endswith("_ptr") or n.startswith("stride")]))
    return jobs


def _attention_spill_jobs() -> list[dict]:
    """Every tile table entry of flash attention (sm_90 and sm_86 tables, head dims 64 / 128 / 256, each kernel), in
    its heaviest variants (causal; key padding), bf16, with the 16-byte alignment a launch specializes; each must
    fit its device's shared memory."""
    from fusedrl.kernels.attention import triton_kernels as tk

    module = "fusedrl.kernels.attention.triton_kernels"
    strides = {f"stride_{n}{a}": "i64" if a == "b" else "i32" for n in ("q", "k", "v", "o", "do") for a in "bhn"}
    common = dict(Hq="i32", Hkv="i32", Nq="i32", Nkv="i32", GROUP="i32", qk_scale="fp32", scale="fp32",
                  stride_kpmb="i32")
    ptrs = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", kpm_ptr="*u8", o_ptr="*bf16", lse_ptr="*fp32",
                do_ptr="*bf16", delta_ptr="*fp32", dk_ptr="*bf16", dv_ptr="*bf16", dq_ptr="*bf16")
    types = dict(ptrs, **strides, **common)
    kernels = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
    jobs = []
    head_dims = {64: (40, 64), 128: (80, 128), 256: (160, 256)}  # SD1.5's 40 / 80 / 160 and each BLOCK_D
    variants = ((True, False), (False, True))  # causal; key padding
    for table, arch in ((tk.SM90, 90), (tk.SM8X, 86)):
        for block_d, tiles in table.items():
            for (kernel, t), D, (causal, kpm) in itertools.product(zip(kernels, tiles), head_dims[block_d], variants):
                job_types = {k: v for k, v in types.items() if k in getattr(tk, kernel).arg_names}
                measured = arch == 90 and block_d in (64, 128) and kernel != "_attn_fwd_kernel"  # by speed
                jobs.append(dict(
                    module=module, kernel=kernel, arch=arch, types=job_types, max_stack=None if measured else 0,
                    max_shared=tk.SMEM_BYTES[(arch // 10, arch % 10)],
                    divisible=[n for n in job_types if n.endswith("_ptr") or n.startswith("stride_")],
                    options=dict(num_warps=t.num_warps, num_stages=t.num_stages),
                    constexprs=dict(CAUSAL=causal, HAS_KPM=kpm, DOT_PRECISION="tf32", BLOCK_D=block_d, D=D,
                                    BLOCK_M=t.block_m, BLOCK_N=t.block_n)))
    return jobs


def _attention_fit_jobs() -> list[dict]:
    """The tiles `tile_config` picks for fp32 (shrunk to fit) on sm_90 / sm_86 / sm_80 and for 16-bit inputs on
    sm_80 / sm_89 / sm_75 (T4), causal, at head dims 40, 64, 128 and 256: each must fit its device's shared
    memory."""
    from fusedrl.kernels.attention import triton_kernels as tk

    causal = {j["kernel"]: j for j in _attention_spill_jobs() if j["arch"] == 90 and j["constexprs"]["CAUSAL"]}
    jobs = []
    for itemsize, caps in ((4, ((9, 0), (8, 6), (8, 0))), (2, ((8, 0), (8, 9), (7, 5)))):
        for cap, D in itertools.product(caps, (40, 64, 128, 256)):
            cfg = tk.tile_config(D, itemsize, cap)
            kernels = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
            for job, t in zip((causal[k] for k in kernels), (cfg.fwd, cfg.dkdv, cfg.dq)):
                types = {k: v.replace("bf16", "fp32") if itemsize == 4 else v for k, v in job["types"].items()}
                jobs.append(dict(job, arch=10 * cap[0] + cap[1], types=types, max_stack=None,
                                 max_shared=tk.SMEM_BYTES[cap], options=dict(num_warps=t.num_warps,
                                                                             num_stages=t.num_stages),
                                 constexprs=dict(job["constexprs"], D=D, BLOCK_D=cfg.block_d, BLOCK_M=t.block_m,
                                                 BLOCK_N=t.block_n,
                                                 DOT_PRECISION="ieee" if itemsize == 4 else "tf32")))
    return jobs


@pytest.mark.slow
def test_attention_tiles_fit_shared_memory_for_fp32_and_older_gpus():
    failures = compile_kernels(_attention_fit_jobs())
    assert not failures, "\n".join(f"sm_{f['job']['arch']} {f['job']['kernel']} {f['job']['constexprs']} "
                                   f"{f['job']['options']}: {f['error']}" for f in failures)


@pytest.mark.slow
def test_attention_tiles_do_not_spill_registers():
    """No flash-attention tile of the sm_90 / sm_86 tables spills registers to local memory or needs more shared
    memory than the device has, read from the compiled cubin's resource usage - except the sm_90 backward tiles
    of head dims 64 and 128, chosen by their measured speed on an H200 (they spill, and beat the spill-free ones):
    those must compile and fit."""
    failures = compile_kernels(_attention_spill_jobs())
    assert not failures, "\n".join(f"sm_{f['job']['arch']} {f['job']['kernel']} {f['job']['constexprs']} "
                                   f"{f['job']['options']}: {f['error']}" for f in failures)


@pytest.mark.slow
def test_token_logprobs_kernels_compile_for_sm90():
    failures = compile_kernels(_hidden_jobs())
    assert not failures, "\n".join(f"{f['job']['kernel']} {f['job']['constexprs']}: {f['error']}" for f in failures)


def _attention_jobs() -> list[dict]:
    """Every kernel of flash attention with the tiles, warps and stages its launcher picks on sm_90, for
    fp16 and bf16, head dims 64 (D = 40 pads to it) and 128 (D = 80, 96), causal / key padding on and off;
    each must fit the H100's shared memory."""
    from fusedrl.kernels.attention import triton_kernels as tk

    module = "fusedrl.kernels.attention.triton_kernels"
    strides = lambda *names: {f"stride_{n}{a}": "i64" if a == "b" else "i32" for n in names for a in "bhn"}
    common = dict(Hq="i32", Nq="i32", Nkv="i32", GROUP="i32", qk_scale="fp32", stride_kpmb="i32")
    jobs = []
    for data, D in (("fp16", 40), ("bf16", 64), ("bf16", 96), ("fp16", 128)):
        cfg = tk.tile_config(D, 2, (9, 0))
        t16 = f"*{data}"
        fwd = dict(q_ptr=t16, k_ptr=t16, v_ptr=t16, kpm_ptr="*u8", o_ptr=t16, lse_ptr="*fp32",
                   **strides("q", "k", "v", "o"), **common)
        bwd = dict(q_ptr=t16, k_ptr=t16, v_ptr=t16, kpm_ptr="*u8", do_ptr=t16, lse_ptr="*fp32", delta_ptr="*fp32",
                   **strides("q", "k", "v", "do"), **common, scale="fp32")
        dkdv = dict(bwd, dk_ptr=t16, dv_ptr=t16, Hkv="i32")
        dq = dict(bwd, dq_ptr=t16)
        pre = dict(o_ptr=t16, do_ptr=t16, dlse_ptr="*fp32", delta_ptr="*fp32", **strides("o", "do"), Hq="i32",
                   Nq="i32")
        jobs.append(dict(kernel="_attn_bwd_preprocess_kernel", types=pre,
                         constexprs=dict(HAS_DLSE=D == 64, BLOCK_M=64, BLOCK_D=cfg.block_d, D=D)))
        for causal, kpm in ((True, False), (False, True)):
            flags = dict(CAUSAL=causal, HAS_KPM=kpm, DOT_PRECISION="tf32", BLOCK_D=cfg.block_d, D=D)
            for kernel, types, t in (("_attn_fwd_kernel", fwd, cfg.fwd), ("_attn_bwd_dkdv_kernel", dkdv, cfg.dkdv),
                                     ("_attn_bwd_dq_kernel", dq, cfg.dq)):
                jobs.append(dict(kernel=kernel, types=types, max_shared=232448,
                                 options=dict(num_warps=t.num_warps, num_stages=t.num_stages),
                                 constexprs=dict(flags, BLOCK_M=t.block_m, BLOCK_N=t.block_n)))
    # fp32 with exact dots: the launcher's choice for fp32 unless torch allows TF32
    cfg = tk.tile_config(64, 4, (9, 0))
    fwd32 = dict(q_ptr="*fp32", k_ptr="*fp32", v_ptr="*fp32", kpm_ptr="*u8", o_ptr="*fp32", lse_ptr="*fp32",
                 **strides("q", "k", "v", "o"), **common)
    jobs.append(dict(kernel="_attn_fwd_kernel", types=fwd32, max_shared=232448,
                     options=dict(num_warps=cfg.fwd.num_warps, num_stages=cfg.fwd.num_stages),
                     constexprs=dict(CAUSAL=True, HAS_KPM=True, DOT_PRECISION="ieee", BLOCK_M=cfg.fwd.block_m,
                                     BLOCK_N=cfg.fwd.block_n, BLOCK_D=cfg.block_d, D=64)))
    return [dict(job, module=module, arch=90) for job in jobs]


@pytest.mark.slow
def test_attention_kernels_compile_for_sm90():
    failures = compile_kernels(_attention_jobs())
    assert not failures, "\n".join(f"{f['job']['kernel']} {f['job']['constexprs']}: {f['error']}" for f in failures)


def _backbone_jobs() -> list[dict]:
    """RMSNorm at the row widths of real models (Qwen3's head dim 128 to 16384), SwiGLU's gate and the rotary
    embedding (2 to 64 heads of 64 to 256 dims), in every dtype
    they take and with the warps their launchers pass, the weight fp32 or the data's dtype; no register spills up
    to H = 8192 (Llama-70B). At 16384 (Llama-405B) the backward holds 32 values per thread of each row it reads
    and of the dw accumulator: it compiles and spills (as it did with 32 warps, where a thread has 64 registers)."""
    from fusedrl.kernels.rms_norm import triton_kernels as rms
    from fusedrl.kernels.swiglu import triton_kernels as swiglu

    jobs = []
    widths = (128, 1536, 4096, 8192, 16384)
    for data, weight, H in itertools.product(("bf16", "fp16", "fp32"), ("same", "fp32"), widths):
        w = data if weight == "same" else "fp32"
        y = "fp32" if "fp32" in (data, w) else data
        options = dict(num_warps=rms.num_warps(H))
        jobs.append(dict(module="fusedrl.kernels.rms_norm.triton_kernels", kernel="_rms_norm_fwd_kernel",
                         types=dict(x_ptr=f"*{data}", w_ptr=f"*{w}", y_ptr=f"*{y}", rstd_ptr="*fp32", H="i32",
                                    stride_x="i32", stride_y="i32", eps="fp32"),
                         constexprs=dict(BLOCK_H=rms.block_h(H)), options=options, max_stack=0))
        for has_dw in (True, False):
            jobs.append(dict(module="fusedrl.kernels.rms_norm.triton_kernels", kernel="_rms_norm_bwd_kernel",
                             types=dict(dy_ptr=f"*{y}", x_ptr=f"*{data}", w_ptr=f"*{w}", rstd_ptr="*fp32",
                                        dx_ptr=f"*{data}", dw_ptr="*fp32", N="i32", H="i32", ROWS="i32",
                                        stride_dy="i32", stride_x="i32"),
                             constexprs=dict(HAS_DW=has_dw, BLOCK_H=rms.block_h(H)), options=options,
                             max_stack=None if H > 8192 else 0))
    for data in ("bf16", "fp16", "fp32"):
        options = dict(num_warps=swiglu.NUM_WARPS)
        jobs.append(dict(module="fusedrl.kernels.swiglu.triton_kernels", kernel="_silu_mul_fwd_kernel",
                         types=dict(g_ptr=f"*{data}", u_ptr=f"*{data}", y_ptr=f"*{data}", n="i64"),
                         constexprs=dict(BLOCK=swiglu.BLOCK), options=options, max_stack=0))
        jobs.append(dict(module="fusedrl.kernels.swiglu.triton_kernels", kernel="_silu_mul_bwd_kernel",
                         types=dict(dy_ptr=f"*{data}", g_ptr=f"*{data}", u_ptr=f"*{data}", dg_ptr=f"*{data}",
                                    du_ptr=f"*{data}", n="i64"),
                         constexprs=dict(BLOCK=swiglu.BLOCK), options=options, max_stack=0))
    from fusedrl.kernels.rotary import triton_kernels as rotary

    strides = ("sx_b", "sx_h", "sx_s", "sy_b", "sy_h", "sy_s", "sc_b", "sc_s", "ss_b", "ss_s")
    for data, H, D in itertools.product(("bf16", "fp16", "fp32"), (2, 12, 32, 64), (64, 128, 256)):
        block_h, block_d2 = rotary.blocks(H, D)
        types = dict(x_ptr=f"*{data}", cos_ptr=f"*{data}", sin_ptr=f"*{data}", y_ptr=f"*{data}", S="i32", H="i32",
                     D2="i32", **{name: "i32" for name in strides})
        for backward in (False, True):
            jobs.append(dict(module="fusedrl.kernels.rotary.triton_kernels", kernel="_rotary_kernel", types=types,
                             constexprs=dict(BACKWARD=backward, BLOCK_H=block_h, BLOCK_D2=block_d2),
                             options=dict(num_warps=rotary.num_warps(H, D)), max_stack=0))
    return [dict(job, arch=90, divisible=[n for n in job["types"] if n.endswith("_ptr")]) for job in jobs]


@pytest.mark.slow
def test_backbone_kernels_compile_for_sm90_without_spills():
    failures = compile_kernels(_backbone_jobs())
    assert not failures, "\n".join(f"{f['job']['kernel']} {f['job']['constexprs']} {f['job']['types']}: {f['error']}"
                                   for f in failures)
