"""Triton kernels of the fused HydraLoRA path (imported only where Triton is available).

The kernels, each one pass over x (T, K) but _sum_parts:

_proj_fwd: reads x once; h = A (mask * x) / (1 - p) and logits = W_g x by two small tensor-core dots per K tile; the
    epilogue takes the softmax and writes z[t, n*R + j] = scaling * gate[t, n] * h[t, j] (the input of the stacked
    B GEMM) and, with STATS, h and gate (fp32, tiny, for backward) and the raw logits. The dropout mask is a hash of
    (seed, index of a pair of neighbouring columns), 16 bits per element: never stored, regenerated in backward. The
    seed: two scalars, or read from a device tensor S (2,) int64 (calls captured in a CUDA graph). With COUNT it
    also adds the gate's column sums and the token count (each token weighted by W[t] with HAS_W) into the layer's
    usage statistics U (N + 1,) fp32 by atomics: the statistics cost no extra kernel and no host work per call.
_bwd_x: from dz (T, N*R) rebuilds dh and dlogits per row (softmax backward included), then per K tile writes
    dx = mask * (dh A) / (1 - p) + dlogits W_g and per-row-block partial sums of dA = dh^T (mask * x) / (1 - p)
    and dW_g = dlogits^T x into one (row blocks, R + N, K) buffer.
_sum_parts: sums that buffer over its row blocks in fp32 and writes dA and dW_g in the weights' dtype: one launch
    for what a torch reduction, a cast and two slices did in four host calls (deterministic, no atomics).
_proj_mix: calls of a few tokens without routing outputs (decode steps): h, the gate and the experts' update
    scaling * sum_n gate_n B_n h added into the base output, in one launch (the B GEMM's too).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Hash constants, written as signed int32 bit patterns (see reference.keep_mask for the same function).
_GOLD = tl.constexpr(-1640531535)  # 0x9E3779B1 (constexpr: Triton jit code may read only constexpr globals)
_C1 = tl.constexpr(2146121005)  # 0x7FEB352D
_C2 = tl.constexpr(-2073254261)  # 0x846CA68B


@triton.jit
def _keep(rows, k0, K, s1, s2, thr, BK: tl.constexpr):
    """Dropout keep mask [BT, BK] of columns k0 .. k0 + BK (k0 even): one lowbias32 hash per pair of neighbouring
    columns, keyed by the seed (s1, s2), whose low 16 bits decide the even column and high 16 bits the odd one.
    Half the hashes of one per element: the integer work of the hash bounded both kernels' time (about 15 integer
    ops per element of x against the tensor cores' few)."""
    pc = k0 // 2 + tl.arange(0, BK // 2)
    idx = rows[:, None] * ((K + 1) // 2) + pc[None, :]  # [BT, BK // 2] pair index, row-major over (T, ceil(K / 2))
    v = idx.to(tl.uint32, bitcast=True) ^ s1.to(tl.uint32, bitcast=True)
    v = v * tl.full((), _GOLD, tl.int32).to(tl.uint32, bitcast=True) + s2.to(tl.uint32, bitcast=True)
    v = v ^ (v >> 16)
    v = v * tl.full((), _C1, tl.int32).to(tl.uint32, bitcast=True)
    v = v ^ (v >> 15)
    v = v * tl.full((), _C2, tl.int32).to(tl.uint32, bitcast=True)
    v = v ^ (v >> 16)
    lo = (v & 0xFFFF).to(tl.int32, bitcast=True)
    hi = (v >> 16).to(tl.int32, bitcast=True)
    return tl.interleave(lo, hi) >= thr  # [BT, BK]: column 2j from lo[:, j], 2j + 1 from hi[:, j]


def _fwd_configs():
    out = []
    # H200, 8192 x 4096 (results/perf/2026-12-01/breakdown_and_sweep.json): BT=64 with BK=256/8 warps or BK=128 fastest.
    # At 4096 tokens 64-row blocks leave half of an H100's or H200's 132 SMs idle: with dropout 32x128 is the fastest
    # there (H100: 42.5 us against 55.6 for 64x128 at 4096 x 4096; results/perf/2026-12-07/h100-configs).
    for bt, bk, w, s in [(16, 256, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (64, 256, 8, 3),
                         (128, 64, 8, 3), (32, 128, 4, 3)]:
        out.append(triton.Config({"BT": bt, "BK": bk}, num_warps=w, num_stages=s))
    return out


@triton.jit
def _x_tiles(X, A, G, rows, rmask, k0, K, R: tl.constexpr, N: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr,
             BK: tl.constexpr):
    """The K tile k0 .. k0 + BK of x's rows [BT, BK], of A transposed [BK, RP] and of W_g transposed [BK, NP]: zero
    past T, K, R and N."""
    cols = k0 + tl.arange(0, BK)
    cmask = cols < K
    jr = tl.arange(0, RP)
    jn = tl.arange(0, NP)
    x = tl.load(X + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    a = tl.load(A + jr[None, :] * K + cols[:, None], mask=(jr[None, :] < R) & cmask[:, None], other=0.0)
    g = tl.load(G + jn[None, :] * K + cols[:, None], mask=(jn[None, :] < N) & cmask[:, None], other=0.0)
    return x, a, g


@triton.jit
def _gate(acc_g, inv_temp, N: tl.constexpr, NP: tl.constexpr):
    """softmax(W_g x / temperature) [BT, NP] fp32 from the raw logits acc_g [BT, NP]: 0 on the padded columns."""
    jn = tl.arange(0, NP)
    logits = tl.where(jn[None, :] < N, acc_g * inv_temp, float("-inf"))
    m = tl.max(logits, 1)
    e = tl.exp(logits - m[:, None])
    return e / tl.sum(e, 1)[:, None]


@triton.jit
def _count(gate, rows, rmask, U, W, N: tl.constexpr, NP: tl.constexpr, HAS_W: tl.constexpr):
    """Usage statistics: U[:N] += sum_t w_t gate[t, :], U[N] += sum_t w_t (w_t = 1 without HAS_W)."""
    jn = tl.arange(0, NP)
    if HAS_W:
        w = tl.load(W + rows, mask=rmask, other=0).to(tl.float32)  # [BT]
    else:
        w = rmask.to(tl.float32)  # rows past T hold a uniform gate: weight 0
    tl.atomic_add(U + jn, tl.sum(gate * w[:, None], 0), mask=jn < N)
    tl.atomic_add(U + N, tl.sum(w, 0))


# restore_value: the autotuner's timing runs must not add to the usage statistics.
@triton.autotune(configs=_fwd_configs(), key=["K", "TB", "DROPOUT"], restore_value=["U"])
# A fresh seed per call, or a new token count, must not select (and compile) a new variant: no specialization on
# them. The seed: the scalars s1, s2, or with seed_ptr != 0 read from S (2,) int64 on the device, where
# fused.new_seed draws it while a CUDA graph is captured (its replays draw fresh ones). A runtime switch, not a
# constexpr: a capture must not compile a new variant.
@triton.jit(do_not_specialize=["T", "TB", "seed_ptr", "s1", "s2"])
def _proj_fwd(
    X, A, G, Z, H, P, L, U, W, S, seed_ptr, s1, s2, T, K, TB, thr, inv_keep, scaling, inv_temp,
    R: tl.constexpr, N: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr,
    DROPOUT: tl.constexpr, COUNT: tl.constexpr, HAS_W: tl.constexpr, STATS: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < T
    jr = tl.arange(0, RP)
    jn = tl.arange(0, NP)
    acc_h = tl.zeros([BT, RP], dtype=tl.float32)
    acc_g = tl.zeros([BT, NP], dtype=tl.float32)
    if DROPOUT:
        if seed_ptr != 0:
            s1 = tl.load(S).to(tl.int32)
            s2 = tl.load(S + 1).to(tl.int32)
    for k0 in range(0, K, BK):
        x, a, g = _x_tiles(X, A, G, rows, rmask, k0, K, R, N, RP, NP, BK)  # [BT, BK], [BK, RP], [BK, NP]
        acc_g = tl.dot(x, g, acc_g)
        if DROPOUT:
            keep = _keep(rows, k0, K, s1, s2, thr, BK)
            x = tl.where(keep, x, tl.zeros_like(x))
        acc_h = tl.dot(x, a, acc_h)
    h = acc_h * inv_keep
    gate = _gate(acc_g, inv_temp, N, NP)  # [BT, NP]
    hmask = rmask[:, None] & (jr[None, :] < R)
    nmask = rmask[:, None] & (jn[None, :] < N)
    if COUNT:
        _count(gate, rows, rmask, U, W, N, NP, HAS_W)
    if STATS:  # for backward and the layer's losses; a call without an autograd graph in eval needs only z
        tl.store(H + rows[:, None] * R + jr[None, :], h, mask=hmask)
        tl.store(P + rows[:, None] * N + jn[None, :], gate, mask=nmask)
        tl.store(L + rows[:, None] * N + jn[None, :], acc_g, mask=nmask)
    for n in tl.static_range(N):  # z[:, n*R:(n+1)*R] = scaling * gate[:, n] * h (2-D tiles: no 3-D register blocks)
        gn = tl.sum(tl.where(jn[None, :] == n, gate, 0.0), 1)  # [BT]
        zn = (gn * scaling)[:, None] * h
        tl.store(Z + rows[:, None] * (N * R) + n * R + jr[None, :], zn.to(Z.dtype.element_ty), mask=hmask)


def _bwd_configs():
    out = []
    # H200, 8192 x 4096: BK=64, 4 warps, KSPLIT 4-8 fastest; BK=128 with KSPLIT=1 4x slower
    for bk, w, s, ks in [(64, 4, 3, 2), (64, 4, 3, 4), (64, 4, 3, 8), (128, 4, 3, 2), (128, 8, 3, 4), (64, 8, 3, 4)]:
        out.append(triton.Config({"BK": bk, "KSPLIT": ks}, num_warps=w, num_stages=s))
    return out


@triton.autotune(configs=_bwd_configs(), key=["K", "TB", "DROPOUT", "NEED_DX"])
@triton.jit(do_not_specialize=["T", "TB", "seed_ptr", "s1", "s2"])
def _bwd_x(
    X, DZ, H, P, GL, A, G, DX, PART, S, seed_ptr, s1, s2, T, K, TB, thr, inv_keep, scaling, inv_temp,
    R: tl.constexpr, N: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_GL: tl.constexpr, NEED_DX: tl.constexpr, BK: tl.constexpr, KSPLIT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    rmask = rows < T
    jr = tl.arange(0, RP)
    jn = tl.arange(0, NP)
    hmask = rmask[:, None] & (jr[None, :] < R)
    nmask = rmask[:, None] & (jn[None, :] < N)
    h = tl.load(H + rows[:, None] * R + jr[None, :], mask=hmask, other=0.0)  # [BT, RP]
    gate = tl.load(P + rows[:, None] * N + jn[None, :], mask=nmask, other=0.0)  # [BT, NP]
    dh = tl.zeros([BT, RP], dtype=tl.float32)
    dgate = tl.zeros([BT, NP], dtype=tl.float32)
    for n in tl.static_range(N):
        dzn = tl.load(DZ + rows[:, None] * (N * R) + n * R + jr[None, :], mask=hmask, other=0.0).to(tl.float32)
        gn = tl.sum(tl.where(jn[None, :] == n, gate, 0.0), 1)  # [BT]
        dh += (gn * scaling)[:, None] * dzn
        dgn = tl.sum(dzn * h, 1) * scaling  # [BT]
        dgate += tl.where(jn[None, :] == n, dgn[:, None], 0.0)
    dlog = gate * (dgate - tl.sum(gate * dgate, 1)[:, None]) * inv_temp
    if HAS_GL:
        dlog += tl.load(GL + rows[:, None] * N + jn[None, :], mask=nmask, other=0.0).to(tl.float32)
    dh = dh * inv_keep
    dh_b = dh.to(X.dtype.element_ty)
    dl_b = dlog.to(X.dtype.element_ty)
    dh_t = tl.trans(dh_b)  # [RP, BT]
    dl_t = tl.trans(dl_b)  # [NP, BT]
    kchunk = tl.cdiv(tl.cdiv(K, KSPLIT), BK) * BK
    k_lo = pid_k * kchunk
    k_hi = tl.minimum(k_lo + kchunk, K)
    if DROPOUT:
        if seed_ptr != 0:
            s1 = tl.load(S).to(tl.int32)
            s2 = tl.load(S + 1).to(tl.int32)
    for k0 in range(k_lo, k_hi, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < k_hi
        xm = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * K + cols[None, :], mask=xm, other=0.0)
        a = tl.load(A + jr[:, None] * K + cols[None, :], mask=(jr[:, None] < R) & cmask[None, :], other=0.0)  # [RP, BK]
        g = tl.load(G + jn[:, None] * K + cols[None, :], mask=(jn[:, None] < N) & cmask[None, :], other=0.0)  # [NP, BK]
        if DROPOUT:
            keep = _keep(rows, k0, K, s1, s2, thr, BK)
            xd = tl.where(keep, x, tl.zeros_like(x))
        else:
            xd = x
        if NEED_DX:
            dxa = tl.dot(dh_b, a)  # [BT, BK]
            if DROPOUT:
                dxa = tl.where(keep, dxa, 0.0)
            dx = tl.dot(dl_b, g, dxa)
            tl.store(DX + rows[:, None] * K + cols[None, :], dx.to(DX.dtype.element_ty), mask=xm)
        pa = tl.dot(dh_t, xd)  # [RP, BK]
        pg = tl.dot(dl_t, x)  # [NP, BK]
        part = PART + pid_t * (R + N) * K  # this row block's (R + N, K) slab: dA rows, then dW_g rows
        tl.store(part + jr[:, None] * K + cols[None, :], pa, mask=(jr[:, None] < R) & cmask[None, :])
        tl.store(part + (R + jn[:, None]) * K + cols[None, :], pg, mask=(jn[:, None] < N) & cmask[None, :])


# One fixed config: the autotuner with a single config runs no benchmark, but keeps the chosen config, through which
# hydralora.ops.launch launches the compiled kernel directly after the first call.
@triton.autotune(configs=[triton.Config({"BE": 512}, num_warps=4, num_stages=1)], key=["K", "RN"])
@triton.jit(do_not_specialize=["NB"])
def _sum_parts(PART, DA, DG, NB, K, RN, R: tl.constexpr, BE: tl.constexpr):
    """DA (R, K) and DG (RN - R, K) = PART (NB, RN, K) summed over its NB row blocks, flat over RN * K elements."""
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    emask = e < RN * K
    acc = tl.zeros([BE], dtype=tl.float32)
    ptrs = PART + e
    for _ in range(0, NB):  # the pointers advance one row block per step (64-bit: NB * RN * K may pass 2**31)
        acc += tl.load(ptrs, mask=emask, other=0.0)
        ptrs += RN * K
    in_a = e < R * K
    tl.store(DA + e, acc.to(DA.dtype.element_ty), mask=emask & in_a)
    tl.store(DG + (e - R * K), acc.to(DG.dtype.element_ty), mask=emask & (e >= R * K))


# One fixed config (see _sum_parts): the kernel runs at decode sizes only, where the host, not the GPU, sets the pace.
@triton.autotune(configs=[triton.Config({"BK": 128, "BD": 64}, num_warps=4, num_stages=3)], key=["K", "D"])
@triton.jit(do_not_specialize=["T"])
def _proj_mix(
    X, A, G, BF, RES, OUT, U, W, P, T, K, D, scaling, inv_temp,
    R: tl.constexpr, N: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr, COUNT: tl.constexpr, HAS_W: tl.constexpr,
    GIVEN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    """OUT[:, cols] = RES[:, cols] + scaling * sum_n gate[:, n] (h BF[cols, n*R:(n+1)*R]^T) for one block of BD
    output columns, all T <= BT tokens: each program recomputes h = A x and the gate (T x K reads, cheap at decode
    sizes) and adds the experts' update into the base output itself, so the stacked B GEMM needs no launch of its
    own. z is rounded to x's dtype before the B product, as in the cuBLAS path. OUT may be RES. GIVEN: the gate is
    read from P (T, N) fp32 (sequence routing's per-sequence gate) instead of computed by the router G."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BT)
    rmask = rows < T
    jr = tl.arange(0, RP)
    jn = tl.arange(0, NP)
    acc_h = tl.zeros([BT, RP], dtype=tl.float32)
    acc_g = tl.zeros([BT, NP], dtype=tl.float32)
    for k0 in range(0, K, BK):
        x, a, g = _x_tiles(X, A, G, rows, rmask, k0, K, R, N, RP, NP, BK)  # [BT, BK], [BK, RP], [BK, NP]
        if not GIVEN:
            acc_g = tl.dot(x, g, acc_g)  # [BT, NP]
        acc_h = tl.dot(x, a, acc_h)  # [BT, RP]
    if GIVEN:
        gate = tl.load(P + rows[:, None] * N + jn[None, :], mask=rmask[:, None] & (jn[None, :] < N),
                       other=0.0)  # [BT, NP]
    else:
        gate = _gate(acc_g, inv_temp, N, NP)  # [BT, NP]
    if COUNT:
        if pid == 0:  # every program holds the same gate: one counts it
            _count(gate, rows, rmask, U, W, N, NP, HAS_W)
    dcols = pid * BD + tl.arange(0, BD)
    dmask = dcols < D
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for n in tl.static_range(N):
        gn = tl.sum(tl.where(jn[None, :] == n, gate, 0.0), 1)  # [BT]
        zn = ((gn * scaling)[:, None] * acc_h).to(X.dtype.element_ty)  # [BT, RP]
        b = tl.load(BF + dcols[None, :] * (N * R) + n * R + jr[:, None], mask=(jr[:, None] < R) & dmask[None, :],
                    other=0.0)  # [RP, BD]
        acc = tl.dot(zn, b, acc)  # [BT, BD]
    omask = rmask[:, None] & dmask[None, :]
    res = tl.load(RES + rows[:, None] * D + dcols[None, :], mask=omask, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * D + dcols[None, :], (res + acc).to(OUT.dtype.element_ty), mask=omask)
