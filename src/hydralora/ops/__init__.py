"""Fast paths for the HydraLoRA layer: the fused op (fused), its dispatch for a layer (dispatch), the Triton launch
code (launch) and the PyTorch reference math (reference)."""

from .dispatch import FusedPlan, base_hooked, fused_enabled, plan_fused, run_plan
from .fused import HAS_TRITON, fused_supported, hydra_delta_fused, hydra_linear_fused, stack_init_offset
from .reference import add_usage, flat_B

__all__ = [
    "HAS_TRITON",
    "FusedPlan",
    "add_usage",
    "base_hooked",
    "flat_B",
    "fused_enabled",
    "fused_supported",
    "hydra_delta_fused",
    "hydra_linear_fused",
    "plan_fused",
    "run_plan",
    "stack_init_offset",
]
