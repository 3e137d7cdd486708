"""What sweeps (``scbert sweep``) and cross-validation (``scbert cv``) share: Ray Tune trials that
are each a Ray Train fine-tuning run, under one MLflow parent run, restorable after the driver
stops.

Layout under ``train.storage_path`` (default ``runs/``), for a study named NAME:

    NAME/                  the Tune experiment (``Tuner.restore`` reads it)
    NAME/train/<trial id>  each trial's Ray Train run (checkpoints: an interrupted trial resumes)
    NAME/mlflow_run_id     the MLflow parent run (a restored study logs to the same one)
    NAME/events.jsonl      one line per trial start and end (an audit of what ran, and how often)

A trial's function is only a driver: it reserves memory but no CPU, its Train workers reserve
``train.workers`` x ``train.cpus_per_worker`` (and ``--trial-gpus`` each), and Tune runs as many
trials at once as fit with one more CPU each for their Ray Data pipelines.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scbert_platform.params import Params
from scbert_platform.train.distributed import TrainingError

PARENT_RUN_FILE = "mlflow_run_id"
EVENTS_FILE = "events.jsonl"
TRIAL_TAG = "scbert.trial_id"
STUDY_TAG = "scbert.study"
# a trial's own function only drives its Train run: it reserves memory, no CPU (Tune refuses an
# empty request, and any CPU it took would be missing from the one CPU left for Ray Data)
DRIVER_RESOURCES = {"memory": 256 * 2**20}


@dataclass
class Study:
    """One sweep or cross-validation: where it lives and what every trial shares."""

    kind: str  # sweep | cv
    name: str
    shards: Path
    params: Params
    init_from: str | None = None
    from_scratch: bool = False

    @property
    def storage(self) -> Path:
        return Path(self.params.train.storage_path).resolve()

    @property
    def directory(self) -> Path:
        return self.storage / self.name

    @property
    def experiment(self) -> str:
        return f"scbert-{self.kind}"

    def context(self, parent_run_id: str) -> dict[str, Any]:
        """What each trial needs, with every path absolute (trial processes' cwd differs)."""
        from scbert_platform.track.runs import tracking_uri

        changes = {"train.storage_path": str(self.directory / "train")}
        if self.params.model.gene2vec:
            changes["model.gene2vec"] = str(Path(self.params.model.gene2vec).resolve())
        params = self.params.replace(changes)
        return {
            "kind": self.kind,
            "shards": str(self.shards.resolve()),
            "params": params.to_dict(),
            "init_from": str(Path(self.init_from).resolve()) if self.init_from else None,
            "from_scratch": self.from_scratch,
            "parent_run_id": parent_run_id,
            "experiment": self.experiment,
            "tracking_uri": tracking_uri(),
            "events": str(self.directory / EVENTS_FILE),
        }


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune trainable: one fine-tuning run with the trial's overrides and split."""
    import ray.tune

    from scbert_platform.data.splits import CellSplit
    from scbert_platform.train.distributed import fit

    os.environ["MLFLOW_TRACKING_URI"] = context["tracking_uri"]
    trial_id = ray.tune.get_context().get_trial_id()
    spec = config.get("trial", config)  # cv: {"trial": {...}}; sweep: {"params": {...}}
    params = Params.from_dict(context["params"]).replace(
        {  # numpy scalars as Python's
            dotted: value.item() if hasattr(value, "item") else value
            for dotted, value in spec.get("params", {}).items()
        }
    )
    split = CellSplit.from_dict(spec["split"]) if spec.get("split") else None
    from_scratch = bool(spec.get("from_scratch", context["from_scratch"]))
    storage = Path(params.train.storage_path)
    resume = any((storage / trial_id).glob("checkpoint_*"))
    log_event(context["events"], trial_id, "start", resumed=resume)
    tags = {TRIAL_TAG: trial_id, STUDY_TAG: Path(context["events"]).parent.name}
    tags |= {f"scbert.{k}": str(v) for k, v in spec.get("tags", {}).items()}
    result = fit(
        "finetune",
        context["shards"],
        params,
        init_from=None if from_scratch else context["init_from"],
        from_scratch=from_scratch,
        run_name=trial_id,
        resume=resume,
        experiment=context["experiment"],
        split=split,
        parent_run_id=context["parent_run_id"],
        tags=tags,
        report_to_tune=True,
        extra_config={"pg_file": str(storage / trial_id / PLACEMENT_GROUPS_FILE)},
    )
    final = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    kept = kept_validation_score(final)
    if kept is not None:  # the trial's score is its kept model's, not its last step's
        final["val/macro_f1"] = kept
    final |= {"steps": result.steps, "done_training": 1}
    log_event(context["events"], trial_id, "end", mlflow_run_id=result.mlflow_run_id)
    ray.tune.report(final)


def kept_validation_score(metrics: dict[str, Any]) -> float | None:
    """The validation macro F1 of the model a fine-tuning run kept: scored after training
    (``val/kept_macro_f1``; with ``train.average_from`` an average of snapshots), else that of
    the best validation step (a run logged before the kept model was scored), else None."""
    for key in ("val/kept_macro_f1", "val/best_macro_f1"):
        if metrics.get(key) is not None:
            return float(metrics[key])
    return None


def log_event(path: str | Path, trial_id: str, event: str, **extra: Any) -> None:
    line = {"trial_id": trial_id, "event": event, "time": time.time(), "pid": os.getpid()}
    with open(path, "a") as out:
        out.write(json.dumps(line | extra) + "\n")


def read_events(directory: str | Path) -> list[dict[str, Any]]:
    path = Path(directory) / EVENTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trial_cpus(params: Params) -> float:
    return params.train.workers * params.train.cpus_per_worker


DATA_CPUS_PER_TRIAL = 0.5  # see concurrency()
STOP_GRACE_S = 5
PLACEMENT_GROUPS_FILE = "placement_groups"  # in a trial's Train run: its workers' groups


def release_placement_groups(run_dir: Path) -> int:
    """Remove the workers' placement groups a trial's Train run recorded and left behind.

    A trial that Tune stops early (ASHA) is killed inside its Train run; Ray Train's own cleaner
    needs the dashboard's state API to notice, which this platform does not start, so without
    this the workers' CPUs stay reserved and the next trial's Ray Data pipeline waits for them
    for ever (seen here: a sweep hung after its first early-stopped trial)."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    path = run_dir / PLACEMENT_GROUPS_FILE
    if not path.is_file():
        return 0
    table = placement_group_table()
    released = 0
    for hex_id in set(path.read_text().split()):
        if table.get(hex_id, {}).get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id))))
            released += 1
    return released


def _release_callback(storage: Path) -> Any:
    """A Tune callback: some seconds after a trial ends (Tune kills a stopped trial's actor after
    ``STOP_GRACE_S``, and its Train controller with it), free what its Train run left."""
    from ray import tune

    class ReleaseEndedTrials(tune.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.ended: dict[str, float] = {}

        def _ended(self, trial: Any) -> None:
            self.ended[trial.trial_id] = time.monotonic()

        def on_trial_complete(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            self._ended(trial)

        def on_trial_error(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            self._ended(trial)

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            now = time.monotonic()
            for trial_id, when in list(self.ended.items()):
                if now - when > STOP_GRACE_S + 2:
                    release_placement_groups(storage / trial_id)
                    del self.ended[trial_id]

        def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
            if self.ended:
                time.sleep(
                    max(0.0, STOP_GRACE_S + 2 - (time.monotonic() - min(self.ended.values())))
                )
            for trial_id in self.ended:
                release_placement_groups(storage / trial_id)

    return ReleaseEndedTrials()


def _progress_callback(kind: str, total: int | None, metric: str, mode: str) -> Any:
    """A Tune callback drawing the study's bar: trials done of ``total``, how many are running,
    stopped early and failed, and the best ``metric`` so far (on the driver: Tune runs its
    callbacks there)."""
    from ray import tune

    from scbert_platform.console import Progress, progress

    class TrialProgress(tune.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.bar: Progress | None = None
            self.best: float | None = None

        def setup(self, **info: Any) -> None:
            self.bar = progress(total=total, desc=f"{kind} trials", unit="trial")

        def on_trial_result(
            self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
        ) -> None:
            value = result.get(metric)
            if isinstance(value, int | float) and math.isfinite(value):
                better = max if mode == "max" else min
                self.best = value if self.best is None else better(self.best, value)
            self._show(trials, redraw=True)

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            self._show(trials, redraw=False)

        def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
            self._show(trials, redraw=False)
            if self.bar is not None:
                self.bar.close()

        def _show(self, trials: list[Any], *, redraw: bool) -> None:
            if self.bar is None:
                return
            ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
            stopped = sum(
                t.status == "TERMINATED" and not (t.last_result or {}).get("done") for t in ended
            )
            failed = sum(t.status == "ERROR" for t in ended)
            running = sum(t.status == "RUNNING" for t in trials)
            best = "" if self.best is None else f", best {metric} {self.best:.3f}"
            postfix = f"running {running}, stopped early {stopped}, failed {failed}{best}"
            if postfix != self.bar.postfix or len(ended) != self.bar.n:
                self.bar.set_postfix_str(postfix, refresh=False)
                self.bar.update(len(ended) - self.bar.n)
                if redraw:
                    self.bar.redraw()

    return TrialProgress()


def concurrency(params: Params, cluster_cpus: float, wanted: int | None) -> int:
    """Trials at once (at least 1, at most ``wanted``): each needs its workers' CPUs and half a
    CPU for its own Ray Data pipeline. A whole CPU was needed before each training worker kept
    its epochs in memory (``loader.EpochCache``): two trials' pipelines, running every epoch,
    were seen to wait on each other for ever ("Cluster resources are not enough to run any
    task") on 2 CPUs. Now a pipeline runs in the first epoch only: two trials of 0.5 CPU each
    (``train.cpus_per_worker=0.5``) run side by side on 2 CPUs (2026-11-28: 5 CV folds of 300
    steps, no stall)."""
    per_trial = trial_cpus(params) + DATA_CPUS_PER_TRIAL
    fits = max(1, math.floor(cluster_cpus / per_trial + 1e-9))
    if wanted is not None and wanted < 1:
        raise ValueError(f"--max-concurrent must be >= 1, got {wanted}")
    if wanted is not None and wanted > fits:
        print(
            f"note: {wanted} concurrent trials of {trial_cpus(params):g} CPUs (and one CPU each "
            f"for Ray Data) do not fit {cluster_cpus:g} CPUs; running {fits}",
            file=sys.stderr,
        )
    return min(fits, wanted) if wanted else fits


def with_trial_resources(params: Params, cpus: float | None, gpus: float | None) -> Params:
    """``params`` with ``--trial-cpus`` (CPUs of a trial, split over its workers) and
    ``--trial-gpus`` (GPUs per worker, fractional allowed: 0.5 puts two trials' workers on one
    GPU) applied."""
    changes: dict[str, Any] = {}
    if cpus is not None:
        if cpus <= 0:
            raise ValueError(f"--trial-cpus must be > 0, got {cpus}")
        changes["train.cpus_per_worker"] = cpus / params.train.workers
    if gpus is not None:
        if gpus < 0:
            raise ValueError(f"--trial-gpus must be >= 0, got {gpus}")
        changes["train.use_gpu"] = gpus > 0
        changes["train.gpus_per_worker"] = gpus
    return params.replace(changes)


def parent_run(study: Study, resume: bool, params_to_log: dict[str, Any]) -> str:
    """The study's MLflow parent run: created, or (resume) the one it already has."""
    import mlflow

    from scbert_platform.data.manifest import MANIFEST
    from scbert_platform.track.runs import experiment_id, source_tags

    marker = study.directory / PARENT_RUN_FILE
    if resume:
        if not marker.is_file():
            raise TrainingError(f"no {study.kind} {study.name} in {study.storage} to resume")
        return marker.read_text().strip()
    if study.directory.exists() and any(study.directory.iterdir()):
        raise TrainingError(
            f"{study.kind} {study.name} already exists in {study.storage}: continue it with "
            f"--resume {study.name}, or choose another --name"
        )
    exp_id = experiment_id(study.experiment)
    study.directory.mkdir(parents=True, exist_ok=True)
    with mlflow.start_run(experiment_id=exp_id, run_name=study.name) as run:
        mlflow.set_tags(
            source_tags(study.shards / MANIFEST)
            | {"scbert.task": "finetune", "scbert.kind": study.kind, STUDY_TAG: study.name}
        )
        mlflow.log_params({k: v for k, v in params_to_log.items() if v is not None})
        mlflow.log_dict(study.params.to_dict(), "params.yaml")
        marker.write_text(run.info.run_id)
        return str(run.info.run_id)


def tuner(
    study: Study,
    parent_run_id: str,
    *,
    param_space: dict[str, Any],
    resume: bool,
    max_concurrent: int,
    metric: str = "val/macro_f1",
    mode: str = "max",
    search_alg: Any = None,
    scheduler: Any = None,
    num_samples: int = 1,
    n_trials: int | None = None,
) -> Any:
    """A new Tuner for the study, or the restored one (finished trials kept, unfinished resumed,
    errored ones retried). ``n_trials``: how many the study runs, for its progress bar."""
    from ray import tune

    from scbert_platform.console import verbose

    _tune_environment()
    callbacks = [
        _release_callback(study.directory / "train"),
        _progress_callback(study.kind, n_trials, metric, mode),
    ]
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=study.context(parent_run_id)), DRIVER_RESOURCES
    )
    if resume:
        return _restored_tuner(study, trainable, param_space)
    search_alg, limit = _search(study, search_alg, max_concurrent)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=limit,
            trial_name_creator=lambda trial: f"{study.name}-{trial.trial_id}",
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name=study.name,
            storage_path=str(study.storage),
            verbose=1 if verbose() else 0,
            callbacks=callbacks,
        ),
    )


