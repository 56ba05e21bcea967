"""The compared methods in one place, so every comparison builds its adapter the same way."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import peft
from peft import LoraConfig

from .._peft_compat import quiet_peft_checkpointing_probe
from ..routing import hydra_layers
from ..tuner.config import HydraLoraConfig
from .config import Method

# Methods whose adapter is a HydraLoRA adapter (the others are stock PEFT LoRA adapters).
HYDRA_METHODS = ("hydralora", "hydralora-uniform", "lora-moe", "lora-split", "lope")
ROUTED_METHODS = ("hydralora", "lora-moe", "lope")

LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "modules_to_save")


def peft_config_for(method: Method, adapter: dict[str, Any], task_type: str = "CAUSAL_LM"):
    """The PEFT config of `method` from the recipe's adapter fields (num_experts already resolved).

    hydralora          -- shared A, N experts, token router (the paper's method)
    hydralora-uniform  -- the same with a fixed uniform gate ('w/o gate' ablation)
    lora-moe           -- N separate A_i, B_i with the router ('w/o hydra' ablation)
    lora-split         -- N separate smaller LoRAs (A_i, B_i), averaged with a fixed uniform gate
    lora               -- stock PEFT LoRA of rank r
    lope               -- HydraLoRA with num_experts normal experts plus a poisoning expert (the last), masked at
                          inference (hydralora.methods.lope)
    thanora, meta-lora -- stock PEFT LoRA of rank r, trained by their own stages (hydralora.methods)
    """
    if method in ("lora", "thanora", "meta-lora"):
        return LoraConfig(task_type=task_type, **{k: v for k, v in adapter.items() if k in LORA_FIELDS})
    kwargs = dict(adapter)
    if method in ("lora-moe", "lora-split"):
        kwargs["shared_a"] = False
    if method in ("hydralora-uniform", "lora-split"):
        kwargs.update(routing="fixed", fixed_gate="mean", balance_loss_coef=0.0)
    if method == "lope" and kwargs.get("num_experts") != "auto":  # 'auto': the poisoning expert is added once N is found
        n = kwargs["num_experts"]
        kwargs.update(num_experts=n + 1, masked_experts=sorted(set(kwargs.get("masked_experts") or []) | {n}))
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


def uses_router(method: str) -> bool:
    return method in ROUTED_METHODS


def is_hydra(method: str) -> bool:
    return method in HYDRA_METHODS


# ---------------------------------------------------------------------------------------------------------------------
# Methods that train in stages or with their own loss: each runner takes the recipe's configured Trainer (model,
# collator, arguments, callbacks), the training examples, the run spec and the tokenizer, trains, and returns a
# transformers TrainOutput whose metrics hold "stages" (what each stage did) for metrics.json.


def staged_training(method: str) -> Optional[Callable]:
    """The runner of a multi-stage method, or None for methods that are one plain Trainer run."""
    return {"lope": run_lope, "thanora": run_thanora, "meta-lora": run_meta_lora}.get(method)


def _dataset(examples, tokenizer, spec):
    from ..data.collate import SFTDataset

    return SFTDataset(examples, tokenizer, max_length=spec.train.max_seq_length, use_chat_template=spec.train.use_chat_template)


def _by_task(examples) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for e in examples:
        out[e.task].append(e)
    return dict(out)


def _train_stage(trainer, dataset, steps: int, name: str):
    """One Trainer run of `steps` steps on `dataset` with a fresh optimizer and schedule, checkpoints under
    checkpoints/<name>; returns (TrainOutput, its log history tagged with the stage)."""
    args = trainer.args
    saved = (args.max_steps, args.output_dir)
    trainer.train_dataset = dataset
    args.max_steps, args.output_dir = steps, str(Path(saved[1]) / name)
    trainer.optimizer, trainer.lr_scheduler = None, None
    try:
        result = trainer.train()
    finally:
        args.max_steps, args.output_dir = saved
    return result, [dict(h, stage=name) for h in trainer.state.log_history]


def run_lope(trainer, train_examples, spec, tokenizer):
    """Stage one trains the poisoning expert B_D (and the shared A) on character-noised copies of the training data
    (plus optional embedding noise); stage two freezes B_D and trains the normal experts, A and the router on the
    clean data, with the penalty that turns the normal experts away from B_D."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import TrainOutput

    from ..methods.lope import EmbeddingNoise, freeze_expert, noisy_examples, poison_penalty, train_only_expert
    from ..methods.penalty import add_loss_penalty

    cfg, model = spec.train, trainer.model
    poison = int(spec.adapter["num_experts"])  # the expert after the normal ones
    steps1 = cfg.lope_poison_steps or max(1, cfg.max_steps // 4)
    clean = trainer.train_dataset
    noisy = _dataset(noisy_examples(train_examples, 1.0, "char", cfg.lope_char_noise, seed=cfg.seed), tokenizer, spec)

    grad_mask, frozen_routers = train_only_expert(model, poison)
    emb = EmbeddingNoise(model, cfg.lope_embedding_noise) if cfg.lope_embedding_noise > 0 else None
    try:
        first, log1 = _train_stage(trainer, noisy, steps1, "poison")
    finally:
        grad_mask.remove()
        if emb is not None:
            emb.remove()
        for p in frozen_routers:
            p.requires_grad_(True)

    frozen = freeze_expert(model, poison)

    class Restore(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            frozen.restore()

    restore = Restore()
    trainer.add_callback(restore)
    penalty = add_loss_penalty(model, poison_penalty(model, poison), cfg.lope_orthogonal_coef,
                               1.0 / cfg.gradient_accumulation_steps)
    try:
        second, log2 = _train_stage(trainer, clean, cfg.max_steps, "clean")
    finally:
        penalty.remove()
        trainer.remove_callback(restore)
        frozen.remove()
    trainer.state.log_history = log1 + log2
    stages = {"poison_expert": poison, "poison_steps": steps1, "poison_loss": first.training_loss,
              "clean_steps": cfg.max_steps, "clean_loss": second.training_loss}
    return TrainOutput(steps1 + second.global_step, second.training_loss, {**second.metrics, "stages": stages})


def run_thanora(trainer, train_examples, spec, tokenizer):
    """Per-task subspaces of the LoRA rank from the tasks' layer inputs (hydralora.methods.thanora), then one
    Trainer run with the subspace-orthogonality penalty added to the loss."""
    from transformers.trainer_utils import TrainOutput

    from ..methods.penalty import add_loss_penalty
    from ..methods.thanora import allocate_ranks, init_task_subspaces, subspace_overlap, task_heterogeneity, thanora_penalty

    cfg, model = spec.train, trainer.model
    batches = {}
    for task, rows in _by_task(train_examples).items():
        feats = _dataset(rows[: cfg.thanora_init_examples], tokenizer, spec).features
        batches[task] = [trainer.data_collator(feats[i:i + cfg.eval_batch_size]) for i in range(0, len(feats), cfg.eval_batch_size)]
    heterogeneity = task_heterogeneity(model, batches)
    ranks = allocate_ranks(heterogeneity, int(spec.adapter["r"]))
    slices = init_task_subspaces(model, batches, ranks, seed=cfg.seed)
    overlap_init = subspace_overlap(model, slices)
    print(f"[hydralora] thanora: ranks per task {ranks} (heterogeneity {({t: round(h, 4) for t, h in heterogeneity.items()})})")
    penalty = add_loss_penalty(model, thanora_penalty(model, slices), cfg.thanora_ortho_coef,
                               1.0 / cfg.gradient_accumulation_steps)
    try:
        result = trainer.train()
    finally:
        penalty.remove()
    stages = {"heterogeneity": heterogeneity, "ranks": ranks, "slices": slices, "overlap_init": overlap_init,
              "overlap_final": subspace_overlap(model, slices)}
    return TrainOutput(result.global_step, result.training_loss, {**result.metrics, "stages": stages})


def run_meta_lora(trainer, train_examples, spec, tokenizer):
    """Meta steps over all tasks (hydralora.methods.meta_lora) in place of the Trainer's loop; the Trainer's
    model, collator and precision are used."""
    from transformers.trainer_utils import TrainOutput

    from ..methods.meta_lora import train_meta_lora

    cfg = spec.train
    feats = {task: _dataset(rows, tokenizer, spec).features for task, rows in _by_task(train_examples).items()}
    log = lambda e: print(f"[hydralora] meta-lora step {e['step']}: query loss {e['loss']:.4f}, support loss {e['support_loss']:.4f}", flush=True)  # noqa: E731
    history = train_meta_lora(
        trainer.model, feats, trainer.data_collator, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        inner_lr=cfg.meta_lora_inner_lr if cfg.meta_lora_inner_lr is not None else cfg.learning_rate,
        inner_steps=cfg.meta_lora_inner_steps, support_size=cfg.meta_lora_support_size,
        query_size=cfg.meta_lora_query_size, weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_ratio=cfg.warmup_ratio, max_grad_norm=trainer.args.max_grad_norm, seed=cfg.seed,
        bf16=bool(trainer.args.bf16), logging_steps=cfg.logging_steps, log=log,
    )
    trainer.state.log_history = history
    loss = sum(h["loss"] for h in history) / max(1, len(history))
    stages = {"tasks": sorted(feats), "examples_per_task": {t: len(f) for t, f in feats.items()},
              "inner_steps": cfg.meta_lora_inner_steps}
    return TrainOutput(cfg.max_steps, loss, {"stages": stages})

