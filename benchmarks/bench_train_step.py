"""Training step of a LLaMA-2-7B-shaped decoder (random weights): tokens/s and peak memory, HydraLoRA vs PEFT LoRA
r=8 vs the authors' formulation, all in one run.

    python benchmarks/bench_train_step.py --device cuda      # hidden 4096, inter 11008, 32 heads, 8 layers, 4 x 1024
    python benchmarks/bench_train_step.py --device cpu       # a small shape, to check the script runs

For each of {q_proj+v_proj, all-linear} x {no checkpointing, gradient checkpointing}: base (frozen, backward to
the embeddings), PEFT LoRA r=8, the authors' formulation, ours eager (HYDRALORA_FUSED=0), ours fused
(HYDRALORA_FUSED=1: the layers' fused ops; with these plain nn.Linear bases, hydralora.ops.hydra_linear_fused). One
step = forward, loss, backward, AdamW over the adapter parameters. On CUDA also the GPU busy time per step (kernel
durations summed by torch.profiler): near the step's time when the GPU is the bound, below it when the host is.
"""

from __future__ import annotations

import torch

import _common as C
from authors_formulation import apply_authors, restore_authors


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
    """Returns (module to call, trainable params, undo)."""
    import peft

    import hydralora

    tm = "all-linear" if targets == "all-linear" else ["q_proj", "v_proj"]
    if variant == "base":
        model.get_input_embeddings().weight.requires_grad_(False)
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        return model, [], hook.remove
    if variant == "peft r8":
        pm = C.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=args.dropout,
                                                     target_modules=tm, task_type="CAUSAL_LM"), args)
        C.randomize_([p for n, p in pm.named_parameters() if "lora_B" in n])
        return pm, [p for p in pm.parameters() if p.requires_grad], lambda: pm.unload()
    if variant == "authors":
        replaced = apply_authors(model, tm if tm == "all-linear" else set(tm), r=8, lora_alpha=16,
                                 dropout=args.dropout, num_experts=args.experts)
        mods = [getattr(p, leaf) for p, leaf, _ in replaced]
        C.randomize_([b.weight for m in mods for b in m.lora_B])
        trainable = [p for m in mods for p in m.parameters() if p.requires_grad]
        C.adapter_dtype_(trainable, args)
        return model, trainable, lambda: restore_authors(replaced)
    cfg = hydralora.HydraLoraConfig(r=8, lora_alpha=16, lora_dropout=args.dropout, num_experts=args.experts,
                                    target_modules=tm, task_type="CAUSAL_LM")
    pm = C.get_peft_model(model, cfg, args)
    C.randomize_([p for _, layer in hydralora.hydra_layers(pm) for p in layer.hydralora_B.values()])
    return pm, [p for p in pm.parameters() if p.requires_grad], lambda: pm.unload()


def main():
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="base,peft r8,authors,ours eager,ours fused")
    p.add_argument("--targets", default="qv,all-linear")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--small", action="store_true", help="tiny model (default on cpu)")
    args = p.parse_args()
    dev, dt = args.device, C.resolve_dtype(args)
    if dev == "cpu":
        args.small = True
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 2, 1
    model = make_model(args, dev, dt)
    model.train()
    tokens = args.batch * args.seq
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(dev)
    rows = []
    for targets in args.targets.split(","):
        for gc_on in [c == "on" for c in args.checkpointing.split(",")]:
            if gc_on:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
            for v in args.variants.split(","):
                row = {"targets": targets, "checkpointing": "on" if gc_on else "off", "variant": v}
                rows.append(row)
                C.free_memory()
                try:
                    net, trainable, undo = attach(v, model, targets, args)
                    net.train()
                    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

                    def step():
                        with C.autocast(args, dev, dt):
                            loss = net(input_ids=ids, labels=ids).loss
                        loss.backward()
                        if opt is not None:
                            opt.step()
                            opt.zero_grad(set_to_none=True)

                    with C.fused_dispatch(v == "ours fused"):
                        # One step outside the memory window: Triton's autotuner (first fused call per shape) times
                        # its configs with a 256 MiB L2-flush buffer that is not the layer's memory.
                        step()
                        mem = {}
                        with C.peak_memory(dev, mem):
                            t = C.time_ms(step, dev, warmup=args.warmup, repeats=args.steps, inner=1)
                        # the GPU's own time per step (kernels summed): near step_ms when the GPU is the bound
                        row["gpu_ms"] = C.device_busy_ms(step, dev, calls=2)
                    row.update(step_ms=t["ms"], tok_s=tokens / t["ms"] * 1e3, peak_gib=mem.get("peak_gib"),
                               trainable_m=sum(p.numel() for p in trainable) / 1e6)
                    del opt, step, trainable
                    undo()
                    del net
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                print({k: (round(v_, 3) if isinstance(v_, float) else v_) for k, v_ in row.items()}, flush=True)
    for r in rows:
        same = [o for o in rows if o["targets"] == r["targets"] and o["checkpointing"] == r["checkpointing"]]
        lora = next((o for o in same if o["variant"] == "peft r8" and "tok_s" in o), None)
        auth = next((o for o in same if o["variant"] == "authors" and "tok_s" in o), None)
        if "tok_s" in r and lora:
            r["vs_peft"] = r["tok_s"] / lora["tok_s"]
            if r.get("peak_gib") and lora.get("peak_gib"):
                r["mem_vs_peft"] = r["peak_gib"] / lora["peak_gib"]
        if r.get("gpu_ms") and lora and lora.get("gpu_ms"):
            r["gpu_vs_peft"] = lora["gpu_ms"] / r["gpu_ms"]  # a speed ratio, like vs_peft
        if "tok_s" in r and auth:
            r["vs_authors"] = r["tok_s"] / auth["tok_s"]
        if "tok_s" in r:
            r["ktok_s"] = r["tok_s"] / 1e3
    info = C.env_info(dev)
    title = (f"Train step: LLaMA-7B-shaped x{model.config.num_hidden_layers} layers, batch {args.batch} x {args.seq}, "
             f"r=8, N={args.experts}, dropout {args.dropout}, {dt}, precision {args.precision}, {info.get('gpu', info.get('cpu'))}")
    cols = [("targets", "targets", 0), ("checkpointing", "grad ckpt", 0), ("variant", "variant", 0),
            ("step_ms", "step ms", 1), ("ktok_s", "k tok/s", 1), ("vs_peft", "x PEFT LoRA r=8 tok/s", 2),
            ("vs_authors", "x authors tok/s", 2), ("peak_gib", "peak GiB", 2), ("mem_vs_peft", "mem x PEFT", 2)]
    if dev == "cuda":
        cols += [("gpu_ms", "GPU busy ms", 1), ("gpu_vs_peft", "GPU speed x PEFT", 2)]
    table = C.print_table(rows, cols, title)
    C.write_json(args.json, {"bench": "train_step", "env": info, "config": vars(args), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
