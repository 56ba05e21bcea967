"""`hydralora train`: find N, fine-tune with transformers' Trainer, evaluate base vs adapted, write a run directory."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from .. import expert_usage, get_aux_loss, get_ortho_loss, get_route_loss, set_route_target_weight, set_routing
from ..data.collate import SFTCollator, SFTDataset, render_prompt
from ..data.formats import Example, load_examples
from .._checkpointing import checkpointing_training_args
from .._extras import require_extra
from ..models import bf16_supported, pick_device
from .config import RUN_FILE, RunSpec, apply_schedule
from .methods import build_model, is_hydra, staged_training, uses_router
from .response_logits import keep_response_logits, logits_to_keep_support


def sampler_training_args(group_by_length: bool) -> dict[str, Any]:
    """TrainingArguments keyword arguments for random or length-grouped batches, under the name the installed
    transformers has (`train_sampling_strategy`, or the older boolean `group_by_length`)."""
    from dataclasses import fields

    if "train_sampling_strategy" in {f.name for f in fields(TrainingArguments)}:
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": group_by_length}


class HydraTrainer(Trainer):
    """Trainer that also logs the router's balance loss (before its coefficient) next to the loss, builds a LoRA+
    optimizer (B at `loraplus_lr_ratio` x the learning rate) when asked, and projects onto the vocabulary only the
    positions the loss reads (`response_logits_only`, see recipes/response_logits.py)."""

    def __init__(self, *args, loraplus_lr_ratio: float | None = None, response_logits_only: bool = False, **kwargs):
        self.loraplus_lr_ratio = loraplus_lr_ratio
        super().__init__(*args, **kwargs)
        self._sums = {"aux_loss": [0.0, 0], "route_loss": [0.0, 0], "ortho_loss": [0.0, 0]}
        self._logits_form = logits_to_keep_support(self.model) if response_logits_only else None

    def create_optimizer(self, model=None):
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        # Called by Trainer after any FSDP/DDP wrapping, like the stock method; PEFT groups parameters whose name
        # holds "lora_B", which "hydralora_B" does.
        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kwargs = dict(kwargs)
        lr = kwargs.pop("lr", self.args.learning_rate)
        self.optimizer = create_loraplus_optimizer(opt_model, optimizer_cls, lr=lr, loraplus_lr_ratio=self.loraplus_lr_ratio,
                                                   loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        if self._logits_form is not None and model.training:
            inputs = keep_response_logits(inputs, self._logits_form)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        for key, read in (("aux_loss", get_aux_loss), ("route_loss", get_route_loss), ("ortho_loss", get_ortho_loss)):
            value = read(model)
            if value is not None:
                self._sums[key][0] += float(value.detach())
                self._sums[key][1] += 1
        return result

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.model is not None:
            for key, (total, count) in self._sums.items():
                if count == 0:  # every rank runs the same configuration: all skip alike
                    continue
                # mean over the logging window and over ranks, as Trainer does for the loss
                stats = torch.tensor([total, float(count)], device=self.args.device)
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(stats)
                if stats[1] > 0:
                    logs[key] = round(float(stats[0] / stats[1]), 6)
                self._sums[key] = [0.0, 0]
        super().log(logs, *args, **kwargs)


class RouteTargetSchedule(TrainerCallback):
    """The routing-target loss's weight: `coef` at the first step, decaying linearly to 0 at `ratio` of max_steps."""

    def __init__(self, model, coef: float, ratio: float, max_steps: int):
        self.model, self.coef, self.end = model, float(coef), max(1.0, ratio * max_steps)

    def weight(self, step: int) -> float:
        return self.coef * max(0.0, 1.0 - step / self.end)

    def on_step_begin(self, args, state, control, **kwargs):
        set_route_target_weight(self.model, self.weight(state.global_step))


