"""One adapted projection, a trainer-like step (forward, backward of a random dy, AdamW, zero_grad): wall-clock ms
and the GPU's busy time beside it, every variant in one run and in turns, ratios to the frozen base and PEFT LoRA r=8.

    python benchmarks/bench_layer.py --device cuda            # 4096x4096, 8192 tokens, bf16
    python benchmarks/bench_layer.py --device cpu             # 1024x1024, 2048 tokens, fp32, < 1 min

Every adapted variant is built as users build it, with peft.get_peft_model and a default config
(HydraLoraConfig(r=8, num_experts=3, lora_dropout=0.05), LoraConfig(r=8, lora_dropout=0.05)), and called through its
PeftModel. Default variants: base (the frozen projection), peft r8, ours (HydraLoRA, the default dispatch: the fused
op on CUDA), ours eager (HYDRALORA_FUSED=0). Others by --variants: peft r16, peft r32, authors (the authors'
formulation), ours layer (the tuner layer called directly, without the PeftModel), ours fused delta (a hook on the
base keeps base_layer(x), then the delta op), ours compile (torch.compile of the eager layer), ours svd and ours svd
eager (the hydralora-best preset's adapter: SVD init, whose frozen offset the op runs stacked, temperature 0.1).
"""

from __future__ import annotations

import torch
from torch import nn

import _common as C
from authors_formulation import AuthorsHydraLinear

DEFAULT_VARIANTS = ["base", "peft r8", "ours", "ours eager"]
OTHER_VARIANTS = ["peft r16", "peft r32", "authors", "ours layer", "ours fused delta", "ours compile", "ours svd",
                  "ours svd eager"]


class One(nn.Module):
    def __init__(self, k, d, dev, dt):
        super().__init__()
        self.proj = nn.Linear(k, d, bias=False, device=dev, dtype=dt)

    def forward(self, x):
        return self.proj(x)


def switch_for(variant: str):
    """The HYDRALORA_FUSED value a variant runs under (None: unset, the default)."""
    return "0" if variant in ("ours eager", "ours compile", "ours svd eager") else None


def build(variant, k, d, dev, dt, args):
    """(module to call, trainable parameters) of a variant."""
    import peft

    import hydralora

    torch.manual_seed(args.seed)
    one = One(k, d, dev, dt)
    one.proj.weight.requires_grad_(False)
    if variant == "base":
        return one, []
    if variant.startswith("peft"):
        r = int(variant.split("r")[-1])
        pm = C.get_peft_model(one, peft.LoraConfig(r=r, lora_dropout=args.dropout, target_modules=["proj"]), args)
        C.randomize_([p for n, p in pm.named_parameters() if "lora_B" in n])
        return pm, [p for p in pm.parameters() if p.requires_grad]
    if variant == "authors":
        layer = AuthorsHydraLinear(one.proj, r=args.r, lora_alpha=2 * args.r, dropout=args.dropout,
                                   num_experts=args.experts)
        C.randomize_([b.weight for b in layer.lora_B])
        trainable = [p for p in layer.parameters() if p.requires_grad]
        C.adapter_dtype_(trainable, args)
        return layer, trainable
    svd = variant.startswith("ours svd")
    preset = C.SVD_PRESET if svd else {}
    cfg = hydralora.HydraLoraConfig(r=args.r, num_experts=args.experts, lora_dropout=args.dropout,
                                    target_modules=["proj"], **preset)
    pm = C.get_peft_model(one, cfg, args)
    layer = pm.base_model.model.proj
    if not svd:  # (SVD init starts the experts non-zero)
        C.randomize_(list(layer.hydralora_B.values()))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    if variant == "ours compile":
        return torch.compile(layer), trainable
    if variant == "ours layer":
        return layer, trainable
    if variant == "ours fused delta":
        layer.base_layer.register_forward_hook(lambda module, args, output: None)  # base_layer(x) + delta
    return pm, trainable


def make_step(net, trainable, x, dy, args):
    """One timed call: the trainer-like step, or a no-grad forward with --inference."""
    dev, dt = args.device, C.resolve_dtype(args)
    if args.inference:
        def infer():
            with torch.no_grad(), C.autocast(args, dev, dt):
                net(x)
        return infer

    def forward_backward():
        with C.autocast(args, dev, dt):
            out = net(x)
        out.backward(dy)  # the gradient of sum(out * dy), without the loss's two extra passes over out
        x.grad = None

    return C.trainer_step(forward_backward, trainable, args.optim)


