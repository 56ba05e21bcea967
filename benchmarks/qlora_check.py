"""QLoRA check: HydraLoRA on a bitsandbytes 4-bit (NF4) base, against PEFT LoRA on the same base, plus the
torch.compile / CUDA-graph checks. One command, one JSON file:

    python benchmarks/qlora_check.py --out "$OUT/qlora_check.json"          # CUDA GPU + bitsandbytes, ~1-2 min

A Llama of real width built from its config (random weights, no download; default 4 layers x 2048 hidden, 32k
vocabulary) is saved in bf16 and loaded back in 4-bit NF4 (double quantization, bf16 compute), prepared with
peft.prepare_model_for_kbit_training, then for HydraLoRA (r=16, N=3, all-linear, dropout 0.05, balance loss 0.01)
and PEFT LoRA (r=16, all-linear): training steps (bf16 autocast, AdamW), step time (median after warm-up) and peak
memory. For HydraLoRA also: save, load onto a fresh 4-bit base (same logits), greedy generation under token and
sequence routing, the gates of both modes, merge (refused: quantized base) and export to a stock LoRA (loaded by
plain PEFT on the 4-bit base, same logits as the fixed mean gate). Compile checks, each in its own process (a
segfault is recorded, not fatal), on one 4096 x 4096 layer with 8192 tokens: training under
torch.compile(mode="reduce-overhead") is refused with a clear error; the same with the refusal lifted
(HYDRALORA_ALLOW_CUDAGRAPH_TRAINING=1: does it still crash?); the default compile mode trains; and the fused
kernels captured in a CUDA graph draw new dropout masks and advance the usage counts on every replay.

`--device cpu --no-4bit` runs the same steps unquantized at toy sizes (what tests/test_benchmarks.py runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import _common as C  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _versions() -> dict:
    import peft
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "python": sys.version.split()[0]}
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        out["bitsandbytes"] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# ---------------------------------------------------------------------------------------------------- the model
def build_base(folder: Path, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75) // 64 * 64 or 64,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                      vocab_size=args.vocab, max_position_embeddings=max(2048, args.seq * 2), tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)


def load_base(folder: Path, args):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if args.no_4bit:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device)
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def peft_model(base, method: str, args):
    import peft

    import hydralora

    if method == "lora":
        cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        cfg = hydralora.HydraLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, num_experts=3,
                                        target_modules="all-linear", balance_loss_coef=0.01, task_type="CAUSAL_LM")
    return peft.get_peft_model(base, cfg)


def batches(args, n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device) for _ in range(n)]


def train(model, args) -> dict:
    device = torch.device(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    data = batches(args, args.steps)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for ids in data:
        _sync(device)
        t = time.perf_counter()
        with amp:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    warm = times[2:] or times
    out = {"losses": losses, "step_seconds_median": statistics.median(warm), "step_seconds": times,
           "trainable_params": sum(p.numel() for p in params), "finite": all(map(lambda v: v == v, losses))}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


@torch.no_grad()
def logits_of(model, ids):
    model.eval()
    amp = torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.device.type == "cuda")
    with amp:
        return model(input_ids=ids).logits.float()


def hydra_checks(model, folder: Path, work: Path, args) -> dict:
    """Save / load / generate / routing / merge / export on the trained HydraLoRA model."""
    import peft

    import hydralora

    out: dict = {}
    layers = hydralora.hydra_layers(model)
    out["adapted_layers"] = len(layers)
    out["base_layer_types"] = sorted({type(layer.get_base_layer()).__name__ for _, layer in layers})
    ids = batches(args, 1)[0][:2, : min(64, args.seq)]
    ref = logits_of(model, ids)
    model.save_pretrained(work / "adapter")
    loaded = hydralora.load_adapter(load_base(folder, args), work / "adapter").eval()
    out["reload_max_abs_logit_diff"] = float((logits_of(loaded, ids) - ref).abs().max())

    prompt = ids[:, :16]
    gen = {}
    for mode in ("token", "sequence"):
        hydralora.set_routing(loaded, mode)
        seqs = loaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                               do_sample=False, pad_token_id=0)
        gen[mode] = seqs[:, prompt.shape[1]:].tolist()
    hydralora.set_routing(model, "token")
    trained_gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                 do_sample=False, pad_token_id=0)
    out["generate"] = {"new_tokens": {m: len(g[0]) for m, g in gen.items()},
                       "token_routing_equals_trained_model": gen["token"] == trained_gen[:, prompt.shape[1]:].tolist(),
                       "sequence_differs_from_token": gen["sequence"] != gen["token"]}

    # The gates each mode applies, read on the first adapted layer's real input.
    name, layer = hydralora.hydra_layers(loaded)[0]
    seen = {}

    def keep_input(module, args):
        seen.setdefault("x", args[0].detach())  # returns None: the call's input is left as it is

    handle = layer.register_forward_pre_hook(keep_input)
    logits_of(loaded, ids)
    handle.remove()
    gates = {}
    for mode in ("token", "sequence"):
        hydralora.set_routing(loaded, mode)
        with torch.no_grad():
            g = layer.route(seen["x"])  # (B, T, N)
        gates[mode] = {"shape": list(g.shape), "row_sums_max_err": float((g.sum(-1) - 1).abs().max()),
                       "spread_over_tokens": float((g - g.mean(1, keepdim=True)).abs().max())}
    out["routing"] = {"layer": name, **gates}
    usage = hydralora.expert_usage(loaded, reset=True)
    out["routing"]["usage_first_layer"] = [float(v) for v in next(iter(usage.values()))] if usage else None

    hydralora.export_lora(loaded, str(work / "lora"), "mean")
    hydralora.set_routing(loaded, "fixed", "mean")
    fixed = logits_of(loaded, ids)
    lora = peft.PeftModel.from_pretrained(load_base(folder, args), str(work / "lora"))
    cfg = json.loads((work / "lora" / "adapter_config.json").read_text())
    out["export"] = {"peft_type": cfg["peft_type"], "r": cfg["r"],
                     "max_abs_logit_diff_vs_fixed_mean": float((logits_of(lora, ids) - fixed).abs().max())}
    try:  # last: on an unquantized base (--no-4bit) the merge succeeds and unloads the adapter
        merged = hydralora.merge_and_unload(loaded, "mean")
        out["merge"] = {"refused": False, "max_abs_logit_diff_vs_fixed_mean": float((logits_of(merged, ids) - fixed).abs().max())}
    except ValueError as err:
        out["merge"] = {"refused": True, "message": str(err)}
    return out


# ---------------------------------------------------------------------------------------------- compile checks
CHILD = {"refused": "reduce-overhead training, refusal on", "allowed": "reduce-overhead training, refusal lifted",
         "default": "default-mode compile training", "capture": "fused kernels captured in a CUDA graph"}


def child(mode: str, features: int, tokens: int) -> dict:
    """One compile check in this process (run by the parent in a subprocess)."""
    import peft
    from torch import nn

    import hydralora

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(features, features, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = peft.get_peft_model(One().to(device, dt), hydralora.HydraLoraConfig(
        r=16, num_experts=3, target_modules=["proj"], lora_dropout=0.05), autocast_adapter_dtype=False).train()
    x = torch.randn(1, tokens, features, device=device, dtype=dt)
    if mode == "capture":
        os.environ["HYDRALORA_FUSED"] = "1"
        _, layer = hydralora.hydra_layers(model)[0]
        C.randomize_(layer.hydralora_B.values())  # B starts at zero: the output would not show the dropout mask
        static = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the capture (Triton compiles, caches fill)
                model(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            y = model(static)
        acc = layer.usage_acc["default"]
        before = acc.clone()
        graph.replay()
        torch.cuda.synchronize()
        y1, mid = y.clone(), acc.clone()
        graph.replay()
        torch.cuda.synchronize()
        return {"ok": True, "dropout_masks_differ_between_replays": bool((y1 != y).any()),
                "usage_tokens_per_replay": [float(mid[-1] - before[-1]), float(acc[-1] - mid[-1])],
                "usage_gate_sums_advance": bool((mid[:-1] > before[:-1]).all() and (acc[:-1] > mid[:-1]).all()),
                "tokens": tokens}
    kwargs = {} if mode == "default" else {"mode": "reduce-overhead"}
    compiled = torch.compile(model, **kwargs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    try:
        for _ in range(3):
            t = time.perf_counter()
            compiled(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    except RuntimeError as err:
        return {"ok": False, "error": f"{type(err).__name__}: {str(err)[:600]}"}
    return {"ok": True, "step_seconds": times}


def run_children(args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {}
    for mode in args.compile_checks:
        e = dict(env)
        if mode == "allowed":
            e["HYDRALORA_ALLOW_CUDAGRAPH_TRAINING"] = "1"
        else:
            e.pop("HYDRALORA_ALLOW_CUDAGRAPH_TRAINING", None)
        cmd = [sys.executable, __file__, "--child", mode, "--child-features", str(args.child_features),
               "--child-tokens", str(args.child_tokens)]
        procs[mode] = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for mode, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            out[mode] = {"what": CHILD[mode], "returncode": None, "timed_out": True, "stderr_tail": stderr[-1500:]}
            continue
        rec = {"what": CHILD[mode], "returncode": proc.returncode, "segfault": proc.returncode == -11}
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if lines:
            rec.update(json.loads(lines[-1]))
        if proc.returncode != 0 or not lines:
            rec["stderr_tail"] = stderr[-1500:]
        out[mode] = rec
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "qlora_check.json"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-4bit", action="store_true", help="unquantized base (CPU smoke run of the same steps)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--compile-checks", default="refused,allowed,default,capture",
                   help="comma-separated among refused, allowed, default, capture; 'none' skips them")
    p.add_argument("--child-features", type=int, default=4096)
    p.add_argument("--child-tokens", type=int, default=8192)
    p.add_argument("--child-timeout", type=float, default=75.0)
    p.add_argument("--child", choices=sorted(CHILD), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.child_features, args.child_tokens)))
        return 0
    args.compile_checks = [] if args.compile_checks == "none" else args.compile_checks.split(",")
    unknown = sorted(set(args.compile_checks) - set(CHILD))
    if unknown:
        p.error(f"--compile-checks: unknown {unknown}; allowed: {sorted(CHILD)} or none")
    result: dict = {"command": " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
                    "versions": _versions(), "shape": {k: getattr(args, k) for k in
                                                       ("layers", "hidden", "vocab", "batch", "seq", "steps")},
                    "quantized": not args.no_4bit}
    t0 = time.perf_counter()
    if not args.no_4bit:
        from hydralora.models import check_4bit_available

        try:
            check_4bit_available(args.device)
        except ValueError as err:
            result["error"] = str(err)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
            print(f"error: {err}", file=sys.stderr)
            return 2
    # The compile checks first, in parallel processes (Inductor compiles on the CPU), so that they do not share the
    # GPU with the timed training steps.
    children = run_children(args) if args.compile_checks else None
    with tempfile.TemporaryDirectory(prefix="qlora-check-") as tmp:
        work = Path(tmp)
        build_base(work / "base", args)
        for method in ("lora", "hydralora"):
            model = peft_model(load_base(work / "base", args), method, args)
            result[method] = train(model, args)
            if method == "hydralora":
                result["hydralora"]["checks"] = hydra_checks(model, work / "base", work, args)
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()
    result["compile"] = children
    h, lo = result["hydralora"], result["lora"]
    result["hydralora_vs_lora"] = {"step_time_ratio": h["step_seconds_median"] / lo["step_seconds_median"]}
    if "peak_memory_gib" in h:
        result["hydralora_vs_lora"]["peak_memory_ratio"] = h["peak_memory_gib"] / lo["peak_memory_gib"]
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("hydralora_vs_lora", "seconds")}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
