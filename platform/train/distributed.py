"""Ray Train wiring for ``scbert pretrain`` and ``scbert finetune``: a ``TorchTrainer`` (DDP) fed
by Ray Data shards, checkpoints to ``train.storage_path``, recovery from worker failures, and
MLflow tracking (rank 0 logs per-step metrics; the driver logs the run's context and results).

The loop itself is ``scbert_platform.train.loop.run_loop``; this module only connects it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scbert import ScBert, load_pretrained, load_published, save_pretrained
from scbert.atomic import atomic_file, copy_directory
from scbert_platform.data.loader import (
    EpochCache,
    ShardInfo,
    cell_dataset,
    dense_batches,
    iter_local_batches,
)
from scbert_platform.data.manifest import MANIFEST, read_manifest
from scbert_platform.data.preprocess import Preprocessing
from scbert_platform.data.splits import CellSplit
from scbert_platform.params import Params
from scbert_platform.train.loop import (
    ClassLoss,
    CompiledWithFallback,
    LoopHooks,
    LoopState,
    add_to_mean,
    build_optimizer,
    class_counts,
    class_weights,
    cpu_copy,
    evaluate_classifier,
    evaluate_pretraining,
    finetune_loss,
    model_config,
    prepare_device,
    pretrain_loss,
    restore_training_state,
    run_loop,
    set_trainable,
    steps_per_epoch,
    training_state,
    with_timeout,
)
from scbert_platform.train.progress import board_feed, step_progress

MODEL_DIR = "model"  # in a Ray Train checkpoint: our checkpoint directory
STATE_FILE = "train_state.pt"  # optimiser, schedule, loop position, RNG
MLFLOW_RUN_FILE = "mlflow_run_id"
CHECKPOINT_TAG = "scbert.checkpoint"  # on a run: the directory of its final (best) model


CALIBRATION_FILE = "calibration.json"
FAILURE_TAG = "scbert.failure"
TEST_PREDICTIONS = "evaluation/test_predictions.npz"  # a fine-tuning run's test fold, in MLflow


class TrainingError(RuntimeError):
    """A run that cannot start as configured; the message says what to change."""


@dataclass
class TrainResult:
    run_name: str
    mlflow_run_id: str
    checkpoint: str  # our checkpoint directory of the final (fine-tuning: best) model
    metrics: dict[str, float]
    steps: int
    model_uri: str | None = None  # the MLflow pyfunc of a fine-tuned model


def _initial_model(config: dict[str, Any], info: ShardInfo) -> ScBert:
    params = Params.from_dict(config["params"])
    gene2vec = None
    if params.model.gene_embedding == "gene2vec":
        from scbert import load_gene2vec_text

        gene2vec = load_gene2vec_text(params.model.gene2vec, info.panel)
    n_classes = len(info.labels) if config["task"] == "finetune" else None
    source = config.get("init_from")
    if config["task"] == "finetune" and source:
        model = _load_init_from(Path(source))  # checked by fit (check_init_from) beforehand
        model.encoder.activation_checkpointing = params.train.activation_checkpointing
        return model.with_cell_type_head(
            len(info.labels),
            activation=params.model.head_activation,
            dropout=params.model.head_dropout,
            token_input=params.model.head_token_input,
            encoder_gate=params.model.head_encoder_gate,
        )
    cfg = model_config(
        params.model,
        n_genes=info.n_genes,
        n_classes=n_classes,
        gene2vec=gene2vec is not None,
        checkpointing=params.train.activation_checkpointing,
    )
    return ScBert(config=cfg, gene2vec=gene2vec)


WORKERS_DIR = "workers"  # in a run's directory: one file per worker process (rank, pid, node)


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function of the TorchTrainer: set up (``Worker``), then ``run_loop``."""
    Worker(config).run()


