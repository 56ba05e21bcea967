"""Evidence for hydralora.clustering: does the chosen K match the number of tasks M?

Mixtures of M distinct BBH-source BIG-bench tasks (M = 2, 3, 4, 6, 8; --subsets random task
subsets each, seeded), up to --per-task examples per task, text = the example's ``input``.
For each mixture: K from the paper's method (tfidf-elbow), the default (lsa-consensus) and
lsa-stability; the silhouette, elbow and prediction-strength (>= 0.7) choices on the
lsa-stability sweep are reported too.
--subset-seed draws other task subsets and examples (held-out mixtures).

    python benchmarks/auto_n.py --bigbench-dir /work/cache/bigbench --out benchmarks/results/auto_n
    python benchmarks/auto_n.py --subset-seed 1 --out benchmarks/results/auto_n/heldout-1
    python benchmarks/auto_n.py --bigbench-dir /work/cache/bigbench --scale 100000

The BIG-bench task files come from the bigbench==1.0.0 sdist (Apache-2.0):
tar xzf bigbench-1.0.0.tar.gz --wildcards '*/benchmark_tasks/*/task.json' -C DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

from hydralora.clustering import select_k, suggest_num_experts
from hydralora.data.bigbench import BBH_SOURCE_TASKS

BBH_TASKS = list(BBH_SOURCE_TASKS)


def tasks_root(bigbench_dir: str) -> Path:
    for cand in (Path(bigbench_dir), *Path(bigbench_dir).glob("*/bigbench/benchmark_tasks"),
                 *Path(bigbench_dir).glob("bigbench/benchmark_tasks")):
        if (cand / "navigate" / "task.json").exists():
            return cand
    sys.exit(f"error: no BIG-bench benchmark_tasks under {bigbench_dir!r} "
             "(expected .../benchmark_tasks/<task>/task.json)")


def task_inputs(root: Path, task: str) -> list[str]:
    """All example inputs of a task, subtask folders (logical_deduction, ...) included."""
    out = []
    for dirpath, _, files in sorted(os.walk(root / task)):
        if "task.json" in files:
            with open(Path(dirpath) / "task.json", encoding="utf-8") as f:
                spec = json.load(f)
            out += [e["input"] for e in spec.get("examples", []) if str(e.get("input", "")).strip()]
    return out


def mixtures(root: Path, ms, subsets: int, per_task: int, seed: int, subset_seed: int | None = None):
    """Seeded task subsets and per-task example pools; ``subset_seed`` (default: ``seed``)
    draws both, so a different subset seed gives held-out mixtures."""
    sseed = seed if subset_seed is None else subset_seed
    rng = random.Random(sseed)
    pools = {}
    for t in BBH_TASKS:
        xs = task_inputs(root, t)
        r = random.Random(f"{sseed}:{t}")
        pools[t] = r.sample(xs, per_task) if len(xs) > per_task else xs
    for m in ms:
        for _ in range(subsets):
            chosen = sorted(rng.sample(BBH_TASKS, m))
            texts, y = [], []
            for i, t in enumerate(chosen):
                texts += pools[t]
                y += [i] * len(pools[t])
            yield m, chosen, texts, np.array(y)


def run_mixtures(args) -> int:
    root = tasks_root(args.bigbench_dir)
    ks = range(args.k_min, args.k_max + 1)
    rows = []
    for m, chosen, texts, y in mixtures(root, args.m, args.subsets, args.per_task, args.seed,
                                        args.subset_seed):
        row = {"M": m, "tasks": chosen, "num_texts": len(texts)}
        for method in ("tfidf-elbow", "lsa-stability", "lsa-consensus"):
            r = suggest_num_experts(texts, k_range=ks, method=method, seed=args.seed)
            row[method] = {"k": r.k, "ari": adjusted_rand_score(y, r.labels),
                           "seconds": r.seconds}
            if method == "lsa-stability":  # other rules on the very same sweep (K only)
                for rule in ("silhouette", "elbow", "pstrength"):
                    row[f"lsa-{rule}"] = {"k": select_k(r.k_values, r.scores, rule)}
                row["curves"] = r.scores
        rows.append(row)
        print(f"M={m} K: paper={row['tfidf-elbow']['k']} stability={row['lsa-stability']['k']} "
              f"consensus={row['lsa-consensus']['k']} ARI: {row['tfidf-elbow']['ari']:.2f}/"
              f"{row['lsa-stability']['ari']:.2f}/{row['lsa-consensus']['ari']:.2f}  "
              f"{','.join(chosen)}", flush=True)
    table = summarize(rows, args.m)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "mixtures.json").write_text(json.dumps(rows, indent=1))
        (out / "table.md").write_text(table + "\n")
    return 0


def summarize(rows, ms) -> str:
    methods = ["tfidf-elbow", "lsa-consensus", "lsa-stability", "lsa-silhouette", "lsa-elbow",
               "lsa-pstrength"]
    lines = ["| method | M | mixtures | \\|K-M\\|<=1 | exact K=M | mean \\|K-M\\| | K chosen | mean ARI |",
             "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        for m in list(ms) + ["all"]:
            sel = [r for r in rows if m == "all" or r["M"] == m]
            if not sel:
                continue
            d = np.array([abs(r[method]["k"] - r["M"]) for r in sel])
            aris = [r[method]["ari"] for r in sel if "ari" in r[method]]
            kk = " ".join(str(r[method]["k"]) for r in sel) if m != "all" else ""
            lines.append(f"| {method} | {m} | {len(sel)} | {np.mean(d <= 1):.0%} | "
                         f"{np.mean(d == 0):.0%} | {d.mean():.2f} | {kk} | "
                         f"{np.mean(aris):.2f} |" if aris else
                         f"| {method} | {m} | {len(sel)} | {np.mean(d <= 1):.0%} | "
                         f"{np.mean(d == 0):.0%} | {d.mean():.2f} | {kk} | - |")
    return "\n".join(lines)


def run_scale(args) -> int:
    """Time the default method on --scale real BIG-bench inputs (all extracted tasks)."""
    root = tasks_root(args.bigbench_dir)
    texts = []
    for t in sorted(p.name for p in root.iterdir() if p.is_dir()):
        try:
            texts += task_inputs(root, t)
        except (OSError, ValueError, KeyError):
            continue
    n_unique = len(texts)
    rng = random.Random(args.seed)
    rng.shuffle(texts)
    texts = (texts * (args.scale // max(1, len(texts)) + 1))[: args.scale]
    lengths = [len(t) for t in texts]
    t0 = time.perf_counter()
    r = suggest_num_experts(texts, k_range=range(args.k_min, args.k_max + 1), seed=args.seed)
    wall = time.perf_counter() - t0
    print(json.dumps({"num_texts": len(texts), "unique_source_texts": n_unique,
                      "median_chars": int(np.median(lengths)), "method": r.method, "k": r.k,
                      "seconds": round(wall, 1), "cpus": os.cpu_count(), "notes": r.notes}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bigbench-dir", default=os.environ.get("BIGBENCH_DIR", "/work/cache/bigbench"))
    p.add_argument("--m", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    p.add_argument("--subsets", type=int, default=10)
    p.add_argument("--per-task", type=int, default=200)
    p.add_argument("--k-min", type=int, default=2)
    p.add_argument("--k-max", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="clustering seed")
    p.add_argument("--subset-seed", type=int, default=None,
                   help="seed of the task subsets and example pools (default: --seed); "
                        "tune on one, report on others (held-out mixtures)")
    p.add_argument("--out", default=None, help="folder for mixtures.json and table.md")
    p.add_argument("--scale", type=int, default=0, help="time the default on this many texts")
    args = p.parse_args(argv)
    return run_scale(args) if args.scale else run_mixtures(args)


if __name__ == "__main__":
    sys.exit(main())
