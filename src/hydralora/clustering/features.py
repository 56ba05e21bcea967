"""Document features for choosing the number of experts.

Everything here is scikit-learn on sparse matrices; nothing imports torch.
"""

from __future__ import annotations

import math

import numpy as np

from .._extras import missing_extra

try:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize
except ImportError as err:
    raise missing_extra(err.name, "Corpus features for N-finding (hydralora.clustering)") from err

# Words plus single punctuation marks: tasks such as dyck_languages ("{ [ ( ) ] }") consist of
# nothing but punctuation, which scikit-learn's default pattern drops entirely.
TOKEN_PATTERN = r"(?u)\b\w+\b|[^\w\s]"


def paper_tfidf(texts: list[str]):
    """The paper's features: a plain TF-IDF matrix (scikit-learn defaults), sparse."""
    return TfidfVectorizer(dtype=np.float32).fit_transform(texts)


def template_lsa(texts: list[str], *, seed: int = 0, n_components: int = 50,
                 min_df: float = 0.02):
    """TF-IDF over terms shared by at least ``min_df`` of the documents, LSA, L2 rows.

    Why: documents of one task share a prompt template; the rare content words (names,
    numbers) are what make K-means split a task into pieces, so terms seen in fewer than
    ``min_df`` of the documents are dropped. Sublinear TF and L2-normalised LSA rows make
    Euclidean K-means behave like spherical (cosine) K-means. Returns a dense float32 array
    (n, <= n_components).
    """
    n = len(texts)
    floor = max(2, math.ceil(min_df * n)) if n >= 50 else 1
    for m in (floor, 1):  # tiny or very diverse corpora: fall back to every term
        vec = TfidfVectorizer(token_pattern=TOKEN_PATTERN, sublinear_tf=True, min_df=m,
                              dtype=np.float32)
        try:
            X = vec.fit_transform(texts)
            break
        except ValueError:  # "empty vocabulary"
            X = None
    if X is None:
        raise ValueError("the texts contain no tokens at all (every text is whitespace)")
    if X.shape[1] > n_components + 1:
        Z = TruncatedSVD(n_components, random_state=seed).fit_transform(X)
    else:  # a handful of terms: LSA would not reduce anything
        Z = X.toarray()
    return normalize(Z).astype(np.float32, copy=False)