class Worker:
    """One Ray Train worker of a run: its model, optimiser and loop state, the batches it trains
    and validates on, and what it reports (MLflow from rank 0, Ray Train checkpoints)."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        self.config = config
        self.params = Params.from_dict(config["params"])
        self.train = train = self.params.train
        self.task = config["task"]
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = device = ray.train.torch.get_device()
        prepare_device(device, train.precision)
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))
        torch.manual_seed(train.seed)  # the same on every rank: same init, same feature redraws
        self.info = ShardInfo.read(config["shards"], digests=False)  # fit hashed them already
        self.split = CellSplit.from_dict(config["split"])
        self.model = _initial_model(config, self.info)
        if self.task == "finetune":
            set_trainable(self.model, "all" if config.get("from_scratch") else train.unfreeze)
        self.model.to(device)
        self.optimizer, self.scheduler = build_optimizer(self.model, train)
        self.generator = torch.Generator(device=device).manual_seed(train.seed * 1009 + self.rank)
        self.state = LoopState()
        self.best: dict[str, torch.Tensor] = {}  # the best validation's weights
        self.average: dict[str, torch.Tensor] = {}  # their mean from train.average_from on
        self.validation_cache: list[dict[str, Any]] = []
        self.mlflow = _mlflow_client(config) if self.rank == 0 else None
        self.shard = EpochCache(
            ray.train.get_dataset_shard("train"), self.params.data.epoch_cache_mb * 2**20
        )
        self.criterion = self._class_loss() if self.task == "finetune" else None

    def run(self) -> None:
        """Restore the latest checkpoint (after a failure or a ``--resume``), then train."""
        import ray.train
        import ray.train.torch

        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            self.restore(checkpoint)
        self.record_process()
        wrapped = ray.train.torch.prepare_model(self.model) if self.world > 1 else self.model
        no_sync = getattr(wrapped, "no_sync", None)
        if self.train.compile:
            wrapped = CompiledWithFallback(wrapped)
        hooks = LoopHooks(
            report=self.report, validate=self.validate, no_sync=no_sync, is_chief=self.rank == 0
        )
        if self.rank == 0 and self.config.get("progress_board") is not None:
            hooks.progress = board_feed(self.config["progress_board"])
        finetune = self.task == "finetune"
        run_loop(
            wrapped,
            self.optimizer,
            self.scheduler,
            self.loss,
            self.epochs,
            params=self.train,
            total_steps=self.config["total_steps"],
            state=self.state,
            hooks=hooks,
            device=self.device,
            early_stop_metric="val/macro_f1" if finetune else None,
            on_best=self.keep_best if finetune else None,
        )

    def restore(self, checkpoint: Any) -> None:
        with checkpoint.as_directory() as directory:
            restored = load_pretrained(Path(directory) / MODEL_DIR).model
            self.model.load_state_dict(restored.state_dict())
            saved = torch.load(Path(directory) / STATE_FILE, weights_only=True)
            self.state = restore_training_state(
                saved, self.optimizer, self.scheduler, self.generator
            )
            self.best.update(saved.get("best_weights") or {})
            self.average.update(saved.get("average_weights") or {})
        if self.rank == 0:
            resumed = f"resumed from step {self.state.step} (epoch {self.state.epoch})"
            print(resumed, file=sys.stderr)
            if self.config.get("progress_board") is not None:
                self.config["progress_board"].post.remote({"message": resumed})

    def record_process(self) -> None:
        """Where this worker runs, for whoever must find it (py-spy, a stuck run, the fault
        tests): ``RUN/workers/rank<R>.json`` in a local run directory, rewritten at every (re)start
        with the step it started from. A sweep's chief also notes its placement group, which the
        sweep's driver frees if the trial is stopped."""
        import os

        import ray

        if self.rank == 0 and "pg_file" in self.config:
            group = ray.util.get_current_placement_group()
            if group is not None:
                with open(self.config["pg_file"], "a") as out:
                    out.write(group.id.hex() + "\n")
        if not self.config.get("run_dir"):
            return
        record = {
            "rank": self.rank,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "started_at_step": self.state.step,
        }
        folder = Path(self.config["run_dir"], WORKERS_DIR)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / f"rank{self.rank}.json") as tmp:
            tmp.write_text(json.dumps(record) + "\n")

    def _class_loss(self) -> ClassLoss:
        train, labels = self.train, self.info.labels
        counts = read_manifest(self.config["shards"])["labels"]["counts"]
        return ClassLoss(
            kind=train.loss,
            class_weight=class_weights(counts, labels).to(self.device)
            if train.class_weights
            else None,
            label_smoothing=train.label_smoothing,
            counts=class_counts(counts, labels).to(self.device),
            total_steps=self.config["total_steps"],
        )

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> Any:
        if self.criterion is not None:
            return finetune_loss(
                model,
                batch,
                loss=self.criterion,
                step=self.state.step,
                device=self.device,
                gene_dropout=self.train.gene_dropout,
                n_bins=self.params.model.n_bins,
                generator=self.generator,
            )
        return pretrain_loss(
            model,
            batch,
            n_bins=self.params.model.n_bins,
            generator=self.generator,
            params=self.train,
            device=self.device,
        )

    def epochs(self, epoch: int) -> Any:
        train = self.train
        batches = dense_batches(
            self.shard,
            self.info.n_genes,
            batch_size=train.batch_size,
            shuffle_buffer=self.params.data.shuffle_buffer,
            seed=train.seed + epoch,
            device=self.device,
        )
        return with_timeout(
            batches,
            train.data_timeout_s,
            f"no training batch arrived for {train.data_timeout_s:g} s: the Ray Data pipeline is "
            "stalled, usually because the training workers hold every CPU Ray Data could use "
            "(lower train.cpus_per_worker, or give the cluster more CPUs)",
        )

    def validation_batches(self) -> Any:
        """The validation cells, read once and kept when they are small (as the epochs)."""
        if self.validation_cache:
            return self.validation_cache
        batches = iter_local_batches(
            self.config["shards"],
            self.params.model.n_bins,
            split=self.split,
            role="val",
            batch_size=64,
            digests=False,
        )
        kept, size = [], 0
        for batch in batches:
            size += batch["tokens"].nbytes
            if size > self.params.data.epoch_cache_mb * 2**20:
                return itertools.chain(kept, [batch], batches)
            kept.append(batch)
        self.validation_cache.extend(kept)
        return self.validation_cache

    def validate(self) -> dict[str, float]:
        """Rank 0 validates; every rank gets its metrics (the same early-stopping decision)."""
        metrics: dict[str, float] = {}
        precision = self.train.precision
        if self.rank == 0 and self.task == "finetune":
            metrics, _ = evaluate_classifier(
                self.model,
                self.validation_batches(),
                self.info.labels,
                device=self.device,
                precision=precision,
            )
        elif self.rank == 0:
            metrics = evaluate_pretraining(
                self.model,
                self.validation_batches(),
                n_bins=self.params.model.n_bins,
                seed=self.train.seed,
                device=self.device,
                precision=precision,
            )
        if self.world > 1:
            shared = [metrics]
            torch.distributed.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        start = self.train.average_from
        if self.task == "finetune" and start and self.state.step >= start:
            self.add_to_average()
        return metrics

    def keep_best(self) -> None:
        self.best = cpu_copy(self.model.state_dict())

    def add_to_average(self) -> None:
        """The validated weights into the running mean (every rank holds the same weights)."""
        self.state.averaged += 1
        add_to_mean(self.average, self.model.state_dict(), self.state.averaged)

    def kept_weights(self) -> dict[str, torch.Tensor] | None:
        """The weights a finished fine-tuning run keeps: the mean of the validated snapshots
        (``train.average_from``) when any were taken, else the best validation's, else None (the
        last step's)."""
        return self.average or self.best or None

    def report(self, metrics: dict[str, float], due: bool) -> None:
        """Metrics to MLflow (rank 0) and Ray Train; with ``due``, a checkpoint too: the model,
        and the best and averaged weights for a resume; once the run has finished, the model is
        the kept weights (``kept_weights``)."""
        import ray.train

        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            stamp, step = int(time.time() * 1000), self.state.step
            client.log_batch(
                run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in metrics.items()]
            )
        if not due:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if self.rank == 0:
                state = self.state
                finished = state.step >= self.config["total_steps"] or state.stopped_early
                resume = training_state(self.optimizer, self.scheduler, state, self.generator)
                resume |= {"best_weights": self.best, "average_weights": self.average}
                _write_checkpoint(
                    Path(tmp),
                    self.model,
                    self.kept_weights() if finished else None,
                    self.info,
                    self.task,
                    resume,
                )
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=saved)


