"""Where a layer's fwd+bwd time goes, stage by stage, against each stage's memory-traffic floor: the fused HydraLoRA
path's stages and PEFT LoRA's, each timed alone (median ms), the bytes it must move (every input read once, every
output written once), and the GB/s that makes next to a plain copy's. With --sweep, every config of the two Triton
kernels is timed too (what the autotuner chooses from, and more).

    python benchmarks/breakdown_layer.py --device cuda --json out/breakdown.json --sweep
    python benchmarks/breakdown_layer.py --device cpu --tokens 256 --features 256
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import _common as C
from hydralora.ops import fused as fops


def bench(fn, dev):
    if dev == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
    return C.time_ms(fn, dev, warmup=1, repeats=5)["ms"]


def stages(T, K, d, R, N, p, dev, dt, gen):
    """(name, fn, bytes moved) for every stage of the fused path and of PEFT LoRA's, on random inputs."""
    e = torch.tensor([], dtype=dt).element_size()

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dev, dt)

    x, dy, W = rnd(T, K), rnd(T, d), rnd(d, K, std=K ** -0.5)
    A, G, B = rnd(R, K, std=K ** -0.5), rnd(N, K, std=0.1 * K ** -0.5), rnd(N, d, R, std=0.02)
    y = torch.mm(x, W.t())
    buf = torch.empty_like(x)
    dropout, thr, inv_keep = fops._dropout_params(p, True)
    seed = (123, 456)
    triton_path = fops._use_triton(x, "auto")
    proj = fops._proj_triton if triton_path else fops._proj_torch
    bwd = fops._bwd_x_triton if triton_path else fops._bwd_x_torch
    z, h, gate, raw = proj(x, A, G, seed, thr, inv_keep, 2.0, 1.0, dropout)  # (T, N*R), (T, R), (T, N), (T, N)
    Bf = fops._flat_B(B)  # (d, N*R)
    dz = dy @ Bf  # (T, N*R)
    nT = T // (fops._bwd_bt(T) if triton_path else T)
    dxa, _, _ = bwd(x, dz, h, gate, None, A, G, seed, thr, inv_keep, 2.0, 1.0, dropout, True)
    dxb = torch.mm(dy, W)
    pa = torch.randn(max(nT, 1), R + N, K, generator=gen).to(dev)
    # PEFT LoRA r=R's tensors
    Bp = rnd(d, R, std=0.02)
    mask = torch.rand(T, K, generator=gen).to(dev) >= p
    xd = F.dropout(x, p)
    hp = xd @ A.t()
    delta = hp @ Bp.t()
    dhp = dy @ Bp
    dxd = dhp @ A
    X, Y, small = T * K * e, T * d * e, (R + N) * T * 4
    return [
        ("copy of x (bandwidth reference)", lambda: buf.copy_(x), 2 * X),
        ("base: y = x W^T", lambda: torch.mm(x, W.t()), X + Y + d * K * e),
        ("base: dx = dy W", lambda: torch.mm(dy, W), X + Y + d * K * e),
        ("fused: proj kernel (A, router, softmax, z)", lambda: proj(x, A, G, seed, thr, inv_keep, 2.0, 1.0, dropout),
         X + small + T * N * R * e),
        ("fused: y += z Bf^T (addmm)", lambda: torch.addmm(y, z, Bf.t()), 2 * Y),
        ("fused: dz = dy Bf", lambda: dy @ Bf, Y),
        ("fused: dBf = dy^T z", lambda: dy.t() @ z, Y),
        ("fused: bwd kernel (dx, dA, dW_g partials)",
         lambda: bwd(x, dz, h, gate, None, A, G, seed, thr, inv_keep, 2.0, 1.0, dropout, True),
         2 * X + nT * (R + N) * K * 4),
        ("fused: partial sums over row blocks", lambda: pa.sum(0), pa.numel() * 4),
        ("autograd: dx = dx_base + dx_adapter", lambda: dxb + dxa, 3 * X),
        ("peft: dropout(x)", lambda: F.dropout(x, p), 2 * X + T * K),
        ("peft: h = xd A^T", lambda: xd @ A.t(), X),
        ("peft: delta = h B^T", lambda: hp @ Bp.t(), Y),
        ("peft: y + delta", lambda: y + delta, 3 * Y),
        ("peft: dh = dy B", lambda: dy @ Bp, Y),
        ("peft: dB = dy^T h", lambda: dy.t() @ hp, Y),
        ("peft: dxd = dh A", lambda: dhp @ A, X),
        ("peft: dropout backward (mask, scale)", lambda: dxd * mask * (1 / (1 - p)), 2 * X + T * K),
        ("peft: dA = dh^T xd", lambda: dhp.t() @ xd, X),
    ], dict(x=x, z=z, h=h, gate=gate, dz=dz, A=A, G=G, seed=seed, thr=thr, inv_keep=inv_keep, dropout=dropout)


