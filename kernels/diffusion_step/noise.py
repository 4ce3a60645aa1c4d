"""Gaussian noise drawn the way diffusers' `randn_tensor` draws it.

Trainers (Flow-GRPO, DDPO, diffusers pipelines) draw step noise with
`randn_tensor(shape, generator=..., device=..., dtype=model_output.dtype)`. Drawing it the same way
here makes a seeded call of a fused step give exactly the sample the trainer it replaces gives:
- a CPU generator with a CUDA target draws on the CPU, then moves the tensor;
- a CUDA generator with a CPU target is an error;
- a list of generators draws one sample per generator (a list of one is a single generator).
"""

from __future__ import annotations

import torch

GeneratorArg = torch.Generator | list[torch.Generator] | None


def randn_like_diffusers(
    shape: tuple[int, ...], generator: GeneratorArg, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) == 0:
            raise ValueError("generator: an empty list of generators")
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {shape[0]}")
    first = generator[0] if isinstance(generator, (list, tuple)) else generator
    rand_device = device
    if first is not None:
        if not isinstance(first, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(first).__name__}")
        if first.device.type != device.type:
            if first.device.type != "cpu":
                raise ValueError(f"generator: cannot draw a {device.type} tensor from a {first.device.type} generator")
            rand_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        one = (1,) + tuple(shape[1:])
        parts = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)
