"""The fused HydraLoRA op: a custom autograd Function that saves only what backward needs.

    out = result + (alpha/r) * sum_i w_i(x) B_i A dropout(x),    w(x) = softmax(W_g x / temperature)

What it saves for backward: x itself (no copy; the same tensor the caller holds), h = A dropout(x) (T, r) fp32,
the gate (T, N) fp32, z (T, N*r) and one dropout seed. The dropout mask is a hash of (seed, element pair index): it is
never materialised in forward and regenerated in backward (PEFT LoRA stores both the mask and the dropped copy of x,
one of each per adapted layer).

Two backends compute the same function with the same mask:
- Triton (CUDA, bf16/fp16; hydralora.ops.launch): one pass over x in forward (A, router, softmax, gate scaling, z),
  the stacked B GEMM with the residual add in cuBLAS' epilogue, and one pass over x in backward (dx, dA, dW_g).
- PyTorch (any device, any float dtype; hydralora.ops.reference): the kernels' reference, used on the CPU and in CI.

Entry points: `hydra_delta_fused` (adapter on top of a given base output) and `hydra_linear_fused` (base GEMM
included, so the adapter's dx is added in the base dx GEMM's epilogue), each checking its arguments on every call;
`fused_supported` says when the Triton path computes exactly the layer's function. `fused_apply` is the unchecked
core that hydralora.ops.dispatch calls with constants decided once per layer (`op_consts`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import reference

try:  # Triton is optional: CPU-only installs and CI use the PyTorch backend.
    from . import launch

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    launch = None
    HAS_TRITON = False

FUSED_DTYPES = (torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "torch")


# --------------------------------------------------------------------------------------------------------------
# dropout seeds
def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on `device`'s current stream (then host-side values freeze)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _fmix32(v: int) -> int:
    """murmur3's 32-bit finaliser on host ints: neighbouring inputs give unrelated words."""
    M32 = reference.M32
    v &= M32
    v ^= v >> 16
    v = (v * 0x85EBCA6B) & M32
    v ^= v >> 13
    v = (v * 0xC2B2AE35) & M32
    return v ^ (v >> 16)


def new_seed(device):
    """Two int31 seed words from torch's default generators (respects torch.manual_seed).

    On a CUDA device: derived from the device generator's seed and Philox offset, which it then advances as one of
    torch's own random ops would (no tensor op, no kernel: four small host calls instead of a CPU draw). Activation
    checkpointing saves and restores that state with the CPU's, so a recomputed forward draws the same seed. While a
    CUDA graph is being captured: a (2,) int64 tensor drawn on the device, which the kernels read there (a host seed
    would be frozen into the graph, every replay dropping the same elements; a device draw is replayed fresh).
    Elsewhere (the PyTorch backend on the CPU): two ints drawn from the CPU generator."""
    if device.type == "cuda":
        if capturing(device):
            return torch.randint(0, 2**31 - 1, (2,), device=device, dtype=torch.int64)
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        off = gen.get_offset()
        gen.set_offset(off + 4)  # Philox offsets move in steps of 4
        seed = gen.initial_seed()
        s1 = _fmix32(seed ^ (seed >> 32))
        return s1 >> 1, _fmix32(s1 + (off >> 2) * reference.GOLD) >> 1
    s1, s2 = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64).tolist()
    return s1, s2


# --------------------------------------------------------------------------------------------------------------
# the op
class OpConsts(NamedTuple):
    """The op's host-side constants for one adapter and training mode (op_consts): computed once, not per call."""

    scaling: float
    inv_temp: float
    dropout: bool  # dropout active (training and p > 0)
    thr: int  # dropout threshold on 16 bits of hash
    inv_keep: float  # 1 / (1 - p)
    triton: bool  # the Triton kernels (else the PyTorch reference)


def op_consts(scaling: float, temperature: float, dropout_p: float, training: bool, triton: bool) -> OpConsts:
    dropout, thr, inv_keep = reference.dropout_params(dropout_p, training)
    return OpConsts(float(scaling), 1.0 / float(temperature), dropout, thr, inv_keep, bool(triton))


