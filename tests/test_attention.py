"""flash_attention on the torch and Triton backends against the float64 formula: out, lse and every
gradient (dq, dk, dv, including a gradient through lse), causal bottom-right, cross-attention,
grouped-query attention, key padding (with a batch row that is all padding), odd lengths and head
dims; plus the custom ops (opcheck, torch.compile), the tile choice, dispatch and bad input.

Under TRITON_INTERPRET=1 (CPU) the kernels run with small tiles (32 x 16 / 16 x 32), so that the
lengths here already cross several tiles, edge tiles and causal diagonals.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fusedrl.kernels import dispatch, flash_attention
from fusedrl.kernels.attention import api
from fusedrl.kernels.attention import triton_kernels as tk
from fusedrl.kernels.attention.op import flash_attention_bwd, flash_attention_fwd
from fusedrl.kernels.attention.reference import attention_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
TRITON_RUNS = INTERPRET or CUDA
BACKENDS = ["torch"] + (["triton"] if TRITON_RUNS else [])
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])

# (B, Hq, Hkv, Nq, Nkv, D, causal, key padding, strided): strided = q, k, v are [B, N, H, D] buffers seen
# through .transpose(1, 2), as attention layers produce them.
CASES = [
    (2, 2, 2, 1, 1, 64, True, False, False),
    (1, 2, 2, 1, 1, 32, False, False, False),
    (2, 2, 2, 17, 17, 40, False, False, True),
    (2, 2, 2, 17, 17, 40, True, False, False),
    (1, 2, 2, 128, 128, 64, False, False, False),
    (1, 2, 2, 128, 128, 64, True, False, True),
    (1, 4, 2, 33, 70, 64, True, False, False),     # Nq < Nkv (KV cache), GQA
    (2, 4, 2, 33, 70, 64, False, True, False),
    (1, 4, 1, 70, 33, 96, True, False, False),     # Nq > Nkv: the first 37 rows see no key; MQA
    (2, 2, 2, 17, 50, 40, False, True, False),     # batch row 0 entirely padding
    (2, 4, 2, 65, 65, 80, True, True, True),
]
SLOW_CASES = [
    (1, 2, 2, 257, 257, 64, False, False, False),
    (2, 2, 1, 257, 257, 40, True, True, False),
    (1, 1, 1, 1000, 1000, 64, True, False, False),
]
GPU_CASES = [
    (2, 8, 2, 1000, 1000, 128, True, True, True),
    (1, 4, 4, 4096, 4096, 128, True, False, False),
    (1, 4, 4, 4096, 4096, 64, False, False, True),
    (2, 4, 2, 1024, 4429, 160, False, True, False),
    (1, 4, 4, 2048, 2048, 256, True, False, False),
    (2, 8, 8, 4096, 4096, 40, False, False, False),
    (1, 8, 8, 1024, 1024, 80, True, False, False),
]


def _ids(case):
    B, Hq, Hkv, Nq, Nkv, D, causal, kpm, strided = case
    tags = ["causal" if causal else "full"] + (["pad"] if kpm else []) + (["strided"] if strided else [])
    return f"B{B}-H{Hq}/{Hkv}-{Nq}x{Nkv}-D{D}-" + "-".join(tags)


def _inputs(case, seed=0):
    """float64 q, k, v (on DEVICE), the key padding mask, and the weights dout, dlse of the loss."""
    B, Hq, Hkv, Nq, Nkv, D, causal, kpm, strided = case
    g = torch.Generator().manual_seed(seed)

    def make(H, N):
        if strided:
            return torch.randn(B, N, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, H, N, D, generator=g, dtype=torch.float64)

    q, k, v = make(Hq, Nq), make(Hkv, Nkv), make(Hkv, Nkv)
    k = k * 1.5  # sharper softmax than unit scores
    mask = None
    if kpm:
        mask = torch.rand(B, Nkv, generator=g) > 0.25
        assert B > 1, "padding cases need a second batch row: row 0 is all padding"
        mask[0] = False  # one batch row sees nothing at all
        mask[1, -1] = True
    dout = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64)
    dlse = torch.randn(B, Hq, Nq, generator=g, dtype=torch.float64)
    to = lambda t: None if t is None else t.to(DEVICE)
    return to(q), to(k), to(v), to(mask), to(dout), to(dlse)


def _run(fn, q, k, v, dout, dlse):
    """(out, lse, dq, dk, dv) of loss = <out, dout> + <lse, dlse> over the rows whose lse is finite."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    lse_used = torch.where(torch.isfinite(lse), lse, 0.0).double()
    loss = (out.double() * dout).sum() + (lse_used * dlse).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def _cast(t, dtype):
    return t.to(dtype) if t.is_contiguous() else t.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)