def _write_checkpoint(
    directory: Path,
    model: ScBert,
    weights: dict[str, torch.Tensor] | None,
    info: ShardInfo,
    task: str,
    state: dict[str, Any],
) -> None:
    if weights is not None:
        current = cpu_copy(model.state_dict())
        model.load_state_dict(weights)
    classes = info.labels if task == "finetune" else None  # the model's: its data's labels
    save_pretrained(model, directory / MODEL_DIR, panel=info.panel, classes=classes)
    if weights is not None:
        model.load_state_dict(current)
    torch.save(state, directory / STATE_FILE)


def _mlflow_client(config: dict[str, Any]) -> tuple[Any, str] | None:
    if not config.get("mlflow_run_id"):
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=config["tracking_uri"]), config["mlflow_run_id"]


def check_resources(train: Any, cluster_cpus: float) -> None:
    """Fail fast where workers would take every CPU and starve the Ray Data pipeline (which
    otherwise hangs until Ray Data's no-progress timeout)."""
    wanted = train.workers * train.cpus_per_worker
    if wanted > cluster_cpus - 0.5:
        fit = max((cluster_cpus - 1) / train.workers, 0.25)
        raise TrainingError(
            f"{train.workers} workers x {train.cpus_per_worker} CPUs = {wanted:g} of the cluster's "
            f"{cluster_cpus:g} CPUs leaves under 0.5 CPU for Ray Data, which would stall: set "
            f"train.cpus_per_worker={fit:g} (fractional is fine) or fewer train.workers"
        )


