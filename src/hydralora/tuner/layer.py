"""The HydraLoRA layer: wraps a frozen Linear/Conv1D and adds sum_i w_i(x) B_i A x in one stacked GEMM."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from transformers.pytorch_utils import Conv1D

from ..compile_check import check_training_compile
from ..ops import FusedPlan, base_hooked, dispatch as _dispatch, plan_fused, run_plan, stack_init_offset
from ..ops.dispatch import fused_switch
from ..ops.fused import SMALL_CALL_TOKENS, capturing as _capturing
from ..ops.reference import add_usage, flat_B as _flat_B
from ..ops.project import dropout_project, use_dropout_project
from .config import BalanceLoss, HydraLoraConfig

_NO_PLAN_YET = object()  # a layer state whose fused plan has not been decided

MERGE_UNDER_TOKEN_ROUTING = (
    "HydraLoRA cannot merge under token routing: the gate w(x) differs for every token, so sum_i w_i(x) B_i A "
    "is not one fixed matrix. Choose a fixed gate first: hydralora.merge_and_unload(model, gate='mean' | expert "
    "index | [w_1, ..., w_N]) or hydralora.set_routing(model, 'fixed', gate) followed by merge_adapter()."
)


MERGE_INTO_QUANTIZED = (
    "HydraLoRA cannot merge into a quantized base layer ({kind}, weight dtype {dtype}): adding the update to 4-bit "
    "or 8-bit weights would re-quantize them and lose most of it. Export instead: hydralora.export_lora(model, path, "
    "gate) writes a stock LoRA adapter that runs on the same quantized base; or merge into the base loaded "
    "unquantized: `hydralora export ADAPTER OUT --merge --gate mean` (it loads the base in full precision)."
)


def balance_loss(probs: torch.Tensor, kind: BalanceLoss, top_k: Optional[int] = None,
                 weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Load-balancing loss of router probabilities `probs` (T, N), fp32, over the tokens whose `weights` (T,) are 1
    (a 0/1 real-token mask, any dtype; None: every token).

    'switch': N * sum_i f_i P_i (Switch Transformer), f_i = share of tokens dispatched to expert i (its top-k),
    P_i = mean router probability. 'cv2': squared coefficient of variation of the experts' importance
    (sum of gate weights), the form in the authors' repository. The mask weighs the sums instead of selecting
    rows: boolean indexing would wait for the device (a sync per adapted layer and step).
    """
    n = probs.shape[-1]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    w = None if weights is None else weights.reshape(-1, 1).to(probs.dtype)  # (T, 1)

    def total(t: torch.Tensor) -> torch.Tensor:  # (T, N) -> (N,): summed over the counted tokens
        return t.sum(0) if w is None else (t * w).sum(0)

    if kind == "switch":
        k = top_k or 1
        count = probs.shape[0] if w is None else w.sum().clamp_min(1.0)  # () counted tokens (none: the sums are 0)
        chosen = probs.topk(k, dim=-1).indices  # (T, k)
        dispatch = torch.zeros_like(probs).scatter_(-1, chosen, 1.0 / k)  # (T, N)
        f = total(dispatch) / count  # (N,)
        p = total(probs) / count  # (N,)
        return n * (f * p).sum()
    importance = total(probs)  # (N,)
    if n == 1:
        return importance.sum() * 0.0
    return importance.var() / (importance.mean() ** 2 + 1e-10)


