"""engine.distributed's choice of this process's GPU and the collectives' timeout (no GPU here: torch.cuda's
answers are stood in for)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from fusedrl.engine import distributed


@pytest.fixture
def gpus(monkeypatch):
    def set_gpus(count: int, world: int, local_rank: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))

    return set_gpus


def test_each_process_of_a_torchrun_takes_its_own_gpu(gpus):
    gpus(8, world=8, local_rank=3)
    assert distributed.local_device("auto") == distributed.local_device("cuda") == torch.device("cuda", 3)
    with pytest.raises(ValueError, match=r"model.device: 'cuda:1' would put every process of the torchrun on one GPU"):
        distributed.local_device("cuda:1")


def test_a_process_that_sees_only_its_own_gpu_takes_cuda_0(gpus):
    """SLURM-style binding: CUDA_VISIBLE_DEVICES per task, so cuda:$LOCAL_RANK does not exist."""
    gpus(1, world=4, local_rank=2)
    assert distributed.local_device("auto") == distributed.local_device("cuda") == torch.device("cuda", 0)
    assert distributed.local_device("cuda:0") == torch.device("cuda", 0)


def test_one_process(gpus):
    gpus(2, world=1, local_rank=0)
    assert distributed.local_device("cuda:1") == torch.device("cuda", 1)
    gpus(0, world=1, local_rank=0)
    assert distributed.local_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        distributed.local_device("cuda")


def test_collectives_timeout(monkeypatch):
    monkeypatch.delenv("FUSEDRL_DIST_TIMEOUT_MIN", raising=False)
    assert distributed.dist_timeout() == timedelta(minutes=60)  # NCCL's own 10 is shorter than a large save
    monkeypatch.setenv("FUSEDRL_DIST_TIMEOUT_MIN", "180")
    assert distributed.dist_timeout() == timedelta(hours=3)
    for bad in ("soon", "0"):
        monkeypatch.setenv("FUSEDRL_DIST_TIMEOUT_MIN", bad)
        with pytest.raises(ValueError, match="FUSEDRL_DIST_TIMEOUT_MIN must be"):
            distributed.dist_timeout()


def test_a_model_waits_on_the_cpu_for_sharding_only_when_too_big_for_one_gpu(monkeypatch):
    """Full fine-tuning under torchrun: a model over half a GPU (with its reference copy) is sharded from the CPU
    (no GPU holds it whole); a smaller one goes to the GPU at once (on the CPU each process would hold a copy)."""
    import types

    import torch

    from fusedrl.engine.distributed import WHOLE_ON_GPU_SHARE, too_big_for_one_gpu

    gpu = 80 * 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=gpu))
    cuda = torch.device("cuda", 0)
    assert too_big_for_one_gpu(72 * 2**30, cuda)  # Flux 12B in fp32 and its bf16 reference
    assert not too_big_for_one_gpu(int(WHOLE_ON_GPU_SHARE * gpu), cuda)  # half the GPU, and less (SD3.5-M: 15 GB)
    assert not too_big_for_one_gpu(10**15, torch.device("cpu"))  # on the CPU there is nothing to move
