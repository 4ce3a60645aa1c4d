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
    """What torchrun would set for process `rank`, the torch backend (interpreted Triton is too slow here), and
    one thread per process (two processes on two cores)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), FUSEDRL_BACKEND="torch")
    torch.set_num_threads(1)
