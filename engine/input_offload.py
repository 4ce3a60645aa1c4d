"""Checkpointed regions whose inputs wait in CPU memory between forward and backward.

With every block checkpointed, what a model still holds on the GPU between forward and backward is each
block's inputs: the hidden states between blocks (an 8B LM at 8 x 4096 tokens: 32 x 285 MB = 9.1 GB).
`offload_inputs` copies those inputs to pinned host memory during the forward and brings each back for its
block's recompute, as Unsloth's offloaded gradient checkpointing and DeepSpeed's cpu_checkpointing do.

On a CUDA device:
- forward: each offloaded input is copied to pinned memory on a side stream that first waits for the
  compute stream (the copy overlaps the block's forward); the block runs on the live tensor, and the
  region drops its reference when the block's forward returns, so the tensor is freed once the model's
  forward moves on (checkpointing keeps nothing else of it).
- backward: the recompute asks for its inputs; regions are chained in forward order, and asking for
  region k's inputs starts the copy back of region k-1's on the side stream, which then overlaps region
  k's recompute and backward; the compute stream waits for a copy's event only when it needs its tensor.
Offloaded: the CUDA tensors among the region's arguments (positional, and keyword values) that require
grad, are not parameters and hold at least MIN_BYTES - the activations; masks, rotary tables, timestep
embeddings and weights stay where they are. Not under torch.compile, and nothing on the CPU.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import nn

MIN_BYTES = 1 << 20
# Device types whose tensors are offloaded; tests add "cpu" to run the bookkeeping without a GPU (the copies
# are then plain, synchronous clones).
DEVICE_TYPES = {"cuda"}

_side_streams: dict[torch.device, Any] = {}
_chain = threading.local()  # .last: weakref to the newest region of this thread


def _side_stream(device: torch.device):
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def _eligible(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and value.device.type in DEVICE_TYPES and value.requires_grad
            and not isinstance(value, nn.Parameter) and not isinstance(getattr(value, "_base", None), nn.Parameter)
            and value.numel() * value.element_size() >= MIN_BYTES)


class _Input:
    """One offloaded tensor: live during the forward, on the host in between, brought back for the recompute."""

    def __init__(self, t: torch.Tensor) -> None:
        self.live: torch.Tensor | None = t
        self.version = t._version  # an in-place change during the forward would race the copy (release checks)
        self.device = t.device
        self.requires_grad = t.requires_grad
        self.back: torch.Tensor | None = None
        self.ready = None
        if t.device.type == "cuda":
            stream = _side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self.host.copy_(t, non_blocking=True)
            t.record_stream(stream)  # its memory is not reused before the copy has read it
        else:
            self.host = t.detach().clone()

    def fetch(self) -> None:
        """Start the copy back (on the side stream), unless the tensor is live or already on its way."""
        if self.live is not None or self.back is not None:
            return
        if self.device.type == "cuda":
            stream = _side_stream(self.device)
            with torch.cuda.stream(stream):  # after the copy out: the same stream
                self.back = self.host.to(self.device, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
        else:
            self.back = self.host.clone()

    def get(self) -> torch.Tensor:
        if self.live is not None:  # the forward itself
            return self.live
        self.fetch()
        t, self.back = self.back, None  # fetched again if a second backward recomputes (retain_graph)
        if self.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            t.record_stream(current)  # allocated on the side stream, used and freed on this one
            self.ready = None
        # As the original: the recompute must save what the forward saved (ops save only for grad).
        return t.detach().requires_grad_(self.requires_grad)


class Region:
    """The arguments of one checkpointed call, with its activation inputs offloaded (`args()` / `kwargs()`
    give them back: live in the forward, from the host in the recompute)."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self._args = [_Input(a) if _eligible(a) else a for a in args]
        self._kwargs = {k: _Input(v) if _eligible(v) else v for k, v in kwargs.items()}
        self.offloaded = [v for v in (*self._args, *self._kwargs.values()) if isinstance(v, _Input)]
        last = getattr(_chain, "last", None)
        self._previous = last  # weakref to the region run before this one (its inputs are needed after ours)
        _chain.last = weakref.ref(self)

    def release(self) -> None:
        """After the forward: drop the live tensors (their host copies stay). A region that changed one of them in
        place cannot be offloaded: its copy may hold either value."""
        changed = [item for item in self.offloaded if item.live is not None and item.live._version != item.version]
        for item in self.offloaded:
            item.live = None
        if changed:
            raise RuntimeError("offload_inputs: the checkpointed block changed an input in place during its forward "
                               f"(shape {tuple(changed[0].host.shape)}), so its copy to the CPU may have read either "
                               "value; turn offloading off for this block (memory.offload_block_inputs)")

    def _open(self, value: Any) -> Any:
        return value.get() if isinstance(value, _Input) else value

    def args(self) -> list:
        self._prefetch_previous()
        return [self._open(a) for a in self._args]

    def kwargs(self) -> dict:
        return {k: self._open(v) for k, v in self._kwargs.items()}

    def _prefetch_previous(self) -> None:
        previous = self._previous() if self._previous is not None else None
        if previous is not None and not any(item.live is not None for item in self.offloaded):
            for item in previous.offloaded:  # in backward: the region before this one comes next
                item.fetch()


def run_offloaded(checkpoint_fn, fn, args: tuple, kwargs: dict, **options: Any) -> Any:
    """`checkpoint_fn(body, marker, **options)` where `body` calls `fn` on the region's arguments, the activation
    inputs among them offloaded (module docstring). `checkpoint_fn` is non-reentrant checkpointing, which runs
    `body` once in the forward and once more in backward to recompute; `marker`, an empty tensor on the inputs'
    device, is its only tensor argument (it keeps no activation alive) and tells it which device's RNG state
    to restore for the recompute (dropout draws the same masks)."""
    region = Region(args, kwargs)
    if not region.offloaded:
        return checkpoint_fn(fn, *args, **options, **kwargs)

    def body(_marker: torch.Tensor):
        return fn(*region.args(), **region.kwargs())

    try:
        return checkpoint_fn(body, torch.empty(0, device=region.offloaded[0].device), **options)
    finally:
        region.release()
