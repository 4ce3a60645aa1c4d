"""The CUDA extension: it builds and registers its ops (nvcc only, no GPU needed), and on a GPU its
kernels match the Triton kernels, which are the spec (kernels/diffusion_step/triton_kernels.py,
kernels/logprobs/triton_kernels.py, kernels/grpo_loss/triton_kernels.py).

The build reuses the persistent cache (`fusedrl.kernels.cuda_ext.cache_dir()`, keyed by a hash of
sources and flags), so only the first run pays the compile (about a minute on 2 cores).

GPU checks need the Triton kernels on the GPU as the oracle, so run them with
`TRITON_INTERPRET=0 python -m pytest tests` (tests/conftest.py sets it to 1 only by default). In that
mode tests/conftest.py builds the extension before the first test, so tests/test_diffusion_step.py
and tests/test_logprobs.py also check the `cuda` backend against float64; the `extension` fixture here
builds it too, so this module stands alone.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from fusedrl.kernels import cuda_ext
from fusedrl.kernels.diffusion_step import op as step_op
from fusedrl.kernels.grpo_loss import op as grpo_op
from fusedrl.kernels.grpo_loss import triton_kernels as grpo_tk
from fusedrl.kernels.logprobs import op as logprobs_op

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FWD_SCHEMA = (
    "fusedrl_C::diffusion_step_fwd(Tensor x, Tensor m, Tensor p0, Tensor p1, Tensor? noise, Tensor? given, "
    "Tensor? ref, int mode, int pred, float level, float sigma_max, float clip, bool clipped_eps, bool want_logp, "
    "ScalarType out_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "fusedrl_C::diffusion_step_bwd(Tensor x, Tensor m, Tensor p0, Tensor p1, Tensor? noise, Tensor? given, "
    "Tensor? ref, Tensor? g_prev, Tensor? g_mean, Tensor? g_logp, Tensor? g_kl, int mode, int pred, float level, "
    "float sigma_max, float clip, bool clipped_eps, bool need_g_ref) -> (Tensor, Tensor, Tensor)"
)
LOGPROBS_FWD_SCHEMA = (
    "fusedrl_C::logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, bool want_entropy) "
    "-> (Tensor, Tensor, Tensor)"
)
LOGPROBS_BWD_SCHEMA = (
    "fusedrl_C::logprobs_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor entropy, Tensor? g_logp, "
    "Tensor? g_entropy, float temperature, int ignore_index) -> Tensor"
)
GRPO_ROWS_SCHEMA = (
    "fusedrl_C::grpo_rows(Tensor logp, Tensor? old_logp, Tensor advantages, Tensor mask, Tensor? ref_logp, "
    "Tensor? entropy, float eps_low, float eps_high, float delta, float beta, float tau_pos, float tau_neg, "
    "int loss_kind, int kl_kind, bool sequence, bool has_delta, bool bias_correction) -> (Tensor, Tensor)"
)
OP_NAMES = ("diffusion_step_fwd", "diffusion_step_bwd", "logprobs_fwd", "logprobs_bwd", "grpo_rows")


@pytest.fixture(scope="module")
def extension():
    """Build (or reuse the cached build of) the extension and load it into this process."""
    if cuda_ext.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit found (bin/nvcc and lib64/libcudart.so): the CUDA extension cannot be built")
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        pytest.skip("ninja is not installed (pip install ninja): cpp_extension builds with it")
    return cuda_ext.build()


@pytest.mark.cuda_build
@pytest.mark.slow
def test_build_registers_the_ops(extension):
    assert extension.is_file()
    assert cuda_ext.is_loaded()
    assert cuda_ext.build() == extension  # a second build in the process reuses the loaded one
    ops = cuda_ext.ops()
    assert str(ops.diffusion_step_fwd.default._schema) == FWD_SCHEMA
    assert str(ops.diffusion_step_bwd.default._schema) == BWD_SCHEMA
    assert str(ops.logprobs_fwd.default._schema) == LOGPROBS_FWD_SCHEMA
    assert str(ops.logprobs_bwd.default._schema) == LOGPROBS_BWD_SCHEMA
    assert str(ops.grpo_rows.default._schema) == GRPO_ROWS_SCHEMA
    for name in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedrl_C::{name}", "CUDA")


@pytest.mark.cuda_build
@pytest.mark.slow
def test_schemas_match_the_python_ops(extension):
    """op.py passes its own arguments, minus `backend`, positionally: names and types must line up."""
    for name in OP_NAMES:
        python_op = getattr(torch.ops.fusedrl, name).default._schema.arguments
        cuda_op = getattr(cuda_ext.ops(), name).default._schema.arguments
        assert [(a.name, str(a.type)) for a in python_op if a.name != "backend"] == [
            (a.name, str(a.type)) for a in cuda_op
        ]


# ----------------------------------------------------------------------------- on a GPU

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET,
    reason="needs a CUDA device and TRITON_INTERPRET=0 (the Triton kernels on the GPU are the oracle)",
)

# name -> (mode, pred, clip, clipped_eps, level, sigma_max, p0, p1); the schedules of test_diffusion_step.py
CASES = {
    "flow-sde": (0, 0, 0.0, False, 0.7, 0.93, [1.0, 0.63, 0.21], [0.93, 0.5, 0.0]),
    "flow-cps": (1, 0, 0.0, False, math.sin(0.7 * math.pi / 2), math.nan, [1.0, 0.63, 0.21], [0.93, 0.5, 0.04]),
    "flow-dance": (3, 0, 0.0, False, 0.3, math.nan, [1.0, 0.63, 0.21], [0.93, 0.5, 0.0]),
    "ddim-eps": (2, 0, 0.0, False, 1.0, math.nan, [0.05, 0.5, 0.93], [0.08, 0.62, 0.9991]),
    "ddim-sample": (2, 1, 0.0, False, 1.0, math.nan, [0.05, 0.5, 0.93], [0.08, 0.62, 0.9991]),
    "ddim-v": (2, 2, 0.0, False, 0.8, math.nan, [0.05, 0.5, 0.93], [0.08, 0.62, 0.9991]),
    "ddim-eps-clip": (2, 0, 1.0, False, 1.0, math.nan, [0.05, 0.5, 0.93], [0.08, 0.62, 0.9991]),
    "ddim-v-clip-clipeps": (2, 2, 1.0, True, 1.0, math.nan, [0.05, 0.5, 0.93], [0.08, 0.62, 0.9991]),
}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (x, m, out): every step in fp32 and bf16; fp16 and the mixes (a fp32 latent with a bf16 model, an
# odd out_dtype) in the two steps that use most of the code. Each combination costs one more
# Triton compile on the GPU (about a second).
COMBOS = [(case, dtypes) for case in CASES for dtypes in [(F32, F32, F32), (BF16, BF16, BF16)]] + [
    (case, dtypes)
    for case in ("flow-sde", "ddim-v-clip-clipeps")
    for dtypes in [(F16, F16, F16), (F32, BF16, F32), (BF16, F32, F16)]
]
# D = 1025: tails, scalar path; 3 * 4096 + 8: several chunks, 4-wide path
DIMS = [1025, 3 * 4096 + 8]

def _inputs(case, B, D, dtypes, sampled, offset=0):
    """Op-level inputs; offset > 0 places every [B, D] tensor off its allocation's alignment."""
    mode, pred, clip, clipped_eps, level, sigma_max, p0, p1 = CASES[case]
    tx, tm, to = dtypes

    def rows(dtype, scale=1.0, like=None):
        t = torch.randn(B, D, device="cuda") * scale + (0.0 if like is None else like.float())
        return _misaligned(t.to(dtype), offset) if offset else t.to(dtype)

    x = rows(tx)
    m = rows(tm)
    noise = rows(tm) if sampled else None
    given = None if sampled else rows(to, 0.3, like=x)
    ref = rows(to, 0.1, like=x)
    p = [torch.tensor(v[:B], device="cuda", dtype=torch.float32) for v in (p0, p1)]
    return (x, m, p[0], p[1], noise, given, ref), (mode, pred, level, sigma_max, clip, clipped_eps), to


