"""RewardWorker: results in submission order, the bounded queue, errors re-raised with their traceback, a hung
reward timed out instead of hanging the caller, shutdown (normal and cancelling), normal (non-inference) output
tensors, the process mode (results, a remote error, a process that dies), and a worker dropped without shutdown."""

from __future__ import annotations

import functools
import os
import pickle
import threading
import time
import traceback

import pytest
import torch

from fusedrl.engine.rewards import RewardWorker, RewardWorkerError, load_reward


def echo(x: torch.Tensor, delay: float = 0.0) -> torch.Tensor:
    """A 'reward' that returns the first pixel of each image, after `delay` seconds."""
    time.sleep(delay)
    return x[:, 0, 0, 0].clone()


def batch(i: int, b: int = 3) -> torch.Tensor:
    return torch.full((b, 3, 2, 2), float(i))


def failing_on(bad: int, gate: threading.Event | None = None):
    def reward_that_fails(x: torch.Tensor) -> torch.Tensor:
        if gate is not None:
            gate.wait(10)  # until the test has submitted every batch
        if int(x[0, 0, 0, 0]) == bad:
            raise ValueError(f"bad batch {bad}")
        return echo(x)

    return reward_that_fails


def test_results_in_submission_order():
    delays = [0.05, 0.0, 0.03, 0.0, 0.02, 0.0]
    with RewardWorker(echo, max_pending=3) as worker:
        tickets = [worker.submit(batch(i), delay=d) for i, d in enumerate(delays)]
        assert [t.index for t in tickets] == list(range(6))
        for i, t in enumerate(tickets):
            torch.testing.assert_close(t.result(timeout=10), torch.full((3,), float(i)))
        out = list(worker.map((batch(i),) for i in range(5)))
        assert [int(o[0]) for o in out] == list(range(5))
        pending = [worker.submit(batch(10 + i), delay=0.01) for i in range(2)]
        assert [int(r[0]) for r in worker.results(timeout=10)] == [10, 11]
        assert all(p.done() for p in pending) and worker.pending == 0
        # results() also returns batches that finished before it was called (it took only the unresolved ones,
        # dropping finished batches silently), and not those collected already
        done = [worker.submit(batch(20 + i)) for i in range(3)]
        while worker.pending:
            time.sleep(0.01)
        done[1].result()
        assert [int(r[0]) for r in worker.results(timeout=10)] == [20, 22] and worker.results() == []


def test_bounded_queue_blocks_submit():
    gate = threading.Event()

    def slow(x):
        gate.wait(10)
        return echo(x)

    with RewardWorker(slow, max_pending=2, name="bounded") as worker:
        a, b = worker.submit(batch(0)), worker.submit(batch(1))
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="2 batches still pending"):
            worker.submit(batch(2), timeout=0.2)
        assert time.monotonic() - t0 >= 0.2 and worker.pending == 2
        with pytest.raises(TimeoutError, match="not scored within"):
            a.result(timeout=0.05)  # waiting may time out; the batch stays queued
        gate.set()
        c = worker.submit(batch(2), timeout=10)
        assert [int(t.result(10)[0]) for t in (a, b, c)] == [0, 1, 2]


def test_error_is_reraised_with_traceback_and_stops_the_worker():
    gate = threading.Event()
    worker = RewardWorker(failing_on(1, gate), max_pending=4, name="err")
    tickets = [worker.submit(batch(i)) for i in range(4)]
    gate.set()
    assert int(tickets[0].result(10)[0]) == 0
    with pytest.raises(ValueError, match="bad batch 1") as info:
        tickets[1].result(10)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "reward_that_fails" in frames  # the worker-side frames are kept
    assert any("RewardWorker err while scoring batch 1" in n for n in info.value.__notes__)
    for t in tickets[2:]:  # not dropped: every later ticket says why it has no result
        with pytest.raises(RewardWorkerError, match="not scored") as later:
            t.result(10)
        assert isinstance(later.value.__cause__, RewardWorkerError)
        assert isinstance(later.value.__cause__.__cause__, ValueError)
    assert isinstance(worker.failed, RewardWorkerError)
    with pytest.raises(RewardWorkerError, match="stopped"):
        worker.submit(batch(9))
    worker.shutdown()
    assert isinstance(tickets[2].exception(), RewardWorkerError)


