"""Sweeps and cross-validation for real: Ray Tune trials that are Ray Train runs on the real
dataset, MLflow parent and child runs, a sweep restored after its driver is killed, CV tables
next to the baselines, and registration of a CV run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PBMC_PARAMS, noise_in, tiny_params

from scbert_platform.ingest import read_manifest
from scbert_platform.params import Params
from scbert_tune.trials import read_events

pytestmark = pytest.mark.ray
N_FOLDS = 3  # the CV test's folds


def scbert(
    workdir: Path, *args: str, timeout: float = 600, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scbert_platform.cli", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def client(workdir: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns.db'}")


def children(workdir: Path, parent: Any) -> list[Any]:
    return client(workdir).search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )


def test_sweep_is_restored_after_its_driver_is_killed(pbmc_shards: Path, workdir: Path) -> None:
    """4 trials one at a time (ASHA on); the driver and its local Ray are SIGKILLed after the
    first trial finished; --resume runs the rest: no finished trial runs twice, and MLflow holds
    one parent with one child per trial."""
    params = tiny_params(workdir / "runs", max_steps=12, val_every=3, ckpt_every=3)
    params.dump(workdir / "params.yaml")
    (workdir / "spec.yaml").write_text(
        "search: random\nnum_samples: 4\nscheduler: asha\ngrace_period: 2\n"
        "space:\n  model.n_bins: [3, 5, 7, 9]\n  train.lr: {loguniform: [3.0e-4, 3.0e-3]}\n"
    )
    common = ["--spec", "spec.yaml", "--max-concurrent", "1", "--params", "params.yaml"]
    sweep_dir = workdir / "runs" / "s"
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scbert_platform.cli",
            "sweep",
            str(pbmc_shards),
            "--name",
            "s",
            *common,
        ],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "first.log", "w"),  # noqa: SIM115
        start_new_session=True,  # its own process group: the driver and the Ray it started
    )
    deadline = time.time() + 420
    try:
        while time.time() < deadline:
            ended = [e for e in read_events(sweep_dir) if e["event"] == "end"]
            states = list(sweep_dir.glob("experiment_state-*.json"))
            saved = states and states[0].read_text().count("TERMINATED") >= 1
            if ended and saved:
                break
            assert driver.poll() is None, (workdir / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished in time: " + (workdir / "first.log").read_text()[-3000:])
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finished_before = {e["trial_id"] for e in read_events(sweep_dir) if e["event"] == "end"}
    time.sleep(2)

    resumed = scbert(workdir, "sweep", str(pbmc_shards), "--resume", "s", *common)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    events = read_events(sweep_dir)
    starts: dict[str, int] = {}
    for e in events:
        if e["event"] == "start":
            starts[e["trial_id"]] = starts.get(e["trial_id"], 0) + 1
    assert len(starts) == 4
    for trial in finished_before:
        assert starts[trial] == 1, f"finished trial {trial} ran again: {events}"

    table = resumed.stdout
    assert table.count("| finished |") + table.count("| stopped early |") == 4, table
    assert table.count("| finished |") >= 2  # ASHA keeps at least the rung's best

    c = client(workdir)
    (parent,) = c.search_runs(
        [c.get_experiment_by_name("scbert-sweep").experiment_id],
        filter_string="tags.`scbert.kind` = 'sweep'",
    )
    assert parent.info.status == "FINISHED"
    kids = children(workdir, parent)
    assert sorted(k.data.tags["scbert.trial_id"] for k in kids) == sorted(starts)
    for kid in kids:
        assert kid.data.params["model.n_bins"] in {"3", "5", "7", "9"}
        history = c.get_metric_history(kid.info.run_id, "val/macro_f1")
        assert len(history) >= 2  # per-validation metrics, not just the last
        if kid.info.status == "FINISHED":
            assert Path(kid.data.tags["scbert.checkpoint"], "config.json").is_file()
        else:
            assert (
                kid.info.status == "KILLED" and "stopped early" in kid.data.tags["scbert.stopped"]
            )
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.png", "summary.md", "best_params.yaml"} <= artifacts
    best = Params.load(sweep_dir / "best_params.yaml")
    best_row = parent.data.tags["scbert.best_trial"]
    best_kid = next(k for k in kids if k.data.tags["scbert.trial_id"] == best_row)
    assert str(best.model.n_bins) == best_kid.data.params["model.n_bins"]
    assert parent.data.metrics["best/val/macro_f1"] == pytest.approx(
        best_kid.data.metrics["val/best_macro_f1"]
    )


def test_cv_on_real_folds_next_to_the_baselines_then_register(
    pbmc_h5ad: Path, workdir: Path
) -> None:
    """Fold trials from scratch (tiny model, few steps: the mechanics, not the accuracy), the
    logreg baseline in the same table, every labelled cell tested once, then the CV run is
    registered with its CV metrics and promoted past the gate. The real cells are ingested in
    3 folds rather than 5: the same mechanics in 2 fewer trials (the suite's time budget)."""
    from scbert_platform.ingest import ingest
    from scbert_platform.params import DataParams

    shards = workdir / "pbmc68k"
    data = DataParams(**PBMC_PARAMS, n_folds=N_FOLDS)
    ingest(pbmc_h5ad, shards, data, executor="local", log=lambda _: None)
    tiny_params(workdir / "runs", max_steps=6, val_every=3, ckpt_every=3).dump(
        workdir / "params.yaml"
    )
    result = scbert(
        workdir,
        "cv",
        str(shards),
        "--from-scratch",
        "--baseline",
        "logreg",
        "--name",
        "cv",
        "--metrics",
        "cv.json",
        "--params",
        "params.yaml",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"| scBERT (from scratch) | {N_FOLDS} |" in result.stdout
    assert f"| logreg | {N_FOLDS} |" in result.stdout
    assert "Per-class F1" in result.stdout and "CD14+ Monocyte" in result.stdout
    # the study's bar as plain lines (no terminal), not Tune's tables or the workers' output
    assert f"cv trials: {N_FOLDS}/{N_FOLDS} trials (100%)" in result.stderr
    assert "failed 0" in result.stderr
    assert noise_in(result.stderr + result.stdout) == [], result.stderr
    assert not result.stdout.startswith("cv trials")  # stdout is the table alone
    summary = json.loads((workdir / "cv.json").read_text())
    groups = {g["model"]: g for g in summary["groups"]}
    scratch = groups["scBERT (from scratch)"]
    counts = read_manifest(shards)["folds"]["counts"]
    assert [f["n"] for f in scratch["folds"]] == [counts[str(k)] for k in range(N_FOLDS)]
    assert np.std([f["accuracy"] for f in scratch["folds"]], ddof=1) == pytest.approx(
        scratch["accuracy_std"]
    )
    results = json.loads((workdir / "runs" / "cv" / "cv_results.json").read_text())
    total = sum(map(sum, results[0]["confusion_matrix"]))
    assert total == sum(counts.values())  # the summed confusion: every labelled cell once

    c = client(workdir)
    parent = c.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["cv/macro_f1"] == pytest.approx(scratch["macro_f1_mean"])
    assert "cv/macro_f1_std" in parent.data.metrics
    assert any(k.startswith("cv/f1/") for k in parent.data.metrics)
    assert "cv/logreg/macro_f1" in parent.data.metrics
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"confusion_matrix.png", "cv_report.md", "cv_results.json"} <= artifacts
    kids = children(workdir, parent)
    assert sorted(k.data.tags["scbert.cv_held_out"] for k in kids) == [
        f"fold {k}" for k in range(N_FOLDS)
    ]
    assert all(k.data.params["split"].startswith("test folds") for k in kids)

    registered = scbert(workdir, "register", summary["mlflow_run_id"])
    assert registered.returncode == 0, registered.stderr
    promoted = scbert(workdir, "promote", "scbert-pbmc68k")
    assert promoted.returncode == 0, promoted.stderr
    version = c.get_model_version_by_alias("scbert-pbmc68k", "champion")
    assert float(version.tags["metric.cv/macro_f1"]) == pytest.approx(scratch["macro_f1_mean"])


def test_leave_one_dataset_out(pbmc_h5ad: Path, workdir: Path, ray_local: Any) -> None:
    """Real cells in two artificial 'datasets' (alternate cells), ingested with --batch-key:
    each dataset in turn is the test set."""
    import anndata

    from scbert_platform.ingest import ingest
    from scbert_platform.params import DataParams
    from scbert_tune.cv import cross_validate

    adata = anndata.read_h5ad(pbmc_h5ad)
    adata.obs["dataset"] = np.where(np.arange(adata.n_obs) % 2 == 0, "lab_a", "lab_b")
    adata.write_h5ad(workdir / "two.h5ad")
    shards = workdir / "two"
    data = DataParams(**PBMC_PARAMS, batch_key="dataset")
    ingest(workdir / "two.h5ad", shards, data, executor="local", log=lambda _: None)
    params = tiny_params(workdir / "runs", max_steps=4, val_every=2, ckpt_every=2)
    result = cross_validate(shards, params, protocol="leave-one-dataset-out", name="lodo")
    (group,) = result.groups
    assert [f["held_out"] for f in group["folds"]] == ["lab_a", "lab_b"]
    batches = read_manifest(shards)["batches"]["counts"]
    assert [f["n"] for f in group["folds"]] == [batches["lab_a"], batches["lab_b"]]
    assert "| scBERT | all | 2 |" in result.markdown


def test_placement_groups_a_stopped_trial_left_are_released(ray_local: Any, tmp_path: Path) -> None:
    from ray.util.placement_group import placement_group, placement_group_table

    from scbert_tune.trials import PLACEMENT_GROUPS_FILE, release_placement_groups

    group = placement_group([{"CPU": 0.5}])
    ray_local.get(group.ready(), timeout=60)
    (tmp_path / PLACEMENT_GROUPS_FILE).write_text(group.id.hex() + "\n")
    assert release_placement_groups(tmp_path) == 1
    assert placement_group_table()[group.id.hex()]["state"] == "REMOVED"
    assert release_placement_groups(tmp_path) == 0  # nothing left: a finished trial's case
    assert release_placement_groups(tmp_path / "never-started") == 0