def check_params(params: Params, n_folds: int) -> None:
    """What ``Params`` cannot check on its own (each value's type and range it checked when it
    was built): the gene2vec file, the folds against the data's, a GPU on this machine. Checked
    before anything starts, rather than failing inside the workers."""
    train, model = params.train, params.model
    problems = []
    if model.gene_embedding == "gene2vec" and not model.gene2vec:
        problems.append(
            "model.gene_embedding=gene2vec needs model.gene2vec (a Gene2vec text file for the "
            "panel; `scbert gene-embed` learns one from the shards), or set "
            "model.gene_embedding=learned"
        )
    elif model.gene2vec and not Path(model.gene2vec).is_file():
        problems.append(f"model.gene2vec: {model.gene2vec} does not exist")
    if not train.pretrain_val_fold < n_folds:
        problems.append(f"train.pretrain_val_fold must be a fold 0..{n_folds - 1}")
    if not train.val_fold < n_folds:
        problems.append(f"train.val_fold must be a fold 0..{n_folds - 1}, or -1 (inner split)")
    if not train.test_fold < n_folds:
        problems.append(f"train.test_fold must be a fold 0..{n_folds - 1}, or -1 (none)")
    if train.use_gpu and not torch.cuda.is_available():
        problems.append("train.use_gpu=true, but this machine has no CUDA GPU")
    if problems:
        raise TrainingError("; ".join(problems))


def _load_init_from(path: Path) -> ScBert:
    """A pretrained model: our checkpoint directory, or a published ``.pth``."""
    return load_pretrained(path).model if path.is_dir() else load_published(path)


def check_init_from(source: str | Path, info: ShardInfo) -> None:
    """A pretrained checkpoint that the workers could not load (or whose panel is not the
    data's) fails here, with a message, before Ray starts anything."""
    import pickle

    path = Path(source)
    if not path.exists():
        raise TrainingError(f"--init-from {source}: no such checkpoint directory or .pth file")
    try:
        model = _load_init_from(path)
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as err:
        raise TrainingError(
            f"--init-from {source} cannot be loaded ({err}): give a directory written by "
            "scbert pretrain --out, or a published scBERT .pth checkpoint"
        ) from err
    if model.config.n_genes != info.n_genes:
        raise TrainingError(
            f"{source} has a panel of {model.config.n_genes} genes, the data {info.n_genes}: "
            "ingest with that model's panel (--panel)"
        )


def default_split(task: str, params: Params) -> CellSplit:
    """The split ``params.train`` describes: pretraining validates on ``pretrain_val_fold``;
    fine-tuning tests on ``test_fold`` (-1: none) and validates on ``val_fold`` (-1: an inner
    split of ``val_fraction`` of the other cells)."""
    train = params.train
    if task == "pretrain":
        return CellSplit(val_folds=(train.pretrain_val_fold,), seed=train.seed)
    return CellSplit(
        test_folds=(train.test_fold,) if train.test_fold >= 0 else (),
        val_folds=(train.val_fold,) if train.val_fold >= 0 else (),
        val_fraction=train.val_fraction if train.val_fold < 0 else 0.0,
        seed=train.seed,
    )


