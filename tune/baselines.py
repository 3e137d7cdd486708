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

from scbert.config import UNASSIGNED_THRESHOLD

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


SCORES = ("accuracy", "macro_f1", "ece", "kept", "accuracy_kept", "unassigned_correct",
          "unassigned_wrong")  # fmt: skip


def cross_validate(
    shards: str | Path, kind: str, *, seed: int = 0, threshold: float = UNASSIGNED_THRESHOLD
) -> dict[str, Any]:
    """Per-fold and summary metrics of a baseline over the shards' folds: accuracy, macro F1,
    each class's F1 (averaged over the folds that test it, as ``scbert cv`` does for scBERT), and
    the calibration of its probabilities as scBERT's are scored (ECE; at ``threshold``, the cells
    kept, their accuracy, and the Unassigned rate among correctly and wrongly called cells)."""
    from scbert_platform.train.metrics import (
        classification_report,
        expected_calibration_error,
        mean_per_class_f1,
        mean_std,
        selective_scores,
    )

    x, y, folds, names = load_cells(shards)
    labelled = y >= 0
    per_fold, pooled, reports = [], [], []
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    for fold in sorted(set(folds[labelled].tolist())):
        train = labelled & (folds != fold)
        test = labelled & (folds == fold)
        model = _estimator(kind, seed).fit(x[train], y[train])
        proba = np.zeros((int(test.sum()), len(names)))
        proba[:, model.classes_] = model.predict_proba(x[test])  # a class absent: probability 0
        report = classification_report(y[test], proba.argmax(axis=1), names)
        pooled.append((proba, y[test]))
        reports.append(report)
        confusion += np.asarray(report["confusion_matrix"])
        per_fold.append(
            {
                "fold": int(fold),
                "accuracy": report["accuracy"],
                "macro_f1": report["macro_f1"],
                "n": report["n"],
                "ece": expected_calibration_error(proba, y[test]),
                **selective_scores(proba, y[test], threshold),
            }
        )
    all_proba, all_y = (np.concatenate(part) for part in zip(*pooled, strict=True))
    return {"model": kind, "folds": per_fold, **mean_std(per_fold, SCORES)} | {
        "ece_pooled": expected_calibration_error(all_proba, all_y),  # every tested cell at once
        "confusion_matrix": confusion.tolist(),
        "labels": names,
        "per_class_f1": mean_per_class_f1(reports),
    }


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per model: accuracy, macro F1 and ECE (mean ± std over the folds), the ECE of all
    held-out cells at once, and the share of correctly called cells left Unassigned at the
    threshold."""
    lines = [
        "| model | folds | accuracy (mean ± std) | macro F1 (mean ± std) | ECE (per fold) | "
        "ECE (all held-out cells) | correct cells Unassigned |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        scores = [
            f"{r[f'{key}_mean']:.3f} ± {r[f'{key}_std']:.3f}"
            for key in ("accuracy", "macro_f1", "ece", "unassigned_correct")
        ]
        scores.insert(3, f"{r['ece_pooled']:.3f}")
        lines.append(f"| {r['model']} | {len(r['folds'])} | " + " | ".join(scores) + " |")
    return "\n".join(lines)