class LogAtSaves(TrainerCallback):
    """Log the loss at every checkpoint and at the last step, so that the log history saved with a checkpoint covers
    every step before it and the whole run's training loss can be read back after a resume (run_train_loss)."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_training_stop or state.global_step >= state.max_steps:
            control.should_log = True
        return control


def run_train_loss(log_history: list[dict]) -> Optional[float]:
    """Mean training loss over every step of a run, resumed or not, from Trainer's log history: each "loss" entry
    is the mean over the steps since the previous one."""
    total, last = 0.0, 0
    for entry in sorted((e for e in log_history if "loss" in e and "step" in e), key=lambda e: e["step"]):
        step = int(entry["step"])
        if step <= last:
            continue
        total += float(entry["loss"]) * (step - last)
        last = step
    return total / last if last else None


CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be resumed from (a kill while it was written), or None if it is complete."""
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return f"trainer_state.json is unreadable ({err})"
    from safetensors import safe_open

    try:
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            list(f.keys())
    except Exception as err:  # safetensors raises its own error type for a truncated header
        return f"adapter_model.safetensors is unreadable ({err})"
    return None


def last_complete_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    """The newest checkpoint-N folder that is complete; newer incomplete ones are reported and skipped."""
    found = [p for p in Path(checkpoints_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for path in sorted(found, key=lambda p: -int(p.name.split("-")[-1])):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        print(f"[hydralora] skipping incomplete checkpoint {path} ({problem}); trying the one before")
    return None


def resolve_data_path(data: str) -> str:
    if data == "bundled":
        from ..data import bundled_mixture_path

        return str(bundled_mixture_path())
    return data


def split_examples(examples: list[Example], seed: int, holdout: float = 0.1) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples: the data's own split field, else a seeded per-task hold-out."""
    splits = {e.split for e in examples}
    if splits - {None}:
        test_name = "test" if "test" in splits else "validation"
        train = [e for e in examples if e.split in ("train", None)]
        test = [e for e in examples if e.split == test_name]
        if not train or not test:
            raise ValueError(f"data needs 'train' and 'test' (or 'validation') rows in its split field; found {sorted(s for s in splits if s)}.")
        return train, test
    by_task: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_task[e.task].append(e)
    rng = random.Random(seed)
    train, test, single = [], [], []
    for task in sorted(by_task):
        rows = list(by_task[task])
        rng.shuffle(rows)
        if len(rows) < 2:  # holding it out would score a task the adapter never saw
            single.append(task)
            train += rows
            continue
        n_test = max(1, min(50, int(len(rows) * holdout)))
        test += rows[:n_test]
        train += rows[n_test:]
    if single:
        warnings.warn(f"task(s) {single} have a single example: used for training only, not held out or scored "
                      "(a task needs at least 2 examples to be split).", stacklevel=2)
    return train, test


def carve_validation(train: list[Example], per_task: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `per_task` training examples of every task (seeded; at least one stays for training) as a
    validation set: settings are chosen on it, never on the test split."""
    if per_task <= 0:
        return train, []
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(train):
        by_task[e.task].append(i)
    rng = random.Random(f"validation-{seed}")
    held: set[int] = set()
    for task in sorted(by_task):
        idx = list(by_task[task])
        rng.shuffle(idx)
        held.update(idx[: min(per_task, len(idx) - 1)])
    return [e for i, e in enumerate(train) if i not in held], [e for i, e in enumerate(train) if i in held]


def route_targets(train: list[Example], spec: RunSpec) -> Optional[list[int]]:
    """Each training example's target expert for the routing-target loss: its K-means cluster of the training
    prompts with K = num_experts (the features auto-N uses); None when the loss is off."""
    if not (is_hydra(spec.train.method) and uses_router(spec.train.method)) or not spec.adapter.get("route_target_coef"):
        return None
    from ..clustering import DEFAULT_METHOD, cluster_labels

    labels = cluster_labels([e.prompt for e in train], int(spec.adapter["num_experts"]),
                            method=spec.train.auto_n_method or DEFAULT_METHOD, seed=spec.train.seed)
    return [int(v) for v in labels]


def check_split(train: list[Example], test: list[Example], data: str) -> None:
    """Refuse a split with nothing to train on or nothing to score, naming the data and what is needed."""
    if not train:
        raise ValueError(f"data {data}: no training examples ({len(test)} held-out); every task needs at least 2 "
                         "examples (one to train on, one held out), or give rows a 'split' field.")
    if not test:
        raise ValueError(f"data {data}: no held-out examples to score ({len(train)} training examples; every task "
                         "has a single example). Add rows (at least 2 per task), or set eval_data to a held-out file.")


def cap_per_task(examples: list[Example], cap: Optional[int]) -> list[Example]:
    if not cap:
        return examples
    seen: dict[str, int] = defaultdict(int)
    out = []
    for e in examples:
        if seen[e.task] < cap:
            out.append(e)
            seen[e.task] += 1
    return out


def rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


WRITE_PROBE = ".hydralora-write-check"


def prepare_output_dir(path: Optional[str], method: str, resume: bool) -> Path:
    if path is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("output_dir must be given when training on several processes (they must agree on it).")
        path = os.path.join("runs", f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(path)
    if rank() == 0 and out.exists() and any(not c.name.startswith(WRITE_PROBE) for c in out.iterdir()) and not resume:
        raise FileExistsError(
            f"output_dir {out} exists and is not empty: choose another --output-dir, or pass --resume to continue it "
            "(nothing there is overwritten otherwise)."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        # one probe file per process: ranks of a multi-process run check the same folder at once
        probe = out / f"{WRITE_PROBE}-{os.getpid()}"
        with open(probe, "w") as f:
            f.write("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"output_dir {out} cannot be written ({err.strerror or err}): choose a folder you can write "
                         "to with --output-dir.") from None
    return out


def clean_failed_run(out: Path) -> None:
    """After a failure, remove what this run wrote into a folder that was empty before it, unless a complete
    checkpoint is there to resume from: the corrected rerun can then use the same --output-dir."""
    if rank() != 0 or not out.is_dir():
        return
    if last_complete_checkpoint(out / "checkpoints") is not None:
        print(f"[hydralora] the run failed; its checkpoints stay in {out / 'checkpoints'}: rerun with --resume to continue")
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def find_num_experts(train: list[Example], spec: RunSpec, out: Path) -> Optional[dict]:
    """Resolve num_experts='auto' from the training prompts; writes analysis.json (+ elbow.png) to the run dir."""
    if spec.adapter.get("num_experts") != "auto" or not is_hydra(spec.train.method):
        return None
    from ..clustering import resolve_num_experts

    kwargs: dict[str, Any] = {"seed": spec.train.seed, "k_range": range(2, spec.train.auto_n_k_max + 1)}
    if spec.train.auto_n_method:
        kwargs["method"] = spec.train.auto_n_method
    texts = [e.prompt for e in train]
    k, record = resolve_num_experts(texts, **kwargs)  # deterministic: every rank finds the same N
    spec.adapter["num_experts"] = int(k)
    spec.adapter["auto_n"] = record
    if rank() == 0:
        (out / "analysis.json").write_text(json.dumps(record, indent=1))
    return record


# Held-out prompts per task behind the routing diagnostics (routing_by_task, specialisation); accuracy reads them all.
DIAGNOSTIC_PER_TASK = 24


def routing_by_task(model, tokenizer, examples: list[Example], spec: RunSpec, device: str, groups: int = 3) -> dict:
    """Mean router weight per expert, per task, per layer group (early/middle/late): {task: {group: [N]}}."""
    from ..routing import hydra_layers

    names = [n for n, _ in hydra_layers(model)]
    layer_ids = sorted({_layer_index(n) for n in names})
    out: dict[str, dict[str, list[float]]] = {}
    model.eval()
    by_task: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_task[e.task].append(e)
    for task, rows in sorted(by_task.items()):
        expert_usage(model, reset=True)
        texts = [render_prompt(e, tokenizer, spec.train.use_chat_template) for e in rows]
        for i in range(0, len(texts), spec.train.eval_batch_size):
            enc = tokenizer(texts[i : i + spec.train.eval_batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=spec.train.max_seq_length).to(device)
            with torch.no_grad():
                model(**enc)
        usage = expert_usage(model, reset=True)
        grouped: dict[str, list[torch.Tensor]] = defaultdict(list)
        for name, u in usage.items():
            idx = _layer_index(name)
            g = min(groups - 1, layer_ids.index(idx) * groups // max(1, len(layer_ids))) if idx in layer_ids else 0
            grouped[("early", "middle", "late")[g] if groups == 3 else str(g)].append(u)
        out[task] = {g: torch.stack(v).mean(0).tolist() for g, v in grouped.items()}
    return out


def specialisation(model, tokenizer, examples: list[Example], spec: RunSpec, device: str) -> dict:
    """At the end of training: the router's mean per-token entropy on the held-out prompts (units of log N) and the
    experts' mean pairwise cosine similarity (hydralora.diagnostics)."""
    from ..diagnostics import expert_similarity, router_entropy

    texts = [render_prompt(e, tokenizer, spec.train.use_chat_template) for e in examples]
    bs = spec.train.eval_batch_size
    batches = (tokenizer(texts[i : i + bs], return_tensors="pt", padding=True, truncation=True,
                         max_length=spec.train.max_seq_length).to(device) for i in range(0, len(texts), bs))
    out: dict[str, Any] = {"router_entropy": router_entropy(model, batches)}
    out.update({k: v for k, v in (expert_similarity(model) or {}).items()})
    return out


def _layer_index(name: str) -> int:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "layer", "blocks") and b.isdigit():
            return int(b)
    return -1


def run_train(spec: RunSpec) -> dict:
    """The whole recipe; returns metrics (also written to <output_dir>/metrics.json). A run that fails before its
    first complete checkpoint leaves a folder that was empty before it empty again."""
    cfg = spec.train
    t_start = time.time()
    device = pick_device(cfg.device)
    if cfg.load_in_4bit:
        from ..models import check_4bit_available

        check_4bit_available(device)  # before anything is written or loaded
    use_bf16 = training_in_bf16(cfg.bf16, device)
    schedule = apply_schedule(cfg, on_gpu=device == "cuda", bf16=use_bf16)
    out_path = Path(cfg.output_dir) if cfg.output_dir else None
    fresh = out_path is None or not out_path.exists() or not any(out_path.iterdir())
    out = prepare_output_dir(cfg.output_dir, cfg.method, cfg.resume)
    try:
        return _run(spec, out, device, schedule, use_bf16, t_start)
    except BaseException:
        if fresh:
            clean_failed_run(out)
        raise


def training_in_bf16(bf16: bool | str, device: str) -> bool:
    """The run's ``bf16`` field resolved: true, false, or 'auto' = where bf16 pays (models.bf16_supported)."""
    return bf16 is True or (bf16 == "auto" and bf16_supported(device))


def scoring_precision(evaluate, device: str, use_bf16: bool):
    """``evaluate`` as the run scores: on a CPU training in bf16, under the same bf16 autocast (scoring is a third
    of the CPU schedule's minutes and bf16 halves it); elsewhere in fp32, as every recorded GPU study scored."""
    if not (use_bf16 and device == "cpu"):
        return evaluate

    def scored_in_bf16(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return evaluate(*args, **kwargs)

    return scored_in_bf16


def _run(spec: RunSpec, out: Path, device: str, schedule: str, use_bf16: bool, t_start: float) -> dict:
    from ..eval.scoring import evaluate, format_table
    from ..models import load_model_and_tokenizer, load_tokenizer, resolve_model_path

    cfg = spec.train
    print(f"[hydralora] schedule: {schedule} ({'a short CPU schedule' if schedule == 'cpu' else 'the full GPU schedule'}); "
          f"method={cfg.method}, max_steps={cfg.max_steps}, batch={cfg.per_device_batch_size}, run dir {out}")
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)  # the data is read and checked before the model is loaded
    data_path = resolve_data_path(cfg.data)
    loaded = load_examples(data_path, tokenizer=tokenizer, skip_bad_rows=cfg.skip_bad_rows)
    if loaded.skipped:
        print(f"[hydralora] skipped {loaded.skipped} bad rows of {data_path}")
    train_ex, test_ex = split_examples(list(loaded), cfg.seed)
    if cfg.eval_data:
        test_ex = list(load_examples(cfg.eval_data, tokenizer=tokenizer, skip_bad_rows=cfg.skip_bad_rows))
    check_split(train_ex, test_ex, data_path)
    test_ex = cap_per_task(test_ex, cfg.eval_max_per_task)
    train_ex, val_ex = carve_validation(train_ex, cfg.validation_per_task, cfg.seed)
    print(f"[hydralora] data: {len(train_ex)} training examples, {len(val_ex)} validation, {len(test_ex)} held-out, "
          f"tasks {sorted({e.task for e in train_ex})}")

    auto_n = find_num_experts(train_ex, spec, out)
    if auto_n is not None:
        print(f"[hydralora] num_experts='auto' -> N={spec.adapter['num_experts']} ({auto_n.get('method')})")
    set_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=torch.float32, device=device, load_in_4bit=cfg.load_in_4bit)
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    set_seed(cfg.seed)
    model = build_model(model, cfg.method, spec.adapter)
    model.peft_config["default"].base_model_name_or_path = resolve_model_path(cfg.model)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"[hydralora] trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    metrics: dict[str, Any] = {
        "method": cfg.method, "schedule": schedule, "device": device, "model": cfg.model, "data": data_path,
        "num_experts": spec.adapter.get("num_experts") if is_hydra(cfg.method) else None, "auto_n": auto_n,
        "trainable_params": trainable, "total_params": total, "seed": cfg.seed, "bf16": use_bf16,
    }
    eval_kw = {"batch_size": cfg.eval_batch_size, "max_new_tokens": cfg.max_new_tokens, "device": device,
               "use_chat_template": cfg.use_chat_template, "max_length": cfg.max_seq_length, "progress": True}
    evaluate = scoring_precision(evaluate, device, use_bf16)
    main_process = rank() == 0
    if cfg.eval_base and main_process:
        t = time.time()
        with model.disable_adapter():
            metrics["base"] = evaluate(model, tokenizer, test_ex, **eval_kw)
            if val_ex:  # the gain on validation data is what settings are chosen by
                metrics["base_validation"] = evaluate(model, tokenizer, val_ex, **eval_kw)
        metrics["base_eval_seconds"] = time.time() - t
        print(f"[hydralora] base model held-out mean accuracy {metrics['base']['mean_accuracy']:.3f}")

    targets = route_targets(train_ex, spec)
    if targets is not None:
        counts = [targets.count(i) for i in range(int(spec.adapter["num_experts"]))]
        metrics["route_target_counts"] = counts
        print(f"[hydralora] routing warm-start: training examples per target expert {counts}")
    train_ds = SFTDataset(train_ex, tokenizer, max_length=cfg.max_seq_length, use_chat_template=cfg.use_chat_template,
                          route_labels=targets)
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.lr_scheduler_type,
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=2, report_to=[], bf16=use_bf16,
        **checkpointing_training_args(cfg.gradient_checkpointing), **sampler_training_args(cfg.group_by_length),
        seed=cfg.seed, data_seed=cfg.seed, remove_unused_columns=False, use_cpu=device == "cpu",
        dataloader_num_workers=0, disable_tqdm=False,
    )
    collator = SFTCollator(tokenizer, pad_to_multiple_of=8 if device == "cuda" else None)
    require_extra("TensorBoard logging of the recipe", "tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    tensorboard = TensorBoardCallback(SummaryWriter(log_dir=str(out / "tensorboard")))
    callbacks = [tensorboard, LogAtSaves()]
    if targets is not None:
        callbacks.append(RouteTargetSchedule(model, spec.adapter["route_target_coef"], cfg.route_target_ratio, cfg.max_steps))
    trainer = HydraTrainer(model=model, args=args, train_dataset=train_ds, data_collator=collator, callbacks=callbacks,
                           loraplus_lr_ratio=cfg.loraplus_lr_ratio, response_logits_only=cfg.response_logits_only)
    resume = None
    if cfg.resume:
        last = last_complete_checkpoint(out / "checkpoints")
        resume = str(last) if last else None
        print(f"[hydralora] resuming from {resume}" if resume else "[hydralora] --resume: no checkpoint yet, starting fresh")
    t = time.time()
    # Multi-stage methods (LoPE, ThanoRA, MeTA-LoRA) drive the configured Trainer themselves: recipes/methods.py.
    staged = staged_training(cfg.method)
    result = staged(trainer, train_ex, spec, tokenizer) if staged else trainer.train(resume_from_checkpoint=resume)
    if staged:
        metrics["stages"] = result.metrics.get("stages")
    train_seconds = time.time() - t
    tokens = sum(len(f["input_ids"]) for f in train_ds.features)
    seen = min(1.0, cfg.max_steps * cfg.per_device_batch_size * cfg.gradient_accumulation_steps / max(1, len(train_ds)))
    # Trainer's training_loss covers only the steps of this call; after a resume the whole run's comes from the log.
    whole = run_train_loss(trainer.state.log_history)
    metrics.update(train_seconds=train_seconds, train_loss=whole if whole is not None else result.training_loss,
                   train_tokens_per_s=tokens * seen / max(train_seconds, 1e-9) if not resume else None,
                   log_history=trainer.state.log_history)

    if not main_process:  # rank 0 alone saves, evaluates and reports
        return metrics
    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir)
    (adapter_dir / RUN_FILE).write_text(json.dumps(spec.to_dict() | {"schedule": schedule}, indent=1, default=str))
    (out / "config.json").write_text(json.dumps(spec.to_dict(), indent=1, default=str))

    model.eval()
    if is_hydra(cfg.method) and uses_router(cfg.method) and cfg.eval_routing != "token":
        set_routing(model, cfg.eval_routing, "mean" if cfg.eval_routing == "fixed" else None)
    t = time.time()
    metrics["adapted"] = evaluate(model, tokenizer, test_ex, **eval_kw)
    metrics["adapted_eval_seconds"] = time.time() - t
    metrics["eval_routing"] = cfg.eval_routing
    if val_ex:
        metrics["validation"] = evaluate(model, tokenizer, val_ex, **eval_kw)
        print(f"[hydralora] validation mean accuracy {metrics['validation']['mean_accuracy']:.3f} ({len(val_ex)} examples)")
    if "base" in metrics:
        metrics["mean_gain"] = metrics["adapted"]["mean_accuracy"] - metrics["base"]["mean_accuracy"]
    if "base_validation" in metrics and "validation" in metrics:
        metrics["validation_gain"] = (metrics["validation"]["mean_accuracy"]
                                      - metrics["base_validation"]["mean_accuracy"])
    diag_ex = cap_per_task(test_ex, DIAGNOSTIC_PER_TASK)  # router statistics: means over thousands of tokens a task
    if is_hydra(cfg.method) and uses_router(cfg.method):
        set_routing(model, "token")
        metrics["routing_by_task"] = routing_by_task(model, tokenizer, diag_ex, spec, device)
    if is_hydra(cfg.method):
        metrics.update(specialisation(model, tokenizer, diag_ex, spec, device))
    metrics["total_seconds"] = time.time() - t_start
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    print(format_table(metrics["adapted"], baseline=metrics.get("base")))
    if "mean_gain" in metrics:
        print(f"[hydralora] held-out mean accuracy: base {metrics['base']['mean_accuracy']:.3f} -> adapted "
              f"{metrics['adapted']['mean_accuracy']:.3f} ({metrics['mean_gain']:+.3f})")
    if cfg.report:
        from .report import write_report

        path = write_report(out, metrics, spec)
        print(f"[hydralora] report: {path}")
    print(f"[hydralora] done in {metrics['total_seconds']:.0f} s; adapter in {adapter_dir}")
    return metrics

