"""Tile settings come from the device's properties (mocked here: no consumer GPU is at hand)."""

from __future__ import annotations

import os

import pytest
import torch

from fusedrl.kernels import tiles as device_tiles
from fusedrl.kernels import token_logprobs
from fusedrl.kernels.logprobs import hidden_op
from fusedrl.kernels.logprobs import hidden_triton as hk
from fusedrl.kernels.logprobs.hidden_reference import naive

KB = 1024
# shared_memory_per_block_optin of the architectures users train on
H100 = device_tiles.DeviceLimits((9, 0), 227 * KB)
A100 = device_tiles.DeviceLimits((8, 0), 163 * KB)
RTX_4090 = device_tiles.DeviceLimits((8, 9), 99 * KB)
RTX_3090 = device_tiles.DeviceLimits((8, 6), 99 * KB)


@pytest.mark.parametrize("limits", [H100, A100, RTX_4090, RTX_3090], ids=["sm90", "sm80", "sm89", "sm86"])
@pytest.mark.parametrize("itemsize", [2, 4], ids=["half", "fp32"])
def test_token_logprobs_tiles_fit_shared_memory(limits, itemsize):
    tiles = hk.pick_tiles(itemsize, limits)
    assert tiles.shared_bytes(itemsize) <= limits.shared_memory
    assert hk.COLUMN_ALIGN % tiles.block_v == 0
    # the largest that fits: every larger candidate would not
    for bigger in hk.GPU_TILES[:hk.GPU_TILES.index(tiles)]:
        assert bigger.shared_bytes(itemsize) > limits.shared_memory


def test_hopper_gets_the_large_tiles_and_consumer_cards_smaller_ones():
    assert hk.pick_tiles(2, H100) == hk.GPU_TILES[0]
    assert hk.pick_tiles(2, RTX_4090).block_n * hk.pick_tiles(2, RTX_4090).block_h < 128 * 64


def test_cpu_tensors_get_interpreter_tiles():
    assert device_tiles.device_limits(torch.device("cpu")) == device_tiles.INTERPRETER
    assert hk.pick_tiles(4, device_tiles.INTERPRETER) == hk.INTERPRETER_TILES


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU tensors through the interpreter; a GPU compiles these tiles in test_triton_compile")
@pytest.mark.parametrize("limits", [RTX_3090, H100], ids=["sm86", "sm90"])
def test_token_logprobs_runs_with_the_tiles_of_a_card(limits, monkeypatch, use_backend):
    """The tiles a card would get give the same numbers (run by the interpreter: the kernels' logic with
    those block sizes; the GPU compile of them is in test_triton_compile)."""
    monkeypatch.setattr(hidden_op, "device_limits", lambda device: limits)
    use_backend("triton")
    g = torch.Generator().manual_seed(0)
    N, H, V = 131, 72, 300
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    logp, ent = token_logprobs(hidden, weight, labels, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want_logp, want_ent = naive(h64, w64, labels, None, 1.0, None, -100)
    (want_logp.sum() + want_ent.sum()).backward()
    torch.testing.assert_close(logp.double(), want_logp, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent.double(), want_ent, atol=2e-5, rtol=0)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=2e-5, rtol=1e-4)