def _misaligned(t, offset):
    """A contiguous copy of t whose data pointer is `offset` elements past an aligned allocation."""
    buf = torch.empty(t.numel() + offset, device=t.device, dtype=t.dtype)
    out = buf[offset:].view(t.shape)
    out.copy_(t)
    return out


def _tol(dtype):
    # Both backends compute in fp32 but may contract or order differently: a few fp32 ulps, which
    # can flip one rounding of the stored dtype.
    return {F32: 2e-5, F16: 2 * 2.0**-10, BF16: 2 * 2.0**-7}[dtype]


def _close(got, want, dtype, name):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    tol = _tol(dtype)
    scale = max(1.0, want.float().abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def _fwd(backend, tensors, scalars, want_logp, out_dtype):
    x, m, p0, p1, noise, given, ref = tensors
    mode, pred, level, sigma_max, clip, clipped_eps = scalars
    args = (x, m, p0, p1, noise, given, ref, mode, pred, level, sigma_max, clip, clipped_eps, want_logp, out_dtype)
    if backend == "cuda":
        return tuple(cuda_ext.ops().diffusion_step_fwd(*args))
    return step_op._triton_fwd(*args)


def _bwd(backend, tensors, grads, scalars, need_g_ref):
    mode, pred, level, sigma_max, clip, clipped_eps = scalars
    args = (*tensors, *grads, mode, pred, level, sigma_max, clip, clipped_eps, need_g_ref)
    if backend == "cuda":
        return tuple(cuda_ext.ops().diffusion_step_bwd(*args))
    return step_op._triton_bwd(*args)


@gpu
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "given"])
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize(("case", "dtypes"), COMBOS,
                         ids=[f"{c}-" + "-".join(str(t)[6:] for t in d) for c, d in COMBOS])
def test_cuda_matches_triton(extension, case, dtypes, D, sampled):
    torch.manual_seed(hash((case, D, sampled)) % 2**31)
    tensors, scalars, out_dtype = _inputs(case, 3, D, dtypes, sampled)
    got = _fwd("cuda", tensors, scalars, True, out_dtype)
    want = _fwd("triton", tensors, scalars, True, out_dtype)
    for name, g, w in zip(["prev", "mean", "logp", "kl", "std"], got, want):
        _close(g, w, out_dtype if name in ("prev", "mean") else F32, name)

    x, m, _, _, _, _, ref = tensors
    g_out = lambda: torch.randn(x.shape, device="cuda").to(out_dtype)
    grads = (g_out() if sampled else None, g_out(), torch.randn(3, device="cuda"), torch.randn(3, device="cuda"))
    got = _bwd("cuda", tensors, grads, scalars, True)
    want = _bwd("triton", tensors, grads, scalars, True)
    for name, g, w, like in zip(["grad x", "grad m", "grad ref"], got, want, (x, m, ref)):
        _close(g, w, like.dtype, name)


