"""The paper's inference story made exact: for a fixed gate the update is an ordinary rank-r LoRA."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from .routing import Gate, _require_layers, layer_gate, set_routing
from .tuner.config import HydraLoraConfig

PEFT_KEY_PREFIX = "base_model.model."


def _hydra_config(model: nn.Module, adapter_name: str) -> HydraLoraConfig:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not isinstance(configs.get(adapter_name), HydraLoraConfig):
        raise ValueError(f"model has no HydraLoRA adapter named {adapter_name!r}: pass the PeftModel from get_peft_model.")
    return configs[adapter_name]


def _relative_name(name: str) -> str:
    """Module name relative to the transformers model (what LoRA target_modules and keys use)."""
    return name[len(PEFT_KEY_PREFIX):] if name.startswith(PEFT_KEY_PREFIX) else name


def export_lora(model: nn.Module, path: str, gate: Gate, adapter_name: str = "default", overwrite: bool = False) -> str:
    """Write a stock PEFT LoRA adapter equal to the HydraLoRA model under a fixed `gate`.

    The folder (adapter_config.json + adapter_model.safetensors) loads with plain `peft.PeftModel.from_pretrained`
    in a process that never imports hydralora. Rank r (2r when the R-LoRA init offset is present).
    """
    config = _hydra_config(model, adapter_name)
    target = os.path.join(path, "adapter_model.safetensors")
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; refusing to overwrite it (pass overwrite=True, or choose another path).")
    layers = _require_layers(model)
    state: dict[str, torch.Tensor] = {}
    targets, ranks, gates = [], set(), {}
    with torch.no_grad():
        for name, layer in layers:
            if adapter_name not in layer.hydralora_A:
                continue
            w = layer_gate(layer, gate, adapter_name)
            A_eff, B_eff = layer.fixed_gate_factors(adapter_name, w)  # (m, k), (d, m)
            rel = _relative_name(name)
            state[f"{PEFT_KEY_PREFIX}{rel}.lora_A.weight"] = A_eff.detach().contiguous().cpu()
            state[f"{PEFT_KEY_PREFIX}{rel}.lora_B.weight"] = B_eff.detach().contiguous().cpu()
            targets.append(rel)
            ranks.add(A_eff.shape[0])
            gates[rel] = w.tolist()
    (rank,) = ranks
    # Non-adapter entries HydraLoRA saves (modules_to_save, trained biases) use PEFT's shared key scheme.
    for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
        if ".hydralora_" not in key:
            state[key] = value.detach().contiguous().cpu()
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=config.lora_alpha / config.r * rank,  # keeps alpha / r, so the scaling is unchanged
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=config.fan_in_fan_out,
        bias="lora_only" if config.bias == "hydralora_only" else config.bias,
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
    )
    os.makedirs(path, exist_ok=True)
    lora_config.save_pretrained(path)
    save_file(state, target, metadata={"format": "pt"})
    with open(os.path.join(path, "hydralora_export.json"), "w") as f:
        json.dump({"gate": gate if isinstance(gate, (str, int)) else list(map(float, gate)), "per_layer_gate": gates}, f, indent=1)
    return path


def merge_and_unload(model: nn.Module, gate: Gate, adapter_name: Optional[str] = None) -> nn.Module:
    """The base model with the fixed-gate update (alpha/r)(sum_i w_i B_i) A merged into its weights."""
    set_routing(model, "fixed", gate)
    kwargs = {"adapter_names": [adapter_name]} if adapter_name else {}
    return model.merge_and_unload(**kwargs)
