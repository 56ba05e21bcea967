"""Generation speed (random weights): decode tokens/s of HydraLoRA with token and sequence routing vs PEFT LoRA r=8,
and of HydraLoRA merged under a fixed gate vs the base model, all in one run.

    python benchmarks/bench_generate.py --device cuda     # SmolLM2-135M-shaped and 7B-shaped (8 layers), batch 1 and 32
    python benchmarks/bench_generate.py --device cpu      # SmolLM2-135M-shaped only, batch 1, fewer tokens

Decode time = time(generate N new tokens) - time(generate 1 new token) (the prefill), so
decode tok/s = batch * (N - 1) / decode time. Greedy, no EOS, adapters on q_proj and v_proj.
Each variant is its own copy of the model, and the variants take turns: every repeat times each of them once,
in alternating order; a variant's figure is its median over the repeats, a ratio the median of the repeats' own
ratios (paired: one host speed in each). Decoding is bound by the host, whose speed drifts by tens of percent over
a minute on the GPU machines measured (the same F.linear call took 27 and 45 us in one process): timed one after
the other, variants compared the host's moments, not themselves.
On CUDA also the GPU busy time per decode step (torch.profiler's kernel durations over a generate of --gpu-tokens
new tokens minus those of a 1-token generate, per step): decode's cost on the GPU alone. Decoding is bound by the
host on the machines measured so far (tokens/s then moves with the host's speed, up to 50% between rows), while
the GPU's time is what CUDA-graph decoding or a faster host would leave.
Variants (--variants keys): base, peft (PEFT LoRA r=8), token (ours, token routing, the default dispatch: the fused
op on CUDA), eager (ours, token routing, HYDRALORA_FUSED=0), sequence (ours, sequence routing), merged (ours,
hydralora.merge_and_unload(model, "mean")). Adapters are built with peft.get_peft_model and default configs.
    python benchmarks/bench_generate.py --device cuda --variants peft,token --models smollm2-135m   # a short call
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time

import torch

import _common as C

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "llama7b-8l": dict(hidden_size=4096, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000),
}


# --variants keys and the rows they name
VARIANTS = {"base": "base", "peft": "peft r8", "token": "ours token", "eager": "ours token (eager)",
            "sequence": "ours sequence", "merged": "ours merged (gate mean)"}


def make_model(name, dev, dt, seed):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SHAPES[name], max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return C.random_llama(cfg, dev, dt, seed).eval()


def gen_kwargs(ids, n_new):
    """Greedy generation of exactly n_new tokens (no EOS stop)."""
    return dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0,
                attention_mask=torch.ones_like(ids))


def gen_seconds(model, ids, n_new, dev):
    """Wall seconds of one greedy generate of n_new tokens."""
    kw = gen_kwargs(ids, n_new)
    with torch.inference_mode():
        C.sync(dev)
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        C.sync(dev)
    assert out.shape[1] == ids.shape[1] + n_new, out.shape
    return time.perf_counter() - t0


def take_turns(nets, ids, n_new, dev, repeats):
    """{variant: (median decode seconds, median prefill seconds, decode seconds per repeat)}: each repeat times
    every variant once (its prefill, a 1-token generate, right after its n_new-token generate), the order reversed
    every other repeat."""
    order = list(nets)
    for key in order:  # warm-up: compilation, autotuning, allocator
        with nets[key][1]():
            gen_seconds(nets[key][0], ids, n_new, dev)
            gen_seconds(nets[key][0], ids, 1, dev)
    runs = {key: [] for key in order}
    for rep in range(repeats):
        for key in (order if rep % 2 == 0 else order[::-1]):
            with nets[key][1]():
                t_all = gen_seconds(nets[key][0], ids, n_new, dev)
                t_pre = gen_seconds(nets[key][0], ids, 1, dev)
            runs[key].append((t_all - t_pre, t_pre))
    return {key: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v), [r[0] for r in v])
            for key, v in runs.items()}


def gpu_step_ms(model, ids, n_new, dev):
    """GPU busy ms per decode step: device time of generating n_new tokens minus that of generating 1, per step."""
    with torch.inference_mode():
        busy = {n: C.device_busy_ms(lambda: model.generate(ids, **gen_kwargs(ids, n)), dev, calls=1)
                for n in (1, n_new)}
    return (busy[n_new] - busy[1]) / (n_new - 1)


def build_variants(name, wanted, dev, dt, args):
    """{variant key: (model, context to run it in)}, one model copy per variant, in VARIANTS' order. The adapters'
    B matrices are random (zero B would time a degenerate case)."""
    import peft

    import hydralora

    base = make_model(name, dev, dt, args.seed)
    plain = contextlib.nullcontext
    nets = {}
    if "base" in wanted:
        nets["base"] = (base, plain)
    if "peft" in wanted:
        lcfg = peft.LoraConfig(r=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        pm = C.get_peft_model(copy.deepcopy(base), lcfg, args)
        C.randomize_([q for n, q in pm.named_parameters() if "lora_B" in n])
        nets["peft"] = (pm.eval(), plain)
    if {"token", "eager", "sequence", "merged"} & set(wanted):
        hcfg = hydralora.HydraLoraConfig(r=8, num_experts=3, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                         task_type="CAUSAL_LM")
        hm = C.get_peft_model(copy.deepcopy(base), hcfg, args)
        C.randomize_([q for _, layer in hydralora.hydra_layers(hm) for q in layer.hydralora_B.values()])
        hm.eval()
        if "token" in wanted:
            nets["token"] = (hm, lambda: C.fused_switch(None))
        if "eager" in wanted:
            nets["eager"] = (hm, lambda: C.fused_switch("0"))
        if "sequence" in wanted:
            seq = copy.deepcopy(hm)
            hydralora.set_routing(seq, "sequence")
            nets["sequence"] = (seq, plain)
        if "merged" in wanted:
            nets["merged"] = (hydralora.merge_and_unload(copy.deepcopy(hm), "mean"), plain)
    return {key: nets[key] for key in VARIANTS if key in nets}


def add_ratios(rows):
    """x_base / x_peft (tokens/s over the base's / PEFT's of the same model and batch) and the GPU's speed ratios."""
    for r in rows:
        same = [o for o in rows if o["model"] == r["model"] and o["batch"] == r["batch"]]
        for ref, col in [(VARIANTS["base"], "base"), (VARIANTS["peft"], "peft")]:
            o = next((o for o in same if o["variant"] == ref), None)
            if o is None:  # not among --variants
                continue
            paired = C.paired_ratio(r.get("decode_tok_s_runs"), o.get("decode_tok_s_runs"))  # within repeats
            r[f"x_{col}"] = paired if paired is not None else r["decode_tok_s"] / o["decode_tok_s"]
            if "gpu_ms_step" in r:  # a speed ratio, like x_base / x_peft: the other's time over this one's
                r[f"gpu_x_{col}"] = o["gpu_ms_step"] / r["gpu_ms_step"]


