"""Host time of one layer step (forward + backward), per variant and per section of our fused path: where Python and
kernel launches spend the microseconds that a fast GPU then waits for.

    python benchmarks/host_sections.py --device cuda     # 4096x4096, 8192 tokens, bf16 (what docs/performance.md cites)
    python benchmarks/host_sections.py --device cpu      # the eager path (the fused one needs CUDA), a smoke run

perf_counter around the calls that issue the work, no synchronisation inside a step (the device is synchronised
between steps, so a full launch queue never stalls the host). Variants are timed in alternating rounds (the host's
speed drifts); medians are reported. Then the fused variant runs once more with the library's functions wrapped,
each wrapper adding its inclusive time per step (the wrappers themselves cost ~1 us each).
"""

from __future__ import annotations

import collections
import functools
import statistics
import time

import torch

import _common as C
import bench_layer as BL
from hydralora.ops import fused as fops
from hydralora.tuner import layer as hlayer

# (owner, attribute, is a staticmethod): the fused path's pieces, outermost first
SECTIONS = [
    (hlayer, "layer_linear_fused", False),
    (fops, "_adapter_args", False),
    (fops, "_layer_supported", False),
    (hlayer.HydraLoraLayer, "_usage_target", False),
    (fops, "_apply_2d", False),
    (fops._HydraFused, "forward", True),
    (fops, "new_seed", False),
    (fops, "_proj_triton", False),
    (fops, "_flat_B", False),
    (fops, "_launch", False),
    (fops, "_spec_key", False),
    (hlayer.HydraLoraLayer, "_record", False),
    (hlayer.HydraLoraLayer, "_count_usage", False),
    (fops._HydraFused, "backward", True),
    (fops, "_bwd_x_triton", False),
]


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def host_us(layer, trainable, x, dy, dev, steps):
    """Median host microseconds of (forward, backward, whole step incl. clearing grads) over `steps` steps."""
    fw, bw, tot = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        out = layer(x)
        t1 = time.perf_counter_ns()
        out.backward(dy)
        t2 = time.perf_counter_ns()
        x.grad = None
        for p in trainable:
            p.grad = None
        t3 = time.perf_counter_ns()
        sync(dev)
        fw.append((t1 - t0) / 1e3)
        bw.append((t2 - t1) / 1e3)
        tot.append((t3 - t0) / 1e3)
    return fw, bw, tot


def wrap_sections(acc: dict, cnt: collections.Counter) -> list:
    """Wrap every SECTIONS function so that it adds its inclusive time to acc; returns the undo list."""
    undo = []
    for owner, name, static in SECTIONS:
        raw = owner.__dict__[name]
        fn = raw.__func__ if static else raw

        def timed(*a, _fn=fn, _label=name, **k):
            t = time.perf_counter_ns()
            try:
                return _fn(*a, **k)
            finally:
                acc[_label] += time.perf_counter_ns() - t
                cnt[_label] += 1

        functools.update_wrapper(timed, fn)
        setattr(owner, name, staticmethod(timed) if static else timed)
        undo.append((owner, name, raw))
    return undo


def main():
    p = C.base_parser(__doc__.splitlines()[0])
    C.add_layer_args(p)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    dev, dt = args.device, C.resolve_dtype(args)
    T, k = C.layer_shape(args)
    steps = args.steps or (100 if dev == "cuda" else 5)
    variants = ["base", "peft r8", "ours eager"] + (["ours fused", "ours fused+base"] if dev == "cuda" else [])
    x = torch.randn(T, k, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(T, k, device=dev, dtype=dt)
    print(f"host time per step: layer {k}x{k}, {T} tokens, r={args.r}, N={args.experts}, dropout={args.dropout}, "
          f"{dt}, {dev}", flush=True)

    built = {}
    for v in variants:
        with C.fused_dispatch(v.startswith("ours fused")):
            layer, trainable = BL.build(v, k, k, dev, dt, args)
            step = BL.make_step(layer, trainable, x, dy, args)
            for _ in range(3):  # compile and autotune outside the timed rounds
                step()
        built[v] = (layer, trainable)
    sync(dev)
    samples = {v: ([], [], []) for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            with C.fused_dispatch(v.startswith("ours fused")):
                for dst, src in zip(samples[v], host_us(*built[v], x, dy, dev, steps)):
                    dst.extend(src)
    rows = []
    for v in variants:
        fw, bw, tot = (statistics.median(s) for s in samples[v])
        rows.append({"variant": v, "fwd_us": fw, "bwd_us": bw, "step_us": tot})
    peft = next(r["step_us"] for r in rows if r["variant"] == "peft r8")
    for r in rows:
        r["x_peft"] = r["step_us"] / peft
    C.print_table(rows, [("variant", "variant", 0), ("fwd_us", "host us fwd", 1), ("bwd_us", "host us bwd", 1),
                         ("step_us", "host us step", 1), ("x_peft", "x PEFT LoRA r=8", 2)],
                  title=f"Host time per step (median of {args.rounds} x {steps} steps), {C.env_info(dev)['device']}")

    sections = []
    if dev == "cuda":
        acc, cnt = collections.defaultdict(int), collections.Counter()
        undo = wrap_sections(acc, cnt)
        try:
            with C.fused_dispatch(True):
                host_us(*built["ours fused"], x, dy, dev, steps)
        finally:
            for owner, name, raw in undo:
                setattr(owner, name, raw)
        per = cnt["layer_linear_fused"] or 1
        for owner, name, _ in SECTIONS:
            if cnt[name]:
                sections.append({"section": name, "us_per_step": acc[name] / per / 1e3, "calls": cnt[name] / per})
        C.print_table(sections, [("section", "section (inclusive)", 0), ("us_per_step", "host us per step", 1),
                                 ("calls", "calls per step", 0)], title="ours fused: host time by section")
    C.write_json(args.json, {"env": C.env_info(dev), "rows": rows, "sections": sections})


if __name__ == "__main__":
    main()
