"""Figures of an annotated AnnData, as PNG files (and MLflow artifacts when a run is active).

- ``umap.png``: UMAP of the scBERT embedding (``obsm['X_scbert']``) coloured by predicted type and,
  when labels are given, by the true labels; titles carry the adjusted Rand index (paper Fig. 5d);
- ``confusion.png``: true labels x predicted types (Unassigned included), row-normalised
  (``metrics.confusion_matrix_png``);
- ``probability.png``: the top-class probability of each cell, with the Unassigned threshold;
- ``scores.json``: the ARI of a Leiden clustering of the embedding and of the raw expression
  against the labels, accuracy, and the cluster counts and resolutions behind them.

The clusterings are compared at the same number of clusters: for each representation the Leiden
resolution is the smallest on a grid that gives at least as many clusters as there are labels
(or the closer of it and the one below), so neither side wins by cutting finer.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from scbert.config import UNASSIGNED_THRESHOLD
from scbert_platform.data.preprocess import Preprocessing, normalised_values
from scbert_platform.infer.annotation import (
    CELL_TYPE,
    EMBEDDING,
    LEIDEN,
    PROBABILITY,
    UMAP,
    UNS,
    AnnotationError,
    embedding_neighbors,
    expression_input,
    leiden,
)

RESOLUTIONS = tuple(round(0.1 * i, 1) for i in range(1, 31))  # 0.1 .. 3.0


def log_to_mlflow(paths: list[Path], artifact_path: str = "plots") -> bool:
    """Log the files to the active MLflow run, if there is one, or to the run named by
    ``MLFLOW_RUN_ID`` (how a command-line call joins a run). True when logged."""
    named = os.environ.get("MLFLOW_RUN_ID")
    if "mlflow" not in sys.modules and not named:  # never imported: no run can be active
        return False
    import mlflow

    if mlflow.active_run() is None and not named:
        return False
    from scbert_platform.track.runs import tracking_uri

    if mlflow.active_run() is None:
        mlflow.set_tracking_uri(tracking_uri())
        with mlflow.start_run(run_id=named):
            for path in paths:
                mlflow.log_artifact(str(path), artifact_path=artifact_path)
        return True
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
    return True


def _labels(adata: Any, label_key: str | None) -> Any:
    if label_key is None:
        return None
    if label_key not in adata.obs:
        raise AnnotationError(
            f"no obs column {label_key!r} for the true labels; columns: {list(adata.obs.columns)}"
        )
    return adata.obs[label_key].astype(str).where(adata.obs[label_key].notna())


def _need(adata: Any, *keys: str) -> None:
    missing = [k for k in keys if k not in adata.obs and k not in adata.obsm]
    if missing:
        raise AnnotationError(
            f"{missing} missing: run scbert_platform.infer.annotation.annotate first"
        )


# ---------------------------------------------------------------------------------------------
# Clustering agreement (paper Fig. 5d)


def cluster_matched(
    adata: Any, *, neighbors_key: str, n_target: int, key_added: str
) -> dict[str, Any]:
    """Leiden on a neighbour graph at the grid resolution whose cluster count is nearest
    ``n_target`` (the smaller resolution on a tie); the labels land in ``obs[key_added]``."""
    best: tuple[int, float] | None = None
    for resolution in RESOLUTIONS:
        leiden(adata, resolution=resolution, neighbors_key=neighbors_key, key_added=key_added)
        n = int(adata.obs[key_added].nunique())
        if best is None or abs(n - n_target) < abs(best[0] - n_target):
            best = (n, resolution)
        if n >= n_target:
            break
    assert best is not None
    leiden(adata, resolution=best[1], neighbors_key=neighbors_key, key_added=key_added)
    return {"n_clusters": best[0], "resolution": best[1]}


def annotated_preprocessing(adata: Any) -> Preprocessing:
    """The model's preprocessing record as annotate stored it in ``uns['scbert']`` (the published
    values for an AnnData annotated before the record was stored)."""
    stored = dict(adata.uns.get(UNS, {}).get("preprocessing", {}))
    return Preprocessing.from_dict(Preprocessing.published().to_dict() | stored)


def expression_view(adata: Any, *, preprocessing: Preprocessing, **input_options: Any) -> Any:
    """An AnnData of the input's expression as the model's ``preprocessing`` leaves it before
    binning (every input gene, ``normalize_total`` to its target_sum, ``log2(1 + x)``), with 50
    PCs: the raw-expression side of the comparison."""
    import anndata
    import scanpy as sc

    from scbert_platform.infer.annotation import row_reader

    found, matrix = expression_input(adata, **input_options)
    with row_reader(found, matrix) as read:
        counts = found.counts(read(0, found.n_cells), 0, found.n_cells)
    view = anndata.AnnData(normalised_values(counts, preprocessing))
    view.obs_names = list(found.cell_ids)
    sc.pp.pca(view, n_comps=min(50, view.n_vars - 1, view.n_obs - 1), random_state=0)
    sc.pp.neighbors(view, use_rep="X_pca", random_state=0)
    return view


def clustering_scores(adata: Any, label_key: str, **input_options: Any) -> dict[str, Any]:
    """ARI against ``label_key`` of a Leiden clustering of the scBERT embedding and of the raw
    expression (PCA of the normalised log expression), at matched cluster counts. Adds
    ``obs['scbert_leiden']`` (the embedding's clusters)."""
    from sklearn.metrics import adjusted_rand_score

    _need(adata, EMBEDDING)
    labels = _labels(adata, label_key)
    known = labels.notna().to_numpy()
    n_labels = int(labels[known].nunique())
    scores: dict[str, Any] = {
        "label_key": label_key,
        "n_labels": n_labels,
        "n_cells": int(known.sum()),
    }
    embedding = cluster_matched(
        adata, neighbors_key=embedding_neighbors(adata), n_target=n_labels, key_added=LEIDEN
    )
    embedding["ari"] = float(adjusted_rand_score(labels[known], adata.obs[LEIDEN][known]))
    view = expression_view(adata, preprocessing=annotated_preprocessing(adata), **input_options)
    expression = cluster_matched(
        view, neighbors_key="neighbors", n_target=n_labels, key_added="leiden"
    )
    expression["ari"] = float(adjusted_rand_score(labels[known], view.obs["leiden"][known]))
    scores["embedding"], scores["expression"] = embedding, expression
    if CELL_TYPE in adata.obs:
        predicted = adata.obs[CELL_TYPE].astype(str)[known]
        scores["accuracy"] = float((predicted == labels[known]).mean())
        scores["ari_predicted"] = float(adjusted_rand_score(labels[known], predicted))
    return scores


# ---------------------------------------------------------------------------------------------
# Figures


def _palette(categories: list[str]) -> dict[str, Any]:
    """One colour per category name, shared by the predicted and the true panels."""
    import matplotlib as mpl

    colours = [*mpl.colormaps["tab20"].colors, *mpl.colormaps["tab20b"].colors]
    palette = {c: colours[i % len(colours)] for i, c in enumerate(sorted(categories))}
    palette["Unassigned"] = (0.75, 0.75, 0.75)
    return palette


def umap_figure(
    adata: Any,
    path: str | Path,
    *,
    label_key: str | None = None,
    scores: dict[str, Any] | None = None,
) -> Path:
    """UMAP of the embedding (computed once, kept in ``obsm['X_scbert_umap']``), coloured by
    predicted type and by ``label_key``; the ARIs in the titles when ``scores`` are given."""
    import matplotlib.pyplot as plt
    import scanpy as sc
    from matplotlib.colors import to_hex

    _need(adata, EMBEDDING, CELL_TYPE)
    if UMAP not in adata.obsm:
        sc.tl.umap(adata, neighbors_key=embedding_neighbors(adata), key_added=UMAP, random_state=0)
    keys = [CELL_TYPE] + ([label_key] if label_key else [])
    names = {str(v) for k in keys for v in adata.obs[k].dropna().unique()}
    palette = _palette(sorted(names))
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 5.2), squeeze=False)
    titles = ["scBERT prediction"]
    if label_key:
        titles.append(f"true labels ({label_key})")
    if scores:
        titles[0] += (
            f"\nARI of predictions vs labels {scores.get('ari_predicted', float('nan')):.3f}"
        )
        if label_key:
            titles[1] += (
                f"\nLeiden ARI: embedding {scores['embedding']['ari']:.3f}, "
                f"raw expression {scores['expression']['ari']:.3f}"
            )
    for ax, key, title in zip(axes[0], keys, titles, strict=True):
        sc.pl.embedding(
            adata,
            basis=UMAP,
            color=key,
            palette=[
                to_hex(palette[str(c)]) for c in adata.obs[key].astype("category").cat.categories
            ],
            ax=ax,
            show=False,
            title=title,
            legend_fontsize=7,
            size=18,
            frameon=False,
        )
    fig.tight_layout()
    return save_figure(fig, path)