def test_error_without_stop_on_error_keeps_going():
    gate = threading.Event()
    with RewardWorker(failing_on(1, gate), stop_on_error=False, max_pending=3) as worker:
        tickets = [worker.submit(batch(i)) for i in range(3)]
        gate.set()
        assert isinstance(tickets[1].exception(10), ValueError)
        assert int(tickets[2].result(10)[0]) == 2 and worker.failed is None


def test_hung_reward_times_out_instead_of_hanging():
    release = threading.Event()

    def hangs(x):
        release.wait(30)
        return echo(x)

    worker = RewardWorker(hangs, timeout_s=0.3, max_pending=3)
    try:
        tickets = [worker.submit(batch(i)) for i in range(3)]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"batch 0 ran .* past timeout_s=0.3"):
            tickets[0].result()  # no timeout given: the worker's timeout_s still ends the wait
        assert time.monotonic() - t0 < 5
        for t in tickets[1:]:
            with pytest.raises(RewardWorkerError, match="not scored"):
                t.result()
        with pytest.raises(RewardWorkerError):
            worker.submit(batch(3))
    finally:
        release.set()
        worker.shutdown()


def slow_factory(seconds: float):
    time.sleep(seconds)
    return echo


def test_loading_the_reward_is_not_a_batchs_time():
    """A factory that takes longer than timeout_s (a large checkpoint) does not fail batch 0 with a timeout."""
    with RewardWorker(factory=functools.partial(slow_factory, 0.6), timeout_s=0.4, poll_s=0.02) as worker:
        torch.testing.assert_close(worker.submit(batch(1)).result(10), torch.full((3,), 1.0))


def test_shutdown_scores_pending_or_cancels_on_error():
    with RewardWorker(functools.partial(echo, delay=0.02), max_pending=4) as worker:
        tickets = [worker.submit(batch(i)) for i in range(4)]
    assert [int(t.result()[0]) for t in tickets] == [0, 1, 2, 3]  # leaving normally scored everything
    with pytest.raises(RewardWorkerError, match="shut down"):
        worker.submit(batch(0))

    gate = threading.Event()

    def slow(x):
        gate.wait(10)
        return echo(x)

    tickets = []
    with pytest.raises(KeyError), RewardWorker(slow, max_pending=4) as worker:
        tickets = [worker.submit(batch(i)) for i in range(4)]
        threading.Timer(0.2, gate.set).start()
        raise KeyError("the training step failed")
    assert int(tickets[0].result(10)[0]) == 0  # the running batch finished
    for t in tickets[1:]:
        with pytest.raises(RewardWorkerError, match="cancelled by shutdown"):
            t.result(10)


def test_outputs_are_normal_tensors_and_factory_errors_surface():
    with RewardWorker(factory=lambda: load_reward("brightness")) as worker:
        images = torch.rand(4, 3, 8, 8, requires_grad=True)
        scores = worker.submit(images).result(10)
    torch.testing.assert_close(scores, load_reward("brightness")(images.detach()))
    assert not scores.requires_grad and not scores.is_inference()
    w = torch.ones(4, requires_grad=True)
    (scores * w).sum().backward()  # usable in the trainer's graph (an inference tensor would raise here)

    def broken_factory():
        raise OSError("weights not found at /nowhere")

    worker = RewardWorker(factory=broken_factory)
    with pytest.raises(RewardWorkerError, match="weights not found"):
        for _ in range(100):  # the failure may land before or after this submit
            worker.submit(batch(0)).result(10)
    worker.shutdown()


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of reward and factory"):
        RewardWorker()
    with pytest.raises(ValueError, match="max_pending"):
        RewardWorker(echo, max_pending=0)
    with pytest.raises(ValueError, match="needs factory="):
        RewardWorker(echo, mode="process")
    with pytest.raises(ValueError, match="mode must be one of"):
        RewardWorker(echo, mode="fiber")


