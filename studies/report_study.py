"""Tables and plots of the paper-tables study from its raw run directories: markdown tables, summary JSON and PNGs.

    python studies/report_study.py --study results/study --out results/quality/DATE
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

ORDER = ["lora-r8", "lora-r16", "lora-r32", "lora-split-4x8", "hydralora-auto", "hydralora-uniform", "lora-moe",
         "hydralora-N2", "hydralora-N3", "hydralora-N4", "hydralora-N6", "hydralora-N8", "hydralora-rlora",
         "hydralora-top2", "hydralora-balance", "hydralora-router-ax", "hydralora-loraplus16", "hydralora-temp0.1",
         "lora-r8-loraplus16"]


def collect(study: Path) -> dict:
    """{config: {"runs": [metrics...], "extra": {routing: [mean acc...]}}} from every metrics.json under study."""
    out: dict = defaultdict(lambda: {"runs": [], "extra": defaultdict(list)})
    for m in sorted(study.glob("*/*/seed*/metrics.json")):
        name = m.parent.parent.name
        metrics = json.loads(m.read_text())
        out[name]["runs"].append(metrics)
        for routing in ("sequence", "fixed"):
            f = m.parent / f"eval_{routing}.json"
            if f.is_file():
                out[name]["extra"][routing].append(json.loads(f.read_text())["mean"])
    return dict(out)


def mean_std(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else (f"{v.mean():.3f}" if len(v) else "-")


def tables(data: dict) -> tuple[str, dict]:
    names = [n for n in ORDER if n in data] + sorted(set(data) - set(ORDER))
    tasks = sorted({t for d in data.values() for r in d["runs"] for t in r["adapted"]["per_task"]})
    base = next((r["base"] for d in data.values() for r in d["runs"] if "base" in r), None)
    lines = ["| method | params | N | seeds | " + " | ".join(tasks) + " | mean | train s |",
             "|---" * (len(tasks) + 6) + "|"]
    if base:
        lines.append("| base model | 0 | - | - | " + " | ".join(f"{base['per_task'][t]:.3f}" for t in tasks)
                     + f" | {base['mean_accuracy']:.3f} | - |")
    summary = {}
    for n in names:
        runs = data[n]["runs"]
        per_task = [mean_std([r["adapted"]["per_task"][t] for r in runs]) for t in tasks]
        means = [r["adapted"]["mean_accuracy"] for r in runs]
        summary[n] = {"mean": float(np.mean(means)), "std": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
                      "seeds": len(runs), "params": runs[0]["trainable_params"], "num_experts": runs[0].get("num_experts")}
        params = sorted({r["trainable_params"] for r in runs})
        experts = sorted({r.get("num_experts") or 0 for r in runs})
        lines.append(f"| {n} | {' / '.join(f'{p:,}' for p in params)} | {' / '.join(map(str, experts)) if experts != [0] else '-'} | {len(runs)} | "
                     + " | ".join(per_task) + f" | **{mean_std(means)}** | {np.mean([r['train_seconds'] for r in runs]):.0f} |")
    return "\n".join(lines), {"summary": summary, "base": base, "tasks": tasks}


def routing_analysis(data: dict, train_prompts: dict[str, list[str]] | None) -> dict:
    """Does the trained router send different tasks to different experts?

    Per config with a router and per layer group: `max_dev`, the largest |mean gate - 1/N| over tasks and experts
    in units of 1/N (0: every task sees the uniform mix); `spread`, the mean over experts of the std across tasks
    of the mean gate, in the same units. With `train_prompts` ({task: prompts}): `cluster_agreement`, the Pearson
    correlation over task pairs between how alike two tasks are routed (cosine of their gate vectors minus 1/N)
    and how alike they fall into the N-finding clusters (cosine of their cluster histograms) -- invariant to how
    experts and clusters are numbered.
    """
    from hydralora.clustering import suggest_num_experts

    out: dict = {}
    for name, d in data.items():
        runs = [r for r in d["runs"] if r.get("routing_by_task")]
        if not runs:
            continue
        per_seed = []
        for r in runs:
            tasks = sorted(r["routing_by_task"])
            groups = sorted(r["routing_by_task"][tasks[0]], key=lambda g: (["early", "middle", "late"] + [g]).index(g))
            n = len(r["routing_by_task"][tasks[0]][groups[0]])
            rec: dict = {"seed": r["seed"], "num_experts": n, "groups": {}}
            hist = None
            if train_prompts and r.get("auto_n"):
                order = [t for t in tasks if t in train_prompts]
                texts = [p for t in order for p in train_prompts[t]]
                # the run's own N-finding, redone: same prompts, K range, method and seed, so the same clusters
                res = suggest_num_experts(texts, k_range=r["auto_n"]["k_values"], method=r["auto_n"]["method"],
                                          seed=r["seed"], progress=False)
                assert res.k == n, f"{name} seed {r['seed']}: N-finding gives {res.k} now, {n} in the run"
                bounds = np.cumsum([0] + [len(train_prompts[t]) for t in order])
                hist = np.stack([np.bincount(res.labels[a:b], minlength=n) / (b - a) for a, b in zip(bounds, bounds[1:])])
            for g in groups:
                gates = np.array([r["routing_by_task"][t][g] for t in tasks]) - 1.0 / n  # (tasks, N), 0 = uniform
                rec["groups"][g] = {"max_dev": float(np.abs(gates).max() * n), "spread": float(gates.std(0).mean() * n)}
                if hist is not None:
                    rec["groups"][g]["cluster_agreement"] = agreement(gates, hist)
            per_seed.append(rec)
        out[name] = per_seed
    return out


def agreement(gates: np.ndarray, hist: np.ndarray) -> float | None:
    """Pearson correlation over task pairs of routing similarity and cluster similarity (both (tasks, N)); None
    with fewer than 3 pairs."""
    iu = np.triu_indices(len(gates), 1)
    return float(np.corrcoef(_cos(gates)[iu], _cos(hist)[iu])[0, 1]) if len(iu[0]) >= 3 else None


def _cos(m: np.ndarray) -> np.ndarray:
    u = m / (np.linalg.norm(m, axis=1, keepdims=True) + 1e-12)
    return u @ u.T


def plot_means(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 3.8))
    ax.bar(range(len(names)), [summary[n]["mean"] for n in names], yerr=[summary[n]["std"] for n in names],
           capsize=3, color=["tab:green" if n.startswith("hydralora") else "tab:gray" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_ylabel("held-out mean accuracy (macro)")
    ax.set_title("Mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


REFERENCES = ("lora-r8", "hydralora-auto")  # the paired comparisons the write-up reads


def paired(data: dict, ref: str) -> dict:
    """Every configuration against `ref`, seed by seed (the same seed = the same data order): mean and spread of the
    differences, how many seeds are above, and the study's rule for a real difference: every seed on the same side
    and the mean difference larger than both configurations' spread over seeds."""
    if ref not in data:
        return {}

    def by_seed(name):
        return {r["seed"]: r["adapted"]["mean_accuracy"] for r in data[name]["runs"]}

    ref_acc = by_seed(ref)
    out = {}
    for name in data:
        acc = by_seed(name)
        seeds = sorted(set(acc) & set(ref_acc))
        if name == ref or len(seeds) < 2:
            continue
        d = np.array([acc[s] - ref_acc[s] for s in seeds])
        spread = max(np.std([ref_acc[s] for s in seeds], ddof=1), np.std([acc[s] for s in seeds], ddof=1))
        out[name] = {"diff": float(d.mean()), "sd": float(d.std(ddof=1)), "seeds": len(seeds),
                     "above": int((d > 0).sum()), "spread": float(spread),
                     "real": bool(((d > 0).all() or (d < 0).all()) and abs(d.mean()) > spread)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="results/study")
    ap.add_argument("--out", default="results/quality/tables")
    ap.add_argument("--data", help="The study's data (for the router's agreement with the N-finding clusters), "
                                   "e.g. studies/data/bbh12.jsonl; without it that column is left out.")
    args = ap.parse_args()
    study, out = Path(args.study), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = collect(study)
    if not data:
        raise SystemExit(f"no metrics.json under {study}/<part>/<config>/seed*/")
    table, info = tables(data)
    plot_means(info["summary"], out / "means.png")
    modes = {n: {k: mean_std(v) for k, v in d["extra"].items()} for n, d in data.items() if d["extra"]}
    prompts = None
    if args.data:
        from hydralora.data.formats import load_examples
        from hydralora.recipes.train import split_examples

        prompts = defaultdict(list)
        for e in split_examples(list(load_examples(args.data)), seed=0)[0]:
            prompts[e.task].append(e.prompt)
    routing = routing_analysis(data, prompts)
    pairs = {ref: paired(data, ref) for ref in REFERENCES}
    (out / "summary.json").write_text(json.dumps({**info, "inference_modes": modes, "routing": routing, "paired": pairs},
                                                 indent=1))
    text = ["# Study results (raw)", "", table, "", "![means](means.png)", ""]
    if any(pairs.values()):
        names = [n for n in ORDER if n in data] + sorted(set(data) - set(ORDER))
        text += ["Seed by seed against a reference: mean difference ± its spread (seeds above / seeds); **real** where every "
                 "seed is on one side and the mean exceeds both configurations' spread over seeds.", "",
                 "| method | " + " | ".join(f"vs {ref}" for ref in REFERENCES) + " |", "|---" * (len(REFERENCES) + 1) + "|"]
        for n in names:
            cells = []
            for ref in REFERENCES:
                c = pairs[ref].get(n)
                cells.append("-" if c is None else
                             f"{c['diff']:+.3f} ± {c['sd']:.3f} ({c['above']}/{c['seeds']})" + (" **real**" if c["real"] else ""))
            if any(c != "-" for c in cells):
                text.append(f"| {n} | " + " | ".join(cells) + " |")
        text.append("")
    if modes:
        text += ["| method | token | sequence | fixed (mean gate) |", "|---|---|---|---|"]
        for n, m in modes.items():
            token = mean_std([r["adapted"]["mean_accuracy"] for r in data[n]["runs"]])
            text.append(f"| {n} | {token} | {m.get('sequence', '-')} | {m.get('fixed', '-')} |")
    if routing:
        text += ["", "| method | seed | layer group | max deviation from uniform (x 1/N) | spread across tasks (x 1/N) | agreement with N-finding clusters |",
                 "|---|---|---|---|---|---|"]
        for n, recs in routing.items():
            for rec in recs:
                for g, v in rec["groups"].items():
                    agree = f"{v['cluster_agreement']:+.2f}" if v.get("cluster_agreement") is not None else "-"
                    text.append(f"| {n} | {rec['seed']} | {g} | {v['max_dev']:.3f} | {v['spread']:.3f} | {agree} |")
    (out / "tables.md").write_text("\n".join(text) + "\n")
    print((out / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
