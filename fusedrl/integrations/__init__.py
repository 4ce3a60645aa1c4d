"""Drop-in replacements for the step functions of existing RL trainers, backed by fusedrl's fused ops.

Each keeps the signature and the results of the function it replaces, so swapping it in changes
speed and memory, not the learning curve:

- `fusedrl.integrations.flow_grpo.sde_step_with_logprob`: Flow-GRPO's
  `flow_grpo.diffusers_patch.sd3_sde_with_logprob.sde_step_with_logprob` (flow-matching SDE / CPS
  step on a `FlowMatchEulerDiscreteScheduler`), over `fusedrl.kernels.flow_sde_step`.
- `fusedrl.integrations.dance_grpo.flux_step`: DanceGRPO's `flux_step` (fastvideo/train_grpo_flux.py; MixGRPO
  copies it), over `fusedrl.kernels.flow_sde_step(..., sde_type="dance")`.
- `fusedrl.integrations.ddpo.ddim_step_with_logprob`: DDPO's
  `ddpo_pytorch.diffusers_patch.ddim_with_logprob.ddim_step_with_logprob` (DDIM step on a
  `DDIMScheduler`), over `fusedrl.kernels.ddim_step`.
- `fusedrl.integrations.trl.patch_grpo_trainer()`: TRL 1.16's `GRPOTrainer` over `token_logprobs` (and `grpo_loss`).
- `transformers_attention`, `diffusers_attention`: `flash_attention` in transformers / diffusers models.

Import the submodule you need; this package imports nothing itself (diffusers is optional).
"""
