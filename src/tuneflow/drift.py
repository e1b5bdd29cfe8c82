"""Drift of a batch against a model's training data: labels, text length and the text itself.

Three statistics, each a distance that is near 0 (AUC: near 0.5) when the batch comes from the training data:

    labels   Jensen-Shannon distance between the label distributions (classification; for unlabelled data,
             the predicted labels)
    length   Kolmogorov-Smirnov statistic between the text-length (characters) distributions
    text     ROC AUC of a domain classifier (TF-IDF word 1-2 grams + logistic regression, 3-fold) that tells
             batch rows from training rows: 0.5 when it cannot, near 1.0 when the vocabulary moved

Thresholds come from the training data itself, as NannyML derives them from reference chunks: ``chunks``
random chunks of the batch's size are drawn from the reference and each is compared with the rest; a
statistic is drifted past ``mean + sigmas * std`` of those chunk values (never below the largest of them).
A fixed threshold per statistic (``monitor.thresholds``) overrides the derived one.

Built on scipy and scikit-learn rather than Evidently 0.7, which does not import with pandas 3 (the measured
comparison is in docs/how-to/monitoring.md, "Why not Evidently").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

STATS = ("labels", "length", "text")
MIN_CHUNK = 10  # reference chunks smaller than this say nothing: thresholds are not derived
STAT_HELP = {
    "labels": "Jensen-Shannon distance of the label distributions",
    "length": "Kolmogorov-Smirnov statistic of the text lengths",
    "text": "ROC AUC of a classifier telling batch texts from training texts",
}


@dataclass
class DriftStat:
    name: str  # labels | length | text
    value: float
    threshold: float
    derived: bool  # threshold from reference chunks (True) or a config override (False)

    @property
    def drifted(self) -> bool:
        return self.value > self.threshold


@dataclass
class DriftResult:
    stats: list[DriftStat] = field(default_factory=list)
    # what tells the batch apart, for a person: the words most typical of the batch vs the training data
    batch_words: list[str] = field(default_factory=list)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # {"batch": {...}, "reference": {...}}
    length_quantiles: dict[str, list[float]] = field(default_factory=dict)  # p10, p50, p90 per side

    @property
    def drifted(self) -> list[DriftStat]:
        return [s for s in self.stats if s.drifted]

    def to_json(self) -> dict:
        return {
            "stats": [asdict(s) | {"drifted": s.drifted} for s in self.stats],
            "batch_words": self.batch_words,
            "label_counts": self.label_counts,
            "length_quantiles": self.length_quantiles,
        }

    @classmethod
    def from_json(cls, data: dict) -> DriftResult:
        stats = [DriftStat(s["name"], s["value"], s["threshold"], s["derived"]) for s in data.get("stats", [])]
        return cls(stats, data.get("batch_words", []), data.get("label_counts", {}), data.get("length_quantiles", {}))


def label_counts(values: list[str], labels: list[str]) -> dict[str, int]:
    """Rows per label, in the order of ``labels`` (values outside it are not counted)."""
    counts = Counter(values)
    return {name: counts[name] for name in labels}


def label_distance(current: list[str], reference: list[str], labels: list[str]) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between the label shares, add-half smoothed."""
    from scipy.spatial.distance import jensenshannon

    def shares(values: list[str]) -> np.ndarray:
        counts = np.array(list(label_counts(values, labels).values()), dtype=float) + 0.5
        return counts / counts.sum()

    return float(jensenshannon(shares(current), shares(reference), base=2))


def length_distance(current: np.ndarray, reference: np.ndarray) -> float:
    from scipy.stats import ks_2samp

    return float(ks_2samp(current, reference).statistic)


def _vectorizer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), min_df=1, max_features=20_000, sublinear_tf=True, lowercase=True)


