"""One typed configuration: ``Params``, sections model, data, train, pretrain, finetune, tune,
serve, annotate, explain and gene_embed.

The same dotted names are used everywhere: ``params.yaml`` (DVC), CLI overrides
(``--set data.min_genes=300``), Tune search spaces and MLflow params (``flatten``). Unknown keys,
values of the wrong type and values out of their range or vocabulary are errors that name the
key, raised when the params are built (read, overridden or constructed), not when a value is
first used.

``Params`` and its sections are frozen: a change is a new object, ``params.replace({"train.seed":
3})`` (dotted keys, typed values) or ``params.override(["train.seed=3"])`` (the ``--set`` text
form); within one section, ``dataclasses.replace(params.train, seed=3)``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from scbert.config import CELL_EMBEDDINGS, CLS_ACTIVATIONS, UNASSIGNED_THRESHOLD, ScBertConfig


class ParamsError(ValueError):
    """A params.yaml, override or value that does not fit ``Params``."""


# The vocabularies of the string-valued parameters (each checked here, and only here).
GENE_EMBEDDINGS = ("gene2vec", "learned")  # what training builds ("none": published checkpoints)
SCHEDULES = ("cosine_restarts", "constant", "linear_warmup")
PRECISIONS = ("auto", "fp32", "bf16")
LOSSES = ("ce", "focal", "ldam_drw")
EMBEDDINGS = ("auto", *CELL_EMBEDDINGS)
RANKINGS = ("attention", "specificity")
WEIGHTINGS = ("binary", "value")
# what an input matrix holds: raw counts, or log1p of normalised counts (inverted to counts first)
INPUTS = ("counts", "log1p")
# keys of older params files, with what replaced them (named in the error)
RENAMED = {"data.input_normalized": "data.input: log1p (was true) or counts (was false)"}
CHUNK_CELLS = 1024  # cells read at a time by annotate, embed and explain


def unfrozen_blocks(unfreeze: str, n_blocks: int) -> int:
    """How many of the last encoder blocks ``train.unfreeze`` trains: ``all`` every one,
    ``published`` the last, ``last_k:N`` the last N (at most ``n_blocks``)."""
    if unfreeze == "all":
        return n_blocks
    if unfreeze == "published":
        return min(1, n_blocks)
    head, _, count = unfreeze.partition(":")
    if head == "last_k" and count.isdigit():
        return min(int(count), n_blocks)
    raise ParamsError(f"train.unfreeze must be published, all or last_k:N, got {unfreeze!r}")


def _architecture(name: str) -> Any:
    """``ScBertConfig``'s default of ``name``: the model's defaults are the params' defaults."""
    return ScBertConfig.__dataclass_fields__[name].default


