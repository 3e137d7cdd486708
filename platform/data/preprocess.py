"""The one preprocessing path from expression to model tokens, as small functions.

``check_counts`` (finite, >= 0, integers) -> ``invert_log1p`` and ``recover_counts`` (log1p
input only) -> ``align`` to the panel (missing genes 0, unknown ones dropped) -> ``qc`` (cells
with fewer than ``min_genes`` expressed panel genes) -> ``log_normalise`` (``normalize_total`` to
``target_sum``, then ``log2(1 + x)``) -> ``bin_tokens`` (``scbert.tokens``).

Ingest writes the normalised values to the shards (binning happens at load time); the pyfunc,
``annotate`` / ``embed`` / ``explain``, the plots and Serve run the same functions on new cells.
The values of each step belong to the model: ``Preprocessing`` records them beside its weights
(``preprocessing.json``), and every inference path reads them from there, never from defaults.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scbert_platform.params import INPUTS

PREPROCESSING_FILE = "preprocessing.json"
TAG_PREFIX = "scbert.preprocessing."  # MLflow run and registry version tags
FROM_MODEL = "model"
PUBLISHED_DEFAULTS = "published defaults"
MAX_COUNT = 2**31 - 1  # larger values are no counts, and overflow float32 normalisation
# recovering counts from log-normalised input: scaled values within this relative distance of
# integers are counts (stored log values are often rounded, e.g. to 3 decimals)
COUNT_RECOVERY_TOLERANCE = 0.01

COUNT_HINTS = {
    "finite": "fix or drop those cells",
    "negative": "send raw counts, not scaled or batch-corrected values",
    "integer": "send raw integer counts, not normalised or log values",
    "looks_raw": "read them as raw counts",
}

log = logging.getLogger(__name__)


class PreprocessError(ValueError):
    """Expression that cannot be preprocessed; the message names the problem and the fix.
    ``IngestError`` and ``AnnotationError`` derive from it."""


@contextmanager
def raised_as(error: type[PreprocessError]) -> Iterator[None]:
    """Re-raise a ``PreprocessError`` from inside as ``error`` (same message), so that each
    verb's callers catch one type (``IngestError`` from ingest, ``AnnotationError`` from
    annotate)."""
    try:
        yield
    except PreprocessError as err:
        if isinstance(err, error):
            raise
        raise error(str(err)) from None


# ---------------------------------------------------------------------------------------------
# The steps


def as_counts_matrix(counts: Any) -> sp.csr_matrix:
    """Any matrix-like (dense, scipy sparse, a backed slice) as float64 CSR, duplicates summed."""
    x = sp.csr_matrix(counts, dtype=np.float64)
    x.sum_duplicates()
    return x


def check_counts(
    x: sp.csr_matrix,
    cell_of: Callable[[int], str],
    *,
    integers: bool = True,
    where: str = "",
    hints: dict[str, str] = COUNT_HINTS,
) -> None:
    """The raw-count rules: every value finite, at most ``MAX_COUNT``, none negative and, with
    ``integers``, all integers. ``cell_of(entry)`` names the cell of ``x.data[entry]``; the
    error names the first offending cell and ends with the caller's ``hints`` for that rule."""
    bad = ~np.isfinite(x.data)
    if bad.any():
        raise PreprocessError(
            f"{int(bad.sum())} NaN/inf values{where} (first in cell "
            f"{cell_of(int(np.flatnonzero(bad)[0]))!r}): {hints['finite']}"
        )
    huge = x.data > MAX_COUNT
    if huge.any():
        first = int(np.flatnonzero(huge)[0])
        raise PreprocessError(
            f"value {x.data[first]:.4g} in cell {cell_of(first)!r} is larger than any count "
            f"(at most {MAX_COUNT}; normalisation in float32 would overflow): {hints['finite']}"
        )
    negative = x.data < 0
    if negative.any():
        raise PreprocessError(
            f"negative values in cell {cell_of(int(np.flatnonzero(negative)[0]))!r}: counts "
            f"must be >= 0 ({hints['negative']})"
        )
    fractional = x.data != np.round(x.data)
    if integers and fractional.any():
        first = int(np.flatnonzero(fractional)[0])
        raise PreprocessError(
            f"non-integer value {x.data[first]:.4g} in cell {cell_of(first)!r}: {hints['integer']}"
        )


def cell_namer(x: sp.csr_matrix, cell_ids: Any = None) -> Callable[[int], str]:
    """``cell_of(entry)`` for ``check_counts``: the id of the row holding ``x.data[entry]``."""

    def cell_of(entry: int) -> str:
        row = int(np.searchsorted(x.indptr, entry, side="right")) - 1
        return str(cell_ids[row]) if cell_ids is not None else f"row {row}"

    return cell_of


def invert_log1p(
    x: sp.csr_matrix, log_base: float | None, *, hints: dict[str, str] = COUNT_HINTS
) -> sp.csr_matrix:
    """log1p values (natural log when ``log_base`` is None) back to normalised values
    ``base**v - 1``. All-integer input is refused: it looks like raw counts."""
    if x.nnz and np.all(x.data == np.round(x.data)):
        raise PreprocessError(
            f"the input was declared log-normalised, but every value is an integer (up to "
            f"{x.data.max():.0f}): they look like raw counts; {hints['looks_raw']}"
        )
    x = x.copy()
    x.data = np.expm1(x.data) if log_base is None else np.power(log_base, x.data) - 1
    return x


