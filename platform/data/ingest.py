"""``scbert ingest``: raw counts -> validated, panel-aligned, normalised Parquet cell shards.

Steps, as published (DESIGN.md), each a function of ``scbert_platform.data.preprocess`` shared with
every inference path: validate the counts, align the genes to the panel by symbol (or by a
``var`` id column), drop cells with fewer than ``min_genes`` expressed panel genes,
``normalize_total`` to ``target_sum``, ``log2(1 + x)``. Binning happens at load time
(``scbert_platform.data.loader``); the manifest records the values, and training copies them
into the model's ``preprocessing.json``.

The input is read in row chunks straight from the HDF5 file (no whole-matrix load), one task per
chunk, on Ray Data (or in this process for inputs of a single chunk, with the same functions):

1. (only when no panel is given) count the cells expressing each gene, to build the panel;
2. scan: validate every value, count each cell's expressed panel genes and counts;
3. plan: QC, stratified folds over the kept cells, shards of about ``shard_mb``;
4. write: one task per shard, into a staging directory renamed into place at the end.

Any bad input stops at step 2 or before, with an ``IngestError`` naming the problem and the fix,
and nothing is written; a crash or Ctrl-C at any point leaves the previous output intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scbert.atomic import atomic_directory, check_output
from scbert_platform.data.panel import Panel, PanelError
from scbert_platform.data.preprocess import (
    COUNT_RECOVERY_TOLERANCE,
    PreprocessError,
    align,
    count_scale_deviation,
    log_normalise,
    qc,
    raised_as,
    read_expression,
    recover_counts,
)
from scbert_platform.params import DataParams

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PANEL_FILE = "panel.txt"
# zstd-compressed bytes per stored non-zero (uint16 index + float32 value); 2.37 measured on
# 100,000 synthetic cells x 16,906 genes (shards of 68 MB at 3.5)
BYTES_PER_NONZERO = 2.4


class IngestError(PreprocessError):
    """Input that cannot be ingested; the message names the problem and the fix."""


class ShardError(IngestError):
    """An ingested shard directory that is incomplete or damaged (its manifest missing or not
    JSON, a shard missing, truncated or changed since ingest): the message names the file and
    how to get the directory back."""


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class MatrixSource:
    """Where the counts are: an .h5ad file and the HDF5 path of the matrix within it."""

    path: str
    location: str  # "X", "layers/<name>" or "raw/X"

    def rows(self) -> AbstractContextManager[Callable[[int, int], sp.csr_matrix]]:
        """``h5ad_rows`` of this matrix."""
        return h5ad_rows(self.path, self.location)


@contextmanager
def h5ad_rows(path: str, location: str) -> Iterator[Callable[[int, int], sp.csr_matrix]]:
    """A reader of row ranges ``[start, stop)`` of the matrix at ``location`` ("X",
    "layers/<name>", "raw/X") of the .h5ad ``path``, as CSR, with the file open.

    Reads only the rows asked for: a dense dataset by slicing, a CSR group through its
    ``indptr`` (the current and the pre-0.7 anndata layouts); CSC is loaded once.
    """
    import h5py

    with _reading(path), h5py.File(path, "r") as f:
        elem = f[location]
        if isinstance(elem, h5py.Dataset):
            yield lambda start, stop: sp.csr_matrix(elem[start:stop])
            return
        layout, shape = sparse_layout(elem)
        if layout == "csc":  # row slices of CSC touch the whole matrix: load it once
            whole = sp.csc_matrix(
                (elem["data"][:], elem["indices"][:], elem["indptr"][:]), shape=shape
            ).tocsr()
            yield lambda start, stop: whole[start:stop]
            return

        def read(start: int, stop: int) -> sp.csr_matrix:
            indptr = elem["indptr"][start : stop + 1].astype(np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            return sp.csr_matrix(
                (elem["data"][lo:hi], elem["indices"][lo:hi], indptr - lo),
                shape=(stop - start, shape[1]),
            )

        yield read


def sparse_layout(group: Any) -> tuple[str, tuple[int, int]]:
    """("csr" | "csc", shape) of an anndata sparse matrix group (current or legacy layout)."""
    attrs = group.attrs
    if "encoding-type" in attrs:
        layout, shape = str(attrs["encoding-type"]).removesuffix("_matrix"), attrs["shape"]
    elif "h5sparse_format" in attrs:
        layout, shape = str(attrs["h5sparse_format"]), attrs["h5sparse_shape"]
    else:
        raise IngestError(f"{group.name}: not a sparse matrix anndata can read")
    if layout not in ("csr", "csc"):
        raise IngestError(f"{group.name}: unsupported sparse layout {layout!r}")
    return layout, (int(shape[0]), int(shape[1]))


@contextmanager
def quiet_anndata() -> Iterator[None]:
    """anndata warns at length when it upgrades a legacy file's layout in memory."""
    import warnings

    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", anndata.OldFormatWarning)
        yield


