"""Checkpointed blocks whose activation inputs wait in CPU memory (engine.input_offload, checkpoint's
`offload_inputs`). On a CPU machine the bookkeeping runs with "cpu" added to the offloaded device types
(the copies are plain clones); the side-stream copies run in the GPU tests."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from fusedrl.engine import checkpointing as ckpt
from fusedrl.engine import input_offload


class Block(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.drop = nn.Dropout(0.25)
        self.seen: list[weakref.ref] = []

    def forward(self, x, *, shift=None, scale=None):
        self.seen.append(weakref.ref(x))
        h = self.drop(torch.nn.functional.gelu(self.fc1(x if shift is None else x + shift)))
        y = x + self.fc2(h)
        return y if scale is None else y * scale


class Model(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(depth))

    def forward(self, x, shift=None):
        for block in self.blocks:
            x = block(x, shift=shift)
        return x


@pytest.fixture
def on_cpu(monkeypatch):
    """Offload CPU tensors too (as clones), whatever their size."""
    monkeypatch.setattr(input_offload, "DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(input_offload, "MIN_BYTES", 0)


def _grads(model, x, shift=None, seed=0):
    torch.manual_seed(seed)  # the same dropout masks in every run
    for p in model.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    model(x, shift=shift).square().sum().backward()
    return {"x": x.grad, **{n.replace("_checkpoint_wrapped_module.", ""): p.grad
                            for n, p in model.named_parameters()}}


@pytest.mark.parametrize("policy", ["full", "save_attention"])
def test_gradients_equal_plain_backward(on_cpu, policy):
    torch.manual_seed(0)
    model, x = Model(), torch.randn(4, 9, 32)
    shift = torch.randn(32, requires_grad=True)
    want = _grads(model, x, shift)
    want_shift = shift.grad.clone()
    shift.grad = None
    assert ckpt.apply_checkpointing(model, policy, module_types=Block, offload_inputs=True) == \
        ["blocks.0", "blocks.1", "blocks.2"]
    assert "offload_inputs=True" in repr(model)
    got = _grads(model, x, shift)
    assert got.keys() == want.keys()
    for name in want:  # dropout included: the recompute restores the RNG state
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(shift.grad, want_shift)  # a keyword tensor that is no activation: kept, gets grads


def test_block_inputs_are_released_after_the_forward(on_cpu):
    """Without offloading, checkpointing keeps each block's input alive until backward; with it, only the
    host copy remains, and the recompute gets the values back."""
    torch.manual_seed(0)
    x = torch.randn(4, 9, 32, requires_grad=True)
    for offload, alive in ((False, 2), (True, 0)):
        model = Model()
        ckpt.apply_checkpointing(model, "full", module_types=Block, offload_inputs=offload)
        y = model(x)
        gc.collect()
        inner = [b.module.seen[0] for b in model.blocks[1:]]  # inputs of blocks 1 and 2: activations
        assert sum(ref() is not None for ref in inner) == alive, offload
        y.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_backward_brings_the_previous_blocks_inputs_back_first(on_cpu, monkeypatch):
    """Asking for block k's inputs in backward starts the copy back of block k-1's, before its own recompute."""
    log = []
    fetch, get = input_offload._Input.fetch, input_offload._Input.get
    ids = {}

    def logged_fetch(self):
        if self.live is None and self.back is None:
            log.append(("fetch", ids[id(self)]))
        return fetch(self)

    def logged_get(self):
        if self.live is None:
            log.append(("get", ids[id(self)]))
        return get(self)

    monkeypatch.setattr(input_offload._Input, "fetch", logged_fetch)
    monkeypatch.setattr(input_offload._Input, "get", logged_get)
    created = input_offload._Input.__init__

    def numbered(self, t):
        created(self, t)
        ids[id(self)] = len(ids)

    monkeypatch.setattr(input_offload._Input, "__init__", numbered)
    torch.manual_seed(0)
    model = Model(depth=3)
    ckpt.apply_checkpointing(model, "full", module_types=Block, offload_inputs=True)
    x = torch.randn(4, 9, 32, requires_grad=True)
    model(x).sum().backward()
    # inputs 0 and 1 of blocks 1 and 2 (block 0's input x is a leaf: its owner holds it anyway). Backward
    # recomputes block 2 first: it fetches its own input, then starts bringing back block 1's, which block 1's
    # recompute then finds on its way.
    assert log == [("fetch", 1), ("fetch", 0), ("get", 1), ("get", 0)]


def test_keyword_activations_are_offloaded_and_small_frozen_or_leaf_inputs_are_not(on_cpu, monkeypatch):
    block = Block()
    x0 = torch.randn(4, 9, 32, requires_grad=True)
    s0 = torch.randn(32, requires_grad=True)
    x, scale = x0 * 1.0, s0 * 1.0  # activations (non-leaf)
    frozen = torch.randn(4, 9, 32)
    region = input_offload.Region((frozen, x0), {"x": x, "scale": scale, "flag": True, "again": x})
    kinds = [type(v).__name__ for v in (*region._args, *region._kwargs.values())]
    assert kinds == ["Tensor", "Tensor", "_Input", "_Input", "bool", "_Input"]
    assert len(region.offloaded) == 2 and region._kwargs["again"] is region._kwargs["x"]  # one copy of x
    monkeypatch.setattr(input_offload, "MIN_BYTES", 1 << 10)  # scale (128 bytes) is below it now
    region = input_offload.Region((x,), {"scale": scale, "weight": block.fc1.weight})
    assert [type(v).__name__ for v in (*region._args, *region._kwargs.values())] == ["_Input", "Tensor",
                                                                                    "Parameter"]
    monkeypatch.setattr(input_offload, "MIN_BYTES", 0)
    # an expanded view would come back as a dense copy larger than what it frees: it stays
    wide = (s0 * 1.0).expand(4, 9, 32)
    assert type(input_offload.Region((wide,), {})._args[0]).__name__ == "Tensor"
    torch.manual_seed(0)
    want_grads = torch.autograd.grad(block(x, scale=scale).sum(), (x0, s0))
    torch.manual_seed(0)
    got = ckpt.checkpoint(block, policy="full", offload_inputs=True, x=x0 * 1.0, scale=s0 * 1.0).sum()  # keywords
    for g, w in zip(torch.autograd.grad(got, (x0, s0)), want_grads):
        torch.testing.assert_close(g, w)


def test_a_copy_brought_back_but_not_used_is_dropped_when_the_backward_ends(on_cpu, monkeypatch):
    """Graph A is still alive when graph B runs: B's backward starts bringing back A's last block input (the
    region offloaded before B's first); A's backward does not run then, so that copy is dropped when B's
    backward ends."""
    dropped = []
    drop = input_offload._Input.drop_unused
    monkeypatch.setattr(input_offload._Input, "drop_unused", lambda self: (dropped.append(self.back is not None),
                                                                           drop(self)))
    torch.manual_seed(0)
    model = Model(depth=3)
    ckpt.apply_checkpointing(model, "full", module_types=Block, offload_inputs=True)
    x = torch.randn(4, 9, 32, requires_grad=True)
    y_a = model(x)
    last_of_a = input_offload._chain.last()
    model(x).sum().backward()
    assert last_of_a.offloaded and all(item.back is None for item in last_of_a.offloaded)
    assert True in dropped  # one was on its way, and dropped
    y_a.sum().backward()  # A still trains: its inputs come back from the host
    assert all(p.grad is not None for p in model.parameters())


def test_a_block_that_changes_its_input_in_place_is_refused(on_cpu):
    def bump(x):
        x.mul_(2.0)  # in place on its input: the copy to the CPU would race it on a GPU
        return x.sin()

    x = torch.randn(4, 8).requires_grad_()
    with pytest.raises(RuntimeError, match="changed an input in place"):
        ckpt.checkpoint(bump, x.clone(), policy="full", offload_inputs=True)


def test_offload_inputs_needs_a_recomputing_policy():
    model = Model()
    for policy in ("none", "offload"):
        with pytest.raises(ValueError, match="offload_inputs needs a policy that recomputes"):
            ckpt.apply_checkpointing(model, policy, module_types=Block, offload_inputs=True)
        assert not list(ckpt.iter_wrappers(model))
        with pytest.raises(ValueError, match="offload_inputs needs a policy that recomputes"):
            ckpt.checkpoint(model.blocks[0], torch.randn(2, 32), policy=policy, offload_inputs=True)


def test_nothing_is_offloaded_on_the_cpu_by_default():
    x = torch.randn(64, 4096, requires_grad=True)  # 1 MiB, on the CPU
    assert not input_offload.Region((x,), {}).offloaded


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (side-stream copies)")


@gpu
def test_on_a_gpu_inputs_leave_the_device_and_gradients_stay_exact():
    """The side-stream copies: after the forward the blocks' inputs no longer occupy the GPU (the allocator holds
    about one input less per checkpointed block), and the gradients equal those of plain checkpointing."""
    torch.manual_seed(0)
    depth, width = 6, 1024
    x = torch.randn(8, 512, width, device="cuda", requires_grad=True)  # 16 MiB per block input
    held, grads = {}, {}
    for offload in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(*(Block(width) for _ in range(depth))).cuda()
        ckpt.apply_checkpointing(model, "full", module_types=Block, offload_inputs=offload)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.manual_seed(1)
        y = model(x)
        torch.cuda.synchronize()
        held[offload] = torch.cuda.memory_allocated() - before
        y.square().sum().backward()
        grads[offload] = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
        x.grad = None
    per_input = x.numel() * x.element_size()
    assert held[False] - held[True] >= (depth - 1) * per_input * 0.9, held  # blocks 1..5: activations
    for got, want in zip(grads[True], grads[False]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_runs_summary_line_says_what_was_offloaded(on_cpu, monkeypatch):
    monkeypatch.setattr(input_offload, "_totals", {"tensors": 0, "bytes": 0})
    assert "no block input was offloaded" in input_offload.summary()
    model = Model(depth=3)
    ckpt.apply_checkpointing(model, "full", module_types=Block, offload_inputs=True)
    model(torch.randn(4, 9, 32, requires_grad=True)).sum().backward()
    assert input_offload.summary().startswith("offload_block_inputs: 2 block inputs, 0.00 GiB in all")
    section = ckpt.CheckpointingSection(gradient_checkpointing="full", offload_block_inputs=True)
    assert section.offload_summary() == input_offload.summary()  # the line the GRPO trainers write to train.log
    assert ckpt.CheckpointingSection(gradient_checkpointing="full").offload_summary() is None
