"""LoPE: a poisoning expert trained on generated noisy data, then frozen while the normal experts train, and
masked at inference ("Noise-Robustness Through Noise: Asymmetric LoRA Adaption with Poisoning Expert",
arXiv:2505.23868).

The adapter is an ordinary HydraLoRA adapter with one expert more than the normal experts; the last expert is the
poisoning expert B_D and is listed in `masked_experts`, so every inference path (token, sequence and fixed routing,
export, merge) drops it and renormalises the gate over the normal experts. The pieces here act on a PEFT model:

- `perturb_text` / `noisy_examples`: generated noise (character swaps, insertions and deletions at a rate) and,
  for studies, label noise;
- `train_only_expert`: stage one, only B_D (and the shared A) learn;
- `freeze_expert`: stage two, B_D keeps its exact values while the rest learns;
- `poison_penalty`: the squared cosine between each normal expert and B_D, added to the stage-two loss so the
  normal experts learn away from the poisoning expert's direction (our reading of the paper's re-weighting).
"""

from __future__ import annotations

import random
import string
from dataclasses import replace
from typing import Literal, Sequence, get_args

import torch
from torch import nn

from ..data.formats import Example
from ..routing import hydra_layers

NoiseKind = Literal["char", "label"]
NOISE_KINDS = get_args(NoiseKind)
_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " "


def perturb_text(text: str, rate: float, rng: random.Random) -> str:
    """Character-level noise: each character is, with probability `rate`, swapped with its successor, preceded by
    a random printable character, or deleted (one of the three, equally likely)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate={rate!r} is invalid: must lie in [0, 1].")
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        c = chars[i]
        if rng.random() >= rate:
            out.append(c)
            i += 1
            continue
        op = rng.randrange(3)
        if op == 0 and i + 1 < len(chars):  # swap with the next character
            out += [chars[i + 1], c]
            i += 2
            continue
        if op == 1:  # insert a random character
            out += [rng.choice(_ALPHABET), c]
        # op == 2 (or a swap at the last character): delete
        i += 1
    return "".join(out)


def noisy_examples(examples: Sequence[Example], fraction: float, kind: NoiseKind = "char", rate: float = 0.05,
                   seed: int = 0) -> list[Example]:
    """A copy of `examples` with a seeded `fraction` of them made noisy; the others are returned unchanged.

    kind 'char': the prompt gets character-level noise at `rate` (perturb_text). kind 'label': the answer is
    replaced by a wrong one: another of the choices for multiple choice, another example's target of the same task
    for generative rows (left unchanged where the task has no different target).
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"kind={kind!r} is invalid: allowed are {NOISE_KINDS}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} is invalid: must lie in [0, 1].")
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(examples)), round(fraction * len(examples))))
    targets: dict[str, list[str]] = {}
    for e in examples:
        targets.setdefault(e.task, []).append(e.target)
    out = []
    for i, e in enumerate(examples):
        if i not in chosen:
            out.append(e)
        elif kind == "char":
            out.append(replace(e, prompt=perturb_text(e.prompt, rate, rng)))
        elif e.is_multiple_choice:
            wrong = [c for c in e.choices if c != e.answer]
            w = rng.choice(wrong) if wrong else None
            out.append(replace(e, answer=w, target=w) if wrong else e)  # a multiple-choice row trains on its answer
        else:
            wrong = sorted({t for t in targets[e.task] if t != e.target})
            out.append(replace(e, target=rng.choice(wrong), aliases=None) if wrong else e)
    return out


def _expert_mask(B: torch.Tensor, index: int, keep: bool) -> torch.Tensor:
    """(N, 1, 1) mask over B's experts: 1 for expert `index` alone (keep) or for all but it (not keep)."""
    m = torch.zeros(B.shape[0], 1, 1, dtype=B.dtype, device=B.device)
    m[index] = 1.0
    return m if keep else 1.0 - m


def _b_params(model: nn.Module) -> list[torch.Tensor]:
    return [B for _, layer in hydra_layers(model) for B in layer.hydralora_B.values()]


class ExpertGradMask:
    """Gradient hooks that let only some experts of every stacked B (N, d, r) learn; `remove()` undoes them."""

    def __init__(self, model: nn.Module, index: int, keep: bool):
        self.handles = []
        for B in _b_params(model):
            mask = _expert_mask(B, index, keep)
            self.handles.append(B.register_hook(lambda g, m=mask: g * m.to(g.dtype)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def train_only_expert(model: nn.Module, index: int) -> tuple[ExpertGradMask, list[torch.Tensor]]:
    """Stage one: only expert `index` of every B and the shared A learn; the routers are frozen.

    Returns the gradient mask (remove it after the stage) and the router parameters it froze (to unfreeze).
    """
    frozen = []
    for _, layer in hydra_layers(model):
        for p in layer.hydralora_router.values():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)
    return ExpertGradMask(model, index, keep=True), frozen


class FrozenExpert:
    """Stage two: expert `index` of every B gets no gradient, and `restore()` (after each optimizer step) writes its
    saved values back, so weight decay or any optimizer state cannot move it either."""

    def __init__(self, model: nn.Module, index: int):
        self.index = index
        self.params = _b_params(model)
        self.saved = [B[index].detach().clone() for B in self.params]  # (d, r) each
        self.mask = ExpertGradMask(model, index, keep=False)

    @torch.no_grad()
    def restore(self) -> None:
        for B, saved in zip(self.params, self.saved):
            B[self.index].copy_(saved)

    def remove(self) -> None:
        self.mask.remove()


def freeze_expert(model: nn.Module, index: int) -> FrozenExpert:
    return FrozenExpert(model, index)


def poison_penalty(model: nn.Module, index: int):
    """A callable: mean over layers and normal experts of cos^2(B_i, B_D), B flattened (d*r).

    Every expert reads the same A x, so the cosine of the B's is the cosine of the experts' updates B_i A.
    B_D is detached: the penalty moves only the normal experts.
    """
    params = _b_params(model)

    def penalty() -> torch.Tensor:
        terms = []
        for B in params:
            n = B.shape[0]
            flat = B.reshape(n, -1).float()  # (N, d*r)
            poison = flat[index].detach()  # (d*r,)
            normal = torch.cat([flat[:index], flat[index + 1:]])  # (N-1, d*r)
            cos = normal @ poison / (normal.norm(dim=-1) * poison.norm()).clamp_min(1e-12)  # (N-1,)
            terms.append(cos.pow(2).mean())
        return torch.stack(terms).mean()

    return penalty


class EmbeddingNoise:
    """Gaussian noise on the input embeddings while training: std = `scale` x the embeddings' RMS per call."""

    def __init__(self, model: nn.Module, scale: float):
        self.scale = scale
        self.handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not module.training or self.scale <= 0:
            return output
        rms = output.detach().float().pow(2).mean().sqrt()  # ()
        noise = torch.randn(output.shape, device=output.device, dtype=torch.float32)  # (B, T, h)
        return output + (noise * rms * self.scale).to(output.dtype)  # (B, T, h)

    def remove(self) -> None:
        self.handle.remove()
