"""Engine start-up readies the kernel backends before training (never inside a step)."""

import pytest
import torch

from fusedrl.engine import prepare_backends


def test_engine_startup_reports_why_there_is_no_cuda_backend():
    status = prepare_backends(build_cuda=False)
    assert set(status) == {"cuda"}
    if not torch.cuda.is_available():
        assert status["cuda"] == "no CUDA device"


def test_prepare_kernels_is_a_no_op_off_cuda():
    from fusedrl.engine.startup import prepare_kernels

    assert prepare_kernels(torch.device("cpu")) is None


@pytest.mark.parametrize("build", [True, False])
def test_prepare_kernels_says_which_kernels_cuda_tensors_get(monkeypatch, build):
    from fusedrl.engine import startup

    asked = []
    monkeypatch.setattr(startup, "prepare_backends", lambda build_cuda: asked.append(build_cuda) or {"cuda": None})
    monkeypatch.setattr(startup.cuda_ext, "loaded_path", lambda: "/cache/fusedrl_C_abc.so")
    assert startup.prepare_kernels(torch.device("cuda", 0), build=build) == \
        "CUDA extension: loaded from /cache/fusedrl_C_abc.so"
    monkeypatch.setattr(startup, "prepare_backends", lambda build_cuda: asked.append(build_cuda) or {"cuda": "no nvcc"})
    line = startup.prepare_kernels(torch.device("cuda", 0), build=build)
    assert "(no nvcc)" in line and "Triton" in line and ("run.cuda_extension" in line) == (not build)
    assert asked == [build, build]


@pytest.mark.slow
@pytest.mark.parametrize("name, args", [
    ("diffusion-grpo", ["--prompts.per_step", "1", "--sampling.group_size", "2", "--sampling.steps", "2"]),
    ("reward-backprop", []),
    ("llm-grpo", ["--prompts.per_step", "2", "--sampling.group_size", "2"]),
])
def test_each_trainer_prepares_the_kernels_before_loading_the_model(tmp_path, monkeypatch, name, args):
    """Every trainer readies the CUDA extension at start-up (run.cuda_extension: build it or only load a cached
    build) and says in train.log what CUDA tensors will run."""
    from fusedrl.cli import main
    from fusedrl.engine import startup

    calls = []

    def fake(device, *, build=True):
        calls.append((device.type, build))
        return "CUDA extension: the line the trainer logs"

    monkeypatch.setattr(startup, "prepare_kernels", fake)
    out = tmp_path / "run"
    assert main(["train", name, "--out", str(out), "--run.steps", "1", "--run.checkpoint_every", "0",
                 "--no-run.progress", "--no-run.tensorboard", "--no-run.cuda_extension", *args]) == 0
    assert calls == [("cpu", False)]
    assert "CUDA extension: the line the trainer logs" in (out / "train.log").read_text()


def test_a_build_that_cannot_start_is_reported_not_raised(monkeypatch):
    """No writable cache folder (PermissionError), a tree without csrc/ (FileNotFoundError): training goes on with
    the Triton kernels, the reason reported."""
    from fusedrl.engine import startup

    def refuse(verbose=False):
        raise PermissionError("[Errno 13] Permission denied: '/home/user/.cache/fusedrl'")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(startup.cuda_ext, "is_loaded", lambda: False)
    monkeypatch.setattr(startup.cuda_ext, "build", refuse)
    status = prepare_backends()
    assert status["cuda"].startswith("PermissionError") and "Permission denied" in status["cuda"]
