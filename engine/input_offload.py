"""Checkpointed regions whose inputs wait in CPU memory between forward and backward.

With every block checkpointed, what a model still holds on the GPU between forward and backward is each
block's inputs: the hidden states between blocks (an 8B LM at 8 x 4096 tokens: 32 x 285 MB = 9.1 GB).
`offload_inputs` copies those inputs to pinned host memory during the forward and brings each back for its
block's recompute, as Unsloth's offloaded gradient checkpointing and DeepSpeed's cpu_checkpointing do.

On a CUDA device:
- forward: each offloaded input is copied to pinned memory (same strides) on a side stream that first waits
  for the compute stream, so the copy overlaps the block's forward; the block runs on the live tensor. When
  the block's forward returns, the compute stream waits for the copy (nothing queued later, an in-place
  change included, can race it) and the region drops its reference, so the tensor is freed once the
  model's forward moves on (checkpointing keeps nothing else of it).
- backward: the recompute asks for its inputs: their copy back is queued on the side stream, then that of
  the region run before it in the forward (regions are chained in forward order, and backward meets them in
  reverse), which then overlaps this region's recompute and backward; the compute stream waits for a copy's
  event only when it needs its tensor. A copy brought back that the backward never used (a partial
  backward) is dropped when that backward ends.
Offloaded: the CUDA tensors among the region's arguments (positional, and keyword values) that require
grad, are not leaves (a leaf is held by its owner anyway), are not parameters and hold at least MIN_BYTES -
the activations; masks, rotary tables, timestep embeddings and weights stay where they are; a tensor passed
twice is copied once. Not under torch.compile, and nothing on the CPU.
Host memory: pinned, from torch's caching host allocator, which rounds each block up to a power of two and
keeps it for reuse (up to ~2x the inputs' bytes; `PYTORCH_CUDA_ALLOC_CONF=pinned_max_round_threshold_mb:N`
limits the rounding).
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
_totals = {"tensors": 0, "bytes": 0}  # offloaded in this process, for the runs' summary line
_chain = threading.local()  # .last: weakref to the newest region of this thread


def _side_stream(device: torch.device):
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def is_parameter(t: torch.Tensor) -> bool:
    """A parameter or a view of one: it stays on the device anyway (also for checkpointing's "offload" policy)."""
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


def _eligible(value: Any) -> bool:
    # not an expanded (stride-0) view: it would come back as a dense copy larger than the memory it frees
    return (isinstance(value, torch.Tensor) and value.device.type in DEVICE_TYPES and value.requires_grad
            and not value.is_leaf and not is_parameter(value)
            and MIN_BYTES <= value.numel() * value.element_size() <= value.untyped_storage().nbytes())


def accelerator_devices(*trees: Any) -> list[torch.device]:
    """The distinct devices other than the CPU of the tensors in `trees` (nested tuples, lists, dicts), in the
    order first met."""
    from torch.utils._pytree import tree_leaves

    seen: dict[torch.device, None] = {}
    for leaf in tree_leaves(trees):
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "cpu":
            seen.setdefault(leaf.device, None)
    return list(seen)


def device_markers(devices: list[torch.device]) -> tuple[torch.Tensor, ...]:
    """An empty tensor per device: passed to torch.utils.checkpoint positionally, it makes the checkpoint save and
    restore that device's RNG state (it looks at its positional arguments only)."""
    return tuple(torch.empty(0, device=d) for d in devices)


class _Input:
    """One offloaded tensor: live during the forward, on the host in between, brought back for the recompute."""

    def __init__(self, t: torch.Tensor) -> None:
        self.live: torch.Tensor | None = t
        self.version = t._version  # an in-place change during the forward would race the copy (release checks)
        self.device = t.device
        self.requires_grad = t.requires_grad
        self.back: torch.Tensor | None = None
        self.ready = None
        self.copied = None
        _totals["tensors"] += 1
        _totals["bytes"] += t.numel() * t.element_size()
        if t.device.type == "cuda":
            stream = _side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream), torch.no_grad():  # a copy, not an op autograd should record
                self.host = torch.empty_like(t, device="cpu", pin_memory=True)  # the same strides
                self.host.copy_(t, non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record(stream)
            t.record_stream(stream)  # its memory is not reused before the copy has read it
        else:
            self.host = t.detach().clone()

    def settle(self) -> None:
        """After the block's forward: the compute stream waits for the copy out, then the live tensor is dropped."""
        if self.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied)
            self.copied = None
        self.live = None

    def drop_unused(self) -> None:
        """A copy brought back that no recompute took (the end of a partial backward): free it."""
        self.back = self.ready = None

    def fetch(self) -> None:
        """Start the copy back (on the side stream), unless the tensor is live or already on its way."""
        if self.live is not None or self.back is not None:
            return
        if self.device.type == "cuda":
            stream = _side_stream(self.device)
            with torch.cuda.stream(stream), torch.no_grad():  # after the copy out: the same stream
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
    """The arguments of one checkpointed call, with its activation inputs offloaded (`open()` gives them back:
    live in the forward, from the host in the recompute)."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        made: dict[int, _Input] = {}  # a tensor passed twice: one copy, the aliasing kept

        def wrap(value: Any) -> Any:
            if not _eligible(value):
                return value
            if id(value) not in made:
                made[id(value)] = _Input(value)
            return made[id(value)]

        self._args = [wrap(a) for a in args]
        self._kwargs = {k: wrap(v) for k, v in kwargs.items()}
        self.offloaded = list(made.values())
        # weakref to the region that offloaded before this one (in backward its inputs are needed after ours)
        self._previous = getattr(_chain, "last", None)
        if self.offloaded:
            _chain.last = weakref.ref(self)

    def release(self) -> None:
        """After the forward: drop the live tensors (their host copies stay). A region that changed one of them in
        place cannot be offloaded: its copy may hold either value."""
        changed = [item for item in self.offloaded if item.live is not None and item.live._version != item.version]
        for item in self.offloaded:
            item.settle()
        if changed:
            raise RuntimeError("offload_inputs: the checkpointed block changed an input in place during its forward "
                               f"(shape {tuple(changed[0].host.shape)}), so its copy to the CPU may have read either "
                               "value; turn offloading off for this block (memory.offload_block_inputs)")

    def open(self) -> tuple[list, dict]:
        """(args, kwargs) for the block: in the recompute, this region's inputs are brought back first, then the
        previous region's start on their way (in backward it comes next)."""
        if not any(item.live is not None for item in self.offloaded):  # the recompute
            for item in self.offloaded:
                item.fetch()
            self._prefetch_previous()
        opened = {id(item): item.get() for item in self.offloaded}  # an aliased input: one tensor

        def value(v: Any) -> Any:
            return opened[id(v)] if isinstance(v, _Input) else v

        return [value(a) for a in self._args], {k: value(v) for k, v in self._kwargs.items()}

    def _prefetch_previous(self) -> None:
        previous = self._previous() if self._previous is not None else None
        if previous is None:
            return
        for item in previous.offloaded:
            item.fetch()
        if torch._C._current_graph_task_id() != -1:  # inside a backward: drop what it will not use when it ends
            items = list(previous.offloaded)
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: [item.drop_unused() for item in items])


