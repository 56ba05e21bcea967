"""Fused HydraLoRA forward/backward: a custom autograd Function that saves only what backward needs.

    out = result + (alpha/r) * sum_i w_i(x) B_i A dropout(x),    w(x) = softmax(W_g x / temperature)

What it saves for backward: x itself (no copy; the same tensor the caller holds), h = A dropout(x) (T, r) fp32,
the gate (T, N) fp32, z (T, N*r) and one dropout seed. The dropout mask is a hash of (seed, element pair index): it is
never materialised in forward and regenerated inside the backward kernel (PEFT LoRA stores both the mask and the
dropped copy of x, one of each per adapted layer).

Two backends compute the same function with the same mask:
- Triton (CUDA, bf16/fp16): one pass over x in forward (A, router, softmax, gate scaling, z), the stacked B GEMM with
  the residual add in cuBLAS' epilogue, and one pass over x in backward (dx, dA, dW_g together).
- pure PyTorch (any device, any float dtype): the reference of the kernels, used on CPU and in CI tests.

`hydra_delta_fused` (adapter on top of a given base output) and `hydra_linear_fused` (base GEMM included, so the
adapter's dx is added in the base dx GEMM's epilogue instead of a separate autograd accumulation) are the entry
points; `fused_supported` / `layer_fused_supported` say when the fast path applies.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module

try:  # Triton is optional: CPU-only installs and CI use the PyTorch backend.
    import triton

    from . import _triton_kernels as _tk

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    _tk = None
    HAS_TRITON = False
try:  # where Triton keeps its launch hooks (3.4+); without it every launch goes through Triton's runner
    from triton import knobs as _knobs
except Exception:  # pragma: no cover - depends on the install
    _knobs = None
# the current CUDA stream of a device as an integer, what Triton's runner asks torch for (absent in CPU builds)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

_M32 = 0xFFFFFFFF
_GOLD, _C1, _C2 = 0x9E3779B1, 0x7FEB352D, 0x846CA68B
_FUSED_DTYPES = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------------------
# dropout mask: a counter-based hash, identical in the Triton kernels and here
def _dropout_params(p: float, training: bool) -> tuple[bool, int, float]:
    """(dropout active, 16-bit threshold, 1/(1-p)). An element is kept when its 16 bits of hash >= threshold: the
    drop rate is p to within 2**-17 (0.05 drops 3277 / 65536 = 0.050003)."""
    if not training or p <= 0.0:
        return False, 0, 1.0
    thr = min(int(round(p * 65536.0)), 65536)
    return True, thr, 1.0 / (1.0 - p)


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on `device`'s current stream (then host-side values freeze)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _fmix32(v: int) -> int:
    """murmur3's 32-bit finaliser on host ints: neighbouring inputs give unrelated words."""
    v &= _M32
    v ^= v >> 16
    v = (v * 0x85EBCA6B) & _M32
    v ^= v >> 13
    v = (v * 0xC2B2AE35) & _M32
    return v ^ (v >> 16)


def new_seed(device):
    """Two int31 seed words from torch's default generators (respects torch.manual_seed).

    On a CUDA device: derived from the device generator's seed and Philox offset, which it then advances as one of
    torch's own random ops would (no tensor op, no kernel: four small host calls instead of a CPU draw, 35-47 us per
    call on the H200 machine's host). Activation checkpointing saves and restores that state with the CPU's, so a
    recomputed forward draws the same seed. While a CUDA graph is being captured: a (2,) int64 tensor drawn on the
    device, which the kernels read there (a host seed would be frozen into the graph, every replay dropping the
    same elements; a device draw is replayed fresh). Elsewhere (the PyTorch backend on the CPU): two ints drawn
    from the CPU generator."""
    if device.type == "cuda":
        if capturing(device):
            return torch.randint(0, 2**31 - 1, (2,), device=device, dtype=torch.int64)
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        off = gen.get_offset()
        gen.set_offset(off + 4)  # Philox offsets move in steps of 4
        seed = gen.initial_seed()
        s1 = _fmix32(seed ^ (seed >> 32))
        return s1 >> 1, _fmix32(s1 + (off >> 2) * _GOLD) >> 1
    s1, s2 = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64).tolist()
    return s1, s2