def text_auc(features, is_batch: np.ndarray, seed: int = 0) -> float:
    """ROC AUC of a domain classifier (batch rows vs reference rows of ``features``, a TF-IDF matrix),
    cross-validated in 3 folds: 0.5 = indistinguishable, 1.0 = every batch row is told apart."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    y = is_batch.astype(int)
    folds = min(3, int(y.sum()), int(len(y) - y.sum()))
    if folds < 2:
        return 0.5
    proba = np.zeros(len(y))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, y):
        model = LogisticRegression(max_iter=200, C=1.0, class_weight="balanced", solver="liblinear")
        model.fit(features[train], y[train])
        proba[test] = model.predict_proba(features[test])[:, 1]
    return float(roc_auc_score(y, proba))


def batch_words(current: list[str], reference: list[str], n: int = 12) -> list[str]:
    """The words whose share grew most from the reference to the batch (what a person looks at first)."""
    from sklearn.feature_extraction.text import CountVectorizer

    if not current or not reference:
        return []
    vec = CountVectorizer(lowercase=True, min_df=2 if len(current) >= 50 else 1)
    try:
        counts = vec.fit_transform(list(current) + list(reference))
    except ValueError:  # no word at all (e.g. every text is punctuation)
        return []
    cur = np.asarray(counts[: len(current)].sum(axis=0)).ravel() + 1.0
    ref = np.asarray(counts[len(current) :].sum(axis=0)).ravel() + 1.0
    lift = np.log(cur / cur.sum()) - np.log(ref / ref.sum())
    words = vec.get_feature_names_out()
    top = np.argsort(-lift)[:n]
    return [str(words[i]) for i in top if lift[i] > 0]


def _statistics(
    rows_a: np.ndarray,
    rows_b: np.ndarray,
    lengths: np.ndarray,
    features,
    label_list: list[str] | None,
    labels: list[str] | None,
    seed: int,
    with_text: bool = True,
) -> dict[str, float]:
    """The statistics of rows ``rows_a`` (the "batch") against ``rows_b``, indices into the pooled arrays."""
    out = {"length": length_distance(lengths[rows_a], lengths[rows_b])}
    if with_text:
        idx = np.r_[rows_a, rows_b]
        is_a = np.r_[np.ones(len(rows_a), bool), np.zeros(len(rows_b), bool)]
        out["text"] = text_auc(features[idx], is_a, seed)
    if labels and label_list is not None:
        out["labels"] = label_distance([label_list[i] for i in rows_a], [label_list[i] for i in rows_b], labels)
    return out


def measure_drift(
    cur_texts: list[str],
    ref_texts: list[str],
    *,
    cur_labels: list[str] | None = None,
    ref_labels: list[str] | None = None,
    labels: list[str] | None = None,
    chunks: int = 20,
    sigmas: float = 3.0,
    max_rows: int = 1000,
    overrides: dict[str, float] | None = None,
    seed: int = 0,
) -> DriftResult:
    """Drift of a batch (``cur_*``) against the reference (the champion's training rows).

    Args:
        cur_texts / ref_texts: the texts; at most ``max_rows`` of each (seeded sample) enter the statistics.
        cur_labels / ref_labels / labels: label names per row and the label set (classification); without
            them the label statistic is skipped.
        chunks: reference chunks for the derived thresholds (0: only ``overrides`` thresholds are used).
        sigmas: a statistic past mean + sigmas * std of its chunk values is drifted.
        overrides: fixed thresholds by statistic name (labels, length, text).
        seed: every sample and fold split is seeded: the same inputs give the same result.
    """
    rng = np.random.default_rng(seed)
    overrides = overrides or {}

    def sample(n: int, k: int) -> np.ndarray:
        return np.sort(rng.choice(n, size=min(n, k), replace=False))

    ci, ri = sample(len(cur_texts), max_rows), sample(len(ref_texts), max(max_rows, 2 * min(len(cur_texts), max_rows)))
    c_texts, r_texts = [cur_texts[i] for i in ci], [ref_texts[i] for i in ri]
    c_labels = [cur_labels[i] for i in ci] if cur_labels is not None else None
    r_labels = [ref_labels[i] for i in ri] if ref_labels is not None else None
    # One pool of rows (batch first, then reference), vectorized once: every comparison below indexes into it.
    texts = c_texts + r_texts
    lengths = np.array([len(t) for t in texts])
    features = _vectorizer().fit_transform(texts)
    label_list = (c_labels + r_labels) if c_labels is not None and r_labels is not None else None
    n, m = len(c_texts), len(r_texts)
    batch, ref = np.arange(n), np.arange(n, n + m)
    values = _statistics(batch, ref, lengths, features, label_list, labels, seed)

    # Reference chunks of the batch's size against the rest of the reference: how far apart two samples of
    # the training data itself are at this size. The text statistic fits a classifier per chunk, so it gets
    # ``chunks`` of them; the cheap ones get five times more.
    # A reference smaller than twice the batch gives chunks of half its size: noisier, so a higher threshold.
    chunk_values: dict[str, list[float]] = {k: [] for k in values}
    size = min(n, m // 2)
    if chunks and size >= MIN_CHUNK:
        for i in range(chunks * 5):
            perm = ref[rng.permutation(m)]
            got = _statistics(perm[:size], perm[size:], lengths, features, label_list, labels, seed + 1 + i, i < chunks)
            for k, v in got.items():
                chunk_values[k].append(v)
    stats = []
    for name in STATS:
        if name not in values:
            continue
        if name in overrides:
            stats.append(DriftStat(name, values[name], float(overrides[name]), False))
            continue
        seen = np.array(chunk_values[name])
        if len(seen) < 2:
            continue  # no reference to derive from and no override: not judged
        threshold = max(float(seen.mean() + sigmas * seen.std(ddof=1)), float(seen.max()))
        stats.append(DriftStat(name, values[name], threshold, True))
    result = DriftResult(stats, batch_words(c_texts, r_texts))
    if labels and c_labels is not None and r_labels is not None:
        result.label_counts = {"batch": label_counts(c_labels, labels), "reference": label_counts(r_labels, labels)}
    result.length_quantiles = {
        side: [float(q) for q in np.percentile([len(t) for t in texts], [10, 50, 90])]
        for side, texts in (("batch", c_texts), ("reference", r_texts))
        if texts
    }
    return result
