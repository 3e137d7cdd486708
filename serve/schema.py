"""The HTTP API's request and response bodies, and their translation into a counts matrix.

Two JSON layouts, exactly one per request:

- sparse: ``{"cells": [{"id": "c1", "genes": ["CD3E", ...], "counts": [3, ...]}, ...]}``, or
  each cell's counts as a map: ``{"id": "c1", "counts": {"CD3E": 3, ...}}``
- dense: ``{"genes": ["CD3E", ...], "matrix": [[3, 0, ...], ...], "ids": [...]}`` (``ids``
  optional: ``cell-0``, ``cell-1``, ... otherwise)

plus the options ``threshold``, ``top_k`` and ``return_embedding``. Unknown fields are refused
(a misspelt option must not be ignored silently), and so are values of another JSON type (a
body is validated strictly: ``true`` is not a count of 1, ``"3"`` is not 3). Counts are raw:
finite, >= 0, integers; that rule, the panel alignment and the normalisation are ingest's own
functions (``scbert_platform.track.pyfunc.aligned_counts``).

Before a body is parsed its nesting depth is measured on its bytes (``json_depth``); before it
is validated the cells and genes it declares are held to ``BodyLimits``
(``check_json_sizes``), so that neither Python's stack nor the validator's copies of its lists
are spent on a body that is refused anyway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from scbert_platform.params import ServeParams

# A request nests 4 levels ({"cells": [{"counts": [...]}]}); json.loads recurses once per level
# and 50,000 of them exhaust Python's stack.
MAX_JSON_DEPTH = 32
MAX_NAME_LENGTH = 200  # characters of a gene name or a cell id

Count = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]
Gene = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
CellId = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]


class RequestError(ValueError):
    """A request the API refuses: ``status`` (4xx), ``code`` and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        # names from a client's file can hold lone surrogates (h5py's surrogateescape), which
        # the UTF-8 answer could not encode
        message = message.encode("utf-8", "backslashreplace").decode()
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class BodyLimits:
    """What one request may ask for (the ``serve`` params); each refusal names the parameter."""

    max_cells: int
    max_genes: int
    max_decoded_bytes: int

    @classmethod
    def of(cls, serve: ServeParams) -> BodyLimits:
        return cls(
            max_cells=serve.max_cells_per_request,
            max_genes=serve.max_genes,
            max_decoded_bytes=int(serve.max_decoded_mb * 2**20),
        )

    def check_cells(self, n_cells: int) -> None:
        if n_cells == 0:
            raise RequestError(422, "no_cells", "the request has no cells")
        if n_cells > self.max_cells:
            raise RequestError(
                413,
                "too_many_cells",
                f"{n_cells} cells in one request; the limit is serve.max_cells_per_request = "
                f"{self.max_cells}: split the request",
            )

    def check_genes(self, n_genes: int) -> None:
        if n_genes > self.max_genes:
            raise RequestError(
                413,
                "too_many_genes",
                f"{n_genes} genes in one request; the limit is serve.max_genes = "
                f"{self.max_genes}: leave out genes outside the model's panel",
            )

    def check_decoded(self, n_bytes: int, what: str) -> None:
        if n_bytes > self.max_decoded_bytes:
            raise RequestError(
                413,
                "too_large_decoded",
                f"{what} decode to {n_bytes / 2**20:.1f} MiB; the limit is serve.max_decoded_mb "
                f"= {self.max_decoded_bytes / 2**20:g}: split the cells over several requests, "
                "or send X as a sparse csr_matrix",
            )


# A JSON string (its closing quote optional, so that an unterminated one cannot make the regex
# try again from every later quote), and every byte but the four brackets.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays and objects in a UTF-8 JSON text, from its bytes outside
    strings. Where the text is not valid JSON, ``json.loads`` stops at the first error, and
    up to there this count is its own."""
    brackets = np.frombuffer(_JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS), np.uint8)
    depth = deepest = 0
    for start in range(0, len(brackets), 2**20):  # int64 running depth of 1 Mi brackets at once
        chunk = brackets[start : start + 2**20]
        running = depth + np.cumsum(np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1))
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
    return deepest


def check_json_sizes(raw: Any, limits: BodyLimits) -> None:
    """The cells and genes a parsed body declares (its lists' lengths, and the distinct gene
    names across its cells) within ``limits``; anything not shaped like a request is left to
    validation."""
    if not isinstance(raw, dict):
        return
    rows = [raw.get(key) for key in ("cells", "matrix", "ids")]
    n_cells = [len(row) for row in rows if isinstance(row, list)]
    if n_cells:
        limits.check_cells(max(n_cells))
    gene_lists, value_lists = [raw.get("genes")], list(_list(raw.get("matrix")))
    for cell in _list(raw.get("cells")):
        if isinstance(cell, dict):
            counts = cell.get("counts")
            gene_lists.append(cell.get("genes") if not isinstance(counts, dict) else counts)
            value_lists.append(counts)
    longest = max(
        (len(v) for v in gene_lists + value_lists if isinstance(v, list | dict)), default=0
    )
    names = {
        g
        for genes in gene_lists
        if isinstance(genes, list | dict)
        for g in genes
        if isinstance(g, str)
    }
    limits.check_genes(max(longest, len(names)))


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(
        None, ge=0, le=1, description="below this top probability a cell is Unassigned"
    )
    top_k: int | None = Field(None, ge=1, le=100, description="classes listed per cell")
    return_embedding: bool = Field(False, description="add each cell's embedding (mean encoding)")


class SparseCell(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: CellId
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
    ids: list[CellId] | None = None

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
    # sent only with return_embedding: absent, not null, otherwise
    embedding: list[float] | None = Field(
        None,
        description="the cell's mean encoding (with return_embedding)",
        exclude_if=lambda vector: vector is None,
    )


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


class Health(BaseModel):
    status: str = Field(description="'ok' while the process answers")


class Readiness(BaseModel):
    status: str = Field(description="'ready' once the model answered its warm-up")
    model: str = Field(description="the served model's name")
    version: str | None = Field(description="its registry version (null for a directory)")


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
    max_genes: int
    max_decoded_bytes: int
    max_json_depth: int
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
