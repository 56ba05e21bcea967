"""The N-finding methods and the clustering error type; importable without scikit-learn (CLI choices, config checks)."""

from __future__ import annotations

from typing import Literal, get_args

AutoNMethod = Literal["tfidf-elbow", "lsa-stability", "lsa-consensus", "lsa-silhouette", "lsa-elbow"]
AUTO_N_METHODS: tuple[str, ...] = get_args(AutoNMethod)
DEFAULT_METHOD: AutoNMethod = "lsa-consensus"
METHODS: dict[str, str] = {
    "tfidf-elbow": "paper: TF-IDF, K-means per K, elbow of the SSE curve (kneed)",
    "lsa-stability": "template TF-IDF + LSA + L2, K-means; K whose clustering is most "
                     "reproducible across subsamples (mean pairwise ARI)",
    "lsa-consensus": "template TF-IDF (terms in >= 5% of texts) + LSA 20 dims + L2, K-means; "
                     "K maximising stability + prediction strength (Tibshirani & Walther)",
    "lsa-silhouette": "template TF-IDF + LSA + L2, K-means; K with the best silhouette",
    "lsa-elbow": "template TF-IDF + LSA + L2, K-means; elbow of the SSE curve (kneed)",
}
assert tuple(METHODS) == AUTO_N_METHODS, "every AutoNMethod needs a description, in the same order"


class ClusteringError(ValueError):
    """Unusable input for clustering; the message says what, where and what is allowed."""
