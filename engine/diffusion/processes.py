"""The diffusion trainers under torchrun: the process group, and the embedded default built once."""

from __future__ import annotations


def prepare_processes(device: str, *, embedded: bool) -> None:
    """Under torchrun: start the process group (NCCL on CUDA, gloo on the CPU), and build the embedded default
    model once (rank 0) before the other processes load it."""
    import torch

    from ..distributed import init_distributed

    rank, world = init_distributed(torch.cuda.is_available() and device != "cpu")
    if world > 1 and embedded:
        import torch.distributed as dist

        from .tiny import tiny_model_dir

        if rank == 0:
            tiny_model_dir("sd3")
        dist.barrier()
