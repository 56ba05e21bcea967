"""MeTA-LoRA: per-task LoRA copies adapted from the shared LoRA on a few examples (stage one), then the shared LoRA
updated with the query-set gradients of those copies, aggregated over the tasks (stage two, a first-order
meta-learning step); the two stages alternate every step and the result is one LoRA ("MeTA-LoRA: Data-Efficient
Multi-Task Fine-Tuning for Large Language Models", arXiv:2510.11598).

Our choices where the paper's details are not ours to copy: the task adapters are plain SGD steps from the shared
weights (`inner_steps` steps at `inner_lr` on disjoint support batches), the aggregate is the mean of the tasks'
query gradients taken at the adapted weights (first order: no second derivatives), and the shared LoRA takes that
mean through AdamW with the recipe's schedule and gradient clipping.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn


@dataclass
class MetaStep:
    """One meta step's result: the aggregated gradient per shared parameter, the mean losses, and (when asked for)
    each task's adapted weights from stage one."""

    grads: list[torch.Tensor]
    support_loss: float
    query_loss: float
    task_adapters: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def meta_step(params: Sequence[torch.Tensor], loss_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
              tasks: Mapping[str, tuple[Sequence[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]],
              inner_lr: float, inner_steps: int, keep_adapters: bool = False) -> MetaStep:
    """Stage one and the gradient of stage two for every task; `params` (the shared LoRA) are left as they came.

    tasks: task -> (support batches, query batch). For each task, start from the shared weights, take `inner_steps`
    SGD steps on its support batches (cycled), then take the gradient of the query loss at the adapted weights.
    Returns the mean of those gradients over the tasks.
    """
    shared = [p.detach().clone() for p in params]
    agg = [torch.zeros_like(p) for p in params]
    adapters: dict[str, list[torch.Tensor]] = {}
    s_losses, q_losses = [], []
    try:
        for task, (support, query) in tasks.items():
            for s in range(inner_steps):  # stage one: the task's own adapter
                loss = loss_fn(support[s % len(support)])
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(g.to(p.dtype), alpha=inner_lr)
                s_losses.append(float(loss.detach()))
            if keep_adapters:
                adapters[task] = [p.detach().clone() for p in params]
            loss = loss_fn(query)  # stage two: the query gradient at the adapted weights
            grads = torch.autograd.grad(loss, params)
            for a, g in zip(agg, grads):
                a.add_(g.to(a.dtype), alpha=1.0 / len(tasks))
            q_losses.append(float(loss.detach()))
            with torch.no_grad():
                for p, w in zip(params, shared):
                    p.copy_(w)
    finally:
        with torch.no_grad():
            for p, w in zip(params, shared):
                p.copy_(w)
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    return MetaStep(agg, mean(s_losses), mean(q_losses), adapters)


def _sample(n: int, support: int, query: int, inner_steps: int, rng: random.Random) -> tuple[list[list[int]], list[int]]:
    """Indices of `inner_steps` support batches and one query batch, disjoint while the task has enough rows."""
    order = list(range(n))
    rng.shuffle(order)
    need = support * inner_steps + query
    picks = [order[i % n] for i in range(need)]
    return [picks[s * support:(s + 1) * support] for s in range(inner_steps)], picks[support * inner_steps:]


def train_meta_lora(model: nn.Module, task_features: Mapping[str, Sequence[dict]], collate: Callable[[list], dict], *,
                    max_steps: int, learning_rate: float, inner_lr: float, inner_steps: int, support_size: int,
                    query_size: int, weight_decay: float = 0.0, lr_scheduler_type: str = "cosine",
                    warmup_ratio: float = 0.0, max_grad_norm: float = 1.0, seed: int = 0, bf16: bool = False,
                    logging_steps: int = 5, log: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Meta-train the model's trainable parameters (the shared LoRA) for `max_steps` meta steps over all tasks.

    task_features: task -> encoded examples (input_ids / attention_mask / labels). Returns the log history.
    """
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: build the LoRA adapter first.")
    empty = [t for t, rows in task_features.items() if not rows]
    if empty:
        raise ValueError(f"tasks {empty} have no training examples.")
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    scheduler = get_scheduler(lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(warmup_ratio * max_steps),
                              num_training_steps=max_steps)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def loss_fn(batch):
        with amp:
            return model(**{k: v.to(device) for k, v in batch.items()}).loss

    rng = random.Random(seed)
    history: list[dict] = []
    window: list[float] = []
    model.train()
    for step in range(1, max_steps + 1):
        tasks = {}
        for task in sorted(task_features):
            rows = task_features[task]
            support, query = _sample(len(rows), support_size, query_size, inner_steps, rng)
            tasks[task] = ([collate([rows[i] for i in b]) for b in support], collate([rows[i] for i in query]))
        result = meta_step(params, loss_fn, tasks, inner_lr, inner_steps)
        for p, g in zip(params, result.grads):
            p.grad = g.to(p.dtype)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(result.query_loss)
        if step % logging_steps == 0 or step == max_steps:
            entry = {"step": step, "loss": round(sum(window) / len(window), 6), "support_loss": round(result.support_loss, 6),
                     "learning_rate": scheduler.get_last_lr()[0]}
            history.append(entry)
            window = []
            if log is not None:
                log(entry)
    return history
