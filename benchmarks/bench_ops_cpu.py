"""pytest-benchmark cases of every op's CPU paths: each case of `fusedrl bench` at its small size (the same
calls, from fusedrl/bench/cases/), on the providers that run on a CPU: the trainers' eager formula and fusedrl's
torch backend (checkpointing: no checkpointing and "full"; the attention-only timing of its model), so a
regression shows on any machine. GPU providers are timed by `fusedrl bench` (benchmarks/gpu_check.sh) instead.

Each test makes a fixed 5 timed calls so that plain `pytest` stays quick; compare runs with pytest-benchmark's
own tools (`pytest benchmarks/bench_ops_cpu.py --benchmark-autosave`, then `--benchmark-compare`).
"""

from __future__ import annotations

import pytest
import torch

from fusedrl.bench import cases as registry
from fusedrl.bench.providers import Skip

CONFIG = registry.CaseConfig(device=torch.device("cpu"), sizes="small", dtypes=(torch.float32,))
CPU_PROVIDERS = ("eager", "torch", "none", "full", "attention")
CASES = {f"{c.op}-{c.mode}-{c.shape_str}": c for c in registry.collect(CONFIG)}
PARAMS = [pytest.param(key, p, id=f"{key}-{p}") for key, c in CASES.items() for p in c.providers if p in CPU_PROVIDERS]


def _finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True  # other outputs (None, numbers of a timing-only call) carry nothing to check


def test_every_op_has_a_cpu_benchmark():
    ops = {c.module for c in CASES.values()}
    covered = {CASES[p.values[0]].module for p in PARAMS}
    assert ops == covered and len(ops) >= 7, sorted(ops - covered)


@pytest.mark.parametrize(("key", "provider"), PARAMS)
def test_op_cpu(benchmark, monkeypatch, key, provider):
    case = CASES[key]
    try:
        impl = case.setup()(provider)
    except Skip as exc:  # e.g. a reward whose optional package is missing
        pytest.skip(str(exc))
    for name, value in impl.env.items():
        monkeypatch.setenv(name, value)
    benchmark.group = f"{case.op} {case.mode} {case.shape_str}"
    benchmark.extra_info["bytes"] = case.bytes
    if case.flops is not None:
        benchmark.extra_info["flops"] = case.flops
    result = benchmark.pedantic(impl.fn, rounds=5, warmup_rounds=1)
    assert _finite(result)
