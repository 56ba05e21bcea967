"""Model-level routing controls: list the HydraLoRA layers, pick a routing mode, read usage and aux loss."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .tuner.config import ROUTING_MODES, RoutingMode
from .tuner.layer import HydraLoraLayer, validate_gate
from .tuner.model import HydraLoraModel

Gate = Union[str, int, Sequence[float], torch.Tensor]


def hydra_layers(model: nn.Module) -> list[tuple[str, HydraLoraLayer]]:
    """[(module name, layer), ...] for every HydraLoRA layer in `model` (a PeftModel or any module)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, HydraLoraLayer)]


def _require_layers(model: nn.Module) -> list[tuple[str, HydraLoraLayer]]:
    layers = hydra_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no HydraLoRA layers: build it with peft.get_peft_model(model, HydraLoraConfig(...)).")
    return layers


def layer_gate(layer: HydraLoraLayer, gate: Gate, adapter_name: Optional[str] = None) -> torch.Tensor:
    """A user gate turned into this layer's (N,) fp32 weights ('usage' reads the layer's recorded usage)."""
    name = adapter_name or layer.active_adapters[0]
    return validate_gate(gate, layer.num_experts[name], usage=layer._usage(name))


def set_routing(model: nn.Module, mode: RoutingMode, gate: Optional[Gate] = None) -> None:
    """Choose how every HydraLoRA layer of `model` gates its experts.

    token    -- the router's softmax per token (training and default inference);
    sequence -- one gate per sequence: the mean router weights over the prompt's real tokens (padding excluded),
                reused for every generated token;
    fixed    -- the given `gate` ('mean' = uniform, 'usage' = each layer's recorded mean gate, an expert index,
                or N non-negative weights, normalised to sum 1) for every input; this makes the update an ordinary
                LoRA that can be merged or exported.
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"mode={mode!r} is invalid: allowed are {ROUTING_MODES}.")
    if mode == "fixed" and gate is None:
        raise ValueError("mode='fixed' needs a gate: 'mean', 'usage', an expert index, or N weights.")
    if mode != "fixed" and gate is not None:
        raise ValueError(f"gate is only used with mode='fixed', got mode={mode!r} and gate={gate!r}.")
    for _, layer in _require_layers(model):
        layer.fixed_gate = layer_gate(layer, gate) if mode == "fixed" else None
        layer.routing_mode = mode
        layer._sequence_gate.clear()


def get_routing(model: nn.Module) -> str:
    """The routing mode of the model's HydraLoRA layers."""
    modes = {layer.routing_mode for _, layer in _require_layers(model)}
    return modes.pop() if len(modes) == 1 else "mixed"


def expert_usage(model: nn.Module, reset: bool = False) -> dict[str, torch.Tensor]:
    """Mean gate weight per expert for every layer since the last reset: {layer name: (N,) tensor}."""
    out = {}
    for name, layer in _require_layers(model):
        usage = layer._usage(layer.active_adapters[0])
        if usage is not None:
            out[name] = usage.detach().cpu()
        if reset:
            layer.reset_usage()
    return out


def get_aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The router balance loss of the last training forward (mean over layers), before its coefficient."""
    for module in model.modules():
        if isinstance(module, HydraLoraModel):
            return module.aux_loss
    return None


def _tuner_models(model: nn.Module) -> list[HydraLoraModel]:
    return [m for m in model.modules() if isinstance(m, HydraLoraModel)]


def set_route_target_weight(model: nn.Module, weight: Optional[float]) -> None:
    """Set the weight of the routing-target loss for the next forwards (a training schedule calls this every step);
    None goes back to each adapter's `route_target_coef`. The loss needs `route_labels` (B,) in the forward call."""
    if weight is not None and not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0):
        raise ValueError(f"weight={weight!r} is invalid: a number >= 0, or None for the config's route_target_coef.")
    tuners = _tuner_models(model)
    if not tuners:
        raise ValueError(f"{type(model).__name__} has no HydraLoRA model: build it with peft.get_peft_model.")
    for tuner in tuners:
        tuner.route_target_weight = None if weight is None else float(weight)


def get_route_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The routing-target loss of the last training forward (mean over layers), before its weight."""
    tuners = _tuner_models(model)
    return tuners[0].route_loss if tuners else None


def get_ortho_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """The expert-diversity penalty of the last training forward (mean over layers), before its coefficient."""
    tuners = _tuner_models(model)
    return tuners[0].ortho_loss if tuners else None