@contextmanager
def _reading(path: str) -> Iterator[None]:
    """Turn the HDF5 library's errors on a bad file into an IngestError naming the file."""
    try:
        yield
    except (OSError, KeyError) as err:
        if isinstance(err, IngestError):
            raise
        raise IngestError(
            f"cannot read {path}: the file is truncated, corrupt or not an .h5ad ({err}); "
            "re-export it with anndata's write_h5ad"
        ) from err


@dataclass
class InputTable:
    """What the driver knows of the input before reading its matrix."""

    source: MatrixSource
    n_cells: int
    genes: list[str]  # the alignment key of each column (symbols or ids)
    cell_ids: list[str]
    labels: list[str | None] | None
    log_base: float | None  # of log-normalised input (None = natural log)
    sha256: str
    kind: str
    batches: list[str] | None = None  # obs[batch_key] of each cell, when data.batch_key is set


SUFFIXES = {".h5ad": "h5ad", ".h5": "10x_h5", ".loom": "loom"}


def input_kind(path: Path) -> str:
    if path.is_dir():
        if any((path / n).exists() for n in ("matrix.mtx", "matrix.mtx.gz")):
            return "10x_mtx"
        raise IngestError(f"{path} is a directory without matrix.mtx(.gz): not a 10x mtx folder")
    if not path.exists():
        raise IngestError(f"input {path} does not exist: check the path (relative to {Path.cwd()})")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise IngestError(
            f"{path}: unsupported file type {path.suffix!r}; give an .h5ad, a 10x .h5, a .loom "
            "or a 10x matrix.mtx directory"
        )
    return kind


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def _as_h5ad(path: Path, kind: str, scratch: Path) -> Path:
    """Non-h5ad inputs are read by scanpy/anndata (in memory) and written as a scratch .h5ad."""
    if kind == "h5ad":
        return path
    import anndata
    import scanpy as sc

    try:
        if kind == "10x_h5":
            adata = sc.read_10x_h5(path)
        elif (
            kind == "10x_mtx"
            and (path / "matrix.mtx").exists()
            and (path / "features.tsv").exists()
        ):
            adata = _read_plain_v3_mtx(path)  # scanpy expects v3 folders gzipped
        elif kind == "10x_mtx":
            # duplicated symbols are kept, to be reported (or made unique) like any input's
            adata = sc.read_10x_mtx(path, make_unique=False)
        else:
            adata = anndata.io.read_loom(path, **_loom_names(path))
    except Exception as err:
        raise IngestError(f"cannot read {path} as {kind}: {err}") from err
    adata.X = sp.csr_matrix(adata.X)
    out = scratch / "input.h5ad"
    adata.write_h5ad(out)
    return out


def _loom_names(path: Path) -> dict[str, str]:
    """Name attributes of a .loom: loompy's Gene / CellID, or anndata's var_names / obs_names."""
    import h5py

    with h5py.File(path, "r") as f:
        rows, cols = set(f.get("row_attrs", {})), set(f.get("col_attrs", {}))
    return {
        "var_names": "var_names" if "var_names" in rows and "Gene" not in rows else "Gene",
        "obs_names": "obs_names" if "obs_names" in cols and "CellID" not in cols else "CellID",
    }


def _read_plain_v3_mtx(path: Path) -> Any:
    """A Cell Ranger v3-style folder with uncompressed files (e.g. STARsolo's output)."""
    import anndata
    import pandas as pd
    import scipy.io

    features = pd.read_csv(path / "features.tsv", sep="\t", header=None, dtype=str)
    barcodes = pd.read_csv(path / "barcodes.tsv", sep="\t", header=None, dtype=str)[0]
    matrix = sp.csr_matrix(scipy.io.mmread(path / "matrix.mtx").T)
    if features.shape[1] >= 3:  # keep gene expression, as scanpy's gex_only does
        gex = (features[2] == "Gene Expression").to_numpy()
        features, matrix = features[gex], matrix[:, gex]
    adata = anndata.AnnData(matrix)
    adata.obs_names = barcodes.tolist()
    adata.var_names = features[1 if features.shape[1] > 1 else 0].tolist()
    adata.var["gene_ids"] = features[0].tolist()
    return adata


