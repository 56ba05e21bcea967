"""Fast paths for the HydraLoRA layer (a fused autograd Function with Triton kernels and a PyTorch fallback)."""

from .fused import (
    HAS_TRITON,
    fused_enabled,
    fused_supported,
    hydra_delta_fused,
    hydra_linear_fused,
    layer_fused_supported,
    layer_hydra_delta_fused,
    layer_linear_fused,
)

__all__ = [
    "HAS_TRITON",
    "fused_enabled",
    "fused_supported",
    "hydra_delta_fused",
    "hydra_linear_fused",
    "layer_fused_supported",
    "layer_hydra_delta_fused",
    "layer_linear_fused",
]