def _forward(x2, res2, W0, bias, A, G, Bf, usage, weights, c: OpConsts, stats: bool = True):
    """(out (T, d), raw logits (T, N), gate (T, N), seed, z (T, N*R), h (T, R)) for 2-D contiguous inputs, one
    dtype; with stats=False raw, gate and h are None (not computed into memory)."""
    seed = new_seed(x2.device) if c.dropout else None
    proj = launch.proj if c.triton else reference.proj
    z, h, gate, raw = proj(x2, A, G, seed, c.thr, c.inv_keep, c.scaling, c.inv_temp, c.dropout, usage,
                           weights, stats)  # (T, N*R), (T, R), (T, N), (T, N)
    if res2 is None:
        # Base GEMM owned here: delta first (a 1-D bias rides in its epilogue), then the base GEMM adds into it
        # in place (beta = 1; out of place, torch.addmm would first copy the delta into a new output).
        # (F.linear: the transposes stay inside one ATen call, no Python call per transposed view)
        out = F.linear(z, Bf, bias).addmm_(x2, W0.t())  # (T, d)
    elif res2.dtype == z.dtype and res2.is_contiguous():
        out = torch.addmm(res2, z, Bf.t())  # (T, d): residual add fused into the GEMM epilogue
    else:
        out = res2 + F.linear(z, Bf).to(res2.dtype)  # (T, d)
    return out, raw, gate, seed, z, h


class _HydraFused(torch.autograd.Function):
    """Inputs: x2 (T, K); res2 (T, d) or None; W0 (d, K) frozen or None; bias (d,) frozen or None; A (R, K);
    G (N, K); B (N, d, R); usage (N + 1,) fp32 or None; token weights (T,) or None; c: OpConsts; offset: a frozen
    init offset (A0 (R, K), -B0 (N, d, R)) in the GEMM dtype, or None. Outputs: out (T, d), raw logits (T, N) fp32
    (differentiable), gate (T, N) fp32.

    An offset is stacked here, as stack_init_offset does, but outside autograd: the gradients of A and B are cut
    from the stacked ones in backward, without autograd nodes for the stacks (their host time per call)."""

    @staticmethod
    def forward(ctx, x2, res2, W0, bias, A, G, B, usage, weights, c, offset):
        n, d, r = B.shape
        if offset is None:
            Bf = B.permute(1, 0, 2).reshape(d, n * r)  # (d, N*R): a view of the layer's B (reference.flat_B)
        else:
            A0, neg_B0 = offset
            A = torch.cat([A, A0], 0)  # (2R, K)
            Bf = torch.cat([B.permute(1, 0, 2), neg_B0.permute(1, 0, 2)], 2).view(d, n * 2 * r)  # (d, N*2R)
        out, raw, gate, seed, z, h = _forward(x2, res2, W0, bias, A, G, Bf, usage, weights, c)
        dev_seed = seed if isinstance(seed, torch.Tensor) else None  # a device seed is saved as a tensor
        ctx.save_for_backward(x2, W0, A, G, Bf, z, h, gate, dev_seed)  # Bf: the matrix backward's GEMMs read
        ctx.seed, ctx.c, ctx.owns_base = (seed if dev_seed is None else None), c, res2 is None
        ctx.own_rank = None if offset is None else r  # the rows of A (columns of each B_i) that train
        ctx.mark_non_differentiable(gate)
        ctx.set_materialize_grads(False)
        return out, raw, gate

    @staticmethod
    def backward(ctx, dout, draw, _dgate):
        x2, W0, A, G, Bf, z, h, gate, dev_seed = ctx.saved_tensors
        c = ctx.c
        seed = dev_seed if dev_seed is not None else ctx.seed
        n, r = G.shape[0], A.shape[0]
        d = Bf.shape[0]
        need_x = ctx.needs_input_grad[0]
        if dout is None:
            dout = torch.zeros(x2.shape[0], d, device=x2.device, dtype=x2.dtype)  # (T, d)
        dout = dout.contiguous()  # (T, d)
        dz = dout @ (Bf if Bf.dtype == dout.dtype else Bf.to(dout.dtype))  # (T, N*R)
        # One GEMM for every expert's dB, reading dout once (a batched GEMM per expert reads it N times). Its
        # (d, N*R) result is B's gradient in the layer's storage order of B, (d, N, R): autograd takes it as is.
        dBf = dout.t() @ (z if z.dtype == dout.dtype else z.to(dout.dtype))  # (d, N*R)
        own = ctx.own_rank
        if own is None:
            dB = dBf.view(d, n, r).permute(1, 0, 2)  # (N, d, R)
        else:  # the trained B_i's columns, copied into B's storage order (d, N, R): autograd takes it as is
            dB = dBf.view(d, n, r)[:, :, :own].contiguous().permute(1, 0, 2)  # (N, d, own)
        if dB.dtype != Bf.dtype:
            dB = dB.to(Bf.dtype)
        bwd = launch.bwd_x if c.triton else reference.bwd_x
        dx, dA, dG = bwd(x2, dz, h, gate, draw, A, G, seed, c.thr, c.inv_keep, c.scaling, c.inv_temp, c.dropout,
                         need_x)  # (T, K), (R, K), (N, K)
        if need_x and ctx.owns_base:
            dx = dx.addmm_(dout, W0 if W0.dtype == dout.dtype else W0.to(dout.dtype))  # (T, K): base dx added
        d_res = dout if (not ctx.owns_base and ctx.needs_input_grad[1]) else None
        if own is not None:
            dA = dA[:own]  # (R, K)
        return (dx, d_res, None, None, dA if dA.dtype == A.dtype else dA.to(A.dtype),
                dG if dG.dtype == G.dtype else dG.to(G.dtype), dB, None, None, None, None)