@gpu
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "given"])
def test_cuda_optional_outputs_and_grads(extension, sampled):
    """No logp, no ref; and backward with only some incoming gradients, as autograd passes them."""
    tensors, scalars, out_dtype = _inputs("ddim-eps-clip", 3, 1025, (F32, F32, F32), sampled)
    x, m, p0, p1, noise, given, _ = tensors
    bare = (x, m, p0, p1, noise, given, None)
    prev, mean, logp, kl, std = _fwd("cuda", bare, scalars, False, out_dtype)
    assert prev.shape == ((3, 1025) if sampled else (0,)) and logp.shape == (0,) and kl.shape == (0,)
    want = _fwd("triton", bare, scalars, False, out_dtype)
    _close(mean, want[1], F32, "mean")
    _close(std, want[4], F32, "std")
    g_logp = torch.randn(3, device="cuda")
    for grads in [(None, None, g_logp, None), (None, torch.randn_like(x), None, None)]:
        got = _bwd("cuda", bare, grads, scalars, False)
        want = _bwd("triton", bare, grads, scalars, False)
        _close(got[0], want[0], F32, "grad x")
        _close(got[1], want[1], F32, "grad m")
        assert got[2].shape == (0,)
    # ref needs a gradient but kl got none: it is zero (not uninitialized memory)
    gx, gm, gref = _bwd("cuda", tensors, (None, None, g_logp, None), scalars, True)
    assert torch.equal(gref, torch.zeros_like(tensors[6]))


@gpu
@pytest.mark.parametrize("dtypes", [(F32, F32, F32), (BF16, F16, BF16)], ids=["fp32", "bf16-fp16"])
def test_cuda_misaligned_rows_match_aligned(extension, dtypes):
    """Pointers off the 4-element alignment take the scalar path; the numbers are the same bits."""
    torch.manual_seed(0)
    tensors, scalars, out_dtype = _inputs("flow-sde", 3, 2244, dtypes, True, offset=1)
    assert tensors[0].data_ptr() % 16 != 0
    aligned = tuple(None if t is None else t.clone() for t in tensors)
    for got, want in zip(_fwd("cuda", tensors, scalars, True, out_dtype),
                         _fwd("cuda", aligned, scalars, True, out_dtype)):
        assert torch.equal(got, want)


@gpu
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "given"])
def test_cuda_backend_passes_opcheck(extension, sampled):
    """The Python custom op on the cuda backend: schema, fake kernel (its autograd is `DiffusionStep`'s, which
    pairs the forward and backward ops: opcheck's autograd checks need inputs that require no grad)."""
    x, m, ref = (torch.randn(2, 37, device="cuda") for _ in range(3))
    noise, given = (torch.randn(2, 37, device="cuda"), None) if sampled else (None, torch.randn(2, 37, device="cuda"))
    p0, p1 = torch.tensor([0.8, 0.5], device="cuda"), torch.tensor([0.7, 0.3], device="cuda")
    args = (x, m, p0, p1, noise, given, ref, 0, 0, 0.7, math.nan, 0.0, False, True, F32, "cuda")
    torch.library.opcheck(step_op.diffusion_step_fwd, args)


@gpu
def test_cuda_is_deterministic(extension):
    tensors, scalars, out_dtype = _inputs("flow-sde", 3, 64 * 4096 + 3, (BF16, BF16, BF16), True)
    first = _fwd("cuda", tensors, scalars, True, out_dtype)
    for _ in range(3):
        for got, want in zip(_fwd("cuda", tensors, scalars, True, out_dtype), first):
            assert torch.equal(got, want)


@gpu
def test_cuda_batch_beyond_grid_limit(extension):
    """B > 65535 (the grid's y limit): the rows past it are strided over and come out right."""
    B = 65535 + 7
    sigma = torch.full((B,), 0.6, device="cuda")
    sigma_next = torch.full((B,), 0.5, device="cuda")
    x, v, z, ref = (torch.randn(B, 6, device="cuda") for _ in range(4))
    ones = torch.ones(B, device="cuda")
    scalars = (0, 0, 0.7, math.nan, 0.0, False)
    fwd = lambda rows: cuda_ext.ops().diffusion_step_fwd(
        x[rows], v[rows], sigma[rows], sigma_next[rows], z[rows], None, ref[rows], *scalars, True, F32)
    bwd = lambda rows: cuda_ext.ops().diffusion_step_bwd(
        x[rows], v[rows], sigma[rows], sigma_next[rows], z[rows], None, ref[rows], None, None, ones[rows],
        ones[rows], *scalars, True)
    tail = slice(B - 20, B)
    for full, part in ((fwd(slice(None)), fwd(tail)), (bwd(slice(None)), bwd(tail))):
        for got, want in zip(full, part):
            assert torch.equal(got[tail], want)


# (change to good arguments, error, message)
BAD_INPUTS = [
    (lambda a: a.update(m=a["m"][:, :-1].contiguous()), ValueError, r"m has shape \[2, 7\] but x has shape \[2, 8\]"),
    (lambda a: a.update(x=a["x"].cpu()), ValueError, "x must be a CUDA tensor"),
    (lambda a: a.update(m=a["m"].double()), TypeError, "m must be float32, float16 or bfloat16"),
    (lambda a: a.update(p0=a["p0"].double()), TypeError, "p0 must be float32"),
    (lambda a: a.update(p1=a["p1"][:1]), ValueError, r"p1 must have shape \[B\] = \[2\]"),
    (lambda a: a.update(ref=a["x"].t().contiguous().t()), ValueError, "ref must be contiguous"),
    (lambda a: a.update(noise=None), ValueError, "want_logp without noise needs `given`"),
    (lambda a: a.update(mode=4), ValueError, "mode must be 0"),
    (lambda a: a.update(out_dtype=torch.float64), TypeError, "out_dtype must be float32"),
]