def _tune_callback() -> Any:
    """Forwards the reports that carry validation metrics from the Train workers to the Tune
    trial this run belongs to: one Tune result per validation, so schedulers such as ASHA see
    ``val/macro_f1`` in every result."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationToTune(TuneReportCallback):  # type: ignore[misc]
        def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
            if metrics and any(key.startswith("val/") for key in metrics[0]):
                super().after_report(run_context, metrics, checkpoint)

    return ValidationToTune()


def _trainer(
    config: dict[str, Any],
    train: Any,
    run_name: str,
    storage_path: str,
    worker_resources: dict[str, float] | None,
) -> Any:
    """The TorchTrainer of one run: ``train_worker`` on ``train.workers`` workers, fed by the
    split's Ray Data dataset, checkpointing to ``storage_path``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    params = Params.from_dict(config["params"])
    split = CellSplit.from_dict(config["split"])
    trainer, data_config = TorchTrainer, ray.train.DataConfig()
    if train.workers == 1:
        # One worker needs no torch.distributed process group, whose rendezvous store (PyTorch's
        # TCPStore, which takes no bind address) would listen on every interface for the run
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        trainer = DataParallelTrainer
        # nor a streaming split, whose coordinator actor is one more process to start (about
        # 2 s of a short run here): the worker iterates the dataset itself
        data_config = ray.train.DataConfig(datasets_to_split=[])
    return trainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.workers,
            use_gpu=train.use_gpu,
            resources_per_worker={
                "CPU": train.cpus_per_worker,
                **({"GPU": train.gpus_per_worker} if train.use_gpu else {}),
                **(worker_resources or {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[_tune_callback()] if config.get("report_to_tune") else None,
        ),
        datasets={"train": cell_dataset(config["shards"], params.model.n_bins, split=split)},
        dataset_config=data_config,
    )


class CollapsedRun(TrainingError):
    """A fine-tuning run whose kept model predicts one class for every validation cell (or whose
    loss stopped being finite): failed with the reason, never registered."""


def fit(
    task: str,
    shards: str | Path,
    params: Params,
    **options: Any,
) -> TrainResult:
    """Train on Ray and track the run in MLflow (``_fit_once``, whose arguments it takes).

    A fine-tuning run that collapses (``CollapsedRun``: its validation predictions all on one
    class, or a loss that is not finite) is failed in MLflow with the reason and run again with
    another seed, up to ``train.collapse_retries`` times, as ``RUN-retryN``."""
    retries = params.train.collapse_retries if task == "finetune" else 0
    name = options.pop("run_name", None) or f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(retries + 1):
        tried, run_name = params, name
        if attempt:
            tried = params.replace({"train.seed": params.train.seed + 1000 * attempt})
            run_name = f"{name}-retry{attempt}"
            if options.get("resume"):  # a resumed study: this retry may not have started yet
                storage = Path(params.train.storage_path)
                options["resume"] = any((storage / run_name).glob("checkpoint_*"))
        try:
            return _fit_once(task, shards, tried, run_name=run_name, **options)
        except CollapsedRun as err:
            if attempt == retries:
                raise
            seed = params.train.seed + 1000 * (attempt + 1)
            print(
                f"warning: {err}; trying again with train.seed={seed} "
                f"(retry {attempt + 1} of {retries})",
                file=sys.stderr,
            )
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RunPlan:
    """What one run will do, settled (and checked) before Ray or MLflow start anything."""

    task: str
    shards: Path
    params: Params
    info: ShardInfo
    manifest: dict[str, Any]
    split: CellSplit
    n_cells: dict[str, int]
    per_epoch: int
    total_steps: int
    run_name: str
    storage_path: str
    run_dir: Path | None  # None: remote storage (a pyarrow.fs URI)
    init_from: str | None
    from_scratch: bool

    def worker_config(self, mlflow_run_id: str, report_to_tune: bool) -> dict[str, Any]:
        """What ``train_worker`` gets (plain values: it travels to the Ray workers)."""
        from scbert_platform.track.runs import tracking_uri

        return {
            "params": self.params.to_dict(),
            "task": self.task,
            "shards": str(self.shards),
            "init_from": str(Path(self.init_from).resolve()) if self.init_from else None,
            "from_scratch": self.from_scratch,
            "total_steps": self.total_steps,
            "split": self.split.to_dict(),
            "mlflow_run_id": mlflow_run_id,
            "tracking_uri": tracking_uri(),
            "report_to_tune": report_to_tune,
            "run_dir": str(self.run_dir) if self.run_dir else None,
        }


def plan_run(
    task: str,
    shards: str | Path,
    params: Params,
    *,
    init_from: str | None = None,
    from_scratch: bool = False,
    run_name: str | None = None,
    resume: bool = False,
    split: CellSplit | None = None,
    hashed: bool = False,
) -> RunPlan:
    """Check the run against its shards and the cluster (Ray is started here if none runs) and
    settle its split, length and directory; ``hashed``: a study's driver hashed the shards."""
    if task not in ("pretrain", "finetune"):
        raise ValueError(f"task must be pretrain or finetune, got {task!r}")
    shards = Path(shards).resolve()
    info = ShardInfo.read(shards, digests=not hashed)
    manifest = read_manifest(shards)
    check_params(params, int(manifest["folds"]["n_folds"]))
    if params.model.gene2vec:  # the workers' working directory differs
        model = dataclasses.replace(
            params.model, gene2vec=str(Path(params.model.gene2vec).resolve())
        )
        params = dataclasses.replace(params, model=model)
    if task == "finetune" and len(info.labels) < 2:
        raise TrainingError(f"{shards} has no cell-type labels: ingest with --label-key")
    if task == "finetune" and init_from:
        check_init_from(init_from, info)
    from scbert_platform.cluster import start_ray

    check_resources(params.train, start_ray())
    split = split or default_split(task, params)
    n_cells = split.counts(shards)
    if n_cells["train"] == 0 or n_cells["val"] == 0:
        raise TrainingError(
            f"the split ({split.describe()}) leaves {n_cells['train']} training and "
            f"{n_cells['val']} validation cells in {shards}"
        )
    train = params.train
    per_epoch = steps_per_epoch(n_cells["train"], train)
    run_name = run_name or f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    remote = "://" in train.storage_path
    storage = None if remote else Path(train.storage_path).resolve()
    run_dir = storage / run_name if storage else None
    if run_dir is not None:
        exists = any(run_dir.glob("checkpoint_*"))
        if exists and not resume:
            raise TrainingError(
                f"run {run_name} already exists in {storage}: continue it with --resume "
                f"{run_name}, or choose another --run-name"
            )
        if resume and not exists:
            raise TrainingError(f"no run {run_name} with a checkpoint in {storage} to resume")
    return RunPlan(
        task=task,
        shards=shards,
        params=params,
        info=info,
        manifest=manifest,
        split=split,
        n_cells=n_cells,
        per_epoch=per_epoch,
        total_steps=train.max_steps or per_epoch * train.epochs,
        run_name=run_name,
        storage_path=train.storage_path if remote else str(storage),
        run_dir=run_dir,
        init_from=init_from,
        from_scratch=from_scratch,
    )


def _fit_once(
    task: str,
    shards: str | Path,
    params: Params,
    *,
    init_from: str | None = None,
    from_scratch: bool = False,
    run_name: str | None = None,
    resume: bool = False,
    experiment: str | None = None,
    worker_resources: dict[str, float] | None = None,
    extra_config: dict[str, Any] | None = None,
    split: CellSplit | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    report_to_tune: bool = False,
) -> TrainResult:
    """Train on Ray (a local Ray is started if none is running) and track the run in MLflow.

    ``run_name`` names the Ray Train run under ``train.storage_path`` (default: task and time);
    ``resume=True`` continues that run from its latest checkpoint (``scbert pretrain --resume
    RUN``), and an existing run is not started again without it.
    ``worker_resources`` adds Ray resources per worker (e.g. a custom resource that each node
    has once, to place one worker per node).
    ``split`` chooses the training, validation and test cells (default: ``default_split``);
    ``parent_run_id`` makes the MLflow run a child (a sweep trial, a CV fold) and ``tags`` are
    added to it; ``report_to_tune`` forwards validation results to the enclosing Tune trial.
    """
    import mlflow

    from scbert_platform.track.runs import experiment_id

    plan = plan_run(
        task,
        shards,
        params,
        init_from=init_from,
        from_scratch=from_scratch,
        run_name=run_name,
        resume=resume,
        split=split,
        hashed=report_to_tune,  # a study's trial: its driver hashed the shards (cv, sweep)
    )
    previous = plan.run_dir / MLFLOW_RUN_FILE if plan.run_dir else None
    run_id = previous.read_text().strip() if previous and previous.is_file() else None
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id(experiment or f"scbert-{task}"),
        run_name=None if run_id else plan.run_name,
    ) as run:
        if plan.run_dir:
            plan.run_dir.mkdir(parents=True, exist_ok=True)
            (plan.run_dir / MLFLOW_RUN_FILE).write_text(run.info.run_id)
        if run_id is None:
            _log_run_context(plan, parent_run_id, tags)
        config = plan.worker_config(run.info.run_id, report_to_tune) | (extra_config or {})
        if not report_to_tune:  # a Tune trial's fit runs in an actor: the study shows trials
            print(
                f"{task}: {plan.n_cells['train']} training cells, {plan.per_epoch} optimiser "
                f"steps per epoch, {plan.total_steps} steps on {plan.params.train.workers} "
                f"worker(s); run {plan.run_name}, MLflow run {run.info.run_id}",
                file=sys.stderr,
            )
        result = _run_trainer(plan, config, worker_resources, report_to_tune)
        return _finish_run(plan, result, run.info.run_id)


