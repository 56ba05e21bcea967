"""Choose the number of experts N from a corpus (see docs/auto-n.md for the evidence)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .._extras import missing_extra

try:
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score
    from threadpoolctl import threadpool_limits
except ImportError as err:
    raise missing_extra(err.name, "Finding N from a corpus (hydralora.clustering)") from err

from .features import paper_tfidf, template_lsa
from .methods import DEFAULT_METHOD, METHODS, ClusteringError  # noqa: F401  (re-exported)

# Rule "pstrength" (largest K whose prediction strength reaches this; Tibshirani & Walther use
# 0.8-0.9). Reported by the benchmark on the default's sweep; no method uses it by itself.
PS_THRESHOLD = 0.7
# Feature settings (n_components, min_df) per method when the caller gives none. lsa-consensus
# was tuned on subset seed 0 of the BIG-bench benchmark (docs/auto-n.md): fewer, commoner
# terms and fewer LSA dims keep K-means on the prompt templates rather than the content.
_FEATURES = {"lsa-consensus": (20, 0.05)}
_FEATURES_DEFAULT = (50, 0.02)
# Above this many texts the paper's method uses MiniBatchKMeans on the full sparse matrix.
_MINIBATCH_ABOVE = 20_000


@dataclass
class ClusteringResult:
    """Outcome of :func:`suggest_num_experts`.

    ``scores[name][i]`` is the score ``name`` ("sse", and for lsa-* methods also "silhouette",
    "stability", "prediction_strength") at ``k_values[i]``. ``labels`` are the cluster ids of every text for ``k``.
    """

    k: int
    method: str
    k_values: list[int]
    scores: dict[str, list[float]]
    labels: np.ndarray
    seconds: float
    num_texts: int
    seed: int
    notes: list[str] = field(default_factory=list)

    @property
    def sse(self) -> list[float]:
        return self.scores["sse"]

    def scores_by_k(self) -> dict[str, dict[str, float]]:
        """``{"2": {"sse": ..., ...}, ...}``: JSON-friendly, one entry per K."""
        return {str(k): {name: float(v[i]) for name, v in self.scores.items()}
                for i, k in enumerate(self.k_values)}

    def to_dict(self, include_labels: bool = False) -> dict:
        d = {"k": int(self.k), "method": self.method, "k_values": list(map(int, self.k_values)),
             "scores": self.scores_by_k(), "seconds": round(float(self.seconds), 3),
             "num_texts": int(self.num_texts), "seed": int(self.seed), "notes": list(self.notes)}
        if include_labels:
            d["labels"] = [int(x) for x in self.labels]
        return d


def select_k(k_values, scores: dict[str, list[float]], rule: str) -> int:
    """Apply a selection rule ("consensus", "pstrength", "stability", "silhouette" or "elbow")
    to a score curve."""
    ks = list(k_values)
    if rule == "consensus":
        s = np.asarray(scores["stability"]) + np.asarray(scores["prediction_strength"])
        # Both must hold: the clustering is reproducible across subsamples (stability) and each
        # cluster can be predicted from an independent half (prediction strength, whose min
        # over clusters punishes one split task). Ties go to the larger K, as for stability.
        return int(max(k for k, v in zip(ks, s) if v >= s.max() - 1e-3))
    if rule == "pstrength":
        ps = np.asarray(scores["prediction_strength"])
        ok = [k for k, v in zip(ks, ps) if v >= PS_THRESHOLD - 1e-9]
        # Largest K whose clusters can be predicted from an independent half of the data;
        # if no K reaches the threshold, the K with the best prediction strength.
        return int(max(ok)) if ok else int(ks[int(np.argmax(ps))])
    if rule == "stability":
        s = np.asarray(scores["stability"])
        # Ties (several K reproduced perfectly) go to the larger K: merging two real tasks
        # is as stable as keeping them apart, splitting one task is not.
        return int(max(k for k, v in zip(ks, s) if v >= s.max() - 1e-3))
    if rule == "silhouette":
        return int(ks[int(np.argmax(scores["silhouette"]))])
    if rule == "elbow":
        return _elbow(ks, scores["sse"])[0]
    raise ValueError(f"rule={rule!r}; allowed: 'consensus', 'pstrength', 'stability', 'silhouette', 'elbow'")


def _elbow(ks, sse) -> tuple[int, bool]:
    try:
        from kneed import KneeLocator
    except ImportError as err:
        raise missing_extra(err.name, "The elbow rule of N-finding") from err

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kneed warns when no knee exists; we report that
        knee = KneeLocator(list(ks), list(sse), curve="convex", direction="decreasing").knee
    return (int(knee), True) if knee is not None else (int(ks[0]), False)


def _check_inputs(texts, k_range, method):
    if method not in METHODS:
        raise ClusteringError(f"method={method!r}; allowed: {', '.join(METHODS)}")
    if isinstance(texts, str):
        raise ClusteringError("texts must be a list of strings, got one string")
    texts = list(texts)
    if not texts:
        raise ClusteringError("texts is empty; need at least one document per cluster")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ClusteringError(f"texts[{i}] is {type(t).__name__} {t!r:.60}; "
                                  "allowed: a non-empty string")
        if not t.strip():
            raise ClusteringError(f"texts[{i}] is empty; every document needs some text")
    ks = sorted({int(k) for k in k_range})
    if not ks or ks[0] < 2:
        raise ClusteringError(f"k_range={list(k_range)!r}; allowed: integers >= 2")
    if len(ks) < (3 if method.endswith("elbow") else 2):
        raise ClusteringError(f"k_range={ks!r} has too few values for method {method!r} "
                              "(an elbow needs at least 3 K values, the others 2)")
    if len(texts) <= ks[-1]:
        raise ClusteringError(f"only {len(texts)} documents for K up to {ks[-1]}; "
                              f"need more than {ks[-1]} documents (or a smaller k_max)")
    return texts, ks


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def suggest_num_experts(texts, k_range=range(2, 11), method: str = DEFAULT_METHOD,
                        seed: int = 0, *, n_components: int | None = None,
                        min_df: float | None = None,
                        n_init: int = 10, max_sweep_docs: int = 5000,
                        stability_rounds: int = 8, stability_fraction: float = 0.8,
                        ps_rounds: int = 8, progress: bool | None = None) -> ClusteringResult:
    """Suggest the number of experts N for a corpus.

    ``method``: "lsa-consensus" (default), "tfidf-elbow" (the paper's), "lsa-stability",
    "lsa-silhouette", "lsa-elbow"; see ``METHODS``. ``n_components`` / ``min_df`` (LSA dims,
    minimum document frequency of a term) default to 20 / 0.05 for lsa-consensus and 50 / 0.02
    for the other lsa-* methods. Deterministic for a given ``seed``.

    The lsa-* methods score every K on a seeded subsample of at most ``max_sweep_docs``
    texts, then label all texts with the chosen K's centroids, so time and memory stay
    bounded on large corpora. Stability: ``stability_rounds`` times, K-means is fitted on two
    random ``stability_fraction`` subsamples and the two labelings of the whole sweep sample
    are compared by adjusted Rand index; the score is the mean. Prediction strength
    (Tibshirani & Walther 2005): ``ps_rounds`` times, the sweep sample is split into random
    halves A and B, K-means is fitted on each; for every cluster of B, the fraction of its
    pairs that A's centroids also put together; the minimum over B's clusters, median over
    rounds.
    """
    t0 = time.perf_counter()
    texts, ks = _check_inputs(texts, k_range, method)
    dflt = _FEATURES.get(method, _FEATURES_DEFAULT)
    n_components = dflt[0] if n_components is None else int(n_components)
    min_df = dflt[1] if min_df is None else float(min_df)
    # One thread: the sweep is many small K-means fits, and OpenMP threads on a busy 2-core
    # machine made each fit 30x slower (oversubscription), not faster.
    with threadpool_limits(1):
        res = _suggest(texts, ks, method, seed, n_components, min_df, n_init, max_sweep_docs,
                       stability_rounds, stability_fraction, ps_rounds, progress)
    res.seconds = time.perf_counter() - t0
    return res


def _suggest(texts, ks, method, seed, n_components, min_df, n_init, max_sweep_docs,
             stability_rounds, stability_fraction, ps_rounds, progress) -> ClusteringResult:
    t0 = time.perf_counter()
    n = len(texts)
    if progress is None:
        progress = n >= 10_000
    rng = np.random.default_rng(seed)
    notes: list[str] = []

    if len(set(texts)) == 1:
        # Every K ties on such data (SSE 0, perfect stability), so no sweep can pick one.
        return _one_cluster(ks, method, n, seed, t0, "all documents are identical: one cluster, N=1")

    if method == "tfidf-elbow":
        X = paper_tfidf(texts)
        sse, models = [], {}
        for k in _progress(ks, progress, "K sweep"):
            if n > _MINIBATCH_ABOVE:
                km = MiniBatchKMeans(k, n_init=3, batch_size=4096, random_state=seed)
            else:
                km = KMeans(k, n_init=n_init, random_state=seed)
            km.fit(X)
            sse.append(float(km.inertia_))
            models[k] = km
        k, found = _elbow(ks, sse)
        if not found:
            notes.append(f"no knee in the SSE curve; fell back to k_min={ks[0]}")
        return ClusteringResult(k, method, ks, {"sse": sse}, models[k].labels_.astype(np.int64),
                                time.perf_counter() - t0, n, seed, notes)

    Z = template_lsa(texts, seed=seed, n_components=n_components, min_df=min_df)
    distinct = len(np.unique(np.round(Z, 6), axis=0))
    if distinct == 1:
        return _one_cluster(ks, method, n, seed, t0,
                            "all documents share the same features (the same template): one cluster, N=1")
    if n > max_sweep_docs:
        sample = np.sort(rng.choice(n, max_sweep_docs, replace=False))
        notes.append(f"K sweep on a seeded sample of {max_sweep_docs} of {n} texts")
    else:
        sample = np.arange(n)
    Zs = Z[sample]
    m = len(sample)
    sub = max(ks[-1] + 1, int(stability_fraction * m))
    scores = {"sse": [], "silhouette": [], "stability": [], "prediction_strength": []}
    # Its own stream, so the stability scores do not depend on whether PS is computed.
    ps_rng = np.random.default_rng([seed, 1])
    models = {}
    for k in _progress(ks, progress, "K sweep"):
        km = KMeans(k, n_init=n_init, random_state=seed).fit(Zs)
        models[k] = km
        scores["sse"].append(float(km.inertia_))
        if len(np.unique(km.labels_)) > 1:
            sil = silhouette_score(Zs, km.labels_, sample_size=min(m, 3000),
                                   random_state=seed)
        else:  # duplicate-heavy corpora can leave one distinct cluster
            sil = -1.0
        scores["silhouette"].append(float(sil))
        aris = []
        for _ in range(stability_rounds):
            pair = []
            for _ in range(2):
                idx = rng.choice(m, sub, replace=False)
                fit = KMeans(k, n_init=3, random_state=int(rng.integers(2**31 - 1))).fit(Zs[idx])
                pair.append(fit.predict(Zs))
            aris.append(adjusted_rand_score(*pair))
        scores["stability"].append(float(np.mean(aris)))
        scores["prediction_strength"].append(_prediction_strength(Zs, k, ps_rng, ps_rounds))
    k = select_k(ks, scores, method.split("-", 1)[1])
    labels = models[k].predict(Z).astype(np.int64) if m < n else models[k].labels_.astype(np.int64)
    return ClusteringResult(k, method, ks, scores, labels, time.perf_counter() - t0, n, seed,
                            notes)


def _one_cluster(ks, method, n, seed, t0, note) -> ClusteringResult:
    return ClusteringResult(1, method, ks, {}, np.zeros(n, dtype=np.int64), time.perf_counter() - t0, n, seed,
                            [note])


def _prediction_strength(Z, k, rng, rounds, n_init=3) -> float:
    m = len(Z)
    vals = []
    for _ in range(max(1, rounds)):
        perm = rng.permutation(m)
        a, b = perm[: m // 2], perm[m // 2:]
        fit_a = KMeans(k, n_init=n_init, random_state=int(rng.integers(2**31 - 1))).fit(Z[a])
        fit_b = KMeans(k, n_init=n_init, random_state=int(rng.integers(2**31 - 1))).fit(Z[b])
        test, pred = fit_b.labels_, fit_a.predict(Z[b])
        per_cluster = []
        for c in range(k):
            members = pred[test == c]
            n = len(members)
            if n < 2:  # a singleton test cluster says nothing about co-membership
                continue
            counts = np.bincount(members)
            per_cluster.append(float((counts * (counts - 1)).sum()) / (n * (n - 1)))
        vals.append(min(per_cluster) if per_cluster else 0.0)
    return float(np.median(vals))


def resolve_num_experts(texts, **kw) -> tuple[int, dict]:
    """N for ``HydraLoraConfig(num_experts="auto")``: ``(k, JSON-serialisable summary)``.

    Keyword arguments go to :func:`suggest_num_experts`. The summary (k, method, scores per
    K, seconds, num_texts, seed, notes) is meant for adapter_config.json / the run dir.
    """
    res = suggest_num_experts(texts, **kw)
    return res.k, res.to_dict()


def cluster_labels(texts, k: int, method: str = DEFAULT_METHOD, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """The cluster (0..k-1) of every text, with the features auto-N uses for ``method`` and K-means at ``k``:
    the targets of the routing warm-start (expert i starts on cluster i). ``k=1`` labels every text 0."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ClusteringError(f"k={k!r}; allowed: an integer >= 1")
    texts = list(texts)
    if k == 1:
        return np.zeros(len(texts), dtype=np.int64)
    texts, _ = _check_inputs(texts + ["."] * 2, range(2, 4), "lsa-stability")  # the per-document checks
    texts = texts[:-2]
    if len(texts) < k:
        raise ClusteringError(f"only {len(texts)} documents for k={k} clusters; need at least k documents")
    if method not in METHODS:
        raise ClusteringError(f"method={method!r}; allowed: {', '.join(METHODS)}")
    with threadpool_limits(1):
        if method == "tfidf-elbow":
            X = paper_tfidf(texts)
        else:
            n_components, min_df = _FEATURES.get(method, _FEATURES_DEFAULT)
            X = template_lsa(texts, seed=seed, n_components=n_components, min_df=min_df)
        return KMeans(int(k), n_init=n_init, random_state=seed).fit(X).labels_.astype(np.int64)
