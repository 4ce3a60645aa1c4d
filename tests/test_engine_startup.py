"""Engine start-up readies the kernel backends before training (never inside a step)."""

import torch

from fusedrl.engine import prepare_backends


def test_engine_startup_reports_why_there_is_no_cuda_backend():
    status = prepare_backends(build_cuda=False)
    assert set(status) == {"cuda"}
    if not torch.cuda.is_available():
        assert status["cuda"] == "no CUDA device"