def main():
    p = C.base_parser(__doc__.splitlines()[0])
    C.add_layer_args(p)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--variants", default=None,
                   help=f"comma list (default {','.join(DEFAULT_VARIANTS)}; also {','.join(OTHER_VARIANTS)})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--inference", action="store_true",
                   help="forward only, eval mode, no grad (decode-like with --tokens 1: per-call overhead)")
    args = p.parse_args()
    dev, dt = args.device, C.resolve_dtype(args)
    cuda = dev == "cuda"
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else list(DEFAULT_VARIANTS)
    bad = [v for v in variants if v not in DEFAULT_VARIANTS + OTHER_VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; allowed: {', '.join(DEFAULT_VARIANTS + OTHER_VARIANTS)}")
    T, k = C.layer_shape(args)
    d = k
    repeats = args.repeats or (30 if cuda else 9)
    inner = 5 if cuda else 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"layer {k}x{d}, {T} tokens, r={args.r}, N={args.experts}, dropout={args.dropout}, {dt}, "
          f"precision {args.precision}, {dev}", flush=True)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(T, k, generator=gen).to(dev, dt).requires_grad_(not args.inference)
    dy = torch.randn(T, d, generator=gen).to(dev, dt)
    rows, steps = [], {}
    for v in variants:  # build, measure memory and warm up every variant first
        row = {"variant": v}
        rows.append(row)
        try:
            net, trainable = build(v, k, d, dev, dt, args)
            net.train(not args.inference)
            step = make_step(net, trainable, x, dy, args)
            ctx = (lambda s=switch_for(v): C.fused_switch(s))
            with ctx():
                step()  # outside the memory window: autotuning (a 256 MiB L2-flush buffer), compilation, AdamW state
                C.free_memory()
                base_alloc = torch.cuda.memory_allocated() if cuda else 0
                mem = {}
                with C.peak_memory(dev, mem):
                    step()
                if cuda:
                    row["extra_mib"] = (mem["peak_gib"] * 2**30 - base_alloc) / 2**20
                C.time_ms(step, dev, warmup=10 if cuda else 2, repeats=1, inner=1)
            steps[v] = (step, ctx)
        except Exception as err:  # a variant that fails (e.g. compile) is reported, not fatal
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            print(f"{v} failed: {row['error']}", flush=True)
    timed = C.take_turns(steps, dev, repeats, inner=inner, seed=args.seed)
    for row in rows:
        v = row["variant"]
        if v in timed:
            t = timed[v]
            row.update(ms=t["ms"], min_ms=t["min_ms"], max_ms=t["max_ms"], n=t["n"], rounds_ms=t["rounds_ms"])
            if "host_ms" in t:
                row["host_ms"] = t["host_ms"]
            if cuda:  # the GPU's own cost per call: what the step would take on a host fast enough for the GPU
                step, ctx = steps[v]
                with ctx():
                    row["gpu_ms"] = C.device_busy_ms(step, dev)
    ref = {name: next((r for r in rows if r["variant"] == name and "ms" in r), None) for name in ("base", "peft r8")}
    for r in rows:
        for name, col in (("base", "x_base"), ("peft r8", "x_peft_r8")):
            o = ref[name]
            if "ms" in r and o:  # paired within rounds (C.paired_ratio), else the ratio of the medians
                paired = C.paired_ratio(r.get("rounds_ms"), o.get("rounds_ms"))
                r[col] = paired if paired is not None else r["ms"] / o["ms"]
            if r.get("gpu_ms") and o and o.get("gpu_ms"):
                r["gpu_" + col] = r["gpu_ms"] / o["gpu_ms"]
    cols = [("variant", "variant", 0), ("ms", "ms", 3), ("x_base", "x base", 2), ("x_peft_r8", "x PEFT r8", 2)]
    if cuda:
        cols += [("gpu_ms", "GPU busy ms", 3), ("gpu_x_base", "GPU x base", 2), ("gpu_x_peft_r8", "GPU x PEFT r8", 2),
                 ("host_ms", "host ms to issue", 3), ("extra_mib", "peak extra MiB", 0)]
    cols += [("min_ms", "min ms", 3), ("max_ms", "max ms", 3)]
    info = C.env_info(dev)
    what = "forward (inference)" if args.inference else "trainer step"
    title = (f"Layer {what}: {k}x{d}, {T} tokens, r={args.r}, N={args.experts}, dropout {args.dropout}, {dt}, "
             f"precision {args.precision}, {info.get('gpu', info.get('cpu'))}")
    table = C.print_table(rows, cols, title)
    C.write_json(args.json, {"bench": "layer", "env": info, "config": vars(args) | {"tokens": T, "features": k},
                             "rows": rows, "samples_ms": {v: t["samples_ms"] for v, t in timed.items()},
                             "table": table})


if __name__ == "__main__":
    main()
