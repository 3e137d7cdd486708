"""Parquet cell shards: the shard schema (DESIGN.md), a shard written from the kept cells of its
input chunks (``write_shard``, one Ray task each), and the cells cut into shards of about
``data.shard_mb`` (``plan_shards``). The directory's ``manifest.json`` is ``data.manifest``'s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scbert_platform.data.preprocess import align, log_normalise, recover_counts
from scbert_platform.data.readers import ChunkSpec, file_sha256, read_counts

# zstd-compressed bytes per stored non-zero (uint16 index + float32 value); 2.37 measured on
# 100,000 synthetic cells x 16,906 genes (shards of 68 MB at 3.5)
BYTES_PER_NONZERO = 2.4


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