def _keep_mask_torch(T: int, K: int, seed, thr: int, device) -> torch.Tensor:
    """(T, K) bool keep mask: the function the Triton kernels compute, in int64 arithmetic. One hash per pair of
    neighbouring columns (pair index t * ceil(K/2) + k // 2): its low 16 bits decide column 2j, its high 16 bits
    column 2j + 1. seed: two ints or a (2,) int64 tensor on `device` (new_seed)."""
    s1, s2 = seed[0], seed[1]
    kh = (K + 1) // 2
    v = torch.arange(T * kh, device=device, dtype=torch.int64)
    v = (((v ^ s1) * _GOLD) + s2) & _M32
    v = v ^ (v >> 16)
    v = (v * _C1) & _M32
    v = v ^ (v >> 15)
    v = (v * _C2) & _M32
    v = v ^ (v >> 16)
    bits = torch.stack((v & 0xFFFF, v >> 16), -1).view(T, 2 * kh)[:, :K]  # (T, K): lo for even, hi for odd columns
    return bits >= thr


# --------------------------------------------------------------------------------------------------------------
# the two kernels, PyTorch backend
def add_usage(sums: torch.Tensor, count: torch.Tensor, gate: torch.Tensor, weights: Optional[torch.Tensor]) -> None:
    """sums (N,) += sum_t w_t gate[t] and, with token weights, count () += sum_t w_t, in place: what the projection
    kernel's COUNT does (the PyTorch backend's and the eager layer's usage statistics). gate: (T, N); weights: T
    values of any dtype (a 0/1 mask of real tokens) or None (every token weight 1, count left alone)."""
    if weights is None:
        sums.add_(gate.sum(0))
        return
    w = weights.reshape(-1, 1).to(gate.dtype)  # (T, 1)
    sums.add_((gate * w).sum(0))
    count.add_(w.sum())


def _proj_torch(x2, A, G, seed, thr, inv_keep, scaling, inv_temp, dropout, usage=None, weights=None):
    T, K = x2.shape
    N, R = G.shape[0], A.shape[0]
    xd = x2
    if dropout:
        xd = x2.masked_fill(~_keep_mask_torch(T, K, seed, thr, x2.device), 0)
    h = F.linear(xd, A).float() * inv_keep  # (T, R)
    raw = F.linear(x2, G).float()  # (T, N)
    gate = torch.softmax(raw * inv_temp, -1)
    z = ((gate * scaling).unsqueeze(-1) * h.unsqueeze(1)).reshape(T, N * R).to(x2.dtype)
    if usage is not None:
        add_usage(usage[:N], usage[N], gate, weights)
    return z, h, gate, raw


def _bwd_x_torch(x2, dz, h, gate, gl, A, G, seed, thr, inv_keep, scaling, inv_temp, dropout, need_dx):
    T, K = x2.shape
    N, R = G.shape[0], A.shape[0]
    dz3 = dz.float().view(T, N, R)
    dh = ((gate * scaling).unsqueeze(-1) * dz3).sum(1)  # (T, R)
    dgate = (dz3 * h.unsqueeze(1)).sum(2) * scaling  # (T, N)
    dlog = gate * (dgate - (gate * dgate).sum(1, keepdim=True)) * inv_temp
    if gl is not None:
        dlog = dlog + gl.float()
    dh = dh * inv_keep
    keep = _keep_mask_torch(T, K, seed, thr, x2.device) if dropout else None
    dx = None
    if need_dx:
        dxa = dh.to(x2.dtype) @ A
        if keep is not None:
            dxa = dxa.masked_fill(~keep, 0)
        dx = dxa + dlog.to(x2.dtype) @ G
    xd = x2 if keep is None else x2.masked_fill(~keep, 0)
    dA = dh.t() @ xd.float()  # (R, K)
    dG = dlog.t() @ x2.float()  # (N, K)
    return dx, dA, dG


# --------------------------------------------------------------------------------------------------------------
# the two kernels, Triton backend
def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1). triton.next_power_of_2 and triton.cdiv are constexpr functions in
    Triton 3.6, about 3 us of host time per call outside a kernel; these run several times per layer call."""
    return 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tb(T: int) -> int:
    """Bucket of the token count for the autotuner's key (decode, small and large batches tune separately)."""
    return min(_pow2(max(int(T), 1)), 8192)


# Launching through the autotuner and Triton's JIT front end costs about 0.15 ms of host time per call on the H200
# machine's host (benchmarks/profile_layer.py --host), more than the proj kernel runs at 8192 tokens: the layer was
# bound by its host, not its GPU. After the first call for a key (which autotunes and compiles as usual) the chosen
# compiled kernel is launched directly. The key holds everything the compiled code depends on: the autotuner's key
# and the constexprs (`tune`, `kw`), the device, the tensors' dtypes and 16-byte alignment and, for the integers
# the kernels specialize on, divisibility by 16 and equality to 1 (T, TB and the seeds are not specialized).
_COMPILED: dict = {}
_PLANS: dict = {}  # kernel name -> (positions of tensor arguments, positions of specialized integer arguments)
_FREE_INTS = frozenset({"T", "TB", "seed_ptr", "s1", "s2"})
_DIRECT = {"ok": True}  # False once a direct launch failed (a Triton whose compiled-kernel runner differs)