def open_input(path: str | Path, params: DataParams, scratch: Path) -> InputTable:
    """Read the input's metadata (cells, genes, labels) and check what needs no matrix pass."""
    import anndata
    import h5py

    path = Path(path)
    kind = input_kind(path)
    sha256 = file_sha256(path)
    h5ad = _as_h5ad(path, kind, scratch)
    if params.layer and params.use_raw:
        raise IngestError("give either data.layer or data.use_raw, not both")
    with _reading(str(h5ad)), h5py.File(h5ad, "r") as f:
        candidates = (
            [f"layers/{params.layer}"]
            if params.layer
            else ["raw/X", "raw.X"]
            if params.use_raw
            else ["X"]
        )
        location = next((c for c in candidates if c in f), None)
        if location is None:
            have = list(f["layers"].keys()) if "layers" in f else []
            raise IngestError(
                f"{path} has no matrix at {candidates[0]}; layers present: {have}, "
                f".raw {'present' if 'raw' in f or 'raw.X' in f else 'absent'}: choose the "
                "matrix with --layer NAME or --use-raw (is this an .h5ad written by anndata?)"
            )
        elem = f[location]
        shape = elem.shape if isinstance(elem, h5py.Dataset) else sparse_layout(elem)[1]
    with _reading(str(h5ad)), quiet_anndata():
        backed = anndata.read_h5ad(h5ad, backed="r")
    obs = backed.obs
    var = backed.raw.var if params.use_raw else backed.var
    log_info = backed.uns.get("log1p", {}) if hasattr(backed.uns, "get") else {}
    base = log_info.get("base") if isinstance(log_info, dict) else None
    log_base = None if base is None else float(base)
    backed.file.close()
    n_cells, n_vars = int(shape[0]), int(shape[1])
    if n_cells == 0 or n_vars == 0:
        raise IngestError(
            f"{path}: the matrix is empty ({n_cells} cells x {n_vars} genes): check that the "
            "export wrote the data (e.g. the filtered, not an emptied, matrix)"
        )
    if params.gene_id_column:
        if params.gene_id_column not in var.columns:
            raise IngestError(
                f"var has no column {params.gene_id_column!r} (data.gene_id_column); "
                f"columns: {list(var.columns)}"
            )
        genes = var[params.gene_id_column].astype(str).tolist()
    else:
        genes = var.index.astype(str).tolist()
    cell_ids = obs.index.astype(str).tolist()
    genes = _unique_or_fail(genes, "gene", params.make_unique, "duplicated gene symbols")
    cell_ids = _unique_or_fail(cell_ids, "cell", params.make_unique, "duplicated cell ids")
    labels = _labels(obs, params.label_key, path)
    batches = _batches(obs, params.batch_key, path, kind, cell_ids)
    return InputTable(
        MatrixSource(str(h5ad), location),
        n_cells,
        genes,
        cell_ids,
        labels,
        log_base,
        sha256,
        kind,
        batches,
    )


def _unique_or_fail(names: list[str], what: str, make_unique: bool, problem: str) -> list[str]:
    counts = Counter(names)
    duplicated = {n: c for n, c in counts.items() if c > 1}
    if not duplicated:
        return names
    if not make_unique:
        examples = ", ".join(f"{n} (x{c})" for n, c in list(duplicated.items())[:8])
        raise IngestError(
            f"{problem}: {len(duplicated)} {what} names occur more than once, e.g. {examples}; "
            f"pass --make-unique (data.make_unique=true) to suffix them -1, -2, ... as "
            f"anndata's var_names_make_unique does"
        )
    import anndata.utils
    import pandas as pd

    unique: list[str] = anndata.utils.make_index_unique(pd.Index(names)).tolist()
    print(
        f"made {sum(duplicated.values()) - len(duplicated)} duplicated {what} names unique",
        file=sys.stderr,
    )
    return unique


def _labels(obs: Any, label_key: str, path: Path) -> list[str | None] | None:
    if not label_key:
        return None
    if label_key not in obs.columns:
        raise IngestError(
            f"{path}: obs has no label column {label_key!r} (data.label_key); "
            f"columns: {list(obs.columns)}"
        )
    column = obs[label_key]
    labels = [None if _missing(v) else str(v) for v in column.tolist()]
    classes = {label for label in labels if label is not None}
    if len(classes) < 2:
        raise IngestError(
            f"label column {label_key!r} has {len(classes)} class(es) {sorted(classes)}: "
            "a cell-type annotator needs at least 2; pick another column or omit data.label_key"
        )
    return labels


def _batches(
    obs: Any, batch_key: str, path: Path, kind: str, cell_ids: list[str]
) -> list[str] | None:
    """``obs[batch_key]`` as strings (each cell's dataset or batch), or None when unset."""
    if not batch_key:
        return None
    if batch_key not in obs.columns:
        if kind in ("10x_h5", "10x_mtx"):
            raise IngestError(
                f"{path}: data.batch_key={batch_key!r} needs an obs column, and a {kind} input "
                "has no per-cell metadata: build an AnnData with the column (e.g. "
                f"anndata.concat(..., label={batch_key!r})), write it as .h5ad and ingest that, "
                "or omit data.batch_key"
            )
        where = "column attributes (col_attrs)" if kind == "loom" else "columns"
        raise IngestError(
            f"{path}: obs has no batch column {batch_key!r} (data.batch_key); "
            f"{where}: {list(obs.columns)}"
        )
    values = obs[batch_key].tolist()
    missing = [i for i, v in enumerate(values) if _missing(v)]
    if missing:
        examples = ", ".join(repr(cell_ids[i]) for i in missing[:5])
        raise IngestError(
            f"batch column {batch_key!r} (data.batch_key) has no value for {len(missing)} of "
            f"{len(values)} cells (e.g. {examples}): every cell needs its dataset or batch; "
            "fill them in or drop those cells before ingesting"
        )
    return [str(v) for v in values]


