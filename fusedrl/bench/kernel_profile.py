"""Where one call spends its time, by kind of kernel: `fusedrl bench --profile DIR`.

The timer says how long a call takes; this says what in it takes the time, so a gap to a target (a step at 27%
of the matmul rate, a step no faster than a peer's) points at something. One extra call of each timed provider
runs under `torch.profiler`; its kernels are summed by category:

- matmul: cuBLAS / CUTLASS / cuDNN GEMMs (names with gemm, xmma, cutlass, nvjet, wgmma; aten mm / addmm / bmm /
  baddbmm on a CPU)
- attention: flash / memory-efficient / cuDNN attention kernels (flash, fmha, attention, sdpa, attn in the name)
- fusedrl triton: the Triton kernels defined in fusedrl's kernel modules (found by name)
- inductor: kernels torch.compile generated (triton_poi_ / triton_red_ / triton_per_ ...)
- other triton: any other Triton kernel (a peer's: TRL, Liger-Kernel, Cut Cross-Entropy)
- elementwise: PyTorch's own kernels other than the above (elementwise, reductions, copies, norms, softmax)
- memcpy: copies and fills between or within devices issued by the runtime (Memcpy / Memset)
- other: the rest (on a CPU: views, allocations)

On a GPU the figures are the kernels' device time; "busy" is their sum over the call's GPU time measured by the
timer (below 1: the GPU idled inside the call). On a CPU they are the aten ops' own CPU time (no kernels there).
Writes DIR/profile.csv (one row per call and category) and DIR/<op>_<mode>_<shape>_<dtype>_<provider>.txt (the
categories and the top kernels by time).
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

CATEGORIES = ("matmul", "attention", "fusedrl triton", "inductor", "other triton", "elementwise", "memcpy", "other")
MATMUL_PARTS = ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "cublas")
CPU_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation", "aten::dot",
                  "aten::mv", "aten::addmv"}
# views, allocations and metadata: no work of their own worth a category on a CPU
CPU_NO_WORK_OPS = {"aten::view", "aten::as_strided", "aten::t", "aten::transpose", "aten::slice", "aten::reshape",
                   "aten::_reshape_alias", "aten::_unsafe_view", "aten::expand", "aten::permute", "aten::unsqueeze",
                   "aten::squeeze", "aten::select", "aten::detach", "aten::alias", "aten::empty", "aten::empty_like",
                   "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh"}
ATTENTION_PARTS = ("flash", "fmha", "attention", "sdpa", "attn")
INDUCTOR_PREFIXES = ("triton_poi_", "triton_red_", "triton_per_", "triton_tem_", "triton_for_")
TOP_KERNELS = 25
CSV_COLUMNS = ("op", "provider", "mode", "shape", "dtype", "device", "category", "calls", "ms", "share", "busy")


@dataclass(frozen=True)
class Kernel:
    name: str
    calls: int
    ms: float
    category: str


def fusedrl_triton_names() -> set[str]:
    """Names of the Triton kernels defined in the fusedrl kernel modules imported so far (Triton names a kernel
    after its Python function): jit functions, also behind autotune / heuristics wrappers or the interpreter's."""
    names = set()
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("fusedrl.kernels", "kernels.")):
            continue
        for value in list(vars(module).values()):
            unwrapped = False
            while type(value).__module__.startswith("triton.") and hasattr(value, "fn"):
                value, unwrapped = value.fn, True
            if unwrapped and isinstance(getattr(value, "__name__", None), str):
                names.add(value.__name__)
    return names


def categorize(name: str, ours: set[str], on_cpu: bool) -> str:
    """The category of a kernel (or, on a CPU, an aten op) named `name`."""
    low = name.lower()
    if on_cpu:
        if name in CPU_MATMUL_OPS:
            return "matmul"
        if any(part in low for part in ATTENTION_PARTS):
            return "attention"
        return "elementwise" if name.startswith("aten::") and name not in CPU_NO_WORK_OPS else "other"
    if name in ours:
        return "fusedrl triton"
    if low.startswith(INDUCTOR_PREFIXES):
        return "inductor"
    if low.startswith(("memcpy", "memset")):
        return "memcpy"
    if any(part in low for part in ATTENTION_PARTS):
        return "attention"
    if any(part in low for part in MATMUL_PARTS):
        return "matmul"
    if "at::native" in low or "at::" in low or low.startswith(("void at", "elementwise", "reduce")):
        return "elementwise"
    if low.startswith("_") or "_kernel" in low:  # Triton names kernels after their Python functions
        return "other triton"
    return "other"


