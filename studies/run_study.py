"""The study's runs: every configuration x seed as one `hydralora train` process, side by side on one GPU.

Runs are independent processes started side by side (the 135M model leaves a GPU mostly idle), so the whole
study fits a short budget; each run writes its own run directory, so an interrupted study resumes by skipping
runs whose metrics.json exists. Raw results land in OUT/<part>/<config>/seed<k>/metrics.json.

    python studies/run_study.py --out results/quality/DATE --part select final mechanisms auto-twin --workers 9
    python studies/run_study.py --list                  # every configuration with its trainable parameters
    python studies/run_study.py --out results/study --part main sweep --workers 12   # the paper's tables
    python studies/run_study.py --out results/study --part obs2 --workers 5
    python studies/run_study.py --out results/seed-methods/<date> --part seed-methods --workers 8   # studies/seed_methods.py

Parts run in one pool, in the order given; a part whose configurations depend on another's results (`final` on
`select`, see studies/quality.py) starts when that part has finished, and workers meanwhile take later parts' runs.
A run that dies of CUDA out-of-memory (too many side by side) is put aside and rerun when a worker is free (the
log says so). On a host with several GPUs each run gets one (CUDA_VISIBLE_DEVICES, round-robin over the slots).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_common import STUDY_DATA, WorkerSlots, fit_workers, ran_out_of_memory, train_command  # noqa: E402
import quality  # noqa: E402

# The same data, target modules, steps, learning rate and data order (seed) for every method. The prompts are
# short (67 tokens on average), so a SmolLM2 step is bound by kernel launches, not arithmetic: 150 steps of 64
# sequences (2.9 epochs, as the recipe's 600 x 16) cost about a quarter of the time; the learning rate follows the
# batch by the square root (5e-4 at 16 -> 1e-3 at 64). The 64 are two micro-batches of 32 (the same sequences
# and, with Trainer's token-count normalisation, the same gradient): one batch of 64 peaked at 24 GiB and 4 side
# by side ran an H100 out of memory. No intermediate checkpoints.
COMMON = {"data": str(STUDY_DATA), "target_modules": "all-linear", "lora_dropout": 0.05, "learning_rate": 1e-3,
          "schedule": "gpu", "per_device_batch_size": 32, "gradient_accumulation_steps": 2, "max_steps": 150,
          "eval_batch_size": 64, "save_steps": 10_000, "loraplus_lr_ratio": None, "router_temperature": 1.0}
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
# The fair comparison (studies/quality.py): a validation set carved from the training split in every run.
QUALITY = {"validation_per_task": quality.VALIDATION_PER_TASK}
PARTS.update({
    "select": quality.select_part(),
    "mechanisms": quality.mechanism_part(),
    "auto-twin": quality.auto_twin_part(),
    "recipe": quality.recipe_part(),
    "recipe-twin": quality.recipe_twin_part(),  # the default recipe's LoRA twin at matched parameters
    "recipe-thanora": quality.recipe_thanora_part(),  # ThanoRA against LoRA of its rank on the CPU schedule
    "best": quality.best_part(),  # the final comparison by name, without re-running select
    "further": quality.further_part(),  # a larger shared A at fewer experts, against its own twin
    "final": {},  # hydralora-best, lora-matched, lora-r8: chosen from `select` on validation (quality.select_configs)
})
PART_EXTRA = {"select": QUALITY, "mechanisms": QUALITY, "auto-twin": QUALITY, "final": QUALITY, "best": QUALITY,
              "further": QUALITY}
PART_SEEDS = {"select": [0], "mechanisms": [1, 2], "recipe": list(quality.RECIPE_SEEDS)}  # other parts: --seeds
DEPENDS = {"final": "select"}
# the base model is scored once per study; in every recipe run (its gain over the base is the recipe's target)
BASE_EVAL = {("main", "lora-r8", 0), ("select", "lora-r8-lr1e-3", 0)}
BASE_EVAL_PARTS = {"recipe", "recipe-twin", "recipe-thanora"}
EXTRA_ROUTINGS = ("hydralora-auto",)  # also scored under sequence and fixed-'mean' routing
MAX_OOM_RETRIES = 3


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
    sets = {**COMMON, **PART_EXTRA.get(part, {}), **overrides, "seed": seed,
            "eval_base": (part, name, seed) in BASE_EVAL or part in BASE_EVAL_PARTS, "report": True, **(extra or {})}
    cmd = train_command(run_dir, sets)
    t = time.time()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (slots or WorkerSlots(1, [])).env() as env:
        with open(str(run_dir) + ".log", "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        result = {"run": str(run_dir), "rc": rc, "seconds": round(time.time() - t, 1)}
        if rc != 0 and ran_out_of_memory(Path(str(run_dir) + ".log")):
            result["oom"] = True
        if rc == 0 and name in EXTRA_ROUTINGS:
            for routing in ("sequence", "fixed"):
                subprocess.run([sys.executable, "-m", "hydralora.cli", "eval", "--adapter", str(run_dir / "adapter"),
                                "--routing", routing, "--gate", "mean", "--no-base", "--batch-size", str(sets["eval_batch_size"]),
                                "--out", str(run_dir / f"eval_{routing}.json")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    log(f"{part}/{name}/seed{seed}: rc={rc}{' (CUDA out of memory)' if result.get('oom') else ''} in {result['seconds']} s")
    return result


def resolve_final(out: Path, log) -> dict[str, dict]:
    """`final`'s configurations from the finished `select` runs; writes OUT/selection.json. Seed 0 of each is the
    select run itself, copied (it was trained and tested exactly so)."""
    chosen = quality.select_configs(out / "select", PARTS["select"])
    (out / "selection.json").write_text(json.dumps(chosen, indent=1))
    for name, pick in chosen.items():
        log(f"final/{name}: {pick['from']} (validation {pick['validation']:.3f})")
        src, dst = out / "select" / pick["from"] / "seed0", out / "final" / name / "seed0"
        if not dst.exists() and (src / "metrics.json").is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    return {name: pick["config"] for name, pick in chosen.items()}


class Scheduler:
    """Jobs in priority order; a job is ready once the part it depends on has no job left queued or running.
    Workers take the first ready job, so a part waiting on another leaves the workers to later parts."""

    def __init__(self, out: Path, parts: list[str], seeds: list[int], only, extra: dict, slots: WorkerSlots, log):
        self.out, self.parts, self.only, self.extra, self.slots, self.log = out, parts, only, extra, slots, log
        self.seeds = seeds
        self.queue: list[tuple] = []
        self.running: dict[str, int] = {p: 0 for p in parts}
        self.retries: dict[tuple, int] = {}
        self.results: list[tuple[tuple, dict]] = []
        self.resolved: set[str] = set()
        self.cv = threading.Condition()
        for part in parts:
            if part not in DEPENDS:
                self._enqueue(part, PARTS[part])

    def _enqueue(self, part: str, configs: dict) -> None:
        # seed-major: a study cut short leaves every config of a part with the same number of seeds
        for s in PART_SEEDS.get(part, self.seeds):
            for name, ov in configs.items():
                if not self.only or name in self.only:
                    self.queue.append((part, name, ov, s))
        self.resolved.add(part)

    def _pending(self, part: str) -> bool:
        if part not in self.parts:  # a part run earlier (its results on disk), not in this call
            return False
        return part not in self.resolved or self.running[part] > 0 or any(j[0] == part for j in self.queue)

    def _release_dependents(self) -> None:
        for part in self.parts:
            dep = DEPENDS.get(part)
            if part not in self.resolved and dep is not None and not self._pending(dep):
                try:
                    self._enqueue(part, resolve_final(self.out, self.log))
                except ValueError as err:
                    self.log(f"{part}: not run ({err})")
                    self.resolved.add(part)
        # keep the queue in the order of the parts given
        self.queue.sort(key=lambda j: self.parts.index(j[0]))

    def _take(self):
        with self.cv:
            while True:
                self._release_dependents()
                if self.queue:
                    job = self.queue.pop(0)
                    self.running[job[0]] += 1
                    return job
                if all(not self._pending(p) for p in self.parts):
                    self.cv.notify_all()
                    return None
                self.cv.wait(timeout=5)

    def worker(self) -> None:
        while (job := self._take()) is not None:
            part, name, ov, seed = job
            result = run_one(self.out, part, name, ov, seed, self.log, self.extra, self.slots)
            with self.cv:
                self.running[part] -= 1
                key = (part, name, seed)
                if result.get("oom") and self.retries.get(key, 0) < MAX_OOM_RETRIES:
                    self.retries[key] = self.retries.get(key, 0) + 1
                    self.log(f"{part}/{name}/seed{seed}: CUDA out of memory beside the other runs; queued again "
                             f"(retry {self.retries[key]} of {MAX_OOM_RETRIES})")
                    self.queue.insert(0, job)
                else:
                    self.results.append((job, result))
                self.cv.notify_all()

    def run(self, workers: int) -> list[tuple[tuple, dict]]:
        threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.results


# N that auto-N chose on each mixture in the recorded runs, to count N='auto' configurations: 10 on the study
# mixture, 8 on the bundled one (one seed of the CPU recipe's found 9)
AUTO_N_SEEN = {"study": 10, "bundled": 8}


def list_params(model: str, parts: list[str]) -> None:
    """Print every configuration of `parts` with its trainable parameters, counted on `model` (N='auto' is
    counted at the N that auto-N chose on that configuration's mixture in the recorded runs, AUTO_N_SEEN)."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hydralora.models import resolve_model_path
    from hydralora.recipes.config import build_spec
    from hydralora.recipes.methods import build_model, is_hydra

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(model)))
    print(f"{'part':<14} {'config':<42} {'method':<10} {'r':>3} {'N':>4} {'trainable':>12}")
    for part in parts:
        configs = PARTS[part] or {"hydralora-best / lora-matched / lora-r8": {"method": "-", "r": "-"}}
        for name, ov in configs.items():
            if ov["method"] == "-":
                print(f"{part:<14} {name:<42} (chosen from select on validation)")
                continue
            spec = build_spec({**COMMON, **ov, "model": model})
            adapter = dict(spec.adapter)
            if adapter.get("num_experts") == "auto":
                adapter["num_experts"] = AUTO_N_SEEN.get(ov.get("data", "study"), 10)
            adapter.update(init_b="zeros", init_a="kaiming")  # the count does not depend on the init (meta weights)
            peft_model = build_model(copy.deepcopy(base), spec.train.method, adapter)
            trainable, _ = peft_model.get_nb_trainable_parameters()
            n = adapter.get("num_experts") if is_hydra(spec.train.method) else "-"  # LoRA-shaped methods have none
            print(f"{part:<14} {name:<42} {spec.train.method:<10} {adapter['r']:>3} {n!s:>4} {trainable:>12,}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/study")
    ap.add_argument("--part", nargs="+", choices=sorted(PARTS) + ["obs2", "seed-methods"],
                    help="Parts to run, in this order, in one pool of workers (obs2 runs on its own).")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=5,
                    help="Runs side by side on the GPU; each SmolLM2 run peaks at 8-14 GiB (capped to the free memory).")
    ap.add_argument("--only", nargs="*", help="Run only these config names.")
    ap.add_argument("--iid-task", help="obs2: the task split into two IID halves (default: sports_understanding).")
    ap.add_argument("--list", action="store_true", help="Print the configurations of --part (default: all) with "
                    "their trainable parameters and exit.")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="Override a recipe field in every run (e.g. model=..., max_steps=...; used by the toy test).")
    args = ap.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)
    if args.list:
        parts = [p for p in (args.part or [*PARTS, "seed-methods"]) if p != "obs2"]
        if "seed-methods" in parts:  # its configs name derived data files: build them where they are thrown away
            import tempfile

            from seed_methods import seed_method_parts

            with tempfile.TemporaryDirectory() as tmp:
                PARTS.update(seed_method_parts(STUDY_DATA, Path(tmp)))
                list_params(extra.get("model", "smollm2"), parts)
        else:
            list_params(extra.get("model", "smollm2"), parts)
        return 0
    if not args.part:
        ap.error("--part is required (or --list)")
    if "obs2" in args.part and len(args.part) > 1:
        ap.error(f"--part obs2 runs on its own, not with {[p for p in args.part if p != 'obs2']}")
    for part in args.part:
        if DEPENDS.get(part) and DEPENDS[part] not in args.part and not (Path(args.out) / DEPENDS[part]).is_dir():
            ap.error(f"--part {part} needs the results of part {DEPENDS[part]}: run it first or together")
    args.workers = fit_workers(args.workers)
    slots = WorkerSlots(args.workers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # seed methods (LoPE, ThanoRA, MeTA-LoRA): configs and their derived data from studies/seed_methods.py
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
    t0 = time.time()
    log = lambda m: print(f"[{time.time() - t0:6.0f} s] {m}", flush=True)  # noqa: E731
    sched = Scheduler(out, args.part, args.seeds, args.only, extra, slots, log)
    results = sched.run(args.workers)
    for part in args.part:
        runs = [r for j, r in results if j[0] == part]
        (out / f"{part}_runs.json").write_text(json.dumps({"seconds": time.time() - t0, "runs": runs}, indent=1))
    failed = [r for _, r in results if r.get("rc", 0) != 0]
    print(f"{len(results)} runs, {len(failed)} failed, {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
