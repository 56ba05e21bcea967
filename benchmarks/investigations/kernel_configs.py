"""GPU time of the fused kernels per launch config at a train step's shapes: is a config missing from the
autotuners' lists (hydralora.ops._triton_kernels) that runs faster than the one they choose?

    python benchmarks/investigations/kernel_configs.py --json OUT.json          # CUDA, a few minutes

At 4096 tokens the projection kernel's 64-row blocks give 64 programs, fewer than the H100's or H200's 132 SMs;
smaller row blocks give more. Each config is compiled for the shipped kernels (dropout on and off) and timed by
CUDA graph replays (dropout_hash_cost.time_kernels), beside the autotuner's own choice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dropout_hash_cost import time_kernels, tk  # noqa: E402

PROJ = [(64, 128, 4, 3), (32, 128, 4, 3), (32, 64, 4, 3), (16, 128, 4, 3), (16, 64, 4, 3), (32, 128, 2, 3),
        (16, 128, 2, 3), (32, 256, 4, 3), (16, 256, 4, 3)]  # (BT, BK, warps, stages)
# More warps per program (at 4096 tokens one 32-row, 4-warp program per SM runs one warp per scheduler): on the H100
# each is slower than the 4-warp config listed first (results/perf/2026-12-07/h100-suite-paired).
PROJ_WARPS = [(32, 128, 4, 3), (32, 128, 8, 3), (32, 64, 8, 3), (16, 128, 8, 3), (64, 128, 8, 3), (32, 256, 8, 3),
              (64, 64, 8, 3)]
BWD = [(64, 64, 2, 4, 3), (64, 64, 4, 4, 3), (64, 64, 8, 4, 3), (32, 64, 4, 4, 3), (32, 64, 2, 4, 3),
       (128, 64, 4, 8, 3)]  # (BT, BK, KSPLIT, warps, stages)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,4096x11008,8192x4096", help="TxK list")
    p.add_argument("--proj", choices=["list", "warps"], default="list",
                   help="list: the projection configs PROJ beside the backward's BWD; warps: PROJ_WARPS (8 warps)")
    p.add_argument("--dropout", choices=["both", "on"], default="both")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    proj_list, bwd_list = (PROJ, BWD) if args.proj == "list" else (PROJ_WARPS, [])
    if not torch.cuda.is_available():
        sys.exit("kernel_configs.py needs a CUDA device")
    rows = []

    def save():  # after every shape and dropout setting: a run cut by a time limit keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)

    for shape in args.shapes.split(","):
        T, K = (int(s) for s in shape.split("x"))
        for dropout in (True, False) if args.dropout == "both" else (True,):
            auto = time_kernels(tk, T, K, dropout)
            rows.append({"T": T, "K": K, "dropout": dropout, "config": "autotuned", **auto})
            print(f"T={T} K={K} dropout={dropout}: autotuned proj {auto['proj_us']:.1f} us "
                  f"{auto.get('proj_chosen')}, bwd {auto['bwd_us']:.1f} us {auto.get('bwd_chosen')}", flush=True)
            # the projection configs past bwd_list's length time the backward with its autotuned config
            bwds = bwd_list + [(None,) * 5] * (len(proj_list) - len(bwd_list))
            for (bt, bk, w, s), (bbt, bbk, ks, bw, bs) in zip(proj_list, bwds):
                pc = {"BT": bt, "BK": bk, "num_warps": w, "num_stages": s}
                bc = None if bbt is None else {"BK": bbk, "KSPLIT": ks, "num_warps": bw, "num_stages": bs}
                try:
                    r = time_kernels(tk, T, K, dropout, proj_cfg=pc, bwd_cfg=bc or auto.get("bwd_chosen"),
                                     bwd_bt=bbt)
                except Exception as err:  # a config that does not compile or run here
                    rows.append({"T": T, "K": K, "dropout": dropout, "proj": pc, "bwd": bc, "error": str(err)[:300]})
                    print(f"  {pc} {bc}: {type(err).__name__}", flush=True)
                    continue
                rows.append({"T": T, "K": K, "dropout": dropout, "proj": pc, "bwd": bc, "bwd_bt": bbt, **r})
                print(f"  proj {bt:3d}x{bk:3d} w{w}: {r['proj_us']:7.1f} us   bwd "
                      f"{'' if bc is None else f'BT{bbt} BK{bbk} KS{ks} w{bw}'}: {r['bwd_us']:7.1f} us", flush=True)
            save()


if __name__ == "__main__":
    main()
