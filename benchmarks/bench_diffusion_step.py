"""pytest-benchmark cases of the diffusion step on the CPU paths: the trainers' eager formula and
fusedrl's torch backend, small latents, rollout forward and training forward + backward.

They reuse the cases of `fusedrl bench` (fusedrl/bench/cases/diffusion_step.py), so both measure
the same calls; GPU providers are timed by `fusedrl bench` (benchmarks/gpu_check.sh) instead.
Each test makes a fixed 10 timed calls so that plain `pytest` stays quick.
"""

from __future__ import annotations

import pytest
import torch

from fusedrl.bench.cases import CaseConfig
from fusedrl.bench.cases import diffusion_step as cases

CONFIG = CaseConfig(device=torch.device("cpu"), sizes="small", dtypes=(torch.float32,))
CASES = {(c.op, c.mode): c for c in cases.cases(CONFIG)}


@pytest.mark.parametrize("provider", ["eager", "torch"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op", ["flow_sde_step", "ddim_step"])
def test_diffusion_step(benchmark, monkeypatch, op, mode, provider):
    case = CASES[(op, mode)]
    impl = case.setup()(provider)
    for key, value in impl.env.items():
        monkeypatch.setenv(key, value)
    benchmark.group = f"{op} {mode} {case.shape_str}"
    benchmark.extra_info["bytes"] = case.bytes
    result = benchmark.pedantic(impl.fn, rounds=10, warmup_rounds=1)
    if mode == "fwd+bwd":
        assert all(torch.isfinite(g).all() for g in result)
    else:
        assert torch.isfinite(result[1]).all()  # (prev_sample, logp, ...) from either provider