def _log_run_context(plan: RunPlan, parent_run_id: str | None, tags: dict[str, str] | None) -> None:
    """A new MLflow run's params, tags and context: what it trains on, how, and where."""
    import mlflow

    from scbert_platform.track.runs import source_tags, system_info

    if parent_run_id:
        mlflow.set_tag("mlflow.parentRunId", parent_run_id)
    mlflow.set_tags(tags or {})
    mlflow.log_params({k: v for k, v in plan.params.flatten().items() if v is not None})
    mlflow.log_params(
        {
            "task": plan.task,
            "init_from": plan.init_from or "",
            "from_scratch": plan.from_scratch,
            "total_steps": plan.total_steps,
            "shards": str(plan.shards),
            "split": plan.split.describe(),
            **{f"cells.{role}": n for role, n in plan.n_cells.items()},
        }
    )
    mlflow.log_dict(plan.split.to_dict(), "split.json")
    mlflow.set_tags(source_tags(plan.shards / MANIFEST) | {"scbert.task": plan.task})
    mlflow.log_dict(plan.params.to_dict(), "params.yaml")
    mlflow.log_dict(system_info(), "system.json")
    mlflow.log_artifact(str(plan.shards / MANIFEST), "data")


def _run_trainer(
    plan: RunPlan,
    config: dict[str, Any],
    worker_resources: dict[str, float] | None,
    report_to_tune: bool,
) -> Any:
    """The TorchTrainer's ``fit`` under the driver's progress bar. A loss that stopped being
    finite fails the run as ``CollapsedRun`` (tagged in MLflow)."""
    import mlflow

    progress = (
        contextlib.nullcontext() if report_to_tune else step_progress(plan.task, plan.total_steps)
    )
    with progress as board:
        config["progress_board"] = board
        trainer = _trainer(
            config, plan.params.train, plan.run_name, plan.storage_path, worker_resources
        )
        try:
            result = trainer.fit()
        except Exception as err:  # Ray Train raises the workers' errors wrapped in its own
            if "NonFiniteLoss" not in str(err):
                raise
            reason = next(
                (line.split("NonFiniteLoss: ", 1)[1] for line in str(err).splitlines()
                 if "NonFiniteLoss: " in line),
                "the training loss is not finite",
            )  # fmt: skip
            mlflow.set_tag(FAILURE_TAG, f"collapsed: {reason}")
            raise CollapsedRun(f"run {plan.run_name} collapsed: {reason}") from None
    if result.checkpoint is None:
        raise TrainingError(f"run {plan.run_name} ended without a checkpoint: {result.error}")
    return result