def _spec_key(kernel, args) -> tuple[tuple, tuple, list]:
    """What the compiled code depends on beyond the constexprs: dtype and 16-byte alignment of every tensor,
    divisibility by 16 and equality to 1 of the specialized integers. Argument kinds by position are fixed per
    kernel (the calls below), so the positions are found once. Returns (key, positions of the tensors, their data
    pointers)."""
    plan = _PLANS.get(kernel.fn.__name__)
    if plan is None:
        names = kernel.fn.arg_names
        plan = _PLANS[kernel.fn.__name__] = (
            tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor)),
            tuple(i for i, a in enumerate(args) if type(a) is int and names[i] not in _FREE_INTS),
        )
    tens, ints = plan
    ptrs = [args[i].data_ptr() for i in tens]
    key = (tuple([(args[i].dtype, p % 16 == 0) for i, p in zip(tens, ptrs)]),
           tuple([(args[i] % 16 == 0, args[i] == 1) for i in ints]))
    return key, tens, ptrs


def _hooks_idle() -> bool:
    """No Triton launch hooks are registered (profilers such as proton register some): Triton's runner then adds
    nothing to the launch but host time, and the launcher can be called directly."""
    rt = getattr(_knobs, "runtime", None)
    if rt is None:
        return False
    # Triton 3.6 keeps them as HookChain objects (never None) with a list of calls; older ones as None or a callable
    return all(h is None or not getattr(h, "calls", True) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def _launch(kernel, grid, args, kw, fixed_cfg, tune):
    """Run an autotuned kernel; under TRITON_INTERPRET=1 (no driver to tune with) or HYDRALORA_AUTOTUNE=0
    (tests: fewer compilations) run one fixed config instead. `tune`: the values of the autotuner's key."""
    dev = args[0].device.index
    spec, tens, ptrs = _spec_key(kernel, args)
    key = (kernel.fn.__name__, tune, tuple(kw.items()), dev, spec)
    hit = _COMPILED.get(key)  # (the environment is read on a miss only: each read costs microseconds of host time)
    if hit is None and (os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("HYDRALORA_AUTOTUNE") == "0"):
        warps = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"num_warps": 4, "num_stages": 3}
        kernel.fn[grid(fixed_cfg)](*args, **kw, **fixed_cfg, **warps)
        return
    if hit is not None:
        compiled, meta, tail, direct = hit  # tail: the constexprs' values, in the kernel's argument order
        g = grid(meta)
        g = (g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)  # the launcher wants 3 grid dims
        try:
            if direct is not None and _hooks_idle():
                # What Triton's runner calls, without its per-launch extras when no hook is set (a closure, device
                # and stream lookups through its driver proxy, launch metadata, two empty hook calls).
                # Tensors go as their data pointers: for a tensor the launcher calls data_ptr() and asks the driver
                # about the pointer (cuPointerGetAttribute), per pointer argument and launch; an int it takes as is.
                run, function, packed = direct
                flat = list(args)
                for i, p in zip(tens, ptrs):
                    flat[i] = p
                run(*g, _raw_stream(dev), function, packed, None, None, None, *flat, *tail)
            else:
                compiled[g](*args, *tail)
            return
        except Exception as err:  # the kernels overwrite their outputs, so launching again below is safe
            _COMPILED.clear()
            _DIRECT["ok"] = False
            warnings.warn(f"hydralora: direct Triton launch failed ({type(err).__name__}: {err}); launching through "
                          "the autotuner from now on", RuntimeWarning)
    compiled = kernel[grid](*args, **kw)
    if hasattr(compiled, "result"):  # an asynchronous compile's future
        compiled = compiled.result()
    if (_DIRECT["ok"] and compiled is not None and hasattr(compiled, "__getitem__")
            and getattr(kernel, "best_config", None)):
        meta = dict(kw, **kernel.best_config.kwargs)  # what the grid reads (the grids take T from their closure)
        tail = tuple(meta[n] for n in kernel.fn.arg_names[len(args):])
        _COMPILED[key] = (compiled, meta, tail, _direct_parts(compiled))


