"""Where the host's time goes on a GPU machine, per adapted layer call: the host microseconds of single ops (a cuBLAS
GEMM, the fused op's two Triton launches, allocations, the dropout seed), of each phase of a trainer step through
the PeftModel (forward, backward, AdamW, zero_grad) and of a decode call, for the frozen base, PEFT LoRA r=8 and
HydraLoRA; the kernels each launches; torch.profiler's host-side op table; cProfile's table of the Python functions
the host spends its time in, per layer call and in a greedy generate (host ms per new token beside it); and the
synchronizing calls a train step makes (torch.cuda.set_sync_debug_mode).

    python benchmarks/investigations/host_phases.py --json OUT.json          # CUDA; about 1 minute
    python benchmarks/investigations/host_phases.py --device cpu             # checks the script runs

The shapes are small (64 tokens, 1024 features by default) so the GPU finishes every kernel before the host issues
the next: each figure is the host's own time, what a fast GPU waits for.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # _common, bench_layer

import cProfile
import io
import pstats
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import _common as C
from bench_layer import build


def host_us(fn, n: int, dev: str) -> float:
    """The host's microseconds per call of fn over n back-to-back calls (no sync inside the loop)."""
    for _ in range(10):
        fn()
    C.sync(dev)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t) / n * 1e6
    C.sync(dev)
    return us


def best(fn, n: int, dev: str, rounds: int = 3) -> float:
    return round(min(host_us(fn, n, dev) for _ in range(rounds)), 2)


def single_ops(T: int, K: int, dev: str, dt) -> dict:
    """Host us of the ops one fused call is made of, and of their PyTorch counterparts."""
    from hydralora.ops import fused, launch

    x = torch.randn(T, K, device=dev, dtype=dt)
    W = torch.randn(K, K, device=dev, dtype=dt)
    R, N = 8, 3
    A = torch.randn(R, K, device=dev, dtype=dt) * 0.02
    G = torch.randn(N, K, device=dev, dtype=dt) * 0.02
    Bf = torch.randn(K, N * R, device=dev, dtype=dt) * 0.02
    z = torch.randn(T, N * R, device=dev, dtype=dt)
    res = torch.randn(T, K, device=dev, dtype=dt)
    out = {
        "python loop": best(lambda: None, 2000, dev),
        "torch.mm x W^T": best(lambda: torch.mm(x, W.t()), 1000, dev),
        "torch.addmm res + z Bf^T": best(lambda: torch.addmm(res, z, Bf.t()), 1000, dev),
        "torch.empty x4": best(lambda: [torch.empty(T, N * R, device=dev, dtype=dt) for _ in range(4)], 1000, dev),
        "x * 2 (one elementwise kernel)": best(lambda: x * 2, 1000, dev),
    }
    if dev == "cuda":
        out["new_seed"] = best(lambda: fused.new_seed(x.device), 2000, dev)
        if fused.HAS_TRITON:
            c = fused.op_consts(2.0, 1.0, 0.05, True, True)
            args = (c.thr, c.inv_keep, c.scaling, c.inv_temp, c.dropout)
            out["launch.proj (Triton)"] = best(lambda: launch.proj(x, A, G, (1, 2), *args), 1000, dev)
            zz, h, gate, raw = launch.proj(x, A, G, (1, 2), *args)
            dz = torch.randn(T, N * R, device=dev, dtype=dt)
            out["launch.bwd_x (Triton, with its reduction)"] = best(
                lambda: launch.bwd_x(x, dz, h, gate, None, A, G, (1, 2), *args, True), 1000, dev)
            out["launch.hooks_idle"] = best(launch.hooks_idle, 2000, dev)
    return out


