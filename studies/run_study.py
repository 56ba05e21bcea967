"""The paper's comparisons at small scale (issue 6): every method x seed as one `hydralora train` process.

Runs are independent processes started side by side on one GPU (the 135M model leaves it mostly idle), so the
whole study fits a short budget; each run writes its own run directory, so an interrupted study resumes by
skipping runs whose metrics.json exists. Raw results land in OUT/<part>/<config>/seed<k>/metrics.json.

    python studies/run_study.py --out results/study --part main --workers 5
    python studies/run_study.py --out results/study --part sweep --workers 5
    python studies/run_study.py --out results/study --part obs2 --workers 5
    python studies/run_study.py --out results/study --part main sweep --workers 12   # one pool; 2 GPUs: 6 runs on each
    python studies/run_study.py --out results/seed-methods/<date> --part seed-methods --workers 8   # studies/seed_methods.py

On a host with several GPUs each run gets one (CUDA_VISIBLE_DEVICES, round-robin over the worker slots), so the
side-by-side runs spread evenly over the cards.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

# The study's mixture: 12 BBH-source BIG-bench tasks (10 multiple choice, 2 generative), up to 300 train and
# 60 held-out test examples each, built with `hydralora data bigbench` (the command is in studies/data/NOTICE).
STUDY_DATA = Path(__file__).resolve().parent / "data" / "bbh12.jsonl"
# The same data, target modules, steps, learning rate and data order (seed) for every method. The prompts are
# short (67 tokens on average), so a SmolLM2 step is bound by kernel launches, not arithmetic: 150 steps of 64
# sequences (2.9 epochs, as the recipe's 600 x 16) cost about a quarter of the time; the learning rate follows the
# batch by the square root (5e-4 at 16 -> 1e-3 at 64). The 64 are two micro-batches of 32 (the same sequences
# and, with Trainer's token-count normalisation, the same gradient): one batch of 64 peaked at 24 GiB and 4 side
# by side ran an H100 out of memory. No intermediate checkpoints.
COMMON = {"data": str(STUDY_DATA), "target_modules": "all-linear", "lora_dropout": 0.05, "learning_rate": 1e-3,
          "schedule": "gpu", "per_device_batch_size": 32, "gradient_accumulation_steps": 2, "max_steps": 150,
          "eval_batch_size": 64, "save_steps": 10_000}
PARTS = {
    # Table 3 / Table 5 of the paper: baselines, HydraLoRA with N from the corpus, and its ablations.
    "main": {
        "lora-r8": {"method": "lora", "r": 8, "lora_alpha": 16},
        "lora-r16": {"method": "lora", "r": 16, "lora_alpha": 32},
        "lora-r32": {"method": "lora", "r": 32, "lora_alpha": 64},
        "lora-split-4x8": {"method": "lora-split", "r": 8, "lora_alpha": 16, "num_experts": 4},
        "hydralora-auto": {"method": "hydralora", "r": 8, "lora_alpha": 16, "num_experts": "auto"},
        "hydralora-uniform": {"method": "hydralora-uniform", "r": 8, "lora_alpha": 16, "num_experts": "auto"},
        "lora-moe": {"method": "lora-moe", "r": 8, "lora_alpha": 16, "num_experts": "auto"},
    },
    # Figure 5's K sweep plus the options that could make HydraLoRA win.
    "sweep": {
        **{f"hydralora-N{n}": {"method": "hydralora", "r": 8, "lora_alpha": 16, "num_experts": n} for n in (2, 3, 4, 6, 8)},
        "hydralora-rlora": {"method": "hydralora", "r": 8, "lora_alpha": 16, "num_experts": "auto", "init_b": "rlora", "expert_dropout": True},
        "hydralora-top2": {"method": "hydralora", "r": 8, "lora_alpha": 16, "num_experts": "auto", "top_k": 2},
        "hydralora-balance": {"method": "hydralora", "r": 8, "lora_alpha": 16, "num_experts": "auto", "balance_loss_coef": 0.01},
        "hydralora-router-ax": {"method": "hydralora", "r": 8, "lora_alpha": 16, "num_experts": "auto", "router_input": "lora_a"},
        "hydralora-loraplus16": {"method": "hydralora", "r": 8, "lora_alpha": 16, "num_experts": "auto", "loraplus_lr_ratio": 16},
        # a sharper router breaks the experts' symmetry on the CPU (docs/results.md section 6)
        "hydralora-temp0.1": {"method": "hydralora", "r": 8, "lora_alpha": 16, "num_experts": "auto", "router_temperature": 0.1},
        # LoRA+ is a learning-rate change for B: the same change on plain LoRA says how much of its gain is HydraLoRA's
        "lora-r8-loraplus16": {"method": "lora", "r": 8, "lora_alpha": 16, "loraplus_lr_ratio": 16},
    },
}
BASE_EVAL = ("main", "lora-r8", 0)  # the base model is scored once, in this run
EXTRA_ROUTINGS = ("hydralora-auto",)  # also scored under sequence and fixed-'mean' routing


def train_command(run_dir: Path, sets: dict) -> list[str]:
    """`hydralora train` into run_dir with every recipe field of `sets` as --set KEY=VALUE (JSON for non-strings)."""
    cmd = [sys.executable, "-m", "hydralora.cli", "train", "--output-dir", str(run_dir)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    return cmd


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (none without torch or a driver)."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no torch / no driver
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


class WorkerSlots:
    """One environment per side-by-side run: the CPU cores split among the workers (each torch process would
    otherwise take them all) and, on a host with several GPUs, one GPU per slot, round-robin. A job holds a slot
    while it runs, so every GPU carries the same number of runs at any time."""

    def __init__(self, workers: int, gpus: list[str] | None = None):
        gpus = visible_gpus() if gpus is None else gpus
        threads = max(1, (os.cpu_count() or 1) // workers)
        self._free: queue.Queue = queue.Queue()
        for i in range(workers):
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
            if len(gpus) > 1:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            self._free.put(env)

    @contextmanager
    def env(self):
        env = self._free.get()
        try:
            yield env
        finally:
            self._free.put(env)


def run_one(out: Path, part: str, name: str, overrides: dict, seed: int, log, extra: dict | None = None,
            slots: WorkerSlots | None = None) -> dict:
    run_dir = out / part / name / f"seed{seed}"
    if (run_dir / "metrics.json").is_file():
        return {"run": str(run_dir), "skipped": True}
    if run_dir.exists():  # an earlier try that did not finish: keep it aside (train never overwrites a folder)
        aside = next(run_dir.with_name(f"{run_dir.name}.failed-{i}") for i in range(1, 10**6)
                     if not run_dir.with_name(f"{run_dir.name}.failed-{i}").exists())
        run_dir.rename(aside)
        if Path(str(run_dir) + ".log").exists():
            Path(str(run_dir) + ".log").rename(str(aside) + ".log")
        log(f"{part}/{name}/seed{seed}: unfinished folder moved to {aside.name}")
    sets = {**COMMON, **overrides, "seed": seed, "eval_base": (part, name, seed) == BASE_EVAL, "report": True, **(extra or {})}
    cmd = train_command(run_dir, sets)
    t = time.time()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (slots or WorkerSlots(1, [])).env() as env:
        with open(str(run_dir) + ".log", "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        result = {"run": str(run_dir), "rc": rc, "seconds": round(time.time() - t, 1)}
        if rc == 0 and name in EXTRA_ROUTINGS:
            for routing in ("sequence", "fixed"):
                subprocess.run([sys.executable, "-m", "hydralora.cli", "eval", "--adapter", str(run_dir / "adapter"),
                                "--routing", routing, "--gate", "mean", "--no-base", "--batch-size", str(sets["eval_batch_size"]),
                                "--out", str(run_dir / f"eval_{routing}.json")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    log(f"{part}/{name}/seed{seed}: rc={rc} in {result['seconds']} s")
    return result


GIB_PER_RUN = 14  # a run at 32 sequences per micro-batch: about half the 24 GiB measured at 64


def _fit_workers(workers: int) -> int:
    """Cap the side-by-side runs to what the GPUs' memory holds (the first study call OOMed at 11 on one H100)."""
    try:
        import torch

        gpus = len(visible_gpus())
        if not gpus:
            return workers
        fit = gpus * max(1, int(torch.cuda.get_device_properties(0).total_memory / 2**30 // GIB_PER_RUN))
    except Exception:  # no torch / no driver: leave the request as it is
        return workers
    if workers > fit:
        print(f"--workers {workers} does not fit {gpus} GPU(s) ({GIB_PER_RUN} GiB per run): running {fit} at a time", flush=True)
    return min(workers, fit)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/study")
    ap.add_argument("--part", nargs="+", choices=sorted(PARTS) + ["obs2", "seed-methods"], required=True,
                    help="Parts to run; several parts of the table share one pool of workers (obs2 runs on its own).")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=5,
                    help="Runs side by side on the GPU; each SmolLM2 run peaks at 8-12 GiB (capped to fit the card).")
    ap.add_argument("--only", nargs="*", help="Run only these config names.")
    ap.add_argument("--iid-task", help="obs2: the task split into two IID halves (default: sports_understanding).")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="Override a recipe field in every run (e.g. model=..., max_steps=...; used by the toy test).")
    args = ap.parse_args()
    if "obs2" in args.part and len(args.part) > 1:
        ap.error(f"--part obs2 runs on its own, not with {[p for p in args.part if p != 'obs2']}")
    args.workers = _fit_workers(args.workers)
    slots = WorkerSlots(args.workers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(item.split("=", 1) for item in args.set)
    # --- seed methods (LoPE, ThanoRA, MeTA-LoRA): configs and their derived data from studies/seed_methods.py ---
    if "seed-methods" in args.part:
        from seed_methods import seed_method_parts

        if "data" in extra and len(args.part) > 1:
            ap.error("--set data=... with --part seed-methods: run seed-methods on its own (its data is derived from it)")
        source = Path(extra.pop("data")) if "data" in extra else STUDY_DATA
        PARTS.update(seed_method_parts(source, out / "seed-methods-data"))
    if args.part == ["obs2"]:
        from observation2 import run_observation2

        run_observation2(out / "obs2", workers=args.workers, extra=extra, slots=slots,
                         **({"iid_task": args.iid_task} if args.iid_task else {}))
        return 0
    # Part by part, seed-major: a study cut short leaves every config of a part with the same number of seeds.
    jobs = [(part, name, ov, s) for part in args.part for s in args.seeds for name, ov in PARTS[part].items()
            if not args.only or name in args.only]
    t0 = time.time()
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda j: run_one(out, *j, lambda m: print(m, flush=True), extra, slots), jobs))
    for part in args.part:
        runs = [r for r, j in zip(results, jobs) if j[0] == part]
        (out / f"{part}_runs.json").write_text(json.dumps({"seconds": time.time() - t0, "runs": runs}, indent=1))
    failed = [r for r in results if r.get("rc", 0) != 0]
    print(f"{len(results)} runs, {len(failed)} failed, {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