def _tune_environment() -> None:
    """The environment variables that change how Tune runs (where not set already)."""
    from scbert_platform.console import verbose

    if not verbose():
        # Tune's new console output prints its configuration box and TensorBoard hints even at
        # verbose=0; the legacy reporter at verbose=0 prints nothing, and our bar shows the trials
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A trial Tune stops (ASHA) is blocked inside its Train run and never returns to Tune, which
    # by default waits 600 s before killing it: meanwhile its workers keep their CPUs and the
    # next trial's Ray Data pipeline waits for them. Killing it after a few seconds ends its
    # Train controller, workers and placement group with it.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(STOP_GRACE_S))


def _restored_tuner(study: Study, trainable: Any, param_space: dict[str, Any]) -> Any:
    """The study's Tuner restored from its directory (errored trials retried)."""
    from ray import tune

    if not tune.Tuner.can_restore(str(study.directory)):
        raise TrainingError(
            f"{study.directory} has no Tune state to restore (the {study.kind} stopped "
            "before its first trial started): start it again under a new --name"
        )
    # the callbacks come back with the pickled run config of the original Tuner
    return tune.Tuner.restore(
        str(study.directory), trainable=trainable, resume_errored=True, param_space=param_space
    )


def _search(study: Study, search_alg: Any, max_concurrent: int) -> tuple[Any, int | None]:
    """The search algorithm and Tune's limit of trials at once. Grid and random (no
    ``search_alg``): Tune's variant generator, seeded, which keeps to ``max_concurrent`` itself."""
    if search_alg is not None:
        return search_alg, max_concurrent
    from ray.tune.search import BasicVariantGenerator

    generator = BasicVariantGenerator(
        max_concurrent=max_concurrent, random_state=study.params.train.seed
    )
    return generator, None


