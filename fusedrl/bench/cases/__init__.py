"""The registry of benchmark cases: every module in this package is one op family.

To benchmark a new op, add `cases/<op>.py` defining

    def cases(config: CaseConfig) -> list[Case]: ...

and nothing else: the runner imports every module here (names starting with "_" excepted), and
`--ops` selects modules by file name or cases by their `op`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..providers import Impl

SIZES = ("default", "small")


@dataclass(frozen=True)
class CaseConfig:
    device: torch.device
    sizes: str  # one of SIZES: "default" = real model sizes, "small" = CPU / CI sizes
    dtypes: tuple[torch.dtype, ...]


@dataclass(frozen=True)
class Case:
    """One (op, mode, shape, dtype) point, timed on each of `providers`.

    bytes: the minimal bytes an ideal implementation moves (each module's docstring defines them).
    flops: set for compute-bound ops; their results are then read against the matmul ceiling.
    setup: allocates the inputs and returns `impl(provider) -> Impl` (raising providers.Skip); the
        inputs live as long as that function, i.e. while the runner times this case's providers.
    """

    op: str
    mode: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bytes: int
    providers: tuple[str, ...]
    setup: Callable[[], Callable[[str], Impl]]
    flops: int | None = None
    module: str = ""

    @property
    def shape_str(self) -> str:
        return "x".join(str(d) for d in self.shape)


def modules() -> dict[str, object]:
    """Every case module of this package, by name."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            found[info.name] = importlib.import_module(f"{__name__}.{info.name}")
    return found


def collect(config: CaseConfig, ops: Iterable[str] | None = None) -> list[Case]:
    """The cases of the selected ops (module names or case ops), in registry order; all when ops is None."""
    wanted = None if ops is None else set(ops)
    found: list[Case] = []
    for name, module in sorted(modules().items()):
        declared = getattr(module, "OPS", None)  # a module whose cases cost time to build names its ops
        if wanted is not None and declared is not None and not ({name, *declared} & wanted):
            continue
        for case in module.cases(config):
            case = dataclasses.replace(case, module=name)
            if wanted is None or name in wanted or case.op in wanted:
                found.append(case)
    if wanted is not None:
        known = {c.module for c in found} | {c.op for c in found}
        unknown = wanted - known
        if unknown:
            raise ValueError(f"--ops: unknown op(s) {sorted(unknown)}; known: {', '.join(names(config))}")
    return found


def names(config: CaseConfig) -> list[str]:
    """Module names and case ops that `--ops` accepts."""
    result = []
    for name, module in sorted(modules().items()):
        result.append(name)
        ops = getattr(module, "OPS", None) or {case.op for case in module.cases(config)}
        result += sorted(set(ops) - {name})
    return result