class HydraLoraLayer(BaseTunerLayer):
    """State and maths shared by every HydraLoRA-wrapped layer (one entry per adapter name)."""

    adapter_layer_names = ("hydralora_A", "hydralora_B", "hydralora_router")
    other_param_names = ("r", "lora_alpha", "scaling", "num_experts", "hydralora_dropout", "hydralora_init", "hconfig")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.num_experts: dict[str, int] = {}
        self.hconfig: dict[str, HydraLoraConfig] = {}
        self.hydralora_A = nn.ParameterDict({})  # (r, k); (N*r, k) for the LoRA-MoE ablation
        self.hydralora_B = nn.ParameterDict({})  # (N, d, r): one stacked tensor for all experts
        self.hydralora_router = nn.ParameterDict({})  # (N, k) or (N, r)
        # R-LoRA: frozen copies of the initial A and B, subtracted so the model starts equal to the base.
        self.hydralora_init = BufferDict({}, persistent=True)
        self.hydralora_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        # Routing state (not saved): see hydralora.routing.set_routing.
        self.routing_mode = "token"
        self.fixed_gate: Optional[torch.Tensor] = None
        self._token_mask: Optional[torch.Tensor] = None  # (B, T) real-token mask set by the model hook
        self._reuse_sequence_gate = False  # True on decode steps: reuse the prompt's gate
        self._sequence_gate: dict[str, torch.Tensor] = {}  # name -> (B, N)
        self._recording = True  # False while checkpointed segments are recomputed in backward
        self.last_aux_loss: dict[str, Optional[torch.Tensor]] = {}
        self.last_route_loss: dict[str, Optional[torch.Tensor]] = {}
        self._route_labels: Optional[torch.Tensor] = None  # (B,) target expert per sequence, set by the model hook
        # name -> (N + 1,) fp32 on the device: summed gate weights, then the tokens of masked calls; one tensor so
        # that the fused kernel can add both in place (hydralora.ops.fused)
        self.usage_acc: dict[str, torch.Tensor] = {}
        self._usage_views: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (acc[:N], acc[N]), made once
        self._usage_tokens_host: dict[str, float] = {}  # name -> tokens seen in unmasked calls (no kernel to count)
        self._weight_cache: dict[str, tuple] = {}  # derived weights reused while no graph is recorded
        self._fused_plans: dict[tuple, Optional[FusedPlan]] = {}  # the fused dispatch's decisions (_fused_plan)

        base = self.get_base_layer()
        if isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
        elif hasattr(base, "in_features") and hasattr(base, "out_features"):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            in_f, out_f = _get_in_out_features(base)
            if in_f is None:
                raise TypeError(f"HydraLoRA cannot wrap {type(base).__name__}: only Linear-like layers are supported.")
            self.in_features, self.out_features = in_f, out_f

    # ----------------------------------------------------------------------------------------------------------
    # creation
    def update_layer(self, adapter_name: str, config: HydraLoraConfig, inference_mode: bool = False) -> None:
        if not config.resolved:
            raise ValueError(
                "HydraLoraConfig.num_experts='auto' must be resolved to an integer before the adapter is built: "
                "use `hydralora train` (which finds N from the corpus) or hydralora.clustering.resolve_num_experts."
            )
        self._fused_plans.clear()
        r, n = config.r, config.num_experts
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.num_experts[adapter_name] = n
        self.hconfig[adapter_name] = config
        p = config.lora_dropout
        self.hydralora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        a_rows = r if config.shared_a else n * r  # LoRA-MoE ablation: N separate A_i stacked along the rank
        router_in = self.in_features if config.router_input == "x" else a_rows
        self.hydralora_A[adapter_name] = nn.Parameter(torch.empty(a_rows, self.in_features))
        # (N, d, r), stored as (d, N, r): the (d, N*r) matrix every expert's GEMM reads is then a view of B, not a
        # copy per call, and its gradient arrives in B's own layout (no copy by autograd either)
        self.hydralora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, n, r).permute(1, 0, 2))
        self.hydralora_router[adapter_name] = nn.Parameter(torch.empty(n, router_in))
        self.reset_parameters(adapter_name)
        self.last_aux_loss[adapter_name] = None
        self.last_route_loss[adapter_name] = None
        self.routing_mode = config.routing
        self.fixed_gate = validate_gate(config.fixed_gate, n) if config.routing == "fixed" else None
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str) -> None:
        cfg = self.hconfig[adapter_name]
        A, B, W_g = self.hydralora_A[adapter_name], self.hydralora_B[adapter_name], self.hydralora_router[adapter_name]
        n, d, r = B.shape
        svd = None
        if cfg.init_a == "svd" or cfg.init_b == "svd":
            svd = self._base_singular_vectors(adapter_name, r if cfg.init_b != "svd" else n * r)  # U (d, q), Vh (q, k)
        if cfg.init_a == "svd":
            # W0's top-r input directions, rows scaled to the norm of a Kaiming-uniform row (bound 1/sqrt(k))
            A.copy_(svd[1][:r] * math.sqrt(1.0 / 3.0))  # (r, k)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as LoRA's A
        # Router: small init so the initial gate is close to uniform but not exactly (breaks expert symmetry).
        nn.init.kaiming_uniform_(W_g, a=math.sqrt(5))
        W_g.mul_(0.1)
        if cfg.init_b == "zeros":
            nn.init.zeros_(B)
            for key in (adapter_name + "_A", adapter_name + "_B"):
                if key in self.hydralora_init:
                    self.hydralora_init.pop(key)
            return
        if cfg.init_b == "svd":
            # Expert i on its own block of r left singular vectors (disjoint, so the B_i are orthogonal), columns
            # scaled to the norm a N(0, init_b_std^2) column of length d has.
            U = svd[0][:, : n * r].reshape(d, n, r).permute(1, 0, 2)  # (N, d, r)
            B.copy_(U * (cfg.init_b_std * math.sqrt(d)))  # (N, d, r)
        else:
            nn.init.normal_(B, std=cfg.init_b_std)
        self.hydralora_init[adapter_name + "_A"] = A.detach().clone()
        self.hydralora_init[adapter_name + "_B"] = B.detach().clone()

    def _base_singular_vectors(self, adapter_name: str, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-q singular vectors of the frozen W0 (d, k): U (d, q), Vh (q, k), fp32 on W0's device."""
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        if weight is None or not torch.is_floating_point(weight) or weight.is_meta:
            raise ValueError(
                f"HydraLoraConfig.init_a/init_b='svd' needs the base layer's dense weight; {type(base).__name__} has "
                f"{'none' if weight is None else 'a ' + str(weight.dtype) + ' weight on ' + str(weight.device)} "
                "(quantized or meta weights: use init_b='rlora' or 'zeros')."
            )
        W = weight.detach().float()
        W = W.T if isinstance(base, Conv1D) else W  # (d, k)
        if q > min(W.shape):
            raise ValueError(
                f"HydraLoraConfig.init_b='svd' needs num_experts * r = {q} singular directions, but this layer's "
                f"weight is {tuple(W.shape)} (at most {min(W.shape)}): lower r or num_experts, or use init_b='rlora'."
            )
        if q * 4 < min(W.shape):  # randomized SVD: the top q only, fast on large layers
            U, _, V = torch.svd_lowrank(W, q=q + 8, niter=4)  # (d, q+8), (q+8,), (k, q+8)
            return U[:, :q], V[:, :q].T
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)  # (d, m), (m,), (m, k)
        return U[:, :q], Vh[:q]

    def _init_offset(self, adapter_name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        key = adapter_name + "_A"
        if key not in self.hydralora_init:
            return None
        return self.hydralora_init[key], self.hydralora_init[adapter_name + "_B"]

    # ----------------------------------------------------------------------------------------------------------
    # gates
    def _finish_gate(self, adapter_name: str, probs: torch.Tensor) -> torch.Tensor:
        """Top-k and (at inference) masked experts, both renormalised. probs: (..., N) fp32."""
        cfg = self.hconfig[adapter_name]
        if cfg.top_k is not None and cfg.top_k < probs.shape[-1]:
            vals, idx = probs.topk(cfg.top_k, dim=-1)  # (..., k)
            probs = torch.zeros_like(probs).scatter(-1, idx, vals)  # (..., N)
            probs = probs / probs.sum(-1, keepdim=True)
        if cfg.masked_experts and not self.training:
            keep = torch.ones(probs.shape[-1], device=probs.device, dtype=probs.dtype)
            keep[cfg.masked_experts] = 0.0
            probs = probs * keep  # (..., N)
            probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
        return probs

    def _token_probs(self, adapter_name: str, logits: torch.Tensor) -> torch.Tensor:
        """Router softmax in fp32. logits: (..., N) -> (..., N)."""
        dt = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
        t = self.hconfig[adapter_name].router_temperature
        if t != 1.0:
            logits = logits.to(dt) / t
        return torch.softmax(logits, dim=-1, dtype=dt)  # the upcast happens inside the softmax kernel

    def _mask_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The (B, T) real-token mask of the running model call, if it matches x's leading dims."""
        m = self._token_mask
        if m is None or x.dim() != 3 or tuple(m.shape) != tuple(x.shape[:2]):
            return None
        return m if m.device == x.device else m.to(x.device)  # a model split over devices: the mask is on the first

    def _gate(self, adapter_name: str, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gate weights (..., N) fp32 that the layer applies, per the routing mode."""
        n = self.num_experts[adapter_name]
        if self.routing_mode == "fixed":
            gate = self.fixed_gate.to(device=logits.device, dtype=torch.promote_types(logits.dtype, torch.float32))  # (N,)
            return self._finish_gate(adapter_name, gate).expand(*logits.shape[:-1], n)
        probs = self._token_probs(adapter_name, logits)  # (..., N)
        if self.routing_mode == "token":
            return self._finish_gate(adapter_name, probs)
        # sequence: one gate per sequence = mean router weights over the prompt's real tokens
        cached = self._sequence_gate.get(adapter_name)
        if self._reuse_sequence_gate and cached is not None and x.dim() == 3 and cached.shape[0] == x.shape[0]:
            seq = cached  # (B, N)
        else:
            p3 = probs if probs.dim() == 3 else probs.reshape(1, -1, n)  # (B, T, N)
            mask = self._mask_for(x)
            w = torch.ones(p3.shape[:2], device=p3.device) if mask is None else mask.to(p3.dtype)  # (B, T)
            seq = (p3 * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)  # (B, N)
            self._sequence_gate[adapter_name] = seq.detach()
        seq = self._finish_gate(adapter_name, seq)  # (B, N)
        if probs.dim() == 3:
            return seq.unsqueeze(1).expand_as(probs)  # (B, T, N)
        return seq.reshape(n).expand_as(probs)

    @torch.no_grad()
    def route(self, x: torch.Tensor, adapter_name: Optional[str] = None) -> torch.Tensor:
        """The gate weights (..., N) this layer applies to input x (no dropout), in the current routing mode."""
        name = adapter_name or self.active_adapters[0]
        A, W_g = self.hydralora_A[name], self.hydralora_router[name]
        x = self._cast_input_dtype(x, A.dtype)
        src = x if self.hconfig[name].router_input == "x" else F.linear(x, A)  # (..., k) or (..., r)
        logits = F.linear(src, W_g)  # (..., N)
        return self._gate(name, logits, x)

    def expert_delta_weights(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """(alpha / r) B_i A for every expert: (N, out_features, in_features), net of any R-LoRA init offset."""
        name = adapter_name or self.active_adapters[0]
        A, B = self.hydralora_A[name], self.hydralora_B[name]
        if not self.hconfig[name].shared_a:
            return torch.einsum("ndr,nrk->ndk", B, A.view(B.shape[0], B.shape[2], -1)) * self.scaling[name]
        delta = torch.einsum("ndr,rk->ndk", B, A)  # (N, d, k)
        offset = self._init_offset(name)
        if offset is not None:
            A0, B0 = offset
            delta = delta - torch.einsum("ndr,rk->ndk", B0, A0)  # (N, d, k)
        return delta * self.scaling[name]

    def fixed_gate_factors(self, adapter_name: str, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a fixed gate, the update as an ordinary LoRA pair (A', B') with B' A' = sum_i w_i B_i A (unscaled).

        Rank r, or 2r when an R-LoRA init offset is present ([A; A0], [sum w B, -sum w B0]), or N*r for the
        LoRA-MoE ablation ([A_1; ...; A_N], [w_1 B_1, ..., w_N B_N]).
        """
        A, B = self.hydralora_A[adapter_name], self.hydralora_B[adapter_name]
        w = self._finish_gate(adapter_name, gate.to(device=B.device, dtype=torch.float32)).to(B.dtype)  # (N,)
        if not self.hconfig[adapter_name].shared_a:
            return A, _flat_B(w[:, None, None] * B)  # (N*r, k), (d, N*r)
        B_eff = torch.einsum("n,ndr->dr", w, B)  # (d, r)
        offset = self._init_offset(adapter_name)
        if offset is None:
            return A, B_eff
        A0, B0 = offset
        B0_eff = torch.einsum("n,ndr->dr", w, B0.to(B.dtype))  # (d, r)
        return torch.cat([A, A0.to(A.dtype)], 0), torch.cat([B_eff, -B0_eff], 1)  # (2r, k), (d, 2r)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The fixed-gate update in the base weight's layout (Conv1D stores (in, out))."""
        if self.routing_mode != "fixed" or self.fixed_gate is None:
            raise ValueError(MERGE_UNDER_TOKEN_ROUTING)
        A_eff, B_eff = self.fixed_gate_factors(adapter_name, self.fixed_gate)
        delta = (B_eff @ A_eff) * self.scaling[adapter_name]  # (d, k)
        return delta.T if isinstance(self.get_base_layer(), Conv1D) else delta

    # ----------------------------------------------------------------------------------------------------------
    # forward pieces
    def _project(self, adapter_name: str, x: torch.Tensor, A: torch.Tensor,
                 offset: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h = A dropout(x) and the router logits, computed once per token.

        x: (..., k); A: (m, k) with m = r, or 2r with the R-LoRA offset (A0, B0) stacked under it (same mask).
        Returns h (..., m) or (..., N, m) with per-expert dropout, and logits (..., N).
        """
        cfg = self.hconfig[adapter_name]
        W_g = self.hydralora_router[adapter_name]
        drop = self.hydralora_dropout[adapter_name]
        A_own = A if offset is None else self.hydralora_A[adapter_name]  # A proper (A has A0 under it with offset)
        n, m, r = W_g.shape[0], A.shape[0], A_own.shape[0]  # r: rows of A proper
        dropout_active = self.training and not isinstance(drop, nn.Identity)
        if cfg.router_input == "x" and not dropout_active:
            # One GEMM for A and the router: both read the same x.
            srcs = (A_own, W_g, *(offset or ())[:1])
            AW = self._eval_cached(adapter_name + ".AW", srcs, lambda: torch.cat([A, W_g], 0))  # (m+N, k)
            hl = F.linear(x, AW)  # (..., m+N)
            return hl[..., :m], hl[..., m:]
        if cfg.expert_dropout and dropout_active:
            xe = drop(x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]))  # (..., N, k): one mask per expert
            h = F.linear(xe, A)  # (..., N, m)
            src = x if cfg.router_input == "x" else F.linear(x, A[:r])  # (..., k) or (..., r)
            return h, F.linear(src, W_g)  # (..., N, m), (..., N)
        if cfg.router_input == "x" and isinstance(drop, nn.Dropout) and use_dropout_project(x):
            # Keeps x and the mask for backward, not also the dropped copy of x (hydralora.ops.project).
            return dropout_project(x, A, W_g, drop.p)  # (..., m), (..., N)
        h = F.linear(drop(x), A)  # (..., m)
        src = x if cfg.router_input == "x" else h[..., :r]  # (..., k) or (..., r)
        return h, F.linear(src, W_g)  # (..., m), (..., N)

    def _record(self, adapter_name: str, logits: torch.Tensor, gate: torch.Tensor, x: torch.Tensor,
                counted: bool = False) -> None:
        """Aux balance loss (training) and usage statistics, over real tokens only (`counted`: the fused kernel has
        added this call's usage already, see _usage_target).

        A non-reentrant checkpoint recompute runs this again in backward: it must save the same tensors, so the
        loss is recomputed, but neither it nor the usage is stored a second time (`_recording` is False then).
        """
        cfg = self.hconfig[adapter_name]
        aux = route = None
        if self.training and torch.compiler.is_compiling():
            check_training_compile()  # reduce-overhead (CUDA graphs) crashed training: refused with a clear error
        if self.training and self.routing_mode == "token":
            if cfg.balance_loss_coef > 0:
                n = gate.shape[-1]
                mask = self._mask_for(x)
                probs = self._token_probs(adapter_name, logits).reshape(-1, n)  # (T, N)
                aux = balance_loss(probs, cfg.balance_loss, cfg.top_k, mask)
            if cfg.route_target_coef > 0 and self._route_labels is not None and x.dim() == 3:
                route = self._route_target_loss(adapter_name, logits, x)
        if not self._recording:
            return
        self.last_aux_loss[adapter_name] = aux
        self.last_route_loss[adapter_name] = route
        if cfg.track_usage and not counted:
            self._count_usage(adapter_name, gate, self._mask_for(x))

    def _route_target_loss(self, adapter_name: str, logits: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Cross-entropy between each sequence's mean router probabilities (over its real tokens) and its target
        expert; sequences labelled -1 are left out. logits: (B, T, N) or (B*T, N); x: (B, T, k)."""
        labels = self._route_labels
        b, t = x.shape[:2]
        if labels.shape[0] != b:
            return None
        probs = self._token_probs(adapter_name, logits).reshape(b, t, -1)  # (B, T, N)
        mask = self._mask_for(x)
        w = torch.ones(b, t, device=probs.device, dtype=probs.dtype) if mask is None else mask.to(probs.dtype)  # (B, T)
        seq = (probs * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)  # (B, N)
        labels = labels.to(seq.device)  # on it already (the model hook moves them), unless the model spans devices
        return F.nll_loss(seq.clamp_min(1e-9).log(), labels, ignore_index=-1)  # ()

    def expert_ortho_penalty(self, adapter_name: str) -> torch.Tensor:
        """Mean squared cosine similarity over pairs of experts' flattened B_i (net of a non-zero init): 0 when the
        experts are orthogonal, 1 when they are copies."""
        B = self.hydralora_B[adapter_name]  # (N, d, r)
        offset = self._init_offset(adapter_name)
        if offset is not None:
            B = B - offset[1].to(B.dtype)  # (N, d, r)
        n = B.shape[0]
        if n < 2:
            return B.sum() * 0.0
        u = F.normalize(B.reshape(n, -1).float(), dim=-1, eps=1e-12)  # (N, d*r)
        gram = u @ u.T  # (N, N)
        off = gram - torch.diag_embed(torch.diagonal(gram))  # (N, N), zero diagonal
        return (off ** 2).sum() / (n * (n - 1))

    def _usage_acc_on(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        """The adapter's (N + 1,) usage accumulator on `device` (a fresh one, and a fresh host count, on a move)."""
        acc = self.usage_acc.get(adapter_name)
        if acc is None or acc.device != device:
            n = self.num_experts[adapter_name]
            # Normal tensors even when made under torch.inference_mode (a first generate): an inference tensor, or a
            # view made there, refuses the in-place updates of later calls outside it (training, reset_usage).
            with torch.inference_mode(False):
                acc = self.usage_acc[adapter_name] = torch.zeros(n + 1, device=device, dtype=torch.float32)
                self._usage_views[adapter_name] = (acc[:n], acc[n])  # made once: a slice per call costs host time
            self._usage_tokens_host.pop(adapter_name, None)
        return acc

    def _usage_target(self, adapter_name: str, x: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """For the fused op: (usage accumulator, token mask or None) when this call's usage is to be counted, else
        (None, None). The op adds the gate sums and the token count on the device: no host work per call."""
        if not (self._recording and self.hconfig[adapter_name].track_usage):
            return None, None
        return self._usage_acc_on(adapter_name, x.device), self._mask_for(x)

    def _add_tokens(self, adapter_name: str, tokens: int, x: torch.Tensor) -> None:
        """Count an unmasked call's tokens: on the host (no kernel), or on the device where a host count would go
        wrong: inside a torch.compile trace (a host float is a guard: every call would recompile) and while a CUDA
        graph is captured (its replays run no Python: a host count would stay at the capture's)."""
        if torch.compiler.is_compiling() or _capturing(x.device):
            self._usage_views[adapter_name][1].add_(tokens)
        else:
            self._usage_tokens_host[adapter_name] = self._usage_tokens_host.get(adapter_name, 0.0) + tokens

    def _count_usage(self, adapter_name: str, gate: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Add a call's gate weights to the usage statistics: summed over real tokens (mask (B, T) or None)."""
        n = gate.shape[-1]
        with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
            # Weighted sums, not boolean indexing (no device sync); an unmasked call's token count: _add_tokens.
            self._usage_acc_on(adapter_name, gate.device)
            sums, count = self._usage_views[adapter_name]  # (N,), ()
            if mask is None:
                sums.add_(gate.sum(tuple(range(gate.dim() - 1))))  # (N,): one reduction, no reshape
                self._add_tokens(adapter_name, gate.numel() // n, gate)
                return
            add_usage(sums, count, gate.reshape(-1, n), mask)  # (N,) and () in place, weighted by the mask

    def hydra_delta(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + (alpha/r) sum_i w_i B_i A dropout(x), all experts in one GEMM. x: (..., k), result: (..., d)."""
        A = self.hydralora_A[adapter_name]  # (r, k)
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast every GEMM below casts to the autocast dtype itself; casting a bf16 x up to the fp32
            # adapter weights first would add two passes over x and change nothing (bf16 -> fp32 -> bf16 is exact).
            x = self._cast_input_dtype(x, A.dtype)
        plan = self._fused_plan(x, adapter_name)  # CUDA fast path (HYDRALORA_FUSED, see hydralora.ops.dispatch)
        if plan is not None and result.dtype == plan.dtype and result.shape[:-1] == x.shape[:-1]:
            return self._run_fused(plan, x, result)
        offset = self._init_offset(adapter_name)
        if offset is not None:
            A = torch.cat([A, offset[0].to(A.dtype)], 0)  # (2r, k): the frozen initial A shares x's dropout mask
        h, logits = self._project(adapter_name, x, A, offset)  # (..., m) | (..., N, m), (..., N)
        gate = self._gate(adapter_name, logits, x)  # (..., N) fp32
        self._record(adapter_name, logits, gate, x)
        return self._mix(adapter_name, h, gate, result, offset)

    def _fused_plan(self, x: torch.Tensor, adapter_name: Optional[str] = None) -> Optional[FusedPlan]:
        """The fused op's plan for this call (hydralora.ops.dispatch), or None for the eager path: adapter_name's
        update on a given base output, or (None) the base layer and the one active adapter in one op.

        Decided once per state (device, dtype, autocast, training, routing mode, active adapters, HYDRALORA_FUSED)
        and kept until the layer is moved or cast, or an adapter is added or deleted; a setting changed in place on
        an adapter's config needs `layer._fused_plans.clear()`. Per call only what can change unseen is checked:
        the device, a torch.compile trace (stays eager: Inductor fuses it), x's size, the adapter's weights
        (replaced or recast), hooks or a trainable weight on the base.
        """
        if not _dispatch.kernel_device(x) or torch.compiler.is_compiling() or not 0 < x.numel() < 2**31:
            return None  # the device first: on the CPU every call ends here
        dev = x.device
        amp = torch.is_autocast_enabled(dev.type)
        active = self._active_adapter
        key = (adapter_name, dev, x.dtype, amp and torch.get_autocast_dtype(dev.type), self.training,
               self.routing_mode, active if isinstance(active, str) else tuple(active), fused_switch())
        plans = self._fused_plans
        plan = plans.get(key, _NO_PLAN_YET)  # one hash of the key (None is a kept answer: the eager path)
        if plan is _NO_PLAN_YET:
            plan = plans[key] = self._make_fused_plan(x, adapter_name)
        if plan is None:
            return None
        mods, name = self._modules, plan.name
        A, W_g, B = plan.A, plan.W_g, plan.B
        if (mods["hydralora_A"]._parameters[name] is not A or mods["hydralora_router"]._parameters[name] is not W_g
                or mods["hydralora_B"]._parameters[name] is not B
                or (A.dtype, W_g.dtype, B.dtype) != plan.weight_dtypes):
            # a weight replaced (load_state_dict(assign=True)) or recast through .data since the plan was made
            plan = plans[key] = self._make_fused_plan(x, adapter_name)
            if plan is None:
                return None
        if plan.base is not None and base_hooked(plan):
            return None
        if self.routing_mode == "sequence" and self._decode_gate(plan.name, x) is None:
            return None  # sequence routing: only decode steps, with the prompt's gate, run the op (given that gate)
        return plan

    def _decode_gate(self, adapter_name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Sequence routing's gate for a decode-sized call without a graph that reuses the prompt's gate, one row per
        token (T, N), or None where the call is not one: the prompt's own call computes and keeps the gate on the
        eager path, and training calls route per sequence there too."""
        if self.training or torch.is_grad_enabled() or not self._reuse_sequence_gate or x.dim() != 3:
            return None
        cached = self._sequence_gate.get(adapter_name)  # (B, N)
        b, t = x.shape[:2]
        if cached is None or cached.shape[0] != b or b * t > SMALL_CALL_TOKENS:
            return None
        if t == 1 and cached.is_contiguous():
            return cached  # (B, N): one token per sequence
        return cached.unsqueeze(1).expand(b, t, cached.shape[1]).reshape(b * t, -1)  # (B*T, N)

    def _make_fused_plan(self, x: torch.Tensor, adapter_name: Optional[str]) -> Optional[FusedPlan]:
        base = None
        if adapter_name is None:  # the base inside the op: one active adapter over a plain Linear (checked in ops)
            names = [n for n in self.active_adapters if n in self.hydralora_A]
            if len(names) != 1:
                return None
            adapter_name, base = names[0], self.base_layer
        cfg = self.hconfig[adapter_name]
        # Sequence routing runs the op at decode only, given the prompt's gate (_decode_gate): planned as per-token
        # routing, whose kernels then take that gate instead of the router's.
        routing = "token" if self.routing_mode == "sequence" else self.routing_mode
        return plan_fused(
            adapter_name, x, self.hydralora_A[adapter_name], self.hydralora_router[adapter_name],
            self.hydralora_B[adapter_name], scaling=self.scaling[adapter_name], temperature=cfg.router_temperature,
            dropout_p=cfg.lora_dropout, training=self.training, router_input=cfg.router_input,
            routing_mode=routing, top_k=cfg.top_k, num_experts=self.num_experts[adapter_name],
            masked_experts=cfg.masked_experts, init_offset=self._init_offset(adapter_name) is not None,
            expert_dropout=cfg.expert_dropout, base=base)

    def _run_fused(self, plan: FusedPlan, x: torch.Tensor, result: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The planned op: usage counted inside it, B's flat matrix from the weight cache where no graph is
        recorded (generation, eval; the eager path's entry, the same tensor), balance loss and statistics recorded."""
        name = plan.name
        usage, weights = self._usage_target(name, x)
        grad = torch.is_grad_enabled()
        B_flat = factors = offset = None
        if plan.init_offset:
            factors, B_flat, offset = self._offset_operands(plan, grad)
        elif not grad:
            B = plan.B
            B_flat = self._eval_cached(name + ".B", (B,), lambda: _flat_B(B))  # (d, N*r)
        given = self._decode_gate(name, x) if self.routing_mode == "sequence" else None  # (T, N) or None
        # Eval without a graph (generation): no loss to record and the usage counted inside the op, so the op
        # writes no routing outputs (logits and gate None).
        stats = grad or self.training
        out, logits, gate = run_plan(plan, x, result, usage, weights, B_flat, stats, factors, offset,
                                     given)  # (..., d), (T, N), (T, N)
        if stats:
            self._record(name, logits, gate, x, counted=usage is not None)
        elif self._recording:  # what _record stores in eval: no losses
            self.last_aux_loss[name] = self.last_route_loss[name] = None
        return out

    def _offset_operands(self, plan: FusedPlan, grad: bool):
        """(factors, B_flat, offset) for run_plan, for an adapter with a frozen init offset (R-LoRA, SVD init). With
        an autograd graph: offset = (A0, -B0) in the GEMM dtype, made once per buffer version, which the op stacks
        under A and B. Without one: factors = A and B stacked with the offset (hydralora.ops.stack_init_offset) and
        B_flat their flat (d, N*2r) matrix, kept until a weight changes.

        Both are built outside torch.inference_mode (a first generate may run there): an inference tensor keeps no
        version counter, so nothing derived from it could be kept, and a later training call could not save it."""
        name, A, B = plan.name, plan.A, plan.B
        A0, B0 = self._init_offset(name)

        def constants(dtype_a, dtype_b):
            with torch.inference_mode(False), torch.no_grad():
                return A0.to(dtype_a), -B0.to(dtype_b)  # (r, k), (N, d, r)

        if grad:
            dt = plan.dtype  # (one entry per GEMM dtype: autocast's can change between calls)
            return None, None, self._eval_cached(f"{name}.offset.{dt}", (A0, B0), lambda: constants(dt, dt),
                                                 constant=True)

        def stacked():
            with torch.inference_mode(False), torch.no_grad():
                A2, B2 = stack_init_offset(A, B, *constants(A.dtype, B.dtype))  # (2r, k), (N, d, 2r)
                return (A2, B2), _flat_B(B2)  # (d, N*2r)

        factors, B_flat = self._eval_cached(name + ".AB+offset", (A, B, A0, B0), stacked)
        return factors, B_flat, None

    def _mix(self, adapter_name: str, h: torch.Tensor, gate: torch.Tensor, result: torch.Tensor,
             offset: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """result + (alpha/r) B_flat z with z = gate (x) h: every expert's B in one GEMM.

        h: (..., m) with one shared A (m = r, or 2r with the R-LoRA offset) or (..., N*r) with one A per expert;
        gate: (..., N) fp32; result: (..., d).
        """
        B = self.hydralora_B[adapter_name]  # (N, d, r)
        n, d, r = B.shape
        gs = gate.to(h.dtype)  # (..., N)
        if not self.hconfig[adapter_name].shared_a:
            h = h.unflatten(-1, (n, r))  # (..., N, r): expert i reads its own A_i x
        hn = h.unsqueeze(-2) if h.dim() == gs.dim() else h  # (..., 1|N, m)
        z = gs.unsqueeze(-1) * (hn if hn.shape[-1] == r else hn.narrow(-1, 0, r))  # (..., N, r)
        z = z.flatten(-2)  # (..., N*r)
        # (d, N*r), expert-major along the rank (a view of B's storage); the same cache entry as the fused path's
        B_flat = self._eval_cached(adapter_name + ".B", (B,), lambda: _flat_B(B))
        if offset is not None:
            z0 = gs.unsqueeze(-1) * hn.narrow(-1, r, r)  # (..., N, r)
            z = torch.cat([z, -z0.flatten(-2)], -1)  # (..., 2*N*r)
            B0_flat = _flat_B(offset[1].to(B.dtype))  # (d, N*r)
            B_flat = torch.cat([B_flat, B0_flat], 1)  # (d, 2*N*r)
        scaling = self.scaling[adapter_name]
        if result.dtype == z.dtype and result.is_contiguous():
            # Residual add and alpha/r in the GEMM's epilogue (beta = 1), no separate scaling op. Out of place,
            # torch.addmm first copies y into a new output (one more pass over y and, on a GPU, one more launch); with
            # no graph recorded (generation, eval) nothing else needs the base output, so y is updated in place.
            y2, z2 = result.reshape(-1, d), z.reshape(-1, z.shape[-1])  # (T, d), (T, N*r)
            if not torch.is_grad_enabled() and B_flat.dtype == z.dtype:  # (in-place ops are outside autocast)
                return y2.addmm_(z2, B_flat.t(), alpha=scaling).view(result.shape)
            return torch.addmm(y2, z2, B_flat.t(), alpha=scaling).view(result.shape)  # (..., d)
        return result + (F.linear(z, B_flat) * scaling).to(result.dtype)  # (..., d)

    def _eval_cached(self, key: str, params: tuple[torch.Tensor, ...], build, constant: bool = False):
        """build() once per weight version while no autograd graph is recorded (generation, eval); with constant=True
        (build reads only tensors that do not train) whether or not a graph is recorded.

        Parameters change only in place (optimizer steps, load_state_dict) or by moving, which bump `_version` or
        change `data_ptr`; either invalidates the entry. With grad enabled nothing else is cached (the graph is needed).
        Sharded engines that rewrite a parameter's storage without an in-place op (not seen with DDP; unverified
        for FSDP evaluation between steps) would defeat the stamp: `layer._weight_cache.clear()` resets it.
        """
        if (torch.is_grad_enabled() and not constant) or torch.compiler.is_compiling():
            return build()  # under torch.compile the graph holds the build, and data_ptr stamps would break it
        try:
            stamp = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        except RuntimeError:  # inference tensors keep no version counter: do not cache
            return build()
        hit = self._weight_cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = build()
        self._weight_cache[key] = (stamp, value)
        return value

    def _usage(self, adapter_name: str) -> Optional[torch.Tensor]:
        """Mean gate weight per expert (N,) over the tokens seen since the last reset, or None before any."""
        acc = self.usage_acc.get(adapter_name)
        if acc is None:
            return None
        n = acc.shape[0] - 1
        tokens = acc[n] + self._usage_tokens_host.get(adapter_name, 0.0)
        if float(tokens) == 0.0:  # nothing counted since the last reset (reads the device: a reporting call)
            return None
        return acc[:n] / tokens

    def reset_usage(self) -> None:
        """Start the usage statistics again. The accumulators are zeroed in place, not replaced: a CUDA graph that
        captured this layer keeps adding into them on replay, and one created during a capture would have its
        zero-fill replayed with every step."""
        with torch.no_grad():
            for acc in self.usage_acc.values():
                acc.zero_()
        self._usage_tokens_host.clear()


class HydraLinear(nn.Module, HydraLoraLayer):
    """HydraLoRA around a Linear or Conv1D base layer: forward returns base_layer(x) + delta, a Tensor."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: HydraLoraConfig, **kwargs) -> None:
        super().__init__()
        HydraLoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if not self.merged and not args and not kwargs:
            plan = self._fused_plan(x)  # CUDA: a plain nn.Linear base and the adapter in one op, or None
            if plan is not None:
                return self._run_fused(plan, x)  # (..., d)
        result = self.base_layer(x, *args, **kwargs)  # (..., d)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.hydralora_A:
                result = self.hydra_delta(name, x, result)  # (..., d)
        return result

    def _apply(self, fn, *args, **kwargs):
        self._fused_plans.clear()  # a move or cast (.to, .half, .cuda) changes what the fused dispatch decided
        return super()._apply(fn, *args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        self._fused_plans.clear()
        super().delete_adapter(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the fixed-gate update into the base weight (refused under token or sequence routing)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        if not torch.is_floating_point(base.weight):
            raise ValueError(MERGE_INTO_QUANTIZED.format(kind=type(base).__name__, dtype=base.weight.dtype))
        for name in adapter_names:
            if name not in self.hydralora_A:
                continue
            delta = self.get_delta_weight(name).to(base.weight.dtype)
            if safe_merge:
                merged = base.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights; adapter {name!r} seems broken.")
                base.weight.data = merged
            else:
                base.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.hydralora_A:
                base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)

    def __repr__(self) -> str:
        return "hydralora." + super().__repr__()


def validate_gate(gate: Union[str, int, Sequence[float], torch.Tensor], num_experts: int, usage=None) -> torch.Tensor:
    """Turn a user gate ('mean', 'usage', an expert index, or N non-negative weights) into an (N,) fp32 tensor."""
    if isinstance(gate, str):
        if gate == "mean":
            return torch.full((num_experts,), 1.0 / num_experts)
        if gate == "usage":
            if usage is None:
                raise ValueError(
                    "gate='usage' needs recorded expert usage: run some data through the model first "
                    "(usage statistics are tracked when HydraLoraConfig.track_usage=True)."
                )
            return usage.detach().float().cpu() / usage.sum().clamp_min(1e-12).cpu()
        raise ValueError(f"gate={gate!r} is invalid: allowed are 'mean', 'usage', an expert index or {num_experts} weights.")
    if isinstance(gate, bool):
        raise ValueError(f"gate={gate!r} is invalid: allowed are 'mean', 'usage', an expert index or {num_experts} weights.")
    if isinstance(gate, int):
        if not 0 <= gate < num_experts:
            raise ValueError(f"gate={gate} is invalid: an expert index must lie in [0, {num_experts - 1}].")
        return F.one_hot(torch.tensor(gate), num_experts).float()
    g = torch.as_tensor(gate, dtype=torch.float32).detach().cpu().flatten()
    if g.numel() != num_experts:
        raise ValueError(f"gate has {g.numel()} weights; this adapter has num_experts={num_experts}.")
    if not torch.isfinite(g).all() or (g < 0).any() or g.sum() <= 0:
        raise ValueError(f"gate={g.tolist()} is invalid: weights must be finite, non-negative and not all zero.")
    return g / g.sum()
