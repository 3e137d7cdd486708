"""One typed configuration: ``Params``, sections model, data, train, tune and serve.

The same dotted names are used everywhere: ``params.yaml`` (DVC), CLI overrides
(``--set data.min_genes=300``), Tune search spaces and MLflow params (``flatten``). Unknown keys
and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """A params.yaml or override that does not fit ``Params``."""


@dataclass
class ModelParams:
    """Model size and tokenisation (``scbert.ScBertConfig``); ``n_bins`` is applied at load time."""

    n_bins: int = 5
    dim: int = 200
    depth: int = 6
    heads: int = 10
    dim_head: int = 64
    nb_features: int | None = None  # None: int(dim_head * ln(dim_head)), as published
    gene_embedding: str = "gene2vec"  # gene2vec | learned
    gene2vec: str = ""  # path to a .npy (panel order) or Gene2vec text file


@dataclass
class DataParams:
    """Ingest (``scbert ingest``) and loading of Parquet cell shards."""

    name: str = ""  # dataset name; default: the input file's stem
    panel: str = ""  # gene panel: a text file of symbols or a Gene2vec file; "" = build from data
    panel_min_cells: int = 3  # building a panel: genes expressed in at least this many cells
    gene_id_column: str = ""  # align by this var column (e.g. Ensembl ids) instead of var_names
    layer: str = ""  # read counts from this layer instead of .X
    use_raw: bool = False  # read counts from .raw
    input_normalized: bool = False  # values are log1p of normalised counts: inverted first
    label_key: str = ""  # obs column with cell-type labels; "" = unlabelled
    make_unique: bool = False  # make duplicated gene symbols / cell ids unique instead of failing
    min_genes: int = 200  # QC: cells with fewer expressed panel genes are dropped (published)
    target_sum: float = 1e4  # normalize_total (published)
    min_coverage: float = 0.5  # fail when less of the panel is found in the data
    n_folds: int = 5  # stratified folds written to the `fold` column
    seed: int = 0
    shard_mb: float = 96.0  # target Parquet shard size (MiB)
    chunk_cells: int = 20_000  # cells per read task
    shuffle_buffer: int = 4096  # local shuffle buffer of the training loader (cells)


@dataclass
class TrainParams:
    """Training (filled in by the training issue)."""


@dataclass
class TuneParams:
    """Sweeps and cross-validation (filled in by the tuning issue)."""


@dataclass
class ServeParams:
    """Serving (filled in by the serving issue)."""


@dataclass
class Params:
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    train: TrainParams = field(default_factory=TrainParams)
    tune: TuneParams = field(default_factory=TuneParams)
    serve: ServeParams = field(default_factory=ServeParams)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Params:
        """Build from a nested mapping (params.yaml); unknown sections or keys are errors."""
        params = cls()
        for name, section_values in values.items():
            section = _section(params, name)
            if not isinstance(section_values, Mapping):
                raise ParamsError(
                    f"params section {name!r} must be a mapping, got {section_values!r}"
                )
            for key, value in section_values.items():
                _set(section, f"{name}.{key}", value)
        return params

    @classmethod
    def load(cls, path: str | Path, overrides: Iterable[str] = ()) -> Params:
        """params.yaml (missing file: defaults), then ``section.key=value`` overrides."""
        path = Path(path)
        values = yaml.safe_load(path.read_text()) if path.is_file() else None
        if values is not None and not isinstance(values, Mapping):
            raise ParamsError(
                f"{path}: expected a mapping of sections, got {type(values).__name__}"
            )
        params = cls.from_dict(values or {})
        params.override(overrides)
        return params

    def override(self, overrides: Iterable[str]) -> Params:
        """Apply ``section.key=value`` strings (values parsed as YAML scalars); returns self."""
        for item in overrides:
            dotted, sep, raw = item.partition("=")
            if not sep:
                raise ParamsError(f"override {item!r} is not of the form section.key=value")
            self.set(dotted.strip(), yaml.safe_load(raw) if raw.strip() else "")
        return self

    def set(self, dotted: str, value: Any) -> None:
        """Set one ``section.key`` (type-checked)."""
        name, sep, _ = dotted.partition(".")
        if not sep:
            raise ParamsError(f"{dotted!r} is not a section.key name")
        _set(_section(self, name), dotted, value)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flatten(self) -> dict[str, Any]:
        """``{"section.key": value}``, the names used by MLflow params and Tune spaces."""
        return {
            f"{name}.{key}": value
            for name, section in self.to_dict().items()
            for key, value in section.items()
        }

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _section(params: Params, name: str) -> Any:
    names = [f.name for f in dataclasses.fields(params)]
    if name not in names:
        raise ParamsError(f"unknown params section {name!r}; sections are {names}")
    return getattr(params, name)


def _set(section: Any, dotted: str, value: Any) -> None:
    key = dotted.rpartition(".")[2]
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(section)) or "none yet"
        raise ParamsError(f"unknown parameter {dotted!r}; known in this section: {known}")
    setattr(section, key, _coerce(dotted, value, hints[key]))


def _coerce(dotted: str, value: Any, hint: Any) -> Any:
    allowed = (
        typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    )
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        elif kind in (int, str) and isinstance(value, kind) and not isinstance(value, bool):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ParamsError(f"parameter {dotted!r} must be {names}, got {value!r}")


_UnionType = type(int | None)
