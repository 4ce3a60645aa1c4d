"""`fusedrl bench` end to end on the CPU at small sizes: the table prints, the CSV has the shared
columns, timed rows hold numbers, skipped rows hold a reason; plus the CSV and registry rules."""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

from fusedrl.bench import add_arguments, run, timing
from fusedrl.bench.cases import CaseConfig, collect
from fusedrl.bench.providers import Skip
from fusedrl.bench.report import COLUMNS, Result, append_csv
from fusedrl.bench.timing import percentile

META = {"date": "d", "device": "cpu", "torch_version": "t", "triton_version": "", "cuda_version": "",
        "fusedrl_version": "0"}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _read(path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_runner_small_cpu(tmp_path, capsys):
    out = tmp_path / "results.csv"
    rc = run(_args("--device", "cpu", "--sizes", "small", "--reps", "2", "--no-compile", "--ops", "diffusion_step",
                   "--providers", "eager,compile,torch,triton,cuda", "--csv", str(out)))
    assert rc == 0
    table = capsys.readouterr().out
    assert "median ms" in table and "% ceiling" in table
    assert "skipped: disabled by --no-compile" in table

    header, rows = _read(out)
    assert tuple(header) == COLUMNS
    ceiling = [r for r in rows if r["op"] == "ceiling"]
    assert [r["provider"] for r in ceiling] == ["copy"] and float(ceiling[0]["achieved"]) > 0
    cases = [r for r in rows if r["op"] != "ceiling"]
    assert {r["op"] for r in cases} == {"flow_sde_step", "ddim_step"}
    assert {r["mode"] for r in cases} == {"fwd", "fwd_given", "fwd+bwd"}
    timed = [r for r in cases if r["median_ms"]]
    skipped = [r for r in cases if not r["median_ms"]]
    assert {r["provider"] for r in timed} == {"eager", "torch"}
    assert {r["provider"] for r in skipped} == {"compile", "triton", "cuda"}
    for r in timed:
        p20, median, p80 = float(r["p20_ms"]), float(r["median_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= median <= p80
        assert int(r["bytes"]) > 0 and r["achieved_unit"] == "GB/s"
        assert float(r["achieved"]) == pytest.approx(int(r["bytes"]) / (median * 1e-3) / 1e9, rel=1e-4)
        assert float(r["fraction_of_ceiling"]) > 0 and float(r["speedup_vs_eager"]) > 0
        assert float(r["peak_mb"]) >= 0 and not r["note"]
        assert r["op"] in table and r["shape"] in table
    for r in skipped:
        assert r["note"] and not r["p20_ms"] and not r["achieved"]
    assert all(r["speedup_vs_eager"] == "1" for r in timed if r["provider"] == "eager")


def test_unknown_op_or_provider_is_an_error(tmp_path):
    assert run(_args("--device", "cpu", "--ops", "no_such_op", "--csv", str(tmp_path / "a.csv"))) == 2
    assert run(_args("--device", "cpu", "--providers", "nope", "--csv", str(tmp_path / "a.csv"))) == 2
    assert run(_args("--device", "cpu", "--dtypes", "bf16,fp8", "--csv", str(tmp_path / "a.csv"))) == 2
    assert run(_args("--device", "cpu", "--ops", "grpo_loss", "--modes", "bwd", "--csv", str(tmp_path / "a.csv"))) == 2
    assert not (tmp_path / "a.csv").exists()  # (an unknown mode ran nothing yet wrote the ceiling rows)
    with pytest.raises(SystemExit):
        _args("--reps", "0")  # argparse: --reps must be >= 1 (0 meant the default, -3 crashed in the timer)


def test_shapes_and_quick_select_cases(tmp_path, capsys):
    out = tmp_path / "results.csv"
    rc = run(_args("--device", "cpu", "--sizes", "small", "--reps", "1", "--ops", "attention", "--shapes",
                   "2x4x257x64,1x2x300x40", "--providers", "eager", "--csv", str(out)))
    assert rc == 0
    rows = [r for r in _read(out)[1] if r["op"] != "ceiling"]
    assert {r["shape"] for r in rows} == {"2x4x257x64", "1x2x300x40"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert run(_args("--device", "cpu", "--sizes", "small", "--ops", "attention", "--shapes", "9x9",
                     "--csv", str(tmp_path / "b.csv"))) == 2
    assert "no case of the selected ops and sizes has shape ['9x9']; known: 1x2x128x64" in capsys.readouterr().err
    assert not (tmp_path / "b.csv").exists()

    quick = tmp_path / "quick.csv"
    assert run(_args("--device", "cpu", "--sizes", "small", "--quick", "--ops", "attention,grpo_loss",
                     "--providers", "eager,compile", "--csv", str(quick))) == 0
    rows = [r for r in _read(quick)[1] if r["op"] != "ceiling"]
    by_mode = {(r["op"], r["mode"]): set() for r in rows}
    for r in rows:
        by_mode[(r["op"], r["mode"])].add(r["shape"])
    # attention's small cases have three shapes for fwd: --quick keeps the smallest of each (op, mode)
    assert by_mode[("flash_attention", "fwd")] == {"1x2x128x64"} and all(len(v) == 1 for v in by_mode.values())
    assert {r["note"] for r in rows if r["provider"] == "compile"} == {"disabled by --no-compile"}
    assert "(--quick)" in capsys.readouterr().err


def test_sizes_default_to_small_on_a_cpu(tmp_path, capsys):
    out = tmp_path / "auto.csv"
    assert run(_args("--device", "cpu", "--quick", "--ops", "grpo_loss", "--providers", "eager", "--csv",
                     str(out))) == 0
    rows = [r for r in _read(out)[1] if r["op"] != "ceiling"]
    small = {c.shape_str for c in collect(CaseConfig(torch.device("cpu"), "small", (torch.float32,)), ["grpo_loss"])}
    assert rows and {r["shape"] for r in rows} == small
    assert "sizes small (--quick)" in capsys.readouterr().err


def test_dtypes_selects_the_cases_dtypes(tmp_path):
    out = tmp_path / "results.csv"
    rc = run(_args("--device", "cpu", "--sizes", "small", "--reps", "1", "--ops", "logprobs", "--dtypes", "fp64",
                   "--providers", "eager,torch", "--csv", str(out)))
    assert rc == 0
    rows = [r for r in _read(out)[1] if r["op"] != "ceiling"]
    assert rows and {r["dtype"] for r in rows} == {"fp64"}


def test_csv_header_once_and_column_mismatch(tmp_path):
    path = tmp_path / "out" / "r.csv"
    append_csv(path, META, [Result("op", "eager", "fwd", "2x3", "fp32", note="first")])
    append_csv(path, META, [Result("op", "torch", "fwd", "2x3", "fp32", note="second")])
    header, rows = _read(path)
    assert tuple(header) == COLUMNS and [r["note"] for r in rows] == ["first", "second"]
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other columns"):
        append_csv(other, META, [])


def test_registry_bytes_and_ops():
    config = CaseConfig(device=torch.device("cpu"), sizes="small", dtypes=(torch.float32,))
    cases = {(c.op, c.mode): c for c in collect(config, ["diffusion_step"])}
    n = math.prod((4, 16, 32, 32))
    assert cases[("flow_sde_step", "fwd")].bytes == 5 * n * 4
    assert cases[("flow_sde_step", "fwd_given")].bytes == 4 * n * 4
    assert cases[("flow_sde_step", "fwd+bwd")].bytes == 9 * n * 4
    assert {c.op for c in collect(config, ["ddim_step"])} == {"ddim_step"}


def test_percentile():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 20) == pytest.approx(2.0)


def test_warm_up_stops_early_on_slow_calls(monkeypatch):
    """Five warm-up calls for fast ones; once the warm-up has taken WARMUP_ENOUGH_S, no more (a training
    step of seconds gets one), and never none."""
    calls = []
    clock = iter(range(100))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))  # each reading 1 s later
    monkeypatch.setattr(timing, "WARMUP_ENOUGH_S", 2.5)
    timing._warm_up(lambda: calls.append(1), torch.device("cpu"), 5)
    assert len(calls) == 3  # readings 1, 2, 3 s after the start: the third reaches 2.5 s
    monkeypatch.setattr(timing, "WARMUP_ENOUGH_S", 0.0)
    calls.clear()
    timing._warm_up(lambda: calls.append(1), torch.device("cpu"), 5)
    assert len(calls) == 1
    monkeypatch.setattr(timing, "WARMUP_ENOUGH_S", 1e9)
    calls.clear()
    timing._warm_up(lambda: calls.append(1), torch.device("cpu"), 5)
    assert len(calls) == 5
    result = timing.measure(lambda: None, torch.device("cpu"), reps=3, warmup=1)
    assert result.reps == 3 and math.isnan(result.resident_mb)  # no allocator on the CPU


def test_cuda_host_time_is_taken_with_the_gpu_idle(monkeypatch):
    """host_ms comes from calls started after a synchronize, not from the held ones: under the hold, a call
    that queues more launches than the queue takes waits for the hold to end (simulated: a held call's
    issue takes 100 ms, an unheld one 1 ms), and that wait is not the call's issue time."""
    clock = [0.0]
    held = [False]
    cuda = timing.torch.cuda

    class FakeEvent:
        def __init__(self, enable_timing):
            self.t = 0.0

        def record(self):
            self.t = clock[0]

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    def sleep(cycles):
        held[0] = True

    def synchronize(device=None):
        held[0] = False

    def fn():
        clock[0] += 0.1 if held[0] else 1e-3

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    fakes = dict(synchronize=synchronize, _sleep=sleep, Event=FakeEvent, device=lambda d: contextlib.nullcontext(),
                 memory_allocated=lambda d: 0, max_memory_allocated=lambda d: 0, reset_peak_memory_stats=lambda d: None)
    for name, value in fakes.items():
        monkeypatch.setattr(cuda, name, value)
    device = torch.device("cuda")
    monkeypatch.setitem(timing._flush_buffers, device, torch.empty(0))
    monkeypatch.setitem(timing._sleep_cycles_per_s, device, 1e9)
    times, host, _, _ = timing._cuda_times(fn, device, reps=3)
    assert host == pytest.approx([1.0] * 3)  # ms, the unheld calls'
    assert times == pytest.approx([100.0] * 3)  # the held calls' events bracket the whole blocked issue here


def test_cli_wires_bench_options():
    from fusedrl.cli import build_parser

    args = build_parser().parse_args(["bench", "--sizes", "small", "--no-compile", "--ops", "diffusion_step"])
    assert args.sizes == "small" and args.no_compile and args.ops == "diffusion_step"


def test_every_case_module_runs_on_cpu(tmp_path):
    """Each registered op's small cases run eager and on fusedrl's torch backend, with bytes counted."""
    out = tmp_path / "all.csv"
    config = CaseConfig(device=torch.device("cpu"), sizes="small", dtypes=(torch.float32,))
    others = sorted({c.module for c in collect(config)} - {"diffusion_step"})
    assert others, "no other op registered"
    rc = run(_args("--device", "cpu", "--sizes", "small", "--reps", "1", "--no-compile", "--ops", ",".join(others),
                   "--providers", "eager,torch", "--csv", str(out)))
    assert rc == 0
    _, rows = _read(out)
    timed = [r for r in rows if r["op"] != "ceiling"]
    assert {r["provider"] for r in timed} == {"eager", "torch"}
    assert all(r["median_ms"] and int(r["bytes"]) > 0 for r in timed)


def test_profile_writes_where_the_time_goes(tmp_path, capsys):
    """--profile: one more call per timed provider under torch.profiler; its time by category in profile.csv
    (shares summing to 1), a report with the top ops, and the one-line summary in the row's note."""
    from fusedrl.bench import kernel_profile

    out, prof = tmp_path / "r.csv", tmp_path / "prof"
    rc = run(_args("--device", "cpu", "--sizes", "small", "--reps", "1", "--ops", "llm_grpo_step",
                   "--providers", "eager,fusedrl", "--csv", str(out), "--profile", str(prof)))
    assert rc == 0
    _, rows = _read(out)
    timed = [r for r in rows if r["op"] == "llm_grpo_step"]
    assert len(timed) == 2 and all(r["note"].startswith("profile: ") and "matmul" in r["note"] for r in timed)
    with (prof / "profile.csv").open() as fh:
        cats = list(csv.DictReader(fh))
    for provider in ("eager", "fusedrl"):
        mine = [r for r in cats if r["provider"] == provider]
        categories = {r["category"] for r in mine}
        assert categories <= set(kernel_profile.CATEGORIES) and "matmul" in categories
        assert sum(float(r["share"]) for r in mine) == pytest.approx(1.0, abs=1e-3)
        report = (prof / f"llm_grpo_step_train_{timed[0]['shape']}_fp32_{provider}.txt").read_text()
        assert "aten::mm" in report and "top 25 by time" in report
    assert "profile: " in capsys.readouterr().err


def test_profile_categories_of_gpu_kernel_names():
    """Names as the CUDA profiler reports them (H100 / H200 builds of torch, cuDNN, cuBLAS, Triton)."""
    from fusedrl.bench.kernel_profile import categorize

    ours = {"_rms_norm_fwd_kernel"}
    expected = {
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas":
            "matmul",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>(...)": "matmul",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0":
            "attention",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>": "attention",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",
        "_rms_norm_fwd_kernel": "fusedrl triton",
        "triton_poi_fused_add_mul_0": "inductor",
        "triton_red_fused_sum_1": "inductor",
        "_chunked_logprob_fwd_kernel": "other triton",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, ...>":
            "elementwise",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, ...> >(...)": "elementwise",
        "Memcpy HtoD (Pinned -> Device)": "memcpy",
        "Memset (Device)": "memcpy",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "other",
    }
    for name, category in expected.items():
        assert categorize(name, ours, on_cpu=False) == category, name
    assert categorize("aten::addmm", ours, on_cpu=True) == "matmul"
    assert categorize("aten::view", ours, on_cpu=True) == "other"
    assert categorize("aten::mul", ours, on_cpu=True) == "elementwise"


def test_attention_cases_count_flops():
    """4 B H N^2 D per forward, halved when causal; forward + backward counts 3.5 forwards."""
    config = CaseConfig(device=torch.device("cpu"), sizes="small", dtypes=(torch.float32,))
    cases = {(c.mode, c.shape): c for c in collect(config, ["attention"])}
    fwd = 4 * 1 * 2 * 128 * 128 * 64
    assert cases[("fwd", (1, 2, 128, 64))].flops == fwd
    assert cases[("fwd_causal", (1, 2, 128, 64))].flops == fwd // 2
    assert cases[("fwd+bwd", (1, 2, 128, 64))].flops == int(fwd * 3.5)
    assert cases[("fwd", (1, 2, 128, 64))].bytes == 4 * 2 * 128 * 64 * 4
    assert {"sdpa_math", "sdpa_flash", "flash_attn", "triton"} <= set(cases[("fwd", (1, 2, 128, 64))].providers)
    default = CaseConfig(device=torch.device("cuda"), sizes="default", dtypes=(torch.bfloat16, torch.float32))
    shapes = {c.shape for c in collect(default, ["attention"])}
    assert {(1, 16, 16384, 128), (16, 32, 1024, 64), (8, 8, 4096, 40), (1, 24, 4429, 128), (64, 16, 257, 64)} <= shapes


def test_plot_charts_and_summary_from_csv(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "results.csv"
    assert run(_args("--device", "cpu", "--sizes", "small", "--reps", "1", "--ops", "logprobs", "--no-compile",
                     "--csv", str(out))) == 0
    capsys.readouterr()
    charts = tmp_path / "charts"
    assert run(_args("--from-csv", str(out), "--plot", str(charts))) == 0
    printed = capsys.readouterr().out
    pngs = sorted(p.name for p in charts.glob("*.png"))
    assert pngs == ["logprobs_from_logits.png"] and (charts / pngs[0]).stat().st_size > 10_000
    assert "| op | mode | shape |" in printed


def _row(provider, median, date="2026-01-02", device="gpu0", **extra):
    row = dict.fromkeys(COLUMNS, "")
    row.update(date=date, device=device, op="op", provider=provider, mode="fwd", shape="4x8", dtype="bf16",
               median_ms=str(median), peak_mb="1.5", bytes="100", achieved="1", achieved_unit="GB/s",
               fraction_of_ceiling="0.5", **extra)
    return row


def test_summary_compares_the_kernel_with_each_baseline(tmp_path):
    from fusedrl.bench.plot import summary_markdown

    path = tmp_path / "r.csv"
    rows = [_row("eager", 4.0), _row("torch", 3.0), _row("triton", 2.5, date="2026-01-01"), _row("triton", 2.0),
            _row("cuda", 2.2), _row("liger", 1.0), _row("compile", 3.5), _row("triton", 9.0, device="other")]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = summary_markdown(path, device="gpu0").splitlines()
    line = next(x for x in table if x.startswith("| op |") and "fwd" in x)
    # the latest triton row (2.0 ms) is the kernel; the other device's row is not read
    assert line == "| op | fwd | 4x8 | bf16 | 2 triton | 50% | 2 | 3 (1.50x) | 4 (2.00x) | 1 (0.50x) liger |"
    assert summary_markdown(path).startswith("Device: gpu0")  # the newest row's device by default
    # a CPU run measures fusedrl's torch path only: that is the row's fusedrl side (the table was empty)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([_row("eager", 4.0, device="cpu"), _row("torch", 2.0, device="cpu")])
    line = next(x for x in summary_markdown(path).splitlines() if x.startswith("| op |") and "fwd" in x)
    assert line.startswith("| op | fwd | 4x8 | bf16 | 2 torch |") and "| 4 (2.00x) |" in line


def test_summary_and_charts_of_whole_step_cases(tmp_path):
    """The training-step cases' "fusedrl*" providers are fusedrl's side of the table (the fastest of them), the
    plain loop the eager column, TRL a peer; one shape per group draws bars."""
    from fusedrl.bench.plot import draw_charts, summary_markdown

    path = tmp_path / "r.csv"
    rows = [_row("eager", 4.0), _row("fusedrl", 3.0), _row("fusedrl_full", 5.0), _row("trl", 3.5)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    line = next(x for x in summary_markdown(path).splitlines() if x.startswith("| op |") and "fwd" in x)
    assert line == "| op | fwd | 4x8 | bf16 | 3 fusedrl | 50% | 2 |  | 4 (1.33x) | 3.5 (1.17x) trl |"
    pytest.importorskip("matplotlib")
    assert [p.name for p in draw_charts(path, tmp_path / "charts")] == ["op.png"]


def test_plot_errors_are_named(tmp_path, capsys):
    assert run(_args("--from-csv", str(tmp_path / "missing.csv"))) == 2
    assert "give --plot DIR" in capsys.readouterr().err
    assert run(_args("--from-csv", str(tmp_path / "missing.csv"), "--plot", str(tmp_path / "c"))) == 2
    assert "missing.csv" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(COLUMNS) + "\n")
    assert run(_args("--from-csv", str(empty), "--plot", str(tmp_path / "c"))) == 2
    assert "no timed rows" in capsys.readouterr().err


@pytest.mark.parametrize("op", ["diffusion_grpo_step", "reward_backprop_step", "llm_grpo_step"])
def test_train_step_cases_compute_the_same_gradients(op):
    """The end-to-end step cases time the same computation on every provider: the plain loop's LoRA gradients
    equal fusedrl's (kernels, checkpointing) to float rounding."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from fusedrl.bench.cases import train_step

    config = CaseConfig(device=torch.device("cpu"), sizes="small", dtypes=(torch.float32,))
    case = next(c for c in train_step.cases(config) if c.op == op)
    impl_for = case.setup()
    grads = {}
    for p in case.providers:
        try:
            grads[p] = [g.clone() for g in impl_for(p).fn()]
        except Skip:  # a peer that is not installed
            continue
    want = grads["eager"]
    assert want and max(float(g.abs().max()) for g in want) > 0
    for provider, got in grads.items():
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, p=provider: f"{op} {p}: {m}")


TRL_WITHOUT_DATASETS = r"""
import importlib.abc, sys, torch
class Block(importlib.abc.MetaPathFinder):  # the GPU image: no datasets (TRL's trainer utils import it)
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("datasets", "pandas", "pyarrow"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from fusedrl.bench.trl_peer import chunked_logprob_function
fn = chunked_logprob_function()
g = torch.Generator().manual_seed(0)
h = torch.randn(12, 16, generator=g, requires_grad=True)
w = torch.randn(40, 16, generator=g, requires_grad=True)
y = torch.randint(0, 40, (12,), generator=g)
logp, entropy = fn.apply(h, w, None, y, 1.0, 16, None, 1.0, ("entropy",))[:2]
(logp.sum() + entropy.sum()).backward()
logits = (h @ w.T).double()
ref = torch.log_softmax(logits, -1).gather(-1, y[:, None])[:, 0]
ref_h, ref_w = torch.autograd.grad(ref.sum() - (logits.softmax(-1) * logits.log_softmax(-1)).sum(), (h, w))
print(max((logp.double() - ref).abs().max().item(), (h.grad - ref_h).abs().max().item(),
          (w.grad - ref_w).abs().max().item()))
print(sys.modules["trl.trainer.utils"].__doc__.split(" (")[0])
"""


def test_trl_head_backward_runs_without_datasets():
    """On a machine without datasets / pandas (the GPU image), TRL's fused LM head still runs forward and backward
    (its backward imports trl.trainer.utils): fusedrl's stand-in gives it the null context it needs there."""
    pytest.importorskip("trl")
    out = subprocess.run([sys.executable, "-c", TRL_WITHOUT_DATASETS], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    err, doc = out.stdout.strip().splitlines()[-2:]
    assert float(err) < 1e-4 and doc == "fusedrl's stand-in for trl.trainer.utils"


@pytest.mark.parametrize("error, failed", [(torch.OutOfMemoryError("CUDA out of memory"), False),
                                           (RuntimeError("a bug"), True)], ids=["oom", "bug"])
def test_oom_is_skip_passes_out_of_memory_only(error, failed):
    """A training-step row that may not fit the card (oom_is_skip) says so without failing; any other exception
    of the same provider fails the row (a crash in fusedrl's step was reported as a skip)."""
    from fusedrl.bench.cases import Case
    from fusedrl.bench.providers import Impl
    from fusedrl.bench.runner import _run_provider

    def fn():
        raise error

    case = Case(op="toy", mode="fwd", shape=(1,), dtype=torch.float32, bytes=4, providers=("eager",),
                setup=lambda: None)
    result = _run_provider(case, lambda provider: Impl(fn, oom_is_skip=True), "eager", device=torch.device("cpu"),
                           reps=1, warmup=0, min_time_s=0.0, no_compile=True)
    assert result.failed is failed and str(error) in result.note


def test_each_provider_output_is_checked_against_eager():
    """A provider whose output differs from eager's beyond its dtype's tolerance fails its row (no speed-up is
    published for it); one within it passes; another structure, or fresh noise, is not compared."""
    from fusedrl.bench.cases import Case
    from fusedrl.bench.providers import Impl
    from fusedrl.bench.runner import _run_provider

    x = torch.randn(64, dtype=torch.float64) + 0.5
    outputs = {"eager": lambda: (x, {"n": x.sum()}), "close": lambda: (x * (1 + 1e-5), {"n": x.sum()}),
               "wrong": lambda: (x * 1.1, {"n": x.sum()}), "other": lambda: x[:3], "noisy": lambda: torch.randn(64),
               "nan": lambda: (torch.full_like(x, float("nan")), {"n": x.sum()})}
    case = Case(op="toy", mode="fwd", shape=(64,), dtype=torch.float32, bytes=4, providers=tuple(outputs),
                setup=lambda: None)
    eager_print: list = []

    def run(provider):
        impl = Impl(outputs[provider], random_output=provider == "noisy")
        return _run_provider(case, lambda p: impl, provider, device=torch.device("cpu"), reps=1, warmup=1,
                             min_time_s=0.0, no_compile=True, eager_print=eager_print)

    assert not run("eager").failed and len(eager_print) == 2
    close, wrong, nan = run("close"), run("wrong"), run("nan")
    assert not close.failed and close.note == ""
    assert wrong.failed and "differs from eager's" in wrong.note and wrong.timing is not None
    assert nan.failed and "NaN" in nan.note
    other, noisy = run("other"), run("noisy")
    assert not other.failed and "not compared" in other.note
    assert not noisy.failed and noisy.note == ""
    # laid out otherwise, as many elements: compared flat (eager's [B*T] against [B, T])
    outputs["reshaped"] = lambda: [x[:32].reshape(4, 8), x[32:] * 1.1, x.sum()]
    reshaped = run("reshaped")
    assert reshaped.failed and "differs" in reshaped.note
    outputs["reshaped"] = lambda: [x.reshape(8, 8), x.sum()]
    reshaped = run("reshaped")
    assert not reshaped.failed and "one flat tensor" in reshaped.note
    eager_print.clear()  # eager skipped (too big) or failed: said in the note
    assert "no eager output" in run("close").note


def test_modules_with_declared_ops_are_built_only_when_asked(monkeypatch):
    """train_step and checkpointing build their models on the meta device to count FLOPs (seconds): collect()
    skips such a module when none of its ops is asked for, and its declared OPS are the ops its cases have."""
    from fusedrl.bench import cases as registry

    config = CaseConfig(torch.device("cpu"), "small", (torch.float32,))
    mods = registry.modules()
    for name in ("train_step", "checkpointing"):
        assert set(mods[name].OPS) == {c.op for c in mods[name].cases(config)}
        monkeypatch.setattr(mods[name], "cases", lambda config, name=name: pytest.fail(f"{name} was built"))
    assert {c.op for c in collect(config, ["grpo_loss"])} == {"grpo_loss"}
    assert "llm_grpo_step" in registry.names(config)
