"""The fine-tuned model as an MLflow pyfunc: raw counts in, cell types and probabilities out.

Input: a pandas DataFrame of raw counts, one row per cell and one column per panel gene (the
logged signature lists them; the model's ``panel.txt`` artifact too), or an AnnData with raw
counts in ``.X`` and any genes (through ``unwrap_python_model().predict``: MLflow's schema
checks take DataFrames only; panel genes missing from the AnnData count as 0).
The counts go through the same functions as ``scbert ingest`` (``scbert_platform.data.preprocess``):
panel alignment, ``normalize_total``, ``log2(1 + x)`` and binning, with the values of the
model's preprocessing record (``preprocessing.json`` in the checkpoint artifact; the published
values, with a warning, for a checkpoint without one).
Output: a DataFrame with ``cell_type`` (``Unassigned`` when the top probability is below the
threshold, paper: 0.5), ``probability`` and one ``p_<class>`` column per class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scbert.config import CELL_EMBEDDINGS, UNASSIGNED_THRESHOLD
from scbert_platform.data.errors import IngestError
from scbert_platform.data.panel import Panel
from scbert_platform.data.preprocess import (
    Preprocessing,
    align,
    as_counts_matrix,
    cell_namer,
    check_counts,
    raised_as,
    tokens_from_counts,
)

CHECKPOINT = "checkpoint"


SERVING_HINTS = {
    "finite": "counts must be finite numbers",
    "negative": "send raw counts, not scaled or batch-corrected values",
    "integer": "send raw integer counts (UMI or read counts), not normalised or log values",
}


def aligned_counts(
    counts: Any,
    genes: list[str],
    panel: list[str] | Panel,
    *,
    cell_ids: Any = None,
    hints: dict[str, str] = SERVING_HINTS,
) -> Any:
    """Raw counts (cells x ``genes``), checked by ingest's rules (finite, >= 0, integers), as a
    CSR matrix of cells x panel genes (genes outside the panel dropped, missing ones 0).
    Bad counts are an ``IngestError`` (a ``PreprocessError``), as Serve expects."""
    with raised_as(IngestError):
        matrix = as_counts_matrix(counts)
        check_counts(matrix, cell_namer(matrix, cell_ids), hints=hints)
        panel = panel if isinstance(panel, Panel) else Panel(tuple(panel))
        positions = panel.positions(genes)
        if not (positions >= 0).any():
            raise IngestError(
                f"none of the {len(genes)} input genes is in the model's panel of {len(panel)} "
                f"genes (it starts {', '.join(panel.genes[:3])}; symbols are matched exactly)"
            )
        return align(matrix, positions, len(panel))


def counts_to_tokens(
    counts: Any,
    genes: list[str],
    panel: list[str] | Panel,
    *,
    n_bins: int | None = None,
    target_sum: float = 1e4,
    preprocessing: Preprocessing | None = None,
) -> Any:
    """Raw counts (cells x ``genes``) -> model tokens (cells, len(panel) + 1), as ingest does:
    with ``preprocessing`` (the model's record), else with ``n_bins`` and ``target_sum``."""
    if preprocessing is None:
        if n_bins is None:
            raise TypeError("counts_to_tokens needs the model's preprocessing record or n_bins")
        preprocessing = Preprocessing(target_sum=target_sum, n_bins=n_bins)
    return tokens_from_counts(aligned_counts(counts, genes, panel), preprocessing)


EMBEDDINGS = CELL_EMBEDDINGS  # ScBert.predict's: encoder | classifier


def predict_tokens(
    model: Any,
    tokens: Any,
    *,
    chunk_cells: int = 64,
    device: Any = None,
    embedding: str = "encoder",
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (cells, n_classes) and cell embeddings from one encoder pass,
    ``chunk_cells`` cells at a time (on CPU 32-64 is fastest per cell; bench/RESULTS.md), under
    bf16 autocast on a CUDA device. ``embedding``: ``encoder`` = the mean encoding over the gene
    positions (cells, dim), as ``ScBert.embed_cells``; ``classifier`` = the cell-type head's last
    hidden layer (cells, 128). A pretraining checkpoint (no cell-type head) gives probabilities
    of shape (cells, 0) and only the encoder embedding."""
    import torch

    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    device = torch.device(device) if device is not None else model.token_emb.weight.device
    if embedding == "classifier" and model.config.n_classes is None:
        raise ValueError("the classifier embedding needs a fine-tuned model (a cell-type head)")
    probas, embeddings = [], []
    with (
        torch.inference_mode(),
        torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"),
    ):
        for chunk in tokens.split(chunk_cells):
            proba, cells = model.predict(chunk.to(device, non_blocking=True), embedding=embedding)
            probas.append(proba.float().cpu())
            embeddings.append(cells.float().cpu())
    if not probas:
        return np.zeros((0, model.config.n_classes or 0)), np.zeros((0, model.config.dim))
    return torch.cat(probas).numpy(), torch.cat(embeddings).numpy()


def cell_types(proba: np.ndarray, classes: list[str], threshold: float) -> list[str]:
    """The most probable class of each cell, or Unassigned below ``threshold`` (the paper's rule,
    ``scbert.assign_cell_types``) for a NumPy probability matrix."""
    import torch

    from scbert import assign_cell_types

    return assign_cell_types(torch.from_numpy(proba), classes, threshold=threshold)


class ScBertAnnotator:
    """An mlflow.pyfunc.PythonModel (subclassed at log time: importing this needs no MLflow)."""

    threshold = UNASSIGNED_THRESHOLD

    def load_context(self, context: Any) -> None:
        from scbert import load_pretrained
        from scbert_platform.data.preprocess import model_preprocessing

        directory = context.artifacts[CHECKPOINT]
        bundle = load_pretrained(directory)
        if bundle.classes is None:
            raise ValueError("the pyfunc needs a fine-tuned checkpoint (with labels.json)")
        self.model = bundle.model.eval()
        self.panel = bundle.panel
        self.classes = bundle.classes
        self.preprocessing, self.preprocessing_source = model_preprocessing(
            directory,
            n_bins=self.model.config.n_bins,
            panel_sha256=Panel(tuple(bundle.panel)).sha256,
        )

    # no type hints on the arguments: MLflow would try to derive a signature from them
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import pandas as pd

        if hasattr(model_input, "obs_names") and hasattr(model_input, "var_names"):  # AnnData
            counts, genes, index = model_input.X, list(model_input.var_names), model_input.obs_names
        else:
            frame = pd.DataFrame(model_input)
            counts, genes, index = (
                frame.to_numpy(dtype=np.float64),
                list(frame.columns),
                frame.index,
            )
        threshold = float((params or {}).get("threshold", self.threshold))
        tokens = counts_to_tokens(
            counts, [str(g) for g in genes], self.panel, preprocessing=self.preprocessing
        )
        proba, _ = predict_tokens(self.model, tokens)
        out = pd.DataFrame(
            {
                "cell_type": cell_types(proba, self.classes, threshold),
                "probability": proba.max(axis=1),
            },
            index=index,
        )
        for j, name in enumerate(self.classes):
            out[f"p_{name}"] = proba[:, j]
        return out


# What the pyfunc imports to load and predict (this platform's own distribution, then the
# packages its prediction path imports), pinned to the versions installed here
REQUIREMENTS = (
    "scbert-platform",
    "torch",
    "einops",
    "numpy",
    "safetensors",
    "pandas",
    "scipy",
    "scanpy",
    "anndata",
    "mlflow",
)


def model_requirements() -> list[str]:
    """``name==version`` of ``REQUIREMENTS`` as installed. Given to MLflow, which otherwise
    infers them by importing the model in a subprocess (several seconds per logged model)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")  # no local label (+cpu)
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def log_pyfunc(checkpoint: str | Path, example: Any, *, name: str = "annotator") -> str:
    """Log the checkpoint as an MLflow pyfunc in the active run, with a signature inferred
    from ``example`` (a small counts DataFrame) and the example itself. Returns the model URI."""
    import mlflow
    from mlflow.models import infer_signature

    class _Model(ScBertAnnotator, mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        pass

    # the example's answer from a loaded copy; MLflow pickles an unloaded one (the class by its
    # path, no state: the network and record are read from the artifact when the model loads)
    model, loaded = _Model(), _Model()
    loaded.load_context(type("Context", (), {"artifacts": {CHECKPOINT: str(checkpoint)}})())
    output = loaded.predict(None, example)
    from scbert_platform.console import quieter

    # MLflow warns on every call that a python_model object is saved with CloudPickle (loading
    # an untrusted pickle runs its code) and says it validates the input example: the model is
    # this package's own class, written and read by this platform only
    with quieter("mlflow.pyfunc"):
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=model,
            artifacts={CHECKPOINT: str(checkpoint)},
            signature=infer_signature(example, output, params={"threshold": UNASSIGNED_THRESHOLD}),
            input_example=example,
            code_paths=None,
            pip_requirements=model_requirements(),
        )
    return str(info.model_uri)


def example_counts(shards: str | Path, panel: list[str], n_cells: int = 2) -> Any:
    """A small counts DataFrame (cells x panel genes) rebuilt from the first shard's cells."""
    return shard_counts(shards, panel, n_cells=n_cells)[0]


def shard_counts(
    shards: str | Path, panel: list[str], *, n_cells: int | None = None
) -> tuple[Any, Any]:
    """Raw counts rebuilt from ingested shards: (cells x panel DataFrame, obs DataFrame with each
    cell's ``label`` and ``fold``);
    counts = (2**value - 1) * n_counts / target_sum rounded (the manifest's target_sum), the
    inverse of ingest's normalisation (exact for integer counts, so the model sees the same
    tokens as in training)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from scbert_platform.data.loader import shard_files
    from scbert_platform.data.manifest import read_manifest

    # the shards' target_sum and log base (binning plays no part in inverting them)
    record = Preprocessing.from_manifest(read_manifest(shards), n_bins=1)

    rows: list[dict[str, Any]] = []
    for path in shard_files(shards):
        rows += pq.read_table(path).to_pylist()
        if n_cells is not None and len(rows) >= n_cells:
            break
    rows = rows[:n_cells] if n_cells is not None else rows
    counts = np.zeros((len(rows), len(panel)))
    for row, cell in enumerate(rows):
        values = np.power(record.log_base, np.asarray(cell["value"], dtype=np.float64)) - 1
        counts[row, cell["gene_idx"]] = np.round(values * cell["n_counts"] / record.target_sum)
    index = [c["cell_id"] for c in rows]
    obs = pd.DataFrame(
        {"label": [c.get("label") for c in rows], "fold": [c.get("fold") for c in rows]},
        index=index,
    )
    return pd.DataFrame(counts, columns=panel, index=index), obs