class Section:
    """What every params section does: its values are coerced to their types (an int where a
    float is due, a YAML 1.1 number read as text) and checked when it is built; ``problems``
    lists what is wrong, each naming its ``section.key``."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            coerced = _coerce(f"{self.SECTION}.{item.name}", value, hints[item.name])
            if coerced is not value:
                object.__setattr__(self, item.name, coerced)
        problems = self.problems()
        if problems:
            raise ParamsError("; ".join(problems))

    def problems(self) -> list[str]:
        return []

    def _failing(self, rules: Iterable[tuple[str, bool, str]]) -> list[str]:
        """``section.key RULE, got VALUE`` of each ``(key, holds, rule)`` that does not hold."""
        return [
            f"{self.SECTION}.{key} {rule}, got {getattr(self, key)!r}"
            for key, holds, rule in rules
            if not holds
        ]


def _one_of(values: Iterable[str]) -> str:
    return "must be one of " + ", ".join(values)


@dataclass(frozen=True)
class ModelParams(Section):
    """Model size and tokenisation; the defaults are ``scbert.ScBertConfig``'s (the paper's).
    ``n_bins`` is applied at load time."""

    SECTION: ClassVar[str] = "model"

    n_bins: int = _architecture("n_bins")
    dim: int = _architecture("dim")
    depth: int = _architecture("depth")
    heads: int = _architecture("heads")
    dim_head: int = _architecture("dim_head")
    nb_features: int = _architecture("nb_features")  # 0: int(dim_head * ln(dim_head)), published
    gene_embedding: str = _architecture("gene_embedding")  # gene2vec | learned
    gene2vec: str = ""  # path to a .npy (panel order) or Gene2vec text file
    # the cell-type head's per-gene activation: leaky_relu (slope 0.2; cannot die) | relu (as
    # published, which collapses some fine-tuning runs to one class: docs/training.md). Not
    # ScBertConfig's default (relu), which reads checkpoints written before the choice existed.
    head_activation: str = "leaky_relu"
    head_dropout: float = _architecture("cls_dropout")  # the head's hidden layers (published: 0)
    # the head adds each gene's token (its bin, as a number) to the encoder's per-gene scalar
    # (not published: docs/training.md)
    head_token_input: bool = _architecture("cls_token_input")
    # with head_token_input: the encoder's per-gene scalar times a learned gate that starts at 0,
    # so the head starts from the tokens alone (not published: docs/training.md)
    head_encoder_gate: bool = _architecture("cls_encoder_gate")

    def problems(self) -> list[str]:
        return self._failing(
            [
                *((key, getattr(self, key) >= 1, "must be >= 1") for key in _POSITIVE_SIZES),
                ("head_dropout", 0 <= self.head_dropout < 1, "must be in [0, 1)"),
                ("nb_features", self.nb_features >= 0, "must be >= 0 (0: the published count)"),
                (
                    "gene_embedding",
                    self.gene_embedding in GENE_EMBEDDINGS,
                    _one_of(GENE_EMBEDDINGS),
                ),
                (
                    "head_activation",
                    self.head_activation in CLS_ACTIVATIONS,
                    _one_of(CLS_ACTIVATIONS),
                ),
                (
                    "head_encoder_gate",
                    self.head_token_input or not self.head_encoder_gate,
                    "needs model.head_token_input=true (the head would start blind)",
                ),
            ]
        )

    def config(
        self, *, n_genes: int, n_classes: int | None, gene2vec: bool, checkpointing: bool
    ) -> ScBertConfig:
        """The ``ScBertConfig`` of this section for a panel of ``n_genes`` (``gene2vec``: the
        gene2vec matrix is given, else a learned gene embedding)."""
        return ScBertConfig(
            n_genes=n_genes,
            n_bins=self.n_bins,
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            dim_head=self.dim_head,
            nb_features=self.nb_features,
            n_classes=n_classes,
            cls_activation=self.head_activation,
            cls_dropout=self.head_dropout,
            cls_token_input=self.head_token_input,
            cls_encoder_gate=self.head_encoder_gate,
            gene_embedding="gene2vec" if gene2vec else "learned",
            activation_checkpointing=checkpointing,
        )


_POSITIVE_SIZES = ("n_bins", "dim", "depth", "heads", "dim_head")


@dataclass(frozen=True)
class DataParams(Section):
    """Ingest (``scbert ingest``) and loading of Parquet cell shards."""

    SECTION: ClassVar[str] = "data"

    name: str = ""  # dataset name; default: the input file's stem
    panel: str = ""  # gene panel: a text file of symbols or a Gene2vec file; "" = build from data
    panel_min_cells: int = 3  # building a panel: genes expressed in at least this many cells
    gene_id_column: str = ""  # align by this var column (e.g. Ensembl ids) instead of var_names
    layer: str = ""  # read counts from this layer instead of .X
    use_raw: bool = False  # read counts from .raw
    input: str = "counts"  # counts | log1p (of normalised counts: inverted first)
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

    def problems(self) -> list[str]:
        return self._failing(
            [
                ("use_raw", not (self.layer and self.use_raw), "cannot go with data.layer"),
                ("input", self.input in INPUTS, _one_of(INPUTS)),
                ("panel_min_cells", self.panel_min_cells >= 0, "must be >= 0"),
                ("min_genes", self.min_genes >= 0, "must be >= 0"),
                ("target_sum", self.target_sum > 0, "must be > 0"),
                ("min_coverage", 0 <= self.min_coverage <= 1, "must be in [0, 1]"),
                ("n_folds", self.n_folds >= 2, "must be >= 2"),
                ("shard_mb", self.shard_mb > 0, "must be > 0"),
                ("chunk_cells", self.chunk_cells >= 1, "must be >= 1"),
                ("shuffle_buffer", self.shuffle_buffer >= 1, "must be >= 1"),
                ("epoch_cache_mb", self.epoch_cache_mb >= 0, "must be >= 0"),
            ]
        )


@dataclass(frozen=True)
class TrainParams(Section):
    """Pretraining and fine-tuning (``scbert pretrain`` / ``scbert finetune``)."""

    SECTION: ClassVar[str] = "train"

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
    val_every: int = 50  # optimiser steps between validations; 0 = none
    ckpt_every: int = 50  # optimiser steps between checkpoints; 0 = only the last
    mask_prob: float = 0.15  # pretraining (published)
    replace_prob: float = 0.9
    unfreeze: str = "published"  # fine-tuning: published | all | last_k:N
    class_weights: bool = False  # fine-tuning: inverse-frequency class weights in the loss
    loss: str = "ce"  # fine-tuning: ce | focal | ldam_drw (docs/training.md, "Losses")
    label_smoothing: float = 0.0  # fine-tuning: cross-entropy label smoothing (ce only)
    # fine-tuning augmentation: each expressed gene of a training cell reads as not detected
    # with this probability, drawn anew every step (docs/training.md); 0 = off
    gene_dropout: float = 0.0
    calibrate: bool = True  # fine-tuning: temperature scaling fitted on the validation split
    collapse_check: bool = True  # fine-tuning: a kept model predicting one class fails the run
    collapse_retries: int = 1  # fine-tuning: runs again with another seed when it collapses
    patience: int = 5  # fine-tuning: validations without a better val macro F1 before stopping
    # fine-tuning: from this step on, the kept model is the mean of the weights at every
    # validation (weight averaging, docs/training.md); 0 = the best validation's weights
    average_from: int = 0
    val_fold: int = 1  # fine-tuning: fold for validation (early stopping, checkpoint choice);
    # -1 = an inner split: val_fraction of the cells outside the test fold, by a seeded hash
    val_fraction: float = 0.1
    test_fold: int = 0  # fine-tuning: fold reported as the test split; -1 = none
    pretrain_val_fold: int = 0  # pretraining: held-out fold for masked-token validation
    seed: int = 0
    storage_path: str = "runs"  # Ray Train checkpoints: a directory or a pyarrow.fs URI
    max_failures: int = 2  # worker failures to recover from (from the last checkpoint)
    data_timeout_s: float = 600.0  # fail, not hang, when no training batch arrives this long

    def problems(self) -> list[str]:
        try:
            unfrozen_blocks(self.unfreeze, 1)
            unfreeze_ok = True
        except ParamsError:
            unfreeze_ok = False
        cosine = self.schedule == "cosine_restarts"
        return self._failing(
            [
                ("workers", self.workers >= 1, "must be >= 1"),
                ("cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"),
                (
                    "gpus_per_worker",
                    self.gpus_per_worker > 0 or (not self.use_gpu and self.gpus_per_worker == 0),
                    "must be > 0 (0 only without train.use_gpu)",
                ),
                ("batch_size", self.batch_size >= 1, "must be >= 1"),
                ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
                ("lr", math.isfinite(self.lr) and self.lr > 0, "must be > 0"),
                ("schedule", self.schedule in SCHEDULES, _one_of(SCHEDULES)),
                ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
                ("first_cycle_steps", self.first_cycle_steps >= 1, "must be >= 1"),
                (
                    "warmup_steps",
                    not cosine or self.warmup_steps < self.first_cycle_steps,
                    f"must be < train.first_cycle_steps ({self.first_cycle_steps}) with "
                    "train.schedule=cosine_restarts",
                ),
                (
                    "cycle_mult",
                    math.isfinite(self.cycle_mult) and self.cycle_mult >= 1,
                    "must be >= 1",
                ),
                ("min_lr", 0 <= self.min_lr <= self.lr, "must be in [0, train.lr]"),
                ("gamma", 0 < self.gamma <= 1, "must be in (0, 1]"),
                ("epochs", self.epochs >= 0, "must be >= 0"),
                ("max_steps", self.max_steps >= 0, "must be >= 0 (0: the epochs' steps)"),
                ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0: off)"),
                ("precision", self.precision in PRECISIONS, _one_of(PRECISIONS)),
                ("log_every", self.log_every >= 1, "must be >= 1"),
                ("val_every", self.val_every >= 0, "must be >= 0 (0: no validation)"),
                ("ckpt_every", self.ckpt_every >= 0, "must be >= 0"),
                ("mask_prob", 0 < self.mask_prob < 1, "must be in (0, 1)"),
                ("replace_prob", 0 <= self.replace_prob <= 1, "must be in [0, 1]"),
                ("unfreeze", unfreeze_ok, "must be published, all or last_k:N"),
                ("loss", self.loss in LOSSES, _one_of(LOSSES)),
                ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
                ("gene_dropout", 0 <= self.gene_dropout < 1, "must be in [0, 1)"),
                ("collapse_retries", self.collapse_retries >= 0, "must be >= 0"),
                ("patience", self.patience >= 0, "must be >= 0 (0: no early stopping)"),
                ("average_from", self.average_from >= 0, "must be >= 0 (0: the best validation)"),
                ("val_fold", self.val_fold >= -1, "must be a fold, or -1 (inner split)"),
                ("val_fraction", 0 < self.val_fraction < 1, "must be in (0, 1)"),
                (
                    "test_fold",
                    self.test_fold >= -1 and not self.test_fold == self.val_fold >= 0,
                    "must be -1 or a fold other than train.val_fold",
                ),
                ("pretrain_val_fold", self.pretrain_val_fold >= 0, "must be a fold (>= 0)"),
                ("max_failures", self.max_failures >= -1, "must be >= 0, or -1 (no limit)"),
                ("data_timeout_s", self.data_timeout_s > 0, "must be > 0"),
            ]
        )


@dataclass(frozen=True)
class StageParams(Section):
    """What one stage trains for, over the ``train`` section: ``pretrain`` (``scbert pretrain``)
    and ``finetune`` (``scbert finetune`` and each fold of ``scbert cv``). None: ``train``'s
    value. A ``--set train.KEY=...`` on the command line still wins over the stage's value, and
    ``--set train.epochs`` or ``train.max_steps`` replaces the stage's length (both keys)."""

    SECTION: ClassVar[str] = "stage"

    epochs: int | None = None
    max_steps: int | None = None

    def problems(self) -> list[str]:
        return self._failing(
            (key, getattr(self, key) is None or getattr(self, key) >= 0, "must be >= 0")
            for key in ("epochs", "max_steps")
        )


