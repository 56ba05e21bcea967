"""What the dropout mask costs the fused kernels on the GPU, and what cheaper mask functions would save: the
projection and backward kernels (hydralora.ops._triton_kernels) built with each variant of their `_keep` function,
timed as GPU time (CUDA graph replays of the kernel alone, triton.testing.do_bench_cudagraph), at the shapes of a
LLaMA-7B-shaped layer.

    python benchmarks/investigations/dropout_hash_cost.py --json OUT.json          # CUDA, about a minute

Variants of the mask (each builds its own copy of the kernel module, with `_keep` replaced):
  off        no dropout (DROPOUT=False): the floor
  pair3      the shipped mask: one hash of three multiplies per pair of columns, 16 bits per element
  quad16     one hash per four columns and a second word derived from it by one multiply-xorshift round, 16 bits
             per element (p as exact as the shipped mask's)
The variants' masks differ; only their cost is compared here (the shipped mask's statistics are tested in
tests/test_ops.py). Dropping the hash's seeding multiply instead changes no instruction count: it rides in an IMAD
with the seed's add (sm_90 SASS of both kernels, 1752 and 1432 instructions either way); quad16 has 1544 and
1360. In the backward kernel the hash is evaluated twice per element pair, once in each register layout that
reads the mask (Triton rematerializes it rather than converting the mask between layouts).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
import tempfile
from typing import Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from hydralora.ops import _triton_kernels as tk  # noqa: E402
from hydralora.ops.launch import bwd_block_rows, cdiv, pads, tune_bucket  # noqa: E402

# Each variant: edits (shipped line -> replacement) of the shipped `_keep`, so it keeps the shipped hash rounds.
VARIANTS = {
    "quad16": [
        ("    pc = k0 // 2 + tl.arange(0, BK // 2)\n", "    pc = k0 // 4 + tl.arange(0, BK // 4)\n"),
        ("((K + 1) // 2)", "((K + 3) // 4)"),
        ("    lo = (v & 0xFFFF)", "    w = (v ^ (v >> 15)) * tl.full((), _C1, tl.int32).to(tl.uint32, bitcast=True)\n"
                                "    w = w ^ (w >> 16)\n"
                                "    lo = (v & 0xFFFF)"),
        ("    return tl.interleave(lo, hi) >= thr",
         "    lo2 = (w & 0xFFFF).to(tl.int32, bitcast=True)\n"
         "    hi2 = (w >> 16).to(tl.int32, bitcast=True)\n"
         "    return tl.interleave(tl.interleave(lo, lo2), tl.interleave(hi, hi2)) >= thr"),
    ],
}


def variant_module(name: str):
    """The kernel module with `_keep` edited by VARIANTS[name] (the shipped module for 'pair3' and 'off'). Triton
    reads a jit function's source from its file, so each variant is written to a file and imported from there."""
    if name not in VARIANTS:
        return tk
    src = inspect.getsource(tk)
    start = src.index("@triton.jit\ndef _keep(")
    end = src.index("\n\n\n", start)
    keep = src[start:end]
    for old, new in VARIANTS[name]:
        if old not in keep:
            raise RuntimeError(f"variant {name}: the shipped _keep no longer contains {old!r}")
        keep = keep.replace(old, new)
    body = src[:start] + keep + src[end:]
    path = os.path.join(tempfile.mkdtemp(prefix="hydralora_keep_"), f"kernels_{name}.py")
    with open(path, "w") as f:
        f.write(body)
    spec = importlib.util.spec_from_file_location(f"kernels_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_kernels(mod, T: int, K: int, dropout: bool, R: int = 8, N: int = 3, proj_cfg: Optional[dict] = None,
                 bwd_cfg: Optional[dict] = None, bwd_bt: Optional[int] = None) -> dict:
    """GPU microseconds of one projection and one backward kernel at (T, K), bf16: through the autotuner's choice,
    or with an explicit config (proj_cfg: BT, BK, num_warps, num_stages; bwd_cfg: BK, KSPLIT, num_warps, num_stages;
    bwd_bt: the backward's rows per block, else the launcher's choice). Also the config the autotuner chose."""
    from triton.testing import do_bench_cudagraph

    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, K, device=dev, dtype=dt, generator=g)
    A = torch.randn(R, K, device=dev, dtype=dt, generator=g) / K**0.5
    G = torch.randn(N, K, device=dev, dtype=dt, generator=g) / K**0.5
    z = torch.empty(T, N * R, device=dev, dtype=dt)
    h = torch.empty(T, R, device=dev, dtype=torch.float32)
    gate = torch.empty(T, N, device=dev, dtype=torch.float32)
    raw = torch.empty(T, N, device=dev, dtype=torch.float32)
    usage = torch.zeros(N + 1, device=dev, dtype=torch.float32)
    S = torch.zeros(2, device=dev, dtype=torch.int64)
    thr, inv_keep = 3277, 1 / 0.95
    TB = tune_bucket(T)
    RP, NP = pads(R, N)
    common = (S, 0, 12345, 678, T, K, TB, thr, inv_keep, 2.0, 1.0)

    pk = mod._proj_fwd if proj_cfg is None else mod._proj_fwd.fn  # the autotuner, or the jit function itself

    def proj():
        pk[lambda m: (cdiv(T, m["BT"]),)](
            x, A, G, z, h, gate, raw, usage, usage, *common, R=R, N=N, RP=RP, NP=NP, DROPOUT=dropout, COUNT=True,
            HAS_W=False, STATS=True, **(proj_cfg or {}))

    BT = bwd_bt or bwd_block_rows(T)
    nT = cdiv(T, BT)
    dz = torch.randn(T, N * R, device=dev, dtype=dt, generator=g)
    dx = torch.empty_like(x)
    part = torch.empty(nT, R + N, K, device=dev, dtype=torch.float32)

    bk = mod._bwd_x if bwd_cfg is None else mod._bwd_x.fn

    def bwd():
        bk[lambda m: (nT, m["KSPLIT"])](
            x, dz, h, gate, gate, A, G, dx, part, *common, R=R, N=N, RP=RP, NP=NP, BT=BT, DROPOUT=dropout,
            HAS_GL=False, NEED_DX=True, **(bwd_cfg or {}))

    out = {}
    for name, fn in (("proj_us", proj), ("bwd_us", bwd)):
        fn()  # autotune and compile outside the graph
        torch.cuda.synchronize()
        out[name] = 1e3 * do_bench_cudagraph(fn, rep=50)
    for name, k in (("proj_chosen", pk), ("bwd_chosen", bk)):
        best = getattr(k, "best_config", None)
        if best is not None:
            out[name] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
    floor = torch.empty_like(x)
    out["copy_x_us"] = 1e3 * do_bench_cudagraph(lambda: floor.copy_(x), rep=50)  # read + write of x: bandwidth
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8192x4096,4096x4096,4096x11008", help="TxK list")
    p.add_argument("--variants", default="off,pair3,quad16")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("dropout_hash_cost.py needs a CUDA device")
    rows = []
    for v in args.variants.split(","):
        mod = variant_module("pair3" if v == "off" else v)
        for shape in args.shapes.split(","):
            T, K = (int(s) for s in shape.split("x"))
            r = {"variant": v, "T": T, "K": K, **time_kernels(mod, T, K, dropout=v != "off")}
            rows.append(r)
            print(f"{v:6s} T={T:5d} K={K:5d}  proj {r['proj_us']:7.1f} us  bwd {r['bwd_us']:7.1f} us  "
                  f"(copy of x {r['copy_x_us']:.1f} us)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