def _direct_parts(compiled):
    """(launcher, function handle, packed metadata) of a compiled kernel that has been launched once, or None where
    this Triton's compiled kernels do not have them (then its runner launches them)."""
    function, packed = getattr(compiled, "function", None), getattr(compiled, "packed_metadata", None)
    run = getattr(compiled, "run", None)  # a property: builds the launcher if the first launch did not
    if _raw_stream is None or function is None or packed is None or not callable(run):
        return None
    return run, function, packed


def _pads(R: int, N: int) -> tuple[int, int]:
    return max(16, _pow2(R)), max(16, _pow2(N))


_PLACEHOLDERS: dict = {}  # (device, dtype) -> a 2-element zero tensor for pointer arguments a kernel does not read


def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = _PLACEHOLDERS.get((device, dtype))
    if t is None:
        t = _PLACEHOLDERS[(device, dtype)] = torch.zeros(2, device=device, dtype=dtype)
    return t


def _seed_args(seed, device) -> tuple:
    """The kernels' (S, seed_ptr, s1, s2) arguments for new_seed's device tensor or for its two ints. S is an int64
    tensor either way: a pointer of another dtype would select another compiled kernel, compiled (and loaded) in the
    middle of a CUDA graph capture, which invalidates the capture."""
    if isinstance(seed, torch.Tensor):
        return seed, 1, 0, 0
    s1, s2 = seed if seed is not None else (0, 0)
    return _placeholder(device, torch.int64), 0, s1, s2


def _proj_triton(x2, A, G, seed, thr, inv_keep, scaling, inv_temp, dropout, usage=None, weights=None):
    T, K = x2.shape
    N, R = G.shape[0], A.shape[0]
    RP, NP = _pads(R, N)
    dev = x2.device
    z = torch.empty(T, N * R, device=dev, dtype=x2.dtype)
    h = torch.empty(T, R, device=dev, dtype=torch.float32)
    gate = torch.empty(T, N, device=dev, dtype=torch.float32)
    raw = torch.empty(T, N, device=dev, dtype=torch.float32)
    unused = _placeholder(dev, torch.float32)
    grid = lambda META: (_cdiv(T, META["BT"]),)  # noqa: E731
    args = (x2, A, G, z, h, gate, raw, unused if usage is None else usage, unused if weights is None else weights,
            *_seed_args(seed, dev), T, K, _tb(T), thr, inv_keep, scaling, inv_temp)
    kw = dict(R=R, N=N, RP=RP, NP=NP, DROPOUT=dropout, COUNT=usage is not None, HAS_W=weights is not None)
    _launch(_tk._proj_fwd, grid, args, kw, {"BT": 32, "BK": 128}, (K, _tb(T)))
    return z, h, gate, raw


def _bwd_bt(T: int) -> int:
    return 64 if T >= 1024 else 32  # H200, 8192 tokens: 64 rows per block beat 128 by 14% (breakdown_layer --sweep)


def _bwd_x_triton(x2, dz, h, gate, gl, A, G, seed, thr, inv_keep, scaling, inv_temp, dropout, need_dx):
    T, K = x2.shape
    N, R = G.shape[0], A.shape[0]
    RP, NP = _pads(R, N)
    BT = _bwd_bt(T)
    nT = _cdiv(T, BT)
    dev = x2.device
    dx = torch.empty_like(x2) if need_dx else x2  # not written when need_dx is False
    part = torch.empty(nT, R + N, K, device=dev, dtype=torch.float32)  # per row block: dA rows, then dW_g rows
    gl_arg = gl.contiguous() if gl is not None else gate
    grid = lambda META: (nT, META["KSPLIT"])  # noqa: E731
    args = (x2, dz, h, gate, gl_arg, A, G, dx, part, *_seed_args(seed, dev), T, K, _tb(T), thr, inv_keep, scaling,
            inv_temp)
    kw = dict(R=R, N=N, RP=RP, NP=NP, BT=BT, DROPOUT=dropout, HAS_GL=gl is not None, NEED_DX=need_dx)
    _launch(_tk._bwd_x, grid, args, kw, {"BK": 64, "KSPLIT": 2}, (K, _tb(T)))
    dAG = part.sum(0).to(A.dtype)  # (R + N, K): one reduction and one cast for both weights (A, G share a dtype here)
    return (dx if need_dx else None), dAG[:R], dAG[R:]