# Calls of at most this many tokens without routing outputs (decode steps) take _small_call: at these sizes the host's
# launches, not the GPU, set the pace.
SMALL_CALL_TOKENS = 32


def _small_call(x2, res2, W0, bias, A, G, Bf, usage, weights, c: OpConsts, gate=None) -> torch.Tensor:
    """out (T, d) of a call without an autograd graph or routing outputs, T <= SMALL_CALL_TOKENS: the base GEMM (where
    the op owns it), then one kernel that projects, routes (or applies the given gate (T, N) fp32) and adds the
    experts' update into that output in place (two launches where _forward makes three)."""
    if res2 is None:
        out = F.linear(x2, W0, bias)  # (T, d)
        res = out
    else:
        res = res2 if res2.is_contiguous() else res2.contiguous()  # (T, d)
        out = torch.empty_like(res)  # (T, d): the caller's result stays as it was
    kernels = launch if c.triton else reference
    return kernels.proj_mix(x2, res, A, G, Bf if Bf.is_contiguous() else Bf.contiguous(), out, c.scaling, c.inv_temp,
                            usage, weights, gate)  # (T, d)


def fused_apply(x2, res2, W0, bias, A, G, B, c: OpConsts, usage=None, weights=None, Bf=None, stats=True,
                offset=None, gate=None):
    """The op on 2-D operands, unchecked: x2 (T, K) contiguous, every GEMM operand in one dtype, A and G
    contiguous. Bf: B's flat (d, N*R) matrix kept by the caller for calls without an autograd graph, else None.
    stats=False (read only without an autograd graph): the routing outputs are not needed, None is returned for
    them. offset: a frozen init offset (A0 (R, K), -B0 (N, d, R)) in the GEMM dtype, stacked under A and B (without
    a graph a caller that keeps the stacked operands passes them as A, B and Bf instead). gate: a (T, N) fp32 gate to
    apply instead of the router's (sequence routing's, at decode), only for a call that takes the small-call kernel:
    no autograd graph, stats=False, no dropout, T <= SMALL_CALL_TOKENS. Returns (out (T, d), raw logits (T, N) fp32,
    gate (T, N) fp32)."""
    grad = torch.is_grad_enabled()
    if gate is not None and (grad or stats or c.dropout or x2.shape[0] > SMALL_CALL_TOKENS):
        raise ValueError(f"gate: a given gate needs a small call (no autograd graph, stats=False, no dropout, at most "
                         f"{SMALL_CALL_TOKENS} tokens); got {x2.shape[0]} tokens, grad={grad}, stats={stats}, "
                         f"dropout={c.dropout}")
    if grad:
        return _HydraFused.apply(x2, res2, W0, bias, A, G, B, usage, weights, c, offset)
    if offset is not None:
        A, B = stack_init_offset(A, B, *offset)  # (2R, K), (N, d, 2R)
        Bf = None
    if Bf is None:
        Bf = reference.flat_B(B)  # (d, N*R)
    if not stats and not c.dropout and x2.shape[0] <= SMALL_CALL_TOKENS:
        return _small_call(x2, res2, W0, bias, A, G, Bf, usage, weights, c, gate), None, None
    return _forward(x2, res2, W0, bias, A, G, Bf, usage, weights, c, stats)[:3]  # no graph: no autograd Function


