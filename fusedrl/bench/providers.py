"""What a provider hands the runner, and the pieces that the cases of every op share.

A provider is one way of computing an op: "eager" (the trainers' plain PyTorch formula), "compile"
(`torch.compile` of that same formula), "torch" / "triton" / "cuda" (fusedrl's public function
with `FUSEDRL_BACKEND` forced), or a peer library. A case turns a provider name into an `Impl`, or
raises `Skip` with the reason it cannot run here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

EAGER = "eager"
COMPILE = "compile"
FUSEDRL_BACKENDS = ("torch", "triton", "cuda")
STANDARD = (EAGER, COMPILE) + FUSEDRL_BACKENDS


class Skip(Exception):
    """This provider cannot run this case on this machine; the message says why."""


def require(module: str, package: str | None = None) -> None:
    """Skip unless `module` can be found (`package`: its pip name, for the message; default `module`)."""
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{package or module} is not installed")


@dataclass
class Impl:
    """One timed call and what the runner must know to time it.

    fn: runs the case once (results are dropped).
    env: environment variables set while fn runs (e.g. FUSEDRL_BACKEND).
    inputs: tensors that exist before the call, left out of the CPU memory estimate.
    error_is_skip: an exception on the first call means "cannot run here" (torch.compile failing for
        want of a compiler), not a bug to report.
    oom_is_skip: running out of memory means "does not fit this card" (a row's note, not a failure); any other
        exception fails the row.
    random_output: each call draws fresh noise, so its output is not compared with eager's (output_check).
    report_resident: the row's note gives the whole allocator peak, what was resident before the call
        (model weights) included, for cases whose target is a whole-process figure (training steps).
    """

    fn: Callable[[], object]
    env: dict[str, str] = field(default_factory=dict)
    inputs: Sequence[torch.Tensor] = ()
    error_is_skip: bool = False
    oom_is_skip: bool = False
    random_output: bool = False
    report_resident: bool = False


def compiled(fn: Callable) -> Callable:
    """`torch.compile(fn)` with fresh dynamo caches.

    Dynamo counts recompilations per code object, so the cases of one op (every mode, dtype and
    shape compiles the same function) would hit its recompile limit and silently run eager; a reset
    gives each case its own compile. Shapes are static, as they are within a training run.
    """
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def fusedrl_env(spec, provider: str, tensors: Sequence[torch.Tensor]) -> dict[str, str]:
    """The environment that forces fusedrl's `provider` backend for `spec`, or Skip with the reason."""
    from fusedrl.kernels import dispatch

    backend = dispatch.Backend(provider)
    reason = dispatch.why_not(spec, backend, tensors)
    if reason is None and backend is dispatch.Backend.TRITON and tensors[0].device.type == "cpu":
        reason = "Triton on CPU tensors runs in its interpreter (TRITON_INTERPRET=1): timings mean nothing"
    if reason is not None:
        raise Skip(reason)
    return {dispatch.ENV_BACKEND: provider}


def pick(provider: str, *, eager: Callable, public: Callable, spec, tensors: Sequence[torch.Tensor],
         peers: dict[str, Callable[[], Callable]] | None = None) -> tuple[Callable, dict[str, str]]:
    """(function to time, environment) for a standard provider or a peer: "eager" runs `eager` (the
    plain formula), "compile" compiles it, fusedrl's backends run `public` with that backend forced,
    a peer name calls its factory (which raises Skip when the peer is not installed)."""
    if provider == EAGER:
        return eager, {}
    if provider == COMPILE:
        return compiled(eager), {}
    if peers and provider in peers:
        return peers[provider](), {}
    if provider in FUSEDRL_BACKENDS:
        return public, fusedrl_env(spec, provider, tensors)
    raise ValueError(f"unknown provider {provider!r}")