# --------------------------------------------------------------------------------------------------------------
# autograd
def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    ok = HAS_TRITON and x.is_cuda and x.dtype in _FUSED_DTYPES
    if backend == "triton" and HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        return True  # kernel debugging on the CPU through Triton's interpreter
    if backend == "triton" and not ok:
        raise RuntimeError("backend='triton' needs Triton, a CUDA tensor and bf16/fp16 inputs.")
    return ok


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; no call into torch when it already is (a no-op .to() still costs host time on every call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _flat_B(B: torch.Tensor) -> torch.Tensor:
    """(d, N*r), expert-major along the rank: a view of the layer's B (stored (d, N, r)), a copy of any other."""
    n, d, r = B.shape
    return B.permute(1, 0, 2).reshape(d, n * r)


def _fused_forward(x2, result2, W0, bias, A, G, B, scaling, temperature, dropout_p, training, backend, usage, weights,
                   Bf):
    """The op's forward (arguments: _HydraFused's inputs): (out, raw, gate, tensors backward needs, its constants).
    No-grad calls (generation, eval) run it without the autograd Function."""
    triton_path = _use_triton(x2, backend)
    dropout, thr, inv_keep = _dropout_params(dropout_p, training)
    seed = new_seed(x2.device) if dropout else None
    proj = _proj_triton if triton_path else _proj_torch
    z, h, gate, raw = proj(x2, A, G, seed, thr, inv_keep, float(scaling), 1.0 / float(temperature), dropout,
                           usage, weights)  # (T, N*R), (T, R), (T, N), (T, N)
    if Bf is None:
        Bf = _flat_B(B)  # (d, N*R)
    if result2 is None:
        # Base GEMM owned here: delta first (a 1-D bias rides in its epilogue), then the base GEMM adds into it
        # in place (beta = 1; out of place, torch.addmm would first copy the delta into a new output).
        out = (z @ Bf.t() if bias is None else torch.addmm(bias, z, Bf.t())).addmm_(x2, W0.t())  # (T, d)
    elif result2.dtype == z.dtype and result2.is_contiguous():
        out = torch.addmm(result2, z, Bf.t())  # (T, d): residual add fused into the GEMM epilogue
    else:
        out = result2 + (z @ Bf.t()).to(result2.dtype)  # (T, d)
    dev_seed = seed if isinstance(seed, torch.Tensor) else None  # a device seed is saved as a tensor
    saved = (x2, W0, A, G, Bf, z, h, gate, dev_seed)  # Bf, not B: the (d, N*R) matrix backward's GEMMs read
    meta = (None if dev_seed is not None else seed, thr, inv_keep, float(scaling), 1.0 / float(temperature), dropout,
            triton_path, result2 is None)
    return out, raw, gate, saved, meta


class _HydraFused(torch.autograd.Function):
    """Inputs: x2 (T, K); result2 (T, d) or None; W0 (d, K) frozen or None; bias (d,) frozen or None; A (R, K);
    G (N, K); B (N, d, R); usage (N + 1,) fp32 or None, token weights (T,) or None (see hydra_delta_fused);
    Bf: B's (d, N*R) flat copy where the caller keeps one (no-grad calls of the layer), else None.
    Outputs: out (T, d), raw logits (T, N) fp32 (differentiable), gate (T, N) fp32."""

    @staticmethod
    def forward(ctx, *args):
        out, raw, gate, saved, meta = _fused_forward(*args)
        ctx.save_for_backward(*saved)
        ctx.meta = meta
        ctx.mark_non_differentiable(gate)
        ctx.set_materialize_grads(False)
        return out, raw, gate

    @staticmethod
    def backward(ctx, dout, draw, _dgate):
        x2, W0, A, G, Bf, z, h, gate, dev_seed = ctx.saved_tensors
        seed, thr, inv_keep, scaling, inv_temp, dropout, triton_path, owns_base = ctx.meta
        seed = dev_seed if dev_seed is not None else seed
        T, K = x2.shape
        n, r = G.shape[0], A.shape[0]
        d = Bf.shape[0]
        need_x = ctx.needs_input_grad[0]
        if dout is None:
            dout = torch.zeros(T, d, device=x2.device, dtype=x2.dtype)
        dout = dout.contiguous()
        dz = dout @ _as(Bf, dout.dtype)  # (T, N*R)
        # One GEMM for every expert's dB, read dout once (a batched GEMM per expert read dout N times: the 7B-shaped
        # all-linear train step ran 10 ms slower with it on the H200, 2026-12-02). Its (d, N*R) result is B's
        # gradient in the layer's own storage order of B, (d, N, R): autograd takes it without a copy.
        dBf = dout.t() @ _as(z, dout.dtype)  # (d, N*R)
        dB = _as(dBf.view(d, n, r).permute(1, 0, 2), Bf.dtype)  # (N, d, R)
        bwd = _bwd_x_triton if triton_path else _bwd_x_torch
        dx, dA, dG = bwd(x2, dz, h, gate, draw, A, G, seed, thr, inv_keep, scaling, inv_temp, dropout, need_x)
        if need_x and owns_base:
            dx = dx.addmm_(dout, _as(W0, dout.dtype))  # the base's dx GEMM adds into the adapter's dx (its own buffer)
        d_result = dout if (not owns_base and ctx.needs_input_grad[1]) else None
        return (dx, d_result, None, None, _as(dA, A.dtype), _as(dG, G.dtype), dB) + (None,) * 8


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
    each expert's gate weight summed over tokens (usage[:N]); with token_weights (x's leading shape: a 0/1 mask of
    real tokens, any dtype) the tokens are weighted and their weight sum is added to usage[N].
    """
    res2 = result.reshape(-1, result.shape[-1])
    return _apply_2d(x, res2, None, None, A, W_g, B, scaling, temperature, dropout_p, training, backend, usage,
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
    return _apply_2d(x, None, weight, bias, A, W_g, B, scaling, temperature, dropout_p, training, backend, usage,
                     token_weights)


def _gemm_dtype(x: torch.Tensor) -> tuple[torch.dtype, bool]:
    """(the dtype the GEMMs run in, autocast on): autocast's dtype where it is on for x's device (as F.linear would
    cast), else x's own."""
    amp = torch.is_autocast_enabled(x.device.type)
    return (torch.get_autocast_dtype(x.device.type) if amp else x.dtype), amp


