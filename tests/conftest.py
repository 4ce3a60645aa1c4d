"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before
fusedrl is imported anywhere in the test process, so that the Triton kernels run on the CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FUSEDRL_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend("torch" | "triton" | "cuda"): force that backend for the rest of the test."""

    def _set(name: str) -> None:
        monkeypatch.setenv("FUSEDRL_BACKEND", name)

    return _set


def devices_for(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


@pytest.fixture(scope="session", autouse=True)
def _cuda_extension_on_gpu_machines():
    """On a GPU machine, build (or load the cached build of) the CUDA extension once, before any test,
    as the engine does at start-up, so that the `cuda` backend is tested. Without a GPU: nothing."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return
    from fusedrl.kernels import cuda_ext

    if cuda_ext.find_cuda_home() is not None and not cuda_ext.is_loaded():
        cuda_ext.build()
