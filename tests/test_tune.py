"""Sweeps for real: Ray Tune trials that are Ray Train runs on the real dataset, MLflow parent
and child runs, a sweep restored after its driver is killed, placement groups a stopped trial
left released. Cross-validation: tests/test_cv.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    child_runs,
    listeners,
    mlflow_client,
    noise_in,
    off_loopback,
    scbert_cli,
    tiny_params,
)

from scbert_platform.params import Params
from scbert_tune.trials import read_events

pytestmark = pytest.mark.ray


def test_sweep_is_restored_after_its_driver_is_killed(pbmc_shards: Path, workdir: Path) -> None:
    """2 trials one at a time (ASHA on); the driver and its local Ray are SIGKILLed after the
    first trial finished; --resume runs the other: no finished trial runs twice, and MLflow
    holds one parent with one child per trial. (2: each trial is a Ray Train run of about a
    minute here, and the suite has a time budget; one before the kill and one after is what
    restoring needs. 6 steps: the two validations ASHA's grace period and the history check
    need, no more.) While the first driver runs, the Ray it started (GCS, raylet, agents, Tune's,
    Train's and Ray Data's actors and task workers) is sampled each second: every listening
    socket of every one of its processes is on loopback."""
    params = tiny_params(workdir / "runs", max_steps=6, val_every=3, ckpt_every=3)
    params.dump(workdir / "params.yaml")
    (workdir / "spec.yaml").write_text(
        "search: random\nnum_samples: 2\nscheduler: asha\ngrace_period: 2\n"
        "space:\n  model.n_bins: [3, 5, 7]\n  train.lr: {loguniform: [3.0e-4, 3.0e-3]}\n"
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
    exposed: set[tuple[int, str, str, int]] = set()
    listening, sampled = 0, 0.0
    try:
        while time.time() < deadline:
            if time.time() - sampled >= 1.0:  # listeners live for the whole run: 1 s sees them
                sampled = time.time()
                found = listeners(driver.pid)
                exposed.update(off_loopback(found))
                listening = max(listening, len(found))
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
    assert exposed == set(), exposed
    assert listening >= 10  # GCS, raylet, agents, workers...: the samples saw them
    # the driver's screen: the study's bar, not Ray's token-auth notice or the workers' lines
    assert noise_in((workdir / "first.log").read_text()) == []
    finished_before = {e["trial_id"] for e in read_events(sweep_dir) if e["event"] == "end"}
    time.sleep(2)

    resumed = scbert_cli(workdir, "sweep", str(pbmc_shards), "--resume", "s", *common)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    events = read_events(sweep_dir)
    starts: dict[str, int] = {}
    for e in events:
        if e["event"] == "start":
            starts[e["trial_id"]] = starts.get(e["trial_id"], 0) + 1
    assert len(starts) == 2 and len(finished_before) == 1
    for trial in finished_before:
        assert starts[trial] == 1, f"finished trial {trial} ran again: {events}"

    table = resumed.stdout
    assert table.count("| finished |") + table.count("| stopped early |") == 2, table
    assert table.count("| finished |") >= 1  # ASHA keeps at least the rung's best

    c = mlflow_client(workdir)
    (parent,) = c.search_runs(
        [c.get_experiment_by_name("scbert-sweep").experiment_id],
        filter_string="tags.`scbert.kind` = 'sweep'",
    )
    assert parent.info.status == "FINISHED"
    kids = child_runs(workdir, parent)
    assert sorted(k.data.tags["scbert.trial_id"] for k in kids) == sorted(starts)
    for kid in kids:
        assert kid.data.params["model.n_bins"] in {"3", "5", "7"}
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
        best_kid.data.metrics["val/kept_macro_f1"]  # the kept model's score ranks the trials
    )


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
