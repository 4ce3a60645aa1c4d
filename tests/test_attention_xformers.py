"""flash_attention's torch path hands CUDA calls to xformers only when xformers really works here.

No GPU and no working xformers here: the decision is tested with stand-in modules, and the layout
plumbing (GQA in xformers' 5-D [B, N, G, H/G, D] layout, bottom-right causal) with a stand-in
`memory_efficient_attention` that follows xformers' documented semantics.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from fusedrl.kernels.attention import xformers_path
from fusedrl.kernels.attention.reference import attention_reference


@pytest.fixture
def fake_xformers(monkeypatch):
    """Install a stand-in `xformers` package; returns it (set `_has_cpp_library` as the case needs)."""

    class BottomRight:
        pass

    def memory_efficient_attention(q, k, v, attn_bias=None, scale=None):
        # [B, M, G, H, K] -> compute per (G, H) head with the bottom-right causal rule
        B, M, G, H, K = q.shape
        to4 = lambda t: t.permute(0, 2, 3, 1, 4).reshape(B, G * H, t.shape[1], K)
        out, _ = attention_reference(to4(q), to4(k), to4(v), causal=isinstance(attn_bias, BottomRight), scale=scale)
        return out.reshape(B, G, H, M, K).permute(0, 3, 1, 2, 4)

    xformers = types.ModuleType("xformers")
    xformers.__spec__ = importlib.machinery.ModuleSpec("xformers", None)
    xformers._has_cpp_library = True
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    ops.fmha = types.SimpleNamespace(attn_bias=types.SimpleNamespace(LowerTriangularFromBottomRightMask=BottomRight))
    xformers.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", xformers)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: xformers.__spec__ if name == "xformers"
                        else importlib.machinery.PathFinder.find_spec(name))
    xformers_path.unavailable_reason.cache_clear()
    yield xformers
    xformers_path.unavailable_reason.cache_clear()


def test_not_installed_is_the_reason_here():
    xformers_path.unavailable_reason.cache_clear()
    if importlib.util.find_spec("xformers") is None:
        assert xformers_path.unavailable_reason() == "xformers is not installed"
    q = torch.zeros(1, 1, 2, 8)
    assert xformers_path.why_not(q, None, False) is not None


def test_a_wheel_whose_cpp_library_fails_is_refused_with_the_reason(fake_xformers):
    fake_xformers._has_cpp_library = False
    reason = xformers_path.unavailable_reason()
    assert reason is not None and "C++/CUDA library did not load" in reason


def test_working_xformers_serves_cuda_calls_only_without_padding_or_lse(fake_xformers):
    assert xformers_path.unavailable_reason() is None
    q = torch.zeros(1, 2, 4, 8)
    assert "CUDA" in xformers_path.why_not(q, None, False)
    meta = torch.empty(1, 2, 4, 8, device="meta")  # stands for a CUDA tensor in the device check
    assert "meta" in xformers_path.why_not(meta, None, False)
    mask = torch.ones(1, 4, dtype=torch.bool)
    cuda_like = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16)
    assert xformers_path.why_not(cuda_like, None, False) is None
    assert "padding" in xformers_path.why_not(cuda_like, mask, False)
    assert "log-sum-exp" in xformers_path.why_not(cuda_like, None, True)
    assert "float64" in xformers_path.why_not(types.SimpleNamespace(device=torch.device("cuda"),
                                                                   dtype=torch.float64), None, False)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nkv", [(7, 7), (5, 11), (11, 5)])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (6, 1)])
def test_layout_gqa_and_causal_alignment(fake_xformers, causal, Nq, Nkv, Hq, Hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, Hq, Nq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, Hkv, Nkv, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, Hkv, Nkv, 16, generator=g, dtype=torch.float64)
    got = xformers_path.attention(q, k, v, causal=causal, scale=0.3)
    want, _ = attention_reference(q, k, v, causal=causal, scale=0.3)
    torch.testing.assert_close(got, want)
