"""The registry for real (MLflow on SQLite): register, the promotion gate, force, rollback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import finetuned_run

from scbert_platform.track.registry import (
    BASELINE_METRIC,
    BASELINE_TAG,
    CHALLENGER,
    CHAMPION,
    GateRefused,
    promote,
    register,
    rollback,
)
from scbert_platform.track.runs import MODEL_URI_TAG, experiment_id


def version_of(alias: str) -> Any:
    from scbert_platform.track.runs import registry_client

    return registry_client().get_model_version_by_alias("scbert-toy", alias)


def with_baseline(run_id: str, macro_f1: float, kind: str = "logreg") -> str:
    """The run as ``scbert cv --baseline`` leaves its parent: the best baseline's mean macro F1
    on the same folds, and its name."""
    from scbert_platform.track.runs import registry_client

    client = registry_client()
    client.log_metric(run_id, BASELINE_METRIC, macro_f1)
    client.set_tag(run_id, BASELINE_TAG, kind)
    return run_id


def test_register_promote_refuse_force_and_rollback(workdir: Path) -> None:
    first = register(finetuned_run(workdir, 0.80, seed=0))
    assert (first.name, first.alias, first.version) == ("scbert-toy", CHALLENGER, "1")
    assert version_of(CHALLENGER).tags["metric.cv/macro_f1"] == "0.8"
    promoted = promote("scbert-toy")  # no champion yet: the gate checks the metric and smoke
    assert promoted.version == "1" and str(version_of(CHAMPION).version) == "1"

    register(finetuned_run(workdir, 0.70, seed=1))  # worse by 0.10
    with pytest.raises(GateRefused, match=r"0\.7000 is below the champion's .* 0\.8000"):
        promote("scbert-toy")
    assert str(version_of(CHAMPION).version) == "1"

    register(finetuned_run(workdir, 0.795, seed=2))  # within the tolerance of 0.01
    assert promote("scbert-toy").version == "3"
    assert version_of(CHAMPION).tags["scbert.previous_champion"] == "1"

    back = rollback("scbert-toy")
    assert (back.version, back.previous) == ("1", "3")
    history = json.loads(version_of(CHAMPION).tags["scbert.alias_history"])
    assert [entry["alias"] for entry in history] == [CHALLENGER, CHAMPION, CHAMPION]
    assert history[-1]["why"] == "rollback from version 3" and history[-1]["who"]

    register(finetuned_run(workdir, 0.50, seed=3))
    forced = promote("scbert-toy", force_reason="hotfix for a mislabelled class")
    assert forced.version == "4"
    assert version_of(CHAMPION).tags["scbert.forced"] == "hotfix for a mislabelled class"


def test_gate_holds_the_challenger_to_the_best_baseline(workdir: Path) -> None:
    """Strictly below the best baseline's CV macro F1 on the same folds refuses (no tolerance);
    at or above it passes; --force overrides and is recorded."""
    register(with_baseline(finetuned_run(workdir, 0.70), 0.682))
    assert version_of(CHALLENGER).tags[BASELINE_TAG] == "logreg"
    assert version_of(CHALLENGER).tags[f"metric.{BASELINE_METRIC}"] == "0.682"
    above = promote("scbert-toy")
    assert above.version == "1" and above.reason.endswith("best baseline (logreg) 0.6820")

    register(with_baseline(finetuned_run(workdir, 0.695, seed=1), 0.70, kind="knn"))
    with pytest.raises(GateRefused) as refused:  # within the champion's tolerance, not knn's
        promote("scbert-toy")
    message = str(refused.value)
    assert "cv/macro_f1 0.6950 is below the best baseline's (knn) 0.7000 on the same folds" in (
        message
    )
    assert "champion's" not in message and str(version_of(CHAMPION).version) == "1"
    forced = promote("scbert-toy", force_reason="knn is not deployable here")
    assert (forced.version, forced.reason) == ("2", "forced: knn is not deployable here")
    assert version_of(CHAMPION).tags["scbert.forced"] == "knn is not deployable here"

    register(with_baseline(finetuned_run(workdir, 0.70, seed=2), 0.70))  # at the baseline
    assert promote("scbert-toy").version == "3"


def test_gate_without_a_baseline_figure_says_nothing_of_baselines(workdir: Path) -> None:
    """A CV run without baselines (or registered before they were logged) is not refused for
    want of one, and its promotion claims no comparison with one."""
    register(finetuned_run(workdir, 0.30))
    move = promote("scbert-toy")
    assert move.version == "1" and "baseline" not in move.reason
    assert BASELINE_TAG not in version_of(CHAMPION).tags


def test_a_run_is_registered_once(workdir: Path) -> None:
    """Registering a run again (a register killed between creating the version and moving the
    alias, or a user making an older run the challenger again) reuses the run's version."""
    from scbert_platform.track.runs import registry_client

    first, second = finetuned_run(workdir, 0.80, seed=0), finetuned_run(workdir, 0.81, seed=1)
    assert register(first).version == "1"
    client = registry_client()
    run = client.get_run(second)
    uri = run.data.tags[MODEL_URI_TAG]
    client.create_model_version("scbert-toy", uri, run_id=second)  # what a killed register left
    assert register(second).version == "2" and str(version_of(CHALLENGER).version) == "2"
    again = register(second)
    assert (again.version, again.reason.endswith("already the challenger")) == ("2", True)
    assert register(first).version == "1" and str(version_of(CHALLENGER).version) == "1"
    assert len(client.search_model_versions("name = 'scbert-toy'")) == 2