def _err(a, b):
    fin = torch.isfinite(b)
    return (a.double()[fin] - b.double()[fin]).abs().max().item() if fin.any() else 0.0


def _check(case, dtype, backend, use_backend):
    B, Hq, Hkv, Nq, Nkv, D, causal, kpm, strided = case
    q, k, v, mask, dout, dlse = _inputs(case)
    formula = lambda q, k, v: attention_reference(q, k, v, causal=causal, key_padding_mask=mask)
    exp = _run(formula, q, k, v, dout, dlse)
    # The same formula at the input dtype (fp16 on CPU: fp16 matmuls, fp32 accumulation): the budget.
    base = _run(formula, *(_cast(t, dtype) for t in (q, k, v)), dout, dlse)
    use_backend(backend)
    got = _run(lambda q, k, v: flash_attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True),
               *(_cast(t, dtype) for t in (q, k, v)), dout, dlse)

    names = ("out", "lse", "dq", "dk", "dv")
    for name, a, b, e in zip(names, got, base, exp):
        assert a.shape == e.shape, name
        assert a.dtype == (torch.float32 if name == "lse" else dtype), name
        assert torch.isfinite(a).all() if name != "lse" else True, f"{name} is not finite"
        size = e[torch.isfinite(e)].abs().max().item() if torch.isfinite(e).any() else 0.0
        ulp = torch.finfo(torch.float32 if name == "lse" else dtype).eps * max(1.0, size)
        budget = 4 * _err(b, e) + 8 * ulp
        assert _err(a, e) <= budget, f"{name}: {_err(a, e):.3g} > {budget:.3g} (torch formula at {dtype}: " \
                                     f"{_err(b, e):.3g})"
    out, lse, dq = got[0], got[1], got[2]
    empty = torch.isneginf(exp[1])  # rows that see no key
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    if kpm:  # padded keys get no gradient
        padded = ~mask[:, None, :].expand(B, Hkv, Nkv)
        assert (got[3][padded] == 0).all() and (got[4][padded] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_float64(case, dtype, backend, use_backend):
    _check(case, dtype, backend, use_backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SLOW_CASES, ids=_ids)
def test_matches_float64_longer(case, dtype, backend, use_backend):
    _check(case, dtype, backend, use_backend)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=_ids)
def test_gpu_sizes_match_float64(case, dtype, use_backend):
    _check(case, dtype, "triton", use_backend)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_fp32_follows_torch_tf32_setting(use_backend):
    """fp32 is exact ('ieee') by default and TF32 once torch allows it for matmuls."""
    case = (1, 2, 2, 512, 512, 64, True, False, False)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        _check(case, torch.float32, "triton", use_backend)
        torch.backends.cuda.matmul.allow_tf32 = True
        q, k, v, *_ = _inputs(case)
        exp = attention_reference(q, k, v, causal=True)[0]
        out = flash_attention(*(t.float() for t in (q, k, v)), causal=True)
        assert _err(out, exp) < 1e-2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------- custom ops and compile

needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="the Triton backend needs a GPU or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(causal, with_mask):
    q = torch.randn(2, 4, 9, 16, device=DEVICE)
    k = torch.randn(2, 2, 12, 16, device=DEVICE)
    v = torch.randn(2, 2, 12, 16, device=DEVICE)
    mask = (torch.arange(12, device=DEVICE) < torch.tensor([[7], [12]], device=DEVICE)) if with_mask else None
    torch.library.opcheck(flash_attention_fwd, (q, k, v, mask, causal, 0.25, "triton"))
    out, lse = flash_attention_fwd(q, k, v, mask, causal, 0.25, "triton")
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(flash_attention_bwd, (dout, q, k, v, out, lse, dlse, mask, causal, 0.25, "triton"))
    torch.library.opcheck(flash_attention_bwd, (dout, q, k, v, out, lse, None, mask, causal, 0.25, "triton"))


def test_forward_op_name_is_fixed():
    """A checkpointing policy saves this op's outputs by name: the name is part of the contract."""
    assert torch.ops.fusedrl.flash_attention_fwd.default._schema.name == "fusedrl::flash_attention_fwd"
    assert hasattr(torch.ops.fusedrl, "flash_attention_bwd")