def read_expression(
    matrix: Any,
    *,
    input: str,
    log_base: float | None,
    cell_ids: Any = None,
    where: str = "",
    hints: dict[str, str] = COUNT_HINTS,
) -> sp.csr_matrix:
    """Rows of an input matrix, checked (``check_counts``; ``input="log1p"`` allows fractions)
    and, for log1p input, inverted to normalised values (``invert_log1p``), as CSR."""
    if input not in INPUTS:
        raise PreprocessError(f"input must be one of {INPUTS}, got {input!r}")
    x = as_counts_matrix(matrix)
    check_counts(x, cell_namer(x, cell_ids), integers=input == "counts", where=where, hints=hints)
    if input == "log1p":
        x = invert_log1p(x, log_base, hints=hints)
    x.eliminate_zeros()
    return x


def row_min(x: sp.csr_matrix) -> np.ndarray:
    """Smallest stored value of each row (1.0 for empty rows)."""
    out = np.ones(x.shape[0])
    nonempty = np.diff(x.indptr) > 0
    out[nonempty] = np.minimum.reduceat(x.data, x.indptr[:-1][nonempty])
    return out


def count_scale_deviation(x: sp.csr_matrix) -> float:
    """Relative distance of ``x / (each cell's smallest value)`` from integers (0: recoverable).

    Normalised data is counts times a per-cell factor; a cell's smallest non-zero value is
    almost always a count of 1, so dividing by it recovers the counts.
    """
    if x.nnz == 0:
        return 0.0
    scaled = x.data / np.repeat(row_min(x), np.diff(x.indptr))
    rounded = np.round(scaled)
    return float((np.abs(scaled - rounded) / np.maximum(rounded, 1.0)).max())


def recover_counts(x: sp.csr_matrix) -> sp.csr_matrix:
    """Integer counts from normalised values: each cell divided by its smallest value, rounded
    (exact where ``count_scale_deviation`` is within ``COUNT_RECOVERY_TOLERANCE``)."""
    x = x.copy()
    x.data = np.round(x.data / np.repeat(row_min(x), np.diff(x.indptr)))
    return x


def align(x: sp.csr_matrix, positions: np.ndarray, n_panel: int) -> sp.csr_matrix:
    """Columns moved to their panel positions (``positions[j]``, -1 = not in the panel: dropped),
    sorted per row; panel genes absent from the input stay 0."""
    cols = positions[x.indices]
    keep = cols >= 0
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=x.shape[0]))])
    aligned = sp.csr_matrix((x.data[keep], cols[keep], indptr), shape=(x.shape[0], n_panel))
    aligned.sort_indices()
    return aligned


def qc(n_genes: np.ndarray, n_counts: np.ndarray, min_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """(too few genes, no counts): masks of the cells QC drops, those with fewer than
    ``min_genes`` expressed panel genes and, of the others, those without panel counts."""
    low = np.asarray(n_genes) < min_genes
    return low, ~low & (np.asarray(n_counts) <= 0)


def log_normalise(x: sp.csr_matrix, target_sum: float, log_base: float = 2.0) -> sp.csr_matrix:
    """scanpy's ``normalize_total(target_sum)`` then ``log1p(base=log_base)`` (the published
    ``log2(1 + x)``), in float32 as scanpy computes it; CSR with the input's sparsity."""
    if x.nnz == 0:
        return sp.csr_matrix(x, dtype=np.float32)
    import anndata
    import scanpy as sc

    adata = anndata.AnnData(x.astype(np.float32))
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata, base=log_base)
    return sp.csr_matrix(adata.X)


def bin_tokens(values: sp.csr_matrix, n_bins: int) -> Any:
    """``log_normalise`` output -> model tokens (cells, n_panel + 1) (``scbert.tokenize``)."""
    from scbert import tokenize

    tokens = tokenize(values, n_bins)
    tokens[np.diff(values.indptr) == 0] = 0
    return tokens


def normalised_values(aligned: sp.csr_matrix, record: Preprocessing) -> sp.csr_matrix:
    """Aligned counts -> the model's values (what its shards hold), with the record's values."""
    return log_normalise(aligned, record.target_sum, record.log_base)


def tokens_from_counts(aligned: sp.csr_matrix, record: Preprocessing) -> Any:
    """Aligned counts -> the model's tokens, with the record's target_sum, log base, n_bins."""
    return bin_tokens(normalised_values(aligned, record), record.n_bins)


# ---------------------------------------------------------------------------------------------
# The record


