"""Tables, task agreement and the elbow plot for ``hydralora analyze``."""

from __future__ import annotations

from collections import Counter

from .._extras import missing_extra
from .select import ClusteringResult


def score_table(res: ClusteringResult) -> str:
    names = list(res.scores)
    head = "   K  " + "  ".join(f"{n:>12}" for n in names)
    lines = [head]
    for i, k in enumerate(res.k_values):
        mark = "  <- chosen" if k == res.k else ""
        lines.append(f"{k:>4}  " + "  ".join(f"{res.scores[n][i]:>12.4g}" for n in names) + mark)
    return "\n".join(lines)


def task_agreement(labels, tasks) -> dict:
    """Adjusted Rand index of clusters vs tasks and a task x cluster contingency table."""
    try:
        from sklearn.metrics import adjusted_rand_score
    except ImportError as err:
        raise missing_extra(err.name, "Cluster-task agreement") from err

    counts = Counter(zip(tasks, (int(c) for c in labels)))
    clusters = sorted({c for _, c in counts})
    table = {t: {str(c): counts.get((t, c), 0) for c in clusters} for t in sorted(set(tasks))}
    return {"adjusted_rand_index": float(adjusted_rand_score(tasks, labels)),
            "num_tasks": len(table), "contingency": table}


def contingency_text(agree: dict) -> str:
    table = agree["contingency"]
    clusters = list(next(iter(table.values())))
    w = max(4, *(len(t) for t in table))
    lines = [f"{'task':<{w}}  " + " ".join(f"{'c' + c:>6}" for c in clusters)]
    for t, row in table.items():
        lines.append(f"{t:<{w}}  " + " ".join(f"{row[c]:>6}" for c in clusters))
    return "\n".join(lines)


def plot_scores(res: ClusteringResult, path) -> None:
    """SSE curve (and the selection score of the lsa-* methods) with the choice marked."""
    try:
        import matplotlib
    except ImportError as err:
        raise missing_extra(err.name, "The N-finding plot") from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "sse" not in res.scores:  # no sweep was run (degenerate data): say why instead of a curve
        fig, ax = plt.subplots(figsize=(4.2, 3.4))
        ax.axis("off")
        ax.text(0.5, 0.5, "\n".join([f"chosen K = {res.k}", *res.notes]), ha="center", va="center", wrap=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    extra = [n for n in ("stability", "prediction_strength", "silhouette") if n in res.scores]
    fig, axes = plt.subplots(1, 1 + len(extra), figsize=(4.2 * (1 + len(extra)), 3.4))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, name in zip(axes, ["sse", *extra]):
        ax.plot(res.k_values, res.scores[name], "o-", color="tab:blue")
        i = res.k_values.index(res.k)
        ax.plot([res.k], [res.scores[name][i]], "o", ms=12, mfc="none", color="tab:red")
        ax.axvline(res.k, color="tab:red", ls="--", lw=1)
        ax.set_xlabel("K")
        ax.set_title(name)
    fig.suptitle(f"{res.method}: chosen K = {res.k} ({res.num_texts} texts)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
