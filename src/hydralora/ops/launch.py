"""Launching the Triton kernels (hydralora.ops._triton_kernels): the projection and the backward kernel as
functions of tensors, with the compiled kernel cached per key and launched directly (the autotuner's and Triton's
JIT front end cost host time on every call, more than the kernels run at decode sizes).

Imported only where Triton is installed (see hydralora.ops.fused.HAS_TRITON).
"""

from __future__ import annotations

import os
import warnings

import torch

from . import _triton_kernels as _tk

try:  # where Triton keeps its launch hooks (3.4+); without it every launch goes through Triton's runner
    from triton import knobs as _knobs
except Exception:  # pragma: no cover - depends on the install
    _knobs = None
# the current CUDA stream of a device as an integer, what Triton's runner asks torch for (absent in CPU builds)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1). triton.next_power_of_2 and triton.cdiv are constexpr functions in
    Triton 3.6, about 3 us of host time per call outside a kernel; these run several times per layer call."""
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tune_bucket(T: int) -> int:
    """Bucket of the token count for the autotuner's key (decode, small and large batches tune separately)."""
    return min(pow2(max(int(T), 1)), 8192)


# Launching through the autotuner and Triton's JIT front end costs about 0.15 ms of host time per call on the H200
# machine's host (benchmarks/investigations/profile_layer.py --host), more than the proj kernel runs at 8192 tokens:
# the layer was bound by its host, not its GPU. After the first call for a key (which autotunes and compiles as
# usual) the chosen compiled kernel is launched directly. The key holds everything the compiled code depends on: the
# autotuner's key and the constexprs (`tune`, `kw`), the device, the tensors' dtypes and 16-byte alignment and, for
# the integers the kernels specialize on, divisibility by 16 and equality to 1 (T, TB and the seeds are not
# specialized).
_COMPILED: dict = {}
_PLANS: dict = {}  # kernel name -> (positions of tensor arguments, positions of specialized integer arguments)
_FREE_INTS = frozenset({"T", "TB", "seed_ptr", "s1", "s2", "NB"})
_DIRECT = {"ok": True}  # False once a direct launch failed (a Triton whose compiled-kernel runner differs)
# A call site's short key -> (launcher, function, packed metadata, meta, constexpr tail) of a direct launch. The short
# key names what the site's arguments can vary in (dtypes, sizes the kernel specializes on, which optional tensors
# are given), so with every pointer 16-byte aligned it selects the same compiled kernel as the full key above, for a
# fraction of its host time (the full key reads every tensor's dtype and every integer's divisibility).
_SITES: dict = {}


def _aligned(ptrs) -> bool:
    """Every data pointer 16-byte aligned (what the compiled kernels kept under a site key assume)."""
    acc = 0
    for p in ptrs:
        acc |= p
    return not acc & 15


def _site_launch(hit, grid0: int, grid1: int, dev: int, ptrs, flat) -> bool:
    """Launch a site's kept kernel (`hit`, an _SITES entry) with the flat arguments (tensors as their data pointers
    `ptrs`), or return False where a pointer is not 16-byte aligned or a launch hook is set (then `launch` does it)."""
    if not _aligned(ptrs) or not hooks_idle():
        return False
    run, function, packed, meta, tail = hit
    try:
        run(grid0, grid1, 1, _raw_stream(dev), function, packed, None, None, None, *flat, *tail)
    except Exception:  # the kernels overwrite their outputs, so `launch` can run them again
        _SITES.clear()
        return False
    return True


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


