"""Which cells train, validate and test a run: ``CellSplit``.

A split is a small rule, not a list of cells, so it travels to every Ray worker in the run's
config and is applied to each block of shard rows as it streams past (``mask``). The rules cover
the paper's protocols:

- ``test_folds`` / ``test_batches``: the test cells (a fold of the ``fold`` column, or whole
  datasets of the ``batch`` column for leave-one-dataset-out);
- ``val_folds``, or ``val_fraction``: validation cells (early stopping, checkpoint choice) are a
  fold, or a seeded random fraction of the cells that are not tested (an inner split);
- ``train_fraction``: keep only this seeded random fraction of the remaining training cells
  (reference-size subsampling);
- ``exclude_labels``: cell types never trained or validated on (novel-type evaluation); their
  cells in the test split stay there, as the novel cells to detect.

Random fractions come from a seeded hash of the cell id, so a cell's role depends only on the
seed and its own id: not on row order, shard layout or how many workers read the data. The
folds themselves are dealt at ingest (``assign_folds``), stratified by label, the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scbert_platform.data.errors import IngestError

ROLES = ("train", "val", "test")


def unit_hash(ids: list[str], salt: str) -> np.ndarray:
    """A uniform value in [0, 1) per id, from a keyed hash of ``salt`` and the id."""
    key = salt.encode()[:64]
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, key=key).digest(), "little")
            / 2.0**64
            for i in ids
        ),
        dtype=np.float64,
        count=len(ids),
    )


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


@dataclass(frozen=True)
class CellSplit:
    test_folds: tuple[int, ...] = ()
    test_batches: tuple[str, ...] = ()
    val_folds: tuple[int, ...] = ()
    val_fraction: float = 0.0
    train_fraction: float = 1.0
    exclude_labels: tuple[str, ...] = ()
    seed: int = 0
    columns: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.train_fraction <= 1.0:
            problems.append(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.val_folds and self.val_fraction:
            problems.append("give val_folds or val_fraction, not both")
        if set(self.val_folds) & set(self.test_folds):
            problems.append(
                f"folds {sorted(set(self.val_folds) & set(self.test_folds))} are "
                "both validation and test"
            )
        if problems:
            raise ValueError("invalid cell split: " + "; ".join(problems))
        needed = ["fold", "label"]
        if self.val_fraction or self.train_fraction < 1.0:
            needed.append("cell_id")
        if self.test_batches:
            needed.append("batch")
        object.__setattr__(self, "columns", tuple(needed))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CellSplit:
        return cls(
            test_folds=tuple(int(f) for f in values.get("test_folds", ())),
            test_batches=tuple(str(b) for b in values.get("test_batches", ())),
            val_folds=tuple(int(f) for f in values.get("val_folds", ())),
            val_fraction=float(values.get("val_fraction", 0.0)),
            train_fraction=float(values.get("train_fraction", 1.0)),
            exclude_labels=tuple(str(label) for label in values.get("exclude_labels", ())),
            seed=int(values.get("seed", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("columns", None)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def describe(self) -> str:
        """One line for logs and MLflow params."""
        parts = []
        if self.test_folds:
            parts.append(f"test folds {list(self.test_folds)}")
        if self.test_batches:
            parts.append(f"test datasets {list(self.test_batches)}")
        if self.val_folds:
            parts.append(f"validation folds {list(self.val_folds)}")
        if self.val_fraction:
            parts.append(f"validation {self.val_fraction:g} of the other cells")
        if self.train_fraction < 1.0:
            parts.append(f"training on {self.train_fraction:g} of the rest")
        if self.exclude_labels:
            parts.append(f"never trained on {list(self.exclude_labels)}")
        return "; ".join(parts) or "every cell trains"

    @property
    def has_test(self) -> bool:
        return bool(self.test_folds or self.test_batches)

    def mask(self, batch: Any, role: str) -> np.ndarray:
        """Boolean mask of the rows of ``batch`` (a pyarrow Table/RecordBatch or a dict of
        columns) that have ``role`` (train, val or test)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        fold = np.asarray(_values(batch, "fold"))
        test = np.isin(fold, self.test_folds)
        if self.test_batches:
            test |= np.isin(np.asarray(_values(batch, "batch"), dtype=object), self.test_batches)
        if role == "test":
            return test
        rest = ~test
        if self.exclude_labels:
            excluded = set(self.exclude_labels)
            rest &= np.array([label not in excluded for label in _values(batch, "label")], bool)
        ids = _values(batch, "cell_id") if "cell_id" in self.columns else []
        val = np.isin(fold, self.val_folds)
        if self.val_fraction:
            val |= unit_hash(ids, f"{self.seed}:val") < self.val_fraction
        val &= rest
        if role == "val":
            return val
        train = rest & ~val
        if self.train_fraction < 1.0:
            train &= unit_hash(ids, f"{self.seed}:reference") < self.train_fraction
        return train

    def counts(self, shards: str | Path) -> dict[str, int]:
        """Cells per role in a shard set (reads only the columns the rules need)."""
        import pyarrow.parquet as pq

        from scbert_platform.data.loader import shard_files

        totals = dict.fromkeys(ROLES, 0)
        for file in shard_files(shards):
            names = pq.ParquetFile(file).schema_arrow.names
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise ValueError(
                    f"{file} has no {missing} column: "
                    + (
                        "ingest with --batch-key to hold out whole datasets"
                        if "batch" in missing
                        else "the shards are not in the shard schema"
                    )
                )
            table = pq.read_table(file, columns=list(self.columns))
            for role in ROLES:
                totals[role] += int(self.mask(table, role).sum())
        return totals


def _values(batch: Any, name: str) -> Any:
    column = batch[name] if isinstance(batch, Mapping) else batch.column(name)
    if hasattr(column, "to_numpy") and name == "fold":
        return column.to_numpy()
    return column.to_pylist() if hasattr(column, "to_pylist") else list(column)
