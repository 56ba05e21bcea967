"""Adding a method's regulariser to the model's training loss."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def add_loss_penalty(model: nn.Module, penalty: Callable[[], torch.Tensor], coef: float, scale: float = 1.0):
    """Add `coef * scale * penalty()` to `output.loss` of every training forward of `model` that computes a loss.

    A forward hook, like the balance loss of hydralora.tuner.model: any Trainer (or loop) that reads `output.loss`
    optimises the sum. `scale` corrects for a loop that sums several forwards per step (1 / gradient accumulation
    steps). Returns the hook handle; `handle.remove()` stops it.
    """

    def hook(module, args, output):
        loss = getattr(output, "loss", None)
        if not module.training or loss is None or coef == 0:
            return output
        output.loss = loss + (coef * scale) * penalty().to(loss.dtype)
        return output

    return model.register_forward_hook(hook)