def hooks_idle() -> bool:
    """No Triton launch hooks are registered (profilers such as proton register some): Triton's runner then adds
    nothing to the launch but host time, and the launcher can be called directly."""
    rt = getattr(_knobs, "runtime", None)
    if rt is None:
        return False
    # Triton 3.6 keeps them as HookChain objects (never None) with a list of calls; older ones as None or a callable
    return all(h is None or not getattr(h, "calls", True) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def launch(kernel, grid, args, kw, fixed_cfg, tune, site=None):
    """Run an autotuned kernel; under TRITON_INTERPRET=1 (no driver to tune with) or HYDRALORA_AUTOTUNE=0
    (tests: fewer compilations) run one fixed config instead. `tune`: the values of the autotuner's key. `site`: the
    caller's short key (_site_launch), under which a direct launch is kept once every pointer is 16-byte aligned."""
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
            if direct is not None and hooks_idle():
                # What Triton's runner calls, without its per-launch extras when no hook is set (a closure, device
                # and stream lookups through its driver proxy, launch metadata, two empty hook calls).
                # Tensors go as their data pointers: for a tensor the launcher calls data_ptr() and asks the driver
                # about the pointer (cuPointerGetAttribute), per pointer argument and launch; an int it takes as is.
                run, function, packed = direct
                flat = list(args)
                for i, p in zip(tens, ptrs):
                    flat[i] = p
                run(*g, _raw_stream(dev), function, packed, None, None, None, *flat, *tail)
                if site is not None and site not in _SITES and _aligned(ptrs):
                    _SITES[site] = (*direct, meta, tail)
            else:
                compiled[g](*args, *tail)
            return
        except Exception as err:  # the kernels overwrite their outputs, so launching again below is safe
            _COMPILED.clear()
            _SITES.clear()
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
        direct = _direct_parts(compiled)
        _COMPILED[key] = (compiled, meta, tail, direct)
        if site is not None and direct is not None and _aligned(ptrs):
            _SITES[site] = (*direct, meta, tail)


def _direct_parts(compiled):
    """(launcher, function handle, packed metadata) of a compiled kernel that has been launched once, or None where
    this Triton's compiled kernels do not have them (then its runner launches them)."""
    function, packed = getattr(compiled, "function", None), getattr(compiled, "packed_metadata", None)
    run = getattr(compiled, "run", None)  # a property: builds the launcher if the first launch did not
    if _raw_stream is None or function is None or packed is None or not callable(run):
        return None
    return run, function, packed


def pads(R: int, N: int) -> tuple[int, int]:
    """(RP, NP): the rank and expert count padded to the kernels' power-of-two tile widths (at least 16)."""
    return max(16, pow2(R)), max(16, pow2(N))


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


def proj(x2, A, G, seed, thr, inv_keep, scaling, inv_temp, dropout, usage=None, weights=None, stats=True):
    """(z (T, N*R), h (T, R), gate (T, N), raw logits (T, N)); with stats=False only z is written and the other
    three are None (a call without an autograd graph whose caller records nothing: three allocations fewer)."""
    T, K = x2.shape
    N, R = G.shape[0], A.shape[0]
    RP, NP = pads(R, N)
    dev = x2.device
    z = torch.empty(T, N * R, device=dev, dtype=x2.dtype)
    unused = _placeholder(dev, torch.float32)
    if stats:
        h = torch.empty(T, R, device=dev, dtype=torch.float32)
        gate = torch.empty(T, N, device=dev, dtype=torch.float32)
        raw = torch.empty(T, N, device=dev, dtype=torch.float32)
        h_arg, gate_arg, raw_arg = h, gate, raw
    else:
        h = gate = raw = None
        h_arg = gate_arg = raw_arg = unused
    u = unused if usage is None else usage
    w = unused if weights is None else weights
    S, s0, s1, s2 = _seed_args(seed, dev)
    TB = tune_bucket(T)
    site = ("proj", dev.index, x2.dtype, A.dtype, G.dtype, u.dtype, w.dtype, s0, K, TB, R, N, thr, dropout,
            usage is not None, weights is not None, stats)
    hit = _SITES.get(site)
    if hit is not None:
        ptrs = (x2.data_ptr(), A.data_ptr(), G.data_ptr(), z.data_ptr(), h_arg.data_ptr(), gate_arg.data_ptr(),
                raw_arg.data_ptr(), u.data_ptr(), w.data_ptr(), S.data_ptr())
        if _site_launch(hit, cdiv(T, hit[3]["BT"]), 1, dev.index, ptrs,
                        (*ptrs, s0, s1, s2, T, K, TB, thr, inv_keep, scaling, inv_temp)):
            return z, h, gate, raw
    grid = lambda META: (cdiv(T, META["BT"]),)  # noqa: E731
    args = (x2, A, G, z, h_arg, gate_arg, raw_arg, u, w, S, s0, s1, s2, T, K, TB, thr, inv_keep, scaling, inv_temp)
    kw = dict(R=R, N=N, RP=RP, NP=NP, DROPOUT=dropout, COUNT=usage is not None, HAS_W=weights is not None,
              STATS=stats)
    launch(_tk._proj_fwd, grid, args, kw, {"BT": 32, "BK": 128}, (K, TB), site)
    return z, h, gate, raw


def mix_rows(T: int) -> int:
    """Rows of _proj_mix's one row block for T tokens (tensor-core dots need at least 16)."""
    return max(16, pow2(T))


def proj_mix(x2, res, A, G, Bf, out, scaling, inv_temp, usage=None, weights=None, gate=None):
    """out (T, d) = res + scaling * sum_n gate_n B_n A x2 (no dropout, no routing outputs) in one launch, for T <=
    the fused dispatch's small-call bound; res and out (T, d) contiguous, out may be res; Bf (d, N*R) contiguous.
    usage and weights as proj's. gate: (T, N) fp32 contiguous to apply instead of the router's. Returns out."""
    T, K = x2.shape
    D = res.shape[1]
    N, R = G.shape[0], A.shape[0]
    RP, NP = pads(R, N)
    BT = mix_rows(T)
    dev = x2.device
    unused = _placeholder(dev, torch.float32)
    u = unused if usage is None else usage
    w = unused if weights is None else weights
    p = unused if gate is None else gate
    site = ("proj_mix", dev.index, x2.dtype, A.dtype, G.dtype, Bf.dtype, res.dtype, out.dtype, u.dtype, w.dtype, K, D,
            BT, R, N, usage is not None, weights is not None, gate is not None)
    hit = _SITES.get(site)
    if hit is not None:
        ptrs = (x2.data_ptr(), A.data_ptr(), G.data_ptr(), Bf.data_ptr(), res.data_ptr(), out.data_ptr(), u.data_ptr(),
                w.data_ptr(), p.data_ptr())
        if _site_launch(hit, cdiv(D, hit[3]["BD"]), 1, dev.index, ptrs, (*ptrs, T, K, D, scaling, inv_temp)):
            return out
    grid = lambda META: (cdiv(D, META["BD"]),)  # noqa: E731
    kw = dict(R=R, N=N, RP=RP, NP=NP, COUNT=usage is not None, HAS_W=weights is not None, GIVEN=gate is not None,
              BT=BT)
    launch(_tk._proj_mix, grid, (x2, A, G, Bf, res, out, u, w, p, T, K, D, scaling, inv_temp), kw,
           {"BK": 128, "BD": 64}, (K, D), site)
    return out


def bwd_block_rows(T: int) -> int:
    """Rows per block of the backward kernel for T tokens."""
    return 64 if T >= 1024 else 32  # H200, 8192 tokens: 64 rows per block beat 128 by 14% (results/perf/2026-12-01)


def bwd_x(x2, dz, h, gate, gl, A, G, seed, thr, inv_keep, scaling, inv_temp, dropout, need_dx):
    T, K = x2.shape
    N, R = G.shape[0], A.shape[0]
    RP, NP = pads(R, N)
    BT = bwd_block_rows(T)
    nT = cdiv(T, BT)
    dev = x2.device
    dx = torch.empty_like(x2) if need_dx else x2  # not written when need_dx is False
    part = torch.empty(nT, R + N, K, device=dev, dtype=torch.float32)  # per row block: dA rows, then dW_g rows
    gl_arg = gl.contiguous() if gl is not None else gate
    S, s0, s1, s2 = _seed_args(seed, dev)
    TB = tune_bucket(T)
    site = ("bwd_x", dev.index, x2.dtype, dz.dtype, gl_arg.dtype, A.dtype, G.dtype, s0, K, TB, BT, R, N, thr, dropout,
            gl is not None, need_dx)
    hit = _SITES.get(site)
    launched = False
    if hit is not None:
        ptrs = (x2.data_ptr(), dz.data_ptr(), h.data_ptr(), gate.data_ptr(), gl_arg.data_ptr(), A.data_ptr(),
                G.data_ptr(), dx.data_ptr(), part.data_ptr(), S.data_ptr())
        launched = _site_launch(hit, nT, hit[3]["KSPLIT"], dev.index, ptrs,
                                (*ptrs, s0, s1, s2, T, K, TB, thr, inv_keep, scaling, inv_temp))
    if not launched:
        grid = lambda META: (nT, META["KSPLIT"])  # noqa: E731
        args = (x2, dz, h, gate, gl_arg, A, G, dx, part, S, s0, s1, s2, T, K, TB, thr, inv_keep, scaling, inv_temp)
        kw = dict(R=R, N=N, RP=RP, NP=NP, BT=BT, DROPOUT=dropout, HAS_GL=gl is not None, NEED_DX=need_dx)
        launch(_tk._bwd_x, grid, args, kw, {"BK": 64, "KSPLIT": 2}, (K, TB), site)
    dA, dG = sum_parts(part, R, A.dtype, G.dtype)  # (R, K), (N, K)
    return (dx if need_dx else None), dA, dG


def sum_parts(part, R, a_dtype, g_dtype):
    """(dA (R, K), dW_g (N, K)): bwd_x's per-row-block partial sums `part` (row blocks, R + N, K) fp32 summed over
    the row blocks, written in the weights' dtypes."""
    nb, RN, K = part.shape
    dev = part.device
    dA = torch.empty(R, K, device=dev, dtype=a_dtype)
    dG = torch.empty(RN - R, K, device=dev, dtype=g_dtype)
    site = ("sum_parts", dev.index, a_dtype, g_dtype, K, RN, R)
    hit = _SITES.get(site)
    if hit is not None:
        ptrs = (part.data_ptr(), dA.data_ptr(), dG.data_ptr())
        if _site_launch(hit, cdiv(RN * K, hit[3]["BE"]), 1, dev.index, ptrs, (*ptrs, nb, K, RN)):
            return dA, dG
    grid = lambda META: (cdiv(RN * K, META["BE"]),)  # noqa: E731
    launch(_tk._sum_parts, grid, (part, dA, dG, nb, K, RN), {"R": R}, {"BE": 512}, (K, RN), site)
    return dA, dG


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1): the kernels run on the CPU, for debugging and tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"
