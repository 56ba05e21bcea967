"""The authors' HydraLoRA formulation, re-derived for benchmarking from the paper's formula and their described
forward (not copied from their code):

    y = W0 x + sum_i  scaling * w_i(x) * B_i( A( dropout(x) ) ),    w(x) = softmax(W_g x)

as a Python loop over the N experts that recomputes A(dropout(x)) once per expert (a fresh dropout mask each time)
and runs one B matmul per expert. It returns a Tensor (their layer returns a tuple), so it drops into any model.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class AuthorsHydraLinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 8, lora_alpha: float = 16, dropout: float = 0.05, num_experts: int = 3):
        super().__init__()
        self.base = base
        k, d = base.in_features, base.out_features
        dev, dt = base.weight.device, base.weight.dtype
        self.num_experts = num_experts
        self.scaling = lora_alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(k, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.ModuleList(nn.Linear(r, d, bias=False, device=dev, dtype=dt) for _ in range(num_experts))
        self.lora_route = nn.Linear(k, num_experts, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        for b in self.lora_B:
            nn.init.zeros_(b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        route_weight = torch.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(result.dtype)  # (..., N)
        for i in range(self.num_experts):
            result = result + self.lora_B[i](self.lora_A(self.lora_dropout(x))) * self.scaling * route_weight[..., i:i + 1]
        return result


def apply_authors(model: nn.Module, targets, **kw) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Freeze `model` and replace every nn.Linear whose name ends with one of `targets` (or every Linear inside the
    decoder layers when targets == 'all-linear') by AuthorsHydraLinear. Returns what `restore_authors` needs."""
    model.requires_grad_(False)
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        hit = (".layers." in f".{name}" or name.startswith("layers.")) if targets == "all-linear" else leaf in targets
        if not hit:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, leaf, AuthorsHydraLinear(module, **kw))
        replaced.append((parent, leaf, module))
    return replaced


def restore_authors(replaced) -> None:
    for parent, leaf, module in replaced:
        setattr(parent, leaf, module)