# --------------------------------------------------------------------------------------------------------------
# checked entry points
def stack_init_offset(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor,
                      neg_B0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's operands for a layer with a frozen init offset (R-LoRA, SVD init), whose update is
    sum_i w_i (B_i A - B0_i A0) dropout(x): A' = [A; A0] (2R, K) and B'_i = [B_i, -B0_i] (N, d, 2R), so that
    B'_i A' = B_i A - B0_i A0 with one dropout mask for both, as the eager layer applies it. Differentiable in A and
    B (their gradients are the first R rows / columns of the op's); A0 and neg_B0 = -B0 are constants."""
    return torch.cat([A, A0], 0), torch.cat([B, neg_B0], 2)  # (2R, K), (N, d, 2R)


def gemm_dtype(x: torch.Tensor) -> tuple[torch.dtype, bool]:
    """(the dtype the GEMMs run in, autocast on): autocast's dtype where it is on for x's device (as F.linear would
    cast), else x's own."""
    amp = torch.is_autocast_enabled(x.device.type)
    return (torch.get_autocast_dtype(x.device.type) if amp else x.dtype), amp


def use_triton(x: torch.Tensor, dtype: torch.dtype, backend: str) -> bool:
    """Whether the op runs the Triton kernels for x with GEMMs in `dtype`, for backend 'auto', 'triton' or 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed values are {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    ok = HAS_TRITON and x.is_cuda and dtype in FUSED_DTYPES
    if backend == "triton" and HAS_TRITON and launch.interpreting():
        return True  # kernel debugging on the CPU through Triton's interpreter
    if backend == "triton" and not ok:
        raise RuntimeError("backend='triton' needs Triton, a CUDA tensor and bf16/fp16 inputs.")
    return ok


def hydra_delta_fused(
    x: torch.Tensor,
    A: torch.Tensor,
    W_g: torch.Tensor,
    B: torch.Tensor,
    result: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    temperature: float = 1.0,
    backend: str = "auto",
    usage: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """result + scaling * sum_i softmax(W_g x / temperature)_i B_i A dropout(x), fused.

    x: (..., K); A: (R, K); W_g: (N, K) (router on x); B: (N, d, R); result: (..., d) the base layer's output.
    Dense token routing only (see `fused_supported`). backend: 'auto' (Triton on CUDA bf16/fp16, else PyTorch),
    'triton' or 'torch'. Returns (out (..., d), raw router logits (..., N) fp32, gate (..., N) fp32); the logits
    carry gradient (for a balance loss), the gate does not.

    usage: an (N + 1,) fp32 tensor on x's device to which the call adds, in place and inside the projection kernel,
    each expert's gate weight summed over tokens (usage[:N]) and the number of tokens (usage[N]); with
    token_weights (x's leading shape: a 0/1 mask of real tokens, any dtype) the tokens are weighted and their
    weight sum is added to usage[N].
    """
    res2 = result.reshape(-1, result.shape[-1])  # (T, d)
    return _checked(x, res2, None, None, A, W_g, B, scaling, temperature, dropout_p, training, backend, usage,
                    token_weights)


def hydra_linear_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    W_g: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    temperature: float = 1.0,
    backend: str = "auto",
    usage: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F.linear(x, weight, bias) + the HydraLoRA update, with the frozen base GEMM inside the Function.

    The adapter's dx is added in the epilogue of the base's dx GEMM (one pass less over dx than autograd's
    accumulation of two separate gradients). weight and bias must be frozen. Same arguments and returns as
    hydra_delta_fused otherwise.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("hydra_linear_fused needs a frozen base weight and bias.")
    return _checked(x, None, weight, bias, A, W_g, B, scaling, temperature, dropout_p, training, backend, usage,
                    token_weights)


def check_usage(usage: torch.Tensor, n: int, device: torch.device) -> None:
    """usage must be a contiguous (N + 1,) float32 tensor on the op's device (the kernels add into it in place)."""
    if usage.shape != (n + 1,) or usage.dtype != torch.float32 or usage.device != device or not usage.is_contiguous():
        raise ValueError(f"usage: expected a contiguous ({n + 1},) float32 tensor on {device}, got "
                         f"{tuple(usage.shape)} {usage.dtype} on {usage.device}")


def token_weights_2d(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x's (T,) token weights, contiguous; a clear error where they do not match x's leading shape or device."""
    T = x.numel() // x.shape[-1]
    if weights.numel() != T or weights.device != x.device:
        raise ValueError(f"token_weights: expected {T} values (x's leading shape {tuple(x.shape[:-1])}) on "
                         f"{x.device}, got shape {tuple(weights.shape)} on {weights.device}")
    weights = weights.reshape(-1)  # (T,)
    return weights if weights.is_contiguous() else weights.contiguous()


def _checked(x, res2, weight, bias, A, W_g, B, scaling, temperature, dropout_p, training, backend, usage, weights):
    """The checked call: cast to the GEMM dtype (under autocast, as autocast does for F.linear: fp32 adapter weights
    then train through bf16 GEMMs, their gradients flowing back to fp32 through the casts), flatten x to (T, K),
    run the op, give the results x's leading shape back."""
    dt, _ = gemm_dtype(x)
    x, A, W_g, B = x.to(dt), A.to(dt), W_g.to(dt), B.to(dt)  # adapter weights: (R+N)*K + N*d*R elements, small
    weight = weight.to(dt) if weight is not None else None
    bias = bias.to(dt) if bias is not None else None
    if res2 is not None and res2.shape[0] * x.shape[-1] != x.numel():
        raise ValueError(f"result: expected {x.numel() // x.shape[-1]} rows (x's leading shape), got {res2.shape[0]}")
    if usage is not None:
        check_usage(usage, W_g.shape[0], x.device)
    if weights is not None:
        weights = token_weights_2d(weights, x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (T, K)
    c = op_consts(scaling, temperature, dropout_p, training, use_triton(x2, dt, backend))
    out, raw, gate = fused_apply(x2, res2, weight, bias, A.contiguous(), W_g.contiguous(), B, c, usage, weights)
    n = W_g.shape[0]
    return out.view(*lead, out.shape[-1]), raw.view(*lead, n), gate.view(*lead, n)  # (..., d), (..., N), (..., N)


def fused_supported(
    x: torch.Tensor,
    A: torch.Tensor,
    W_g: torch.Tensor,
    B: torch.Tensor,
    result: Optional[torch.Tensor] = None,
    *,
    router_input: str = "x",
    routing_mode: str = "token",
    top_k: Optional[int] = None,
    num_experts: Optional[int] = None,
    masked_experts=(),
    training: bool = False,
    init_offset: bool = False,
    expert_dropout: bool = False,
) -> bool:
    """True where the Triton fast path computes exactly the layer's function: CUDA, GEMMs in bf16/fp16 (x, A, W_g,
    B and result in one such dtype, or any float dtypes under a bf16/fp16 autocast, which the eager layer's GEMMs
    would follow too), dense softmax token routing by a router on x, no top-k, no masked experts at inference, one
    shared dropout mask, r <= 64 (with an init offset, R-LoRA or SVD init: 2r <= 64, the op then running on the
    operands of `stack_init_offset`), N <= 16, 0 < x.numel() < 2**31."""
    if not (HAS_TRITON and x.is_cuda):
        return False
    if result is not None:
        dt, _ = gemm_dtype(x)
        if result.dtype != dt or result.shape[:-1] != x.shape[:-1]:
            return False
    return 0 < x.numel() < 2**31 and supported(
        x, A, W_g, B, router_input=router_input, routing_mode=routing_mode, top_k=top_k, num_experts=num_experts,
        masked_experts=masked_experts, training=training, init_offset=init_offset, expert_dropout=expert_dropout)


def supported(x, A, W_g, B, *, router_input, routing_mode, top_k, num_experts, masked_experts, training, init_offset,
              expert_dropout) -> bool:
    """The rules of fused_supported that do not depend on the device or on x's size: what a layer's dispatch
    decides once (hydralora.ops.dispatch)."""
    dt, amp = gemm_dtype(x)
    if dt not in FUSED_DTYPES:
        return False
    dev = x.device
    if not (A.device == dev and W_g.device == dev and B.device == dev):
        return False
    if not ((x.is_floating_point() and A.is_floating_point() and W_g.is_floating_point() and B.is_floating_point())
            if amp else (x.dtype == dt and A.dtype == dt and W_g.dtype == dt and B.dtype == dt)):
        return False
    if router_input != "x" or routing_mode != "token" or expert_dropout:
        return False
    n = W_g.shape[0]
    if top_k is not None and top_k < (num_experts or n):
        return False
    if masked_experts and not training:
        return False
    rank = A.shape[0] * (2 if init_offset else 1)  # the offset's frozen A0 stacks under A
    return rank <= 64 and n <= 16 and W_g.shape[1] == x.shape[-1]
