"""Configuration of a HydraLoRA adapter (a PEFT config dataclass)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_args

from peft.config import PeftConfig
from peft.utils import PeftType

# Every adapter choice is defined once, here; the tuples, validation messages and CLI choices derive from these.
RoutingMode = Literal["token", "sequence", "fixed"]
RouterInput = Literal["x", "lora_a"]
BalanceLoss = Literal["switch", "cv2"]
InitB = Literal["zeros", "rlora", "svd"]
InitA = Literal["kaiming", "svd"]
Bias = Literal["none", "all", "hydralora_only"]

ROUTING_MODES: tuple[str, ...] = get_args(RoutingMode)
ROUTER_INPUTS: tuple[str, ...] = get_args(RouterInput)
BALANCE_LOSSES: tuple[str, ...] = get_args(BalanceLoss)
INIT_B_CHOICES: tuple[str, ...] = get_args(InitB)
INIT_A_CHOICES: tuple[str, ...] = get_args(InitA)
BIAS_CHOICES: tuple[str, ...] = get_args(Bias)


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"HydraLoraConfig.{field_name}={value!r} is invalid: {allowed}.")


@dataclass
class HydraLoraConfig(PeftConfig):
    """Configuration for HydraLoRA: one shared A (r x k), N experts B_i (d x r) and a softmax router.

    y = W0 x + (lora_alpha / r) * sum_i w_i(x) B_i A dropout(x),   w(x) = softmax(W_g x / temperature)

    `num_experts="auto"` is a placeholder that the training recipe resolves from the corpus
    (TF-IDF + K-means, see `hydralora.clustering`) before the adapter is built.
    """

    r: int = field(default=8, metadata={"help": "Rank of the shared A matrix and of every expert B_i."})
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator: the update is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input x (0 <= p < 1)."})
    num_experts: Union[int, str] = field(
        default=3,
        metadata={"help": "Number N of B experts, or 'auto' to have the training recipe find N from the corpus."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names to adapt: a list (exact names or name suffixes), a regex string, or 'all-linear' "
            "(every Linear/Conv1D layer except the output head). None uses PEFT's default for the architecture."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (list or regex) to leave untouched even if target_modules match."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True if the base layer stores its weight as (in, out), like GPT-2's Conv1D. Set automatically."},
    )
    bias: Bias = field(default="none", metadata={"help": "Bias to train: 'none', 'all' or 'hydralora_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules (e.g. a classifier head) to train fully and save with the adapter."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers') used with layers_to_transform."}
    )
    shared_a: bool = field(
        default=True,
        metadata={"help": "True: one A shared by all experts (HydraLoRA). False: N separate A_i (the paper's 'w/o hydra' ablation, LoRA-MoE)."},
    )
    router_input: RouterInput = field(
        default="x",
        metadata={"help": "What the router W_g reads: 'x' (the layer input, as the authors' code) or 'lora_a' (A x, as the paper's text)."},
    )
    router_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the router (> 0)."})
    top_k: Optional[int] = field(
        default=None, metadata={"help": "Keep only the top-k gate weights per token and renormalise; None = dense."}
    )
    balance_loss: BalanceLoss = field(
        default="switch",
        metadata={"help": "Router load-balancing loss: 'switch' (N * sum_i f_i P_i) or 'cv2' (squared coefficient of variation of expert importance)."},
    )
    balance_loss_coef: float = field(
        default=0.0, metadata={"help": "Coefficient of the balance loss added to the model loss in training; 0 disables it."}
    )
    init_b: InitB = field(
        default="zeros",
        metadata={
            "help": "'zeros' (LoRA's init), 'rlora' (random non-zero experts) or 'svd' (expert i starts on its own "
            "block of W0's left singular vectors, disjoint from the other experts', as Ortho-Hydra, arXiv 2605.03252, "
            "and GOAT's SVD-segment init). The non-zero inits keep frozen copies of the initial A and B and subtract "
            "their update, so the adapted model equals the base at step 0 and W0 is never modified."
        },
    )
    init_a: InitA = field(
        default="kaiming",
        metadata={
            "help": "'kaiming' (LoRA's A init) or 'svd': the shared A starts on W0's top-r right singular vectors, "
            "scaled to Kaiming's norm (with a non-zero init_b its frozen copy cancels the initial update)."
        },
    )
    init_b_std: float = field(default=0.02, metadata={"help": "Standard deviation of the random expert init when init_b='rlora'."})
    expert_dropout: bool = field(
        default=False, metadata={"help": "Draw an independent dropout mask per expert (R-LoRA) instead of one shared mask."}
    )
    route_target_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the routing-target loss: cross-entropy between each sequence's mean gate and its "
            "target expert (the `route_labels` passed to forward, e.g. the corpus cluster of the example), "
            "averaged over layers and added to the training loss. 0 disables it; the training recipe decays it "
            "to 0 over the first `route_target_ratio` of training (hydralora.set_route_target_weight)."
        },
    )
    expert_ortho_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the expert-diversity penalty: the mean squared cosine similarity between the "
            "experts' flattened B_i (net of a non-zero init), averaged over layers and added to the training "
            "loss. 0 disables it."
        },
    )
    masked_experts: list[int] = field(
        default_factory=list,
        metadata={"help": "Expert indices dropped at inference, the gate renormalised over the rest (LoPE)."},
    )
    routing: RoutingMode = field(
        default="token",
        metadata={"help": "Routing mode the adapter starts in when built or loaded: 'token', 'sequence' or 'fixed' (uses fixed_gate)."},
    )
    fixed_gate: Optional[Union[str, int, list[float]]] = field(
        default=None,
        metadata={"help": "Gate for routing='fixed': 'mean' (uniform, the 'w/o gate' ablation), an expert index, or N weights."},
    )
    track_usage: bool = field(default=True, metadata={"help": "Accumulate per-layer expert usage statistics while running."})
    auto_n: Optional[dict] = field(
        default=None, metadata={"help": "Record of how num_experts was chosen from the corpus (method, scores per K)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.HYDRALORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.validate()

    @property
    def resolved(self) -> bool:
        return not isinstance(self.num_experts, str)

    def validate(self) -> None:
        """Raise ValueError naming the field, the value and what is allowed."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            _fail("r", self.r, "must be an integer >= 1")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not (
            math.isfinite(self.lora_alpha) and self.lora_alpha > 0
        ):
            _fail("lora_alpha", self.lora_alpha, "must be a finite number > 0")
        if not isinstance(self.lora_dropout, (int, float)) or not (0.0 <= self.lora_dropout < 1.0):
            _fail("lora_dropout", self.lora_dropout, "must be a number with 0 <= p < 1")
        if isinstance(self.num_experts, str):
            if self.num_experts != "auto":
                _fail("num_experts", self.num_experts, "must be an integer >= 1 or the string 'auto'")
        elif isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
            _fail("num_experts", self.num_experts, "must be an integer >= 1 or the string 'auto'")
        if self.router_input not in ROUTER_INPUTS:
            _fail("router_input", self.router_input, f"allowed values are {ROUTER_INPUTS}")
        if not isinstance(self.router_temperature, (int, float)) or not (
            math.isfinite(self.router_temperature) and self.router_temperature > 0
        ):
            _fail("router_temperature", self.router_temperature, "must be a finite number > 0")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
                _fail("top_k", self.top_k, "must be None or an integer >= 1")
            if self.resolved and self.top_k > self.num_experts:
                _fail("top_k", self.top_k, f"must be <= num_experts ({self.num_experts})")
        if self.routing not in ROUTING_MODES:
            _fail("routing", self.routing, f"allowed values are {ROUTING_MODES}")
        if self.routing == "fixed" and self.fixed_gate is None:
            _fail("fixed_gate", self.fixed_gate, "routing='fixed' needs a gate: 'mean', an expert index or N weights")
        if self.balance_loss not in BALANCE_LOSSES:
            _fail("balance_loss", self.balance_loss, f"allowed values are {BALANCE_LOSSES}")
        if not isinstance(self.balance_loss_coef, (int, float)) or not (
            math.isfinite(self.balance_loss_coef) and self.balance_loss_coef >= 0
        ):
            _fail("balance_loss_coef", self.balance_loss_coef, "must be a finite number >= 0 (0 disables the loss)")
        if self.init_b not in INIT_B_CHOICES:
            _fail("init_b", self.init_b, f"allowed values are {INIT_B_CHOICES}")
        if self.init_a not in INIT_A_CHOICES:
            _fail("init_a", self.init_a, f"allowed values are {INIT_A_CHOICES}")
        for name in ("route_target_coef", "expert_ortho_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                _fail(name, value, "must be a finite number >= 0 (0 disables it)")
        if not isinstance(self.init_b_std, (int, float)) or not (self.init_b_std > 0):
            _fail("init_b_std", self.init_b_std, "must be a number > 0")
        if self.bias not in BIAS_CHOICES:
            _fail("bias", self.bias, f"allowed values are {BIAS_CHOICES}")
        masked = list(self.masked_experts or [])
        if any(isinstance(i, bool) or not isinstance(i, int) for i in masked):
            _fail("masked_experts", self.masked_experts, "must be a list of integer expert indices")
        if self.resolved:
            bad = [i for i in masked if not 0 <= i < self.num_experts]
            if bad:
                _fail("masked_experts", self.masked_experts, f"indices must lie in [0, {self.num_experts - 1}]")
            if len(set(masked)) >= self.num_experts:
                _fail("masked_experts", self.masked_experts, "must leave at least one expert unmasked")
        if not self.shared_a and (self.init_b != "zeros" or self.init_a != "kaiming" or self.expert_dropout):
            _fail("shared_a", self.shared_a, "a non-zero init_b, init_a='svd' and expert_dropout need the shared A "
                  "(shared_a=True)")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            _fail("layers_to_transform", self.layers_to_transform, "cannot be used when target_modules is a regex string")
        self.masked_experts = masked

    def resolve_num_experts(self, n: int, record: Optional[dict] = None) -> "HydraLoraConfig":
        """Fix num_experts='auto' to a found N (and keep how it was found), then re-validate."""
        self.num_experts = int(n)
        if record is not None:
            self.auto_n = dict(record)
        self.validate()
        return self

