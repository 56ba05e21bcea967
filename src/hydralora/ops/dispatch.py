"""The dispatch a HydraLoRA layer calls: whether a call takes the fused op, decided once per layer state.

A layer asks `plan_fused` on its first call for a given state (device, dtype, autocast, training mode, routing,
active adapter, HYDRALORA_FUSED) with its adapter's weights and settings, and keeps the answer until that state
changes: a `FusedPlan` holds everything the op needs that does not depend on tensor values (the decision itself,
the GEMM dtype, whether the operands need a cast, the op's constants), or None sends the layer down its eager
path. `run_plan` then does per call only what depends on the call: flatten x, cast where the plan says so, run
the op. On a fast GPU the layer is bound by this host work, so it is kept to a few Python calls per layer call.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
from torch.nn.modules import module as _module

from . import fused
from .fused import OpConsts, fused_apply, op_consts

SWITCH_VALUES = ("auto", "0", "1")


def fused_switch() -> str:
    """HYDRALORA_FUSED as set ('auto' when unset); validated where a plan is made (fused_enabled)."""
    return os.environ.get("HYDRALORA_FUSED", "auto")


def fused_enabled() -> bool:
    """The layer-level switch HYDRALORA_FUSED: 'auto' (unset) and '1' dispatch every call the kernels support
    (decode-sized calls of 1 and 32 tokens included: with the host path short they run faster through the kernels
    than eager on an H200), '0' none."""
    mode = fused_switch()
    if mode not in SWITCH_VALUES:
        raise ValueError(f"HYDRALORA_FUSED={mode!r}: allowed values are {', '.join(SWITCH_VALUES)} (unset means auto)")
    return mode != "0"


def kernel_device(x: torch.Tensor) -> bool:
    """Whether x is where the kernels run: a CUDA tensor with Triton installed. (Inside a torch.compile trace the
    layer stays eager, which Inductor fuses: the launch cache is not traceable.)"""
    return fused.HAS_TRITON and x.is_cuda


def plain_linear(base) -> bool:
    """A torch.nn.Linear whose forward is exactly F.linear(x, weight, bias): no subclass, frozen. Hooks and the
    weights' requires_grad are checked again per call (base_hooked): they can change without the layer knowing."""
    if type(base) is not torch.nn.Linear:
        return False
    weight, bias = base.weight, base.bias
    return not weight.requires_grad and (bias is None or not bias.requires_grad)


class FusedPlan(NamedTuple):
    """One adapter's fused call, decided once for a layer state (plan_fused)."""

    name: str  # the adapter
    A: torch.Tensor  # (R, K)
    W_g: torch.Tensor  # (N, K)
    B: torch.Tensor  # (N, d, R)
    base: Optional[torch.nn.Linear]  # the frozen Linear whose GEMM runs inside the op, or None (result given)
    dtype: torch.dtype  # the GEMMs' dtype
    cast: bool  # some operand is in another dtype (autocast): cast to `dtype` per call (the weights change)
    consts: OpConsts
    weight_dtypes: tuple  # (A, W_g, B) dtypes the plan was made for: a plan is stale once they differ
    init_offset: bool  # the adapter has a frozen init offset, stacked under A and B (run_plan's offset / factors)


def plan_fused(
    name: str,
    x: torch.Tensor,
    A: torch.Tensor,
    W_g: torch.Tensor,
    B: torch.Tensor,
    *,
    scaling: float,
    temperature: float,
    dropout_p: float,
    training: bool,
    router_input: str,
    routing_mode: str,
    top_k: Optional[int],
    num_experts: int,
    masked_experts,
    init_offset: bool,
    expert_dropout: bool,
    base: Optional[torch.nn.Module] = None,
) -> Optional[FusedPlan]:
    """The plan for calls like x (its device, dtype and the autocast state; not its values or size) of one adapter,
    or None where the op does not apply: not a kernel device, HYDRALORA_FUSED=0, or a setting the kernels do not
    compute (fused.supported). With `base`, the base GEMM runs inside the op; that needs a plain frozen nn.Linear
    whose weight (and bias) can enter the GEMMs, else None."""
    if not fused_enabled() or not kernel_device(x):  # the switch first: a wrong value errs on any device
        return None
    if not fused.supported(x, A, W_g, B, router_input=router_input, routing_mode=routing_mode, top_k=top_k,
                           num_experts=num_experts, masked_experts=masked_experts, training=training,
                           init_offset=init_offset, expert_dropout=expert_dropout):
        return None
    dt, amp = fused.gemm_dtype(x)
    operands = [x, A, W_g, B]
    if base is not None:
        if not plain_linear(base):
            return None
        operands += [base.weight] if base.bias is None else [base.weight, base.bias]
        for t in operands[4:]:  # on x's device, in the GEMM dtype (any float under autocast: it casts)
            if t.device != x.device or not (t.is_floating_point() if amp else t.dtype == dt):
                return None
    cast = any(t.dtype != dt for t in operands)
    consts = op_consts(scaling, temperature, dropout_p, training, fused.use_triton(x, dt, "auto"))
    return FusedPlan(name, A, W_g, B, base, dt, cast, consts, (A.dtype, W_g.dtype, B.dtype), init_offset)


