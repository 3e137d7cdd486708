"""``scbert sweep``: Ray Tune over any dotted parameter, each trial a Ray Train fine-tuning run.

The built-in space is the paper's sensitivity grid (Yang et al. 2022, Extended Data Fig. 2):
``model.n_bins`` in {3, 5, 7, 9}, ``model.depth`` in {2, 4, 6, 8}, ``model.heads`` in {5, 10, 20},
``model.dim`` in {50, 100, 200} (only with learned gene embeddings: a gene2vec file fixes the
width), and ``train.lr`` log-uniform in [1e-5, 1e-3]. A YAML spec file replaces it::

    search: random            # grid | random | optuna | hyperopt
    num_samples: 8            # samples (grid: repeats of the whole grid)
    metric: val/macro_f1      # what the search and ASHA compare
    mode: max
    scheduler: asha           # asha | fifo
    grace_period: 2           # validations before ASHA may stop a trial
    reduction_factor: 2
    space:
      model.n_bins: [3, 5, 7, 9]              # a list: a choice (every value, with search: grid)
      model.depth: {grid: [2, 4]}             # always every value
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      train.batch_size: {randint: [8, 33]}    # upper bound excluded
      train.warmup_steps: {uniform: [0, 10]}  # also quniform: [low, high, step]
    fixed:                    # set in every trial
      train.max_steps: 60

A pretrained checkpoint (``--init-from``) fixes the architecture and ``n_bins``: such a sweep may
only vary ``train.*`` keys. The architecture grid is swept from scratch, as here.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scbert_platform.cluster import start_ray
from scbert_platform.data.loader import ShardInfo
from scbert_platform.params import Params, ParamsError
from scbert_tune.trials import (
    Study,
    child_runs,
    close_stopped_children,
    concurrency,
    parent_run,
    running,
    tuner,
    with_trial_resources,
)

SEARCHES = ("grid", "random", "optuna", "hyperopt")
SCHEDULERS = ("asha", "fifo")
PAPER_SPACE: dict[str, Any] = {
    "model.n_bins": [3, 5, 7, 9],
    "model.depth": [2, 4, 6, 8],
    "model.heads": [5, 10, 20],
    "model.dim": [50, 100, 200],
    "train.lr": {"loguniform": [1e-5, 1e-3]},
}
ARCHITECTURE = ("model.n_bins", "model.dim", "model.depth", "model.heads", "model.dim_head")


@dataclass
class SweepSpec:
    space: dict[str, Any] = field(default_factory=lambda: dict(PAPER_SPACE))
    fixed: dict[str, Any] = field(default_factory=dict)
    search: str = "random"
    num_samples: int = 8
    metric: str = "val/macro_f1"
    mode: str = "max"
    scheduler: str = "asha"
    grace_period: int = 2
    reduction_factor: int = 2

    @classmethod
    def load(cls, path: str | Path) -> SweepSpec:
        values = yaml.safe_load(Path(path).read_text())
        if not isinstance(values, Mapping):
            raise ValueError(f"{path}: a sweep spec is a mapping (see scbert sweep --help)")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        spec = cls(**{k: v for k, v in values.items()})
        if not isinstance(spec.space, Mapping) or not spec.space:
            raise ValueError(f"{path}: space must be a non-empty mapping of dotted keys")
        return spec

    def check(self, params: Params, *, pretrained: bool) -> None:
        """Every key a known parameter, every value of its type, settings that exist."""
        problems = []
        if self.search not in SEARCHES:
            problems.append(f"search must be one of {SEARCHES}, not {self.search!r}")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler must be one of {SCHEDULERS}, not {self.scheduler!r}")
        if self.mode not in ("min", "max"):
            problems.append(f"mode must be min or max, not {self.mode!r}")
        if self.num_samples < 1:
            problems.append("num_samples must be >= 1")
        for key, value in {**self.fixed, **self.space}.items():
            try:
                for sample in _samples(key, value):
                    params.replace({key: sample})
            except (ParamsError, ValueError) as err:
                problems.append(str(err))
            if pretrained and key in ARCHITECTURE and key in self.space:
                problems.append(
                    f"{key} cannot be swept from a pretrained checkpoint (--init-from fixes the "
                    "architecture and n_bins): sweep it from scratch, or sweep train.* keys"
                )
        if self.search in ("optuna", "hyperopt"):
            grids = [k for k, v in self.space.items() if isinstance(v, Mapping) and "grid" in v]
            if grids:
                problems.append(f"search {self.search} cannot take grid values ({grids})")
        if problems:
            raise ValueError("sweep spec: " + "; ".join(problems))


def default_spec(params: Params) -> SweepSpec:
    """The paper's grid; model.dim only where the gene embeddings allow another width."""
    spec = SweepSpec()
    if params.model.gene_embedding == "gene2vec":
        del spec.space["model.dim"]
        print(
            f"note: model.dim stays {params.model.dim} (the width of the gene2vec file "
            f"{params.model.gene2vec or '(none)'}); set model.gene_embedding=learned to sweep it",
            file=sys.stderr,
        )
    return spec


