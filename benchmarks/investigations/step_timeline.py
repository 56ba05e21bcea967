"""Where a step's wall-clock time goes on the GPU's timeline: busy, waiting on the host, or between queued kernels,
base vs PEFT LoRA r=8 vs HydraLoRA, for bench_train_step.py's q+v train step and bench_generate.py's batch-1 decode.

    python benchmarks/investigations/step_timeline.py --json OUT.json              # CUDA, about a minute
    python benchmarks/investigations/step_timeline.py --workloads decode --tokens 9

A step's wall time minus its GPU busy time is time the GPU spent idle. Each idle gap ends with a kernel (or copy,
or fill) whose launch the host issued either before the gap began (the kernel was queued: the gap is the device's
own launch latency) or after it (the GPU waited for the host: "starved"). The starved gaps are added up by the
host op that launched the kernel after them, and the longest are listed with the kernels on either side. Read
under torch.profiler, whose own host overhead lengthens the starved gaps: compare variants, not absolute figures.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import copy
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as C  # noqa: E402

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
TOTALS = ("span_us", "busy_us", "idle_us", "starved_us", "queued_gap_us", "device_events")  # additive per step
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaMemcpyAsync",
                "cudaMemsetAsync", "cudaGraphLaunch")


def _host_stacks(events: list[dict]):
    """Per host thread: its cpu_op events sorted by start, for finding the ops around a launch."""
    ops = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op" and "dur" in e:
            ops[e.get("tid")].append(e)
    for lst in ops.values():
        lst.sort(key=lambda e: e["ts"])
    return ops


def _enclosing(ops: list[dict], starts: list[float], ts: float, depth: int = 3) -> list[str]:
    """Names of the cpu ops that contain time ts, innermost last (at most `depth`)."""
    names = []
    for i in range(bisect.bisect_right(starts, ts) - 1, -1, -1):
        e = ops[i]
        if e["ts"] <= ts <= e["ts"] + e["dur"]:
            names.append(e["name"])
        if len(names) == 3 * depth:  # enough candidates: nesting is shallow near the launch
            break
    names = sorted(set(names), key=names.index)  # innermost first, unique
    return names[:depth][::-1]


def timeline(events: list[dict], top: int = 12, min_gap_us: float = 0.0) -> dict:
    """Summary of a torch.profiler Chrome trace's events (the "traceEvents" list).

    Returns: span_us (first device event's start to the last one's end), busy_us (union of device events), idle_us,
    starved_us (idle gaps whose next device event was launched by the host after the gap began), queued_gap_us (the
    other gaps), device_events, kernels_by_name ({name: [count, us]}, longest first), starved_by_op ({host op stack
    of the launch: [gaps, us]}) and longest_starved (the `top` longest starved gaps with the kernels around them)."""
    dev = sorted((e for e in events if e.get("cat") in DEVICE_CATS and "dur" in e), key=lambda e: e["ts"])
    if not dev:
        raise ValueError("timeline: the trace has no device events (was the CUDA activity profiled?)")
    launches = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and e.get("name") in LAUNCH_NAMES:
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launches[corr] = e
    stacks = _host_stacks(events)
    starts = {tid: [e["ts"] for e in lst] for tid, lst in stacks.items()}
    by_name = collections.defaultdict(lambda: [0, 0.0])
    by_op = collections.defaultdict(lambda: [0, 0.0])
    busy = starved = queued = 0.0
    gaps = []
    end = dev[0]["ts"]
    prev = None
    for e in dev:
        s, d = e["ts"], e["dur"]
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += d
        if s > end and prev is not None:
            gap = s - end
            launch = launches.get((e.get("args") or {}).get("correlation"))
            if launch is not None and launch["ts"] > end and gap >= min_gap_us:
                starved += gap
                tid = launch.get("tid")
                stack = _enclosing(stacks.get(tid, []), starts.get(tid, []), launch["ts"])
                key = " > ".join(stack) or launch["name"]
                by_op[key][0] += 1
                by_op[key][1] += gap
                gaps.append({"gap_us": round(gap, 1), "after": prev["name"][:80], "before": e["name"][:80],
                             "launched_in": key})
            else:
                queued += gap
        if s + d > end:  # the part of this event past what the earlier ones covered
            busy += s + d - max(s, end)
            end = s + d
            prev = e
    span = end - dev[0]["ts"]
    gaps.sort(key=lambda g: -g["gap_us"])
    rnd = lambda kv: [kv[0], round(kv[1], 1)]  # noqa: E731
    return {
        "span_us": round(span, 1), "busy_us": round(busy, 1), "idle_us": round(span - busy, 1),
        "starved_us": round(starved, 1), "queued_gap_us": round(queued, 1), "device_events": len(dev),
        "kernels_by_name": {k: rnd(v) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][1])},
        "starved_by_op": {k: rnd(v) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1][1])},
        "longest_starved": gaps[:top],
    }


def profile_events(fn, calls: int = 1) -> list[dict]:
    """The Chrome trace events of `calls` calls of fn under torch.profiler (CPU and CUDA activities)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]