def phases(variant: str, T: int, K: int, dev: str, dt, args, n: int) -> dict:
    """Host us of each phase of a trainer step through the variant's PeftModel, and of a decode call."""
    net, trainable = build(variant, K, K, dev, dt, args)
    net.train()
    x = torch.randn(T, K, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(T, K, device=dev, dtype=dt)
    opt = C.adamw(trainable, args.optim)
    acc = {"forward": 0.0, "backward": 0.0, "optimizer step": 0.0, "zero_grad": 0.0}

    def step(record: bool):
        times = C.phase_seconds(net, x, dy, opt)
        if record:
            for k, v in zip(acc, times):
                acc[k] += v

    for _ in range(20):
        step(False)
    C.sync(dev)
    res = None
    for _ in range(3):  # best of three rounds, phase by phase
        for k in acc:
            acc[k] = 0.0
        for _ in range(n):
            step(True)
        C.sync(dev)
        now = {k: v / n * 1e6 for k, v in acc.items()}
        res = now if res is None else {k: min(res[k], now[k]) for k in now}
    out = {k: round(v, 1) for k, v in res.items()}
    out["train step"] = round(sum(res.values()), 1)
    if variant != "base":  # the tuner layer's own forward, without the PeftModel and its hooks around it
        layer = net.base_model.model.proj
        out["tuner layer forward (grad)"] = best(lambda: layer(x), n, dev)
    kernels = count_kernels(lambda: step(False), dev)
    if kernels is not None:
        out["kernels per train step"] = kernels
    net.eval()
    x1 = torch.randn(1, K, device=dev, dtype=dt)
    with torch.no_grad():
        out["decode call (1 token, eval, no_grad)"] = best(lambda: net(x1), 1000, dev)
        kernels = count_kernels(lambda: net(x1), dev)
    if kernels is not None:
        out["kernels per decode call"] = kernels
    return out


def count_kernels(fn, dev: str):
    if dev != "cuda":
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def host_table(variant: str, T: int, K: int, dev: str, dt, args, rows: int) -> str:
    """torch.profiler's table of host-side ops by self CPU time over 20 trainer steps (forward, backward)."""
    net, trainable = build(variant, K, K, dev, dt, args)
    net.train()
    x = torch.randn(T, K, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(T, K, device=dev, dtype=dt)
    for _ in range(5):
        net(x).backward(dy)
    C.sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(20):
            net(x).backward(dy)
        C.sync(dev)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def own_time_table(pr: cProfile.Profile, rows: int) -> str:
    """cProfile's rows by own time (tottime), from its column header on."""
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(rows)
    return buf.getvalue().split("ncalls", 1)[-1]


def python_profile(variant: str, T: int, K: int, dev: str, dt, args, rows: int) -> str:
    """cProfile's table (by own time) of 300 training calls (forward, backward) and 300 decode calls through the
    variant's PeftModel: which Python functions the host spends its time in (cProfile's own overhead inflates
    every call about alike)."""
    net, _ = build(variant, K, K, dev, dt, args)
    net.train()
    x = torch.randn(T, K, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(T, K, device=dev, dtype=dt)
    x1 = torch.randn(1, K, device=dev, dtype=dt)
    for _ in range(20):
        net(x).backward(dy)
    C.sync(dev)
    out = []
    for mode in ("train", "decode"):
        if mode == "decode":
            net.eval()
        pr = cProfile.Profile()
        with torch.no_grad() if mode == "decode" else torch.enable_grad():
            pr.enable()
            for _ in range(300):
                if mode == "train":
                    net(x).backward(dy)
                else:
                    net(x1)
            pr.disable()
        C.sync(dev)
        out.append(f"-- {mode}, 300 calls\n" + own_time_table(pr, rows))
    return "\n".join(out)


def generate_profile(dev: str, dt, args, rows: int) -> dict:
    """Greedy generation as bench_generate.py runs it (q_proj and v_proj adapted, batch 1, a 32-token prompt) for
    PEFT LoRA r=8 and HydraLoRA with token routing: host ms per new token (generate of 33 tokens less generate of 1,
    over 32), cProfile's own-time table of one generate of 33 tokens (where a decode step's host time goes) and the
    lines that synchronize with the device in a generate of 5 tokens (transformers' own stopping check among them)."""
    from bench_generate import build_variants, gen_kwargs

    name = "llama7b-8l" if dev == "cuda" else "smollm2-135m"
    nets = build_variants(name, ["peft", "token"], dev, dt, args)
    ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    out = {"model": name}
    for key, (model, ctx) in nets.items():
        with ctx(), torch.inference_mode():
            def gen(n):
                model.generate(ids, **gen_kwargs(ids, n))
                C.sync(dev)

            gen(33)
            secs = {}
            for n in (1, 33):
                t = time.perf_counter()
                gen(n)
                secs[n] = time.perf_counter() - t
            pr = cProfile.Profile()
            pr.enable()
            gen(33)
            pr.disable()
            syncs = synchronizing_calls(lambda: model.generate(ids, **gen_kwargs(ids, 5))) if dev == "cuda" else []
        out[key] = {"host ms per new token": round((secs[33] - secs[1]) / 32 * 1e3, 3),
                    "cProfile": own_time_table(pr, rows),
                    "synchronizing calls, generate of 5 tokens": sorted({f["where"] for f in syncs}),
                    "synchronizing call count": len(syncs)}
    return out


def sync_points(variant: str, dev: str, dt, args) -> list:
    """The synchronizing CUDA calls of one trainer step of a small LLaMA (all-linear) through the variant, each with
    the innermost frames of the project's and PEFT's code that made it."""
    if dev != "cuda":
        return []
    import copy

    from bench_train_step import attach, make_model

    class Small:
        small, seed, layers, dropout, experts, precision = True, 0, 2, args.dropout, args.experts, args.precision

    model = copy.deepcopy(make_model(Small, dev, dt))
    net, trainable = attach(variant, model, "all-linear", Small)
    net.train()
    opt = C.adamw(trainable, args.optim)
    ids = torch.randint(0, 1000, (2, 128), device=dev)
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0  # a padded batch: what a trainer's collator gives

    def step():
        out = net(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return synchronizing_calls(step)


def synchronizing_calls(fn) -> list:
    """The synchronizing CUDA calls fn makes (torch.cuda.set_sync_debug_mode), each with the line that made it."""
    found = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            found.append({"message": str(w.message)[:200], "where": f"{w.filename}:{w.lineno}"})
    return found


def main():
    p = C.base_parser(__doc__.splitlines()[0])
    C.add_layer_args(p)
    p.add_argument("--calls", type=int, default=300, help="trainer steps per timed round")
    p.add_argument("--rows", type=int, default=22, help="rows of each profiler table")
    args = p.parse_args()
    dev, dt = args.device, C.resolve_dtype(args)
    T, K = args.tokens or 64, args.features or 1024
    res = {"env": C.env_info(dev), "tokens": T, "features": K, "dtype": str(dt)}
    res["single ops, host us"] = single_ops(T, K, dev, dt)
    print(res["single ops, host us"], flush=True)
    res["phases, host us"] = {}
    for _ in range(2):  # in turns, twice; the better of the two per figure
        for v in ("base", "peft r8", "ours"):
            now = phases(v, T, K, dev, dt, args, args.calls)
            old = res["phases, host us"].get(v)
            res["phases, host us"][v] = now if old is None else {k: min(old[k], now[k]) for k in now}
    for v, ph in res["phases, host us"].items():
        print(v, ph, flush=True)
    res["profiler, forward + backward x20"] = {v: host_table(v, T, K, dev, dt, args, args.rows)
                                               for v in ("peft r8", "ours")}
    for v, t in res["profiler, forward + backward x20"].items():
        print(f"== {v}\n{t}", flush=True)
    res["cProfile, own time"] = {v: python_profile(v, T, K, dev, dt, args, args.rows) for v in ("peft r8", "ours")}
    for v, t in res["cProfile, own time"].items():
        print(f"== cProfile {v}\n{t}", flush=True)
    res["generate, batch 1"] = generate_profile(dev, dt, args, args.rows)
    for key in ("peft", "token"):
        g = res["generate, batch 1"][key]
        print(f"== generate {key}: {g['host ms per new token']} ms per new token, "
              f"{g['synchronizing call count']} syncs in 5 tokens at {g['synchronizing calls, generate of 5 tokens']}"
              f"\n{g['cProfile']}", flush=True)
    res["sync points, one all-linear train step"] = {v: sync_points(v, dev, dt, args) for v in ("peft r8", "ours")}
    print({v: len(s) for v, s in res["sync points, one all-linear train step"].items()},
          res["sync points, one all-linear train step"], flush=True)
    C.write_json(args.json, res)


if __name__ == "__main__":
    main()
