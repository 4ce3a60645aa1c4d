"""token_logprobs (hidden states + LM head) on every backend that runs here, against float64."""

from __future__ import annotations

import math
import os

import pytest
import torch

from fusedrl.kernels import token_logprobs
from fusedrl.kernels.logprobs import hidden_op, hidden_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

# (hidden shape, V, bias, softcap, temperature, strided hidden, frozen weight)
CASES = [
    ((127, 96), 1025, True, None, 1.0, False, False),
    ((3, 6, 40), 50257, False, None, 0.7, True, False),
    ((2, 9, 64), 333, True, 5.0, 0.9, False, True),
]


def _inputs(case, dtype, seed=0):
    shape, V, with_bias, *_ = case
    g = torch.Generator().manual_seed(seed)
    H = shape[-1]
    hidden = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 3
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if with_bias else None
    labels = torch.randint(0, V, shape[:-1], generator=g)
    labels.view(-1)[::4] = -100
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)
    return cast(hidden), cast(weight), cast(bias), labels.to(DEVICE)


def _err(a, b):
    return 0.0 if a is None and b is None else (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=["127x96-V1025-bias", "3x6x40-V50257-strided-T0.7",
                                             "2x9x64-V333-softcap-frozen"])
def test_matches_float64(case, dtype, backend, use_backend):
    _check_against_float64(case, dtype, backend, use_backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=["127x96-V1025-bias", "3x6x40-V50257-strided-T0.7",
                                             "2x9x64-V333-softcap-frozen"])
def test_chunked_strategy_matches_float64(case, dtype, use_backend, monkeypatch):
    """The "chunked" strategy: torch.mm writes each vocabulary chunk's fp32 logits, Triton reduces them."""
    monkeypatch.setenv("FUSEDRL_TOKEN_LOGPROBS", "chunked")
    _check_against_float64(case, dtype, "triton", use_backend)


