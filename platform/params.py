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
    # the cell-type head's per-gene activation: leaky_relu (slope 0.2; cannot die) | relu (as
    # published, which collapses some fine-tuning runs to one class: docs/training.md)
    head_activation: str = "leaky_relu"


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
    batch_key: str = ""  # obs column naming each cell's dataset/batch (leave-one-dataset-out CV)
    make_unique: bool = False  # make duplicated gene symbols / cell ids unique instead of failing
    min_genes: int = 200  # QC: cells with fewer expressed panel genes are dropped (published)
    target_sum: float = 1e4  # normalize_total (published)
    min_coverage: float = 0.5  # fail when less of the panel is found in the data
    n_folds: int = 5  # stratified folds written to the `fold` column
    seed: int = 0
    shard_mb: float = 96.0  # target Parquet shard size (MiB)
    chunk_cells: int = 20_000  # cells per read task
    shuffle_buffer: int = 4096  # local shuffle buffer of the training loader (cells)
    # a training worker keeps its first epoch's sparse rows in memory up to this size and replays
    # them in later epochs (0: read through Ray Data every epoch)
    epoch_cache_mb: float = 512.0


@dataclass
class TrainParams:
    """Pretraining and fine-tuning (``scbert pretrain`` / ``scbert finetune``)."""

    workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # leave CPUs for Ray Data: workers x this < cluster CPUs
    gpus_per_worker: float = 1.0  # with use_gpu; fractional (0.5) shares a GPU between workers
    batch_size: int = 3  # cells per worker per micro-step (published: 3 per GPU)
    grad_accum: int = 60  # micro-steps per optimiser step (published: 60)
    lr: float = 1e-4  # Adam (published)
    schedule: str = "cosine_restarts"  # cosine_restarts | constant | linear_warmup
    warmup_steps: int = 5  # published values, counted in optimiser steps (not epochs)
    first_cycle_steps: int = 15
    cycle_mult: float = 2.0
    min_lr: float = 1e-6
    gamma: float = 0.9
    epochs: int = 1
    max_steps: int = 0  # optimiser steps; 0 = as many as the epochs give
    grad_clip: float = 100.0  # max gradient norm; 0 = off
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: bool = True
    compile: bool = False  # torch.compile the training forward (eager if compiling fails)
    log_every: int = 10  # optimiser steps between metric reports (MLflow, Ray Train)
    val_every: int = 50  # optimiser steps between validations
    ckpt_every: int = 50  # optimiser steps between checkpoints
    mask_prob: float = 0.15  # pretraining (published)
    replace_prob: float = 0.9
    unfreeze: str = "published"  # fine-tuning: published | all | last_k:N
    class_weights: bool = False  # fine-tuning: inverse-frequency class weights in the loss
    loss: str = "ce"  # fine-tuning: ce | focal | ldam_drw (docs/training.md, "Losses")
    label_smoothing: float = 0.0  # fine-tuning: cross-entropy label smoothing (ce only)
    calibrate: bool = True  # fine-tuning: temperature scaling fitted on the validation split
    collapse_check: bool = True  # fine-tuning: a kept model predicting one class fails the run
    collapse_retries: int = 1  # fine-tuning: runs again with another seed when it collapses
    patience: int = 5  # fine-tuning: validations without a better val macro F1 before stopping
    val_fold: int = 1  # fine-tuning: fold for validation (early stopping, checkpoint choice);
    # -1 = an inner split: val_fraction of the cells outside the test fold, by a seeded hash
    val_fraction: float = 0.1
    test_fold: int = 0  # fine-tuning: fold reported as the test split; -1 = none
    pretrain_val_fold: int = 0  # pretraining: held-out fold for masked-token validation
    seed: int = 0
    storage_path: str = "runs"  # Ray Train checkpoints: a directory or a pyarrow.fs URI
    max_failures: int = 2  # worker failures to recover from (from the last checkpoint)
    data_timeout_s: float = 600.0  # fail, not hang, when no training batch arrives this long


@dataclass
class StageParams:
    """What one stage trains for, over the ``train`` section: ``pretrain`` (``scbert pretrain``)
    and ``finetune`` (``scbert finetune`` and each fold of ``scbert cv``). None: ``train``'s
    value. A ``--set train.KEY=...`` on the command line still wins over the stage's value, and
    ``--set train.epochs`` or ``train.max_steps`` replaces the stage's length (both keys)."""

    epochs: int | None = None
    max_steps: int | None = None


