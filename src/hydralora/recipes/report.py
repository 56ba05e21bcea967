"""report.md and its PNG plots for a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._extras import missing_extra

try:
    import matplotlib
except ImportError as err:
    raise missing_extra(err.name, "The run report's plots") from err

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(history: list[dict], path: Path) -> bool:
    steps = [h["step"] for h in history if "loss" in h]
    if not steps:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], label="training loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    aux = [(h["step"], h["aux_loss"]) for h in history if "aux_loss" in h]
    if aux:
        ax2 = ax.twinx()
        ax2.plot(*zip(*aux), label="router aux loss", color="tab:orange")
        ax2.set_ylabel("aux loss")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title("Training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_elbow(auto_n: dict, path: Path) -> bool:
    scores = auto_n.get("scores") or {}
    sse = scores.get("sse") if isinstance(scores, dict) and "sse" in scores else None
    if sse is None and isinstance(scores, dict):
        # per-K layout: {"2": {"sse": ..}, ...}
        try:
            sse = {int(k): v["sse"] for k, v in scores.items()}
        except (TypeError, KeyError, ValueError):
            return False
    if not sse:
        return False
    ks = sorted(int(k) for k in sse)
    values = [sse[k] if k in sse else sse[str(k)] for k in ks]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ks, values, marker="o")
    chosen = int(auto_n["k"])
    if chosen in ks:
        ax.plot([chosen], [values[ks.index(chosen)]], marker="*", markersize=16, color="tab:red", label=f"chosen N = {chosen}")
    ax.set_xlabel("K (number of clusters)")
    ax.set_ylabel("K-means SSE")
    ax.set_title(f"Finding N ({auto_n.get('method', '')})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_routing(routing: dict[str, dict[str, list[float]]], path: Path) -> bool:
    if not routing:
        return False
    tasks = sorted(routing)
    groups = [g for g in ("early", "middle", "late") if g in routing[tasks[0]]] or sorted(routing[tasks[0]])
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 1, 0.35 * len(tasks) + 1.5), squeeze=False)
    for ax, g in zip(axes[0], groups):
        mat = np.array([routing[t][g] for t in tasks])
        # Centre the colour scale on the uniform gate 1/N, so a near-uniform router reads as such.
        spread = max(1e-6, float(np.abs(mat - 1.0 / mat.shape[1]).max()))
        im = ax.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=1.0 / mat.shape[1] - spread, vmax=1.0 / mat.shape[1] + spread)
        ax.set_xticks(range(mat.shape[1]), [f"E{i}" for i in range(mat.shape[1])])
        ax.set_yticks(range(len(tasks)), tasks if ax is axes[0][0] else [""] * len(tasks))
        ax.set_title(f"{g} layers")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle("Mean router weight per expert, per task (white = uniform 1/N)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_accuracy(base: dict | None, adapted: dict, path: Path) -> bool:
    tasks = sorted(adapted.get("tasks", {}))
    if not tasks:
        return False
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(tasks) + 2), 3.8))
    width = 0.4
    if base:
        ax.bar(x - width / 2, [base["tasks"][t]["accuracy"] for t in tasks], width, label=f"base (mean {base['mean_accuracy']:.3f})", color="tab:gray")
    ax.bar(x + (width / 2 if base else 0), [adapted["tasks"][t]["accuracy"] for t in tasks], width,
           label=f"adapted (mean {adapted['mean_accuracy']:.3f})", color="tab:green")
    ax.set_xticks(x, tasks, rotation=35, ha="right")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Per-task accuracy: base vs adapted")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path, metrics: dict[str, Any], spec) -> Path:
    """Write out/report.md with plots next to it; returns its path."""
    out = Path(out)
    lines = [f"# HydraLoRA run: {metrics['method']}", ""]
    lines += [
        f"- model: `{metrics['model']}`, data: `{metrics['data']}`, device: {metrics['device']}, "
        f"schedule: **{metrics['schedule']}**{' (a short CPU schedule)' if metrics['schedule'] == 'cpu' else ''}",
        f"- trainable parameters: {metrics['trainable_params']:,} of {metrics['total_params']:,}",
        f"- experts N: {metrics.get('num_experts')}"
        + (f" (found by `{metrics['auto_n'].get('method')}` from the corpus)" if metrics.get("auto_n") else ""),
        f"- training: {spec.train.max_steps} steps, {metrics['train_seconds']:.0f} s, final-average loss {metrics['train_loss']:.4f}",
        "",
    ]
    if "base" in metrics:
        gain = metrics["mean_gain"]
        verdict = "improves on" if gain > 0 else "does not improve on"
        lines += [
            f"**Held-out mean accuracy: base {metrics['base']['mean_accuracy']:.3f} -> adapted {metrics['adapted']['mean_accuracy']:.3f} "
            f"({gain:+.3f}); the adapter {verdict} the base model on average.**", "",
        ]
    if plot_accuracy(metrics.get("base"), metrics["adapted"], out / "accuracy.png"):
        lines += ["![per-task accuracy](accuracy.png)", ""]
    lines += ["| task | n | base | adapted |", "|---|---|---|---|"]
    for task, res in sorted(metrics["adapted"]["tasks"].items()):
        b = metrics.get("base", {}).get("per_task", {}).get(task)
        lines.append(f"| {task} | {res.get('n', '')} | {'' if b is None else f'{b:.3f}'} | {res['accuracy']:.3f} |")
    lines.append("")
    if plot_losses(metrics.get("log_history", []), out / "loss.png"):
        lines += ["## Training", "", "![training loss](loss.png)", ""]
    if metrics.get("auto_n") and plot_elbow(metrics["auto_n"], out / "elbow.png"):
        lines += ["## Finding N", "", f"Chosen N = {metrics['auto_n']['k']}.", "", "![elbow](elbow.png)", ""]
    if plot_routing(metrics.get("routing_by_task", {}), out / "routing.png"):
        lines += ["## Routing", "", "Mean gate weight per expert for each task's held-out prompts (token routing).", "",
                  "![routing](routing.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
