"""Finding the number of experts N from a corpus (TF-IDF, K-means, model selection).

No torch anywhere in this package: it must stay importable and fast on a CPU-only box.
"""

from .select import (DEFAULT_METHOD, METHODS, ClusteringError, ClusteringResult, cluster_labels,
                     resolve_num_experts, select_k, suggest_num_experts)

__all__ = ["DEFAULT_METHOD", "METHODS", "ClusteringError", "ClusteringResult", "cluster_labels",
           "resolve_num_experts", "select_k", "suggest_num_experts"]
