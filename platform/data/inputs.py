"""An input opened for ingest: its format, its matrix, and its cells, genes, labels and batches,
checked before any value is read (``open_input`` -> ``InputTable``).

Every format becomes an .h5ad whose matrix ``readers`` reads in row ranges: an .h5ad is read in
place; a 10x .h5, a 10x matrix.mtx folder or a .loom is read by scanpy/anndata (in memory) and
written as a scratch .h5ad.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import scipy.sparse as sp

from scbert_platform.data.errors import IngestError
from scbert_platform.data.readers import (
    MatrixSource,
    bad_file_as_error,
    file_sha256,
    quiet_anndata,
    sparse_layout,
)
from scbert_platform.params import DataParams

SUFFIXES = {".h5ad": "h5ad", ".h5": "10x_h5", ".loom": "loom"}


@dataclass
class InputTable:
    """What the driver knows of the input before reading its matrix."""

    path: Path  # the input as given
    source: MatrixSource
    n_cells: int
    genes: list[str]  # the alignment key of each column (symbols or ids)
    cell_ids: list[str]
    labels: list[str | None] | None
    log_base: float | None  # of log-normalised input (None = natural log)
    sha256: str
    kind: str
    batches: list[str] | None = None  # obs[batch_key] of each cell, when data.batch_key is set


def open_input(path: str | Path, params: DataParams, scratch: Path) -> InputTable:
    """Read the input's metadata (cells, genes, labels) and check what needs no matrix pass."""
    path = Path(path)
    kind = input_kind(path)
    sha256 = file_sha256(path)
    h5ad = _as_h5ad(path, kind, scratch)
    if params.layer and params.use_raw:
        raise IngestError("give either data.layer or data.use_raw, not both")
    location, (n_cells, n_vars) = _matrix(path, h5ad, params)
    obs, var, log_base = _annotations(h5ad, params.use_raw)
    if n_cells == 0 or n_vars == 0:
        raise IngestError(
            f"{path}: the matrix is empty ({n_cells} cells x {n_vars} genes): check that the "
            "export wrote the data (e.g. the filtered, not an emptied, matrix)"
        )
    genes = _gene_keys(var, params.gene_id_column)
    cell_ids = obs.index.astype(str).tolist()
    genes = _unique_or_fail(genes, "gene", params.make_unique, "duplicated gene symbols")
    cell_ids = _unique_or_fail(cell_ids, "cell", params.make_unique, "duplicated cell ids")
    return InputTable(
        path=path,
        source=MatrixSource(str(h5ad), location),
        n_cells=n_cells,
        genes=genes,
        cell_ids=cell_ids,
        labels=_labels(obs, params.label_key, path),
        log_base=log_base,
        sha256=sha256,
        kind=kind,
        batches=_batches(obs, params.batch_key, path, kind, cell_ids),
    )


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


# ---------------------------------------------------------------------------------------------
# Formats


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


# ---------------------------------------------------------------------------------------------
# The .h5ad's matrix and annotations


def _matrix(path: Path, h5ad: Path, params: DataParams) -> tuple[str, tuple[int, int]]:
    """The HDF5 path of the counts matrix in ``h5ad`` (data.layer, data.use_raw or X), and its
    shape; none there is an IngestError naming the matrices present."""
    import h5py

    with bad_file_as_error(str(h5ad)), h5py.File(h5ad, "r") as f:
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
    return location, (int(shape[0]), int(shape[1]))


def _annotations(h5ad: Path, use_raw: bool) -> tuple[Any, Any, float | None]:
    """``obs``, ``var`` (of ``.raw`` with ``use_raw``) and the log base in ``uns['log1p']``
    (None: natural log, or not log-normalised), read without the matrix."""
    import anndata

    with bad_file_as_error(str(h5ad)), quiet_anndata():
        backed = anndata.read_h5ad(h5ad, backed="r")
    obs = backed.obs
    var = backed.raw.var if use_raw else backed.var
    log_info = backed.uns.get("log1p", {}) if hasattr(backed.uns, "get") else {}
    base = log_info.get("base") if isinstance(log_info, dict) else None
    backed.file.close()
    return obs, var, None if base is None else float(base)


def _gene_keys(var: Any, gene_id_column: str) -> list[str]:
    """The alignment key of each gene: ``var[gene_id_column]``, or the var names."""
    if not gene_id_column:
        return var.index.astype(str).tolist()
    if gene_id_column not in var.columns:
        raise IngestError(
            f"var has no column {gene_id_column!r} (data.gene_id_column); "
            f"columns: {list(var.columns)}"
        )
    return var[gene_id_column].astype(str).tolist()


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
