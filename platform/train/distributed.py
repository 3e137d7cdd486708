"""Ray Train wiring for ``scbert pretrain`` and ``scbert finetune``: a ``TorchTrainer`` (DDP) fed
by Ray Data shards, checkpoints to ``train.storage_path``, recovery from worker failures, and
MLflow tracking (rank 0 logs per-step metrics; the driver logs the run's context and results).

The loop itself is ``scbert_platform.train.loop.run_loop``; this module only connects it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scbert import ScBert, load_pretrained, load_published, save_pretrained
from scbert.atomic import copy_directory
from scbert.config import CLS_ACTIVATIONS
from scbert_platform.data.ingest import MANIFEST, read_manifest
from scbert_platform.data.loader import (
    EpochCache,
    ShardInfo,
    cell_dataset,
    dense_batches,
    iter_local_batches,
)
from scbert_platform.data.preprocess import Preprocessing
from scbert_platform.data.splits import CellSplit
from scbert_platform.params import Params
from scbert_platform.train.loop import (
    LOSSES,
    ClassLoss,
    CompiledWithFallback,
    LoopHooks,
    LoopState,
    build_optimizer,
    class_counts,
    class_weights,
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

MODEL_DIR = "model"  # in a Ray Train checkpoint: our checkpoint directory
STATE_FILE = "train_state.pt"  # optimiser, schedule, loop position, RNG
MLFLOW_RUN_FILE = "mlflow_run_id"
CHECKPOINT_TAG = "scbert.checkpoint"  # on a run: the directory of its final (best) model


CALIBRATION_FILE = "calibration.json"
FAILURE_TAG = "scbert.failure"


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
        return model.with_cell_type_head(len(info.labels), activation=params.model.head_activation)
    cfg = model_config(
        params.model,
        n_genes=info.n_genes,
        n_classes=n_classes,
        gene2vec=gene2vec is not None,
        checkpointing=params.train.activation_checkpointing,
    )
    return ScBert(config=cfg, gene2vec=gene2vec)


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function of the TorchTrainer."""
    import ray.train
    import ray.train.torch

    params = Params.from_dict(config["params"])
    train = params.train
    task = config["task"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    prepare_device(device, train.precision)
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    torch.manual_seed(train.seed)  # the same on every rank: same init, same feature redraws
    info = ShardInfo.read(config["shards"], digests=False)  # fit hashed them before starting
    split = CellSplit.from_dict(config["split"])
    model = _initial_model(config, info)
    if task == "finetune":
        set_trainable(model, "all" if config.get("from_scratch") else train.unfreeze)
    model.to(device)
    optimizer, scheduler = build_optimizer(model, train)
    generator = torch.Generator(device=device).manual_seed(train.seed * 1009 + rank)
    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            restored = load_pretrained(Path(directory) / MODEL_DIR).model
            model.load_state_dict(restored.state_dict())
            saved = torch.load(Path(directory) / STATE_FILE, weights_only=True)
            state = restore_training_state(saved, optimizer, scheduler, generator)
        if rank == 0:
            resumed = f"resumed from step {state.step} (epoch {state.epoch})"
            print(resumed, file=sys.stderr)
            if config.get("progress_board") is not None:
                config["progress_board"].post.remote({"message": resumed})
        if "pid_dir" in config:
            Path(config["pid_dir"], f"rank{rank}.resumed").write_text(str(state.step))
    wrapped = ray.train.torch.prepare_model(model) if world > 1 else model
    no_sync = getattr(wrapped, "no_sync", None)
    if train.compile:
        wrapped = CompiledWithFallback(wrapped)

    mlflow = _mlflow_client(config) if rank == 0 else None
    shard = EpochCache(ray.train.get_dataset_shard("train"), params.data.epoch_cache_mb * 2**20)
    n_bins = params.model.n_bins
    best: dict[str, torch.Tensor] = {}

    def epochs(epoch: int) -> Any:
        batches = dense_batches(
            shard,
            info.n_genes,
            batch_size=train.batch_size,
            shuffle_buffer=params.data.shuffle_buffer,
            seed=train.seed + epoch,
            device=device,
        )
        return with_timeout(
            batches,
            train.data_timeout_s,
            f"no training batch arrived for {train.data_timeout_s:g} s: the Ray Data pipeline is "
            "stalled, usually because the training workers hold every CPU Ray Data could use "
            "(lower train.cpus_per_worker, or give the cluster more CPUs)",
        )

    validation_cache: list[dict[str, Any]] = []

    def validation_batches() -> Any:
        """The validation cells, read once and kept when they are small (as the epochs)."""
        if validation_cache:
            return validation_cache
        batches = iter_local_batches(
            config["shards"], n_bins, split=split, role="val", batch_size=64, digests=False
        )
        kept, size = [], 0
        for batch in batches:
            size += batch["tokens"].nbytes
            if size > params.data.epoch_cache_mb * 2**20:
                return itertools.chain(kept, [batch], batches)
            kept.append(batch)
        validation_cache.extend(kept)
        return validation_cache

    def validate() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if rank == 0:
            if task == "finetune":
                metrics, _ = evaluate_classifier(
                    model,
                    validation_batches(),
                    info.labels,
                    device=device,
                    precision=train.precision,
                )
            else:
                metrics = evaluate_pretraining(
                    model,
                    validation_batches(),
                    n_bins=n_bins,
                    seed=train.seed,
                    device=device,
                    precision=train.precision,
                )
        if world > 1:  # every rank takes the same early-stopping decision
            shared = [metrics]
            torch.distributed.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        return metrics

    def keep_best() -> None:
        best.clear()
        best.update({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})

    def report(metrics: dict[str, float], due: bool) -> None:
        if mlflow is not None:
            client, run_id = mlflow
            stamp = int(time.time() * 1000)
            from mlflow.entities import Metric

            client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), stamp, state.step) for k, v in metrics.items()],
            )
        if not due:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if rank == 0:
                finished = state.step >= config["total_steps"] or state.stopped_early
                weights = best if (finished and best) else None
                _write_checkpoint(
                    Path(tmp),
                    model,
                    weights,
                    info,
                    task,
                    training_state(optimizer, scheduler, state, generator),
                )
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=saved)

    if task == "finetune":
        counts = read_manifest(config["shards"])["labels"]["counts"]
        criterion = ClassLoss(
            kind=train.loss,
            class_weight=class_weights(counts, info.labels).to(device)
            if train.class_weights
            else None,
            label_smoothing=train.label_smoothing,
            counts=class_counts(counts, info.labels).to(device),
            total_steps=config["total_steps"],
        )

        def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> Any:
            return finetune_loss(m, batch, loss=criterion, step=state.step, device=device)

    else:

        def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> Any:
            return pretrain_loss(
                m, batch, n_bins=n_bins, generator=generator, params=train, device=device
            )

    if rank == 0 and "pg_file" in config:  # a sweep's driver frees it if the trial is stopped
        group = ray.util.get_current_placement_group()
        if group is not None:
            with open(config["pg_file"], "a") as out:
                out.write(group.id.hex() + "\n")
    if "pid_dir" in config:  # fault and cluster tests find the worker processes here
        import os

        node = ray.get_runtime_context().get_node_id()
        Path(config["pid_dir"], f"rank{rank}.pid").write_text(f"{os.getpid()} {node}")
    hooks = LoopHooks(report=report, validate=validate, no_sync=no_sync, is_chief=rank == 0)
    if rank == 0 and config.get("progress_board") is not None:
        hooks.progress = _board_feed(config["progress_board"])
    run_loop(
        wrapped,
        optimizer,
        scheduler,
        loss_fn,
        epochs,
        params=train,
        total_steps=config["total_steps"],
        state=state,
        hooks=hooks,
        device=device,
        early_stop_metric="val/macro_f1" if task == "finetune" else None,
        on_best=keep_best if task == "finetune" else None,
    )


