"""AnnData in, AnnData out: scBERT cell types, probabilities and embeddings for scanpy users.

``annotate(adata, model=...)`` writes

- ``obs['scbert_cell_type']`` (categorical; ``Unassigned`` when the top probability is below
  ``threshold``, the paper's novel-type rule), ``obs['scbert_probability']`` (the top class's
  probability), ``obs['scbert_unassigned']`` (bool);
- ``obsm['X_scbert']``: cell embeddings. ``embedding="classifier"`` (the default for a
  fine-tuned model): the cell-type head's last hidden layer (128-d), the space the classifier
  separates the types in; ``"encoder"`` (the default for a pretraining checkpoint in ``embed``):
  the mean encoding over the gene positions (``ScBert.embed_cells``, ``dim``-d, what the HTTP API
  returns). The classifier embedding usually clusters by cell type better (bench/RESULTS.md);
- ``obsm['scbert_proba']`` (every class's probability, columns in ``uns['scbert']['classes']``);
- ``uns['scbert']``: the model (name, version, alias, URI), panel size and sha256, the input
  (matrix, raw counts or log1p, genes matched), panel coverage, threshold and counts, and the
  model's preprocessing record with ``preprocessing_source`` (``model``, or ``published
  defaults`` for a checkpoint without ``preprocessing.json``);
- with ``majority_vote=True`` (or ``over_clustering`` given): ``obs['scbert_majority_vote']``,
  the most frequent prediction within each cluster of an over-clustering
  (``obs['scbert_over_clustering']``, Leiden on the embedding's neighbour graph, unless
  ``over_clustering`` names an obs column), as CellTypist does.

The expression goes through ingest's own functions (``scbert_platform.data.preprocess``): the
raw-count checks, the inversion of log-normalised input (and the recovery of integer counts where
it is exact), panel alignment by exact symbol (missing genes 0, unknown genes dropped),
``normalize_total`` to the model's ``target_sum``, ``log2(1 + x)`` and the model's binning.
Rows are read ``chunk_cells`` at a time, so a ``backed`` AnnData larger than memory streams from
its file; ``distributed=True`` spreads the chunks over Ray Data
``map_batches`` workers (the CPUs, or GPUs, of the Ray cluster).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from scbert_platform.data.panel import Panel
from scbert_platform.data.preprocess import (
    COUNT_RECOVERY_TOLERANCE,
    PreprocessError,
    Preprocessing,
    align,
    bin_tokens,
    count_scale_deviation,
    normalised_values,
    raised_as,
    read_expression,
    recover_counts,
)
from scbert_platform.data.readers import h5ad_rows
from scbert_platform.infer.models import LoadedModel, ModelSource
from scbert_platform.params import INPUTS, AnnotateParams, ParamsError

__all__ = ["AnnotationError", "LoadedModel", "annotate", "embed"]

CELL_TYPE = "scbert_cell_type"
PROBABILITY = "scbert_probability"
UNASSIGNED_FLAG = "scbert_unassigned"
MAJORITY_VOTE = "scbert_majority_vote"
OVER_CLUSTERING = "scbert_over_clustering"
EMBEDDING = "X_scbert"
PROBABILITIES = "scbert_proba"
UNS = "scbert"
NEIGHBORS = "scbert_neighbors"  # the embedding's neighbour graph (obsp scbert_neighbors_*)
UMAP = "X_scbert_umap"  # the embedding's UMAP (plots)
LEIDEN = "scbert_leiden"  # the embedding's clusters at the labels' count (plots)
ANNOTATE = AnnotateParams()  # annotate's and embed's defaults: the annotate params section
# values above this are not log1p of normalised counts (e^30 - 1 is 1e13)
MAX_LOG_VALUE = 30.0

ANNOTATE_HINTS = {
    "finite": "fix or drop those cells before annotating",
    "negative": "scaled or batch-corrected data cannot be annotated; pass raw counts or "
    "log-normalised values (e.g. use_raw=True, or layer='counts')",
    "integer": "input='counts' needs raw integer counts; log-normalised values are read with "
    "input='log1p' (or 'auto')",
    "looks_raw": "use input='counts' (or 'auto')",
}


class AnnotationError(PreprocessError):
    """Input that cannot be annotated; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------