def check_bad_input(index: int) -> None:
    """BAD_INPUTS[index] raises its error with its message (run in a child process, see below)."""
    cuda_ext.build()
    change, error, match = BAD_INPUTS[index]
    x = torch.randn(2, 8, device="cuda")
    a = dict(x=x, m=torch.randn_like(x), p0=torch.tensor([0.6, 0.5], device="cuda"),
             p1=torch.tensor([0.5, 0.4], device="cuda"), noise=torch.randn_like(x), given=None, ref=x.clone(),
             mode=0, pred=0, level=0.7, sigma_max=math.nan, clip=0.0, clipped_eps=False, want_logp=True,
             out_dtype=F32)
    change(a)
    with pytest.raises(error, match=match):
        cuda_ext.ops().diffusion_step_fwd(*a.values())


@gpu
def test_cuda_rejects_bad_input(extension):
    """Each case in a child process, so that a crash fails this test instead of ending the session: on
    the H200 machine (torch 2.11, Python 3.12; 2026-11-27, twice) the child died with SIGSEGV at a check
    that formats a tensor's shape, while the same checks raise cleanly with torch 2.11 and 2.14 on the
    CPU build machine. The failure message says which cases crashed, with a native backtrace where
    cuda-gdb is installed."""
    _run_cases_in_children("check_bad_input", BAD_INPUTS)


CHILDREN_BUDGET_S = 200  # all of one test's child processes, cuda-gdb included: under gpu_check.sh's 240 s per test


def _child(function: str, start: int, stop: int, timeout: float,
           debugger: str | None = None) -> subprocess.CompletedProcess:
    """`function(i)` of this file for i in [start, stop) in one fresh Python process, "case i" printed before each.
    A child past `timeout` seconds is killed and reported with what it printed (returncode None)."""
    code = (f"import runpy; f = runpy.run_path({__file__!r})[{function!r}]\n"
            f"for i in range({start}, {stop}):\n    print('case', i, flush=True)\n    f(i)")
    cmd = [sys.executable, "-X", "faulthandler", "-c", code]
    if debugger:  # batch mode: run, and on a crash print the native stack
        cmd = [debugger, "-q", "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40", "--args", *cmd]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired as exc:
        out, err = (b.decode(errors="replace") if isinstance(b, bytes) else (b or "") for b in (exc.stdout, exc.stderr))
        return subprocess.CompletedProcess(cmd, None, out, f"{err}\n(killed after {timeout:.0f} s)")


def _run_cases_in_children(function: str, cases: list) -> None:
    """Run `function(i)` of this file for every case i in child processes: one for all, and after a case fails
    or crashes, a new one from the next case. Fails naming every case that failed, with its output (each report
    also printed to stderr as it comes, so a test cut by its time limit still shows them); the first case killed
    by a signal runs again alone under cuda-gdb (or gdb), when installed, for a native backtrace. All children
    share CHILDREN_BUDGET_S."""
    deadline = time.monotonic() + CHILDREN_BUDGET_S
    failures, start, debugged = [], 0, False
    while start < len(cases):
        proc = _child(function, start, len(cases), deadline - time.monotonic())
        if proc.returncode == 0:
            break
        reached = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("case ")]
        i = reached[-1] if reached else start
        error, match = cases[i][-2:]
        report = (f"case {i} (expecting {error.__name__}: {match}): exit status {proc.returncode}\n"
                  f"{proc.stderr[-3000:]}")
        debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
        if proc.returncode is not None and proc.returncode < 0 and debugger and not debugged:
            debugged = True
            traced = _child(function, i, i + 1, deadline - time.monotonic(), debugger)
            report += f"\n--- case {i} alone under {debugger}:\n{traced.stdout[-6000:]}\n{traced.stderr[-2000:]}"
        print(report, file=sys.stderr, flush=True)
        failures.append(report)
        if proc.returncode is None or time.monotonic() >= deadline:
            failures.append(f"stopped at case {i}: the children's {CHILDREN_BUDGET_S} s are spent")
            break
        start = i + 1
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n\n".join(failures)


# ----------------------------------------------------------------------------- logprobs on a GPU

LP_DTYPES = [F32, F16, BF16]
# 1: a single column; 96, 151936 (Qwen): 16-byte path; 1025, 50257 (GPT-2): element path
LP_VOCABS = [1, 96, 1025, 50257, 151936]
LP_ROWS = (3, 17)  # B, T: 51 rows, several per block of the grid-strided loop only past 65535
IGNORE = -100


def _lp_inputs(dtype, V, sliced, label_dtype=torch.int64, seed=0):
    """logits [B, T, V] (a `logits[:, :-1]` view when sliced), labels [B, T]: every 5th ignored, one
    label V and one -7 (outside [0, V), not ignore_index: NaN)."""
    B, T = LP_ROWS
    g = torch.Generator(device="cuda").manual_seed(seed)
    full = (torch.randn(B, T + 1, V, device="cuda", generator=g) * 4).to(dtype)
    logits = full[:, :-1] if sliced else full[:, :-1].contiguous()
    labels = torch.randint(0, V, (B, T), device="cuda", generator=g)
    labels.view(-1)[::5] = IGNORE
    labels[0, 1] = V
    labels[1, 2] = -7
    return logits, labels.to(label_dtype)


