"""Two CPU processes with gloo, for the trainers' multi-process tests (torch.multiprocessing.spawn workers)."""

from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_process(rank: int, world: int, port: int) -> None:
    """What torchrun would set for process `rank`, the torch backend (interpreted Triton is too slow here), one
    thread per process (two processes on two cores), and no GPU: these are CPU (gloo) tests, and on a one-GPU
    machine the second process would ask for cuda:1."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), FUSEDRL_BACKEND="torch", CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)


def cli_worker(rank: int, world: int, port: int, argv: list[str], cache: str) -> None:
    """A `torch.multiprocessing.spawn` worker that runs `fusedrl` with `argv` as process `rank` (the embedded
    default models built under `cache`, by rank 0)."""
    import torch.distributed as dist

    setup_process(rank, world, port)
    os.environ["FUSEDRL_CACHE"] = cache
    from fusedrl.cli import main

    try:
        assert main(argv) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def assert_same_updates(single: dict, ranks: list[dict], steps: int) -> None:
    """Every process's gradients at each optimizer step ({name: tensor}, whole) equal the single process's, and
    so do the weights after; the processes hold the same weights (gradients synchronized)."""
    for r in ranks:
        assert len(r["grads"]) == len(single["grads"]) == steps
        for want, got in zip(single["grads"], r["grads"]):
            assert max(g.abs().max() for g in want.values()) > 0
            for n in want:
                torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
        # Adam's first steps move each weight by about lr * sign(grad) (lr 1e-2), so gradients equal to 1e-7 give
        # weights equal to within 1% of one step where a gradient is near Adam's eps.
        for n, want in single["params"].items():
            torch.testing.assert_close(r["params"][n], want, rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    a, b = (r["params"] for r in ranks)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
