"""The benchmark run: ceilings first, then every case on every provider; a table, CSV rows, a plot.

Rows are appended to the CSV after each measurement, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch

from fusedrl.engine.oom import is_out_of_memory

from . import cases as registry
from . import output_check
from .ceilings import Ceilings, measure_ceilings
from .providers import COMPILE, EAGER, Skip
from .report import Result, append_csv, format_table
from .timing import measure

# Reps and warm-up calls when --reps is not given. A CPU call of a default-size case takes ~0.1 s, so 5
# reps keep `fusedrl bench` within minutes there; GPU calls take micro- to milliseconds. The first
# GPU call compiles Triton kernels, hence several warm-up calls.
DEFAULT_REPS = {"cuda": 100, "cpu": 5}
QUICK_REPS = {"cuda": 10, "cpu": 2}  # --quick
WARMUP = {"cuda": 5, "cpu": 1}
# Without --reps, CPU calls continue past 5 reps (up to 100) until they add up to this much time.
CPU_MIN_TIME_S = 0.25
DTYPES = {"cuda": (torch.bfloat16, torch.float32), "cpu": (torch.float32,)}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine")
    return torch.device(name)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({torch.get_num_threads()} threads)"


def _meta(device: torch.device) -> dict[str, str]:
    import fusedrl

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # a missing or broken Triton is a fact to record, not a reason to stop
        triton_version = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda or "",
        "fusedrl_version": fusedrl.__version__,
    }


def _dtypes(value: str | None, device: torch.device) -> tuple[torch.dtype, ...]:
    """--dtypes as torch dtypes (the device's defaults when not given); ValueError names an unknown one."""
    names = _split(value)
    if names is None:
        return DTYPES[device.type]
    by_name = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"--dtypes: unknown {unknown}; known: {', '.join(by_name)}")
    return tuple(by_name[name] for name in names)