STAGES = ("pretrain", "finetune")
LENGTH_KEYS = {"train.epochs", "train.max_steps"}  # one concept: how long a stage trains


@dataclass
class TuneParams:
    """Sweeps, cross-validation and the promotion gate (sweeps and CV: the tuning issue)."""

    gate_metric: str = "cv/macro_f1"  # promote: the challenger's metric compared to the champion's
    gate_tolerance: float = 0.01  # promote: how far below the champion's the challenger may be


@dataclass
class ServeParams:
    """Serving (``scbert serve``, ``serve run`` with a config YAML; docs/serving.md)."""

    model: str = "models:/scbert-pbmc68k@champion"  # registry URI (alias/version) or checkpoint dir
    host: str = "127.0.0.1"  # HTTP bind address of the Serve proxy (0.0.0.0 in a cluster)
    port: int = 8000
    route_prefix: str = "/"
    min_replicas: int = 1  # autoscaling (Serve autoscaling_config)
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0  # per replica; above it Serve adds replicas
    max_ongoing_requests: int = 16  # per replica; more wait in the proxy's queue
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    look_back_period_s: float = 30.0  # window over which ongoing requests are averaged (> 10)
    replica_cpus: float = 0.5  # ray_actor_options.num_cpus
    replica_gpus: float = 0.0  # ray_actor_options.num_gpus (1 on GPU clusters); bf16 on GPU
    max_batch_size: int = 16  # requests merged into one model call (@serve.batch)
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    model_batch_cells: int = 64  # cells per forward pass (CPU: 32-64 fastest here; GPU: ~1024)
    max_cells_per_request: int = 5000  # more gets 413
    max_body_mb: float = 64.0  # larger bodies get 413
    max_genes: int = 100_000  # genes (columns) in one request; more gets 413
    # An .h5ad's X and names as decoded in memory; more gets 413 (checked before anything is
    # read). 512: a dense float32 X of 5,000 cells (max_cells_per_request) x 25,000 genes, or a
    # CSR X of ~45 M non-zeros. A replica parses one body at a time, at a small multiple of this
    # (tests/test_h5ad_body.py), far inside a serving pod's memory (infra/kuberay: 24 GiB).
    max_decoded_mb: float = 512.0
    threshold: float = 0.5  # default Unassigned threshold (paper: 0.5)
    top_k: int = 3  # default length of each cell's top_k list
    metrics_port: int = 8080  # Prometheus: Ray's metrics export port on every node


@dataclass
class Params:
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    train: TrainParams = field(default_factory=TrainParams)
    pretrain: StageParams = field(default_factory=StageParams)
    finetune: StageParams = field(default_factory=StageParams)
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
    def load(
        cls, path: str | Path, overrides: Iterable[str] = (), *, stage: str | None = None
    ) -> Params:
        """params.yaml (missing file: defaults), then ``section.key=value`` overrides, then (with
        ``stage``) that stage's section over ``train``, except where an override set ``train``."""
        path = Path(path)
        values = yaml.safe_load(path.read_text()) if path.is_file() else None
        if values is not None and not isinstance(values, Mapping):
            raise ParamsError(
                f"{path}: expected a mapping of sections, got {type(values).__name__}"
            )
        params = cls.from_dict(values or {})
        overrides = list(overrides)
        params.override(overrides)
        if stage is not None:
            given = {item.partition("=")[0].strip() for item in overrides}
            params.for_stage(stage, keep=given)
        return params

    def for_stage(self, stage: str, *, keep: Iterable[str] = ()) -> Params:
        """Apply the ``stage`` section's values to ``train`` (not the ``train.KEY`` in ``keep``;
        either length key in ``keep`` keeps both); returns self."""
        if stage not in STAGES:
            raise ParamsError(f"unknown stage {stage!r}; stages are {list(STAGES)}")
        keep = set(keep)
        if keep & LENGTH_KEYS:  # a length given on the command line replaces the stage's
            keep |= LENGTH_KEYS
        for key, value in dataclasses.asdict(getattr(self, stage)).items():
            if value is not None and f"train.{key}" not in keep:
                setattr(self.train, key, value)
        return self

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
        elif kind is float and isinstance(value, str) and _is_number(value):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        elif kind in (int, str) and isinstance(value, kind) and not isinstance(value, bool):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ParamsError(f"parameter {dotted!r} must be {names}, got {value!r}")


_UnionType = type(int | None)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