def kernels_of(events: Iterable, on_cpu: bool, ours: set[str]) -> list[Kernel]:
    """Per-name totals from `torch.profiler.profile().key_averages()`: the GPU kernels (device events) on a GPU,
    the aten ops' self CPU time on a CPU; longest first."""
    out = []
    for e in events:
        if on_cpu:
            if not e.key.startswith("aten::") or e.self_cpu_time_total <= 0:
                continue
            ms = e.self_cpu_time_total / 1e3
        else:
            if e.device_type != torch.autograd.DeviceType.CUDA or e.device_time_total <= 0:
                continue
            ms = e.device_time_total / 1e3
        out.append(Kernel(e.key, e.count, ms, categorize(e.key, ours, on_cpu)))
    return sorted(out, key=lambda k: -k.ms)


def profile_call(fn: Callable[[], object], device: torch.device) -> list[Kernel]:
    """Run `fn()` once under torch.profiler and return its kernels (see `kernels_of`)."""
    from torch.profiler import ProfilerActivity, profile

    on_cpu = device.type != "cuda"
    activities = [ProfilerActivity.CPU] if on_cpu else [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    if not on_cpu:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        if not on_cpu:
            torch.cuda.synchronize(device)
    return kernels_of(prof.key_averages(), on_cpu, fusedrl_triton_names())


def by_category(kernels: list[Kernel]) -> dict[str, tuple[int, float]]:
    """category -> (calls, ms), in CATEGORIES order, empty categories left out."""
    totals = {c: [0, 0.0] for c in CATEGORIES}
    for k in kernels:
        totals[k.category][0] += k.calls
        totals[k.category][1] += k.ms
    return {c: (n, ms) for c, (n, ms) in totals.items() if n}


def one_line(kernels: list[Kernel]) -> str:
    """'matmul 61% · attention 12% · ...' for the console."""
    totals = by_category(kernels)
    whole = sum(ms for _, ms in totals.values()) or 1.0
    return " · ".join(f"{c} {ms / whole:.0%}" for c, (_, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1]))


def write(out_dir: str | Path, row: dict[str, str], kernels: list[Kernel], call_ms: float | None) -> Path:
    """Append the call's categories to out_dir/profile.csv and write its report; returns the report's path.
    `row`: op, provider, mode, shape, dtype, device; `call_ms`: the timer's median for the call (GPU time on a
    GPU), for the busy fraction."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    totals = by_category(kernels)
    whole = sum(ms for _, ms in totals.values())
    busy = f"{whole / call_ms:.3f}" if call_ms and row["device"] != "cpu" else ""
    table = out / "profile.csv"
    new = not table.exists()
    with table.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_COLUMNS)
        if new:
            writer.writeheader()
        for category, (calls, ms) in totals.items():
            writer.writerow({**row, "category": category, "calls": calls, "ms": f"{ms:.4f}",
                             "share": f"{ms / whole:.4f}" if whole else "", "busy": busy})
    name = "_".join(row[k] for k in ("op", "mode", "shape", "dtype", "provider")).replace("/", "-").replace("+", "p")
    report = out / f"{name}.txt"
    unit = "kernel time on the GPU" if row["device"] != "cpu" else "aten ops' own CPU time"
    lines = [f"{row['op']} {row['mode']} {row['shape']} {row['dtype']} {row['provider']} on {row['device']}: "
             f"{whole:.3f} ms of {unit}" + (f", {busy} of the call's {call_ms:.3f} ms GPU time" if busy else ""),
             "", f"{'category':<16}{'calls':>8}{'ms':>12}{'share':>8}"]
    lines += [f"{c:<16}{n:>8}{ms:>12.3f}{ms / (whole or 1):>8.1%}" for c, (n, ms) in totals.items()]
    lines += ["", f"top {TOP_KERNELS} by time:", f"{'ms':>10}{'calls':>7}  {'category':<16}name"]
    lines += [f"{k.ms:>10.3f}{k.calls:>7}  {k.category:<16}{k.name[:160]}" for k in kernels[:TOP_KERNELS]]
    report.write_text("\n".join(lines) + "\n")
    return report