def _split(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _summary(exc: BaseException, limit: int = 300) -> str:
    """One line for the note column: the first and last lines of the message (Triton and dynamo put
    the location first and the actual error last)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ... ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else "".join(lines)
    line = f"{type(exc).__name__}: {text}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _raise(exc: BaseException, provider: str):
    raise exc


def _ceiling_results(c: Ceilings) -> list[Result]:
    results = [Result("ceiling", "copy", "read+write", str(c.copy_bytes // 4), "fp32", bytes=2 * c.copy_bytes,
                      timing=c.copy_timing, achieved=c.copy_gbps, achieved_unit="GB/s", ceiling=c.copy_gbps,
                      fraction_of_ceiling=1.0)]
    if c.matmul_tflops is not None:
        n = c.matmul_n
        results.append(Result("ceiling", "matmul", "mm", f"{n}x{n}x{n}", "bf16", timing=c.matmul_timing,
                              achieved=c.matmul_tflops, achieved_unit="TFLOP/s", ceiling=c.matmul_tflops,
                              fraction_of_ceiling=1.0))
    return results


def _score(result: Result, case: registry.Case, c: Ceilings, eager_ms: float | None) -> None:
    """Fill achieved rate, fraction of ceiling and speedup of a timed result."""
    seconds = result.timing.median_ms * 1e-3
    if case.flops is not None and c.matmul_tflops is not None:
        result.achieved, result.achieved_unit = case.flops / seconds / 1e12, "TFLOP/s"
        result.ceiling = c.matmul_tflops
    else:
        result.achieved, result.achieved_unit = case.bytes / seconds / 1e9, "GB/s"
        result.ceiling = c.copy_gbps
    result.fraction_of_ceiling = result.achieved / result.ceiling
    if eager_ms is not None:
        result.speedup_vs_eager = eager_ms / result.timing.median_ms


def _profile(case: registry.Case, impl, result: Result, device: torch.device, out_dir: str) -> str:
    """One more call under torch.profiler (`kernel_profile`); the console's line about it."""
    from . import kernel_profile

    try:
        kernels = kernel_profile.profile_call(impl.fn, device)
        row = {"op": case.op, "provider": result.provider, "mode": case.mode, "shape": case.shape_str,
               "dtype": result.dtype, "device": device.type}
        path = kernel_profile.write(out_dir, row, kernels, result.timing.median_ms)
    except Exception as exc:  # the timing stands; the profile is a diagnosis
        return f"profile failed: {_summary(exc)}"
    return f"profile: {kernel_profile.one_line(kernels)} ({path.name})"


def _run_provider(case: registry.Case, impl_for, provider: str, *, device: torch.device, reps: int,
                  warmup: int, min_time_s: float, no_compile: bool, profile_dir: str | None = None,
                  eager_print: list | None = None) -> Result:
    """Time one provider on one case. `eager_print`: the case's list for eager's output fingerprint (eager fills
    it; the others are checked against it: output_check)."""
    dtype = DTYPE_NAMES.get(case.dtype, str(case.dtype))
    result = Result(case.op, provider, case.mode, case.shape_str, dtype, bytes=case.bytes)
    if provider == COMPILE and no_compile:
        result.note = "disabled by --no-compile"
        return result
    try:
        impl = impl_for(provider)
    except Skip as exc:
        result.note = str(exc)
        return result
    except Exception as exc:  # the case's set-up failed (its traceback is printed once, by run_bench)
        result.note, result.failed = f"error: {_summary(exc)}", True
        return result
    checked: list = []

    def check(out: object) -> None:
        if eager_print is None or impl.random_output:
            return
        prints = output_check.fingerprint(out)
        if provider == EAGER:
            eager_print[:] = prints
        elif eager_print:
            checked.append(output_check.compare(prints, eager_print, case.dtype))
        elif EAGER in case.providers:  # eager was skipped (too big) or failed: nothing to compare with
            checked.append((None, "output not checked: no eager output"))

    try:
        with _environ(impl.env):
            result.timing = measure(impl.fn, device, reps, warmup, impl.inputs, min_time_s, first=check)
            profiled = _profile(case, impl, result, device, profile_dir) if profile_dir else None
        resident = result.timing.resident_mb
        if impl.report_resident and not math.isnan(resident):
            result.note = (f"whole peak {resident + result.timing.peak_mb:.0f} MB "
                           f"({resident:.0f} MB resident before the call)")
        result.note = "; ".join(part for part in (result.note, profiled) if part)
        if checked:
            agrees, what = checked[0]
            result.note = "; ".join(part for part in (what, result.note) if part)
            if agrees is False:  # not published as a speed-up: the row fails
                result.failed = True
    except Exception as exc:  # one failing provider must not end the run; its row says what happened
        if impl.error_is_skip or (impl.oom_is_skip and is_out_of_memory(exc)):
            result.note = f"{provider} failed: {_summary(exc)}"
        else:
            result.note, result.failed = f"error: {_summary(exc)}", True
            print(f"\n{traceback.format_exc()}", file=sys.stderr)
    return result


def smallest_shapes(cases: list[registry.Case]) -> list[registry.Case]:
    """--quick: of the cases of each (op, mode, dtype), those of the smallest shape (fewest elements), in order."""
    def size(case: registry.Case) -> int:
        n = 1
        for d in case.shape:
            n *= d
        return n

    best: dict[tuple, int] = {}
    for case in cases:
        key = (case.module, case.op, case.mode, case.dtype)
        best[key] = min(best.get(key, size(case)), size(case))
    return [case for case in cases if size(case) == best[(case.module, case.op, case.mode, case.dtype)]]


def _legend(device: torch.device) -> str:
    if device.type == "cuda":
        times = ("median/p20/p80: GPU time per call with the CPU running ahead (as inside a training step); "
                 "host ms: CPU time to issue the call (above the median: launch-bound when run alone).\n")
        peak = "CUDA allocator peak during one call, inputs excluded"
    else:
        times = ""
        peak = ("CPU estimate = tensors saved for backward + tensors returned, inputs excluded "
                "(CPU has no allocator peak)")
    return ("\nbytes: the minimal bytes a fused implementation moves (defined in each case module); "
            "achieved = bytes / median; % ceiling = achieved / copy bandwidth (matmul for flop-counted "
            "ops).\n"
            f"{times}peak MB: {peak}.")


def _plot(csv_path: Path, out_dir: str, device: str | None = None) -> int:
    try:
        from .plot import draw_charts, summary_markdown

        for path in draw_charts(csv_path, out_dir, device):
            print(f"chart written to {path}")
        print(summary_markdown(csv_path, device))
    except ImportError:
        print("fusedrl bench: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"fusedrl bench: --plot: {exc}", file=sys.stderr)
        return 2
    return 0


def run_bench(args) -> int:
    """Run the benchmark as `fusedrl bench` was asked (see `add_arguments`); 0 when nothing failed."""
    if getattr(args, "from_csv", None):
        if not args.plot:
            print("fusedrl bench: --from-csv draws charts: give --plot DIR too", file=sys.stderr)
            return 2
        return _plot(Path(args.from_csv), args.plot)
    try:
        device = _device(args.device)
        sizes = args.sizes if args.sizes != "auto" else ("default" if device.type == "cuda" else "small")
        config = registry.CaseConfig(device=device, sizes=sizes,
                                     dtypes=_dtypes(getattr(args, "dtypes", None), device))
        cases = registry.collect(config, _split(args.ops))
    except ValueError as exc:
        print(f"fusedrl bench: {exc}", file=sys.stderr)
        return 2
    shapes = _split(getattr(args, "shapes", None))
    if shapes is not None:
        known_shapes = sorted({case.shape_str for case in cases})
        unknown_shapes = sorted(set(shapes) - set(known_shapes))
        if unknown_shapes:
            print(f"fusedrl bench: --shapes: no case of the selected ops and sizes has shape {unknown_shapes}; "
                  f"known: {', '.join(known_shapes)}", file=sys.stderr)
            return 2
        cases = [case for case in cases if case.shape_str in shapes]
    quick = getattr(args, "quick", False)
    if quick:
        cases = smallest_shapes(cases)
    modes, providers = _split(args.modes), _split(args.providers)
    known_providers = {p for case in cases for p in case.providers}
    unknown = set(providers or ()) - known_providers
    if unknown:
        known = ", ".join(sorted(known_providers))
        print(f"fusedrl bench: --providers: unknown {sorted(unknown)}; known: {known}", file=sys.stderr)
        return 2
    unknown_modes = sorted(set(modes or ()) - {case.mode for case in cases})
    if unknown_modes:
        known = ", ".join(sorted({case.mode for case in cases}))
        print(f"fusedrl bench: --modes: no case of the selected ops has mode {unknown_modes}; known: {known}",
              file=sys.stderr)
        return 2
    cases = [case for case in cases if modes is None or case.mode in modes]
    plan = [(case, [p for p in case.providers if providers is None or p in providers]) for case in cases]
    reps = args.reps or (QUICK_REPS if quick else DEFAULT_REPS)[device.type]
    warmup = WARMUP[device.type]
    min_time_s = 0.0 if args.reps or quick else CPU_MIN_TIME_S
    csv_path = Path(args.csv)
    meta = _meta(device)
    total = sum(len(p) for _, p in plan)
    print(f"fusedrl bench on {meta['device']}: {len(cases)} cases, {total} measurements, {reps} reps, "
          f"sizes {config.sizes}{' (--quick)' if quick else ''}; rows appended to {csv_path}", file=sys.stderr,
          flush=True)

    started = time.perf_counter()
    ceilings = measure_ceilings(device, reps, warmup)
    results = _ceiling_results(ceilings)
    matmul = f", bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s" if ceilings.matmul_tflops else ""
    print(f"ceilings: copy {ceilings.copy_gbps:.1f} GB/s (read + write){matmul}", file=sys.stderr, flush=True)
    try:
        append_csv(csv_path, meta, results)
    except ValueError as exc:
        print(f"fusedrl bench: {exc}", file=sys.stderr)
        return 2

    done = 0
    for case, case_providers in plan:
        try:
            impl_for = case.setup()
        except Exception as exc:  # e.g. out of memory for the inputs: every provider of the case fails
            print(traceback.format_exc(), file=sys.stderr)
            impl_for = functools.partial(_raise, exc)
        eager_ms, eager_print = None, []
        for provider in case_providers:
            done += 1
            label = f"[{done:>{len(str(total))}}/{total}] {case.op} {case.mode} {case.shape_str} " \
                    f"{DTYPE_NAMES.get(case.dtype, case.dtype)} {provider}"
            print(f"{label} ...", end="", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            result = _run_provider(case, impl_for, provider, device=device, reps=reps, warmup=warmup,
                                   min_time_s=min_time_s, no_compile=args.no_compile or quick,
                                   profile_dir=getattr(args, "profile", None), eager_print=eager_print)
            if result.timing is not None:
                if provider == EAGER:
                    eager_ms = result.timing.median_ms
                if not result.failed:  # a row whose output is wrong gets no speed-up or fraction of a ceiling
                    _score(result, case, ceilings, eager_ms)
                outcome = f"{result.timing.median_ms:.4g} ms, peak {result.timing.peak_mb:.0f} MB"
                if result.failed:
                    outcome += f" FAILED: {result.note}"
                if getattr(args, "profile", None) and result.note:
                    outcome += f"\n    {result.note}"
            else:
                outcome = result.note if result.failed else f"skipped ({result.note})"
            print(f" {outcome}  [{time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
            append_csv(csv_path, meta, [result])  # row by row: a run stopped by a time limit keeps each one
            results.append(result)
        del impl_for  # frees this case's inputs before the next case allocates its own

    print(format_table(results))
    print(_legend(device))
    print(f"{len(results)} rows appended to {csv_path} in {time.perf_counter() - started:.0f} s")
    if args.plot:
        _plot(csv_path, args.plot)
    failed = [r for r in results if r.failed]
    if failed:
        print(f"fusedrl bench: {len(failed)} measurement(s) failed; see the note column", file=sys.stderr)
    return 1 if failed else 0