def test_process_mode_results_error_and_death():
    """One spawned process scores in order and sends an error back; a second one dies at start-up."""
    factory = functools.partial(load_reward, "brightness")
    worker = RewardWorker(factory=factory, mode="process", max_pending=5, timeout_s=120)
    try:
        x = [torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        bad = x[0].clone()
        bad[0, 0, 0, 0] = float("nan")
        # an argument that cannot be pickled fails its own ticket at once (the queue's feeder thread pickled it,
        # printed the error, and the ticket hung with its max_pending slot)
        unpicklable = worker.submit(x[0], scale=lambda v: v)
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            unpicklable.result(5)
        tickets = [worker.submit(t) for t in x] + [worker.submit(bad), worker.submit(x[0])]
        for t, xi in zip(tickets, x):
            torch.testing.assert_close(t.result(60), load_reward("brightness")(xi))
        with pytest.raises(ValueError, match="NaN or inf") as info:
            tickets[3].result(60)
        assert "remote traceback" in "".join(info.value.__notes__)
        with pytest.raises(RewardWorkerError, match="not scored"):
            tickets[4].result(60)
    finally:
        worker.shutdown()

    dies = RewardWorker(factory=functools.partial(os._exit, 3), mode="process", timeout_s=120)
    ticket = dies.submit(batch(0))
    with pytest.raises(RewardWorkerError, match="exit code 3"):
        ticket.result(60)
    dies.shutdown()


class _Model:
    """A reward holding something big (a model), to watch it being freed."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return echo(x)


def _wait_dead(is_alive, seconds: float = 30.0) -> bool:
    """Collect garbage until is_alive() turns false (the worker's own thread may still hold it for a moment after
    resolving the last ticket, so one collection can come too early)."""
    import gc

    deadline = time.monotonic() + seconds
    while is_alive() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    return not is_alive()


def test_a_dropped_worker_stops_and_frees_its_reward():
    """Never shut down, and no reference left to it or to its tickets: once collected, its thread ends and its reward
    (the model) is freed (the thread held the worker strongly, so neither ever went)."""
    import gc
    import weakref

    reward = _Model()
    freed = weakref.ref(reward)
    worker = RewardWorker(reward)
    ticket = worker.submit(batch(1))
    torch.testing.assert_close(ticket.result(10), torch.full((3,), 1.0))
    thread = worker._thread
    del worker, ticket, reward
    assert _wait_dead(thread.is_alive)
    gc.collect()
    assert freed() is None


@pytest.mark.slow
def test_a_dropped_process_worker_stops_its_process():
    worker = RewardWorker(factory=functools.partial(load_reward, "brightness"), mode="process", timeout_s=120)
    assert worker.submit(batch(0)).result(60).shape == (3,)
    proc, collector = worker._proc, worker._thread
    del worker
    assert _wait_dead(proc.is_alive) and proc.exitcode == 0
    assert _wait_dead(collector.is_alive)


def test_a_cuda_device_without_an_index_is_the_current_one(monkeypatch):
    """torch.cuda.set_device refuses torch.device("cuda"): the worker's thread died at start-up with it (what
    rewards/loading.py hands out)."""
    from fusedrl.engine.rewards.worker import _resolve_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert _resolve_device("cuda") == torch.device("cuda", 3)
    assert _resolve_device("cuda:1") == torch.device("cuda", 1)
    assert _resolve_device(torch.device("cpu")) == torch.device("cpu") and _resolve_device(None) is None