def confusion_figure(adata: Any, path: str | Path, *, label_key: str) -> Path:
    """True labels (rows) x predicted types (columns, Unassigned last), each row normalised,
    accuracy in the title: ``metrics.confusion_matrix_png``, as for the training test report."""
    import pandas as pd

    from scbert import UNASSIGNED
    from scbert_platform.train.metrics import confusion_matrix_png

    _need(adata, CELL_TYPE)
    labels = _labels(adata, label_key)
    known = labels.notna().to_numpy()
    true, predicted = labels[known], adata.obs[CELL_TYPE].astype(str)[known]
    classes = sorted(set(true) | (set(predicted) - {UNASSIGNED}))
    table = pd.crosstab(true, predicted)
    unassigned = table.get(UNASSIGNED, pd.Series(0, index=table.index))
    square = table.reindex(index=classes, columns=classes, fill_value=0)
    accuracy = float((true.to_numpy() == predicted.to_numpy()).mean())
    return confusion_matrix_png(
        square.to_numpy(),
        classes,
        path,
        title=f"{label_key} vs scBERT: accuracy {accuracy:.3f}",
        unassigned=unassigned.reindex(classes, fill_value=0).astype(int).tolist(),
    )


def probability_figure(
    adata: Any, path: str | Path, *, threshold: float | None = None, label_key: str | None = None
) -> Path:
    """Histogram of the top-class probability, the Unassigned threshold as a line; with labels,
    stacked by whether the most probable class is right."""
    import matplotlib.pyplot as plt

    _need(adata, PROBABILITY)
    threshold = (
        threshold
        if threshold is not None
        else adata.uns.get(UNS, {}).get("threshold", UNASSIGNED_THRESHOLD)
    )
    probability = adata.obs[PROBABILITY].to_numpy()
    bins = np.linspace(0, 1, 41)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if label_key:
        labels = _labels(adata, label_key)
        proba = adata.obsm.get("scbert_proba")
        classes = np.asarray(adata.uns[UNS]["classes"])
        right = (classes[proba.argmax(axis=1)] == labels.to_numpy()) & labels.notna().to_numpy()
        ax.hist(
            [probability[right], probability[~right]],
            bins=bins,
            stacked=True,
            color=["#4c72b0", "#dd8452"],
            label=["most probable type right", "wrong (or no label)"],
        )
    else:
        ax.hist(probability, bins=bins, color="#4c72b0", label="cells")
    below = int((probability < threshold).sum())
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
    ax.axvspan(0, threshold, color="grey", alpha=0.12)
    ax.text(
        threshold, ax.get_ylim()[1] * 0.95, f"  threshold {threshold:g}: {below} Unassigned",
        fontsize=8, va="top",
    )  # fmt: skip
    ax.set_xlabel("probability of the most probable type")
    ax.set_ylabel("cells")
    ax.set_title(f"scBERT confidence ({len(probability)} cells)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path`` (folders made), then closed; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(
    adata: Any, out: str | Path, *, label_key: str | None = None, **input_options: Any
) -> dict[str, Any]:
    """UMAP, probability histogram and, with ``label_key``, the confusion matrix and the ARI
    scores, under ``out``; logged to the active MLflow run, if any. Returns the scores (with
    the figure paths under ``files``); ``input_options`` choose the matrix as for annotate."""
    out = Path(out)
    scores: dict[str, Any] = {}
    if label_key:
        scores = clustering_scores(adata, label_key, **input_options)
    files = [umap_figure(adata, out / "umap.png", label_key=label_key, scores=scores or None)]
    files.append(probability_figure(adata, out / "probability.png", label_key=label_key))
    if label_key:
        files.append(confusion_figure(adata, out / "confusion.png", label_key=label_key))
        (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        files.append(out / "scores.json")
    scores["files"] = [str(f) for f in files]
    scores["logged_to_mlflow"] = log_to_mlflow(files)
    return scores
