"""The training recipe's configuration: one flat YAML whose keys are TrainConfig or HydraLoraConfig field names."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union, get_args

import yaml

from ..clustering.methods import AUTO_N_METHODS, AutoNMethod
from ..tuner.config import ROUTING_MODES, HydraLoraConfig, RoutingMode

# Every recipe choice is defined once, here; the tuples, validation messages and CLI choices derive from these.
Method = Literal["hydralora", "lora", "lora-split", "hydralora-uniform", "lora-moe", "lope", "thanora", "meta-lora"]
Schedule = Literal["auto", "cpu", "gpu"]
Device = Literal["auto", "cpu", "cuda"]

METHODS: tuple[str, ...] = get_args(Method)
STAGED_METHODS = ("lope", "thanora", "meta-lora")  # trained by their own stages (hydralora.recipes.methods)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
DEVICES: tuple[str, ...] = get_args(Device)
# The run record: the resolved recipe, saved beside the adapter so `hydralora eval` / `export` find its model and data.
RUN_FILE = "hydralora_run.json"
# Adapter fields a YAML may set (HydraLoraConfig's own; "lora" uses the LoRA subset r/lora_alpha/lora_dropout/...).
ADAPTER_FIELDS = tuple(
    f.name for f in fields(HydraLoraConfig)
    if f.name not in {"peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "task_type"}
)
# Per schedule: values used for the fields the user left unset (None). The CPU schedule scores the whole held-out
# split (eval_max_per_task 0): the first rows of a task are not a sample of it, and the shared-prompt scoring of
# multiple choice keeps the whole split within the schedule's time. The CPU schedule's 200 steps assume bf16 (a CPU
# with native bf16 runs a step in about half the fp32 time); training in fp32 it takes CPU_FP32_MAX_STEPS, the same
# minutes.
SCHEDULE_DEFAULTS = {
    "cpu": {"max_steps": 200, "eval_max_per_task": 0, "per_device_batch_size": 8, "max_seq_length": 192},
    "gpu": {"max_steps": 600, "eval_max_per_task": 100, "per_device_batch_size": 16, "max_seq_length": 512},
}
CPU_FP32_MAX_STEPS = 110


@dataclass
class TrainConfig:
    """Everything `hydralora train` needs besides the adapter fields (which are HydraLoraConfig's)."""

    model: str = field(default="smollm2", metadata={"help": "'smollm2' (packaged SmolLM2-135M-Instruct), a local HF folder, or a hub id."})
    data: str = field(default="bundled", metadata={"help": "'bundled' (BIG-bench mixture shipped with the package) or a data file/folder."})
    eval_data: Optional[str] = field(default=None, metadata={"help": "Held-out data; None = the 'test' split of `data`."})
    method: Method = field(default="hydralora", metadata={"help": f"One of {METHODS}."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Run directory; None = runs/<method>-<time>. Never overwritten unless resume."})
    schedule: Schedule = field(default="auto", metadata={"help": "'cpu' (8 min on 2 cores with native bf16, 11 without, all included), 'gpu' (full), or 'auto' (by device)."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate (AdamW)."})
    per_device_batch_size: Optional[int] = field(default=None, metadata={"help": "Batch size per device (None: schedule)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_steps: Optional[int] = field(default=None, metadata={"help": "Optimizer steps (None: schedule)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps with linear warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    loraplus_lr_ratio: Optional[float] = field(default=None, metadata={"help": "LoRA+: B (for HydraLoRA every expert's B, for LoRA its B) learns at this multiple of learning_rate (peft.optimizers.create_loraplus_optimizer; about 16); null: one learning rate for all."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    max_seq_length: Optional[int] = field(default=None, metadata={"help": "Tokens per example; the prompt is cut from the left."})
    group_by_length: bool = field(default=False, metadata={"help": "Batch training examples of similar length (transformers' length-grouped sampler): fewer padded tokens, so faster steps where a step's cost follows its tokens, as on a CPU; its batches are mostly of one task (docs/results.md measures the trade)."})
    seed: int = field(default=42, metadata={"help": "Seed for init, data order and dropout."})
    logging_steps: int = field(default=5, metadata={"help": "Log every N steps (TensorBoard + log_history)."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N steps (resume with --resume)."})
    resume: bool = field(default=False, metadata={"help": "Resume from the last checkpoint in output_dir."})
    bf16: Union[bool, str] = field(default="auto", metadata={"help": "bf16 autocast for training (and, on a CPU, scoring): true/false/'auto' (a CUDA GPU with bf16, or a CPU with native bf16: AVX512-BF16 or AMX)."})
    response_logits_only: bool = field(default=True, metadata={"help": "Project onto the vocabulary only the positions whose next token is scored (same loss, far smaller logits); the full path where the model's forward lacks logits_to_keep."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Non-reentrant activation checkpointing."})
    use_chat_template: bool = field(default=False, metadata={"help": "Render prompts with the tokenizer's chat template."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip malformed data rows (counted) instead of failing."})
    auto_n_method: Optional[AutoNMethod] = field(default=None, metadata={"help": f"Method for num_experts='auto': one of {AUTO_N_METHODS} (None: the clustering default)."})
    auto_n_k_max: int = field(default=10, metadata={"help": "Largest K tried for num_experts='auto'."})
    validation_per_task: int = field(default=0, metadata={"help": "Training examples per task held out as a validation set (never trained on) and scored at the end next to the test set, for choosing settings without the test split; 0: none."})
    route_target_ratio: float = field(default=0.3, metadata={"help": "Share of the training steps over which the routing-target loss (route_target_coef) decays linearly to 0; its targets are the K-means clusters of the training prompts (K = num_experts)."})
    eval_max_per_task: Optional[int] = field(default=None, metadata={"help": "Held-out examples per task (None: schedule; 0: all)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size for evaluation."})
    max_new_tokens: int = field(default=24, metadata={"help": "Generation budget for generative tasks."})
    eval_routing: RoutingMode = field(default="token", metadata={"help": f"Routing for evaluation: one of {ROUTING_MODES} (fixed: the mean gate)."})
    eval_base: bool = field(default=True, metadata={"help": "Also evaluate the base model (adapter disabled)."})
    report: bool = field(default=True, metadata={"help": "Write report.md with plots."})
    device: Device = field(default="auto", metadata={"help": f"One of {DEVICES}."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4-bit NF4 (bitsandbytes, CUDA only) and prepare it with peft's prepare_model_for_kbit_training."})
    # LoPE (method 'lope'): num_experts normal experts plus one poisoning expert, masked at inference.
    lope_poison_steps: Optional[int] = field(default=None, metadata={"help": "LoPE stage one: steps training the poisoning expert on generated noisy data (None: max_steps // 4); stage two then runs max_steps on the clean data."})
    lope_char_noise: float = field(default=0.05, metadata={"help": "LoPE stage one: share of prompt characters perturbed (swapped, inserted before or deleted) in the generated noisy data, in (0, 1]."})
    lope_embedding_noise: float = field(default=0.0, metadata={"help": "LoPE stage one: Gaussian noise on the input embeddings, std as a share of their RMS (0: off)."})
    lope_orthogonal_coef: float = field(default=0.1, metadata={"help": "LoPE stage two: weight of the mean squared cosine between each normal expert's B and the frozen poisoning expert's (0: off)."})
    # ThanoRA (method 'thanora'): a plain LoRA of rank r split into per-task subspaces.
    thanora_ortho_coef: float = field(default=0.1, metadata={"help": "ThanoRA: weight of the regulariser keeping the tasks' subspaces apart (mean squared cross-task cosine of A's rows and B's columns; 0: off)."})
    thanora_init_examples: int = field(default=64, metadata={"help": "ThanoRA: training examples per task whose layer inputs size and build the task subspaces at init."})
    # MeTA-LoRA (method 'meta-lora'): max_steps meta steps, each over every task.
    meta_lora_inner_steps: int = field(default=1, metadata={"help": "MeTA-LoRA stage one: SGD steps adapting each task's copy of the shared LoRA on its support batches."})
    meta_lora_inner_lr: Optional[float] = field(default=None, metadata={"help": "MeTA-LoRA stage one: learning rate of the task adaptation steps (None: learning_rate)."})
    meta_lora_support_size: int = field(default=4, metadata={"help": "MeTA-LoRA: examples per support batch of a task (stage one)."})
    meta_lora_query_size: int = field(default=4, metadata={"help": "MeTA-LoRA: examples in a task's query batch, whose gradient stage two aggregates."})


@dataclass
class RunSpec:
    """A resolved recipe: training fields plus the adapter fields for the method."""

    train: TrainConfig
    adapter: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.train), **self.adapter}


# The recipe's adapter defaults: a sharper router than the library's (temperature 0.1 breaks the experts' symmetry;
# docs/results.md), N from the corpus, every linear layer.
DEFAULT_ADAPTER = {
    "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "num_experts": "auto", "target_modules": "all-linear",
    "balance_loss_coef": 0.0, "router_temperature": 0.1,
}


TEXT_FIELDS = {
    "model", "data", "eval_data", "output_dir", "method", "schedule", "lr_scheduler_type", "device", "eval_routing",
    "auto_n_method", "bias", "router_input", "balance_loss", "init_b", "routing",
}


def _coerce(name: str, value: Any, current: Any) -> Any:
    """Command-line override strings -> the type of the field's current value."""
    if not isinstance(value, str):
        return value
    if isinstance(current, bool) or name in {"resume", "gradient_checkpointing", "response_logits_only", "use_chat_template", "skip_bad_rows", "report", "eval_base", "expert_dropout", "shared_a", "track_usage", "load_in_4bit", "group_by_length"}:
        if value.lower() in {"true", "1", "yes"}:
            return True
        if value.lower() in {"false", "0", "no"}:
            return False
        if name == "bf16" and value == "auto":
            return value
        raise ValueError(f"{name}={value!r} is invalid: expected true or false.")
    if name in TEXT_FIELDS:
        return value
    for cast in (int, float):  # YAML 1.1 reads "5e-4" as a string
        try:
            return cast(value)
        except ValueError:
            pass
    return yaml.safe_load(value)


def build_spec(overrides: Optional[dict[str, Any]] = None, config_file: Optional[str] = None) -> RunSpec:
    """Defaults <- YAML file <- command-line overrides. Unknown keys raise naming the key and what is allowed."""
    values: dict[str, Any] = {}
    if config_file:
        if not os.path.isfile(config_file):
            raise ValueError(f"--config {config_file!r}: no such file.")
        try:
            with open(config_file, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"--config {config_file}: not valid YAML{where}: {problem}.") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"--config {config_file}: not UTF-8 text (byte {err.start}: {err.reason}).") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of field names to values, got {type(loaded).__name__}.")
        values.update(loaded)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    train_names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - train_names - set(ADAPTER_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown}{' in ' + config_file if config_file else ''}: allowed are the "
            f"TrainConfig fields {sorted(train_names)} and the HydraLoraConfig fields {sorted(ADAPTER_FIELDS)}."
        )
    defaults = TrainConfig()
    train_kwargs = {k: _coerce(k, v, getattr(defaults, k)) for k, v in values.items() if k in train_names}
    train = TrainConfig(**train_kwargs)
    adapter = dict(DEFAULT_ADAPTER)
    adapter.update({k: _coerce(k, v, adapter.get(k)) for k, v in values.items() if k in ADAPTER_FIELDS})
    validate(train)
    validate_adapter(train.method, adapter)
    return RunSpec(train=train, adapter=adapter)


def validate_adapter(method: str, adapter: dict[str, Any]) -> None:
    """Build the method's PEFT config once, so a bad adapter field fails before any model or data is loaded."""
    from .methods import peft_config_for

    if method == "lora":  # LoraConfig checks these only when the layers are built
        r, dropout = adapter.get("r"), adapter.get("lora_dropout", 0.0)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r={r!r} is invalid: must be an integer >= 1.")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"lora_dropout={dropout!r} is invalid: must be a number with 0 <= p < 1.")
    try:
        peft_config_for(method, dict(adapter))
    except TypeError as err:  # a value of the wrong type that the config's own checks did not catch
        raise ValueError(f"adapter fields for method={method!r} are invalid: {err}.") from None


def validate(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r} is invalid: allowed are {METHODS}.")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule={cfg.schedule!r} is invalid: allowed are {SCHEDULES}.")
    if cfg.eval_routing not in ROUTING_MODES:
        raise ValueError(f"eval_routing={cfg.eval_routing!r} is invalid: allowed are {ROUTING_MODES}.")
    if cfg.auto_n_method is not None and cfg.auto_n_method not in AUTO_N_METHODS:
        raise ValueError(f"auto_n_method={cfg.auto_n_method!r} is invalid: allowed are {AUTO_N_METHODS} or null.")
    for name in ("max_steps", "per_device_batch_size", "max_seq_length"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1.")
    for name in ("gradient_accumulation_steps", "eval_batch_size", "logging_steps", "save_steps", "max_new_tokens"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1.")
    if not isinstance(cfg.group_by_length, bool):
        raise ValueError(f"group_by_length={cfg.group_by_length!r} is invalid: expected true or false.")
    if isinstance(cfg.auto_n_k_max, bool) or not isinstance(cfg.auto_n_k_max, int) or cfg.auto_n_k_max < 3:
        raise ValueError(f"auto_n_k_max={cfg.auto_n_k_max!r} is invalid: must be an integer >= 3 (K is tried from 2).")
    ratio = cfg.warmup_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"warmup_ratio={ratio!r} is invalid: a share of the steps, 0 <= warmup_ratio < 1.")
    if isinstance(cfg.weight_decay, bool) or not isinstance(cfg.weight_decay, (int, float)) or cfg.weight_decay < 0:
        raise ValueError(f"weight_decay={cfg.weight_decay!r} is invalid: must be a number >= 0.")
    if not (isinstance(cfg.learning_rate, (int, float)) and cfg.learning_rate > 0):
        raise ValueError(f"learning_rate={cfg.learning_rate!r} is invalid: must be a number > 0.")
    ratio = cfg.loraplus_lr_ratio
    if ratio is not None and not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0):
        raise ValueError(f"loraplus_lr_ratio={ratio!r} is invalid: must be a number > 0 (LoRA+ uses about 16), or null.")
    if isinstance(cfg.validation_per_task, bool) or not isinstance(cfg.validation_per_task, int) or cfg.validation_per_task < 0:
        raise ValueError(f"validation_per_task={cfg.validation_per_task!r} is invalid: must be an integer >= 0.")
    ratio = cfg.route_target_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio <= 1):
        raise ValueError(f"route_target_ratio={ratio!r} is invalid: must be a number with 0 < ratio <= 1.")
    if cfg.device not in DEVICES:
        raise ValueError(f"device={cfg.device!r} is invalid: allowed are {DEVICES}.")
    _validate_method_fields(cfg)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_method_fields(cfg: TrainConfig) -> None:
    """The fields of the staged methods (LoPE, ThanoRA, MeTA-LoRA)."""
    if cfg.method in STAGED_METHODS and cfg.resume:
        raise ValueError(f"resume=True is invalid with method={cfg.method!r}: its stages restart from the beginning; "
                         "use a new output_dir.")
    steps = cfg.lope_poison_steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"lope_poison_steps={steps!r} is invalid: must be an integer >= 1, or null.")
    for name in ("thanora_init_examples", "meta_lora_inner_steps", "meta_lora_support_size", "meta_lora_query_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1.")
    if not (_number(cfg.lope_char_noise) and 0 < cfg.lope_char_noise <= 1):
        raise ValueError(f"lope_char_noise={cfg.lope_char_noise!r} is invalid: must be a number in (0, 1].")
    for name in ("lope_embedding_noise", "lope_orthogonal_coef", "thanora_ortho_coef"):
        value = getattr(cfg, name)
        if not (_number(value) and value >= 0):
            raise ValueError(f"{name}={value!r} is invalid: must be a number >= 0.")
    lr = cfg.meta_lora_inner_lr
    if lr is not None and not (_number(lr) and lr > 0):
        raise ValueError(f"meta_lora_inner_lr={lr!r} is invalid: must be a number > 0, or null.")


def apply_schedule(cfg: TrainConfig, on_gpu: bool, bf16: bool = True) -> str:
    """Fill the fields left unset from the CPU or GPU schedule; returns the schedule used. ``bf16``: whether the run
    trains in bf16 (the CPU schedule takes fewer steps in fp32, to keep its minutes)."""
    schedule = cfg.schedule if cfg.schedule != "auto" else ("gpu" if on_gpu else "cpu")
    defaults = dict(SCHEDULE_DEFAULTS[schedule])
    if schedule == "cpu" and not bf16:
        defaults["max_steps"] = CPU_FP32_MAX_STEPS
    for key, value in defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    return schedule
