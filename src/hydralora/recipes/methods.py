"""The compared methods in one place, so every comparison builds its adapter the same way."""

from __future__ import annotations

from typing import Any

import peft
from peft import LoraConfig

from .._peft_compat import quiet_peft_checkpointing_probe
from ..routing import hydra_layers
from ..tuner.config import HydraLoraConfig
from .config import Method

LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "modules_to_save")


def peft_config_for(method: Method, adapter: dict[str, Any], task_type: str = "CAUSAL_LM"):
    """The PEFT config of `method` from the recipe's adapter fields (num_experts already resolved).

    hydralora          -- shared A, N experts, token router (the paper's method)
    hydralora-uniform  -- the same with a fixed uniform gate ('w/o gate' ablation)
    lora-moe           -- N separate A_i, B_i with the router ('w/o hydra' ablation)
    lora-split         -- N separate smaller LoRAs (A_i, B_i), averaged with a fixed uniform gate
    lora               -- stock PEFT LoRA of rank r
    """
    if method == "lora":
        return LoraConfig(task_type=task_type, **{k: v for k, v in adapter.items() if k in LORA_FIELDS})
    kwargs = dict(adapter)
    if method in ("lora-moe", "lora-split"):
        kwargs["shared_a"] = False
    if method in ("hydralora-uniform", "lora-split"):
        kwargs.update(routing="fixed", fixed_gate="mean", balance_loss_coef=0.0)
    return HydraLoraConfig(task_type=task_type, **kwargs)


def build_model(base, method: Method, adapter: dict[str, Any], task_type: str = "CAUSAL_LM"):
    """get_peft_model for `method`; routers that a fixed gate never reads are frozen (no unused parameters)."""
    with quiet_peft_checkpointing_probe():
        model = peft.get_peft_model(base, peft_config_for(method, adapter, task_type))
    if method in ("hydralora-uniform", "lora-split"):
        for _, layer in hydra_layers(model):
            for p in layer.hydralora_router.values():
                p.requires_grad_(False)
    return model


def uses_router(method: Method) -> bool:
    return method in ("hydralora", "lora-moe")


def is_hydra(method: Method) -> bool:
    return method != "lora"

