"""The HTTP API's request and response bodies, and their translation into a counts matrix.

Two JSON layouts, exactly one per request:

- sparse: ``{"cells": [{"id": "c1", "genes": ["CD3E", ...], "counts": [3, ...]}, ...]}``, or
  each cell's counts as a map: ``{"id": "c1", "counts": {"CD3E": 3, ...}}``
- dense: ``{"genes": ["CD3E", ...], "matrix": [[3, 0, ...], ...], "ids": [...]}`` (``ids``
  optional: ``cell-0``, ``cell-1``, ... otherwise)

plus the options ``threshold``, ``top_k`` and ``return_embedding``. Unknown fields are refused
(a misspelt option must not be ignored silently). Counts are raw: finite, >= 0, integers;
that rule, the panel alignment and the normalisation are ingest's own functions
(``scbert_platform.pyfunc.aligned_counts``).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Count = Annotated[float, Field(allow_inf_nan=False, ge=0)]
Gene = Annotated[str, Field(min_length=1, max_length=200)]


class RequestError(ValueError):
    """A request the API refuses: ``status`` (4xx), ``code`` and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(
        None, ge=0, le=1, description="below this top probability a cell is Unassigned"
    )
    top_k: int | None = Field(None, ge=1, le=100, description="classes listed per cell")
    return_embedding: bool = Field(False, description="add each cell's embedding (mean encoding)")


class SparseCell(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    genes: list[Gene] = Field(description="gene symbols of the non-zero counts")
    counts: list[Count] = Field(
        description="raw counts, one per gene; or a map gene -> count (then no 'genes')"
    )

    @model_validator(mode="before")
    @classmethod
    def _counts_map(cls, data: Any) -> Any:
        """``{"id": ..., "counts": {"CD3E": 3, ...}}`` -> the genes and counts lists."""
        if isinstance(data, dict) and isinstance(data.get("counts"), dict):
            if "genes" in data:
                raise ValueError("'counts' is a map of gene -> count, so 'genes' must be left out")
            data = {**data, "genes": list(data["counts"]), "counts": list(data["counts"].values())}
        return data

    @model_validator(mode="after")
    def _same_length(self) -> SparseCell:
        if len(self.genes) != len(self.counts):
            raise ValueError(
                f"cell {self.id!r}: {len(self.genes)} genes but {len(self.counts)} counts"
            )
        if len(set(self.genes)) != len(self.genes):
            raise ValueError(f"cell {self.id!r}: duplicated genes {_duplicates(self.genes)}")
        return self


class AnnotateRequest(Options):
    """JSON body of ``POST /v1/annotate``: sparse ``cells`` or dense ``genes`` + ``matrix``."""

    cells: list[SparseCell] | None = None
    genes: list[Gene] | None = None
    matrix: list[list[Count]] | None = None
    ids: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = None

    @model_validator(mode="after")
    def _one_layout(self) -> AnnotateRequest:
        dense = self.genes is not None or self.matrix is not None
        if (self.cells is not None) == dense:
            raise ValueError("send either 'cells' (sparse) or 'genes' and 'matrix' (dense)")
        if dense:
            if self.genes is None or self.matrix is None:
                raise ValueError("the dense layout needs both 'genes' and 'matrix'")
            if len(set(self.genes)) != len(self.genes):
                raise ValueError(f"duplicated genes {_duplicates(self.genes)}")
            for row, values in enumerate(self.matrix):
                if len(values) != len(self.genes):
                    raise ValueError(
                        f"matrix row {row} has {len(values)} values for {len(self.genes)} genes"
                    )
            if self.ids is not None and len(self.ids) != len(self.matrix):
                raise ValueError(f"{len(self.ids)} ids for {len(self.matrix)} matrix rows")
        elif self.ids is not None:
            raise ValueError("'ids' goes with the dense layout; sparse cells carry their own id")
        ids = self.cell_ids()
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicated cell ids {_duplicates(ids)}")
        return self

    def n_cells(self) -> int:
        return len(self.cells) if self.cells is not None else len(self.matrix or [])

    def cell_ids(self) -> list[str]:
        if self.cells is not None:
            return [cell.id for cell in self.cells]
        return self.ids or [f"cell-{i}" for i in range(len(self.matrix or []))]

    def counts(self) -> tuple[Any, list[str]]:
        """(cells x genes CSR counts, the genes of its columns)."""
        import scipy.sparse as sp

        if self.cells is None:
            assert self.genes is not None and self.matrix is not None
            dense = np.asarray(self.matrix, dtype=np.float64).reshape(-1, len(self.genes))
            return sp.csr_matrix(dense), list(self.genes)
        columns: dict[str, int] = {}
        indices = [columns.setdefault(g, len(columns)) for c in self.cells for g in c.genes]
        data = [x for c in self.cells for x in c.counts]
        indptr = np.cumsum([0] + [len(c.genes) for c in self.cells])
        shape = (len(self.cells), max(len(columns), 1))
        return sp.csr_matrix((data, indices, indptr), shape=shape), list(columns) or ["-"]


class Coverage(BaseModel):
    panel_genes: int = Field(description="genes in the model's panel")
    request_genes: int = Field(description="distinct genes named by the request")
    matched_genes: int = Field(description="request genes found in the panel")
    fraction: float = Field(description="matched_genes / panel_genes")
    unknown_genes: int = Field(description="request genes not in the panel (ignored)")


class ClassProbability(BaseModel):
    cell_type: str
    probability: float


class CellResult(BaseModel):
    id: str
    cell_type: str = Field(description="the most probable class, or Unassigned")
    probability: float = Field(description="probability of the most probable class")
    unassigned: bool
    n_genes: int = Field(description="panel genes with a non-zero count in this cell")
    top_k: list[ClassProbability]
    embedding: list[float] | None = None


class ModelRef(BaseModel):
    name: str
    version: str | None
    alias: str | None
    uri: str


class AnnotateResponse(BaseModel):
    model: ModelRef
    coverage: Coverage
    threshold: float
    cells: list[CellResult]


class ErrorBody(BaseModel):
    code: str
    message: str
    detail: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelInfo(BaseModel):
    name: str
    version: str | None
    alias: str | None
    uri: str
    classes: list[str]
    panel_size: int
    panel_sha256: str
    config: dict[str, Any]
    threshold: float
    top_k: int
    max_cells_per_request: int
    max_body_bytes: int
    device: str


def sparse_cells(counts: Any) -> list[dict[str, Any]]:
    """The sparse JSON layout of a counts DataFrame (cells x genes): for clients."""
    cells = []
    for cell_id, row in counts.iterrows():
        nonzero = row[row > 0]
        cells.append(
            {
                "id": str(cell_id),
                "genes": [str(g) for g in nonzero.index],
                "counts": [int(v) if float(v).is_integer() else float(v) for v in nonzero],
            }
        )
    return cells


def _duplicates(names: list[str]) -> list[str]:
    seen: set[str] = set()
    repeated = [n for n in names if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
    return sorted(set(repeated))[:5]
