"""`RewardWorker`: scores batches in the background (a thread, or a process) while the trainer samples the next one.

    with RewardWorker(reward, device="cuda:1", max_pending=2, timeout_s=120) as worker:
        ticket = worker.submit(images, prompts)     # returns at once (blocks only while max_pending are unresolved)
        next_images = sample(...)                   # overlaps with the scoring
        scores = ticket.result()                    # [B]; re-raises the reward's exception, with its traceback

Contract:
- Order: one consumer takes batches first in, first out, so batch i is scored before batch i + 1; each `submit`
  returns a `RewardFuture` (its `index` is the submission number) and `worker.results()` hands back the results of
  all tickets not yet collected (finished or not) in submission order.
- Bounded: at most `max_pending` submitted batches are unresolved (queued or running); `submit` blocks beyond that
  (`timeout=` makes it raise TimeoutError instead), which bounds the memory the queued images hold.
- Nothing is dropped silently: every ticket ends with a result or an exception. An exception raised by the reward
  is re-raised by `result()` (the same exception object: its type, message and traceback from the worker, with a
  note naming the batch); with `stop_on_error=True` (default) the worker then stops and every later ticket raises
  RewardWorkerError chained to that error, and `submit` refuses new batches. A batch running longer than
  `timeout_s` fails with TimeoutError and stops the worker the same way (a thread cannot be killed: it is left
  behind as a daemon; a process is terminated). A worker thread or process that dies fails its tickets with
  RewardWorkerError. These checks run while the caller waits (in `result()` and in a blocked `submit()`), so a
  hung reward never hangs training.
- Shutdown: `shutdown()` (or leaving the `with` block normally) scores what was submitted, then stops; leaving the
  block with an exception, or `shutdown(cancel_pending=True)`, lets the oldest unresolved batch (running, or next to
  run) finish and fails the later ones with RewardWorkerError instead of scoring them. A shutdown waits at most
  `timeout_s` (when set) for the pending batches. A worker dropped without a shutdown (no reference to it or to
  any of its tickets left) is stopped when it is garbage collected: its thread ends (or its process is told to),
  so the reward model it holds is freed; its background thread holds it only while building the reward or
  scoring a batch.

Tensors and devices (thread mode): inputs are detached (and copied with `copy_inputs=True`; otherwise do not
modify submitted tensors in place before their result arrives). On CUDA the worker scores on its own stream of
`device` ("cuda" alone: the current device; none: the creator's current device, no side stream), after the events
recorded on the submitting thread's current streams of every device its inputs are on (so it sees finished
inputs), and synchronizes that stream, and its streams of the devices the results are on, before resolving the
ticket; `result()` marks returned CUDA tensors as used by the caller's current stream (`record_stream`). Scores
come back where the reward puts them (ImageReward: on the images' device). The reward runs under
`torch.no_grad()`, so the returned tensors are normal tensors (not inference tensors) usable in the trainer's
autograd graph.

Process mode (`mode="process"`): the reward is built in a spawned process by `factory` (a picklable callable, e.g.
`functools.partial(load_reward, "hpsv2", path, device="cuda:1")`); inputs travel through torch.multiprocessing
(shared memory for CPU tensors, CUDA IPC for CUDA tensors); tensor results come back on the CPU and are moved to
the device of the batch's first tensor argument. An exception is pickled back when it can be (else a
RewardWorkerError carrying its text); its remote traceback is attached as the `__cause__` and as a note.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import pickle
import queue
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch

MODES = ("thread", "process")
_STOP = object()


class RewardWorkerError(RuntimeError):
    """The worker cannot produce this batch's result: it stopped after an error or a timeout, died, or was shut
    down before the batch started."""


class _RemoteTraceback(Exception):
    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _add_note(exc: BaseException, note: str) -> None:
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


def _walk_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """obj with fn applied to every tensor in it (tensors, lists, tuples, dicts, dataclasses; one level of nesting
    each, recursively)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        items = [_walk_tensors(v, fn) for v in obj]
        return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
    if isinstance(obj, dict):
        return {k: _walk_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _walk_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _first_tensor(obj: Any) -> torch.Tensor | None:
    found: list[torch.Tensor] = []
    _walk_tensors(obj, lambda t: found.append(t) if not found else None)
    return found[0] if found else None


class RewardFuture:
    """The ticket of one submitted batch. `result()` waits for it (checking the worker's health meanwhile)."""

    def __init__(self, worker: RewardWorker, index: int) -> None:
        self.index = index
        self._worker = worker
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self.submitted_at = time.monotonic()
        self.collected = False  # its result was asked for (result() or worker.results())

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        """The reward's output for this batch. Raises the reward's exception (with its worker traceback),
        RewardWorkerError when the worker stopped before scoring it, TimeoutError after `timeout` seconds of waiting
        (the batch stays queued: call result() again) or when the batch ran past the worker's timeout_s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.collected = True  # `worker.results()` leaves it out from now on
        while not self._future.done():
            self._worker._check_health()
            wait = self._worker.poll_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"RewardWorker {self._worker.name}: batch {self.index} not scored within "
                                       f"{timeout} s (still pending; call result() again)")
                wait = min(wait, left)
            with contextlib.suppress(concurrent.futures.TimeoutError):
                self._future.result(timeout=wait)
        exc = self._future.exception()
        if exc is not None:
            raise exc
        out = self._future.result()
        if torch.cuda.is_available():
            def mark(t: torch.Tensor) -> None:
                if t.is_cuda:
                    t.record_stream(torch.cuda.current_stream(t.device))
            _walk_tensors(out, mark)
        return out

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except TimeoutError as exc:
            if not self._future.done():
                raise
            return exc
        except BaseException as exc:  # noqa: BLE001 - the caller asked for it
            return exc
        return None

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("error" if self._future.exception() else "done")
        return f"RewardFuture(index={self.index}, {state})"


@dataclasses.dataclass
class _Item:
    future: RewardFuture
    args: tuple
    kwargs: dict
    events: tuple = ()  # (device, CUDA event recorded on the submitter's current stream there), per input device
    dest: torch.device | None = None  # process mode: where tensor results go


class RewardWorker:
    """Scores batches with `reward` in a background thread (or process); see the module docstring.

    Args:
        reward: the reward (any callable; thread mode). Give this or `factory`.
        factory: a callable building the reward: called once in the worker thread, or in the spawned process
            (then it must be picklable).
        mode: "thread" (default) or "process".
        device: the device the worker scores on: its CUDA stream (thread) / current device (process); the reward's
            own device decides where the model runs. None: the current device, no side stream.
        max_pending: at most this many submitted batches unresolved (>= 1).
        timeout_s: a batch running longer than this fails with TimeoutError and stops the worker (None: no limit);
            counted from when the reward is built (the factory's loading time is not a batch's).
        stop_on_error: after a failed batch, stop and fail the later ones (default) instead of scoring them.
        copy_inputs: clone tensor inputs at submit (thread mode), so the caller may reuse its buffers.
        name: for messages and the thread name.
        poll_s: how often waiting callers check the worker's health.
    """

    def __init__(self, reward: Callable | None = None, *, factory: Callable[[], Callable] | None = None,
                 mode: str = "thread", device: str | torch.device | None = None, max_pending: int = 2,
                 timeout_s: float | None = None, stop_on_error: bool = True, copy_inputs: bool = False,
                 name: str = "reward", poll_s: float = 0.05) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if (reward is None) == (factory is None):
            raise ValueError("give exactly one of reward and factory")
        if reward is not None and not callable(reward):
            raise TypeError(f"reward must be callable; got {type(reward).__name__}")
        if factory is not None and not callable(factory):
            raise TypeError(f"factory must be callable; got {type(factory).__name__}")
        if mode == "process" and factory is None:
            raise ValueError("mode='process' needs factory= (a picklable callable that builds the reward in the "
                             "process, e.g. functools.partial(load_reward, name, path, device=...)), not a reward")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1; got {max_pending!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None; got {timeout_s!r}")
        self.mode, self.name, self.max_pending = mode, name, max_pending
        self.timeout_s, self.stop_on_error = timeout_s, stop_on_error
        self.copy_inputs, self.poll_s = copy_inputs, poll_s
        self.device = _resolve_device(device)
        # device None: the worker thread runs on the creator's current CUDA device (a new thread starts on 0)
        self._submitter_cuda_device = (torch.cuda.current_device() if device is None and torch.cuda.is_initialized()
                                       else None)
        self._reward, self._factory = reward, factory
        self._lock = threading.Condition()
        self._pending: collections.deque[RewardFuture] = collections.deque()  # unresolved, in submission order
        self._uncollected: collections.deque[RewardFuture] = collections.deque()  # for results(), in order
        self._by_index: dict[int, _Item] = {}
        self._next_index = 0
        self._last_resolved_at = time.monotonic()
        self._ready_at: float | None = None  # when the reward was built (None: still loading)
        self._closed = False  # no new submissions
        self._failure: BaseException | None = None  # why the worker stopped (error / timeout / death)
        self._queue: queue.Queue = queue.Queue()
        if mode == "thread":
            self._thread = threading.Thread(target=_thread_main, args=(weakref.ref(self), self._queue),
                                            name=f"RewardWorker-{name}", daemon=True)
            self._thread.start()
            stop_args: tuple = (self._queue, _STOP)
        else:
            self._start_process()
            stop_args = (self._in_q, None)
        # dropped without shutdown(): stop the thread / process (the threads hold the worker only weakly)
        weakref.finalize(self, _put_quietly, *stop_args).atexit = False

    # -- public -------------------------------------------------------------------------------------------------

    def submit(self, *args, timeout: float | None = None, **kwargs) -> RewardFuture:
        """Queues one batch (the reward's arguments); returns its ticket. Blocks while max_pending batches are
        unresolved (TimeoutError after `timeout` seconds). Raises RewardWorkerError when the worker is stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                self._raise_if_closed()
                if len(self._pending) < self.max_pending:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"RewardWorker {self.name}: {len(self._pending)} batches still pending after "
                                       f"{timeout} s (max_pending={self.max_pending})")
                self._lock.wait(self.poll_s)
                self._check_health_locked()
            future = RewardFuture(self, self._next_index)
            self._next_index += 1
            item = self._make_item(future, args, kwargs)
            self._pending.append(future)
            while self._uncollected and self._uncollected[0].collected:
                self._uncollected.popleft()
            self._uncollected.append(future)
            self._by_index[future.index] = item
        if self.mode == "thread":
            self._queue.put(item)
        else:
            try:  # pickled here, not in the queue's feeder thread, where a failure left the ticket hanging
                message = ForkingPickler.dumps((future.index, item.args, item.kwargs))
            except Exception as exc:  # e.g. an argument that cannot be pickled
                self._resolve(future, exc=exc)
            else:
                self._in_q.put(bytes(message))
        return future

    def results(self, timeout: float | None = None) -> list[Any]:
        """The results of every ticket not yet collected (by an earlier results() or its own result()), finished or
        not, in submission order: waits for them; raises the first error. (It took the unresolved ones only, so
        batches already scored were left out, silently.)"""
        with self._lock:
            futures = [f for f in self._uncollected if not f.collected]
        return [f.result(timeout) for f in futures]

    def map(self, batches, timeout: float | None = None) -> Iterator[Any]:
        """Scores an iterable of argument tuples (or single arguments), keeping max_pending in flight; yields the
        results in order."""
        window: collections.deque[RewardFuture] = collections.deque()
        for batch in batches:
            args = batch if isinstance(batch, tuple) else (batch,)
            if len(window) >= self.max_pending:
                yield window.popleft().result(timeout)
            window.append(self.submit(*args))
        while window:
            yield window.popleft().result(timeout)

    @property
    def pending(self) -> int:
        """Submitted batches not yet resolved."""
        with self._lock:
            return len(self._pending)

    @property
    def failed(self) -> BaseException | None:
        """The error that stopped the worker, or None."""
        return self._failure

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stops taking batches; scores those already submitted (or, with cancel_pending, fails all but the oldest
        unresolved one with RewardWorkerError), then stops the thread/process. With wait, returns when the worker is
        done (TimeoutError-failing what is left after `timeout` seconds, default the worker's timeout_s)."""
        with self._lock:
            already = self._closed
            self._closed = True
            if cancel_pending:
                running = self._pending[0] if self._pending else None
                for f in list(self._pending)[1:] if running is not None else []:
                    self._resolve_locked(f, exc=RewardWorkerError(
                        f"RewardWorker {self.name}: batch {f.index} cancelled by shutdown before it started"))
        if not already:
            if self.mode == "thread":
                self._queue.put(_STOP)
            else:
                with contextlib.suppress(Exception):
                    self._in_q.put(None)
        if not wait:
            return
        limit = timeout if timeout is not None else self.timeout_s
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            with self._lock:
                if not self._pending:
                    break
            self._check_health()
            if deadline is not None and time.monotonic() > deadline:
                self._stop(TimeoutError(f"RewardWorker {self.name}: shutdown waited {limit} s for pending batches"))
                break
            time.sleep(self.poll_s)
        if self.mode == "thread":
            self._thread.join(timeout=0 if self._failure is not None else limit)
        else:
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=5)

    close = shutdown

    def __enter__(self) -> RewardWorker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.shutdown(wait=True, cancel_pending=exc_type is not None)

    def __repr__(self) -> str:
        state = "failed" if self._failure else ("closed" if self._closed else "running")
        return f"RewardWorker(name={self.name!r}, mode={self.mode!r}, {state}, pending={self.pending})"

    # -- bookkeeping --------------------------------------------------------------------------------------------

    def _make_item(self, future: RewardFuture, args: tuple, kwargs: dict) -> _Item:
        def prep(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            return t.clone() if self.copy_inputs and self.mode == "thread" else t

        args, kwargs = _walk_tensors(args, prep), _walk_tensors(kwargs, prep)
        first = _first_tensor((args, kwargs))
        events = []
        if self.mode == "thread":
            for device in _cuda_devices((args, kwargs)):
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                events.append((device, event))
        return _Item(future, args, kwargs, tuple(events), None if first is None else first.device)

    def _raise_if_closed(self) -> None:
        if self._failure is not None:
            raise RewardWorkerError(f"RewardWorker {self.name} stopped: {self._failure!r}") from self._failure
        if self._closed:
            raise RewardWorkerError(f"RewardWorker {self.name} is shut down; it takes no new batches")

    def _resolve(self, future: RewardFuture, *, result: Any = None, exc: BaseException | None = None) -> None:
        with self._lock:
            self._resolve_locked(future, result=result, exc=exc)

    def _resolve_locked(self, future: RewardFuture, *, result: Any = None, exc: BaseException | None = None) -> None:
        if future.done():
            return
        if exc is not None:
            future._future.set_exception(exc)
        else:
            future._future.set_result(result)
        with contextlib.suppress(ValueError):
            self._pending.remove(future)
        self._by_index.pop(future.index, None)
        self._last_resolved_at = time.monotonic()
        self._lock.notify_all()

    def _stop(self, error: BaseException) -> None:
        """Marks the worker failed with `error` and fails every unresolved ticket: the running one (the oldest) with
        `error` itself when it is a TimeoutError, every other one with a RewardWorkerError chained to `error`."""
        with self._lock:
            if self._failure is None:
                self._failure = error
            self._closed = True
            for i, f in enumerate(list(self._pending)):
                if i == 0 and isinstance(error, TimeoutError):
                    exc: BaseException = error
                else:
                    exc = RewardWorkerError(f"RewardWorker {self.name}: batch {f.index} not scored: the worker "
                                            f"stopped after {type(error).__name__}: {error}")
                    exc.__cause__ = error
                self._resolve_locked(f, exc=exc)
        if self.mode == "thread":
            self._queue.put(_STOP)
        elif self._proc.is_alive():
            self._proc.terminate()

    def _check_health(self) -> None:
        with self._lock:
            self._check_health_locked()

    def _check_health_locked(self) -> None:
        """Called by waiting callers (the lock is re-entrant): fails everything when the oldest batch runs past
        timeout_s, or when the worker thread (process mode: the collector, which outlives the process until it has
        read all its messages) is gone with batches unresolved."""
        if not self._pending:
            return
        if not self._thread.is_alive():
            what = "thread" if self.mode == "thread" else f"process (exit code {self._proc.exitcode})"
            self._stop(self._failure or RewardWorkerError(
                f"RewardWorker {self.name}: the worker {what} is gone with {len(self._pending)} batches unresolved"))
            return
        if self.timeout_s is None or self._ready_at is None:  # building the reward is not a batch's time
            return
        oldest = self._pending[0]
        ran = time.monotonic() - max(oldest.submitted_at, self._last_resolved_at, self._ready_at)
        if ran > self.timeout_s:
            what = ("its thread cannot be killed and is left behind" if self.mode == "thread"
                    else "its process is killed")
            self._stop(TimeoutError(f"RewardWorker {self.name}: batch {oldest.index} ran {ran:.1f} s, past timeout_s="
                                    f"{self.timeout_s}; the worker is stopped ({what})"))

    def _mark_ready(self) -> None:
        """The reward is built: batches' timeout_s counts from now on (a slow load is not batch 0's time)."""
        with self._lock:
            self._ready_at = time.monotonic()

    # -- thread mode --------------------------------------------------------------------------------------------

    def _thread_setup(self) -> tuple[bool, Any]:
        """In the worker thread: the CUDA stream (or None) and the reward built; (False, None) when that failed (the
        worker is stopped)."""
        stream = None
        try:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.set_device(self.device)
                stream = torch.cuda.Stream(self.device)
            elif self._submitter_cuda_device is not None:  # the thread starts on device 0: take the creator's
                torch.cuda.set_device(self._submitter_cuda_device)
            if self._factory is not None:
                self._reward = self._factory()
            self._mark_ready()
        except BaseException as exc:  # noqa: BLE001 - reported through the tickets
            _add_note(exc, f"(raised while building the reward of RewardWorker {self.name})")
            self._stop(exc)
            return False, None
        return True, stream

    def _thread_score(self, item: _Item, stream: Any) -> bool:
        """In the worker thread: scores one batch and resolves its ticket; False when the worker must stop."""
        if item.future.done() or self._failure is not None:
            return True
        try:
            with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
                for device, event in item.events:  # the inputs are finished on the submitter's streams
                    (stream if stream is not None else torch.cuda.current_stream(device)).wait_event(event)
                out = self._reward(*item.args, **item.kwargs)
                # the results are finished before the ticket resolves: the side stream, and this thread's streams
                # on the devices the outputs are on (a reward moving its scores to the images' device)
                if stream is not None:
                    stream.synchronize()
                for device in _cuda_devices(out):
                    torch.cuda.current_stream(device).synchronize()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            _add_note(exc, f"(raised in RewardWorker {self.name} while scoring batch {item.future.index})")
            self._resolve(item.future, exc=exc)
            if self.stop_on_error or not isinstance(exc, Exception):
                err = RewardWorkerError(f"RewardWorker {self.name}: batch {item.future.index} failed with "
                                        f"{type(exc).__name__}: {exc}")
                err.__cause__ = exc
                self._stop(err)
                return False
        else:
            self._resolve(item.future, result=out)
        return True

    # -- process mode -------------------------------------------------------------------------------------------

    def _start_process(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._in_q, self._out_q = ctx.Queue(), ctx.Queue()
        device = None if self.device is None else str(self.device)
        self._proc = ctx.Process(target=_process_main, args=(self._factory, device, self._in_q, self._out_q),
                                 name=f"RewardWorker-{self.name}", daemon=True)
        self._proc.start()
        self._thread = threading.Thread(target=_collect_main, args=(weakref.ref(self), self._proc, self._out_q,
                                                                    self.poll_s),
                                        name=f"RewardWorker-{self.name}-collect", daemon=True)
        self._thread.start()

    def _process_gone(self) -> None:
        """Process mode: the process has exited and its pipe is drained; fail what it left unresolved."""
        with self._lock:
            left = bool(self._pending)
        if left and self._failure is None:
            self._stop(RewardWorkerError(f"RewardWorker {self.name}: the reward process died (exit code "
                                         f"{self._proc.exitcode}) with batches unresolved"))

    def _collect(self, msg: tuple) -> bool:
        """Parent side of process mode: resolves a ticket from one of the process's messages; False when the worker
        stopped."""
        kind, index, payload = msg
        with self._lock:
            item = self._by_index.get(index)
        if kind == "init_error":
            exc = _unpickle_error(payload, f"while building the reward of RewardWorker {self.name}")
            self._stop(exc)
            return False
        if kind == "ready":
            self._mark_ready()
            return True
        if item is None:
            return True
        if kind == "ok":
            dest = item.dest
            move = functools.partial(torch.Tensor.to, device=dest)
            out = payload if dest is None else _walk_tensors(payload, move)
            self._resolve(item.future, result=out)
        else:
            exc = _unpickle_error(payload, f"in RewardWorker {self.name}'s process while scoring batch {index}")
            self._resolve(item.future, exc=exc)
            if self.stop_on_error:
                err = RewardWorkerError(f"RewardWorker {self.name}: batch {index} failed with "
                                        f"{type(exc).__name__}: {exc}")
                err.__cause__ = exc
                self._stop(err)
                return False
        return True


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    """torch.device(device), a CUDA device without an index made the current one (torch.cuda.set_device refuses
    "cuda" alone)."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cuda_devices(tree: Any) -> list[torch.device]:
    """The distinct CUDA devices of the tensors in tree (nested tuples, lists, dicts)."""
    found: dict[torch.device, None] = {}
    _walk_tensors(tree, lambda t: found.setdefault(t.device, None) if t.is_cuda else None)
    return list(found)


def _put_quietly(q: Any, message: Any) -> None:
    """The finalizer of a worker dropped without shutdown(): tell its thread / process to stop."""
    with contextlib.suppress(Exception):
        q.put(message)


def _thread_main(ref: weakref.ref, jobs: queue.Queue) -> None:
    """Thread mode's loop. It holds the worker only while building the reward or scoring a batch (a queued batch's
    ticket holds it too), so a worker nobody refers to any more is collected, and its finalizer's _STOP ends this."""
    worker = ref()
    if worker is None:
        return
    ok, stream = worker._thread_setup()
    del worker
    while ok:
        item = jobs.get()
        worker = ref()
        if item is _STOP or worker is None:
            return
        ok = worker._thread_score(item, stream)
        del worker, item  # drop the inputs' references once the stream is synchronized


def _collect_main(ref: weakref.ref, proc: Any, out_q: Any, poll_s: float) -> None:
    """Process mode's collector thread: hands each message of the process to the worker (held only meanwhile)."""
    while True:
        try:
            msg = out_q.get(timeout=poll_s)
        except queue.Empty:
            if proc.is_alive():
                continue
            try:  # the process is gone: its last messages may still be in the pipe
                msg = out_q.get(timeout=0.5)
            except (queue.Empty, EOFError, OSError):
                worker = ref()
                if worker is not None:
                    worker._process_gone()
                return
        except (EOFError, OSError):
            return
        worker = ref()
        if worker is None or not worker._collect(msg):
            return
        del worker




def _pickle_error(exc: BaseException) -> tuple[bytes | None, str, str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
    except Exception:  # noqa: BLE001 - unpicklable exceptions travel as text
        data = None
    return data, f"{type(exc).__name__}: {exc}", tb


def _unpickle_error(payload: tuple[bytes | None, str, str], where: str) -> BaseException:
    data, text, tb = payload
    exc = None
    if data is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(data)
    if not isinstance(exc, BaseException):
        exc = RewardWorkerError(text)
    exc.__cause__ = _RemoteTraceback(f'\n"""\n{tb}"""')
    _add_note(exc, f"(raised {where}; remote traceback:\n{tb.rstrip()})")
    return exc


def _process_main(factory: Callable, device: str | None, in_q, out_q) -> None:
    """The reward process: builds the reward, then scores (index, args, kwargs) messages until None."""
    try:
        if device is not None and device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        reward = factory()
    except BaseException as exc:  # noqa: BLE001
        out_q.put(("init_error", -1, _pickle_error(exc)))
        return
    out_q.put(("ready", -1, None))
    while True:
        msg = in_q.get()
        if msg is None:
            return
        index, args, kwargs = pickle.loads(msg)
        try:
            with torch.no_grad():
                out = reward(*args, **kwargs)
            out = _walk_tensors(out, lambda t: t.detach().cpu())
            out_q.put(("ok", index, out))
        except BaseException as exc:  # noqa: BLE001
            out_q.put(("error", index, _pickle_error(exc)))
        del args, kwargs, msg

