"""Cross-validation for real: Ray Tune fold trials that are Ray Train runs on the real dataset,
the CV table next to the baselines on the same folds, its MLflow parent and child runs, the
registration of a CV run and the gate's baseline rule. (In a file of
their own so that the suite's two processes can run them beside the sweep tests in
tests/test_tune.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import PBMC_PARAMS, child_runs, mlflow_client, noise_in, scbert_cli, tiny_params

from scbert_platform.data.manifest import read_manifest

pytestmark = pytest.mark.ray
N_FOLDS = 2  # the CV test's folds


def test_cv_on_real_folds_next_to_the_baselines_then_register(
    pbmc_h5ad: Path, workdir: Path
) -> None:
    """Fold trials from scratch (tiny model, few steps: the mechanics, not the accuracy), the
    logreg baseline in the same table, every labelled cell tested once, then the CV run is
    registered with its CV metrics, refused by the gate (below logreg) and forced. The real
    cells are ingested in 2 folds rather than 5: the same mechanics in 3 fewer trials (the
    suite's time budget)."""
    from scbert_platform.data.ingest import ingest
    from scbert_platform.params import DataParams

    shards = workdir / "pbmc68k"
    data = DataParams(**PBMC_PARAMS, n_folds=N_FOLDS)
    ingest(pbmc_h5ad, shards, data, executor="local", log=lambda _: None)
    tiny_params(workdir / "runs", max_steps=3, val_every=3, ckpt_every=3).dump(
        workdir / "params.yaml"
    )

    def cv(*how: str, metrics: str) -> subprocess.CompletedProcess[str]:
        return scbert_cli(
            workdir,
            "cv",
            str(shards),
            "--from-scratch",
            "--baseline",
            "logreg",
            *how,
            "--metrics",
            metrics,
            "--params",
            "params.yaml",
        )

    result = cv("--name", "cv", metrics="cv.json")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"| scBERT (from scratch) | {N_FOLDS} |" in result.stdout
    assert f"| logreg | {N_FOLDS} |" in result.stdout
    assert "Per-class F1" in result.stdout and "CD14+ Monocyte" in result.stdout
    assert "| cell type | scBERT (from scratch) | logreg |" in result.stdout  # side by side
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

    c = mlflow_client(workdir)
    parent = c.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["cv/macro_f1"] == pytest.approx(scratch["macro_f1_mean"])
    assert "cv/macro_f1_std" in parent.data.metrics
    assert any(k.startswith("cv/f1/") for k in parent.data.metrics)
    assert {"cv/logreg/macro_f1", "cv/logreg/ece"} <= set(parent.data.metrics)  # beside scBERT
    logreg = groups["logreg"]["macro_f1_mean"]  # the only baseline: the best one
    assert parent.data.metrics["cv/baseline_macro_f1"] == pytest.approx(logreg)
    assert parent.data.tags["scbert.cv_best_baseline"] == "logreg"
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"confusion_matrix.png", "cv_report.md", "cv_results.json"} <= artifacts
    # each fold model calibrated on its validation cells; before/after on the held-out cells
    assert "reliability.png" in artifacts
    assert "Calibration on the held-out cells" in result.stdout
    assert all(f["ece"] >= 0 and "ece_uncalibrated" in f for f in scratch["folds"])
    assert {"cv/ece", "cv/ece_uncalibrated", "cv/unassigned_correct"} <= set(parent.data.metrics)
    assert parent.data.metrics["cv/ece_pooled"] == pytest.approx(scratch["ece_pooled"])
    assert scratch["reliability"]["calibrated"] and scratch["reliability"]["uncalibrated"]
    kids = child_runs(workdir, parent)
    assert sorted(k.data.tags["scbert.cv_held_out"] for k in kids) == [
        f"fold {k}" for k in range(N_FOLDS)
    ]
    assert all(k.data.params["split"].startswith("test folds") for k in kids)

    # resumed after every trial had finished (a driver that died before its report): the trials
    # are kept, and a fresh process reads their predictions back into the same report
    resumed = cv("--resume", "cv", metrics="cv-resumed.json")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"cv trials: {N_FOLDS}/{N_FOLDS} trials (100%)" in resumed.stderr
    again = json.loads((workdir / "cv-resumed.json").read_text())
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]
    again_scratch = {g["model"]: g for g in again["groups"]}["scBERT (from scratch)"]
    assert [f["run_id"] for f in again_scratch["folds"]] == [f["run_id"] for f in scratch["folds"]]
    assert again_scratch["macro_f1_mean"] == pytest.approx(scratch["macro_f1_mean"])
    assert len(child_runs(workdir, parent)) == N_FOLDS  # no fold trained again

    registered = scbert_cli(workdir, "register", summary["mlflow_run_id"])
    assert registered.returncode == 0, registered.stderr
    # 3 steps from scratch are far below logreg on the same folds: the gate refuses them
    assert scratch["macro_f1_mean"] < logreg
    refused = scbert_cli(workdir, "promote", "scbert-pbmc68k")
    assert refused.returncode == 2 and "below the best baseline's (logreg)" in refused.stderr
    promoted = scbert_cli(workdir, "promote", "scbert-pbmc68k", "--force", "the mechanics")
    assert promoted.returncode == 0, promoted.stderr
    version = c.get_model_version_by_alias("scbert-pbmc68k", "champion")
    assert float(version.tags["metric.cv/macro_f1"]) == pytest.approx(scratch["macro_f1_mean"])