def _finish_run(plan: RunPlan, result: Any, run_id: str) -> TrainResult:
    """The final model beside the run's checkpoints (a local temporary copy for remote
    storage): fine-tuning's collapse check and calibration, the preprocessing record, the test
    evaluation, and the model logged to MLflow (with the pyfunc of a fine-tuned model)."""
    import mlflow

    from scbert_platform.track.runs import MODEL_URI_TAG

    final = plan.run_dir if plan.run_dir else Path(tempfile.mkdtemp(prefix="scbert-final-"))
    model_dir = final / MODEL_DIR
    with result.checkpoint.as_directory() as directory:
        copy_directory(Path(directory) / MODEL_DIR, model_dir, kind="checkpoint")
        loop = torch.load(Path(directory) / STATE_FILE, weights_only=True)["loop"]
    metrics = dict(result.metrics or {})
    finetune = plan.task == "finetune"
    if finetune and loop["best_step"] >= 0:  # the step that was kept
        chosen = {
            "val/best_macro_f1": loop["best_metric"],
            "val/best_step": float(loop["best_step"]),
        }
        if loop.get("averaged"):  # the kept model is the weight average (train.average_from)
            chosen["val/averaged_snapshots"] = float(loop["averaged"])
        mlflow.log_metrics(chosen)
        metrics |= chosen
    if finetune:
        try:
            checked = calibrate_and_check(model_dir, plan.shards, plan.split, plan.params)
        except CollapsedRun as err:
            mlflow.set_tag(FAILURE_TAG, f"collapsed: {err}")
            raise CollapsedRun(f"run {plan.run_name} collapsed: {err}") from None
        mlflow.log_metrics(checked)
        metrics |= checked
    # beside the weights (after calibration, whose save replaces the directory): how the
    # training cells were preprocessed, read by every inference path
    saved_config = json.loads((model_dir / "config.json").read_text())["config"]
    record = Preprocessing.from_manifest(plan.manifest, n_bins=int(saved_config["n_bins"]))
    record.write(model_dir)
    mlflow.set_tags(record.tags())
    if finetune and plan.split.has_test:
        metrics |= _log_test_evaluation(model_dir, plan.shards, plan.split, plan.params)
    mlflow.log_artifacts(str(model_dir), "model")
    mlflow.set_tag(CHECKPOINT_TAG, str(model_dir))
    model_uri = None
    if finetune:
        from scbert_platform.track.pyfunc import example_counts, log_pyfunc

        model_uri = log_pyfunc(model_dir, example_counts(plan.shards, plan.info.panel))
        mlflow.set_tag(MODEL_URI_TAG, model_uri)
    mlflow.log_metric("steps", loop["step"])
    return TrainResult(plan.run_name, run_id, str(model_dir), metrics, loop["step"], model_uri)


