"""Where one variant of bench_layer spends its time: torch.profiler over a few fwd+bwd steps, a table of the ops by
device time (CPU time on the CPU), and optionally a Chrome trace: the frozen layer's three GEMMs against everything
a variant adds; with --host, cProfile of the Python side instead.

    python benchmarks/investigations/profile_layer.py --device cuda --variant ours --precision amp \
        --trace out/fused.json
    python benchmarks/investigations/profile_layer.py --device cpu --variant "peft r8" --tokens 256 --features 256
    python benchmarks/investigations/profile_layer.py --device cuda --variant ours --host --steps 50   # Python side
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # _common, bench_layer

import cProfile
import pstats

import torch
from torch.profiler import ProfilerActivity, profile

import _common as C
from bench_layer import build, make_step, switch_for


def main():
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--variant", default="ours eager", help="a bench_layer variant (base, peft r8, ours, ours eager, "
                                                             "ours layer, ours fused delta, authors, ours compile)")
    C.add_layer_args(p)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=25, help="rows of the table")
    p.add_argument("--trace", default=None, metavar="OUT",
                   help="also write a Chrome trace (chrome://tracing, Perfetto)")
    p.add_argument("--inference", action="store_true", help="forward only, eval mode, no grad (decode-like calls)")
    p.add_argument("--host", action="store_true",
                   help="profile the host side instead (cProfile: Python functions by own time, what a launch-bound "
                        "variant spends before the GPU gets its work)")
    args = p.parse_args()
    dev, dt = args.device, C.resolve_dtype(args)
    cuda = dev == "cuda"
    T, k = C.layer_shape(args)
    d = k
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(T, k, generator=gen).to(dev, dt).requires_grad_(not args.inference)
    dy = torch.randn(T, d, generator=gen).to(dev, dt)
    layer, trainable = build(args.variant, k, d, dev, dt, args)
    layer.train(not args.inference)
    step = make_step(layer, trainable, x, dy, args)

    with C.fused_switch(switch_for(args.variant)):
        for _ in range(3):  # warm-up: autotuning, compilation, allocator
            step()
        C.sync(dev)
        if args.host:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.steps):
                step()
            prof.disable()
            C.sync(dev)
            print(f"{args.variant}: host side of {args.steps} steps (cProfile, by own time)")
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.rows)
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            C.sync(dev)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"{args.variant}: {k}x{d}, {T} tokens, r={args.r}, N={args.experts}, dropout {args.dropout}, {dt}, "
          f"precision {args.precision}, {args.steps} steps")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