@dataclass(frozen=True)
class Preprocessing:
    """How a model's training cells were preprocessed; what its inputs must go through.

    ``input``: what ingest read (``counts``, or ``log1p`` inverted to counts); ``target_sum`` of
    ``normalize_total``; ``log_base`` of ``log(1 + x)``; ``n_bins`` of the binning; ``min_genes``
    of the QC; ``panel_sha256`` of the gene panel; ``gene_id_column``: the var column genes were
    matched by (None: the var names)."""

    input: str = "counts"
    target_sum: float = 1e4
    log_base: float = 2.0
    n_bins: int = 5
    min_genes: int = 200
    panel_sha256: str | None = None
    gene_id_column: str | None = None

    def __post_init__(self) -> None:
        if self.input not in INPUTS:
            raise PreprocessError(f"input must be one of {INPUTS}, got {self.input!r}")
        if not self.target_sum > 0 or self.log_base <= 1 or self.n_bins < 1 or self.min_genes < 0:
            raise PreprocessError(
                f"preprocessing record out of range: target_sum {self.target_sum} (> 0), "
                f"log_base {self.log_base} (> 1), n_bins {self.n_bins} (>= 1), min_genes "
                f"{self.min_genes} (>= 0)"
            )

    @classmethod
    def published(cls, *, n_bins: int = 5, panel_sha256: str | None = None) -> Preprocessing:
        """The published scBERT values: raw counts, 1e4, log2, 5 bins (or ``n_bins``), 200 genes."""
        return cls(n_bins=n_bins, panel_sha256=panel_sha256)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], *, n_bins: int) -> Preprocessing:
        """The record of a model trained on these shards (``n_bins``: the model's binning).
        Reads manifests of every schema version: older ones lack ``target_sum`` and
        ``preprocessing.input``, and say ``source.input_normalized`` (a bool) for the input."""
        prep, source = manifest["preprocessing"], manifest["source"]
        params = prep.get("params", {})
        legacy = "log1p" if source.get("input_normalized") else "counts"
        return cls(
            input=prep.get("input") or source.get("input") or legacy,
            target_sum=float(prep.get("target_sum", prep.get("normalize_total", 1e4))),
            log_base=float(prep.get("log_base", 2.0)),
            n_bins=n_bins,
            min_genes=int(prep["min_genes"]),
            panel_sha256=manifest["panel"]["sha256"],
            gene_id_column=prep.get("gene_id_column", params.get("gene_id_column")) or None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """The record from ``to_dict``'s JSON; unknown keys are refused, missing ones fail."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data]
        if unknown or missing:
            raise PreprocessError(
                f"not a preprocessing record: unknown keys {unknown}, missing keys {missing} "
                f"(expected {names})"
            )
        return cls(
            input=str(data["input"]),
            target_sum=float(data["target_sum"]),
            log_base=float(data["log_base"]),
            n_bins=int(data["n_bins"]),
            min_genes=int(data["min_genes"]),
            panel_sha256=data["panel_sha256"],
            gene_id_column=data["gene_id_column"],
        )

    def with_n_bins(self, n_bins: int) -> Preprocessing:
        return replace(self, n_bins=n_bins)

    def tags(self) -> dict[str, str]:
        """MLflow tags ``scbert.preprocessing.<field>`` (run and registry version)."""
        return {f"{TAG_PREFIX}{k}": "" if v is None else str(v) for k, v in self.to_dict().items()}

    def write(self, directory: str | Path) -> Path:
        """``preprocessing.json`` in a checkpoint directory, written atomically."""
        from scbert.atomic import atomic_file

        path = Path(directory) / PREPROCESSING_FILE
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> Preprocessing | None:
        """The checkpoint's record, or None when it has none (older checkpoints)."""
        path = Path(directory) / PREPROCESSING_FILE
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, PreprocessError) as err:
            raise PreprocessError(
                f"{path} is damaged ({err}): write it again from the shards' manifest, or "
                "fetch the model again from its MLflow run"
            ) from None


_WARNED: set[str] = set()


def model_preprocessing(
    directory: str | Path, *, n_bins: int, panel_sha256: str | None
) -> tuple[Preprocessing, str]:
    """(record, where it came from) of a checkpoint directory: its ``preprocessing.json``
    (``model``), checked against the model's ``n_bins`` and panel, or, for a checkpoint without
    one, the published values (``published defaults``, with a warning once per directory)."""
    record = Preprocessing.read(directory)
    if record is None:
        if str(directory) not in _WARNED:
            _WARNED.add(str(directory))
            log.warning(
                "%s has no %s (an older checkpoint or a published one): preprocessing its inputs "
                "with the published values (counts, normalize_total 1e4, log2, %d bins)",
                directory,
                PREPROCESSING_FILE,
                n_bins,
            )
        return Preprocessing.published(n_bins=n_bins, panel_sha256=panel_sha256), PUBLISHED_DEFAULTS
    if record.n_bins != n_bins:
        raise PreprocessError(
            f"{Path(directory) / PREPROCESSING_FILE} says n_bins={record.n_bins}, the model's "
            f"config.json n_bins={n_bins}: the record belongs to another model"
        )
    if panel_sha256 and record.panel_sha256 and record.panel_sha256 != panel_sha256:
        raise PreprocessError(
            f"{Path(directory) / PREPROCESSING_FILE} names panel {record.panel_sha256[:12]}, the "
            f"model's panel.txt is {panel_sha256[:12]}: the record belongs to another model"
        )
    return record, FROM_MODEL