# Reading the expression


@dataclass(frozen=True)
class ExpressionInput:
    """Which matrix of the AnnData is read, its genes, and how its values are turned to counts."""

    where: str  # "X", "raw" or "layers/<name>"
    genes: tuple[str, ...]
    cell_ids: tuple[str, ...]
    input: str  # "counts" or "log1p"
    log_base: float | None  # log1p base (None: e)
    file: str | None  # the .h5ad of a backed AnnData, read from disk chunk by chunk
    location: str  # the matrix's HDF5 path in that file

    @property
    def n_cells(self) -> int:
        return len(self.cell_ids)

    def counts(self, rows: Any, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start..stop`` (``rows``: their matrix), checked, log1p inverted, as CSR."""
        with raised_as(AnnotationError):
            return read_expression(
                rows,
                input=self.input,
                log_base=self.log_base,
                cell_ids=self.cell_ids[start:stop],
                where=f" in cells {start}..{stop - 1}",
                hints=ANNOTATE_HINTS,
            )


def expression_input(
    adata: Any,
    *,
    layer: str | None = None,
    use_raw: bool | None = None,
    input: str = "auto",
    gene_id_column: str | None = None,
) -> tuple[ExpressionInput, Any]:
    """The matrix to read (``layer``, ``.raw`` or ``.X``; ``use_raw=None`` picks ``.raw`` when
    ``.X`` holds negative, i.e. scaled, values and ``.raw`` exists) and what its values are
    (``input``: ``counts``, ``log1p`` or ``auto`` = integers are counts, other non-negative values
    log1p).
    Returns it with the in-memory matrix (None for a backed AnnData: read from the file)."""
    if input not in ("auto", *INPUTS):
        raise AnnotationError(f"input must be 'auto', 'counts' or 'log1p', got {input!r}")
    if layer and use_raw:
        raise AnnotationError("give either layer or use_raw=True, not both")
    backed = bool(getattr(adata, "isbacked", False))
    if layer:
        if layer not in adata.layers:
            raise AnnotationError(
                f"no layer {layer!r}; layers present: {list(adata.layers.keys())}"
            )
        where, var = f"layers/{layer}", adata.var
    elif use_raw is None:
        raw = adata.raw is not None and _has_negative(_sample(adata.X, backed))
        where, var = ("raw", adata.raw.var) if raw else ("X", adata.var)
    elif use_raw:
        if adata.raw is None:
            raise AnnotationError("use_raw=True, but the AnnData has no .raw")
        where, var = "raw", adata.raw.var
    else:
        where, var = "X", adata.var
    matrix = None if backed else _matrix(adata, where)
    location = where
    if backed and where == "raw":
        import h5py

        with h5py.File(adata.filename, "r") as f:
            location = "raw/X" if "raw/X" in f else "raw.X"
    if gene_id_column:
        if gene_id_column not in var.columns:
            raise AnnotationError(
                f"var has no column {gene_id_column!r}; columns: {list(var.columns)}"
            )
        genes = var[gene_id_column].astype(str).tolist()
    else:
        genes = var.index.astype(str).tolist()
    duplicated = sorted(g for g, n in Counter(genes).items() if n > 1)
    if duplicated:
        raise AnnotationError(
            f"{len(duplicated)} duplicated gene names (first: {duplicated[:3]}): make them "
            "unique (adata.var_names_make_unique()) or align by another var column (gene_id_column)"
        )
    sample = _sample(matrix if matrix is not None else _matrix(adata, where), False)
    log_info = adata.uns.get("log1p", {}) if hasattr(adata.uns, "get") else {}
    base = log_info.get("base") if isinstance(log_info, dict) else None
    found = ExpressionInput(
        where,
        tuple(genes),
        tuple(adata.obs_names.astype(str)),
        _detect_input(sample, input, where),
        None if base is None else float(base),
        str(adata.filename) if backed else None,
        location,
    )
    return found, matrix


def _matrix(adata: Any, where: str) -> Any:
    if where == "raw":
        return adata.raw.X
    if where.startswith("layers/"):
        return adata.layers[where.removeprefix("layers/")]
    return adata.X


def _sample(matrix: Any, backed: bool, n_rows: int = 500) -> sp.csr_matrix:
    """The first rows, as CSR (a backed matrix reads only those)."""
    rows = matrix[: min(n_rows, matrix.shape[0])]
    return sp.csr_matrix(rows.to_memory() if hasattr(rows, "to_memory") else rows, dtype=np.float64)


def _has_negative(sample: sp.csr_matrix) -> bool:
    return bool(sample.nnz and sample.data.min() < 0)


def _detect_input(sample: sp.csr_matrix, requested: str, where: str) -> str:
    """What the sampled values are (``counts`` or ``log1p``), given the ``input`` asked for."""
    values = sample.data[np.isfinite(sample.data)]
    if requested == "counts" or not values.size:
        return "counts"
    if values.min() < 0:
        raise AnnotationError(
            f"{where} holds negative values (scaled or batch-corrected data, e.g. after "
            "sc.pp.scale): annotate needs raw counts or log-normalised values; pass "
            "use_raw=True or layer='counts'"
        )
    integers = bool(np.all(values == np.round(values)))
    if requested == "log1p" and integers:
        raise AnnotationError(
            f"input='log1p', but every value of {where} is an integer (up to "
            f"{values.max():.0f}): they look like raw counts; {ANNOTATE_HINTS['looks_raw']}"
        )
    found = requested if requested != "auto" else "counts" if integers else "log1p"
    if found == "log1p" and values.max() > MAX_LOG_VALUE:
        raise AnnotationError(
            f"{where} holds non-integer values up to {values.max():.4g}: too large for log1p of "
            "normalised counts; looks like normalised counts without the log; pass the raw "
            "counts (layer=..., use_raw=True) or apply sc.pp.log1p first"
        )
    return found


@contextmanager
def row_reader(found: ExpressionInput, matrix: Any) -> Iterator[Callable[[int, int], Any]]:
    """``read(start, stop)``: rows of the in-memory matrix, or of the backed file from disk."""
    if matrix is not None:
        yield lambda start, stop: matrix[start:stop]
        return
    assert found.file is not None  # expression_input: no in-memory matrix means a backed file
    with h5ad_rows(found.file, found.location) as read:
        yield read


def chunk_ranges(n_cells: int, chunk_cells: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk_cells, n_cells)) for a in range(0, n_cells, chunk_cells)]


# ---------------------------------------------------------------------------------------------
# One chunk of cells: expression -> tokens -> probabilities and embeddings


@dataclass
class ChunkResult:
    index: np.ndarray  # the cells' row numbers
    proba: np.ndarray  # (cells, n_classes)
    embedding: np.ndarray  # (cells, dim)
    n_genes: np.ndarray  # expressed panel genes per cell
    recovered: bool  # integer counts recovered from log-normalised values


def chunk_tokens(
    found: ExpressionInput,
    read: Callable[[int, int], Any],
    start: int,
    stop: int,
    positions: np.ndarray,
    n_panel: int,
    preprocessing: Preprocessing | int,
) -> tuple[Any, sp.csr_matrix, bool]:
    """(model tokens, panel values, counts recovered?) of rows ``start..stop`` through
    ``scbert_platform.data.preprocess``: the count checks, log1p inversion, count recovery, panel
    alignment, then the values (log2(1 + normalised counts) of the panel genes, CSR: one stored
    value per expressed gene) and their tokens, with the model's ``preprocessing`` record (an
    int: the published values with that ``n_bins``)."""
    record = (
        preprocessing
        if isinstance(preprocessing, Preprocessing)
        else Preprocessing.published(n_bins=preprocessing)
    )
    x = found.counts(read(start, stop), start, stop)
    recovered = False
    if found.input == "log1p" and count_scale_deviation(x) <= COUNT_RECOVERY_TOLERANCE:
        x, recovered = recover_counts(x), True
    values = normalised_values(align(x, positions, n_panel), record)
    return bin_tokens(values, record.n_bins), values, recovered


def annotate_chunk(
    loaded: LoadedModel,
    found: ExpressionInput,
    read: Callable[[int, int], Any],
    start: int,
    stop: int,
    positions: np.ndarray,
    *,
    batch_size: int,
    embedding: str,
) -> ChunkResult:
    """Probabilities and embeddings of rows ``start..stop``."""
    from scbert_platform.track.pyfunc import predict_tokens

    tokens, values, recovered = chunk_tokens(
        found, read, start, stop, positions, len(loaded.panel), loaded.preprocessing
    )
    proba, cells = predict_tokens(
        loaded.model, tokens, chunk_cells=batch_size, device=loaded.device, embedding=embedding
    )
    index = np.arange(start, stop)
    return ChunkResult(index, proba, cells, np.diff(values.indptr), recovered)


# ---------------------------------------------------------------------------------------------
# The API


def embedding_kind(loaded: LoadedModel, requested: str) -> str:
    """``auto`` -> ``classifier`` for a fine-tuned model, ``encoder`` otherwise (``requested``:
    one of ``params.EMBEDDINGS``, checked by ``AnnotateParams``)."""
    if requested == "auto":
        return "classifier" if loaded.classes else "encoder"
    if requested == "classifier" and not loaded.classes:
        raise AnnotationError(
            "embedding='classifier' needs a fine-tuned model; a pretraining checkpoint "
            "gives embedding='encoder'"
        )
    return requested


def embedding_dim(loaded: LoadedModel, kind: str) -> int:
    """Width of the ``kind`` embedding of the model."""
    config = loaded.config
    return int(config.cls_hidden[1]) if kind == "classifier" else int(config.dim)


def annotate(
    adata: Any,
    model: Any,
    *,
    threshold: float = ANNOTATE.threshold,
    batch_size: int = ANNOTATE.batch_size,
    device: str = "auto",
    embedding: str = ANNOTATE.embedding,
    layer: str | None = None,
    use_raw: bool | None = None,
    input: str = "auto",
    gene_id_column: str | None = None,
    majority_vote: bool = ANNOTATE.majority_vote,
    over_clustering: str | None = None,
    min_prop: float = ANNOTATE.min_prop,
    chunk_cells: int = ANNOTATE.chunk_cells,
    distributed: bool = False,
    workers: int | None = None,
    progress: bool = True,
    copy: bool = False,
) -> Any:
    """Annotate ``adata``'s cells with a fine-tuned scBERT (see the module docstring for what is
    written where). Returns the AnnData (a copy with ``copy=True``, else ``adata`` itself).

    ``model``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, a checkpoint or MLflow model
    directory, or a ``LoadedModel``. ``batch_size``: cells per forward pass (the fastest
    size per device: bench/RESULTS.md). ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda``.
    ``distributed``: Ray Data ``map_batches`` over ``workers`` actors (default: one per GPU, or
    per two CPUs, of the Ray cluster; joins a running Ray, else starts a local one)."""
    _checked(
        threshold=threshold,
        batch_size=batch_size,
        chunk_cells=chunk_cells,
        embedding=embedding,
        majority_vote=majority_vote,
        min_prop=min_prop,
    )
    loaded = LoadedModel.load(model, device=device)
    adata = adata.copy() if copy and not getattr(adata, "isbacked", False) else adata
    proba = _encode(
        adata,
        loaded,
        embedding,
        {"layer": layer, "use_raw": use_raw, "input": input, "gene_id_column": gene_id_column},
        device=device,
        batch_size=batch_size,
        chunk_cells=chunk_cells,
        distributed=distributed,
        workers=workers,
        progress=progress,
    )
    write_annotation(adata, proba, loaded.classes or [], threshold)
    if majority_vote or over_clustering is not None:
        vote(adata, over_clustering=over_clustering, min_prop=min_prop)
    return adata


def embed(
    adata: Any,
    model: Any,
    *,
    batch_size: int = ANNOTATE.batch_size,
    device: str = "auto",
    embedding: str = ANNOTATE.embedding,
    layer: str | None = None,
    use_raw: bool | None = None,
    input: str = "auto",
    gene_id_column: str | None = None,
    chunk_cells: int = ANNOTATE.chunk_cells,
    distributed: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> Any:
    """Cell embeddings only (``obsm['X_scbert']`` and ``uns['scbert']``); a pretraining
    checkpoint works too (its embedding is the encoder's). Returns ``adata``."""
    _checked(batch_size=batch_size, chunk_cells=chunk_cells, embedding=embedding)
    _encode(
        adata,
        LoadedModel.load(model, device=device, fine_tuned=False),
        embedding,
        {"layer": layer, "use_raw": use_raw, "input": input, "gene_id_column": gene_id_column},
        device=device,
        batch_size=batch_size,
        chunk_cells=chunk_cells,
        distributed=distributed,
        workers=workers,
        progress=progress,
    )
    return adata


def _encode(
    adata: Any,
    loaded: LoadedModel,
    embedding: str,
    input_options: dict[str, Any],
    **run: Any,
) -> np.ndarray:
    """One pass of the model over the cells: writes ``obsm['X_scbert']``,
    ``obs['scbert_n_genes']`` and ``uns['scbert']``; returns the class probabilities."""
    kind = embedding_kind(loaded, embedding)
    found, matrix = expression_input(adata, **input_options)
    coverage = _coverage(found, loaded.panel)
    proba, cells, n_genes, recovered = run_chunks(loaded, found, matrix, embedding=kind, **run)
    _forget_derived(adata)
    adata.obsm[EMBEDDING] = cells
    adata.obs["scbert_n_genes"] = n_genes.astype(np.int32)
    adata.uns[UNS] = _summary(loaded, found, coverage, recovered, kind, n_genes)
    return proba


def _checked(**options: Any) -> AnnotateParams:
    """The options as the ``annotate`` params section, which checks them (an AnnotationError)."""
    try:
        return AnnotateParams(**options)
    except ParamsError as err:
        raise AnnotationError(str(err)) from None


def _coverage(found: ExpressionInput, panel: Panel) -> dict[str, Any]:
    positions = panel.positions(list(found.genes))
    matched = int((positions >= 0).sum())
    if matched == 0:
        raise AnnotationError(
            f"none of the {len(found.genes)} genes of {found.where} is in the model's panel of "
            f"{len(panel)} genes (it starts {', '.join(panel.genes[:3])}; symbols are matched "
            "exactly: are these Ensembl ids? pass gene_id_column= naming the symbols' var column)"
        )
    coverage = matched / len(panel)
    if coverage < 0.5:
        warnings.warn(
            f"only {matched} of the model's {len(panel)} panel genes ({coverage:.0%}) are in "
            f"{found.where}: the missing ones count as 0 and predictions may suffer",
            stacklevel=3,
        )
    return {
        "genes_in_input": len(found.genes),
        "genes_matched": matched,
        "panel_coverage": round(coverage, 4),
    }


def run_chunks(
    loaded: LoadedModel,
    found: ExpressionInput,
    matrix: Any,
    *,
    embedding: str,
    device: str = "auto",
    batch_size: int,
    chunk_cells: int,
    distributed: bool,
    workers: int | None,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(probabilities, embeddings, expressed panel genes per cell, counts recovered: "all" |
    "none" | "some") over every cell, chunk by chunk, here or on Ray Data workers."""
    if found.n_cells == 0:
        raise AnnotationError("the AnnData has no cells")
    from scbert_platform.console import progress as progress_bar

    ranges = chunk_ranges(found.n_cells, chunk_cells)
    chunks = (
        _distributed(loaded, found, matrix, ranges, batch_size, embedding, workers, device)
        if distributed
        else _local(loaded, found, matrix, ranges, batch_size, embedding)
    )
    n = found.n_cells
    proba = np.zeros((n, len(loaded.classes or [])), dtype=np.float32)
    cells = np.zeros((n, embedding_dim(loaded, embedding)), dtype=np.float32)
    n_genes = np.zeros(n, dtype=np.int32)
    done = np.zeros(n, dtype=bool)
    flags = set()
    with progress_bar(total=n, unit="cell", desc="annotate", disable=not progress) as bar:
        for chunk in chunks:
            proba[chunk.index], cells[chunk.index] = chunk.proba, chunk.embedding
            n_genes[chunk.index], done[chunk.index] = chunk.n_genes, True
            flags.add(chunk.recovered)
            bar.update(len(chunk.index))
    if not done.all():  # a lost chunk would leave zeros that look like results
        raise RuntimeError(f"{int((~done).sum())} cells were not annotated")
    recovered = "all" if flags == {True} else "some" if len(flags) > 1 else "none"
    return proba, cells, n_genes, recovered


def _local(
    loaded: LoadedModel,
    found: ExpressionInput,
    matrix: Any,
    ranges: list[tuple[int, int]],
    batch_size: int,
    embedding: str,
) -> Iterator[ChunkResult]:
    positions = loaded.panel.positions(list(found.genes))
    with row_reader(found, matrix) as read:
        for start, stop in ranges:
            yield annotate_chunk(
                loaded,
                found,
                read,
                start,
                stop,
                positions,
                batch_size=batch_size,
                embedding=embedding,
            )


class _ChunkWorker:
    """A Ray Data actor: loads the model once, then annotates the chunks it is given."""

    def __init__(
        self,
        source: ModelSource,
        found: ExpressionInput,
        matrix: Any,
        batch_size: int,
        embedding: str,
    ) -> None:
        import ray
        import torch

        torch.set_num_threads(1)
        self.loaded = LoadedModel.load(source, fine_tuned=False)
        self.found = found
        self.matrix = ray.get(matrix) if isinstance(matrix, ray.ObjectRef) else matrix
        self.batch_size, self.embedding = batch_size, embedding
        self.positions = self.loaded.panel.positions(list(found.genes))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The chunks' results, one row per cell. Bad input comes back as one row with index -1
        and the message in ``error``: Ray would keep only its text, and retrying cannot help."""
        parts = []
        try:
            with row_reader(self.found, self.matrix) as read:
                for start, stop in zip(batch["start"], batch["stop"], strict=True):
                    parts.append(
                        annotate_chunk(
                            self.loaded,
                            self.found,
                            read,
                            int(start),
                            int(stop),
                            self.positions,
                            batch_size=self.batch_size,
                            embedding=self.embedding,
                        )
                    )
        except PreprocessError as err:
            n_classes = len(self.loaded.classes or [])
            dim = embedding_dim(self.loaded, self.embedding)
            parts = [
                ChunkResult(
                    np.array([-1]), np.zeros((1, n_classes)), np.zeros((1, dim)), np.zeros(1), False
                )
            ]
            message = str(err)
        else:
            message = ""
        n = sum(len(p.index) for p in parts)
        return {
            "index": np.concatenate([p.index for p in parts]),
            "proba": np.concatenate([p.proba for p in parts]).astype(np.float32),
            "embedding": np.concatenate([p.embedding for p in parts]).astype(np.float32),
            "n_genes": np.concatenate([p.n_genes for p in parts]).astype(np.int32),
            "recovered": np.concatenate([np.full(len(p.index), p.recovered) for p in parts]),
            "error": np.full(n, message, dtype=object),
        }


def _distributed(
    loaded: LoadedModel,
    found: ExpressionInput,
    matrix: Any,
    ranges: list[tuple[int, int]],
    batch_size: int,
    embedding: str,
    workers: int | None,
    device: str,
) -> Iterator[ChunkResult]:
    """Chunks as Ray Data rows, mapped by ``_ChunkWorker`` actors (one GPU each when the cluster
    has GPUs and ``device`` is not ``cpu``); results as one ChunkResult per output batch."""
    import ray

    from scbert_platform.cluster import start_ray

    cpus = start_ray()
    gpus = float(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus >= 1 and device != "cpu"
    workers = workers or (int(gpus) if use_gpu else max(1, int(cpus // 2)))
    shared = ray.put(matrix) if matrix is not None else None
    rows = [{"start": a, "stop": b} for a, b in ranges]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    mapped = dataset.map_batches(
        _ChunkWorker,
        fn_constructor_kwargs={
            "source": loaded.source,
            "found": found,
            "matrix": shared,
            "batch_size": batch_size,
            "embedding": embedding,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=0 if use_gpu else 1,
        num_gpus=1 if use_gpu else 0,
    )
    try:
        for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
            failed = [str(e) for e in batch["error"] if e]
            if failed:
                raise AnnotationError(failed[0])
            yield ChunkResult(
                batch["index"],
                batch["proba"],
                batch["embedding"],
                batch["n_genes"],
                bool(np.all(batch["recovered"])),
            )
    finally:
        del shared


# ---------------------------------------------------------------------------------------------
# Writing the results


def write_annotation(adata: Any, proba: np.ndarray, classes: list[str], threshold: float) -> None:
    """obs cell type / probability / unassigned, obsm probabilities, and in ``uns['scbert']``
    the threshold, the classes and the number of Unassigned cells."""
    import pandas as pd

    from scbert import UNASSIGNED
    from scbert_platform.track.pyfunc import cell_types

    names = cell_types(proba, classes, threshold)
    used = set(names)
    order = [c for c in [*classes, UNASSIGNED] if c in used]
    adata.obs[CELL_TYPE] = pd.Categorical(names, categories=order)
    adata.obs[PROBABILITY] = proba.max(axis=1) if proba.size else np.zeros(len(names))
    adata.obs[UNASSIGNED_FLAG] = np.asarray([n == UNASSIGNED for n in names], dtype=bool)
    adata.obsm[PROBABILITIES] = proba
    adata.uns[UNS] |= {
        "threshold": threshold,
        "classes": list(classes),
        "n_unassigned": int(adata.obs[UNASSIGNED_FLAG].sum()),
    }


def _summary(
    loaded: LoadedModel,
    found: ExpressionInput,
    coverage: dict[str, Any],
    recovered: str,
    embedding: str,
    n_genes: np.ndarray,
) -> dict[str, Any]:
    """``uns['scbert']``: no None values (h5ad cannot store them)."""
    summary: dict[str, Any] = {
        "model": {k: v for k, v in loaded.source.describe().items() if v is not None},
        "panel": {"n_genes": len(loaded.panel), "sha256": loaded.panel.sha256},
        "input": {
            "matrix": found.where,
            "values": found.input,
            "log_base": found.log_base if found.log_base is not None else "e",
            "counts_recovered": recovered,
        },
        **coverage,
        "n_cells": found.n_cells,
        # the model's preprocessing record (preprocessing.json), or the published values for a
        # model without one: ``preprocessing_source`` says which
        "preprocessing": {k: v for k, v in loaded.preprocessing.to_dict().items() if v is not None},
        "preprocessing_source": loaded.preprocessing_source,
        # annotated all the same; the model never saw such cells (ingest's QC dropped them)
        "n_cells_below_min_genes": int((n_genes < loaded.preprocessing.min_genes).sum()),
        "embedding": embedding,
    }
    return summary


def _forget_derived(adata: Any) -> None:
    """Drop what an earlier run derived from the embedding or the predictions (neighbour graph,
    UMAP, clusters, votes): a new embedding makes them stale."""
    adata.uns.pop(NEIGHBORS, None)
    for key in (f"{NEIGHBORS}_connectivities", f"{NEIGHBORS}_distances"):
        adata.obsp.pop(key, None)
    adata.obsm.pop(UMAP, None)
    for column in (LEIDEN, OVER_CLUSTERING, MAJORITY_VOTE):
        if column in adata.obs:
            del adata.obs[column]


def embedding_neighbors(adata: Any) -> str:
    """The embedding's neighbour graph (computed once per embedding); its key."""
    import scanpy as sc

    if NEIGHBORS not in adata.uns:
        sc.pp.neighbors(adata, use_rep=EMBEDDING, key_added=NEIGHBORS, random_state=0)
    return NEIGHBORS


def over_clustering_resolution(n_cells: int) -> float:
    """Leiden resolution of the over-clustering, by dataset size (CellTypist's steps)."""
    for limit, resolution in ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0)):
        if n_cells < limit:
            return resolution
    return 25.0 if n_cells < 200_000 else 30.0


def leiden(adata: Any, *, resolution: float, neighbors_key: str, key_added: str) -> None:
    """scanpy's Leiden with the igraph implementation (no leidenalg needed), seeded."""
    import scanpy as sc

    sc.tl.leiden(
        adata,
        resolution=resolution,
        key_added=key_added,
        neighbors_key=neighbors_key,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        random_state=0,
    )


def vote(adata: Any, *, over_clustering: str | None = None, min_prop: float = 0.0) -> None:
    """``obs['scbert_majority_vote']``: in each cluster of the over-clustering, the most frequent
    predicted type (``Heterogeneous`` where it covers less than ``min_prop`` of the cluster)."""
    import pandas as pd

    if CELL_TYPE not in adata.obs:
        raise AnnotationError("majority voting needs predictions: run annotate first")
    if over_clustering is None:
        resolution = over_clustering_resolution(adata.n_obs)
        leiden(
            adata,
            resolution=resolution,
            neighbors_key=embedding_neighbors(adata),
            key_added=OVER_CLUSTERING,
        )
        over_clustering = OVER_CLUSTERING
    elif over_clustering not in adata.obs:
        raise AnnotationError(
            f"over_clustering names no obs column: {over_clustering!r}; columns: "
            f"{list(adata.obs.columns)}"
        )
    groups = adata.obs[over_clustering].astype(str)
    table = pd.crosstab(groups, adata.obs[CELL_TYPE].astype(str))
    winner = table.idxmax(axis=1)
    winner[table.max(axis=1) / table.sum(axis=1) < min_prop] = "Heterogeneous"
    adata.obs[MAJORITY_VOTE] = pd.Categorical(groups.map(winner).to_numpy())
    adata.uns[UNS]["majority_vote"] = {"over_clustering": over_clustering, "min_prop": min_prop}


def predictions_table(adata: Any) -> Any:
    """One row per cell: id, type, probability, unassigned, majority vote (when present) and the
    probability of every class (``p_<class>``)."""
    import pandas as pd

    columns = [
        c for c in (CELL_TYPE, PROBABILITY, UNASSIGNED_FLAG, MAJORITY_VOTE) if c in adata.obs
    ]
    table = adata.obs[columns].copy()
    classes = adata.uns.get(UNS, {}).get("classes", [])
    proba = adata.obsm.get(PROBABILITIES)
    if proba is not None and len(classes) == proba.shape[1]:
        table = pd.concat(
            [table, pd.DataFrame(proba, index=table.index, columns=[f"p_{c}" for c in classes])],
            axis=1,
        )
    table.index.name = "cell_id"
    return table


def write_h5ad(adata: Any, out: str, *, source: str | None = None) -> None:
    """Write the annotated AnnData to ``out`` atomically (``scbert.atomic.atomic_file``). A
    backed AnnData (``source``: its file) is not loaded: the file is copied and only obs, obsm,
    obsp and uns are rewritten."""
    import shutil

    import h5py
    from anndata.io import write_elem

    from scbert.atomic import atomic_file

    with atomic_file(out) as partial:
        if source is None:
            adata.write_h5ad(partial)
            return
        shutil.copyfile(source, partial)
        with h5py.File(partial, "r+") as f:
            for key in ("obs", "obsm", "obsp", "uns"):
                if key in f:
                    del f[key]
                value = getattr(adata, key)
                write_elem(f, key, value if key == "obs" else dict(value))