def _samples(key: str, value: Any) -> list[Any]:
    """Representative values of a space entry (for type checks)."""
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{key}: an empty list of values")
        return value
    if not isinstance(value, Mapping):
        return [value]
    if len(value) != 1:
        raise ValueError(f"{key}: one of choice, grid, uniform, loguniform, randint, quniform")
    ((kind, args),) = value.items()
    if kind in ("choice", "grid"):
        return list(args)
    if kind in ("uniform", "loguniform", "quniform"):
        low, high = float(args[0]), float(args[1])
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ValueError(f"{key}: {kind} needs 0 < low < high, got {args}")
        return [low, high]
    if kind == "randint":
        low, high = int(args[0]), int(args[1])
        if not low < high:
            raise ValueError(f"{key}: randint needs low < high (high excluded), got {args}")
        return [low, high - 1]
    raise ValueError(f"{key}: unknown distribution {kind!r}")


def tune_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = dict(spec.fixed)
    for key, value in spec.space.items():
        if isinstance(value, list):
            value = {"grid" if spec.search == "grid" else "choice": value}
        if not isinstance(value, Mapping):
            space[key] = value
            continue
        ((kind, args),) = value.items()
        if kind == "grid":
            space[key] = tune.grid_search(list(args))
        elif kind == "choice":
            space[key] = (
                tune.grid_search(list(args)) if spec.search == "grid" else tune.choice(list(args))
            )
        elif kind == "uniform":
            space[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "loguniform":
            space[key] = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "quniform":
            space[key] = tune.quniform(float(args[0]), float(args[1]), float(args[2]))
        elif kind == "randint":
            space[key] = tune.randint(int(args[0]), int(args[1]))
    return space


def n_trials(space: dict[str, Any], num_samples: int) -> int:
    """Trials a Tune space gives: each sample runs every combination of its grid values."""
    grids = [v["grid_search"] for v in space.values() if isinstance(v, dict) and "grid_search" in v]
    return num_samples * math.prod(len(g) for g in grids)


def _search_alg(spec: SweepSpec, seed: int) -> Any:
    import importlib.util

    if spec.search in ("optuna", "hyperopt") and importlib.util.find_spec(spec.search) is None:
        raise ValueError(f"search {spec.search} needs {spec.search}: pip install {spec.search}")
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=spec.metric, mode=spec.mode, seed=seed)
    if spec.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=spec.metric, mode=spec.mode, random_state_seed=seed)
    return None


def _scheduler(spec: SweepSpec) -> Any:
    if spec.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",  # one result per validation (see train.distributed)
        grace_period=spec.grace_period,
        reduction_factor=spec.reduction_factor,
        max_t=10_000,
    )


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    directory: Path
    keys: list[str]


