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
    except RuntimeError as exc:
        log.warning("fusedrl: %s; CUDA tensors will use the Triton kernels", exc)
        return {"cuda": str(exc)}
    return {"cuda": None}
