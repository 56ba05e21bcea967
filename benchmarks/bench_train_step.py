"""Trainer-like step of a LLaMA-2-7B-shaped decoder (random weights): wall-clock tokens/s and the GPU's busy time
beside it, and peak memory, HydraLoRA vs PEFT LoRA r=8 vs the frozen base, every variant in one run and in turns.

    python benchmarks/bench_train_step.py --device cuda      # hidden 4096, inter 11008, 32 heads, 8 layers, 4 x 1024
    python benchmarks/bench_train_step.py --device cpu       # a small shape, to check the script runs

For each of {q_proj+v_proj, all-linear} x {no checkpointing, gradient checkpointing}: every variant is its own copy
of the model, built with peft.get_peft_model and a default config (LoraConfig(r=8, lora_dropout=0.05),
HydraLoraConfig(r=8, num_experts=3, lora_dropout=0.05)); a step = forward, loss, backward, AdamW over the adapter
parameters, zero_grad. Variants: base (frozen, backward to the embeddings), peft r8, ours (the default dispatch);
by --variants also peft r18 (LoRA at about ours' trainable parameters), ours eager (HYDRALORA_FUSED=0), authors
(the authors' formulation), ours svd and ours svd eager (the hydralora-best preset's adapter: SVD init, whose frozen
offset the op runs stacked, router temperature 0.1). Peak memory: the step's peak over what was allocated before it,
plus the variant's own weights and optimizer state (the copies of the other variants are resident too).
"""

from __future__ import annotations

import copy

import torch

import _common as C
from authors_formulation import apply_authors

# "peft r18": LoRA with about HydraLoRA r=8, N=3's trainable parameters on these shapes (q+v 2.36M vs 2.29M,
# all-linear 11.24M vs 11.29M): the matched-parameter peer, beside the r=8 peer the targets name.
VARIANTS = ["base", "peft r8", "peft r18", "ours", "ours eager", "authors", "ours svd", "ours svd eager"]


def make_model(args, dev, dt):
    from transformers import LlamaConfig

    if args.small:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=8,
                          num_hidden_layers=2, vocab_size=1000, max_position_embeddings=2048)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                          num_hidden_layers=args.layers, vocab_size=32000, max_position_embeddings=4096)
    return C.random_llama(cfg, dev, dt, args.seed)


def attach(variant, model, targets, args):
    """(module to call, trainable params) of a variant, built on `model` (a copy of its own)."""
    import peft

    import hydralora

    tm = "all-linear" if targets == "all-linear" else ["q_proj", "v_proj"]
    if variant == "base":
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        return model, []
    if variant.startswith("peft r"):
        r = int(variant[len("peft r"):])
        pm = C.get_peft_model(model, peft.LoraConfig(r=r, lora_dropout=args.dropout, target_modules=tm,
                                                     task_type="CAUSAL_LM"), args)
        C.randomize_([p for n, p in pm.named_parameters() if "lora_B" in n])
        return pm, [p for p in pm.parameters() if p.requires_grad]
    if variant == "authors":
        replaced = apply_authors(model, tm if tm == "all-linear" else set(tm), r=8, lora_alpha=16,
                                 dropout=args.dropout, num_experts=args.experts)
        mods = [getattr(p, leaf) for p, leaf, _ in replaced]
        C.randomize_([b.weight for m in mods for b in m.lora_B])
        trainable = [p for m in mods for p in m.parameters() if p.requires_grad]
        C.adapter_dtype_(trainable, args)
        return model, trainable
    svd = variant.startswith("ours svd")
    preset = C.SVD_PRESET if svd else {}
    cfg = hydralora.HydraLoraConfig(r=8, num_experts=args.experts, lora_dropout=args.dropout, target_modules=tm,
                                    task_type="CAUSAL_LM", **preset)
    pm = C.get_peft_model(model, cfg, args)
    if not svd:  # (SVD init starts the experts non-zero)
        C.randomize_([p for _, layer in hydralora.hydra_layers(pm) for p in layer.hydralora_B.values()])
    return pm, [p for p in pm.parameters() if p.requires_grad]


def _peer(rows, r, variant, field):
    """The row of `variant` with the same targets and checkpointing as r that has `field`, or None."""
    return next((o for o in rows if o["targets"] == r["targets"] and o["checkpointing"] == r["checkpointing"]
                 and o["variant"] == variant and o.get(field)), None)