@dataclass(frozen=True)
class PretrainParams(StageParams):
    SECTION: ClassVar[str] = "pretrain"


@dataclass(frozen=True)
class FinetuneParams(StageParams):
    SECTION: ClassVar[str] = "finetune"


STAGES = ("pretrain", "finetune")
LENGTH_KEYS = {"train.epochs", "train.max_steps"}  # one concept: how long a stage trains


@dataclass(frozen=True)
class TuneParams(Section):
    """Sweeps, cross-validation and the promotion gate (sweeps and CV: the tuning issue)."""

    SECTION: ClassVar[str] = "tune"

    gate_metric: str = "cv/macro_f1"  # promote: the challenger's metric compared to the champion's
    gate_tolerance: float = 0.01  # promote: how far below the champion's the challenger may be

    def problems(self) -> list[str]:
        return self._failing(
            [
                ("gate_metric", bool(self.gate_metric), "must name a metric"),
                ("gate_tolerance", self.gate_tolerance >= 0, "must be >= 0"),
            ]
        )


@dataclass(frozen=True)
class ServeParams(Section):
    """Serving (``scbert serve``, ``serve run`` with a config YAML; docs/serving.md)."""

    SECTION: ClassVar[str] = "serve"

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
    threshold: float = UNASSIGNED_THRESHOLD  # default Unassigned threshold of a request
    top_k: int = 3  # default length of each cell's top_k list
    metrics_port: int = 8080  # Prometheus: Ray's metrics export port on every node

    def problems(self) -> list[str]:
        return self._failing(
            [
                ("port", 1 <= self.port <= 65535, "must be a port, 1..65535"),
                ("min_replicas", self.min_replicas >= 1, "must be >= 1"),
                (
                    "min_replicas",
                    self.min_replicas <= self.max_replicas,
                    f"must be <= serve.max_replicas ({self.max_replicas})",
                ),
                ("target_ongoing_requests", self.target_ongoing_requests > 0, "must be > 0"),
                ("max_ongoing_requests", self.max_ongoing_requests >= 1, "must be >= 1"),
                ("upscale_delay_s", self.upscale_delay_s >= 0, "must be >= 0"),
                ("downscale_delay_s", self.downscale_delay_s >= 0, "must be >= 0"),
                ("look_back_period_s", self.look_back_period_s > 0, "must be > 0"),
                ("replica_cpus", self.replica_cpus >= 0, "must be >= 0"),
                ("replica_gpus", self.replica_gpus >= 0, "must be >= 0"),
                ("max_batch_size", self.max_batch_size >= 1, "must be >= 1"),
                ("batch_wait_timeout_s", self.batch_wait_timeout_s >= 0, "must be >= 0"),
                ("model_batch_cells", self.model_batch_cells >= 1, "must be >= 1"),
                ("max_cells_per_request", self.max_cells_per_request >= 1, "must be >= 1"),
                ("max_body_mb", self.max_body_mb > 0, "must be > 0"),
                ("max_genes", self.max_genes >= 1, "must be >= 1"),
                ("max_decoded_mb", self.max_decoded_mb > 0, "must be > 0"),
                ("threshold", 0 <= self.threshold <= 1, "must be a probability in [0, 1]"),
                ("top_k", self.top_k >= 1, "must be >= 1"),
                ("metrics_port", 1 <= self.metrics_port <= 65535, "must be a port, 1..65535"),
            ]
        )