def _write_checkpoint(
    directory: Path,
    model: ScBert,
    weights: dict[str, torch.Tensor] | None,
    info: ShardInfo,
    task: str,
    state: dict[str, Any],
) -> None:
    if weights is not None:
        current = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(weights)
    labels = info.labels if task == "finetune" else None
    save_pretrained(model, directory / MODEL_DIR, panel=info.panel, labels=labels)
    if weights is not None:
        model.load_state_dict(current)
    torch.save(state, directory / STATE_FILE)


class ProgressBoard:
    """A Ray actor (no CPU) between the chief worker and the driver's progress bar: the worker
    posts its step and metrics without waiting for an answer, the driver collects them."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []

    def post(self, update: dict[str, Any]) -> None:
        self.updates.append(update)

    def collect(self) -> list[dict[str, Any]]:
        updates, self.updates = self.updates, []
        return updates


def _board_feed(board: Any, every_s: float = 1.0) -> Callable[[int, int, dict[str, float]], None]:
    """The chief's ``LoopHooks.progress``: a post at most every ``every_s`` seconds, and at
    every validation and the last step."""
    last = -math.inf

    def feed(step: int, total: int, metrics: dict[str, float]) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every_s or step >= total or any(k.startswith("val/") for k in metrics):
            last = now
            board.post.remote({"step": step, **metrics})

    return feed


def _postfix(metrics: dict[str, float]) -> str:
    shown = [f"loss {metrics['train/loss']:.3f}"] if "train/loss" in metrics else []
    if "train/cells_per_s" in metrics:
        shown.append(f"{metrics['train/cells_per_s']:.0f} cells/s")
    for key in ("val/macro_f1", "val/accuracy", "val/masked_acc"):
        if key in metrics:
            shown.append(f"{key} {metrics[key]:.3f}")
    return ", ".join(shown)


@contextlib.contextmanager
def step_progress(task: str, total_steps: int) -> Iterator[Any]:
    """The driver's progress bar of a training run (steps, loss, cells/s, the latest validation,
    ETA), fed through a ``ProgressBoard`` that this yields for the workers."""
    import ray

    from scbert_platform.console import progress, say

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    bar = progress(total=total_steps, desc=task, unit="step")
    latest: dict[str, float] = {}
    stop = threading.Event()

    def show(updates: list[dict[str, Any]]) -> None:
        for update in updates:
            if "message" in update:
                say(f"{task}: {update['message']}")
                continue
            step = int(update.pop("step"))
            latest.update(update)
            bar.set_postfix_str(_postfix(latest), refresh=False)
            bar.update(step - bar.n)

    def follow() -> None:
        while not stop.wait(1.0):
            try:
                show(ray.get(board.collect.remote(), timeout=30))
            except Exception:  # Ray is going away: the run's own error says why
                return

    thread = threading.Thread(target=follow, name="scbert-progress", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join(timeout=10)
        with contextlib.suppress(Exception):
            show(ray.get(board.collect.remote(), timeout=10))
        bar.close()
        with contextlib.suppress(Exception):
            ray.kill(board)


def _mlflow_client(config: dict[str, Any]) -> tuple[Any, str] | None:
    if not config.get("mlflow_run_id"):
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=config["tracking_uri"]), config["mlflow_run_id"]


def check_resources(train: Any, cluster_cpus: float) -> None:
    """Fail fast where workers would take every CPU and starve the Ray Data pipeline (which
    otherwise hangs until Ray Data's no-progress timeout)."""
    wanted = train.workers * train.cpus_per_worker
    if train.workers < 1 or train.cpus_per_worker <= 0:
        raise TrainingError("train.workers must be >= 1 and train.cpus_per_worker > 0")
    if wanted > cluster_cpus - 0.5:
        fit = max((cluster_cpus - 1) / train.workers, 0.25)
        raise TrainingError(
            f"{train.workers} workers x {train.cpus_per_worker} CPUs = {wanted:g} of the cluster's "
            f"{cluster_cpus:g} CPUs leaves under 0.5 CPU for Ray Data, which would stall: set "
            f"train.cpus_per_worker={fit:g} (fractional is fine) or fewer train.workers"
        )


def check_params(params: Params, n_folds: int) -> None:
    """Settings that would otherwise fail inside the workers, checked before anything starts."""
    train, model = params.train, params.model
    problems = []
    if model.gene_embedding not in ("gene2vec", "learned"):
        problems.append(
            f"model.gene_embedding must be gene2vec or learned: {model.gene_embedding!r}"
        )
    elif model.gene_embedding == "gene2vec" and not model.gene2vec:
        problems.append(
            "model.gene_embedding=gene2vec needs model.gene2vec (a Gene2vec text file for the "
            "panel; `scbert gene-embed` learns one from the shards), or set "
            "model.gene_embedding=learned"
        )
    elif model.gene2vec and not Path(model.gene2vec).is_file():
        problems.append(f"model.gene2vec: {model.gene2vec} does not exist")
    if train.unfreeze not in ("published", "all") and not (
        train.unfreeze.startswith("last_k:") and train.unfreeze[7:].isdigit()
    ):
        problems.append(
            f"train.unfreeze must be published, all or last_k:N, not {train.unfreeze!r}"
        )
    if train.loss not in LOSSES:
        problems.append(f"train.loss must be one of {', '.join(LOSSES)}, not {train.loss!r}")
    if not 0 <= train.label_smoothing < 1:
        problems.append(f"train.label_smoothing must be in [0, 1), not {train.label_smoothing}")
    if train.collapse_retries < 0:
        problems.append("train.collapse_retries must be >= 0")
    if model.head_activation not in CLS_ACTIVATIONS:
        problems.append(
            f"model.head_activation must be one of {', '.join(CLS_ACTIVATIONS)}, "
            f"not {model.head_activation!r}"
        )
    if train.precision not in ("auto", "fp32", "bf16"):
        problems.append(f"train.precision must be auto, fp32 or bf16, not {train.precision!r}")
    if train.schedule not in ("cosine_restarts", "constant", "linear_warmup"):
        problems.append("train.schedule must be cosine_restarts, constant or linear_warmup")
    if train.batch_size < 1 or train.grad_accum < 1:
        problems.append("train.batch_size and train.grad_accum must be >= 1")
    if not 0 <= train.pretrain_val_fold < n_folds:
        problems.append(f"train.pretrain_val_fold must be a fold 0..{n_folds - 1}")
    if not -1 <= train.val_fold < n_folds:
        problems.append(f"train.val_fold must be a fold 0..{n_folds - 1}, or -1 (inner split)")
    if train.val_fold == -1 and not 0 < train.val_fraction < 1:
        problems.append("train.val_fold=-1 needs train.val_fraction between 0 and 1")
    if not -1 <= train.test_fold < n_folds or train.test_fold == train.val_fold >= 0:
        problems.append("train.test_fold must be -1 or a fold other than train.val_fold")
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
    trainer = TorchTrainer
    if train.workers == 1:
        # One worker needs no torch.distributed process group, whose rendezvous store (PyTorch's
        # TCPStore, which takes no bind address) would listen on every interface for the run
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        trainer = DataParallelTrainer
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
            tried = Params.from_dict(params.to_dict())
            tried.train.seed = params.train.seed + 1000 * attempt
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

    from scbert_platform.track.runs import (
        MODEL_URI_TAG,
        experiment_id,
        source_tags,
        system_info,
        tracking_uri,
    )

    if task not in ("pretrain", "finetune"):
        raise ValueError(f"task must be pretrain or finetune, got {task!r}")
    shards = Path(shards).resolve()
    # a study's trial: its driver hashed the shards before starting the trials (cv, sweep)
    info = ShardInfo.read(shards, digests=not report_to_tune)
    manifest = read_manifest(shards)
    train = params.train
    check_params(params, int(manifest["folds"]["n_folds"]))
    if params.model.gene2vec:
        params.model.gene2vec = str(Path(params.model.gene2vec).resolve())  # workers' cwd differs
    if task == "finetune" and len(info.labels) < 2:
        raise TrainingError(f"{shards} has no cell-type labels: ingest with --label-key")
    if task == "finetune" and init_from:
        check_init_from(init_from, info)
    from scbert_platform.cluster import start_ray

    cluster_cpus = start_ray()

    check_resources(train, cluster_cpus)

    split = split or default_split(task, params)
    n_cells = split.counts(shards)
    if n_cells["train"] == 0 or n_cells["val"] == 0:
        raise TrainingError(
            f"the split ({split.describe()}) leaves {n_cells['train']} training and "
            f"{n_cells['val']} validation cells in {shards}"
        )
    n_train = n_cells["train"]
    per_epoch = steps_per_epoch(n_train, train)
    total_steps = train.max_steps or per_epoch * train.epochs
    run_name = run_name or f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(train.storage_path).resolve() if "://" not in train.storage_path else None
    storage_path = str(storage) if storage else train.storage_path

    run_dir = (storage / run_name) if storage else None
    if run_dir is not None:
        exists = any(run_dir.glob("checkpoint_*"))
        if exists and not resume:
            raise TrainingError(
                f"run {run_name} already exists in {storage}: continue it with --resume "
                f"{run_name}, or choose another --run-name"
            )
        if resume and not exists:
            raise TrainingError(f"no run {run_name} with a checkpoint in {storage} to resume")
    exp_id = experiment_id(experiment or f"scbert-{task}")
    previous = run_dir / MLFLOW_RUN_FILE if run_dir else None
    run_id = previous.read_text().strip() if previous and previous.is_file() else None
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else exp_id,
        run_name=None if run_id else run_name,
    ) as run:
        if run_dir:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / MLFLOW_RUN_FILE).write_text(run.info.run_id)
        if run_id is None:
            if parent_run_id:
                mlflow.set_tag("mlflow.parentRunId", parent_run_id)
            mlflow.set_tags(tags or {})
            mlflow.log_params({k: v for k, v in params.flatten().items() if v is not None})
            mlflow.log_params(
                {
                    "task": task,
                    "init_from": init_from or "",
                    "from_scratch": from_scratch,
                    "total_steps": total_steps,
                    "shards": str(shards),
                    "split": split.describe(),
                    **{f"cells.{role}": n for role, n in n_cells.items()},
                }
            )
            mlflow.log_dict(split.to_dict(), "split.json")
            mlflow.set_tags(source_tags(shards / MANIFEST) | {"scbert.task": task})
            mlflow.log_dict(params.to_dict(), "params.yaml")
            mlflow.log_dict(system_info(), "system.json")
            mlflow.log_artifact(str(shards / MANIFEST), "data")
        config = {
            "params": params.to_dict(),
            "task": task,
            "shards": str(shards),
            "init_from": str(Path(init_from).resolve()) if init_from else None,
            "from_scratch": from_scratch,
            "total_steps": total_steps,
            "split": split.to_dict(),
            "mlflow_run_id": run.info.run_id,
            "tracking_uri": tracking_uri(),
            "report_to_tune": report_to_tune,
            **(extra_config or {}),
        }
        if not report_to_tune:  # a Tune trial's fit runs in an actor: the study shows trials
            print(
                f"{task}: {n_train} training cells, {per_epoch} optimiser steps per epoch, "
                f"{total_steps} steps on {train.workers} worker(s); run {run_name}, MLflow run "
                f"{run.info.run_id}",
                file=sys.stderr,
            )
        with (
            contextlib.nullcontext() if report_to_tune else step_progress(task, total_steps)
        ) as board:
            config["progress_board"] = board
            try:
                result = _trainer(config, train, run_name, storage_path, worker_resources).fit()
            except Exception as err:  # Ray Train raises the workers' errors wrapped in its own
                if "NonFiniteLoss" not in str(err):
                    raise
                reason = next(
                    (line.split("NonFiniteLoss: ", 1)[1] for line in str(err).splitlines()
                     if "NonFiniteLoss: " in line),
                    "the training loss is not finite",
                )  # fmt: skip
                mlflow.set_tag(FAILURE_TAG, f"collapsed: {reason}")
                raise CollapsedRun(f"run {run_name} collapsed: {reason}") from None
        if result.checkpoint is None:
            raise TrainingError(f"run {run_name} ended without a checkpoint: {result.error}")
        # the final model beside the run's checkpoints (a local temporary copy for remote storage)
        final = run_dir if run_dir else Path(tempfile.mkdtemp(prefix="scbert-final-"))
        with result.checkpoint.as_directory() as directory:
            copy_directory(Path(directory) / MODEL_DIR, final / MODEL_DIR, kind="checkpoint")
            saved = torch.load(Path(directory) / STATE_FILE, weights_only=True)
        metrics = dict(result.metrics or {})
        if task == "finetune" and saved["loop"]["best_step"] >= 0:  # the step that was kept
            chosen = {
                "val/best_macro_f1": saved["loop"]["best_metric"],
                "val/best_step": float(saved["loop"]["best_step"]),
            }
            mlflow.log_metrics(chosen)
            metrics |= chosen
        if task == "finetune":
            try:
                checked = calibrate_and_check(final / MODEL_DIR, shards, split, params)
            except CollapsedRun as err:
                mlflow.set_tag(FAILURE_TAG, f"collapsed: {err}")
                raise CollapsedRun(f"run {run_name} collapsed: {err}") from None
            mlflow.log_metrics(checked)
            metrics |= checked
        # beside the weights (after calibration, whose save replaces the directory): how the
        # training cells were preprocessed, read by every inference path
        saved_config = json.loads((final / MODEL_DIR / "config.json").read_text())["config"]
        record = Preprocessing.from_manifest(manifest, n_bins=int(saved_config["n_bins"]))
        record.write(final / MODEL_DIR)
        mlflow.set_tags(record.tags())
        if task == "finetune" and split.has_test:
            metrics |= _log_test_evaluation(final / MODEL_DIR, shards, split, params)
        mlflow.log_artifacts(str(final / MODEL_DIR), "model")
        mlflow.set_tag(CHECKPOINT_TAG, str(final / MODEL_DIR))
        model_uri = None
        if task == "finetune":
            from scbert_platform.track.pyfunc import example_counts, log_pyfunc

            model_uri = log_pyfunc(final / MODEL_DIR, example_counts(shards, info.panel))
            mlflow.set_tag(MODEL_URI_TAG, model_uri)
        mlflow.log_metric("steps", saved["loop"]["step"])
        return TrainResult(
            run_name,
            run.info.run_id,
            str(final / MODEL_DIR),
            metrics,
            saved["loop"]["step"],
            model_uri,
        )