def calibrate_and_check(
    model_dir: Path, shards: Path, split: CellSplit, params: Params
) -> dict[str, float]:
    """After fine-tuning: the kept model's validation predictions. A model that puts every
    validation cell in one class (of several present) has collapsed: ``CollapsedRun``, and the
    caller tags its run with the reason. Otherwise, with ``train.calibrate``, temperature scaling is
    fitted on the validation cells and folded into the head's last layer (logits / T, so every
    inference path applies it) and recorded in ``calibration.json`` beside the weights.
    Returns the kept model's validation accuracy and macro F1 (``val/kept_*``: with
    ``train.average_from`` the kept model is an average that no validation during training
    scored), the validation ECE before and after, and the temperature."""
    from scbert_platform.train.loop import fit_temperature, predict, score_predictions
    from scbert_platform.train.metrics import expected_calibration_error

    bundle = load_pretrained(model_dir)
    batches = iter_local_batches(  # fit hashed the shards before training
        shards, params.model.n_bins, split=split, role="val", batch_size=64, digests=False
    )
    y_val, proba = predict(bundle.model, batches, device=torch.device("cpu"))
    known = y_val >= 0
    predicted = set(proba[known].argmax(axis=1).tolist())
    present = set(y_val[known].tolist())
    finite = bool(np.isfinite(proba).all())
    one_class = len(present) > 1 and len(predicted) == 1 and params.train.collapse_check
    if not finite or one_class:
        what = (
            "non-finite probabilities"
            if not finite
            else (
                f"one class ({bundle.classes[predicted.pop()]}) for all {int(known.sum())} "
                f"validation cells of {len(present)} types"
            )
        )
        raise CollapsedRun(f"the kept model predicts {what}")
    _, kept = score_predictions(y_val, proba, bundle.classes)
    ece_before = expected_calibration_error(proba, y_val)
    out = {
        "val/kept_accuracy": kept["accuracy"],
        "val/kept_macro_f1": kept["macro_f1"],
        "val/ece_uncalibrated": ece_before,
    }
    if not params.train.calibrate:
        return out | {"val/ece": ece_before}
    logits = np.log(np.clip(proba, 1e-30, None))
    temperature = fit_temperature(logits, y_val)
    bundle.model.head.fold_temperature(temperature)
    save_pretrained(bundle.model, model_dir, panel=bundle.panel, classes=bundle.classes)
    calibrated = torch.softmax(torch.as_tensor(logits) / temperature, dim=1).numpy()
    ece_after = expected_calibration_error(calibrated, y_val)
    record = {
        "method": "temperature scaling",
        "temperature": temperature,
        "fitted_on": f"validation split ({int(known.sum())} cells)",
        "val_ece_before": ece_before,
        "val_ece_after": ece_after,
    }
    with atomic_file(model_dir / CALIBRATION_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return out | {"val/ece": ece_after, "calibration/temperature": temperature}


def read_calibration(model_dir: str | Path) -> dict[str, Any] | None:
    """The ``calibration.json`` of a checkpoint directory (None for an uncalibrated model)."""
    path = Path(model_dir) / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _log_test_evaluation(
    model_dir: Path, shards: Path, split: CellSplit, params: Params
) -> dict[str, float]:
    """Evaluate the chosen checkpoint on the test fold (never the split that chose it). The
    predictions are logged too (``TEST_PREDICTIONS``: true ids, probabilities), which is what
    ``scbert cv`` aggregates over its folds."""
    import mlflow

    from scbert_platform.train.loop import predict, score_predictions
    from scbert_platform.train.metrics import confusion_matrix_png, report_markdown

    bundle = load_pretrained(model_dir)
    assert bundle.classes is not None
    batches = iter_local_batches(
        shards, params.model.n_bins, split=split, role="test", batch_size=64
    )
    y_true, proba = predict(bundle.model, batches, device=torch.device("cpu"))
    flat, report = score_predictions(y_true, proba, bundle.classes, prefix="test")
    mlflow.log_metrics(flat)
    for label, scores in report["per_class"].items():
        mlflow.log_metric(f"test/f1/{metric_name(label)}", scores["f1"])
    with tempfile.TemporaryDirectory() as tmp:
        predictions = Path(tmp) / Path(TEST_PREDICTIONS).name
        np.savez(predictions, y_true=y_true, proba=proba)
        mlflow.log_artifact(str(predictions), str(Path(TEST_PREDICTIONS).parent))
        png = Path(tmp) / "confusion_matrix.png"
        confusion_matrix_png(
            report["confusion_matrix"], bundle.classes, png, title=_test_title(split)
        )
        mlflow.log_artifact(str(png), "evaluation")
    mlflow.log_text(report_markdown(report), "evaluation/test_report.md")
    mlflow.log_dict(json.loads(json.dumps(report, default=float)), "evaluation/test_report.json")
    from scbert_platform.console import verbose

    if verbose():
        print(report_markdown(report), file=sys.stderr)
    else:
        print(
            f"{_test_title(split)}: accuracy {flat['test/accuracy']:.3f}, macro F1 "
            f"{flat['test/macro_f1']:.3f} over {report['n']} cells; per class: the MLflow "
            "run's evaluation/test_report.md",
            file=sys.stderr,
        )
    return flat


def read_test_predictions(run_id: str) -> tuple[np.ndarray, np.ndarray]:
    """A fine-tuning run's test-fold predictions: (true label ids, probabilities). From the
    platform's tracking URI, whatever MLflow's global one is (a resumed ``scbert cv`` whose
    trials had all finished sets none before it reads them)."""
    import mlflow

    from scbert_platform.track.runs import tracking_uri

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=TEST_PREDICTIONS, dst_path=tmp, tracking_uri=tracking_uri()
        )
        with np.load(path) as saved:
            return saved["y_true"], saved["proba"]


def _test_title(split: CellSplit) -> str:
    if split.test_batches:
        return f"test dataset(s) {', '.join(split.test_batches)}"
    return f"test fold {', '.join(str(f) for f in split.test_folds)}"


def metric_name(label: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in label)