@dataclass(frozen=True)
class AnnotateParams(Section):
    """Offline annotation (``scbert annotate``; ``scbert embed`` takes ``batch_size``,
    ``chunk_cells`` and ``embedding`` from here too)."""

    SECTION: ClassVar[str] = "annotate"

    threshold: float = UNASSIGNED_THRESHOLD  # Unassigned below this probability (paper: 0.5)
    batch_size: int = 64  # cells per forward pass
    chunk_cells: int = CHUNK_CELLS  # cells read at a time (a backed file streams)
    # obsm X_scbert: auto (classifier for a fine-tuned model, else encoder) | classifier (the
    # head's last hidden layer) | encoder (the mean encoding)
    embedding: str = "auto"
    majority_vote: bool = False  # also the majority type per over-clustering cluster
    min_prop: float = 0.0  # majority vote: Heterogeneous below this share of the cluster

    def problems(self) -> list[str]:
        return _reading_problems(self) + self._failing(
            [
                ("threshold", 0 <= self.threshold <= 1, "must be a probability in [0, 1]"),
                ("embedding", self.embedding in EMBEDDINGS, _one_of(EMBEDDINGS)),
                ("min_prop", 0 <= self.min_prop <= 1, "must be a fraction in [0, 1]"),
            ]
        )