def _lp_fwd(backend, logits, labels, temperature, want_entropy=True):
    args = (logits, labels, temperature, IGNORE, want_entropy)
    if backend == "cuda":
        return tuple(cuda_ext.ops().logprobs_fwd(*args))
    return tuple(logprobs_op.logprobs_fwd(*args, "triton"))


def _lp_bwd(backend, logits, labels, lse, entropy, g_logp, g_entropy, temperature):
    args = (logits, labels, lse, entropy, g_logp, g_entropy, temperature, IGNORE)
    if backend == "cuda":
        return cuda_ext.ops().logprobs_bwd(*args)
    return logprobs_op.logprobs_bwd(*args, "triton")


def _close_stats(got, want, lse, name):
    """fp32 row statistics. Both backends sum V exponentials in fp32 in different orders (and Triton's
    exp is ex2.approx): they differ by a few fp32 ulps of the row's lse, whose size sets the scale."""
    assert got.dtype == want.dtype == F32 and got.shape == want.shape, name
    tol = 2e-5 * max(1.0, lse.abs().max().item())
    torch.testing.assert_close(got, want, rtol=2e-5, atol=tol, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _close_grad(got, want, dtype):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    # fp32: p = exp(x - lse) moves by the lse difference above; fp16/bf16: that can flip one rounding.
    tol = {F32: 5e-5, F16: 2 * 2.0**-10, BF16: 2 * 2.0**-7}[dtype]
    scale = max(1.0, want.float().abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"grad: {m}")


def _lp_compare(logits, labels, temperature, want_entropy=True):
    """Forward and backward of the cuda backend against the Triton kernels on the same inputs."""
    got = _lp_fwd("cuda", logits, labels, temperature, want_entropy)
    want = _lp_fwd("triton", logits, labels, temperature, want_entropy)
    lse = want[2]
    for name, g, w in zip(("logp", "entropy", "lse"), got, want):
        _close_stats(g, w, lse, name)
    g_logp = torch.randn(labels.shape, device="cuda")
    g_entropy = torch.randn(labels.shape, device="cuda") if want_entropy else None
    grads = [_lp_bwd(b, logits, labels, lse, want[1], g_logp, g_entropy, temperature) for b in ("cuda", "triton")]
    _close_grad(*grads, logits.dtype)
    return got, grads[0]


@gpu
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
@pytest.mark.parametrize("V", LP_VOCABS)
@pytest.mark.parametrize("dtype", LP_DTYPES, ids=lambda d: str(d)[6:])
def test_cuda_logprobs_match_triton(extension, dtype, V, sliced, temperature):
    """int64 labels at temperature 1, int32 at 0.7: both label types meet every dtype and V."""
    label_dtype = torch.int64 if temperature == 1.0 else torch.int32
    logits, labels = _lp_inputs(dtype, V, sliced, label_dtype, seed=V)
    assert logits.is_contiguous() != sliced
    (logp, entropy, lse), grad = _lp_compare(logits, labels, temperature)
    ignored = labels == IGNORE
    out_of_range = ~ignored & ((labels < 0) | (labels >= V))
    assert out_of_range.sum() == 2 and logp[out_of_range].isnan().all()
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    assert (logp[~out_of_range] <= 0).all() and lse.isfinite().all()
    assert (grad[ignored] == 0).all() and grad.isfinite().all()


@gpu
@pytest.mark.parametrize("V", [1025, 4096], ids=["elements", "16-byte"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: str(d)[6:])
def test_cuda_logprobs_masked_vocabulary(extension, dtype, V):
    """-inf logits (a masked vocabulary) have p = 0: finite results, no gradient there."""
    logits, labels = _lp_inputs(dtype, V, False, seed=1)
    logits[..., V // 3:] = float("-inf")
    labels = torch.where(labels == IGNORE, labels, labels % (V // 3))
    (logp, entropy, lse), grad = _lp_compare(logits, labels, 0.7)
    for t in (logp, entropy, lse, grad):
        assert t.isfinite().all()
    assert (grad[..., V // 3:] == 0).all()


@gpu
def test_cuda_logprobs_optional_outputs_and_grads(extension):
    """No entropy in the forward; a backward with only g_logp or only g_entropy, as autograd passes them."""
    logits, labels = _lp_inputs(F32, 1025, True, seed=2)
    (_, entropy, _), _ = _lp_compare(logits, labels, 0.9, want_entropy=False)  # backward with g_logp only
    assert entropy.shape == (0,)
    _, ent, lse = _lp_fwd("triton", logits, labels, 0.9)
    g = torch.randn(labels.shape, device="cuda")
    for g_logp, g_entropy in ((None, g), (g, g)):
        got = _lp_bwd("cuda", logits, labels, lse, ent, g_logp, g_entropy, 0.9)
        want = _lp_bwd("triton", logits, labels, lse, ent, g_logp, g_entropy, 0.9)
        _close_grad(got, want, F32)


@gpu
@pytest.mark.parametrize("dtype", [F32, F16], ids=lambda d: str(d)[6:])
def test_cuda_logprobs_misaligned_rows(extension, dtype):
    """Logits off the 16-byte alignment (V a multiple of the vector width) take the element path."""
    logits, labels = _lp_inputs(dtype, 4096, False, seed=3)
    shifted = _misaligned(logits, 1)
    assert shifted.data_ptr() % 16 != 0
    _lp_compare(shifted, labels, 1.0)


@gpu
def test_cuda_logprobs_are_deterministic(extension):
    logits, labels = _lp_inputs(BF16, 151936, True, seed=4)
    first = _lp_fwd("cuda", logits, labels, 1.0)
    g = torch.randn(labels.shape, device="cuda")
    grad = _lp_bwd("cuda", logits, labels, first[2], first[1], g, g, 1.0)
    for _ in range(3):
        for got, want in zip(_lp_fwd("cuda", logits, labels, 1.0), first):
            assert torch.equal(got.nan_to_num(), want.nan_to_num())
        assert torch.equal(_lp_bwd("cuda", logits, labels, first[2], first[1], g, g, 1.0), grad)


@gpu
def test_cuda_logprobs_rows_beyond_grid_limit(extension):
    """More than 65535 rows (the launcher's block count): the rows past it come out as on their own."""
    N = 65535 + 7
    logits = torch.randn(1, N, 5, device="cuda")
    labels = torch.randint(0, 5, (1, N), device="cuda")
    g = torch.randn(1, N, device="cuda")
    tail = slice(N - 20, N)

    def both(rows):
        x, y, gr = logits[:, rows], labels[:, rows], g[:, rows]
        logp, ent, lse = cuda_ext.ops().logprobs_fwd(x, y, 1.0, IGNORE, True)
        return logp, ent, lse, cuda_ext.ops().logprobs_bwd(x, y, lse, ent, gr, gr, 1.0, IGNORE)

    for full, part in zip(both(slice(None)), both(tail)):
        assert torch.equal(full[:, tail], part)


@gpu
def test_cuda_logprobs_pass_opcheck(extension):
    """The Python custom ops on the cuda backend: schema, fake kernel, autograd registration."""
    logits = torch.randn(2, 3, 40, device="cuda")
    labels = torch.randint(0, 40, (2, 3), device="cuda")
    torch.library.opcheck(logprobs_op.logprobs_fwd, (logits, labels, 0.9, IGNORE, True, "cuda"))
    _, ent, lse = logprobs_op.logprobs_fwd(logits, labels, 0.9, IGNORE, True, "cuda")
    g = torch.randn(2, 3, device="cuda")
    torch.library.opcheck(logprobs_op.logprobs_bwd, (logits, labels, lse, ent, g, g, 0.9, IGNORE, "cuda"))


# (which op, change to good arguments, error, message)
LOGPROBS_BAD_INPUTS = [
    ("fwd", lambda a: a.update(logits=a["logits"].cpu()), ValueError, "logits must be a CUDA tensor"),
    ("fwd", lambda a: a.update(logits=a["logits"].double()), TypeError, "logits must be float32, float16 or bfloat16"),
    ("fwd", lambda a: a.update(logits=a["logits"][0]), ValueError, r"logits must have shape \[B, T, V\]"),
    ("fwd", lambda a: a.update(logits=a["logits"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     "logits must have a contiguous vocabulary"),
    ("fwd", lambda a: a.update(labels=a["labels"].float()), TypeError, "labels must be int32 or int64"),
    ("fwd", lambda a: a.update(labels=a["labels"][:, :-1]), ValueError, r"labels must have shape \[B, T\] = \[2, 3\]"),
    ("fwd", lambda a: a.update(labels=a["labels"].t().contiguous().t()), ValueError, "labels must be contiguous"),
    ("fwd", lambda a: a.update(temperature=0.0), ValueError, "temperature must be a finite float > 0"),
    ("bwd", lambda a: a.update(lse=a["lse"].double()), TypeError, "lse must be float32"),
    ("bwd", lambda a: a.update(g_logp=a["g_logp"][:1]), ValueError, r"g_logp must have shape \[B, T\]"),
    ("bwd", lambda a: a.update(entropy=a["entropy"].new_empty(0)), ValueError,
     r"entropy \(needed with g_entropy\) must have shape"),
]


def check_bad_logprobs_input(index: int) -> None:
    """LOGPROBS_BAD_INPUTS[index] raises its error with its message (run in a child process)."""
    cuda_ext.build()
    which, change, error, match = LOGPROBS_BAD_INPUTS[index]
    logits = torch.randn(2, 3, 8, device="cuda")
    labels = torch.randint(0, 8, (2, 3), device="cuda")
    if which == "fwd":
        a = dict(logits=logits, labels=labels, temperature=1.0, ignore_index=IGNORE, want_entropy=True)
        call = cuda_ext.ops().logprobs_fwd
    else:
        g = torch.randn(2, 3, device="cuda")
        a = dict(logits=logits, labels=labels, lse=torch.randn(2, 3, device="cuda"), entropy=torch.rand_like(g),
                 g_logp=g, g_entropy=g, temperature=1.0, ignore_index=IGNORE)
        call = cuda_ext.ops().logprobs_bwd
    change(a)
    with pytest.raises(error, match=match):
        call(*a.values())


@gpu
def test_cuda_logprobs_reject_bad_input(extension):
    """Each case in a child process, for the reason given at test_cuda_rejects_bad_input."""
    _run_cases_in_children("check_bad_logprobs_input", LOGPROBS_BAD_INPUTS)


# ----------------------------------------------------------------------------- grpo_rows on a GPU

GRPO_B = 4  # row 1 fully masked, row 2 masked past T // 2 (fully masked at T = 1)
GRPO_T = [1, 17, 1037, 5000]  # one token; less than a warp; past one 1024-token Triton tile; several


def _grpo_inputs(T, dtype=F32, adv_per_token=False, seed=0, B=GRPO_B):
    """logp, old, adv, mask (fp32), ref, entropy on the GPU; ratios straddle the clip range."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda: torch.randn(B, T, device="cuda", generator=g)
    logp = -torch.rand(B, T, device="cuda", generator=g) * 3
    old = logp + 0.25 * randn()
    ref = logp + 0.3 * randn()
    # per sequence: both signs and a zero (a tie of the two sides of min, and SAPO's tau_neg)
    adv = randn() if adv_per_token else torch.tensor([0.8, 0.5, -1.1, 0.0], device="cuda").repeat((B + 3) // 4)[:B]
    mask = (torch.rand(B, T, device="cuda", generator=g) > 0.3).float()
    if B > 2:
        mask[1] = 0.0
        mask[2, T // 2:] = 0.0
    entropy = torch.rand(B, T, device="cuda", generator=g) * 4
    return [t.to(dtype) if t is not mask else t for t in (logp, old, adv, mask, ref, entropy)]


def _grpo_args(loss_kind, sequence, *, old=True, ref=True, entropy=True, delta=None, kl_kind=grpo_tk.KL_K3,
               bias=True, T=1037, dtype=F32, adv_per_token=False, seed=0, B=GRPO_B):
    logp, old_t, adv, mask, ref_t, ent = _grpo_inputs(T, dtype, adv_per_token, seed, B)
    eps_high = 1.1 if loss_kind == grpo_tk.CISPO else 0.28  # cispo: eps_high caps the weight
    return (logp, old_t if old else None, adv, mask, ref_t if ref else None, ent if entropy else None,
            0.2, eps_high, delta if delta is not None else 0.0, 0.04, 1.0, 1.05, loss_kind, kl_kind, sequence,
            delta is not None, bias)


def _grpo_compare(args):
    """grpo_rows on the cuda backend against the Triton kernel on the same inputs: the gradient and
    every row sum. Both compute in fp32; they sum in different orders and Triton's exp is ex2.approx,
    so they differ by a few fp32 ulps per token and a little more in sums of up to 5000 tokens."""
    got = grpo_op.grpo_rows(*args, "cuda")
    want = grpo_op.grpo_rows(*args, "triton")
    B, T = args[0].shape
    for name, g, shape in zip(("grad", "stats"), got, ((B, T), (B, grpo_tk.NSTAT))):
        assert g.dtype == F32 and g.shape == shape and g.is_contiguous(), name
    # the gradient: a few ulps per token, on the scale of the largest
    scale = max(1.0, want[0].abs().max().item()) if want[0].numel() else 1.0
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"grad: {m}")
    # each row sum on its own column's scale (a count off by one token fails), plus the rounding of
    # sums of T terms in two orders
    for j, name in enumerate(grpo_tk.STATS):
        g, w = got[1][:, j], want[1][:, j]
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * scale + 2e-6 * T,
                                   msg=lambda m, name=name: f"stats[{name!r}]: {m}")
    grad, stats = got
    mask = args[3]
    assert (grad[mask == 0] == 0).all(), "masked tokens have no gradient"
    full = mask.sum(1) == 0
    if full.any():  # fully masked rows: every sum is zero (w_row too: 0 / max(0, 1))
        assert (stats[full] == 0).all()
    return got


LOSS_KINDS = {"clip": grpo_tk.CLIP_FAMILY, "cispo": grpo_tk.CISPO, "sapo": grpo_tk.SAPO}


@gpu
@pytest.mark.parametrize("T", GRPO_T)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("sequence", [False, True], ids=["token", "sequence"])
@pytest.mark.parametrize("loss", LOSS_KINDS)
def test_cuda_grpo_rows_match_triton(extension, loss, sequence, dtype, T):
    """Every loss kind, token and sequence level, fp32/bf16 inputs, every length; old, ref (k3 with
    bias correction), entropy given; delta on the clip family."""
    kind = LOSS_KINDS[loss]
    args = _grpo_args(kind, sequence, delta=1.3 if kind == grpo_tk.CLIP_FAMILY else None, T=T, dtype=dtype, seed=T)
    grad, stats = _grpo_compare(args)
    if kind == grpo_tk.CLIP_FAMILY and not sequence and T >= 1037:
        # not vacuous: tokens are clipped on both sides
        assert stats[:, 3].sum() > 0 and stats[:, 4].sum() > 0


# name -> keyword arguments of _grpo_args: each optional input and flag on and off
GRPO_OPTIONS = {
    "bare": dict(old=False, ref=False, entropy=False),
    "old-only": dict(ref=False, entropy=False),
    "ref-no-old": dict(old=False),
    "k2-no-bias": dict(kl_kind=grpo_tk.KL_K2, bias=False),
    "k1": dict(kl_kind=grpo_tk.KL_K1),
    "k3-no-bias": dict(bias=False, entropy=False),
    "adv[B,T]": dict(adv_per_token=True),
    "adv[B,T]-bf16": dict(adv_per_token=True, dtype=BF16),
    "delta": dict(delta=1.05),
    "delta-below-1": dict(delta=0.9, adv_per_token=True),
}


@gpu
@pytest.mark.parametrize("option", GRPO_OPTIONS)
@pytest.mark.parametrize("sequence", [False, True], ids=["token", "sequence"])
@pytest.mark.parametrize("loss", LOSS_KINDS)
def test_cuda_grpo_rows_options_match_triton(extension, loss, sequence, option):
    _grpo_compare(_grpo_args(LOSS_KINDS[loss], sequence, **GRPO_OPTIONS[option], seed=len(option)))


@gpu
@pytest.mark.parametrize("sequence", [False, True], ids=["token", "sequence"])
def test_cuda_grpo_rows_mixed_dtypes_and_weights(extension, sequence):
    """Each input in its own dtype (fp64 too, which only the op level passes) and fractional mask weights."""
    args = list(_grpo_args(grpo_tk.CLIP_FAMILY, sequence, T=1037, adv_per_token=True, seed=5))
    for i, dtype in zip((0, 1, 2, 4, 5), (BF16, F32, torch.float64, F16, BF16)):
        args[i] = args[i].to(dtype)
    args[3] = args[3] * torch.rand_like(args[3])
    _grpo_compare(tuple(args))


@gpu
def test_cuda_grpo_rows_fully_masked_and_empty(extension):
    args = list(_grpo_args(grpo_tk.SAPO, True, T=17))
    args[3] = torch.zeros_like(args[3])
    grad, stats = _grpo_compare(tuple(args))
    assert (grad == 0).all() and (stats == 0).all()
    for B, T in ((0, 17), (3, 0)):  # no rows; rows of no tokens (the sums are 0)
        empty = list(_grpo_args(grpo_tk.CLIP_FAMILY, True, T=max(T, 1), B=max(B, 1)))
        for i in (0, 1, 3, 4, 5):
            empty[i] = torch.zeros(B, T, device="cuda", dtype=empty[i].dtype)
        empty[2] = torch.zeros(B, device="cuda")
        grad, stats = grpo_op.grpo_rows(*empty, "cuda")
        assert grad.shape == (B, T) and stats.shape == (B, grpo_tk.NSTAT)
        assert (stats == 0).all()


@gpu
def test_cuda_grpo_rows_are_deterministic(extension):
    args = _grpo_args(grpo_tk.CLIP_FAMILY, True, T=5000, B=64, dtype=BF16, delta=1.3)
    first = grpo_op.grpo_rows(*args, "cuda")
    for _ in range(3):
        for got, want in zip(grpo_op.grpo_rows(*args, "cuda"), first):
            assert torch.equal(got, want)


@gpu
def test_cuda_grpo_rows_beyond_grid_limit(extension):
    """More than 65535 rows (the launcher's block count): the rows past it come out as on their own."""
    B = 65535 + 7
    args = _grpo_args(grpo_tk.CLIP_FAMILY, False, T=3, B=B, adv_per_token=True)
    tail = slice(B - 20, B)
    part = [a[tail] if isinstance(a, torch.Tensor) else a for a in args]
    for full, sub in zip(grpo_op.grpo_rows(*args, "cuda"), grpo_op.grpo_rows(*part, "cuda")):
        assert torch.equal(full[tail], sub)


@gpu
@pytest.mark.parametrize("sequence", [False, True], ids=["token", "sequence"])
def test_cuda_grpo_rows_pass_opcheck(extension, sequence):
    """The Python custom op on the cuda backend: schema, fake kernel, autograd registration."""
    args = _grpo_args(grpo_tk.CLIP_FAMILY, sequence, T=37, delta=1.3)
    torch.library.opcheck(grpo_op.grpo_rows, (*args, "cuda"))


# (change to good arguments, error, message)
GRPO_BAD_INPUTS = [
    (lambda a: a.update(logp=a["logp"].cpu()), ValueError, "logp must be a CUDA tensor"),
    (lambda a: a.update(logp=a["logp"][0]), ValueError, r"logp must have shape \[B, T\]"),
    (lambda a: a.update(old_logp=a["old_logp"].long()), TypeError, "old_logp must be float32, float16, bfloat16"),
    (lambda a: a.update(advantages=a["advantages"][:1]), ValueError, r"advantages must have shape \[B\] or \[B, T\]"),
    (lambda a: a.update(mask=a["mask"].bool()), TypeError, "mask must be float32"),
    (lambda a: a.update(ref_logp=a["ref_logp"].t().contiguous().t()), ValueError, "ref_logp must be contiguous"),
    (lambda a: a.update(entropy=a["entropy"].cpu()), ValueError, "entropy is on cpu but logp is on cuda"),
    (lambda a: a.update(loss_kind=3), ValueError, "loss_kind must be 0"),
    (lambda a: a.update(kl_kind=-1), ValueError, "kl_kind must be 0"),
]


def check_bad_grpo_input(index: int) -> None:
    """GRPO_BAD_INPUTS[index] raises its error with its message (run in a child process)."""
    cuda_ext.build()
    names = [a.name for a in cuda_ext.ops().grpo_rows.default._schema.arguments]
    change, error, match = GRPO_BAD_INPUTS[index]
    a = dict(zip(names, _grpo_args(grpo_tk.CLIP_FAMILY, False, T=8, B=4)))
    change(a)
    with pytest.raises(error, match=match):
        cuda_ext.ops().grpo_rows(*a.values())


@gpu
def test_cuda_grpo_rows_reject_bad_input(extension):
    """Each case in a child process, for the reason given at test_cuda_rejects_bad_input."""
    _run_cases_in_children("check_bad_grpo_input", GRPO_BAD_INPUTS)