def test_gate_refuses_another_dataset_or_a_missing_metric(workdir: Path) -> None:
    register(finetuned_run(workdir, 0.80))
    promote("scbert-toy")
    register(finetuned_run(workdir, 0.90, seed=1, manifest="m2"))
    with pytest.raises(GateRefused, match="another dataset manifest"):
        promote("scbert-toy")
    register(finetuned_run(workdir, None, seed=2))
    with pytest.raises(GateRefused, match="has no cv/macro_f1"):
        promote("scbert-toy")


def test_gate_refuses_a_model_that_cannot_predict(workdir: Path) -> None:
    import mlflow

    run_id = finetuned_run(workdir, 0.9)
    uri = mlflow.get_run(run_id).data.tags[MODEL_URI_TAG]
    model = mlflow.get_logged_model(uri.removeprefix("models:/"))
    weights = Path(model.artifact_location.removeprefix("file://")) / "artifacts"
    for file in weights.rglob("model.safetensors"):
        file.unlink()  # a broken artifact store
    register(run_id)
    with pytest.raises(GateRefused, match="failed its smoke prediction"):
        promote("scbert-toy")


def test_register_needs_a_finetuning_run(workdir: Path) -> None:
    import mlflow

    with mlflow.start_run(experiment_id=experiment_id("scbert-pretrain")) as run:
        pass
    with pytest.raises(ValueError, match="fine-tuning run"):
        register(run.info.run_id)
    with pytest.raises(GateRefused, match="no challenger"):
        promote("scbert-nothing")


def test_every_experiment_keeps_its_artifacts_beside_the_embedded_database(
    workdir: Path,
) -> None:
    """Two experiments created in one process (a notebook's pretrain, then finetune): both put
    their artifacts under mlartifacts/, although MLflow sets MLFLOW_TRACKING_URI in the process
    when the first is created (the second went to MLflow's default, ./mlruns)."""
    import mlflow

    for name in ("scbert-pretrain", "scbert-finetune"):
        location = mlflow.get_experiment(experiment_id(name)).artifact_location
        assert location == (workdir / "mlartifacts" / name).as_uri()
    assert not (workdir / "mlruns").exists()


def test_cli_register_promote_and_refusal(workdir: Path) -> None:
    import subprocess
    import sys

    def scbert(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "scbert_platform.cli", *args]
        return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300)

    good, worse = finetuned_run(workdir, 0.8), finetuned_run(workdir, 0.6, seed=1)
    assert "version 1 is the challenger" in scbert("register", good).stdout
    assert "version 1 is the champion" in scbert("promote", "scbert-toy").stdout
    scbert("register", worse)
    refused = scbert("promote", "scbert-toy", "--params", "none.yaml")
    assert refused.returncode == 2
    assert "not promoted" in refused.stderr and "below the champion's" in refused.stderr
    loose = scbert("promote", "scbert-toy", "--set", "tune.gate_tolerance=0.5")
    assert loose.returncode == 0 and "version 2 is the champion (was version 1)" in loose.stdout
