"""Host cost of one adapted layer call through the fused dispatch, on a CPU stand-in: microseconds and Python
function calls per call, HydraLoRA (N=3) and PEFT LoRA r=8, decode (1 token, inference mode) and train (8 tokens,
forward + backward). Every check runs as on the GPU (x reports is_cuda, Triton "installed"), the PyTorch reference
replaces the kernels, tiny features make the compute negligible: what is left is the Python a fast GPU waits on.

    python benchmarks/investigations/dispatch_host_cost.py [--features 16] [--profile tottime] [--json OUT]
    python benchmarks/investigations/dispatch_host_cost.py --stub-kernels   # kernels as output allocations only
    PYTHONPATH=<another checkout's src> python ...   # the same for older code (fused.py before the ops split too)

--stub-kernels replaces the kernels' PyTorch reference (about 15 small ops each) by allocating their outputs,
which is the host side of a GPU launch less Triton's launcher; train calls are then also timed as forward and
backward apart.

    python benchmarks/investigations/dispatch_host_cost.py --generate --stub-kernels
    python benchmarks/investigations/dispatch_host_cost.py --stub-kernels --features 32 --kinds "peft,ours svd,ours svd eager"

--phases times a trainer step through the PeftModel instead (forward, backward, fused AdamW step, zero_grad),
host us per phase: what the model-level hooks and the optimizer's per-tensor work add to the layer's own cost.

    python benchmarks/investigations/dispatch_host_cost.py --phases --stub-kernels --features 32

--generate times bench_generate.py's batch-1 greedy decode instead (q_proj and v_proj adapted, a 32-token prompt)
on an 8-layer LLaMA with tiny features: host milliseconds per new token, base vs PEFT LoRA r=8 vs HydraLoRA through
the fused dispatch, in turns: the layer calls together with the model-level hooks and transformers' own loop.

--generate --sequence adds HydraLoRA under sequence routing, through the fused dispatch and eager (HYDRALORA_FUSED=0).

--kinds picks the layer calls compared: peft, ours, ours svd (the hydralora-best preset's adapter: SVD init, whose
frozen offset the op runs stacked with A and B; needs --features >= 24) and any of them + " eager" for ours
under HYDRALORA_FUSED=0.
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
import warnings

import peft
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as C  # noqa: E402

import hydralora
from hydralora.ops import fused as F

warnings.filterwarnings("ignore")
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--features", type=int, default=16)
ap.add_argument("--profile", default=None, help="also print ours' cProfile table sorted by this key")
ap.add_argument("--json", default=None)
ap.add_argument("--stub-kernels", action="store_true", help="the kernels as output allocations (see above)")
ap.add_argument("--generate", action="store_true", help="time a greedy decode per new token (see above)")
ap.add_argument("--rounds", type=int, default=15, help="--generate: timed rounds (each times every variant once)")
ap.add_argument("--phases", action="store_true", help="time a trainer step through the PeftModel by phase (see above)")
ap.add_argument("--sequence", action="store_true", help="--generate: also ours under sequence routing, fused and eager")
ap.add_argument("--kinds", default="peft,ours", help="comma list: peft, ours, ours svd, ours eager, ours svd eager")
args = ap.parse_args()
torch.set_num_threads(1)
F.HAS_TRITON = True
if not args.generate:  # (transformers' generate reads is_cuda too: there the dispatch's device check is patched)
    torch.Tensor.is_cuda = property(lambda self: True)  # every check as on the GPU ...
try:  # the ops split: dispatch.py decides, fused.use_triton picks the backend
    from hydralora.ops import dispatch

    F.use_triton = lambda x, dtype, backend: False  # ... but the PyTorch backend's kernels
    dispatch.kernel_device = lambda x: True
    layout = "split"
except ImportError:  # one fused.py
    F._kernel_device = lambda x: True
    F._use_triton = lambda x, backend: False
    layout = "fused.py"
d = args.features
if args.stub_kernels:
    from hydralora.ops import reference

    def _proj(x2, A, G, *rest, **kw):  # the projection kernel's outputs: z, h, gate, raw logits
        T, N, R = x2.shape[0], G.shape[0], A.shape[0]
        return (torch.empty(T, N * R, dtype=x2.dtype), torch.empty(T, R), torch.empty(T, N), torch.empty(T, N))

    def _bwd_x(x2, dz, h, gate, gl, A, G, *rest):  # the outputs of launch.bwd_x's two kernels
        N, R, K = G.shape[0], A.shape[0], x2.shape[1]
        torch.empty(2, R + N, K)  # the backward kernel's per-row-block partial sums
        return torch.empty_like(x2), torch.empty(R, K, dtype=A.dtype), torch.empty(N, K, dtype=G.dtype)

    def _proj_mix(x2, res, A, G, Bf, out, *rest):  # the small-call kernel writes into out
        return out

    reference.proj, reference.bwd_x, reference.proj_mix = _proj, _bwd_x, _proj_mix


def make_model(kind, train):
    """The kind's PeftModel around one d x d projection, in bf16."""
    base = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False))
    if kind == "peft":
        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["0"])
    else:
        preset = C.SVD_PRESET if kind.startswith("ours svd") else {}
        cfg = hydralora.HydraLoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, num_experts=3, target_modules=["0"],
                                        **preset)
    m = peft.get_peft_model(base, cfg, autocast_adapter_dtype=False)
    return m.to(torch.bfloat16).train(train)


