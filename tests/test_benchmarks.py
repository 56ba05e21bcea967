"""The benchmark scripts run on a clean clone (CPU, tiny shapes) and report ratios from one run. Speed itself is not
asserted here: the figures live in docs/performance.md with their commands and machines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = {
    "bench_layer.py": ["--features", "64", "--tokens", "32", "--repeats", "2", "--threads", "1",
                       "--variants", "base,peft r8,ours,ours eager,ours layer,ours fused delta,authors"],
    "bench_train_step.py": ["--targets", "qv", "--checkpointing", "off,on",
                            "--variants", "base,peft r8,peft r18,ours,authors"],
    "bench_generate.py": ["--new-tokens", "3", "--repeats", "1", "--variants", "base,peft,token,sequence,merged"],
    "investigations/saved_activations.py": ["--hidden", "64", "--seq", "16"],
}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("precision", ["pure", "amp"])
@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_and_reports_ratios(script, precision, tmp_path):
    if script == "bench_generate.py" and precision == "amp":
        pytest.skip("one generate run is enough (it builds a 135M-shaped model)")
    # amp only differs from pure below fp32; its runs also take torch's own AdamW (foreach) instead of Trainer's fused
    extra = ["--dtype", "bf16", "--optim", "foreach"] if precision == "amp" else []
    proc = _run(script, *TINY[script], "--precision", precision, *extra, "--json", str(tmp_path / "out.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    if script == "investigations/saved_activations.py":
        assert "x PEFT LoRA r=8" in proc.stdout
        return
    payload = json.loads((tmp_path / "out.json").read_text())
    rows = payload["rows"]
    assert rows and not [r for r in rows if "error" in r]
    ratio = {"bench_layer.py": "x_peft_r8", "bench_train_step.py": "vs_peft", "bench_generate.py": "x_peft"}[script]
    assert all(r[ratio] > 0 for r in rows)
    assert next(r for r in rows if r["variant"] == "peft r8")[ratio] == pytest.approx(1.0)
    requested = TINY[script][TINY[script].index("--variants") + 1].split(",")
    assert len({r["variant"] for r in rows}) == len(requested)
    assert script in payload["command"]
    # the docs' table generator renders what the run wrote
    name = {"bench_layer.py": "layer.json", "bench_train_step.py": "train_step.json",
            "bench_generate.py": "generate.json"}[script]
    (tmp_path / "out.json").rename(tmp_path / name)
    text = _tables().render(str(tmp_path))
    assert payload["command"] in text and text.count("\n|") >= len(rows) + 1


def _tables():
    import importlib.util

    spec = importlib.util.spec_from_file_location("perf_tables", BENCH / "perf_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_layer_prints_the_ops(tmp_path):
    proc = _run("investigations/profile_layer.py", "--variant", "ours", "--tokens", "32", "--features", "64",
                "--steps", "2", "--trace", str(tmp_path / "trace.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "aten::mm" in proc.stdout and json.loads((tmp_path / "trace.json").read_text())["traceEvents"]


def test_perf_tables_checks_the_targets(tmp_path):
    """The table generator puts wall-clock before GPU busy time and marks each target met or MISSED."""
    env = {"gpu": "H200", "torch": "2.11", "date": "2026-12-04", "device": "cuda"}
    layer = {"command": "python benchmarks/bench_layer.py --device cuda", "env": env, "rows": [
        {"variant": "base", "ms": 0.7, "x_base": 1.0, "gpu_ms": 0.7},
        {"variant": "peft r8", "ms": 1.2, "x_base": 1.7, "x_peft_r8": 1.0, "gpu_ms": 1.1},
        {"variant": "ours", "ms": 1.3, "x_base": 1.86, "x_peft_r8": 1.08, "gpu_ms": 0.9}]}
    gen = {"command": "python benchmarks/bench_generate.py", "env": env, "rows": [
        {"model": "m", "batch": 1, "variant": "ours token", "decode_tok_s": 99.0, "x_peft": 0.99, "x_base": 0.8},
        {"model": "m", "batch": 1, "variant": "ours merged (gate mean)", "decode_tok_s": 90.0, "x_base": 0.97}]}
    (tmp_path / "layer.json").write_text(json.dumps(layer))
    (tmp_path / "generate.json").write_text(json.dumps(gen))
    text = _tables().render(str(tmp_path))
    header = next(line for line in text.splitlines() if line.startswith("| variant"))
    assert header.index("| ms |") < header.index("GPU busy ms")
    assert "| layer step, x PEFT LoRA r8 (wall) | 1.08 | <= 1.00 | MISSED |" in text
    assert "| decode m batch 1: token routing tok/s x PEFT | 0.99 | >= 0.95 | met |" in text
    assert "| decode m batch 1: merged tok/s x base | 0.97 | >= 0.98 | MISSED |" in text
    assert "H200" in text and "python benchmarks/bench_layer.py --device cuda" in text


def test_gpu_suite_parses_and_calls_scripts_that_exist():
    script = BENCH / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    words = {w for line in script.read_text().splitlines() for w in line.split()}
    called = {w for w in words if w.startswith(("benchmarks/", "tests/"))}
    assert called and all((BENCH.parent / c).exists() for c in called), called
    assert {"benchmarks/bench_layer.py", "benchmarks/bench_train_step.py", "benchmarks/bench_generate.py",
            "benchmarks/perf_tables.py"} <= called
    limits = [int(line.split()[2]) for line in script.read_text().splitlines() if line.startswith("step ")]
    assert sum(limits) <= 480, limits  # the whole set fits one 10-minute device call with room for setup


def test_bad_precision_is_refused():
    proc = _run("bench_layer.py", "--precision", "fp8")
    assert proc.returncode == 2 and "--precision" in proc.stderr and "'pure', 'amp'" in proc.stderr


def test_bad_optimizer_is_refused():
    proc = _run("bench_layer.py", "--optim", "sgd")
    assert proc.returncode == 2 and "--optim" in proc.stderr and "'fused', 'foreach'" in proc.stderr


def test_generate_variants_are_checked_before_any_model_is_built():
    proc = _run("bench_generate.py", "--variants", "base,lora")
    assert proc.returncode == 2 and "--variants: 'base,lora' names ['lora']; allowed: base, peft, token" in proc.stderr


def test_generate_variants_take_turns(monkeypatch):
    """bench_generate times the variants in turns, the order reversed every other repeat (the host's drift then
    falls on every variant alike), each variant in its own context, and reports medians over the repeats."""
    import contextlib

    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    import bench_generate

    calls, active = [], []
    clock = {"t": 0.0}

    class Net:
        def __init__(self, name, step):
            self.name, self.step = name, step

        def generate(self, ids, max_new_tokens, **kw):
            calls.append((self.name, max_new_tokens, tuple(active)))
            clock["t"] += self.step * max_new_tokens + 1.0  # 1 s of prefill, then `step` per new token
            return torch.zeros(ids.shape[0], ids.shape[1] + max_new_tokens)

    @contextlib.contextmanager
    def ctx(tag):
        active.append(tag)
        yield
        active.pop()

    monkeypatch.setattr(bench_generate.time, "perf_counter", lambda: clock["t"])
    nets = {"a": (Net("a", 0.5), lambda: ctx("A")), "b": (Net("b", 2.0), contextlib.nullcontext)}
    out = bench_generate.take_turns(nets, torch.zeros(1, 4, dtype=torch.long), 5, "cpu", repeats=2)
    order = [(n, k) for n, k, _ in calls]
    assert order == [("a", 5), ("a", 1), ("b", 5), ("b", 1),  # warm-up
                     ("a", 5), ("a", 1), ("b", 5), ("b", 1),  # repeat 1
                     ("b", 5), ("b", 1), ("a", 5), ("a", 1)]  # repeat 2, reversed
    assert all(tags == (("A",) if n == "a" else ()) for n, _, tags in calls)
    assert out["a"][:2] == pytest.approx((0.5 * 4, 1.5)) and out["b"][:2] == pytest.approx((2.0 * 4, 3.0))
    assert out["a"][2] == pytest.approx([2.0, 2.0])  # decode seconds of each repeat


def test_ratios_are_paired_within_rounds(monkeypatch):
    """take_turns keeps each variant's times in round order, and a ratio is the median of the rounds' own ratios:
    a host that slows down in some rounds moves both variants of a round, not their ratio."""
    import contextlib

    monkeypatch.syspath_prepend(str(BENCH))
    import _common as C

    host = iter([1.0, 1.0, 3.0, 3.0, 1.0, 1.0])  # the middle round runs on a 3x slower host
    clock = {"t": 0.0}

    def step(cost):
        def run():
            clock["t"] += cost * next(host)
        return run

    monkeypatch.setattr(C.time, "perf_counter", lambda: clock["t"])
    out = C.take_turns({"a": (step(1.0), contextlib.nullcontext), "b": (step(2.0), contextlib.nullcontext)},
                       "cpu", repeats=3)
    a, b = out["a"]["rounds_ms"], out["b"]["rounds_ms"]
    assert a[1] == pytest.approx(3 * a[0]) and b[1] == pytest.approx(3 * b[0])  # round order kept
    assert C.paired_ratio(b, a) == pytest.approx(2.0)
    assert C.paired_ratio([2.0, 6.0, 2.0], [1.0, 1.0, 3.0]) == pytest.approx(2.0)  # the rounds' median, not 6/1
    assert C.paired_ratio([1.0], [1.0, 2.0]) is None and C.paired_ratio(None, [1.0]) is None


def test_thanora_init_benchmark_times_the_init_and_compares_two_inits(toy, tmp_path):
    args = ["--model", str(toy / "model"), "--data", str(toy / "mix.jsonl"), "--r", "4", "--examples", "6",
            "--max-length", "32", "--threads", "1"]
    first = _run("thanora_init.py", *args, "--save-a", str(tmp_path / "a.pt"), "--json", str(tmp_path / "a.json"))
    assert first.returncode == 0, first.stderr[-3000:]
    again = _run("thanora_init.py", *args, "--compare-to", str(tmp_path / "a.pt"), "--json", str(tmp_path / "b.json"))
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["init_s"] > 0 and sum(a["ranks"].values()) == 4 and a["heterogeneity"] == b["heterogeneity"]
    cmp = b["compare_to"]  # the same init twice (same seed): every block spans the same subspace
    assert cmp["same_slices"] and cmp["blocks"] > 0 and cmp["min_cos"] > 0.9999


def test_dropout_hash_variants_compile_for_hopper_and_the_kernel_scripts_need_cuda():
    """Each mask variant of dropout_hash_cost.py replaces the kernels' `_keep` in its own module copy, which Triton
    builds for sm_90 (no GPU needed); without CUDA the script stops with a clear message."""
    triton = pytest.importorskip("triton")
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(BENCH / "investigations"))
    try:
        import dropout_hash_cost as D
    finally:
        sys.path.remove(str(BENCH / "investigations"))
    mod = D.variant_module("quad16")
    assert "tl.interleave(lo, lo2)" in mod._keep.src and mod._proj_fwd.fn is not D.tk._proj_fwd.fn
    sig = {"X": "*bf16", "A": "*bf16", "G": "*bf16", "Z": "*bf16", "H": "*fp32", "P": "*fp32", "L": "*fp32",
           "U": "*fp32", "W": "*fp32", "S": "*i64", "seed_ptr": "i32", "s1": "i32", "s2": "i32", "T": "i32",
           "K": "i32", "TB": "i32", "thr": "i32", "inv_keep": "fp32", "scaling": "fp32", "inv_temp": "fp32"}
    const = {"R": 8, "N": 3, "RP": 16, "NP": 16, "DROPOUT": True, "COUNT": False, "HAS_W": False, "STATS": True,
             "BT": 32, "BK": 64}
    src = ASTSource(fn=mod._proj_fwd.fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
    assert "ptx" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm
    if not torch.cuda.is_available():
        for script in ("dropout_hash_cost.py", "kernel_configs.py"):
            _assert_refuses_without_cuda(script)


def _assert_refuses_without_cuda(script: str) -> None:
    """A GPU-only investigation script, run without CUDA, exits with an error that names itself and the need."""
    proc = subprocess.run([sys.executable, str(BENCH / "investigations" / script)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and f"{script} needs a CUDA device" in proc.stderr


def test_step_timeline_splits_idle_time_into_starved_and_queued_gaps():
    """A gap after which the host launched the next kernel counts as starved, under the host op that launched it;
    a gap before a kernel launched earlier counts as the device's own latency; overlapping kernels count once."""
    sys.path.insert(0, str(BENCH / "investigations"))
    try:
        import step_timeline as S
    finally:
        sys.path.remove(str(BENCH / "investigations"))

    def kernel(name, ts, dur, corr):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    def launch(ts, corr):
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 2, "tid": 1,
                "args": {"correlation": corr}}

    events = [
        {"cat": "cpu_op", "name": "outer", "ts": 0, "dur": 200, "tid": 1},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 60, "dur": 10, "tid": 1},
        launch(1, 1), kernel("k1", 10, 20, 1),   # busy 10..30
        launch(2, 2), kernel("k2", 33, 7, 2),    # launched before k1 ended: a queued gap of 3
        launch(65, 3), kernel("k3", 70, 10, 3),  # launched at 65 > 40: starved for 30, inside outer > aten::mm
        launch(66, 4), kernel("k4", 75, 10, 4),  # overlaps k3: busy counted once (70..85)
    ]
    s = S.timeline(events)
    assert s["span_us"] == 75 and s["busy_us"] == 42 and s["idle_us"] == 33
    assert s["queued_gap_us"] == 3 and s["starved_us"] == 30
    assert s["starved_by_op"] == {"outer > aten::mm": [1, 30]}
    assert s["longest_starved"][0]["after"] == "k2" and s["longest_starved"][0]["before"] == "k3"
    assert s["kernels_by_name"]["k1"] == [1, 20] and s["device_events"] == 4
    with pytest.raises(ValueError, match="no device events"):
        S.timeline([{"cat": "cpu_op", "name": "x", "ts": 0, "dur": 1, "tid": 1}])
    import torch

    if not torch.cuda.is_available():
        _assert_refuses_without_cuda("step_timeline.py")