def _apply_2d(x, res2, weight, bias, A, W_g, B, scaling, temperature, dropout_p, training, backend, usage=None,
              weights=None, Bf=None):
    """Flatten x to (T, k), run the Function, and give the results x's leading shape back.

    Under autocast the inputs are cast to the autocast dtype first, as autocast does for F.linear: fp32 adapter
    weights (PEFT's default) then train through bf16 GEMMs, their gradients flowing back to fp32 through the casts.
    Written for few host calls: this runs once per adapted layer and call, and the layer is host-bound on fast GPUs.
    """
    dev = x.device.type
    dt, amp = _gemm_dtype(x)
    if (x.dtype != dt or A.dtype != dt or W_g.dtype != dt or B.dtype != dt or (res2 is not None and res2.dtype != dt)
            or (weight is not None and weight.dtype != dt) or (bias is not None and bias.dtype != dt)):
        x, A, W_g, B = x.to(dt), A.to(dt), W_g.to(dt), B.to(dt)  # adapter weights: (R+N)*k + N*d*R elements, small
        Bf = Bf.to(dt) if Bf is not None else None
        weight = weight.to(dt) if weight is not None else None
        bias = bias.to(dt) if bias is not None else None
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if usage is not None and (usage.shape != (W_g.shape[0] + 1,) or usage.dtype != torch.float32
                              or usage.device != x.device or not usage.is_contiguous()):
        raise ValueError(f"usage: expected a contiguous ({W_g.shape[0] + 1},) float32 tensor on {x.device}, got "
                         f"{tuple(usage.shape)} {usage.dtype} on {usage.device}")
    if weights is not None:
        if weights.numel() != x2.shape[0] or weights.device != x.device:
            raise ValueError(f"token_weights: expected {x2.shape[0]} values (x's leading shape {tuple(lead)}) on "
                             f"{x.device}, got shape {tuple(weights.shape)} on {weights.device}")
        weights = weights.reshape(-1)
        if not weights.is_contiguous():
            weights = weights.contiguous()
    args = (x2, res2, weight, bias, A if A.is_contiguous() else A.contiguous(),
            W_g if W_g.is_contiguous() else W_g.contiguous(), B, scaling, temperature, dropout_p, training, backend,
            usage, weights, Bf)
    op = _HydraFused.apply if torch.is_grad_enabled() else _fused_forward  # no graph: no autograd Function
    if amp:
        with torch.autocast(dev, enabled=False):  # the Function's matmuls run in dt as given
            out, raw, gate = op(*args)[:3]
    else:  # (building an autocast context costs host time on every call; none is needed here)
        out, raw, gate = op(*args)[:3]
    if x.dim() == 2:
        return out, raw, gate
    n = W_g.shape[0]
    return out.view(*lead, out.shape[-1]), raw.view(*lead, n), gate.view(*lead, n)


