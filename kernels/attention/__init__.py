"""Flash attention: torch reference/CPU path and Triton kernels that save only O and the fp32 LSE."""

from .api import flash_attention

__all__ = ["flash_attention"]
