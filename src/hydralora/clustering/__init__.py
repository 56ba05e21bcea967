"""Finding the number of experts N from a corpus (TF-IDF, K-means, model selection).

No torch anywhere in this package: it must stay importable and fast on a CPU-only box. The method names and
the error type load without scikit-learn (the `train` extra); the clustering functions load on first use.
"""

from .methods import AUTO_N_METHODS, DEFAULT_METHOD, METHODS, AutoNMethod, ClusteringError

_FROM_SELECT = ("ClusteringResult", "cluster_labels", "resolve_num_experts", "select_k", "suggest_num_experts")


def __getattr__(name: str):
    if name in _FROM_SELECT:
        from . import select

        return getattr(select, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AUTO_N_METHODS", "AutoNMethod", "DEFAULT_METHOD", "METHODS", "ClusteringError", *_FROM_SELECT]