def sweep(
    shards: str | Path,
    params: Params,
    *,
    spec: SweepSpec | None = None,
    name: str | None = None,
    resume: bool = False,
    init_from: str | None = None,
    max_concurrent: int | None = None,
    trial_cpus: float | None = None,
    trial_gpus: float | None = None,
) -> SweepResult:
    """Run (or, ``resume``, continue) a sweep; the summary is logged to the parent run."""
    import time

    from scbert_platform.track.runs import MODEL_URI_TAG

    params = with_trial_resources(params, trial_cpus, trial_gpus)
    spec = spec or default_spec(params)
    spec.check(params, pretrained=bool(init_from))
    ShardInfo.read(shards)  # a damaged shard directory fails here, not inside every trial
    name = name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    study = Study("sweep", name, Path(shards), params, init_from=init_from)
    cluster_cpus = start_ray()
    parallel = concurrency(params, cluster_cpus, max_concurrent)
    parent = _parent_run(study, spec, resume=resume, parallel=parallel)
    keys = list(spec.space)
    with running(parent):
        param_space = tune_space(spec)
        grid = tuner(
            study,
            parent,
            param_space={"params": param_space},
            resume=resume,
            max_concurrent=parallel,
            metric=spec.metric,
            mode=spec.mode,
            search_alg=_search_alg(spec, params.train.seed),
            scheduler=_scheduler(spec),
            num_samples=spec.num_samples,
            n_trials=n_trials(param_space, spec.num_samples),
        ).fit()
        rows, reasons = _rows(grid, keys, spec.metric, child_runs(parent))
        close_stopped_children(parent, reasons)
        best = _best(rows, spec.mode)
        _log_summary(study, parent, rows, best, keys, spec, MODEL_URI_TAG)
    return SweepResult(name, parent, rows, best, study.directory, keys)


def _parent_run(study: Study, spec: SweepSpec, *, resume: bool, parallel: int) -> str:
    """The sweep's MLflow parent run (created, or the one it has), with the spec logged to a
    new one; says what the sweep runs."""
    import mlflow

    from scbert_platform.track.runs import tracking_uri

    parent = parent_run(
        study,
        resume,
        {
            "search": spec.search,
            "num_samples": spec.num_samples,
            "metric": spec.metric,
            "scheduler": spec.scheduler,
            "max_concurrent": parallel,
            "init_from": study.init_from or "",
            "space": json.dumps(spec.space, default=str)[:6000],
        },
    )
    if not resume:
        mlflow.set_tracking_uri(tracking_uri())
        mlflow.MlflowClient().log_dict(parent, _jsonable(spec.__dict__), "sweep_spec.json")
    print(
        f"sweep {study.name}: {spec.search} search, {spec.num_samples} sample(s), "
        f"{spec.scheduler} on {spec.metric}, {parallel} trial(s) at once; MLflow parent run "
        f"{parent}" + (" (resumed)" if resume else ""),
        file=sys.stderr,
    )
    return parent


