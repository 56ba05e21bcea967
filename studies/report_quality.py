"""Tables of the fair comparison (studies/quality.py) from its raw run directories, as markdown.

    python studies/report_quality.py results/quality/2026-12-04 > tables.md

Every number is read from the runs' metrics.json: validation (carved from the training split) and test mean
accuracy, trainable parameters, the router's mean per-token entropy (units of log N) and the experts' mean pairwise
cosine similarity at the end of training. Mean ± sample standard deviation over the seeds present.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402


def load(study: Path) -> dict[tuple[str, str], dict[int, dict]]:
    """{(part, config): {seed: metrics}} for every finished run."""
    runs: dict[tuple[str, str], dict[int, dict]] = {}
    for m in sorted(study.glob("*/*/seed*/metrics.json")):
        part, cfg, seed = m.parts[-4], m.parts[-3], m.parts[-2]
        if not seed[4:].isdigit():
            continue
        runs.setdefault((part, cfg), {})[int(seed[4:])] = json.loads(m.read_text())
    return runs


def stat(values: list[float | None], digits: int = 3) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def row(name: str, runs: dict[int, dict]) -> str:
    ms = [runs[s] for s in sorted(runs)]
    return (f"| {name} | {ms[0]['trainable_params'] / 1e6:.2f} M | {len(ms)} | "
            f"{stat([m.get('validation', {}).get('mean_accuracy') for m in ms])} | "
            f"**{stat([m['adapted']['mean_accuracy'] for m in ms])}** | "
            f"{stat([m.get('router_entropy') for m in ms], 2)} | {stat([m.get('expert_cos') for m in ms], 2)} |")


HEADER = ("| configuration | trainable | seeds | validation | test | router entropy | expert cosine |\n"
          "|---|---|---|---|---|---|---|")


def report(study: Path) -> str:
    runs = load(study)
    out = []
    chosen = json.loads((study / "selection.json").read_text()) if (study / "selection.json").is_file() else {}
    base = next((m["base"]["mean_accuracy"] for r in runs.values() for m in r.values()
                 if "base" in m and m.get("data", "").endswith("bbh12.jsonl")), None)
    parts = {part for part, _ in runs}
    if base is not None:
        out.append(f"Base model (no adapter), test: {base:.3f}.\n")
    if "final" in parts:
        out += ["## Final: three seeds of the configurations chosen on validation\n", HEADER]
        for name in ("hydralora-best", "lora-matched", "lora-r8"):
            if ("final", name) in runs:
                pick = chosen.get(name, {}).get("from", "?")
                out.append(row(f"{name} (= {pick})", runs[("final", name)]))
    if "select" in parts:
        out += ["\n## Select: every candidate, seed 0 (the choice reads the validation column only)\n", HEADER]
        out += [row(cfg, r) for (part, cfg), r in sorted(runs.items()) if part == "select"]
    if "mechanisms" in parts:
        out += ["\n## Mechanisms: three seeds each (seed 0 from select, seeds 1 and 2)\n", HEADER]
        plain = f"hydralora-n3-{quality.lr_name(quality.MECHANISM_LR)}"
        if ("select", plain) in runs:
            out.append(row(f"{plain} (no mechanism, seed 0 only)", runs[("select", plain)]))
        for (part, cfg), r in sorted(runs.items()):
            if part == "mechanisms":
                merged = {**runs.get(("select", cfg), {}), **r}
                out.append(row(cfg, merged))
    for part, title in (("auto-twin", "The auto-N HydraLoRA (N = 10) against its own LoRA twin, learning rate 1e-3"),
                        ("further", "Further attempts: a larger shared A at N = 2 (r = 16, r = 32) against LoRA twins (r = 26, r = 50)")):
        rows = [(cfg, r) for (p, cfg), r in sorted(runs.items()) if p == part]
        if rows:
            out += [f"\n## {title}\n", HEADER] + [row(cfg, r) for cfg, r in rows]
    rows = [(cfg, r) for (p, cfg), r in sorted(runs.items()) if p == "recipe"]
    if rows:
        out.append("\n## Default-recipe candidates at the CPU schedule (bundled data, 8 per step, fp32; run on the GPU)\n")
        if (study / "recipe").is_dir():
            try:
                pick = quality.select_recipe(study / "recipe")
                out.append(f"Chosen on validation: {pick['from']} (mean validation {pick['validation']:.3f}, "
                           f"seeds {pick['seeds']}; left out, a seed missing: {', '.join(pick['incomplete']) or 'none'}).\n")
            except ValueError as err:
                out.append(f"Not chosen: {err}.\n")
        out.append("| configuration | trainable | seeds | validation | validation gain | test | test gain | "
                   "test gain per seed | minutes |\n|---|---|---|---|---|---|---|---|---|")
        out += [recipe_row(cfg, r) for cfg, r in rows]
    return "\n".join(out) + "\n"


def recipe_row(name: str, runs: dict[int, dict]) -> str:
    """A recipe candidate: its gain over the base model (scored in the same run) on validation and test data."""
    ms = [runs[s] for s in sorted(runs)]
    per_seed = ", ".join(f"{s}: {100 * runs[s]['mean_gain']:+.1f}" for s in sorted(runs) if "mean_gain" in runs[s])
    return (f"| {name} | {ms[0]['trainable_params'] / 1e6:.2f} M | {len(ms)} | "
            f"{stat([m.get('validation', {}).get('mean_accuracy') for m in ms])} | "
            f"{stat([m.get('validation_gain') for m in ms])} | {stat([m['adapted']['mean_accuracy'] for m in ms])} | "
            f"**{stat([m.get('mean_gain') for m in ms])}** | "
            f"{per_seed or '-'} | {stat([m.get('total_seconds', 0) / 60 for m in ms], 1)} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python studies/report_quality.py STUDY_DIR")
    print(report(Path(sys.argv[1])), end="")
