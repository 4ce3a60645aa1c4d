"""fusedrl: fused kernels and a thin engine for RL post-training of generative models.

    from fusedrl.kernels import flow_sde_step, ddim_step
    from fusedrl.integrations.flow_grpo import sde_step_with_logprob
    from fusedrl.integrations.ddpo import ddim_step_with_logprob
    fusedrl.patch_attention(model)  # transformers / diffusers attention on fusedrl.kernels.flash_attention
    fusedrl.patch_backbone(model)   # a causal LM's RMSNorms, SwiGLU MLPs and LoRA linears on fused code
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fusedrl")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

from .attention import AttentionPatch, patch_attention, unpatch_attention  # imports no diffusers/transformers
from .backbone import BackbonePatch, patch_backbone, unpatch_backbone  # imports no transformers/peft

__all__ = ["AttentionPatch", "BackbonePatch", "__version__", "patch_attention", "patch_backbone", "unpatch_attention",
           "unpatch_backbone"]
