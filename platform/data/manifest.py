"""``manifest.json``: what an ingested shard directory holds and how it was made (the input, the
panel, the preprocessing values, the cells kept, their labels, batches and folds, each shard's
size and sha256). Ingest writes it (``Manifest``); training, the loader, CV and the registry read
it (``read_manifest``), and training copies its preprocessing values into the model's record.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scbert_platform.data.errors import ShardError
from scbert_platform.data.inputs import InputTable
from scbert_platform.data.panel import Panel
from scbert_platform.data.shards import ShardResult
from scbert_platform.params import DataParams

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PANEL_FILE = "panel.txt"


@dataclass(frozen=True)
class KeptCells:
    """The input cells that pass QC, with the labels, batches and folds the shards store."""

    n_genes: np.ndarray  # expressed panel genes of every input cell
    low: np.ndarray  # of every input cell: fewer than data.min_genes expressed panel genes
    empty: np.ndarray  # of every input cell: no counts in the panel
    labels: list[str | None] | None  # of the kept cells, in input order
    batches: list[str] | None  # of the kept cells (data.batch_key set)
    folds: np.ndarray  # of the kept cells

    @property
    def keep(self) -> np.ndarray:
        """Whether each input cell is kept."""
        return ~(self.low | self.empty)

    @property
    def rows(self) -> np.ndarray:
        """The input rows of the kept cells, in order."""
        return np.flatnonzero(self.keep)


@dataclass(frozen=True)
class Manifest:
    """What one ingest wrote, as ``manifest.json`` records it (``as_dict``, ``write``)."""

    dataset: str  # data.name, or the output directory's name
    params: DataParams
    table: InputTable
    panel: Panel
    genes_found: int  # panel genes present in the input
    cells: KeptCells
    counts_recovered: bool  # log-normalised input turned back into counts
    shards: Sequence[ShardResult]

    def write(self, directory: Path) -> dict[str, Any]:
        """Write ``directory/manifest.json``; return what it holds."""
        manifest = self.as_dict()
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    def as_dict(self) -> dict[str, Any]:
        import importlib.metadata as md

        return {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.dataset,
            "source": self._source(),
            "panel": self._panel(),
            "preprocessing": self._preprocessing(),
            "genes": self._genes(),
            "cells": self._cells(),
            "labels": self._labels(),
            "batches": self._batches(),
            "folds": self._folds(),
            "shards": [asdict(r) for r in self.shards],
            "software": {
                name: md.version(name)
                for name in ("scbert-platform", "anndata", "scanpy", "pyarrow")
            },
        }

    def _source(self) -> dict[str, Any]:
        table = self.table
        return {
            "path": str(table.path),
            "kind": table.kind,
            "sha256": table.sha256,
            "matrix": table.source.location,
            "input": self.params.input,  # counts | log1p (before: input_normalized, a bool)
            "log_base": table.log_base,
            "counts_recovered": self.counts_recovered,
        }

    def _panel(self) -> dict[str, Any]:
        panel = self.panel
        return {
            "name": panel.name,
            "file": PANEL_FILE,
            "sha256": panel.sha256,
            "n_genes": len(panel),
            "gene_index_type": "uint16" if len(panel) <= 65536 else "int32",
        }

    def _preprocessing(self) -> dict[str, Any]:
        params = self.params
        return {
            "align": "by " + (params.gene_id_column or "var_names") + "; missing genes = 0",
            "input": params.input,
            "gene_id_column": params.gene_id_column or None,
            "min_genes": params.min_genes,
            "normalize_total": params.target_sum,
            "target_sum": params.target_sum,
            "log": "log2(1 + x)",
            "log_base": 2.0,
            "binning": "at load time: min(value, model.n_bins) truncated (scbert.tokens)",
            "params": asdict(params),
        }

    def _genes(self) -> dict[str, Any]:
        n_panel, n_input = len(self.panel), len(self.table.genes)
        return {
            "panel": n_panel,
            "found": self.genes_found,
            "coverage": self.genes_found / n_panel,
            "input": n_input,
            "dropped_not_in_panel": n_input - self.genes_found,
        }

    def _cells(self) -> dict[str, Any]:
        cells, keep = self.cells, self.cells.keep
        return {
            "input": self.table.n_cells,
            "kept": int(keep.sum()),
            "dropped": {
                f"fewer than {self.params.min_genes} expressed panel genes": int(cells.low.sum()),
                "no counts in the panel": int(cells.empty.sum()),
            },
            "median_genes_per_kept_cell": float(np.median(cells.n_genes[keep])),
        }

    def _labels(self) -> dict[str, Any]:
        labels = self.cells.labels or []
        return {
            "key": self.params.label_key or None,
            "counts": _counts("<unlabelled>" if label is None else label for label in labels),
        }

    def _batches(self) -> dict[str, Any] | None:
        if self.cells.batches is None:
            return None
        return {"key": self.params.batch_key, "counts": _counts(self.cells.batches)}

    def _folds(self) -> dict[str, Any]:
        n_folds = self.params.n_folds
        counts = Counter(int(f) for f in self.cells.folds)
        return {
            "n_folds": n_folds,
            "seed": self.params.seed,
            "counts": {str(k): counts[k] for k in range(n_folds)},
        }


def _counts(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


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