@needs_triton
def test_compile_fullgraph_forward_and_backward(use_backend):
    use_backend("triton")
    q = torch.randn(1, 4, 19, 40, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 23, 40, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 23, 40, device=DEVICE, requires_grad=True)
    mask = torch.ones(1, 23, dtype=torch.bool, device=DEVICE)
    mask[0, 3] = False

    def loss_fn(q, k, v):
        out, lse = flash_attention(q, k, v, causal=True, key_padding_mask=mask, return_lse=True)
        return (out * out).sum() + 0.1 * lse.sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v))
    want = loss_fn(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_strided_or_transposed_padding_mask(backend, use_backend):
    """A key padding mask sliced or transposed out of a larger one (its keys not at stride 1): the same output as
    its contiguous copy and the float64 reference (the Triton kernels read a row's keys at stride 1)."""
    use_backend(backend)
    torch.manual_seed(0)
    B, H, N, D = 2, 2, 8, 16
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE) for _ in range(3))
    strided = (torch.rand(B, 2 * N, device=DEVICE) > 0.5)[:, ::2]
    transposed = (torch.rand(N, B, device=DEVICE) > 0.5).T
    for mask in (strided, transposed):
        mask[:, 0] = True  # no fully masked row: the reference's zeros and the kernel's agree there anyway
        out = flash_attention(q, k, v, key_padding_mask=mask)
        want, _ = attention_reference(q.double(), k.double(), v.double(), key_padding_mask=mask)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


def test_only_out_or_only_lse_used(use_backend):
    use_backend("triton")
    q, k, v, mask, dout, _ = _inputs((1, 2, 2, 20, 20, 32, True, False, False))
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, causal=True)
    (dq,) = torch.autograd.grad((out.double() * dout).sum(), (q,))
    _, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    (dq_lse,) = torch.autograd.grad(lse.sum(), (q,))
    ref_q = q.detach().double().requires_grad_()
    ref_out, ref_lse = attention_reference(ref_q, k.detach().double(), v.detach().double(), causal=True)
    (want,) = torch.autograd.grad((ref_out * dout).sum(), ref_q, retain_graph=True)
    torch.testing.assert_close(dq.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dq_lse.double(), torch.autograd.grad(ref_lse.sum(), ref_q)[0], atol=1e-5, rtol=1e-5)


@needs_triton
def test_empty_sequences(use_backend):
    use_backend("triton")
    q = torch.randn(2, 2, 0, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 5, 16, device=DEVICE, requires_grad=True)
    out, lse = flash_attention(q, k, k, return_lse=True)
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0)
    q = torch.randn(2, 2, 3, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 0, 16, device=DEVICE, requires_grad=True)
    out, lse = flash_attention(q, k, k, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk = torch.autograd.grad(out.sum(), (q, k))
    assert (dq == 0).all() and dk.shape == k.shape


# ----------------------------------------------------------------------------- tiles, dispatch, input checks


def test_tile_config():
    # sm_90: the frozen defaults for 2-byte inputs, unchanged by the shared-memory fit
    cfg = tk.tile_config(64, 2, (9, 0), 232448)
    assert cfg.block_d == 64 and cfg.fwd == tk.SM90[64][0] and cfg.dkdv == tk.SM90[64][1]
    assert tk.tile_config(128, 2, (9, 0)).fwd == tk.SM90[128][0]
    assert tk.tile_config(40, 2, (9, 0)).block_d == 64 and tk.tile_config(160, 2, (9, 0)).block_d == 256
    assert tk.tile_config(8, 2, (9, 0)).block_d == 16
    # every result fits the shared memory it was given; smaller devices get smaller tiles
    for cap, smem in (((9, 0), 232448), ((8, 0), 166912), ((8, 6), 101376), ((8, 9), 101376)):
        for D in (32, 40, 64, 80, 96, 128, 160, 256):
            for itemsize in (2, 4):
                cfg = tk.tile_config(D, itemsize, cap, smem)
                for kind, t in zip(("fwd", "dkdv", "dq"), (cfg.fwd, cfg.dkdv, cfg.dq)):
                    assert tk._smem(kind, t, cfg.block_d, itemsize) <= smem, (cap, D, itemsize, kind, t)
                    assert min(t.block_m, t.block_n) >= 16
    big, small = tk.tile_config(128, 2, (9, 0)), tk.tile_config(128, 2, (8, 6))
    assert small.fwd.block_m * small.fwd.block_n < big.fwd.block_m * big.fwd.block_n
    assert tk.tile_config(64, 4, None) == tk.tile_config(64, 2, None)  # the interpreter's fixed tiles


def test_fp64_falls_back_to_torch_and_forcing_triton_explains(use_backend, monkeypatch):
    q, k, v, *_ = _inputs((1, 2, 2, 9, 9, 16, True, False, False))
    called = []
    monkeypatch.setattr(api.FlashAttention, "apply", lambda *a: called.append(1))
    out = flash_attention(q, k, v, causal=True)  # fp64: auto-dispatch runs torch
    assert not called
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True)[0])
    use_backend("triton")
    with pytest.raises(RuntimeError, match=r"FUSEDRL_BACKEND=triton cannot run flash_attention: .*float64"):
        flash_attention(q, k, v)


