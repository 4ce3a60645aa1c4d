"""One timer for every benchmark: warm-up, then `reps` timed calls; median, p20, p80, host time, memory.

- CUDA: `median_ms` is the GPU time of one call with the CPU running ahead, as inside a training
  step, where the model's kernels keep the GPU queue full and Python overhead is hidden. Before each
  call the GPU is held busy by `torch.cuda._sleep` for about twice the call's CPU issue time, so the
  whole call is queued before its first kernel starts, and a pair of CUDA events brackets only its
  kernels. Without that hold, fusedrl's CUDA step on 24 x 16 x 128 x 128 bf16 latents (63 MB moved,
  ~15 us at the 4.2 TB/s copy bandwidth measured on an H200) timed 83 us forward and 740 us
  forward + backward: Python and launch overhead, with the GPU mostly idle. A 256 MiB
  buffer is zeroed before each call, evicting the L2 (50-60 MiB on H100/H200), so every call reads its
  inputs from HBM as it would in a real step.
  `host_ms` is the CPU time to issue one call (Python, checks, dispatch, launches), taken on calls that
  start with the GPU idle, not on the held ones: under the hold a call that queues more kernels than
  the launch queue takes (about a thousand) blocks until the GPU drains it, so its issue time would count the hold
  (an H200 run of token_logprobs' chunked backward read 144 ms against 61 ms of GPU time that way).
  When `host_ms` exceeds `median_ms`, the call is launch-bound when it runs alone.
- CPU: `time.perf_counter` around each call; `host_ms` equals `median_ms`.

Warm-up: up to `warmup` untimed calls, fewer when they take long: it stops once WARMUP_ENOUGH_S have been
spent (at least one call), so a training step of seconds costs one warm-up call rather than five.
Memory (`peak_mb`):
- CUDA: `torch.cuda.max_memory_allocated()` during the last timed call minus what was allocated before
  it (inputs excluded, outputs and every transient tensor included) - the allocator's true peak.
  `resident_mb`: what was allocated before that call (the model, the inputs, gradients kept from earlier
  calls; the timer's own L2-flush buffer left out), so that resident + peak is the process's whole
  allocator peak, the figure a memory target ("trains within 40 GB") is about.
- CPU: torch keeps no allocator peak on the CPU (and tracemalloc does not see its allocations), so
  this is an ESTIMATE, on one extra call: the bytes of the distinct storages saved for backward during the
  call plus those the call returns, minus the inputs. It shows what a training pass holds between forward
  and backward; transient tensors freed inside the call are not seen. NaN when it cannot be taken;
  `resident_mb` is NaN on the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

FLUSH_BYTES = 256 * 2**20
# The GPU is held for 2x the call's CPU issue time plus this margin, and never longer than MAX_HOLD_S.
HOLD_MARGIN_S = 100e-6
MAX_HOLD_S = 0.1
WARMUP_ENOUGH_S = 2.0  # warm-up calls stop once they have taken this long (after at least one)

_flush_buffers: dict[torch.device, torch.Tensor] = {}
_sleep_cycles_per_s: dict[torch.device, float] = {}


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    host_ms: float
    peak_mb: float
    reps: int
    resident_mb: float = math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def measure(fn: Callable[[], object], device: torch.device, reps: int, warmup: int,
            inputs: Iterable[torch.Tensor] = (), min_time_s: float = 0.0,
            first: Callable[[object], None] | None = None) -> Timing:
    """Time `fn()` (results are dropped at once); `inputs` are left out of the CPU memory estimate. `first`
    gets the first warm-up call's result (one untimed call more when `warmup` is 0), before any timed call.

    On the CPU, calls go on past `reps` (up to 20x) until they add up to `min_time_s`: a fast call
    then gets enough samples for stable percentiles while a slow one stops at `reps`.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    _warm_up(fn, device, max(warmup, 1 if first is not None else 0), first)
    if device.type == "cuda":
        times, host, peak, resident = _cuda_times(fn, device, reps)
    else:
        times = host = _cpu_times(fn, reps, min_time_s)
        peak, resident = _cpu_held_mb(fn, inputs), math.nan
    return Timing(percentile(times, 50), percentile(times, 20), percentile(times, 80), percentile(host, 50),
                  peak, len(times), resident)


def _warm_up(fn: Callable[[], object], device: torch.device, calls: int,
             first: Callable[[object], None] | None = None) -> None:
    """Up to `calls` calls, stopping once WARMUP_ENOUGH_S have passed (module docstring); the first call's
    result goes to `first`."""
    start = time.perf_counter()
    for i in range(calls):
        out = fn()
        if i == 0 and first is not None:
            first(out)
        del out
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if time.perf_counter() - start >= WARMUP_ENOUGH_S:
            return


def _cpu_times(fn: Callable[[], object], reps: int, min_time_s: float) -> list[float]:
    times: list[float] = []
    while len(times) < reps or (sum(times) < min_time_s * 1e3 and len(times) < 20 * reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _cycles_per_second(device: torch.device) -> float:
    """The rate of `torch.cuda._sleep`'s cycle count, measured once per device."""
    if device not in _sleep_cycles_per_s:
        cycles = 1_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(2):  # the first launch pays one-time costs
            torch.cuda.synchronize(device)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            torch.cuda.synchronize(device)
        _sleep_cycles_per_s[device] = cycles / (start.elapsed_time(end) * 1e-3)
    return _sleep_cycles_per_s[device]


def _host_seconds(fn: Callable[[], object], device: torch.device, calls: int = 3) -> list[float]:
    """The CPU time to issue each of a few calls, each started with the GPU idle (a call past the launch
    queue's depth waits for the GPU: that wait is what it costs alone). Only one call when twice its issue
    time reaches MAX_HOLD_S: the hold is then capped at MAX_HOLD_S whatever the median."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if 2 * times[-1] >= MAX_HOLD_S:
            break
    torch.cuda.synchronize(device)
    return times


def _cuda_times(fn: Callable[[], object], device: torch.device,
                reps: int) -> tuple[list[float], list[float], float, float]:
    """(GPU ms, host ms) of each of `reps` calls, and the allocator's (peak, resident) MB of the last one."""
    with torch.cuda.device(device):
        flush = _flush_buffers.get(device)
        if flush is None:
            flush = _flush_buffers[device] = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
        host = _host_seconds(fn, device)
        hold_s = min(2 * percentile(host, 50) + HOLD_MARGIN_S, MAX_HOLD_S)
        hold_cycles = int(hold_s * _cycles_per_second(device))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i, (start, end) in enumerate(zip(starts, ends)):
            torch.cuda.synchronize(device)
            if i == reps - 1:  # the last call also gives the peak: nothing below allocates but fn
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            torch.cuda._sleep(hold_cycles)
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    resident = base - flush.numel() * flush.element_size()
    return ([start.elapsed_time(end) for start, end in zip(starts, ends)], [t * 1e3 for t in host], peak / 2**20,
            resident / 2**20)


def _tensors(obj: object) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _cpu_held_mb(fn: Callable[[], object], inputs: Iterable[torch.Tensor]) -> float:
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
    except RuntimeError:
        # The estimate is a side measurement: when a provider rejects saved-tensor hooks, keep its timing.
        return float("nan")
    skip = {t.untyped_storage().data_ptr() for t in inputs}
    held: dict[int, int] = {}
    for t in list(_tensors(out)) + saved:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            held[storage.data_ptr()] = storage.nbytes()
    return sum(held.values()) / 2**20
