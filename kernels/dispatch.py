"""Backend dispatch: which implementation (torch | triton | cuda) serves one call of an op.

Rules (DESIGN.md, "One op, three backends"):
- CUDA tensors -> the CUDA extension if it is already built or loaded and supports the inputs,
  else Triton, else torch (`PREFERENCE`); an op whose Triton kernels were measured faster than its
  CUDA ones on every case declares `auto_order=TRITON_FIRST` instead (the CUDA extension then serves
  when Triton cannot: no triton package, or inputs its kernels refuse). CPU tensors -> torch, except
  that Triton serves CPU tensors when its interpreter is on (`TRITON_INTERPRET=1`, the test setting).
- `FUSEDRL_BACKEND=torch|triton|cuda` forces one backend: when it cannot serve the inputs the call
  raises a `RuntimeError` that says why. An auto-selected backend that cannot serve falls back, and
  says so once per (op, backend, reason) at debug level on the `fusedrl` logger.
- Nothing here queries a GPU at import time; every check runs at call time and is cheap (no syncs).

Each op registers an `OpSpec` naming its backends and a per-call `supports` check, so that
`fusedrl info` can list, for every op, which backends can serve on this machine and why not.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

log = logging.getLogger("fusedrl")

ENV_BACKEND = "FUSEDRL_BACKEND"


class Backend(str, Enum):
    TORCH = "torch"
    TRITON = "triton"
    CUDA = "cuda"


# Order of preference for CUDA tensors (DESIGN.md), and the one of the ops whose Triton kernels measured faster than
# their CUDA kernels in every case (H200, results/2026-11-27_H200_all_run1.csv: diffusion_step 1.1-1.5x, grpo_loss
# 1.1x; the Triton kernels are the same code on other GPUs, the CUDA ones too, so no device is singled out).
PREFERENCE = (Backend.CUDA, Backend.TRITON, Backend.TORCH)
TRITON_FIRST = (Backend.TRITON, Backend.CUDA, Backend.TORCH)

# (tensors, backend) -> None when the op's own kernel supports these inputs, else the reason.
SupportCheck = Callable[[Sequence[torch.Tensor], Backend], "str | None"]


@dataclass(frozen=True)
class OpSpec:
    name: str
    backends: tuple[Backend, ...]
    supports: SupportCheck = field(default=lambda tensors, backend: None)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    auto_order: tuple[Backend, ...] = PREFERENCE  # the backends auto-dispatch tries for CUDA tensors, in order


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    OPS[spec.name] = spec
    return spec


def forced_backend() -> Backend | None:
    """The backend named by `FUSEDRL_BACKEND`, or None when unset/empty/"auto"."""
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    if value in ("", "auto"):
        return None
    try:
        return Backend(value)
    except ValueError:
        choices = ", ".join(b.value for b in Backend)
        raise ValueError(
            f"{ENV_BACKEND}={value!r} is not a backend; choose one of {choices} or leave it unset"
        ) from None


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Whether a `triton` package is there: a file lookup at import (no import of triton, no GPU query). Dispatch runs
# inside torch.compile'd code too, where Dynamo refuses to trace `find_spec` and imports: the import itself is
# tried once, in eager code, and its outcome kept in _TRITON_ERROR for traced calls to read.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None
_TRITON_ERROR: list[str | None] = []  # [the import's error or None], once tried


def triton_import_error() -> str | None:
    """Why Triton cannot be used (not installed, or its import fails), or None."""
    if _TRITON_ERROR:
        return _TRITON_ERROR[0]
    if not _TRITON_FOUND:
        return "triton is not installed"
    if torch.compiler.is_compiling():  # traced before any eager call: the package is there, assume it imports
        return None
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install must not break `import fusedrl`
        _TRITON_ERROR.append(f"triton failed to import: {exc}")
    else:
        _TRITON_ERROR.append(None)
    return _TRITON_ERROR[0]


def _device_reason(tensors: Sequence[torch.Tensor], backend: Backend) -> str | None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"inputs are on several devices: {sorted(str(d) for d in devices)}"
    device = next(iter(devices))
    dtypes = {t.dtype for t in tensors}
    if backend is Backend.TORCH:
        return None
    if backend is Backend.TRITON:
        err = triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            if torch.bfloat16 in dtypes:
                # The interpreter computes bf16 through numpy and returns silently wrong values.
                return "bf16 under TRITON_INTERPRET=1 gives wrong results"
            return None
        return f"tensors on {device.type} need a CUDA device (or TRITON_INTERPRET=1 on CPU)"
    # Backend.CUDA
    if device.type != "cuda":
        return f"tensors on {device.type}; the CUDA extension runs on CUDA tensors only"
    from . import cuda_ext  # local: cuda_ext imports torch.utils.cpp_extension lazily, never builds here

    if not cuda_ext.is_loaded():
        return cuda_ext.unavailable_reason() or "the CUDA extension is not built (run `fusedrl build-ext`)"
    return None


def why_not(spec: OpSpec, backend: Backend, tensors: Sequence[torch.Tensor]) -> str | None:
    """None when `backend` can serve `spec` for these inputs, else a one-line reason."""
    if backend not in spec.backends:
        return f"{spec.name} has no {backend.value} implementation"
    bad = [t.dtype for t in tensors if t.dtype not in spec.dtypes]
    if bad and backend is not Backend.TORCH:
        return f"dtype {bad[0]} is not supported by the {backend.value} kernels"
    reason = _device_reason(tensors, backend)
    if reason is None:
        reason = spec.supports(tensors, backend)
    return reason


_said: set[tuple[str, str, str]] = set()


def _say_once(op: str, backend: Backend, reason: str) -> None:
    key = (op, backend.value, reason)
    if key not in _said:
        _said.add(key)
        log.debug("fusedrl: %s skips the %s backend: %s", op, backend.value, reason)


def select(spec: OpSpec, tensors: Sequence[torch.Tensor]) -> Backend:
    """Pick the backend for one call of `spec` on `tensors` (all inputs that the kernel reads)."""
    forced = forced_backend()
    if forced is not None:
        reason = why_not(spec, forced, tensors)
        if reason is not None:
            raise RuntimeError(f"{ENV_BACKEND}={forced.value} cannot run {spec.name}: {reason}")
        return forced
    device_type = tensors[0].device.type
    if device_type == "cuda":
        candidates = spec.auto_order
    elif device_type == "cpu" and triton_interpreting():
        # Interpreter mode (tests): Triton serves CPU tensors so that its kernels are exercised.
        candidates = (Backend.TRITON, Backend.TORCH)
    else:
        candidates = (Backend.TORCH,)
    for backend in candidates:
        reason = why_not(spec, backend, tensors)
        if reason is None:
            return backend
        _say_once(spec.name, backend, reason)
    raise RuntimeError(f"no backend can run {spec.name}")  # torch always can; kept as a guard


def availability(device: torch.device | None = None) -> dict[str, dict[str, str | None]]:
    """For `fusedrl info`: for each op, each backend -> None (can serve) or why not.

    Probed with small fp32 tensors on `device` (the current CUDA device when present, else CPU).
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    probe = [torch.zeros(2, 4, device=device)]
    return {
        name: {backend.value: why_not(spec, backend, probe) for backend in Backend}
        for name, spec in sorted(OPS.items())
    }
