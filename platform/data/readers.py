"""Row ranges of an input matrix, read from its .h5ad without loading the whole, and validated.

``MatrixSource`` names a matrix (an .h5ad file and the HDF5 path within it); ``h5ad_rows`` reads
row ranges of it; a ``ChunkSpec`` is one range as a unit of work (a Ray task or a step of a loop
in this process), and ``read_counts`` reads it through ``preprocess.read_expression`` with
ingest's hints. ``inputs.open_input`` turns every supported format into such an .h5ad first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scbert_platform.data.errors import IngestError
from scbert_platform.data.preprocess import raised_as, read_expression


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

    with bad_file_as_error(path), h5py.File(path, "r") as f:
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
def bad_file_as_error(path: str) -> Iterator[None]:
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


def file_sha256(path: Path) -> str:
    """The sha256 of a file, or of a directory's files in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ChunkSpec:
    """Rows ``start..stop-1`` of the input: the unit of ingest's work (a task each)."""

    source: MatrixSource
    start: int
    stop: int
    input: str  # counts | log1p (data.input)
    log_base: float | None
    cell_ids: tuple[str, ...]  # of rows start..stop, for error messages and shards


INGEST_HINTS = {
    "finite": "fix or drop those cells before ingesting",
    "negative": "scaled or batch-corrected data cannot be ingested; use raw counts, e.g. "
    "--layer counts",
    "integer": "ingest needs raw counts; for log-normalised data pass --input log1p, or "
    "read the counts from another matrix with --layer NAME or --use-raw",
    "looks_raw": "pass --input counts (log1p is for log of normalised counts)",
}


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
            input=spec.input,
            log_base=spec.log_base,
            cell_ids=spec.cell_ids,
            where=f" in cells {spec.start}..{spec.stop - 1}",
            hints=hints or INGEST_HINTS,
        )
