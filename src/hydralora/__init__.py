"""hydralora: HydraLoRA (one shared A, N router-mixed B experts) as a real PEFT method.

`import hydralora` registers the PEFT method "hydralora", so `peft.get_peft_model(model, HydraLoraConfig(...))`
returns a `peft.PeftModel` and `peft.PeftModel.from_pretrained` loads saved HydraLoRA adapters.
"""

from ._peft_compat import register as _register
from .tuner import HydraLinear, HydraLoraConfig, HydraLoraLayer, HydraLoraModel

_register(HydraLoraConfig, HydraLoraModel)

from .export import export_lora, merge_and_unload  # noqa: E402
from .loading import load_adapter  # noqa: E402
from .routing import (  # noqa: E402
    expert_usage, get_aux_loss, get_ortho_loss, get_route_loss, get_routing, hydra_layers, set_route_target_weight,
    set_routing,
)
from .diagnostics import expert_similarity, router_entropy  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "HydraLoraConfig",
    "HydraLinear",
    "HydraLoraLayer",
    "HydraLoraModel",
    "expert_similarity",
    "expert_usage",
    "export_lora",
    "get_aux_loss",
    "get_ortho_loss",
    "get_route_loss",
    "get_routing",
    "hydra_layers",
    "load_adapter",
    "merge_and_unload",
    "router_entropy",
    "set_route_target_weight",
    "set_routing",
]
