"""Simple baselines on the same folds as scBERT's cross-validation (``scbert cv --baseline``).

Each fold in turn is the test split; the model trains on the other folds' cells. The input is the
same as scBERT's: the shards' log2(1 + x) normalised values over the panel (sparse), so the
comparison is on equal data. ``logreg``: multinomial logistic regression; ``knn``: 15 nearest
neighbours on cosine distance over the top-50 principal components (scikit-learn).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

BASELINES = ("logreg", "knn")


def load_cells(shards: str | Path) -> tuple[Any, np.ndarray, np.ndarray, list[str]]:
    """(values CSR (cells x panel), label ids (-1: none), folds, label names) of a shard set."""
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    from scbert_platform.data.loader import ShardInfo, shard_files, values_matrix

    info = ShardInfo.read(shards)
    index = {label: i for i, label in enumerate(info.labels)}
    parts, labels, folds = [], [], []
    for file in shard_files(shards):
        table = pq.read_table(file, columns=["gene_idx", "value", "label", "fold"])
        parts.append(values_matrix(table, info.n_genes))
        labels += [index.get(label, -1) for label in table.column("label").to_pylist()]
        folds.append(table.column("fold").to_numpy())
    return sp.vstack(parts).tocsr(), np.array(labels), np.concatenate(folds), info.labels


def _estimator(kind: str, seed: int) -> Any:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline

    if kind == "logreg":
        return LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    if kind == "knn":
        return make_pipeline(
            TruncatedSVD(n_components=50, random_state=seed),
            KNeighborsClassifier(n_neighbors=15, metric="cosine"),
        )
    raise ValueError(f"unknown baseline {kind!r}; choose from {BASELINES}")


def cross_validate(shards: str | Path, kind: str, *, seed: int = 0) -> dict[str, Any]:
    """Per-fold and summary metrics of a baseline over the shards' folds."""
    from scbert_platform.train.metrics import classification_report

    x, y, folds, names = load_cells(shards)
    labelled = y >= 0
    per_fold = []
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    for fold in sorted(set(folds[labelled].tolist())):
        train = labelled & (folds != fold)
        test = labelled & (folds == fold)
        model = _estimator(kind, seed).fit(x[train], y[train])
        report = classification_report(y[test], model.predict(x[test]), names)
        confusion += np.asarray(report["confusion_matrix"])
        per_fold.append(
            {
                "fold": int(fold),
                "accuracy": report["accuracy"],
                "macro_f1": report["macro_f1"],
                "n": report["n"],
            }
        )
    accuracy = np.array([f["accuracy"] for f in per_fold])
    macro_f1 = np.array([f["macro_f1"] for f in per_fold])
    return {
        "model": kind,
        "folds": per_fold,
        "accuracy_mean": float(accuracy.mean()),
        "accuracy_std": float(accuracy.std(ddof=1)) if len(accuracy) > 1 else 0.0,
        "macro_f1_mean": float(macro_f1.mean()),
        "macro_f1_std": float(macro_f1.std(ddof=1)) if len(macro_f1) > 1 else 0.0,
        "confusion_matrix": confusion.tolist(),
        "labels": names,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per model: accuracy and macro F1, mean ± std over the folds."""
    lines = [
        "| model | folds | accuracy (mean ± std) | macro F1 (mean ± std) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {len(r['folds'])} | {r['accuracy_mean']:.3f} ± "
            f"{r['accuracy_std']:.3f} | {r['macro_f1_mean']:.3f} ± {r['macro_f1_std']:.3f} |"
        )
    return "\n".join(lines)
