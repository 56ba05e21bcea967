"""Whether the experts specialise: the router's entropy on real inputs and how alike the experts' updates are."""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .routing import hydra_layers


@torch.no_grad()
def router_entropy(model: nn.Module, batches: Iterable[dict]) -> Optional[float]:
    """Mean per-token entropy of the token-routing gate over the real tokens of `batches` (dicts of model inputs
    with `attention_mask`), in units of log N (1: uniform gate, 0: one expert per token), averaged over layers.
    None where the model has no routed HydraLoRA layer."""
    layers = [(n, m) for n, m in hydra_layers(model) if m.routing_mode == "token"]
    if not layers:
        return None
    sums = {n: 0.0 for n, _ in layers}
    count = 0.0
    current: dict[str, torch.Tensor] = {}

    def hook(name):
        def capture(module, args):
            x = args[0]  # (B, T, k)
            gate = module.route(x).float()  # (B, T, N)
            n = gate.shape[-1]
            ent = -(gate * gate.clamp_min(1e-12).log()).sum(-1) / math.log(n) if n > 1 else gate.sum(-1) * 0  # (B, T)
            current[name] = ent
        return capture

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch["attention_mask"].float()  # (B, T)
            current.clear()
            model(**batch)
            for name, ent in current.items():
                sums[name] += float((ent * mask.to(ent.device)).sum())
            count += float(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        return None
    return sum(s / count for s in sums.values()) / len(sums)


@torch.no_grad()
def expert_similarity(model: nn.Module) -> Optional[dict]:
    """How alike the experts' learned updates are: mean over layers of the mean pairwise cosine similarity of the
    experts' (alpha/r) B_i A (net of a non-zero init; 1: copies, 0: orthogonal), with the lowest layer's value.
    None where no layer has two experts."""
    values = []
    for _, layer in hydra_layers(model):
        delta = layer.expert_delta_weights().float()  # (N, d, k)
        n = delta.shape[0]
        if n < 2:
            continue
        u = F.normalize(delta.reshape(n, -1), dim=-1, eps=1e-12)  # (N, d*k)
        gram = u @ u.T  # (N, N)
        values.append(float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1))))
    if not values:
        return None
    return {"expert_cos": sum(values) / len(values), "expert_cos_min_layer": min(values), "layers": len(values)}