@dataclass(frozen=True)
class ExplainParams(Section):
    """The genes scBERT attends to per cell type (``scbert explain``)."""

    SECTION: ClassVar[str] = "explain"

    top_n: int = 10  # genes per type
    rank_by: str = "attention"  # attention (the paper's mean attention) | specificity
    min_cells: int = 5  # smaller groups are left out (their means are noise)
    batch_size: int = 32  # cells per forward pass
    chunk_cells: int = CHUNK_CELLS  # cells read at a time

    def problems(self) -> list[str]:
        return _reading_problems(self) + self._failing(
            [
                ("top_n", self.top_n >= 1, "must be >= 1"),
                ("rank_by", self.rank_by in RANKINGS, _one_of(RANKINGS)),
                ("min_cells", self.min_cells >= 1, "must be >= 1"),
            ]
        )


def _reading_problems(section: AnnotateParams | ExplainParams) -> list[str]:
    """``batch_size`` and ``chunk_cells``, one message for both (annotate's and explain's)."""
    if section.batch_size >= 1 and section.chunk_cells >= 1:
        return []
    name = section.SECTION
    return [
        f"batch_size and chunk_cells must be >= 1, got {name}.batch_size="
        f"{section.batch_size} and {name}.chunk_cells={section.chunk_cells}"
    ]


@dataclass(frozen=True)
class GeneEmbedParams(Section):
    """Gene vectors from co-expression (``scbert gene-embed``, docs/gene_embed.md); their width
    is ``model.dim``."""

    SECTION: ClassVar[str] = "gene_embed"

    min_cells: int = 5  # genes expressed in fewer cells get zero vectors
    alpha: float = 0.75  # context-distribution smoothing of the PMI (1 = off)
    weighting: str = "binary"  # a co-occurrence counts 1 (binary) or the expression values
    seed: int = 0  # the randomized SVD's
    batch_cells: int = 1_024  # cells densified at a time

    def problems(self) -> list[str]:
        return self._failing(
            [
                ("min_cells", self.min_cells >= 1, "must be >= 1"),
                ("alpha", 0 < self.alpha <= 1, "must be in (0, 1]"),
                ("weighting", self.weighting in WEIGHTINGS, _one_of(WEIGHTINGS)),
                ("batch_cells", self.batch_cells >= 1, "must be >= 1"),
            ]
        )