def summary() -> str:
    """A line for train.log: how much went to the CPU in this process, or why offloading may have done nothing."""
    if not _totals["tensors"]:
        return ("offload_block_inputs: no block input was offloaded (they were on the CPU, under 1 MiB, did not "
                "require grad, or ran under torch.compile)")
    return (f"offload_block_inputs: {_totals['tensors']} block inputs, {_totals['bytes'] / 2**30:.2f} GiB in all, "
            "waited in CPU memory between forward and backward")


def run_offloaded(checkpoint_fn, fn, args: tuple, kwargs: dict, **options: Any) -> Any:
    """`checkpoint_fn(body, *markers, **options)` where `body` calls `fn` on the region's arguments, the activation
    inputs among them offloaded (module docstring). `checkpoint_fn` is non-reentrant checkpointing, which runs
    `body` once in the forward and once more in backward to recompute; `markers`, an empty tensor on each device
    the arguments are on, are its only tensor arguments (they keep no activation alive) and tell it which devices'
    RNG states to restore for the recompute (dropout draws the same masks). Under CUDA-graph capture nothing is
    offloaded."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return checkpoint_fn(fn, *args, **options, **kwargs)  # a CUDA graph replays fixed buffers: no copies
    region = Region(args, kwargs)
    if not region.offloaded:
        return checkpoint_fn(fn, *args, **options, **kwargs)

    def body(*_markers: torch.Tensor):
        args_, kwargs_ = region.open()
        return fn(*args_, **kwargs_)

    try:
        return checkpoint_fn(body, *device_markers(accelerator_devices(args, kwargs)), **options)
    finally:
        region.release()
