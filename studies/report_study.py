"""Tables and plots of the study (issue 6) from its raw run directories: docs/results.md + PNGs.

    python studies/report_study.py --study results/study --out docs/results
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

ORDER = ["lora-r8", "lora-r16", "lora-r32", "lora-split-4x8", "hydralora-auto", "hydralora-uniform", "lora-moe",
         "hydralora-N2", "hydralora-N3", "hydralora-N4", "hydralora-N6", "hydralora-N8", "hydralora-rlora",
         "hydralora-top2", "hydralora-balance", "hydralora-router-ax"]


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="results/study")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    study, out = Path(args.study), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = collect(study)
    if not data:
        raise SystemExit(f"no metrics.json under {study}/<part>/<config>/seed*/")
    table, info = tables(data)
    plot_means(info["summary"], out / "means.png")
    modes = {n: {k: mean_std(v) for k, v in d["extra"].items()} for n, d in data.items() if d["extra"]}
    (out / "summary.json").write_text(json.dumps({**info, "inference_modes": modes}, indent=1))
    text = ["# Study results (raw)", "", table, "", "![means](means.png)", ""]
    if modes:
        text += ["| method | token | sequence | fixed (mean gate) |", "|---|---|---|---|"]
        for n, m in modes.items():
            token = mean_std([r["adapted"]["mean_accuracy"] for r in data[n]["runs"]])
            text.append(f"| {n} | {token} | {m.get('sequence', '-')} | {m.get('fixed', '-')} |")
    (out / "tables.md").write_text("\n".join(text) + "\n")
    print((out / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