# --------------------------------------------------------------------------------------------------------------
# when the fast path applies
def _gemm_operand(t: torch.Tensor, x: torch.Tensor, dt: torch.dtype, amp: bool) -> bool:
    """t can enter the op's GEMMs with x: on x's device, in the GEMM dtype dt (any float under autocast: it casts)."""
    return t.device == x.device and (t.is_floating_point() if amp else t.dtype == dt)


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
    would follow too), dense softmax token routing by a router on x, no top-k, no masked experts at inference, no
    R-LoRA init offset, one shared dropout mask, r <= 64, N <= 16, x.numel() < 2**31."""
    dt, amp = _gemm_dtype(x)
    return _supported(x, dt, amp, A, W_g, B, result, router_input, routing_mode, top_k, num_experts, masked_experts,
                      training, init_offset, expert_dropout)


def _supported(x, dt, amp, A, W_g, B, result, router_input, routing_mode, top_k, num_experts, masked_experts, training,
               init_offset, expert_dropout) -> bool:
    """fused_supported, given x's GEMM dtype and the autocast state (the layer's dispatch has them already)."""
    if not HAS_TRITON or not x.is_cuda or dt not in _FUSED_DTYPES:
        return False
    dev = x.device  # the _gemm_operand checks of x, A, W_g and B, written out (no Python call per check)
    if not (A.device == dev and W_g.device == dev and B.device == dev):
        return False
    if not ((x.is_floating_point() and A.is_floating_point() and W_g.is_floating_point() and B.is_floating_point())
            if amp else (A.dtype == dt and W_g.dtype == dt and B.dtype == dt)):
        return False
    if result is not None and (result.dtype != dt or result.shape[:-1] != x.shape[:-1]):
        return False
    if router_input != "x" or routing_mode != "token" or init_offset or expert_dropout:
        return False
    n = W_g.shape[0]
    if top_k is not None and top_k < (num_experts or n):
        return False
    if masked_experts and not training:
        return False
    if A.shape[0] > 64 or n > 16 or W_g.shape[1] != x.shape[-1] or x.numel() >= 2**31 or x.numel() == 0:
        return False
    return True


# Below this many tokens per call the dispatch stays eager. It was 1024 while decode-sized calls (1 and 32 tokens)
# ran slower through the kernels than eager on an H200; since the fused path makes fewer host calls (2026-12-02) it
# decoded faster than eager in 6 of 8 model x batch cells over two runs on the H200 (by 9-51%; 6-7% slower in two),
# so every supported call now takes it (docs/performance.md).
MIN_FUSED_TOKENS = 1
_SWITCH_VALUES = ("auto", "0", "1")


def fused_enabled(tokens: Optional[int] = None) -> bool:
    """The layer-level switch HYDRALORA_FUSED: 'auto' (unset) dispatches calls of at least MIN_FUSED_TOKENS tokens,
    '1' every call the kernels support, '0' none."""
    mode = os.environ.get("HYDRALORA_FUSED", "auto")
    if mode not in _SWITCH_VALUES:
        raise ValueError(f"HYDRALORA_FUSED={mode!r}: allowed values are {', '.join(_SWITCH_VALUES)} (unset means auto)")
    if mode == "auto":
        return tokens is None or tokens >= MIN_FUSED_TOKENS
    return mode == "1"


def _kernel_device(x: torch.Tensor) -> bool:
    """Whether x is where the kernels run: a CUDA tensor, Triton installed, and not inside a torch.compile trace
    (the launch cache is not traceable; compiled models get the eager formulation, which Inductor fuses)."""
    return HAS_TRITON and x.is_cuda and not torch.compiler.is_compiling()


def layer_fused_supported(layer, adapter_name: str, x: torch.Tensor, result: Optional[torch.Tensor] = None) -> bool:
    """fused_supported for an adapter of a HydraLoraLayer, reading its config and routing state (and the
    HYDRALORA_FUSED switch)."""
    if not _kernel_device(x) or not fused_enabled(x.numel() // max(x.shape[-1], 1)):
        return False  # the device first: on the CPU every call ends here, without reading the environment
    dt, amp = _gemm_dtype(x)
    return _layer_supported(layer, adapter_name, x, dt, amp, *_adapter_args(layer, adapter_name)[:3], result)


def _layer_supported(layer, name: str, x, dt, amp, A, W_g, B, result=None) -> bool:
    cfg = layer.hconfig[name]
    return _supported(x, dt, amp, A, W_g, B, result, cfg.router_input, layer.routing_mode, cfg.top_k,
                      layer.num_experts[name], cfg.masked_experts, layer.training, layer._init_offset(name) is not None,
                      cfg.expert_dropout)


def _plain_linear(base) -> bool:
    """A torch.nn.Linear whose forward is exactly F.linear(x, weight, bias): no subclass, no hooks, frozen."""
    if type(base) is not torch.nn.Linear:
        return False
    weight, bias = base._parameters["weight"], base._parameters["bias"]
    return (
        not (base._forward_hooks or base._forward_pre_hooks)
        and not (_module._global_forward_hooks or _module._global_forward_pre_hooks)
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
    )


def layer_linear_fused(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """base_layer(x) plus the one active adapter's update in one fused op, or None where that does not apply.

    Applies where the layer dispatch would (layer_fused_supported) and the base layer is a plain frozen nn.Linear
    whose weight has the GEMMs' dtype, so that computing F.linear(x, weight, bias) inside the op is exactly what
    base_layer(x) computes. Owning the base GEMM lets its dx GEMM add into the adapter's dx (one pass over dx and one
    autograd node less) and, on the H200, ran the layer 0.2-0.3 ms faster per 8192-token call (docs/performance.md).
    Each adapter weight is read from its ParameterDict once per call: on a fast GPU the layer is bound by its host.
    """
    if not _kernel_device(x) or not fused_enabled(x.numel() // max(x.shape[-1], 1)):
        return None  # the device first: on the CPU every call ends here
    names = [n for n in layer.active_adapters if n in layer.hydralora_A]
    if len(names) != 1:
        return None
    # The wrapped module itself (a nested tuner layer is no plain Linear: it runs as base_layer(x)), and its
    # parameters read from their dicts: nn.Module.__getattr__ costs a Python call per attribute, per layer call.
    base, name = layer._modules["base_layer"], names[0]
    if not _plain_linear(base):
        return None
    A, W_g, B, scaling, kw = _adapter_args(layer, name)
    dt, amp = _gemm_dtype(x)
    if not _layer_supported(layer, name, x, dt, amp, A, W_g, B):
        return None
    weight, bias = base._parameters["weight"], base._parameters["bias"]
    if not (_gemm_operand(weight, x, dt, amp) and (bias is None or _gemm_operand(bias, x, dt, amp))):
        return None
    return _run_for_layer(layer, name, x, None, weight, bias, A, W_g, B, scaling, kw)


def _run_for_layer(layer, name: str, x, res2, weight, bias, A, W_g, B, scaling, kw) -> torch.Tensor:
    """The fused op for one adapter of a layer: its usage counted in the op, B's flat copy from the layer's cache
    where no graph is recorded, the balance loss and statistics recorded on the layer."""
    usage, weights = layer._usage_target(name, x)
    out, logits, gate = _apply_2d(x, res2, weight, bias, A, W_g, B, scaling, kw["temperature"], kw["dropout_p"],
                                  kw["training"], "auto", usage, weights, _cached_flat_B(layer, name, B))
    layer._record(name, logits, gate, x, counted=usage is not None)
    return out


def _cached_flat_B(layer, name: str, B: torch.Tensor) -> Optional[torch.Tensor]:
    """B's (d, N*R) flat copy, built once per weight version for calls without an autograd graph (generation, eval;
    the eager layer's cache entry, the same tensor), else None (the op builds it: training changes B every step)."""
    if torch.is_grad_enabled():
        return None
    return layer._eval_cached(name + ".B", (B,), lambda: _flat_B(B))


def _adapter_args(layer, name: str) -> tuple:
    """An adapter's (A, W_g, B, scaling, keyword arguments) for the fused ops."""
    cfg = layer.hconfig[name]
    kw = dict(dropout_p=cfg.lora_dropout, training=layer.training, temperature=cfg.router_temperature)
    mods = layer._modules  # the ParameterDicts' entries read directly (ParameterDict[name]: four Python calls)
    return (mods["hydralora_A"]._parameters[name], mods["hydralora_router"]._parameters[name],
            mods["hydralora_B"]._parameters[name], layer.scaling[name], kw)


def layer_hydra_delta_fused(layer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """What HydraLoraLayer.hydra_delta computes, through the fused op (call only where layer_fused_supported)."""
    A, W_g, B, scaling, kw = _adapter_args(layer, adapter_name)
    return _run_for_layer(layer, adapter_name, x, result.reshape(-1, result.shape[-1]), None, None, A, W_g, B,
                          scaling, kw)
