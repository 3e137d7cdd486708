"""Evaluation metrics: cell-type annotation reports and masked-token accuracy for pretraining.

Class ids index ``labels`` (the checkpoint's label vocabulary). A prediction of
``UNASSIGNED_ID`` (-1) is the paper's ``Unassigned`` (``scbert.UNASSIGNED``: highest class
probability under the threshold): it is wrong for accuracy and is a false negative of the cell's
true class, a false positive of none. The report is plain Python (JSON-ready for
``mlflow.log_dict``); scikit-learn does the arithmetic.

Macro F1 averages over the classes present in this split (in ``y_true`` or predicted): a class
absent from a fold would otherwise add an F1 of 0 for cells that do not exist. Per-class rows and
the confusion matrix still cover every class of ``labels``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn import metrics as skm

from scbert import IGNORE_INDEX, UNASSIGNED

UNASSIGNED_ID = -1  # predicted id of a cell left unassigned (named UNASSIGNED)


def _class_ids(
    values: ArrayLike | torch.Tensor, name: str, n_classes: int, *, allow_unassigned: bool
) -> np.ndarray:
    ids = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(
            f"{name} must be a 1-d array of integer class ids, got {ids.dtype} {ids.shape}"
        )
    low = UNASSIGNED_ID if allow_unassigned else 0
    bad = np.unique(ids[(ids < low) | (ids >= n_classes)])
    if bad.size:
        allowed = f"{low}..{n_classes - 1}" + (" (-1 = unassigned)" if allow_unassigned else "")
        raise ValueError(f"{name} holds ids {bad[:10].tolist()} outside {allowed}")
    return ids.astype(np.int64)


def classification_report(
    y_true: ArrayLike | torch.Tensor, y_pred: ArrayLike | torch.Tensor, labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro and weighted F1, per-class scores and the confusion matrix of one split.

    ``y_true``: (n,) class ids in ``0..len(labels)-1``; ``y_pred``: (n,) the same, or -1 for
    unassigned. Keys: ``n``, ``n_unassigned``, ``accuracy``, ``macro_f1``, ``weighted_f1``,
    ``labels``, ``per_class`` (class name -> ``precision``, ``recall``, ``f1``, ``support``),
    ``confusion_matrix`` (rows true, columns predicted, every class of ``labels``) and
    ``unassigned_per_class`` (per true class; each row of the matrix plus it sums to the support).
    """
    labels = list(labels)
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be non-empty and unique, got {labels[:20]}")
    n_classes = len(labels)
    true = _class_ids(y_true, "y_true", n_classes, allow_unassigned=False)
    pred = _class_ids(y_pred, "y_pred", n_classes, allow_unassigned=True)
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} cells but y_pred has {pred.size}")
    if true.size == 0:
        raise ValueError("no cells to evaluate (y_true is empty)")

    all_ids = list(range(n_classes))
    present = sorted(set(true.tolist()) | (set(pred.tolist()) - {UNASSIGNED_ID}))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        true, pred, labels=all_ids, average=None, zero_division=0
    )
    scores = {"labels": present, "zero_division": 0}
    return {
        "n": int(true.size),
        "n_unassigned": int((pred == UNASSIGNED_ID).sum()),
        "accuracy": float(skm.accuracy_score(true, pred)),
        "macro_f1": float(skm.f1_score(true, pred, average="macro", **scores)),
        "weighted_f1": float(skm.f1_score(true, pred, average="weighted", **scores)),
        "labels": labels,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion_matrix": skm.confusion_matrix(true, pred, labels=all_ids).tolist(),
        "unassigned_per_class": np.bincount(
            true[pred == UNASSIGNED_ID], minlength=n_classes
        ).tolist(),
    }


@torch.no_grad()
def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the cells' |accuracy - confidence| per equal-width confidence bin, weighted by the
    bin's share of cells (top-class probability; cells with label -1 skipped)."""
    bins = reliability_bins(proba, y_true, n_bins)
    total = sum(b["n"] for b in bins)
    if total == 0:
        return float("nan")
    return float(sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / total)


def reliability_bins(
    proba: np.ndarray, y_true: np.ndarray, n_bins: int = 10
) -> list[dict[str, float]]:
    """Per confidence bin: its range, cells, mean confidence and accuracy (the reliability
    diagram's points)."""
    known = np.asarray(y_true) >= 0
    proba, y_true = np.asarray(proba)[known], np.asarray(y_true)[known]
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_true
    which = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        in_bin = which == b
        if in_bin.any():
            out.append(
                {
                    "low": b / n_bins,
                    "high": (b + 1) / n_bins,
                    "n": int(in_bin.sum()),
                    "confidence": float(confidence[in_bin].mean()),
                    "accuracy": float(correct[in_bin].mean()),
                }
            )
    return out