def calibrate_and_check(
    model_dir: Path, shards: Path, split: CellSplit, params: Params
) -> dict[str, float]:
    """After fine-tuning: the kept model's validation predictions. A model that puts every
    validation cell in one class (of several present) has collapsed: ``CollapsedRun``, and the
    caller tags its run with the reason. Otherwise, with ``train.calibrate``, temperature scaling is
    fitted on the validation cells and folded into the head's last layer (logits / T, so every
    inference path applies it) and recorded in ``calibration.json`` beside the weights.
    Returns the validation ECE before and after, and the temperature."""
    from scbert.atomic import atomic_file
    from scbert_platform.train.loop import fit_temperature, predict
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
                f"one class ({bundle.labels[predicted.pop()]}) for all {int(known.sum())} "
                f"validation cells of {len(present)} types"
            )
        )
        raise CollapsedRun(f"the kept model predicts {what}")
    ece_before = expected_calibration_error(proba, y_val)
    out = {"val/ece_uncalibrated": ece_before}
    if not params.train.calibrate:
        return out | {"val/ece": ece_before}
    logits = np.log(np.clip(proba, 1e-30, None))
    temperature = fit_temperature(logits, y_val)
    bundle.model.head.fold_temperature(temperature)
    save_pretrained(bundle.model, model_dir, panel=bundle.panel, labels=bundle.labels)
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
    """Evaluate the chosen checkpoint on the test fold (never the split that chose it)."""
    import mlflow

    from scbert_platform.train.metrics import confusion_matrix_png, report_markdown

    bundle = load_pretrained(model_dir)
    assert bundle.labels is not None
    batches = iter_local_batches(
        shards, params.model.n_bins, split=split, role="test", batch_size=64
    )
    flat, report = evaluate_classifier(
        bundle.model, batches, bundle.labels, device=torch.device("cpu"), prefix="test"
    )
    mlflow.log_metrics(flat)
    for label, scores in report["per_class"].items():
        mlflow.log_metric(f"test/f1/{metric_name(label)}", scores["f1"])
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "confusion_matrix.png"
        confusion_matrix_png(
            report["confusion_matrix"], bundle.labels, png, title=_test_title(split)
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


def _test_title(split: CellSplit) -> str:
    if split.test_batches:
        return f"test dataset(s) {', '.join(split.test_batches)}"
    return f"test fold {', '.join(str(f) for f in split.test_folds)}"


def metric_name(label: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in label)