def sweep(T, K, R, N, t, dev):
    """Every config of a grid around the autotuner's for both kernels: (kernel, config, ms)."""
    import triton

    from hydralora.ops import _triton_kernels as tk

    RP, NP = fops._pads(R, N)
    x, A, G, dz, h, gate = t["x"], t["A"], t["G"], t["dz"], t["h"], t["gate"]
    seed = fops._seed_args(t["seed"], dev)  # (S, seed_ptr, s1, s2): the two ints, as the op passes them
    usage = torch.zeros(N + 1, device=dev)  # the statistics' accumulator (COUNT off below: not written)
    out = []
    z = torch.empty(T, N * R, device=dev, dtype=x.dtype)
    hh = torch.empty(T, R, device=dev, dtype=torch.float32)
    gg, rr = (torch.empty(T, N, device=dev, dtype=torch.float32) for _ in range(2))
    for bt, bk, w, s in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8), (3,)):
        def run(bt=bt, bk=bk, w=w, s=s):
            tk._proj_fwd.fn[(triton.cdiv(T, bt),)](
                x, A, G, z, hh, gg, rr, usage, usage, *seed, T, K, fops._tb(T), t["thr"], t["inv_keep"], 2.0, 1.0,
                R=R, N=N, RP=RP, NP=NP, DROPOUT=t["dropout"], COUNT=False, HAS_W=False, BT=bt, BK=bk,
                num_warps=w, num_stages=s)
        try:
            out.append(("proj", f"BT={bt} BK={bk} warps={w} stages={s}", bench(run, dev)))
        except Exception as err:  # too much shared memory for a config, say
            out.append(("proj", f"BT={bt} BK={bk} warps={w} stages={s}", f"{type(err).__name__}"))
    dx = torch.empty_like(x)
    for bt, bk, ks, w, s in itertools.product((64, 128), (64, 128), (1, 2, 4, 8), (4, 8), (3,)):
        nT = triton.cdiv(T, bt)
        part = torch.empty(nT, R + N, K, device=dev, dtype=torch.float32)

        def run(bt=bt, bk=bk, ks=ks, w=w, s=s, nT=nT, part=part):
            tk._bwd_x.fn[(nT, ks)](
                x, dz, h, gate, gate, A, G, dx, part, *seed, T, K, fops._tb(T), t["thr"], t["inv_keep"], 2.0,
                1.0, R=R, N=N, RP=RP, NP=NP, BT=bt, DROPOUT=t["dropout"], HAS_GL=False, NEED_DX=True, BK=bk,
                KSPLIT=ks, num_warps=w, num_stages=s)
        try:
            out.append(("bwd", f"BT={bt} BK={bk} KSPLIT={ks} warps={w} stages={s}", bench(run, dev)))
        except Exception as err:
            out.append(("bwd", f"BT={bt} BK={bk} KSPLIT={ks} warps={w} stages={s}", f"{type(err).__name__}"))
    return out


def main():
    p = C.base_parser(__doc__.splitlines()[0])
    C.add_layer_args(p)
    p.add_argument("--sweep", action="store_true", help="also time a grid of Triton kernel configs (CUDA)")
    args = p.parse_args()
    dev, dt = args.device, C.resolve_dtype(args)
    cuda = dev == "cuda"
    T, K = C.layer_shape(args, cpu_default=(1024, 512))
    d = K
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    rows_in, tensors = stages(T, K, d, args.r, args.experts, args.dropout, dev, dt, gen)
    rows = []
    for name, fn, nbytes in rows_in:
        ms = bench(fn, dev)
        rows.append({"stage": name, "ms": ms, "MB": nbytes / 1e6, "GB_s": nbytes / ms / 1e6})
    copy_gbs = rows[0]["GB_s"]
    for r in rows:
        r["x_copy_rate"] = r["GB_s"] / copy_gbs
    for prefix in ("fused", "autograd", "peft"):
        part = [r["ms"] for r in rows if r["stage"].startswith(prefix)]
        rows.append({"stage": f"sum of {prefix} stages", "ms": sum(part)})
    info = C.env_info(dev)
    title = (f"Stages of one layer's fwd+bwd: {K}x{d}, {T} tokens, r={args.r}, N={args.experts}, dropout {args.dropout}, "
             f"{dt}, {info.get('gpu', info.get('cpu'))}")
    table = C.print_table(rows, [("stage", "stage", 0), ("ms", "ms", 4), ("MB", "MB moved (floor)", 1),
                                 ("GB_s", "GB/s", 0), ("x_copy_rate", "x copy's rate", 2)], title)
    configs = []
    if args.sweep and cuda and fops.HAS_TRITON:
        configs = sweep(T, K, args.r, args.experts, tensors, dev)
        for kern in ("proj", "bwd"):
            ok = sorted((c for c in configs if c[0] == kern and isinstance(c[2], float)), key=lambda c: c[2])
            print(f"\n{kern}: fastest configs of {sum(c[0] == kern for c in configs)}")
            for c in ok[:8]:
                print(f"  {c[2]:.4f} ms  {c[1]}")
            if ok:
                print(f"  slowest {ok[-1][2]:.4f} ms  {ok[-1][1]}")
    C.write_json(args.json, {"bench": "breakdown", "env": info, "config": vars(args) | {"tokens": T, "features": K},
                             "rows": rows, "configs": configs, "table": table})


if __name__ == "__main__":
    main()