def _missing(value: Any) -> bool:
    if value is None or (isinstance(value, str) and value == ""):
        return True
    import pandas as pd

    try:
        return bool(pd.isna(value))  # NaN, pd.NA, NaT
    except (TypeError, ValueError):  # not a scalar
        return False


# ---------------------------------------------------------------------------------------------
# Per-chunk work (runs in Ray tasks or in this process)


@dataclass(frozen=True)
class ChunkSpec:
    source: MatrixSource
    start: int
    stop: int
    input_normalized: bool
    log_base: float | None
    cell_ids: tuple[str, ...]  # of rows start..stop, for error messages and shards


def read_counts(
    spec: ChunkSpec,
    rows: Callable[[int, int], sp.csr_matrix],
    hints: dict[str, str] | None = None,
) -> sp.csr_matrix:
    """Rows of the input, validated; log-normalised input is inverted to normalised values
    (``preprocess.read_expression``)."""
    with raised_as(IngestError):
        return read_expression(
            rows(spec.start, spec.stop),
            kind="log1p" if spec.input_normalized else "counts",
            log_base=spec.log_base,
            cell_ids=spec.cell_ids,
            where=f" in cells {spec.start}..{spec.stop - 1}",
            hints=hints or INGEST_HINTS,
        )


INGEST_HINTS = {
    "finite": "fix or drop those cells before ingesting",
    "negative": "scaled or batch-corrected data cannot be ingested; use raw counts, e.g. "
    "--layer counts",
    "integer": "ingest needs raw counts; for log-normalised data pass --input-normalized, or "
    "read the counts from another matrix with --layer NAME or --use-raw",
    "looks_raw": "drop --input-normalized (it is for log1p of normalised counts)",
}


def gene_cell_counts(spec: ChunkSpec) -> np.ndarray:
    """Number of cells expressing each input gene in this chunk (for building a panel)."""
    with spec.source.rows() as rows:
        x = read_counts(spec, rows)
    return np.bincount(x.indices, minlength=x.shape[1])


@dataclass
class ScanResult:
    start: int
    n_genes: np.ndarray  # expressed panel genes per cell
    n_counts: np.ndarray  # total (panel) counts per cell
    scale_deviation: float


def scan_chunk(spec: ChunkSpec, positions: np.ndarray, n_panel: int) -> ScanResult:
    """Validate a chunk and measure its cells for QC."""
    with spec.source.rows() as rows:
        x = read_counts(spec, rows)
    deviation = count_scale_deviation(x) if spec.input_normalized else 0.0
    aligned = align(x, positions, n_panel)
    return ScanResult(
        spec.start,
        np.diff(aligned.indptr).astype(np.int32),
        np.asarray(aligned.sum(axis=1)).ravel(),
        deviation,
    )


@dataclass(frozen=True)
class ShardSpec:
    chunks: tuple[ChunkSpec, ...]
    keep: tuple[np.ndarray, ...]  # per chunk: kept row offsets
    folds: tuple[np.ndarray, ...]
    labels: tuple[tuple[str | None, ...], ...]  # per chunk, of kept rows
    part: int
    directory: str
    recover_counts: bool
    target_sum: float
    batches: tuple[tuple[str, ...], ...] | None = None  # per chunk, of kept rows (batch_key set)


@dataclass
class ShardResult:
    file: str
    n_cells: int
    n_bytes: int
    sha256: str
    n_counts_total: float