@dataclass(frozen=True)
class Params:
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    train: TrainParams = field(default_factory=TrainParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    tune: TuneParams = field(default_factory=TuneParams)
    serve: ServeParams = field(default_factory=ServeParams)
    annotate: AnnotateParams = field(default_factory=AnnotateParams)
    explain: ExplainParams = field(default_factory=ExplainParams)
    gene_embed: GeneEmbedParams = field(default_factory=GeneEmbedParams)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Params:
        """Build from a nested mapping (params.yaml); unknown sections or keys are errors."""
        for name, section_values in values.items():
            _section_type(name)
            if not isinstance(section_values, Mapping):
                raise ParamsError(
                    f"params section {name!r} must be a mapping, got {section_values!r}"
                )
        return cls().replace(
            {f"{name}.{key}": value for name, keys in values.items() for key, value in keys.items()}
        )

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
        overrides = list(overrides)
        params = cls.from_dict(values or {}).override(overrides)
        if stage is not None:
            given = {item.partition("=")[0].strip() for item in overrides}
            params = params.for_stage(stage, keep=given)
        return params

    def replace(self, changes: Mapping[str, Any]) -> Params:
        """A copy with ``{"section.key": value}`` changed (each value typed and checked; the
        changes to one section are applied together, so related keys may change at once)."""
        by_section: dict[str, dict[str, Any]] = {}
        for dotted, value in changes.items():
            name, sep, key = dotted.partition(".")
            if not sep:
                raise ParamsError(f"{dotted!r} is not a section.key name")
            kind: Any = _section_type(name)
            known = [f.name for f in dataclasses.fields(kind)]
            if dotted in RENAMED:
                raise ParamsError(f"parameter {dotted!r} is now {RENAMED[dotted]}")
            if key not in known:
                raise ParamsError(
                    f"unknown parameter {dotted!r}; known in this section: {', '.join(known)}"
                )
            by_section.setdefault(name, {})[key] = value
        sections = {
            name: dataclasses.replace(getattr(self, name), **keys)
            for name, keys in by_section.items()
        }
        return dataclasses.replace(self, **sections)

    def override(self, overrides: Iterable[str]) -> Params:
        """A copy with ``section.key=value`` strings applied (values parsed as YAML scalars)."""
        changes = {}
        for item in overrides:
            dotted, sep, raw = item.partition("=")
            if not sep:
                raise ParamsError(f"override {item!r} is not of the form section.key=value")
            changes[dotted.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        return self.replace(changes)

    def for_stage(self, stage: str, *, keep: Iterable[str] = ()) -> Params:
        """A copy with the ``stage`` section's values applied to ``train`` (not the
        ``train.KEY`` in ``keep``; either length key in ``keep`` keeps both)."""
        if stage not in STAGES:
            raise ParamsError(f"unknown stage {stage!r}; stages are {list(STAGES)}")
        keep = set(keep)
        if keep & LENGTH_KEYS:  # a length given on the command line replaces the stage's
            keep |= LENGTH_KEYS
        return self.replace(
            {
                f"train.{key}": value
                for key, value in dataclasses.asdict(getattr(self, stage)).items()
                if value is not None and f"train.{key}" not in keep
            }
        )

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


def add_params_arguments(parser: Any) -> None:
    """``--params FILE`` and repeatable ``--set SECTION.KEY=VALUE`` on an argparse parser: how
    every command that reads ``Params`` takes them (``Params.load(args.params, args.overrides)``).
    """
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml if present)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one parameter (repeatable)",
    )


def _section_type(name: str) -> type[Section]:
    sections: dict[str, type[Section]] = _hints(Params)
    if name not in sections:
        raise ParamsError(f"unknown params section {name!r}; sections are {list(sections)}")
    return sections[name]


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(kind: type) -> dict[str, Any]:
    """The resolved annotations of a params class (cached: every section built reads them)."""
    if kind not in _HINTS:
        _HINTS[kind] = typing.get_type_hints(kind)
    return _HINTS[kind]


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