def test_forced_triton_refuses_big_head_dim(use_backend):
    q = torch.randn(1, 1, 4, 512)
    assert "head dim D=512" in api._supports([q, q, q], dispatch.Backend.TRITON)
    if not TRITON_RUNS:
        return
    use_backend("triton")
    with pytest.raises(RuntimeError, match="head dim D=512 is larger than"):
        flash_attention(q.to(DEVICE), q.to(DEVICE), q.to(DEVICE))
    use_backend("auto")
    out = flash_attention(q.to(DEVICE), q.to(DEVICE), q.to(DEVICE))  # auto: falls back to torch
    assert out.shape == q.shape


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's bf16 refusal")
def test_interpreter_refuses_bf16(use_backend):
    q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    assert flash_attention(q, q, q).dtype == torch.bfloat16  # auto: torch
    use_backend("triton")
    with pytest.raises(RuntimeError, match="bf16 under TRITON_INTERPRET=1"):
        flash_attention(q, q, q)


def test_sdpa_is_causal_is_top_left_for_nonsquare():
    """Why api.py builds its own bottom-right mask: SDPA's is_causal aligns top-left when Nq != Nkv
    (torch 2.5 through 2.14 at least), unlike flash-attn and this function."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8, generator=g, dtype=torch.float64) for n in (3, 5, 5))
    top_left = torch.ones(3, 5, dtype=torch.bool).tril()
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(sdpa, F.scaled_dot_product_attention(q, k, v, attn_mask=top_left))
    ours = flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(ours, attention_reference(q, k, v, causal=True)[0])
    assert not torch.allclose(ours, sdpa)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(q=torch.randn(1, 2, 4)), ValueError, r"q must have shape \[B, H, N, D\]"),
        (dict(k=torch.randn(1, 2, 5, 8).half()), TypeError, "q, k, v must share one dtype"),
        (dict(q=torch.randn(1, 2, 4, 8).long()), TypeError, "q must be fp16, bf16, fp32 or fp64"),
        (dict(v=torch.randn(1, 2, 6, 8)), ValueError, "k and v must have the same shape"),
        (dict(k=torch.randn(1, 2, 5, 4), v=torch.randn(1, 2, 5, 4)), ValueError, "batch and head dim must agree"),
        (dict(q=torch.randn(1, 3, 4, 8)), ValueError, "multiple of the key/value heads"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(scale=0.0), ValueError, "scale must be a finite float > 0"),
        (dict(key_padding_mask=torch.ones(1, 5)), TypeError, "key_padding_mask must be a bool tensor"),
        (dict(key_padding_mask=torch.ones(1, 4, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape"),
        (dict(q="q"), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    args = dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 5, 8), v=torch.randn(1, 2, 5, 8))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=match):
        flash_attention(q, k, v, **args)


def test_sdpa_takes_hopper_calls_that_its_fast_paths_serve():
    from fusedrl.kernels.attention.api import sdpa_is_faster
    from fusedrl.kernels.tiles import DeviceLimits

    h100, a100 = DeviceLimits((9, 0), 227 * 1024, 132), DeviceLimits((8, 0), 163 * 1024, 108)
    plain = dict(return_lse=False, key_padding_mask_given=False, causal=False, Nq=4096, Nkv=4096)
    assert sdpa_is_faster("cuda", torch.bfloat16, h100, **plain)
    assert sdpa_is_faster("cuda", torch.float16, h100, **dict(plain, causal=True))
    assert not sdpa_is_faster("cuda", torch.bfloat16, a100, **plain)  # not measured there: the kernels stay
    assert not sdpa_is_faster("cuda", torch.float32, h100, **plain)
    assert not sdpa_is_faster("cpu", torch.bfloat16, h100, **plain)
    assert not sdpa_is_faster("cuda", torch.bfloat16, h100, **dict(plain, return_lse=True))  # SDPA returns no lse
    assert not sdpa_is_faster("cuda", torch.bfloat16, h100, **dict(plain, key_padding_mask_given=True))
    assert not sdpa_is_faster("cuda", torch.bfloat16, h100, **dict(plain, causal=True, Nkv=5000))  # bottom-right