def write_shard(spec: ShardSpec, positions: np.ndarray, n_panel: int) -> ShardResult:
    """Transform the kept cells of the shard's chunks and write one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    batches_per_chunk = spec.batches or (None,) * len(spec.chunks)
    for chunk, keep, folds, labels, batches in zip(
        spec.chunks, spec.keep, spec.folds, spec.labels, batches_per_chunk, strict=True
    ):
        with chunk.source.rows() as rows:
            x = read_counts(chunk, rows)
        if spec.recover_counts:
            x = recover_counts(x)
        counts = align(x, positions, n_panel)[keep]
        values = log_normalise(counts, spec.target_sum)
        tables.append(
            cells_table(
                [chunk.cell_ids[i] for i in keep],
                list(labels),
                values,
                np.asarray(counts.sum(axis=1)).ravel(),
                folds,
                n_panel,
                None if batches is None else list(batches),
            )
        )
    table = pa.concat_tables(tables)
    path = Path(spec.directory) / f"part-{spec.part:05d}.parquet"
    pq.write_table(table, path, compression="zstd", row_group_size=8192)
    return ShardResult(
        path.name,
        table.num_rows,
        path.stat().st_size,
        file_sha256(path),
        float(np.sum(table.column("n_counts").to_numpy())),
    )


def cells_table(
    cell_ids: Sequence[str],
    labels: Sequence[str | None],
    values: sp.csr_matrix,
    n_counts: np.ndarray,
    folds: np.ndarray,
    n_panel: int,
    batches: Sequence[str] | None = None,
) -> Any:
    """A pyarrow Table in the shard schema (DESIGN.md) from normalised CSR rows; with
    ``batches`` (data.batch_key set), a ``batch`` string column after ``label``."""
    import pyarrow as pa

    index_type = pa.uint16() if n_panel <= np.iinfo(np.uint16).max + 1 else pa.int32()
    offsets = pa.array(values.indptr.astype(np.int32))
    gene_idx = pa.ListArray.from_arrays(
        offsets, pa.array(values.indices.astype(index_type.to_pandas_dtype()), type=index_type)
    )
    value = pa.ListArray.from_arrays(offsets, pa.array(values.data.astype(np.float32)))
    columns: dict[str, Any] = {
        "cell_id": pa.array(list(cell_ids), pa.string()),
        "label": pa.array(list(labels), pa.string()),
    }
    if batches is not None:
        columns["batch"] = pa.array(list(batches), pa.string())
    return pa.table(
        {
            **columns,
            "gene_idx": gene_idx,
            "value": value,
            "n_counts": pa.array(n_counts.astype(np.float64)),
            "n_genes": pa.array(np.diff(values.indptr).astype(np.int32)),
            "fold": pa.array(folds.astype(np.int8)),
        }
    )


# ---------------------------------------------------------------------------------------------
# Planning


def assign_folds(
    cell_ids: Sequence[str], labels: Sequence[str | None] | None, n_folds: int, seed: int
) -> np.ndarray:
    """Stratified folds 0..n_folds-1 (int8): within each label, cells ordered by a seeded hash of
    their id are dealt round-robin from a label-specific offset. Stable when re-run: a cell's
    fold depends only on the seed, its id and the ids of its label's cells, not on row order."""
    if n_folds < 2:
        raise IngestError(f"data.n_folds must be >= 2, got {n_folds}")
    labels = labels if labels is not None else [None] * len(cell_ids)
    folds = np.empty(len(cell_ids), dtype=np.int8)
    by_label: dict[str | None, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for label, members in by_label.items():
        keys = [_hash64(f"{seed}\0{cell_ids[i]}") for i in members]
        ordered = np.asarray(members)[np.argsort(np.asarray(keys, dtype=np.uint64), kind="stable")]
        offset = _hash64(f"{seed}\0label\0{label}") % n_folds
        folds[ordered] = (offset + np.arange(len(ordered))) % n_folds
    return folds


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def plan_shards(n_genes_kept: np.ndarray, shard_mb: float) -> list[tuple[int, int]]:
    """Split kept cells (in order) into ranges of about ``shard_mb`` of compressed Parquet."""
    budget = shard_mb * 2**20 / BYTES_PER_NONZERO
    bounds, start, acc = [], 0, 0.0
    for i, n in enumerate(n_genes_kept):
        acc += float(n) + 16  # per-cell overhead (id, label, offsets) in non-zero units
        if acc >= budget:
            bounds.append((start, i + 1))
            start, acc = i + 1, 0.0
    if start < len(n_genes_kept):
        bounds.append((start, len(n_genes_kept)))
    return bounds


# ---------------------------------------------------------------------------------------------
# Execution


def _run(
    fn: Callable[..., Any], items: Sequence[Any], use_ray: bool, desc: str, cells: Sequence[int]
) -> list[Any]:
    """``[fn(item) for item in items]``: on Ray Data, one task per item, or in this process;
    a bar counts the cells (``cells[i]`` in item ``i``) as the items finish."""
    from scbert_platform.console import progress

    bar = progress(total=sum(cells), desc=f"ingest: {desc}", unit="cell", disable=len(items) < 2)
    with bar:
        if not use_ray:
            done = []
            for item, n in zip(items, cells, strict=True):
                done.append(fn(item))
                bar.update(n)
            return done
        import ray

        payloads = [{"i": i, "item": pickle.dumps(item)} for i, item in enumerate(items)]
        dataset = ray.data.from_items(payloads, override_num_blocks=len(payloads))
        rows = []
        for row in dataset.map(_ray_call, fn_kwargs={"fn": pickle.dumps(fn)}).iter_rows():
            rows.append(row)
            bar.update(cells[row["i"]])
    errors = sorted((row["i"], row["error"]) for row in rows if row["error"])
    if errors:  # the first in input order, as the in-process run would report it
        raise IngestError(errors[0][1])
    rows.sort(key=lambda row: row["i"])
    return [pickle.loads(row["result"]) for row in rows]


def _ray_call(row: dict[str, Any], fn: bytes) -> dict[str, Any]:
    """Ray Data map function: run a pickled function on a pickled item. An IngestError comes
    back as data: Ray would wrap it in its own exception types on the way to the driver."""
    try:
        result = pickle.dumps(pickle.loads(fn)(pickle.loads(row["item"])))
    except IngestError as err:
        return {"i": row["i"], "result": b"", "error": str(err)}
    return {"i": row["i"], "result": result, "error": ""}


@contextmanager
def _ray_session(use_ray: bool) -> Iterator[None]:
    """Start a local Ray if none is running (and stop it after); use a running one as is."""
    if not use_ray:
        yield
        return
    import ray

    from scbert_platform.cluster import start_ray

    started = not ray.is_initialized()
    if started:
        start_ray()
    try:
        yield
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class IngestReport:
    output: str
    n_cells_in: int
    n_cells_kept: int
    n_shards: int
    seconds: float
    manifest: dict[str, Any] = field(repr=False)


def ingest(
    source: str | Path,
    output: str | Path,
    params: DataParams,
    *,
    executor: str = "auto",
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> IngestReport:
    """Ingest ``source`` into the shard directory ``output`` (replaced atomically).

    ``executor``: ``ray`` (Ray Data tasks), ``local`` (this process) or ``auto`` (``ray`` when
    the input has more than one chunk of ``params.chunk_cells`` cells). ``output`` may be absent,
    empty or earlier shards; anything else is refused before any work unless ``overwrite``
    (``scbert.atomic.check_output``).
    """
    say = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    source, output = Path(source), Path(output)
    inputs = [source, *([params.panel] if params.panel else [])]
    check_output(output, kind="shards", overwrite=overwrite, inputs=inputs)
    if executor not in ("auto", "ray", "local"):
        raise ValueError(f"executor must be auto, ray or local, got {executor!r}")
    if params.chunk_cells < 1 or params.shard_mb <= 0 or params.min_genes < 0:
        raise IngestError("data.chunk_cells and data.shard_mb must be positive, min_genes >= 0")
    with (
        _full_disk_as_error(output),
        tempfile.TemporaryDirectory(prefix="scbert-ingest-") as scratch,
    ):
        table = open_input(source, params, Path(scratch))
        n_chunks = math.ceil(table.n_cells / params.chunk_cells)
        use_ray = executor == "ray" or (executor == "auto" and n_chunks > 1)
        say(
            f"ingest {source} ({table.kind}, {table.n_cells} cells x {len(table.genes)} genes, "
            f"matrix {table.source.location}) in {n_chunks} chunk(s) "
            f"{'on Ray Data' if use_ray else 'in this process'}"
        )
        if params.input_normalized:
            base = "e" if table.log_base is None else f"{table.log_base:g}"
            say(f"input is log-normalised (log1p, base {base}): inverted with base**v - 1")
        chunks = [
            _chunk(table, params, start, min(start + params.chunk_cells, table.n_cells))
            for start in range(0, table.n_cells, params.chunk_cells)
        ]
        with _ray_session(use_ray):
            stage = partial(
                atomic_directory, output, kind="shards", overwrite=overwrite, inputs=inputs
            )
            manifest = _ingest(table, chunks, output, stage, params, use_ray, say, source)
    seconds = time.perf_counter() - started
    cells = manifest["cells"]
    say(
        f"wrote {cells['kept']} of {cells['input']} cells in {len(manifest['shards'])} shard(s) "
        f"to {output} in {seconds:.1f} s"
    )
    return IngestReport(
        str(output), cells["input"], cells["kept"], len(manifest["shards"]), seconds, manifest
    )


def _chunk(table: InputTable, params: DataParams, start: int, stop: int) -> ChunkSpec:
    return ChunkSpec(
        table.source,
        start,
        stop,
        params.input_normalized,
        table.log_base,
        tuple(table.cell_ids[start:stop]),
    )


def _ingest(
    table: InputTable,
    chunks: list[ChunkSpec],
    output: Path,
    stage: Callable[[], AbstractContextManager[Path]],
    params: DataParams,
    use_ray: bool,
    say: Callable[[str], None],
    source: Path,
) -> dict[str, Any]:
    panel = _panel(table, chunks, params, use_ray, say)
    positions = panel.positions(table.genes)
    found = int((positions >= 0).sum())
    coverage = found / len(panel)
    say(f"panel {panel.name}: {found} of {len(panel)} genes found in the data ({coverage:.1%})")
    if coverage < params.min_coverage:
        present = set(table.genes)
        missing = [g for g in panel.genes if g not in present][:5]
        raise IngestError(
            f"only {found} of the panel's {len(panel)} genes ({coverage:.1%}) are in the data, "
            f"below data.min_coverage={params.min_coverage:.0%}; panel genes missing e.g. "
            f"{missing}, data genes e.g. {table.genes[:5]}: check that both use the same "
            "naming (symbols vs Ensembl ids: --gene-id-column), or lower data.min_coverage"
        )
    n_panel = len(panel)
    scan = partial(scan_chunk, positions=positions, n_panel=n_panel)
    scans = _run(scan, chunks, use_ray, "scan", [c.stop - c.start for c in chunks])
    n_genes = np.concatenate([s.n_genes for s in scans])
    n_counts = np.concatenate([s.n_counts for s in scans])
    recover = False
    if params.input_normalized:
        deviation = max(s.scale_deviation for s in scans)
        recover = deviation <= COUNT_RECOVERY_TOLERANCE
        say(
            "counts recovered by dividing each cell by its smallest value (a count of 1), "
            f"max deviation from integers {deviation:.3g}"
            if recover
            else f"counts not recoverable (deviation {deviation:.3g}): normalised values used"
        )
    low, empty = qc(n_genes, n_counts, params.min_genes)
    keep = ~(low | empty)
    kept_rows = np.flatnonzero(keep)
    if kept_rows.size == 0:
        raise IngestError(
            f"no cell has at least {params.min_genes} expressed panel genes (data.min_genes); "
            f"the most any cell has is {int(n_genes.max())}: lower data.min_genes"
        )
    kept_ids = [table.cell_ids[i] for i in kept_rows]
    kept_labels = None if table.labels is None else [table.labels[i] for i in kept_rows]
    kept_batches = None if table.batches is None else [table.batches[i] for i in kept_rows]
    if kept_batches is not None:
        per_batch = ", ".join(f"{b} {n}" for b, n in sorted(Counter(kept_batches).items()))
        say(f"cells kept per {params.batch_key} (data.batch_key): {per_batch}")
    folds = assign_folds(kept_ids, kept_labels, params.n_folds, params.seed)
    fold_of = np.full(table.n_cells, -1, dtype=np.int8)
    fold_of[kept_rows] = folds

    with stage() as staging:  # atomic_directory: the shards replace output only when complete
        shards = []
        for part, (lo, hi) in enumerate(plan_shards(n_genes[kept_rows], params.shard_mb)):
            rows = kept_rows[lo:hi]
            windows = [
                _chunk(table, params, start, min(start + params.chunk_cells, rows[-1] + 1))
                for start in range(int(rows[0]), int(rows[-1]) + 1, params.chunk_cells)
            ]
            keeps = [rows[(rows >= w.start) & (rows < w.stop)] for w in windows]
            shards.append(
                ShardSpec(
                    chunks=tuple(windows),
                    keep=tuple(k - w.start for k, w in zip(keeps, windows, strict=True)),
                    folds=tuple(fold_of[k] for k in keeps),
                    labels=tuple(
                        tuple(None if table.labels is None else table.labels[i] for i in k)
                        for k in keeps
                    ),
                    part=part,
                    directory=str(staging),
                    recover_counts=recover,
                    target_sum=params.target_sum,
                    batches=None
                    if table.batches is None
                    else tuple(tuple(table.batches[i] for i in k) for k in keeps),
                )
            )
        write = partial(write_shard, positions=positions, n_panel=n_panel)
        kept = [sum(len(k) for k in shard.keep) for shard in shards]
        results = _run(write, shards, use_ray, "write", kept)
        panel.write(staging / PANEL_FILE)
        manifest = _manifest(
            table,
            params,
            panel,
            found,
            n_genes,
            keep,
            low,
            empty,
            kept_labels,
            kept_batches,
            folds,
            results,
            recover,
            source,
            output,
        )
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _panel(
    table: InputTable,
    chunks: list[ChunkSpec],
    params: DataParams,
    use_ray: bool,
    say: Callable[[str], None],
) -> Panel:
    if params.panel:
        try:
            return Panel.from_file(params.panel)
        except PanelError as err:
            raise IngestError(str(err)) from err
    say(f"building the panel: genes expressed in >= {params.panel_min_cells} cells")
    counts = sum(
        _run(gene_cell_counts, chunks, use_ray, "panel", [c.stop - c.start for c in chunks])
    )
    try:
        return Panel.from_cell_counts(
            table.genes, np.asarray(counts), min_cells=params.panel_min_cells, name="data"
        )
    except PanelError as err:
        raise IngestError(str(err)) from err


def _manifest(
    table: InputTable,
    params: DataParams,
    panel: Panel,
    found: int,
    n_genes: np.ndarray,
    keep: np.ndarray,
    low: np.ndarray,
    empty: np.ndarray,
    kept_labels: list[str | None] | None,
    kept_batches: list[str] | None,
    folds: np.ndarray,
    results: list[ShardResult],
    recover: bool,
    source: Path,
    output: Path,
) -> dict[str, Any]:
    import importlib.metadata as md

    label_counts = Counter("<unlabelled>" if lab is None else lab for lab in (kept_labels or []))
    fold_counts = Counter(int(f) for f in folds)
    return {
        "schema_version": SCHEMA_VERSION,
        "dataset": params.name or output.name,
        "source": {
            "path": str(source),
            "kind": table.kind,
            "sha256": table.sha256,
            "matrix": table.source.location,
            "input_normalized": params.input_normalized,
            "log_base": table.log_base,
            "counts_recovered": recover,
        },
        "panel": {
            "name": panel.name,
            "file": PANEL_FILE,
            "sha256": panel.sha256,
            "n_genes": len(panel),
            "gene_index_type": "uint16" if len(panel) <= 65536 else "int32",
        },
        "preprocessing": {
            "align": "by " + (params.gene_id_column or "var_names") + "; missing genes = 0",
            "input": "log1p" if params.input_normalized else "counts",
            "gene_id_column": params.gene_id_column or None,
            "min_genes": params.min_genes,
            "normalize_total": params.target_sum,
            "target_sum": params.target_sum,
            "log": "log2(1 + x)",
            "log_base": 2.0,
            "binning": "at load time: min(value, model.n_bins) truncated (scbert.tokens)",
            "params": asdict(params),
        },
        "genes": {
            "panel": len(panel),
            "found": found,
            "coverage": found / len(panel),
            "input": len(table.genes),
            "dropped_not_in_panel": len(table.genes) - found,
        },
        "cells": {
            "input": table.n_cells,
            "kept": int(keep.sum()),
            "dropped": {
                f"fewer than {params.min_genes} expressed panel genes": int(low.sum()),
                "no counts in the panel": int(empty.sum()),
            },
            "median_genes_per_kept_cell": float(np.median(n_genes[keep])),
        },
        "labels": {
            "key": params.label_key or None,
            "counts": dict(sorted(label_counts.items())),
        },
        "batches": None
        if kept_batches is None
        else {"key": params.batch_key, "counts": dict(sorted(Counter(kept_batches).items()))},
        "folds": {
            "n_folds": params.n_folds,
            "seed": params.seed,
            "counts": {str(k): fold_counts[k] for k in range(params.n_folds)},
        },
        "shards": [asdict(r) for r in results],
        "software": {
            name: md.version(name) for name in ("scbert-platform", "anndata", "scanpy", "pyarrow")
        },
    }


@contextmanager
def _full_disk_as_error(output: Path) -> Iterator[None]:
    """A full disk as an ``IngestError`` naming ``output``, not a traceback from deep inside
    pyarrow or a Ray task. By the time it gets here ``atomic_directory`` has removed the staging
    directory, so the previous output, if any, is as it was."""
    existed = output.exists()
    try:
        yield
    except Exception as err:
        if not _no_space_left(err):
            raise
        kept = f"the previous {output} is unchanged" if existed else "nothing was written"
        raise IngestError(
            f"no space left on the device while writing {output}: free some space (or write "
            f"elsewhere with --out) and run `scbert ingest` again; {kept}"
        ) from err


def _no_space_left(err: BaseException | None) -> bool:
    """Whether ``err`` or an error behind it is ENOSPC (Ray keeps the task's error as ``cause``;
    an error that crossed a process as text keeps only its message)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if os.strerror(errno.ENOSPC) in str(err):
            return True
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return False


def reingest_hint(directory: str | Path, manifest: dict[str, Any] | None = None) -> str:
    """What to type to get an ingested directory back: ingest again (naming the source when the
    manifest says it), or restore DVC's copy."""
    source = manifest.get("source", {}).get("path") if manifest else None
    command = f"scbert ingest {source} --out {directory}" if source else "scbert ingest"
    return (
        f"run `{command}` again with the same parameters to rewrite the shards (or `dvc "
        "checkout --force` / `dvc repro ingest` where DVC tracks them)"
    )


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an ingested directory; a missing or unreadable one is a ``ShardError``."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise ShardError(f"{directory} does not exist: {reingest_hint(directory)}")
    if not path.is_file():
        raise ShardError(
            f"{path} is missing, so {directory} is not a complete ingested shard directory: "
            f"{reingest_hint(directory)}"
        )
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(
            f"{path} is not valid JSON ({err}): it is truncated or was edited; "
            f"{reingest_hint(directory)}"
        ) from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path} is not an ingest manifest: {reingest_hint(directory)}")
    return manifest