def base_hooked(plan: FusedPlan) -> bool:
    """The plan's base layer cannot run inside the op now: it has forward hooks (its own or global ones) or a weight
    that trains. Both can change between calls without the layer knowing; then it runs as base_layer(x)."""
    base = plan.base
    params = base._parameters  # (nn.Module.__getattr__ costs a Python call per attribute)
    bias = params["bias"]
    return bool(base._forward_hooks or base._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or params["weight"].requires_grad
                or (bias is not None and bias.requires_grad))


def run_plan(plan: FusedPlan, x: torch.Tensor, result: Optional[torch.Tensor] = None,
             usage: Optional[torch.Tensor] = None, token_weights: Optional[torch.Tensor] = None,
             B_flat: Optional[torch.Tensor] = None, stats: bool = True,
             factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
             offset: Optional[tuple[torch.Tensor, torch.Tensor]] = None, given_gate: Optional[torch.Tensor] = None,
             ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The planned op for x (..., K): base(x) (a plan with a base) or result (..., d), plus the adapter's update.
    usage: as hydra_delta_fused's (the caller keeps the accumulator, so it is not re-checked here); token_weights:
    x's leading shape, on x's device (the caller matched them); B_flat: B's (d, N*R) matrix kept by the caller for
    calls without an autograd graph; stats=False, for calls without a graph that record nothing: raw and gate come
    back None. A layer with a frozen init offset passes either `offset`, (A0, -B0) in the plan's GEMM dtype, which
    the op stacks under A and B, or, without an autograd graph, `factors`: the (A, B) it keeps stacked already
    (fused.stack_init_offset), B_flat then being that B's. given_gate: a (T, N) fp32 gate to apply instead of the
    router's, for a decode-sized call without a graph (fused_apply says which). Returns (out (..., d), raw
    logits (T, N) fp32, gate (T, N) fp32): the routing outputs stay flat over x's T = prod(leading dims) tokens (the
    layer's statistics and losses read them flat; two views per call cost host time)."""
    A, W_g, B, base = plan.A, plan.W_g, plan.B, plan.base
    if factors is not None:
        A, B = factors  # (R', K), (N, d, R')
    W0 = bias = None
    if base is not None:
        params = base._parameters  # nn.Module.__getattr__ costs a Python call per attribute, per layer call
        W0, bias = params["weight"], params["bias"]
    if plan.cast:
        dt = plan.dtype
        x, A, W_g, B = x.to(dt), A.to(dt), W_g.to(dt), B.to(dt)  # (..., K), (R, K), (N, K), (N, d, R)
        W0 = W0.to(dt) if W0 is not None else None
        bias = bias.to(dt) if bias is not None else None
        B_flat = None
    K = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)  # (T, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    res2 = None if result is None else (result if result.dim() == 2 else result.reshape(-1, result.shape[-1]))
    if token_weights is not None and not token_weights.is_contiguous():
        token_weights = token_weights.contiguous()  # (..., ) read flat over T by the kernel
    out, raw, gate = fused_apply(x2, res2, W0, bias, A, W_g, B, plan.consts, usage, token_weights,
                                 B_flat, stats, offset, given_gate)  # (T, d), (T, N), (T, N)
    return (out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])), raw, gate
