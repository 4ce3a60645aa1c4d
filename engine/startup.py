"""Engine start-up: get the kernel backends ready before the first training step."""

from __future__ import annotations

import logging

import torch

from fusedrl.kernels import cuda_ext

log = logging.getLogger("fusedrl")


def prepare_backends(build_cuda: bool = True, verbose: bool = False) -> dict[str, str | None]:
    """Build (or load the cached build of) the CUDA extension when a GPU and nvcc are present.

    Returns {"cuda": None} when the extension is ready, else {"cuda": reason}. A failed build is
    reported, not raised: dispatch then serves CUDA tensors with Triton.
    """
    if not torch.cuda.is_available():
        return {"cuda": "no CUDA device"}
    if cuda_ext.is_loaded():
        return {"cuda": None}
    if not build_cuda:
        return {"cuda": cuda_ext.unavailable_reason()}
    try:
        cuda_ext.build(verbose=verbose)
    except Exception as exc:  # a failed compile, or no writable cache folder, a source tree without csrc/, ...
        reason = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
        log.warning("fusedrl: %s; CUDA tensors will use the Triton kernels", reason)
        return {"cuda": reason}
    return {"cuda": None}


def prepare_kernels(device: torch.device, *, build: bool = True) -> str | None:
    """A trainer's start-up: on a CUDA `device`, build (the first time; cached under ~/.cache/fusedrl, or
    $FUSEDRL_CACHE_DIR) or load the CUDA extension before the model loads, so that neither the backbone probe nor a
    step waits for a compile. Under torchrun rank 0 builds while the others wait, then they load its build (every
    process compiling into one cache folder at once would race). Returns the line to log (None off CUDA)."""
    if device.type != "cuda":
        return None
    from .distributed import rank_and_world

    rank, world = rank_and_world()
    if world > 1:
        from .distributed import all_max

        status = prepare_backends(build_cuda=build) if rank == 0 else {}
        # every process learns whether rank 0's build worked (a collective: no process waits on one that failed);
        # after a failed build the others only load what may be cached instead of failing it again
        failed = all_max(float(rank == 0 and status["cuda"] is not None), device) > 0
        if rank != 0:
            status = prepare_backends(build_cuda=build and not failed)
    else:
        status = prepare_backends(build_cuda=build)
    if status["cuda"] is None:
        return f"CUDA extension: loaded from {cuda_ext.loaded_path()}"
    return (f"CUDA extension not used ({status['cuda']}): CUDA tensors run the Triton kernels"
            + ("" if build else "; run.cuda_extension builds it"))