def test_dispatch_host_cost_times_a_greedy_decode_through_the_fused_dispatch(tmp_path):
    """--generate: host ms per new token of a batch-1 decode for the base, PEFT LoRA r=8 and HydraLoRA, with the
    fused dispatch's device check passed on the CPU and the kernels stubbed."""
    out = tmp_path / "gen.json"
    proc = subprocess.run([sys.executable, str(BENCH / "investigations" / "dispatch_host_cost.py"), "--generate",
                           "--stub-kernels", "--rounds", "1", "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gen = json.loads(out.read_text())["generate, host ms per new token"]
    assert {"base", "peft r8", "ours"} <= set(gen) and all(gen[k]["median_ms"] > 0 for k in ("base", "peft r8", "ours"))
    assert gen["ours: fused layer calls per forward"] == 16  # q_proj and v_proj of 8 layers
    assert gen["ours / peft r8, median"] == pytest.approx(gen["ours"]["median_ms"] / gen["peft r8"]["median_ms"],
                                                          abs=2e-3)


def test_dispatch_host_cost_times_a_train_step_through_the_peft_model_by_phase(tmp_path):
    """--phases: host us of a trainer step's forward, backward, AdamW step and zero_grad through each PeftModel, and
    the ratio of the steps' sums."""
    out = tmp_path / "phases.json"
    proc = subprocess.run([sys.executable, str(BENCH / "investigations" / "dispatch_host_cost.py"), "--phases",
                           "--stub-kernels", "--kinds", "peft,ours", "--json", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    phases = res["train step through the PeftModel, host us (forward, backward, AdamW step, zero_grad)"]
    assert set(phases) == {"peft", "ours"} and all(len(v) == 4 and min(v) > 0 for v in phases.values())
    assert res["train step ours/peft us"] == pytest.approx(sum(phases["ours"]) / sum(phases["peft"]), abs=2e-3)
