"""Shared benchmark helpers: arguments, timing (warm-up, CUDA events or perf_counter, median of repeats), tables,
JSON output, memory, the adapter precision every variant shares, and the switch of the fused dispatch."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from typing import Callable, Iterable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


OPTIMIZERS = ("fused", "foreach")  # AdamW implementations (trainer_step)

# The `ours svd` variants' adapter settings beside r, N and dropout: configs/hydralora-best.yaml's SVD init (whose
# frozen offset the fused op runs stacked under A and B) and router temperature; its routing warm-start needs labels.
SVD_PRESET = {"init_b": "svd", "init_a": "svd", "router_temperature": 0.1}


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="pure", choices=["pure", "amp"],
                   help="pure: adapter weights in the model's --dtype (PEFT's autocast_adapter_dtype=False). amp: fp32 adapter weights (PEFT's default) and the step "
                        "under torch.autocast in --dtype (what Trainer(bf16=True) runs). fp32 models: the same.")
    p.add_argument("--optim", default="fused", choices=list(OPTIMIZERS),
                   help="AdamW's implementation in the trainer-like steps: fused (transformers' Trainer default, "
                        "optim='adamw_torch_fused') or foreach (torch's default, optim='adamw_torch')")
    return p


def add_layer_args(p: argparse.ArgumentParser) -> None:
    """The one-layer benchmarks' shape: tokens and features (defaults by device, see layer_shape), r, N, dropout."""
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--features", type=int, default=None, help="in = out features")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.05)


def layer_shape(args, cpu_default: tuple[int, int] = (2048, 1024)) -> tuple[int, int]:
    """(tokens, features): --tokens/--features, else 8192 x 4096 on CUDA, else cpu_default."""
    T, k = (8192, 4096) if args.device == "cuda" else cpu_default
    return args.tokens or T, args.features or k


def get_peft_model(model, config, args):
    """peft.get_peft_model with the adapter weights' dtype of --precision (the same rule for every variant)."""
    import peft

    return peft.get_peft_model(model, config, autocast_adapter_dtype=args.precision == "amp")


def adapter_dtype_(params: Iterable[torch.nn.Parameter], args) -> None:
    """Give hand-built adapters (the authors' formulation) the weights' dtype PEFT gives its own under --precision."""
    if args.precision == "amp":
        for p in params:
            p.data = p.data.float()


def autocast(args, device: str, dtype: torch.dtype):
    """torch.autocast in the model's dtype under --precision amp (fp32 models need none), else nothing."""
    if args.precision == "amp" and dtype != torch.float32:
        return torch.autocast(device, dtype=dtype)
    return contextlib.nullcontext()


def resolve_dtype(args) -> torch.dtype:
    if args.dtype is None:
        return torch.bfloat16 if args.device == "cuda" else torch.float32
    return DTYPES[args.dtype]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], None], device: str, warmup: int = 5, repeats: int = 20, inner: int = 1) -> dict:
    """Median (and spread) of `repeats` timings, each the mean over `inner` back-to-back calls, after `warmup` calls.
    CUDA: events around each group (includes launch gaps, i.e. what the caller really waits for), and host_ms, the
    host's time to issue one call (near ms when a variant is bound by Python and launches, not by the GPU); CPU:
    perf_counter."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples, host = [], []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            host.append((time.perf_counter() - t0) * 1e3 / inner)  # time to issue the work (launch-bound if ~ms)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / inner)
    samples.sort()
    out = {"ms": statistics.median(samples), "min_ms": samples[0], "max_ms": samples[-1], "n": len(samples)}
    if host:
        out["host_ms"] = statistics.median(host)
    return out


def device_busy_ms(fn: Callable[[], None], device: str, calls: int = 5) -> Optional[float]:
    """The GPU's busy time per call of fn: torch.profiler's kernel, copy and fill durations on the device, summed
    and divided by `calls` (CUDA only, else None). What a call costs the GPU alone, without the host's time to issue
    it or the gaps the host leaves between kernels: on a host too slow for the GPU (the H200 machines here, where
    every variant but the frozen layer is host-bound), this is the cost that a faster host or CUDA graphs would
    leave. Call after warm-up (a compile or autotuning run inside the window would count)."""
    if device != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    busy_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    if busy_us <= 0:
        raise RuntimeError("device_busy_ms: the profiler recorded no device activity (is CUPTI available?)")
    return busy_us / 1e3 / calls


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(device: str, out: dict):
    """Peak allocated GiB inside the block (CUDA only), stored in out['peak_gib']."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30


def env_info(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    try:
        import peft
        import transformers

        info["peft"], info["transformers"] = peft.__version__, transformers.__version__
    except Exception:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            info["triton"] = triton.__version__
        except Exception:
            pass
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_table(rows: list[dict], cols: list[tuple[str, str, int]], title: Optional[str] = None) -> str:
    """cols: (key, header, decimals). Prints a Markdown table and returns it."""
    lines = []
    if title:
        lines.append(f"\n### {title}\n")
    lines.append("| " + " | ".join(h for _, h, _ in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k), nd) for k, _, nd in cols) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: Optional[str], payload: dict) -> None:
    """payload as JSON at path (nothing without a path), with the command line that made it."""
    if not path:
        return
    payload.setdefault("command", "python " + " ".join(shlex.quote(a) for a in sys.argv))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


