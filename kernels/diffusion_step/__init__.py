"""Diffusion trajectory steps with Gaussian log-probabilities (Flow-GRPO SDE/CPS, DanceGRPO, DDPO DDIM).

- `api.py`: the public functions `flow_sde_step`, `ddim_step` and `StepOutput`
- `reference.py`: the torch formulas (oracle and CPU path)
- `triton_kernels.py`: Triton forward/finish/backward kernels
- `op.py`: the torch custom ops over Triton and the CUDA extension (`csrc/diffusion_step.cu`)
- `noise.py`: noise drawn like diffusers' `randn_tensor`
"""

from .api import StepOutput, ddim_step, flow_sde_step

__all__ = ["StepOutput", "ddim_step", "flow_sde_step"]