def per_step(long: dict, steps: int, short: dict | None = None) -> dict:
    """The summary `long` with its totals (TOTALS) less those of `short` (if given), divided by `steps`; the tables
    and gap lists are long's."""
    out = dict(long)
    for k in TOTALS:
        out[k] = round((long[k] - (short[k] if short else 0)) / steps, 1)
    return out


def _show(variant: str, s: dict) -> None:
    print(variant, {k: s[k] for k in TOTALS if k != "idle_us"}, flush=True)


def train_workload(args, variants, dev, dt) -> dict:
    """{variant: summary per train step} for bench_train_step.py's step (q+v, no checkpointing)."""
    from bench_train_step import attach, make_model

    ns = argparse.Namespace(small=False, layers=args.layers, seed=0, experts=3, dropout=0.05,
                            precision="pure")
    base = make_model(ns, dev, dt)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=dev)
    out = {}
    for v in variants:
        hf = copy.deepcopy(base).train()
        net, trainable = attach(v, hf, args.targets, ns)

        def forward_backward(net=net):
            net(input_ids=ids, labels=ids).loss.backward()

        step = C.trainer_step(forward_backward, trainable, "fused")
        for _ in range(3):
            step()
        out[v] = per_step(timeline(profile_events(step, args.steps)), args.steps)
        _show(v, out[v])
        del hf, net, trainable, step
        C.free_memory()
    return out


def decode_workload(args, variants, dev, dt) -> dict:
    """{variant: summary per decode step} for bench_generate.py's batch-1 decode (q+v): a generate of --tokens new
    tokens less a generate of 1 (the prefill), per step; the tables and gap lists are those of the longer one."""
    from bench_generate import build_variants, gen_kwargs

    keys = {"base": "base", "peft r8": "peft", "ours": "token"}
    ns = argparse.Namespace(seed=0, precision="pure")
    nets = build_variants("llama7b-8l", [keys[v] for v in variants], dev, dt, ns)
    ids = torch.randint(3, 32000, (1, 32), device=dev)
    out = {}
    for v in variants:
        model, ctx = nets[keys[v]]
        runs = {}
        with ctx(), torch.inference_mode():
            for n in (1, args.tokens):
                gen = lambda n=n: model.generate(ids, **gen_kwargs(ids, n))  # noqa: E731
                gen()
                runs[n] = timeline(profile_events(gen))
        out[v] = per_step(runs[args.tokens], args.tokens - 1, short=runs[1])
        _show(v, out[v])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="train,decode", help="comma list of train, decode")
    p.add_argument("--variants", default="base,peft r8,ours")
    p.add_argument("--targets", default="qv", choices=["qv", "all-linear"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2, help="profiled train steps")
    p.add_argument("--tokens", type=int, default=9, help="new tokens of the profiled generate")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("step_timeline.py needs a CUDA device")
    variants = [v.strip() for v in args.variants.split(",")]
    bad = [v for v in variants if v not in ("base", "peft r8", "ours")]
    if bad:
        p.error(f"--variants: unknown {bad}; allowed: base, peft r8, ours")
    res = {"device": torch.cuda.get_device_name(), "config": vars(args)}
    runners = {"train": train_workload, "decode": decode_workload}
    for w in args.workloads.split(","):
        if w not in runners:
            p.error(f"--workloads: {w!r}; allowed: train, decode")
        with contextlib.suppress(KeyboardInterrupt):
            res[w] = runners[w](args, variants, "cuda", torch.bfloat16)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
