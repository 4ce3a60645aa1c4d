"""Every fusedrl custom op's implementation runs on its inputs' CUDA device (kernels/device_guard.py): a Triton
launch goes to the current device, so a call for tensors on cuda:1 while cuda:0 was current ran on the wrong GPU.
No machine here has two GPUs: the guard is checked with a tensor that says it lives on cuda:1."""

from __future__ import annotations

import contextlib
import importlib
import pkgutil

import torch

import fusedrl.kernels
from fusedrl.kernels.device_guard import on_inputs_device


class _OnCuda1(torch.Tensor):
    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 1)


def test_the_call_runs_under_the_inputs_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    ran = []
    guarded = on_inputs_device(lambda x, y, scale=1.0: ran.append((len(entered), scale)) or "out")
    x = torch.Tensor._make_subclass(_OnCuda1, torch.zeros(2))
    assert guarded(x, torch.zeros(2), scale=2.0) == "out" and ran == [(1, 2.0)]
    assert entered == [torch.device("cuda", 1)]
    assert guarded(torch.zeros(2), x) == "out" and entered == [torch.device("cuda", 1)]  # first tensor: CPU


def test_every_fusedrl_custom_op_is_guarded():
    """Each `fusedrl::` op defined in fusedrl.kernels wraps its implementation with on_inputs_device."""
    for info in pkgutil.walk_packages(fusedrl.kernels.__path__, "fusedrl.kernels."):
        if info.name.endswith(".op") or info.name.endswith("_op"):
            importlib.import_module(info.name)
    ops = [name for name in dir(torch.ops.fusedrl) if not name.startswith("_")]
    assert {"rms_norm_fwd", "diffusion_step_fwd", "flash_attention_bwd", "hidden_logprobs_fwd"} <= set(ops)
    defs = {name: torch._library.custom_ops.OPDEFS.get(f"fusedrl::{name}") for name in ops}
    defs = {name: d for name, d in defs.items() if d is not None}  # the CUDA extension's ops are C++ (CUDAGuard)
    assert len(defs) >= 14
    unguarded = [name for name, d in defs.items() if getattr(d._init_fn, "__wrapped__", None) is None]
    assert not unguarded, unguarded