def child_runs(parent_run_id: str) -> dict[str, Any]:
    """The parent's child runs by trial id (the latest where a trial has several)."""
    from mlflow.tracking import MlflowClient

    from scbert_platform.track.runs import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri())
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=10_000,
    )
    found: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        trial = run.data.tags.get(TRIAL_TAG)
        if trial:
            found[trial] = run
    return found


def close_stopped_children(parent_run_id: str, reasons: dict[str, str]) -> None:
    """Child runs of trials that ended without finishing their run (stopped early by the
    scheduler, or failed) are marked KILLED/FAILED with the reason, not left RUNNING."""
    from mlflow.tracking import MlflowClient

    from scbert_platform.track.runs import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri())
    for trial_id, run in child_runs(parent_run_id).items():
        if run.info.status != "FINISHED" and trial_id in reasons:
            # a trial Tune stops is interrupted inside its run, which MLflow then calls FAILED
            reason = reasons[trial_id]
            client.set_tag(run.info.run_id, "scbert.stopped", reason)
            status = "FAILED" if reason.startswith("error") else "KILLED"
            client.set_terminated(run.info.run_id, status=status)


@contextlib.contextmanager
def running(parent_run_id: str) -> Iterator[None]:
    """The parent run shows RUNNING while the study runs, KILLED if interrupted, FAILED on an
    error (a restored study sets it RUNNING again)."""
    from mlflow.tracking import MlflowClient

    from scbert_platform.track.runs import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri())
    client.update_run(parent_run_id, status="RUNNING")
    try:
        yield
    except KeyboardInterrupt:
        client.set_terminated(parent_run_id, status="KILLED")
        raise
    except BaseException:
        client.set_terminated(parent_run_id, status="FAILED")
        raise
    client.set_terminated(parent_run_id, status="FINISHED")
