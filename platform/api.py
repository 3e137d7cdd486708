"""The notebook API in one import, for scanpy users: ``import scbert_platform.api as sb``.

    import scanpy as sc
    import scbert_platform.api as sb

    model = sb.load_model("models:/scbert-pbmc68k@champion")  # or a checkpoint directory
    adata = sc.read_h5ad("cells.h5ad")                         # raw counts in .X
    sb.annotate(adata, model)              # obs: scbert_cell_type, ...; obsm: X_scbert
    sb.plot(adata, "figures", label_key="cell_type")
    genes = sb.explain(adata, model, groupby="cell_type").genes()  # top genes per type

``model`` is always named: a registry reference (``models:/NAME@ALIAS``, ``models:/NAME/3``),
a directory (a checkpoint, or an MLflow model), or a ``LoadedModel`` from ``load_model`` (load
once, use many times). Where the expression sits in the AnnData, and what it is, is one
``Expression`` value shared by every function (``expression=sb.Expression(layer="counts")``).
Each function here is the one the CLI verb of the same name runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from scbert_platform.infer.models import LoadedModel
from scbert_platform.params import AnnotateParams, DataParams, ExplainParams

__all__ = [
    "Expression",
    "LoadedModel",
    "annotate",
    "embed",
    "explain",
    "ingest",
    "load_model",
    "plot",
]


@dataclass(frozen=True)
class Expression:
    """Where an AnnData's expression is and what it holds.

    ``layer``: a layer instead of ``.X``; ``use_raw``: ``.raw`` (None: ``.raw`` when ``.X`` is
    not counts and ``.raw`` is); ``input``: ``auto`` (detected), ``counts`` or ``log1p`` (log of
    normalised counts, inverted to counts first); ``gene_id_column``: a ``var`` column holding
    the model's gene ids (e.g. Ensembl ids) instead of ``var_names``."""

    layer: str | None = None
    use_raw: bool | None = None
    input: str = "auto"
    gene_id_column: str | None = None

    def options(self) -> dict[str, Any]:
        """As the keyword arguments of ``scbert_platform.infer.annotation``'s functions."""
        return {
            "layer": self.layer,
            "use_raw": self.use_raw,
            "input": self.input,
            "gene_id_column": self.gene_id_column,
        }


COUNTS = Expression()
ANNOTATE = AnnotateParams()  # the defaults of annotate and embed (the annotate params section)
EXPLAIN = ExplainParams()  # the defaults of explain (the explain params section)


def load_model(model: str | Path | LoadedModel, *, device: str = "auto") -> LoadedModel:
    """A fine-tuned model with its panel, class names and preprocessing record, ready for the
    other functions; ``device``: ``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    return LoadedModel.load(_model(model), device=device)


def annotate(
    adata: Any,
    model: str | Path | LoadedModel,
    *,
    threshold: float = ANNOTATE.threshold,
    expression: Expression = COUNTS,
    majority_vote: bool = ANNOTATE.majority_vote,
    over_clustering: str | None = None,
    embedding: str = ANNOTATE.embedding,
    device: str = "auto",
    batch_size: int = ANNOTATE.batch_size,
    chunk_cells: int = ANNOTATE.chunk_cells,
    distributed: bool = False,
    progress: bool = True,
    copy: bool = False,
) -> Any:
    """Cell types (``Unassigned`` below ``threshold``), probabilities and the embedding, written
    into ``adata`` (or a copy); ``majority_vote``: also the majority type per Leiden cluster
    (``over_clustering``: an obs column of clusters to vote in instead). ``distributed``: on
    Ray workers. Returns the AnnData."""
    from scbert_platform.infer.annotation import annotate as run

    return run(
        adata,
        _model(model),
        threshold=threshold,
        majority_vote=majority_vote,
        over_clustering=over_clustering,
        embedding=embedding,
        device=device,
        batch_size=batch_size,
        chunk_cells=chunk_cells,
        distributed=distributed,
        progress=progress,
        copy=copy,
        **expression.options(),
    )


def embed(
    adata: Any,
    model: str | Path | LoadedModel,
    *,
    expression: Expression = COUNTS,
    embedding: str = ANNOTATE.embedding,
    device: str = "auto",
    batch_size: int = ANNOTATE.batch_size,
    progress: bool = True,
) -> Any:
    """Cell embeddings only (``obsm['X_scbert']``); a pretraining checkpoint works too."""
    from scbert_platform.infer.annotation import embed as run

    return run(
        adata,
        _model(model),
        embedding=embedding,
        device=device,
        batch_size=batch_size,
        progress=progress,
        **expression.options(),
    )


def explain(
    adata: Any,
    model: str | Path | LoadedModel,
    *,
    groupby: str | None = None,
    top_n: int = EXPLAIN.top_n,
    rank_by: str = EXPLAIN.rank_by,
    expression: Expression = COUNTS,
    device: str = "auto",
    progress: bool = True,
) -> Any:
    """The genes scBERT attends to per group (``groupby``: an obs column; default the annotated
    types): an ``Explanation`` (``.genes()``: each group's top genes; ``.top``: the table)."""
    from scbert_platform.infer.explanation import explain as run

    return run(
        adata,
        _model(model),
        groupby=groupby,
        top_n=top_n,
        rank_by=rank_by,
        device=device,
        progress=progress,
        **expression.options(),
    )


def plot(
    adata: Any,
    out: str | Path,
    *,
    label_key: str | None = None,
    expression: Expression = COUNTS,
) -> dict[str, Any]:
    """UMAP, probability histogram and, with ``label_key`` (expert labels), the confusion matrix
    and the clustering scores of an annotated AnnData, as files under ``out``."""
    from scbert_platform.infer.plots import write_plots

    return write_plots(adata, out, label_key=label_key, **expression.options())


def ingest(source: str | Path, out: str | Path, *, overwrite: bool = False, **data: Any) -> Any:
    """An ``.h5ad`` (or 10x/loom/csv) into Parquet cell shards for training; ``data``: any field
    of the ``data`` params section (``label_key="cell_type"``, ``min_genes=200``, ...)."""
    from scbert_platform.data.ingest import ingest as run

    known = {f.name for f in fields(DataParams)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TypeError(f"unknown data parameters {unknown}; known: {sorted(known)}")
    return run(source, out, DataParams(**data), overwrite=overwrite)


def _model(model: str | Path | LoadedModel) -> Any:
    return model if isinstance(model, LoadedModel) else str(model)
