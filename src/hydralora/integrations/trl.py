"""TRL: `HydraSFTTrainer`, TRL's SFTTrainer that adds HydraLoRA's balance loss and logs it (needs `hydralora[trl]`).

TRL's SFTTrainer computes the language-model loss from its own fused LM head and never reads `outputs.loss`, where
HydraLoRA's model hook adds `balance_loss_coef * aux_loss`. With `balance_loss_coef=0` (the default) the stock
SFTTrainer trains a HydraLoRA adapter as it is; with a balance loss, use this class (the stock one refuses, naming
it), which adds the term the way SFTTrainer adds a Mixture-of-Experts router loss and logs `balance_loss`.
"""

from __future__ import annotations

from trl import SFTTrainer

from ..routing import get_aux_loss
from ..tuner.model import HydraLoraModel


def _tuners(model) -> list[HydraLoraModel]:
    return [m for m in model.modules() if isinstance(m, HydraLoraModel)]


class HydraSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` for HydraLoRA adapters: loss + balance_loss_coef * balance loss, and `balance_loss` logged
    (the router's balance loss before its coefficient, mean over the logging window)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for tuner in _tuners(self.model):
            tuner.trainer_adds_balance_loss = True

    def _balance_coef(self) -> float:
        configs = getattr(self.model, "peft_config", {}) or {}
        active = getattr(self.model, "active_adapter", None)
        cfg = configs.get(active) if isinstance(configs, dict) else None
        return float(getattr(cfg, "balance_loss_coef", 0.0) or 0.0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        aux = get_aux_loss(model)
        if aux is None:
            return result
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["balance_loss"].append(float(self.accelerator.gather_for_metrics(aux.detach()).mean()))
        coef = self._balance_coef()
        if coef > 0:
            # As SFTTrainer does for a router loss: with num_items_in_batch the loss is not divided by the gradient
            # accumulation steps afterwards, so the per-micro-batch mean is divided here.
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + coef * aux.to(loss.dtype) / steps
        return (loss, result[1]) if return_outputs else loss