def main():
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma list of " + ",".join(SHAPES))
    p.add_argument("--batches", default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma list of " + ",".join(VARIANTS) + " (fewer rows fit a time-limited GPU call; the ratios "
                        "need base and peft)")
    p.add_argument("--gpu-tokens", type=int, default=33,
                   help="new tokens of the profiled generate behind the GPU busy time per decode step (CUDA)")
    args = p.parse_args()
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in wanted if v not in VARIANTS]
    if bad or not wanted:
        p.error(f"--variants: {args.variants!r} names {bad or 'nothing'}; allowed: {', '.join(VARIANTS)}")
    dev, dt = args.device, C.resolve_dtype(args)
    cuda = dev == "cuda"
    models = (args.models or ("smollm2-135m,llama7b-8l" if cuda else "smollm2-135m")).split(",")
    batches = [int(b) for b in (args.batches or ("1,32" if cuda else "1")).split(",")]
    n_new = args.new_tokens or (128 if cuda else 32)
    rows = []
    for name in models:
        nets = build_variants(name, wanted, dev, dt, args)
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        for b in batches:
            ids = torch.randint(3, SHAPES[name]["vocab_size"], (b, args.prompt), generator=gen).to(dev)
            with C.autocast(args, dev, dt):
                timed = take_turns(nets, ids, n_new, dev, args.repeats)
                for key, (net, ctx) in nets.items():
                    decode_s, prefill_s, each = timed[key]
                    row = {"model": name, "batch": b, "variant": VARIANTS[key], "prefill_ms": prefill_s * 1e3,
                           "decode_tok_s": b * (n_new - 1) / max(decode_s, 1e-9),
                           "decode_tok_s_runs": [b * (n_new - 1) / max(d, 1e-9) for d in each]}
                    if cuda:
                        with ctx():
                            row["gpu_ms_step"] = gpu_step_ms(net, ids, args.gpu_tokens, dev)
                            C.free_memory()
                            before, mem = torch.cuda.memory_allocated(), {}
                            with C.peak_memory(dev, mem):  # the generate's peak over what was resident, plus its weights
                                gen_seconds(net, ids, n_new, dev)
                            row["peak_gib"] = (mem["peak_gib"] * 2**30 - before + C.resident_bytes(net)) / 2**30
                    rows.append(row)
                    shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
                    shown["decode_tok_s_runs"] = [round(v, 1) for v in row["decode_tok_s_runs"]]
                    print(shown, flush=True)
            add_ratios(rows)
            C.write_json(args.json, {"bench": "generate", "env": C.env_info(dev), "config": vars(args),
                                     "rows": rows})  # partial results survive a time limit
        del nets
        C.free_memory()

    add_ratios(rows)
    info = C.env_info(dev)
    title = f"Generation: {n_new} new tokens after a {args.prompt}-token prompt, greedy, {dt}, precision {args.precision}, " \
            f"{info.get('gpu', info.get('cpu'))}"
    cols = [("model", "model", 0), ("batch", "batch", 0), ("variant", "variant", 0),
            ("decode_tok_s", "decode tok/s", 1), ("x_peft", "x PEFT LoRA r=8", 2), ("x_base", "x base", 2),
            ("prefill_ms", "prefill ms", 1)]
    if cuda:
        cols += [("gpu_ms_step", "GPU busy ms/step", 3), ("gpu_x_peft", "GPU speed x PEFT", 2),
                 ("gpu_x_base", "GPU speed x base", 2), ("peak_gib", "peak GiB", 2)]
    table = C.print_table(rows, cols, title)
    C.write_json(args.json, {"bench": "generate", "env": info, "config": vars(args), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