@pytest.mark.parametrize("strategy", ["fused", "chunked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=["127x96-V1025-bias", "2x9x64-V333-softcap-frozen"])
def test_triton_in_vocabulary_chunks(case, dtype, strategy, use_backend, monkeypatch):
    """Many vocabulary chunks (a partial last one, the fp32 dh accumulator for fp16/bf16; the chunked forward
    carrying its online state from chunk to chunk), as on a GPU at real sizes; the other tests fit in one."""
    from fusedrl.kernels.logprobs import hidden_op

    monkeypatch.setattr(hidden_op, "CHUNK_MIN_BYTES", 1)
    monkeypatch.setattr(hidden_op, "ROW_ALIGN", 8)
    monkeypatch.setenv("FUSEDRL_TOKEN_LOGPROBS", strategy)
    shape, V, *_, frozen = case
    N, H = math.prod(shape[:-1]), shape[-1]
    assert hidden_op.chunk_columns(N, V, 4) < V
    R, _ = hidden_op.backward_blocks(N, H, V, dtype.itemsize, strategy == "chunked", not frozen)
    assert R < N if dtype != torch.float32 else R == N  # rows in blocks under an fp32 dh sum (dW summed over them)
    _check_against_float64(case, dtype, "triton", use_backend)


@pytest.mark.parametrize("chunked", [False, True], ids=["fused", "chunked"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_backward_buffers_stay_under_one_percent_of_the_logits(frozen, chunked):
    """Issue 3's memory bound at its size (N = 8192, H = 4096, V = 131072, bf16): the backward's chunk
    buffers (dz, and the fp32 logits chunk when chunked) and the fp32 dh accumulator of a row block, within 1%
    of the [N, V] fp32 logits, with the head frozen or trained (dW summed over the row blocks in its dtype)."""
    from fusedrl.kernels.logprobs import hidden_op

    N, H, V = 8192, 4096, 131072
    R, C = hidden_op.backward_blocks(N, H, V, 2, chunked, not frozen)
    assert C % 128 == 0 and R % 128 == 0
    held = R * C * (2 + 4 * chunked) + R * H * 4  # + the block's fp32 dh sum
    assert held <= 0.01 * 4 * N * V, held / 2**20
    assert R < N and N / R <= hidden_op.MAX_DW_BLOCKS  # at most 8 roundings of a trained bf16 head's dW
    R, _ = hidden_op.backward_blocks(N, H, 32000, 2, chunked, True)  # a small vocabulary: dW's roundings capped
    assert R == N // hidden_op.MAX_DW_BLOCKS and hidden_op.backward_blocks(N, H, 32000, 2, chunked, False)[0] < R
    assert N * hidden_op.chunk_columns(N, V, 4) * 4 <= 0.01 * 4 * N * V  # the chunked forward's logits chunk
    assert hidden_op.chunk_columns(8, 1000, 2) == 1024  # small problems: one chunk (V rounded up to 128)


def test_unknown_strategy_is_named(monkeypatch):
    from fusedrl.kernels.logprobs import hidden_op

    monkeypatch.setenv("FUSEDRL_TOKEN_LOGPROBS", "tiled")
    with pytest.raises(ValueError, match="FUSEDRL_TOKEN_LOGPROBS='tiled'.*fused.*chunked"):
        hidden_op.strategy()


@pytest.mark.parametrize("splits", [2, 3, 64])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=["127x96-V1025-bias", "2x9x64-V333-softcap-frozen"])
def test_triton_forward_in_vocabulary_splits(case, splits, use_backend, monkeypatch):
    """The Triton forward with its vocabulary cut into splits whose partials a second kernel merges, as on a
    GPU when the row blocks alone leave multiprocessors idle (a partial last split; 64 asks for more splits
    than there are vocabulary tiles, and the launcher cuts one split per tile instead); the other tests run
    one split."""
    from fusedrl.kernels.logprobs import hidden_op

    monkeypatch.setattr(hidden_op, "vocab_splits", lambda *args: splits)
    _check_against_float64(case, torch.float32, "triton", use_backend)


def test_vocab_splits_fill_the_multiprocessors():
    from fusedrl.kernels.logprobs import hidden_op, hidden_triton
    from fusedrl.kernels.tiles import INTERPRETER, DeviceLimits

    tiles = hidden_triton.GPU_TILES[0]  # 128 rows x 128 columns
    h200 = DeviceLimits((9, 0), 227 * 1024, multiprocessors=132)
    assert hidden_op.vocab_splits(8192, 131072, tiles, h200) == 2  # 64 row blocks: 48% busy alone, 97% with 2
    assert hidden_op.vocab_splits(16384, 131072, tiles, h200) == 1  # 128 row blocks fill 97%
    assert hidden_op.vocab_splits(12288, 131072, tiles, h200) == 4  # 96 -> 384 programs in 3 waves of 132
    assert hidden_op.vocab_splits(128, 200, tiles, h200) == 2  # never more splits than vocabulary tiles
    assert hidden_op.vocab_splits(8192, 131072, tiles, INTERPRETER) == 1


def _check_against_float64(case, dtype, backend, use_backend):
    shape, V, with_bias, softcap, temperature, strided, frozen = case
    hidden, weight, bias, labels = _inputs(case, dtype)
    if strided:  # like hidden[:, :-1] in a causal LM: rows not contiguous
        hidden = torch.cat([hidden, hidden[:, :1]], dim=1)[:, :-1]
        assert not hidden.is_contiguous()
    g = torch.Generator().manual_seed(1)
    w_logp = torch.randn(labels.shape, generator=g, dtype=torch.float64).to(DEVICE)
    w_ent = torch.randn(labels.shape, generator=g, dtype=torch.float64).to(DEVICE)

    def run(fn, cast):
        h = cast(hidden).detach().requires_grad_()
        w = cast(weight).detach().requires_grad_(not frozen)
        b = None if bias is None else cast(bias).detach().requires_grad_()
        logp, ent = fn(h, w, b)
        inputs = [t for t in (h, w, b) if t is not None and t.requires_grad]
        grads = torch.autograd.grad((logp.double() * w_logp).sum() + (ent.double() * w_ent).sum(), inputs)
        return [logp, ent, *grads]

    naive = lambda h, w, b: tuple(t.reshape(labels.shape) for t in hidden_reference.naive(
        h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), b, temperature, softcap, -100))
    exp = run(naive, lambda t: t.double())
    base = run(naive, lambda t: t)  # the naive formula at the input dtype: the error budget
    use_backend(backend)
    got = run(lambda h, w, b: token_logprobs(h, w, labels, bias=b, temperature=temperature, softcap=softcap,
                                             return_entropy=True), lambda t: t)
    names = ["logp", "entropy", "d_hidden"] + ([] if frozen else ["d_weight"]) + (["d_bias"] if with_bias else [])
    assert len(got) == len(names)
    for name, a, b, e in zip(names, got, base, exp):
        ulp = torch.finfo(dtype if name.startswith("d_") else torch.float32).eps * max(1.0, e.abs().max().item())
        budget = 4 * _err(b, e) + 8 * ulp
        assert _err(a, e) <= budget, f"{name}: {_err(a, e):.3g} > {budget:.3g}"
    assert (got[0] <= 0).all()
    ignored = labels == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all() and (got[2][ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_gets_no_gradient(backend, use_backend):
    use_backend(backend)
    hidden, weight, _, labels = _inputs(CASES[0], torch.float32)
    h = hidden.clone().requires_grad_()
    token_logprobs(h, weight, labels).sum().backward()
    assert weight.grad is None and h.grad is not None and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("strategy", ["fused", "chunked"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_strided_bias(backend, strategy, use_backend, monkeypatch):
    """A bias sliced out of a larger tensor: the same log-probs and bias gradient as its contiguous copy."""
    use_backend(backend)
    monkeypatch.setenv(hidden_op.ENV_STRATEGY, strategy)
    hidden, weight, _, labels = _inputs(CASES[0], torch.float32)
    wide = torch.randn(2 * weight.shape[0], device=hidden.device, requires_grad=True)
    dense = wide.detach()[::2].contiguous().requires_grad_()
    got, want = (token_logprobs(hidden, weight, labels, bias=b) for b in (wide[::2], dense))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (got.sum() + want.sum()).backward()
    torch.testing.assert_close(wide.grad[::2], dense.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["fused", "chunked"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_hidden_state_gives_nan_not_a_certain_token(backend, strategy, use_backend, monkeypatch):
    """A NaN in a row's hidden state reads NaN in its logp and entropy on every path (the Triton kernels clamped
    logp at 0 with a minimum that dropped NaN: probability 1, finite losses)."""
    use_backend(backend)
    monkeypatch.setenv(hidden_op.ENV_STRATEGY, strategy)
    hidden, weight, _, labels = _inputs(CASES[0], torch.float32)
    labels = labels.clamp(min=0)
    hidden[5, 3] = float("nan")
    logp, ent = token_logprobs(hidden, weight, labels, return_entropy=True)
    assert logp[5].isnan() and ent[5].isnan()
    keep = torch.arange(len(labels), device=logp.device) != 5
    assert torch.isfinite(logp[keep]).all() and torch.isfinite(ent[keep]).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(weight=torch.randn(50, 7)), ValueError, r"weight must have shape \[V, H\] = \[V, 8\]"),
        (dict(weight=torch.randn(50, 8).double()), TypeError, "weight is torch.float64 but hidden is torch.float32"),
        (dict(labels=torch.tensor([0, 50, 1])), ValueError, r"labels must lie in \[0, 50\)"),
        (dict(labels=torch.tensor([0, 1])), ValueError, r"labels has shape \(2,\)"),
        (dict(bias=torch.randn(49)), ValueError, r"bias must have shape \[V\] = \[50\]"),
        (dict(softcap=0.0), ValueError, "softcap must be a finite float > 0"),
        (dict(hidden=torch.randn(3, 8).long()), TypeError, "hidden must be a floating-point tensor"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    args = dict(hidden=torch.randn(3, 8), weight=torch.randn(50, 8), labels=torch.tensor([0, 1, 2]))
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("bias", "softcap") if k in args}
    with pytest.raises(error, match=match):
        token_logprobs(args["hidden"], args["weight"], args["labels"], **extra)


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA allocator's peak needs a GPU")
@pytest.mark.parametrize("strategy", ["fused", "chunked"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_peak_extra_memory_on_gpu(frozen, strategy, monkeypatch):
    """Forward + backward hold, beyond the inputs and the returned gradients, at most 1% of the [N, V] fp32
    logits, with the head frozen or trained, measured by the CUDA allocator."""
    monkeypatch.setenv("FUSEDRL_BACKEND", "triton")
    monkeypatch.setenv("FUSEDRL_TOKEN_LOGPROBS", strategy)
    N, H, V = 8192, 1024, 65536
    hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / H**0.5).requires_grad_(not frozen)
    labels = torch.randint(0, V, (N,), device="cuda")
    inputs = [t for t in (hidden, weight) if t.requires_grad]

    def step():
        logp, entropy = token_logprobs(hidden, weight, labels, return_entropy=True)
        return torch.autograd.grad(logp.sum() + entropy.sum(), inputs)

    step()  # cuBLAS's workspace (32 MiB on sm_90) is allocated by the first matmul: not this op's memory
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = step()
    torch.cuda.synchronize()
    returned = sum(g.numel() * g.element_size() for g in grads) + 2 * N * 4 * 2  # + logp, entropy and their grads
    extra = torch.cuda.max_memory_allocated() - base - returned
    bound = 0.01 * 4 * N * V
    assert extra <= bound, f"{extra / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"


@pytest.mark.parametrize("strategy", ["fused", "chunked"])
def test_custom_ops_pass_opcheck(strategy):
    """torch.library.opcheck of the forward and backward custom ops (schema, fake tensors, autograd registration)."""
    from fusedrl.kernels.logprobs import hidden_op

    hidden, weight, bias, labels = _inputs(CASES[0], torch.float32)
    labels = labels.reshape(-1)
    fwd = (hidden, weight, bias, labels, 0.8, 0.0, -100, True, "triton", strategy)
    torch.library.opcheck(hidden_op.hidden_logprobs_fwd, fwd)
    logp, entropy, lse = hidden_op.hidden_logprobs_fwd(*fwd)
    g = torch.ones_like(logp)
    torch.library.opcheck(hidden_op.hidden_logprobs_bwd, (hidden, weight, bias, labels, lse, entropy, g, g, 0.8, 0.0,
                                                          -100, True, True, True, "triton", strategy))


def test_chunked_strategy_refuses_cuda_without_fp32_out_matmuls(monkeypatch):
    """Where torch.mm has no out_dtype (CUDA, torch < 2.8), the chunked strategy says so instead of failing inside."""
    from fusedrl.kernels.logprobs import hidden_op

    class CudaBf16:  # what _check reads of a CUDA bf16 tensor
        is_cuda, dtype = True, torch.bfloat16

    assert hidden_op.fp32_out_matmuls("cpu") is False  # CPU tensors upcast instead
    monkeypatch.setattr(hidden_op, "fp32_out_matmuls", lambda device_type: False)
    with pytest.raises(RuntimeError, match="FUSEDRL_TOKEN_LOGPROBS=chunked needs torch.mm.*out_dtype"):
        hidden_op._check("triton", "chunked", CudaBf16())
    hidden_op._check("triton", "fused", CudaBf16())  # the fused strategy needs no such matmul