def _best(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The finished trial with the best metric (``mode``: max or min); None when none finished."""
    finished = [r for r in rows if r["status"] == "finished" and r["metric"] is not None]
    pick = max if mode == "max" else min
    return pick(finished, key=lambda r: r["metric"], default=None)


def _rows(
    grid: Any, keys: list[str], metric: str, runs: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    from scbert_platform.train.distributed import CHECKPOINT_TAG

    rows, reasons = [], {}
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        history = result.metrics_dataframe
        values = (
            history[metric].dropna().tolist() if history is not None and metric in history else []
        )
        if result.error is not None:
            status = "error"
            reasons[trial_id] = f"error: {type(result.error).__name__}"
        elif metrics.get("done_training"):
            status = "finished"
        else:
            status = "stopped early"
            reasons[trial_id] = "stopped early by the scheduler"
        run = runs.get(trial_id)
        config = (result.config or {}).get("params", {})
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                **{key: config.get(key) for key in keys},
                "metric": metrics.get(metric)
                if status == "finished"
                else (max(values) if values else None),
                "test/accuracy": metrics.get("test/accuracy"),
                "test/macro_f1": metrics.get("test/macro_f1"),
                "steps": metrics.get("steps"),
                "validations": len(values),
                "mlflow_run_id": run.info.run_id if run else None,
                "checkpoint": run.data.tags.get(CHECKPOINT_TAG) if run else None,
                "model_uri": run.data.tags.get("scbert.model_uri") if run else None,
                "params": config,
            }
        )
    rows.sort(key=lambda r: str(r["trial_id"]))
    return rows, reasons


def summary_markdown(rows: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    head = ["trial", "status", *keys, metric, "test acc", "test F1", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["trial_id"], r["status"], *(_fmt(r[k]) for k in keys)]
        cells += [_fmt(r["metric"]), _fmt(r["test/accuracy"]), _fmt(r["test/macro_f1"])]
        cells.append(_fmt(r["steps"]))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _jsonable(values: Any) -> Any:
    return json.loads(json.dumps(values, default=str))


def summary_png(rows: list[dict[str, Any]], keys: list[str], metric: str, path: Path) -> None:
    """The metric against each swept key, one panel per key (finished and stopped trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        numeric = all(isinstance(r[key], int | float) for r in rows if r[key] is not None)
        levels = sorted({str(r[key]) for r in rows}) if not numeric else []
        for status, marker in (("finished", "o"), ("stopped early", "x"), ("error", "s")):
            chosen = [r for r in rows if r["status"] == status and r["metric"] is not None]
            if not chosen:
                continue
            xs = [r[key] if numeric else levels.index(str(r[key])) for r in chosen]
            ax.scatter(xs, [r["metric"] for r in chosen], marker=marker, label=status)
        if not numeric:
            ax.set_xticks(range(len(levels)), levels)
        values = [r[key] for r in rows if isinstance(r[key], int | float) and r[key] > 0]
        if numeric and values and max(values) / min(values) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{len(rows)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log_summary(
    study: Study,
    parent: str,
    rows: list[dict[str, Any]],
    best: dict[str, Any] | None,
    keys: list[str],
    spec: SweepSpec,
    model_uri_tag: str,
) -> None:
    import csv

    from mlflow.tracking import MlflowClient

    from scbert_platform.track.runs import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri())
    columns = ["trial_id", "status", *keys, spec.metric, "test/accuracy", "test/macro_f1"]
    columns += ["steps", "validations", "mlflow_run_id", "checkpoint"]
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "summary.csv"
        with csv_path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(columns)
            for r in rows:
                writer.writerow([r["metric"] if c == spec.metric else r.get(c) for c in columns])
        png_path = Path(tmp) / "summary.png"
        summary_png(rows, keys, spec.metric, png_path)
        (Path(tmp) / "summary.md").write_text(summary_markdown(rows, keys, spec.metric) + "\n")
        for file in ("summary.csv", "summary.png", "summary.md"):
            client.log_artifact(parent, str(Path(tmp) / file))
            (study.directory / file).write_bytes((Path(tmp) / file).read_bytes())
    counts = {
        s: sum(r["status"] == s for r in rows) for s in ("finished", "stopped early", "error")
    }
    for status, n in counts.items():
        client.log_metric(parent, f"trials/{status.replace(' ', '_')}", n)
    if best is not None:
        client.log_metric(parent, f"best/{spec.metric}", best["metric"])
        client.set_tag(parent, "scbert.best_trial", best["trial_id"])
        if best["mlflow_run_id"]:
            client.set_tag(parent, "scbert.best_run_id", best["mlflow_run_id"])
        if best["model_uri"]:
            client.set_tag(parent, model_uri_tag, best["model_uri"])
        study.params.replace(best["params"]).dump(study.directory / "best_params.yaml")
        client.log_artifact(parent, str(study.directory / "best_params.yaml"))