@contextlib.contextmanager
def fused_switch(value: Optional[str]):
    """HYDRALORA_FUSED=value for the duration (None: unset, the default dispatch; '0': eager; '1': fused)."""
    old = os.environ.get("HYDRALORA_FUSED")
    if value is None:
        os.environ.pop("HYDRALORA_FUSED", None)
    else:
        os.environ["HYDRALORA_FUSED"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HYDRALORA_FUSED", None)
        else:
            os.environ["HYDRALORA_FUSED"] = old


def adamw(params: list, optim: str = "fused") -> Optional[torch.optim.AdamW]:
    """The trainer-like steps' AdamW over params (None without any). optim 'fused' is transformers' Trainer default
    on torch >= 2.8 (optim="adamw_torch_fused", so TRL's trainers too): one kernel over all parameters; 'foreach' is
    torch's own default (optim="adamw_torch")."""
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim={optim!r}: allowed values are {', '.join(OPTIMIZERS)}")
    return torch.optim.AdamW(params, lr=1e-4, **{optim: True}) if params else None


def phase_seconds(net, x: torch.Tensor, dy: torch.Tensor, opt) -> tuple[float, float, float, float]:
    """One trainer step of net on x, timed by phase on the host: (forward, backward with dy, optimizer step,
    zero_grad) seconds; the last two 0 without an optimizer. x's gradient is cleared after the backward."""
    t0 = time.perf_counter()
    y = net(x)
    t1 = time.perf_counter()
    y.backward(dy)
    x.grad = None
    t2 = time.perf_counter()
    t3 = t4 = t2
    if opt is not None:
        opt.step()
        t3 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, t4 - t3


def trainer_step(forward_backward: Callable[[], None], params: list, optim: str = "fused") -> Callable[[], None]:
    """What a trainer runs per step: forward, loss and backward (forward_backward), then an AdamW step (`adamw`) over
    the trainable params and zero_grad (grads set to None)."""
    opt = adamw(params, optim)

    def step():
        forward_backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step.optimizer = opt
    return step


def resident_bytes(module: torch.nn.Module, optimizer=None) -> int:
    """Bytes a variant keeps between steps: its parameters and buffers and its optimizer's state."""
    n = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    if optimizer is not None:
        n += sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor))
    return n


def take_turns(steps: dict, device: str, repeats: int, inner: int = 1, seed: int = 0) -> dict:
    """Time every variant in turns: each round times each variant once (`inner` calls back to back), in an order
    shuffled per round (seeded), so the host's drift and a neighbour's after-effects fall on all variants alike.
    steps: {name: (step, context factory)}. Returns {name: time_ms-like dict with the rounds' median, min, max, the
    rounds' times in round order (`rounds_ms`, for paired_ratio) and, on CUDA, the host's median time to launch one
    call}."""
    samples = {v: [] for v in steps}
    host = {v: [] for v in steps}
    rng = random.Random(seed)
    for _ in range(repeats):
        order = list(steps)
        rng.shuffle(order)
        for v in order:
            step, ctx = steps[v]
            with ctx():
                t = time_ms(step, device, warmup=0, repeats=1, inner=inner)
            samples[v].append(t["ms"])
            if "host_ms" in t:
                host[v].append(t["host_ms"])
    out = {}
    for v, rounds in samples.items():
        s = sorted(rounds)
        out[v] = {"ms": statistics.median(s), "min_ms": s[0], "max_ms": s[-1], "n": len(s), "samples_ms": s,
                  "rounds_ms": rounds}
        if host[v]:
            out[v]["host_ms"] = statistics.median(host[v])
    return out


def paired_ratio(num: Optional[list], den: Optional[list]) -> Optional[float]:
    """Median over rounds of num[i] / den[i], two variants' figures from the same rounds in round order (None where
    either is missing or they differ in length). A ratio within a round sees one host speed: the host drifts by tens
    of percent within a minute on the GPU machines measured, which a ratio of the two medians would carry."""
    if not num or not den or len(num) != len(den):
        return None
    return statistics.median(a / b for a, b in zip(num, den))


def randomize_(tensors: Iterable[torch.Tensor], std: float = 0.02, seed: int = 0) -> None:
    """Non-zero adapter weights (zero B would time a degenerate case)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_((torch.randn(t.shape, generator=gen) * std).to(t.dtype))


def random_llama(cfg, dev, dt, seed: int):
    """A frozen LlamaForCausalLM with random weights, built directly on `dev` in dtype `dt` (SDPA attention)."""
    from transformers import LlamaForCausalLM

    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.requires_grad_(False)
    return model