def mean_std(folds: list[dict[str, Any]], keys: Iterable[str]) -> dict[str, float]:
    """``{key}_mean`` and ``{key}_std`` (ddof 1; 0 for one value) over the folds' records, NaNs
    left out (NaN when all are)."""
    out = {}
    for key in keys:
        values = np.array([f[key] for f in folds], dtype=float)
        values = values[~np.isnan(values)]
        out[f"{key}_mean"] = float(values.mean()) if values.size else float("nan")
        out[f"{key}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return out


def mean_per_class_f1(reports: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Each class's F1 averaged over the reports (folds) that test it (support > 0); a class no
    fold tests is left out."""
    scores: dict[str, list[float]] = {}
    for report in reports:
        for label, row in report["per_class"].items():
            if row["support"] > 0:
                scores.setdefault(label, []).append(row["f1"])
    return {label: float(np.mean(values)) for label, values in scores.items()}


def selective_scores(proba: np.ndarray, y_true: np.ndarray, threshold: float) -> dict[str, float]:
    """At ``threshold`` (a cell is Unassigned below it): the share of cells kept, accuracy on the
    kept cells, and the Unassigned rate among the cells the top class gets right and wrong."""
    known = np.asarray(y_true) >= 0
    proba, y_true = np.asarray(proba)[known], np.asarray(y_true)[known]
    kept = proba.max(axis=1) >= threshold
    correct = proba.argmax(axis=1) == y_true

    def share(mask: np.ndarray, of: np.ndarray) -> float:
        return float(mask[of].mean()) if of.any() else float("nan")

    return {
        "kept": float(kept.mean()) if len(kept) else float("nan"),
        "accuracy_kept": share(correct, kept),
        "unassigned_correct": share(~kept, correct),
        "unassigned_wrong": share(~kept, ~correct),
    }


def reliability_png(
    curves: dict[str, list[dict[str, float]]], path: str | Path, *, title: str
) -> Path:
    """A reliability diagram: accuracy against confidence per bin, one line per curve (e.g.
    before and after calibration), the diagonal for reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    for name, points in curves.items():
        ax.plot(
            [p["confidence"] for p in points],
            [p["accuracy"] for p in points],
            marker="o",
            label=name,
        )
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", title=title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def masked_token_counts(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[int, int]:
    """How many masked positions have the original token as their most likely one, and how many
    masked positions there are: sums over batches give the accuracy of them all.

    ``logits``: (b, n, vocab); ``labels``: (b, n), ``ignore_index`` where the position was not
    chosen for masking.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} plus a vocab axis"
        )
    chosen = labels != ignore_index  # (b, n)
    correct = (logits.argmax(dim=-1) == labels) & chosen
    return int(correct.sum().item()), int(chosen.sum().item())


def masked_token_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[float, int]:
    """Share of masked positions whose most likely token is the original one, and their count
    (``masked_token_counts``). With nothing counted the accuracy is 0.0, so that summing
    ``accuracy * n_counted`` over batches and dividing by the summed counts stays right.
    """
    n_correct, n_counted = masked_token_counts(logits, labels, ignore_index)
    return (n_correct / n_counted if n_counted else 0.0), n_counted


def confusion_matrix_png(
    matrix: ArrayLike,
    labels: Sequence[str],
    path: str | Path,
    *,
    normalize: bool = True,
    title: str = "Confusion matrix",
    unassigned: Sequence[int] | None = None,
) -> Path:
    """Draw a (true x predicted) count matrix to a PNG at ``path``; returns the path.

    ``normalize`` divides each row by its true-class total (rows of absent classes stay 0) and
    annotates the shares, otherwise the counts. ``unassigned`` (per true class, e.g. the report's
    ``unassigned_per_class``) adds an ``Unassigned`` column. Uses matplotlib's object API with
    the Agg canvas, never pyplot: no window, and the caller's backend (a notebook's) is untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(labels)
    values, columns = _plotted_values(matrix, labels, normalize=normalize, unassigned=unassigned)
    side = min(3.0 + 0.45 * len(columns), 40.0)  # inches: about 0.45 in per class
    cell_pt = 72.0 * (side - 3.0) / len(columns)  # 32 pt until the size cap (> 82 columns)
    font = max(3.0, min(10.0, 0.3 * cell_pt))
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of true class" if normalize else "cells")
    _annotate(ax, values, normalize=normalize, font=font)
    rotate = max(len(name) for name in columns) > 3  # long names would overlap
    ax.set_xticks(
        range(len(columns)),
        columns,
        fontsize=font,
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
        rotation_mode="anchor",
    )
    ax.set_yticks(range(len(labels)), labels, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (row-normalised)" if normalize else title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _plotted_values(
    matrix: ArrayLike,
    labels: list[str],
    *,
    normalize: bool,
    unassigned: Sequence[int] | None,
) -> tuple[np.ndarray, list[str]]:
    """(n_classes, n_columns) values to draw and the column names."""
    counts = np.asarray(matrix, dtype=np.float64)
    n_classes = len(labels)
    if n_classes == 0 or counts.shape != (n_classes, n_classes):
        raise ValueError(
            f"matrix is {counts.shape}, expected ({n_classes}, {n_classes}) for the labels"
        )
    columns = labels
    if unassigned is not None:
        if len(unassigned) != n_classes:
            raise ValueError(f"unassigned has {len(unassigned)} counts, expected {n_classes}")
        counts = np.column_stack([counts, np.asarray(unassigned, dtype=np.float64)])
        columns = [*labels, UNASSIGNED]
    if not normalize:
        return counts, columns
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0), columns


def _annotate(ax: Any, values: np.ndarray, *, normalize: bool, font: float) -> None:
    """Write each non-zero cell's value; white on dark cells."""
    top = values.max() if values.size and values.max() > 0 else 1.0
    for (row, col), value in np.ndenumerate(values):
        if value == 0:
            continue
        text = f"{value:.2f}" if normalize else f"{int(value)}"
        color = "white" if value / top > 0.6 else "black"
        ax.text(col, row, text, ha="center", va="center", fontsize=font * 0.7, color=color)


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per class, then the overall line."""
    lines = ["| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, row in report["per_class"].items():
        cell = str(name).replace("|", "\\|")
        lines.append(
            f"| {cell} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} "
            f"| {row['support']:,} |"
        )
    lines.append("")
    lines.append(
        f"accuracy {report['accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}, "
        f"weighted F1 {report['weighted_f1']:.4f} over {report['n']:,} cells "
        f"({report['n_unassigned']:,} unassigned)"
    )
    return "\n".join(lines) + "\n"