def make(kind, train):
    """The kind's tuner layer (make_model's projection)."""
    return make_model(kind, train).base_model.model[0]


def best_us(fn, n, rounds):
    """Host us of one call of fn, after 200 warm-up calls: the best of `rounds` rounds of n calls."""
    for _ in range(200):
        fn()
    best = 1e9
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return round(best, 1)


def step_phases(kind, n):
    """Host us per phase of a trainer step through the kind's PeftModel (forward, backward, fused AdamW step,
    zero_grad): the model-level hooks and the optimizer's per-tensor work as well as the layer's own."""
    switch_for(kind)
    m = make_model(kind, True)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)
    x = torch.randn(1, 8, d, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(1, 8, d, dtype=torch.bfloat16)
    acc = [0.0] * 4
    for i in range(n + 200):  # 200 warm-up steps
        times = C.phase_seconds(m, x, dy, opt)
        if i >= 200:
            for j, t in enumerate(times):
                acc[j] += t
    return [a / n * 1e6 for a in acc]


def caller(layer, mode):
    if mode == "decode":
        x = torch.randn(1, 1, d, dtype=torch.bfloat16)

        def call():
            layer(x)
    else:
        x = torch.randn(1, 8, d, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(1, 8, d, dtype=torch.bfloat16)

        def call():
            layer(x).backward(dy)
    return call


def switch_for(kind):
    """HYDRALORA_FUSED for a kind: '0' for the eager kinds, else the default dispatch."""
    os.environ["HYDRALORA_FUSED"] = "0" if kind.endswith("eager") else "auto"


def measure(kind, mode, n=2000):
    switch_for(kind)
    layer = make(kind, mode == "train")
    call = caller(layer, mode)
    ctx = torch.inference_mode if mode == "decode" else torch.enable_grad
    with ctx():
        best = best_us(call, n, 7)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(100):
            call()
        pr.disable()
    return best, pstats.Stats(pr).total_calls // 100, layer, call


def generate_ms_per_token(rounds: int) -> dict:
    """Host ms per new token of a batch-1 greedy decode (a 32-new-token generate less a 1-token one, per token),
    median and fastest of `rounds` rounds, each timing every variant once in a shuffled order."""
    import copy
    import random
    import statistics

    from transformers import LlamaConfig, LlamaForCausalLM

    from bench_generate import gen_seconds  # (benchmarks/ is on sys.path, for _common)

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4 * d, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=8 * d, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    targets = ["q_proj", "v_proj"]
    configs = {"peft r8": peft.LoraConfig(r=8, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM"),
               "ours": hydralora.HydraLoraConfig(r=8, num_experts=3, lora_dropout=0.05, target_modules=targets,
                                                 task_type="CAUSAL_LM")}
    nets = {"base": base, **{k: peft.get_peft_model(copy.deepcopy(base), c, autocast_adapter_dtype=False).eval()
                             for k, c in configs.items()}}
    if args.sequence:  # sequence routing, through the fused dispatch and (HYDRALORA_FUSED=0) eager
        for k in ("ours sequence", "ours sequence eager"):
            nets[k] = peft.get_peft_model(copy.deepcopy(base), configs["ours"], autocast_adapter_dtype=False).eval()
            hydralora.set_routing(nets[k], "sequence")
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(0))

    def seconds(model, n):  # bench_generate's timed greedy generate of exactly n new tokens (inference mode)
        switch_for("eager" if model is nets.get("ours sequence eager") else "fused")
        return gen_seconds(model, ids, n, "cpu")

    runs = {k: [] for k in nets}
    rng = random.Random(0)
    for model in nets.values():
        seconds(model, 32), seconds(model, 1)
    for _ in range(rounds):
        order = list(nets)
        rng.shuffle(order)
        for k in order:
            runs[k].append((seconds(nets[k], 32) - seconds(nets[k], 1)) / 31 * 1e3)
    out = {k: {"median_ms": round(statistics.median(v), 3), "fastest_ms": round(min(v), 3)} for k, v in runs.items()}
    from hydralora.tuner import layer as hlayer

    calls = {"n": 0}
    run_plan = hlayer.run_plan

    def counted(*a, **kw):
        calls["n"] += 1
        return run_plan(*a, **kw)

    hlayer.run_plan = counted  # the fused op's entry as the layer calls it: the calls that took the fused path
    for k in [k for k in ("ours", "ours sequence") if k in nets]:
        calls["n"] = 0
        seconds(nets[k], 2)
        out[f"{k}: fused layer calls per forward"] = calls["n"] / 2  # prefill + 1 decode step
    hlayer.run_plan = run_plan
    for k in runs:
        if k.startswith("ours"):
            out[f"{k} / peft r8, median"] = round(out[k]["median_ms"] / out["peft r8"]["median_ms"], 3)
    return out


if args.phases:
    kinds = [k.strip() for k in args.kinds.split(",")]
    best = {}
    for _ in range(3):  # in turns, best of three rounds, phase by phase
        for kind in kinds:
            now = step_phases(kind, 1000)
            best[kind] = [min(a, b) for a, b in zip(best.get(kind, now), now)]
    res = {"layout": layout, "features": d, "stub_kernels": args.stub_kernels,
           "train step through the PeftModel, host us (forward, backward, AdamW step, zero_grad)":
               {k: [round(v, 1) for v in ph] for k, ph in best.items()},
           "train step host us": {k: round(sum(ph), 1) for k, ph in best.items()}}
    if "peft" in best:
        for k in kinds:
            if k != "peft":
                res[f"train step {k}/peft us"] = round(sum(best[k]) / sum(best["peft"]), 3)
    # what the model-level hooks cost a forward: torch's call path for a hooked module and the hooks' own bodies
    for k in [k for k in kinds if k.startswith("ours")]:
        switch_for(k)
        m = make_model(k, True)
        x = torch.randn(1, 8, d, dtype=torch.bfloat16, requires_grad=True)
        hooked = best_us(lambda: m(x), 2000, 5)
        for handle in m.base_model._hydra_hooks:
            handle.remove()
        res[f"{k}: model forward us, with / without the model-level hooks"] = [hooked, best_us(lambda: m(x), 2000, 5)]
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    raise SystemExit(0)

if args.generate:
    res = {"layout": layout, "features": d, "stub_kernels": args.stub_kernels,
           "generate, host ms per new token": generate_ms_per_token(args.rounds)}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    raise SystemExit(0)

res = {"layout": layout, "features": d}
kinds = [k.strip() for k in args.kinds.split(",")]
for mode in ("decode", "train"):
    for kind in kinds * 2:  # in turns, twice: the better of the two
        us, calls, layer, call = measure(kind, mode, 2000 if mode == "decode" else 500)
        key = f"{mode} {kind}"
        old = res.get(key)
        res[key] = {"us": min(us, old["us"]) if old else us, "python_calls": calls}
    for kind in kinds:
        if kind != "peft" and "peft" in kinds:
            res[f"{mode} {kind}/peft us"] = round(res[f"{mode} {kind}"]["us"] / res[f"{mode} peft"]["us"], 2)
if args.stub_kernels:  # the train call's forward and backward apart, in turns, best of three rounds
    for _ in range(3):
        for kind in kinds:
            switch_for(kind)
            layer = make(kind, True)
            x = torch.randn(1, 8, d, dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(1, 8, d, dtype=torch.bfloat16)
            for _ in range(200):
                layer(x).backward(dy)
            fwd = bwd = 0.0
            for _ in range(1000):
                t0 = time.perf_counter()
                y = layer(x)
                t1 = time.perf_counter()
                y.backward(dy)
                fwd, bwd = fwd + t1 - t0, bwd + time.perf_counter() - t1
            key = f"train {kind} forward / backward us"
            old = res.get(key, [1e9, 1e9])
            res[key] = [round(min(old[0], fwd * 1e3), 1), round(min(old[1], bwd * 1e3), 1)]
res["stub_kernels"] = args.stub_kernels
print(json.dumps(res, indent=1))
if args.json:
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
if args.profile:
    _, _, layer, call = measure("ours", "decode", 10)
    with torch.inference_mode():
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(3000):
            call()
        pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats(args.profile).print_stats(45)
    print(s.getvalue())