def summarize(rows):
    """Ratios to PEFT LoRA r=8 of the same targets and checkpointing: tok/s, GPU speed, memory; and memory against
    PEFT LoRA r=18, the matched-parameter peer, where it ran."""
    for r in rows:
        lora = _peer(rows, r, "peft r8", "tok_s")
        if "tok_s" not in r or lora is None:
            continue
        r["ktok_s"] = r["tok_s"] / 1e3
        paired = C.paired_ratio(lora.get("step_ms_rounds"), r.get("step_ms_rounds"))  # tok/s: PEFT's time over ours
        r["vs_peft"] = paired if paired is not None else r["tok_s"] / lora["tok_s"]
        if r.get("peak_gib") and lora.get("peak_gib"):
            r["mem_vs_peft"] = r["peak_gib"] / lora["peak_gib"]
        matched = _peer(rows, r, "peft r18", "peak_gib")
        if r.get("peak_gib") and matched is not None:
            r["mem_vs_r18"] = r["peak_gib"] / matched["peak_gib"]
        if r.get("gpu_ms") and lora.get("gpu_ms"):
            r["gpu_vs_peft"] = lora["gpu_ms"] / r["gpu_ms"]  # a speed ratio, like vs_peft


def main():
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=6, help="timed rounds (each times every variant once)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="base,peft r8,ours", help="comma list of " + ",".join(VARIANTS))
    p.add_argument("--targets", default="qv,all-linear")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--small", action="store_true", help="tiny model (default on cpu)")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; allowed: {', '.join(VARIANTS)}")
    dev, dt = args.device, C.resolve_dtype(args)
    cuda = dev == "cuda"
    if dev == "cpu":
        args.small = True
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 2, 1
    base_model = make_model(args, dev, dt)
    tokens = args.batch * args.seq
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    ids = torch.randint(0, base_model.config.vocab_size, (args.batch, args.seq), generator=gen).to(dev)
    info = C.env_info(dev)
    rows = []
    for targets in args.targets.split(","):
        nets = {}
        for v in variants:  # one copy of the model per variant, all resident: they take turns below
            hf = copy.deepcopy(base_model).train()
            net, trainable = attach(v, hf, targets, args)
            nets[v] = (hf, net, trainable)
        for ckpt in [c == "on" for c in args.checkpointing.split(",")]:
            steps, combo = {}, []
            for v, (hf, net, trainable) in nets.items():
                row = {"targets": targets, "checkpointing": "on" if ckpt else "off", "variant": v}
                combo.append(row)
                if ckpt:
                    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                else:
                    hf.gradient_checkpointing_disable()

                def forward_backward(net=net):
                    with C.autocast(args, dev, dt):
                        loss = net(input_ids=ids, labels=ids).loss
                    loss.backward()

                step = C.trainer_step(forward_backward, trainable, args.optim)
                ctx = (lambda s="0" if v.endswith("eager") else None: C.fused_switch(s))
                try:
                    with ctx():
                        for _ in range(args.warmup):  # autotuning, AdamW state, allocator
                            step()
                        C.free_memory()
                        before = torch.cuda.memory_allocated() if cuda else 0
                        mem = {}
                        with C.peak_memory(dev, mem):
                            step()
                    if cuda:
                        own = C.resident_bytes(hf, step.optimizer)
                        row["peak_gib"] = (mem["peak_gib"] * 2**30 - before + own) / 2**30
                    steps[v] = (step, ctx)
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            timed = C.take_turns(steps, dev, args.steps, seed=args.seed)
            for row in combo:
                v = row["variant"]
                if v in timed:
                    row.update(step_ms=timed[v]["ms"], step_ms_runs=timed[v]["samples_ms"],
                               step_ms_rounds=timed[v]["rounds_ms"], tok_s=tokens / timed[v]["ms"] * 1e3,
                               trainable_m=sum(p.numel() for p in nets[v][2]) / 1e6)
                    step, ctx = steps[v]
                    with ctx():
                        row["gpu_ms"] = C.device_busy_ms(step, dev, calls=2)
                print({k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
            rows += combo
            summarize(rows)
            C.write_json(args.json, {"bench": "train_step", "env": info, "config": vars(args), "rows": rows})
        del nets
        C.free_memory()
    title = (f"Train step: LLaMA-7B-shaped x{base_model.config.num_hidden_layers} layers, batch {args.batch} x "
             f"{args.seq}, r=8, N={args.experts}, dropout {args.dropout}, {dt}, precision {args.precision}, "
             f"{info.get('gpu', info.get('cpu'))}")
    cols = [("targets", "targets", 0), ("checkpointing", "grad ckpt", 0), ("variant", "variant", 0),
            ("trainable_m", "trainable M", 2), ("step_ms", "step ms", 1), ("ktok_s", "k tok/s", 1),
            ("vs_peft", "x PEFT tok/s", 2)]
    if cuda:
        cols += [("gpu_ms", "GPU busy ms", 1), ("gpu_vs_peft", "GPU speed x PEFT", 2), ("peak_gib", "peak GiB", 2),
                 ("mem_vs_peft", "mem x PEFT", 2), ("mem_vs_r18", "mem x PEFT r18", 2)]
    table = C.print_table(rows, cols, title)
    C.write_json(args.json, {"bench": "train_step", "env": info, "config": vars(args), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
