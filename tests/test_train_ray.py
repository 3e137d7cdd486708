"""Ray Train for real: DDP workers on shards of the real dataset, MLflow tracking, checkpoints,
recovery from a killed worker, and a 2-node local cluster."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_params

from scbert import load_pretrained
from scbert_platform.data.manifest import read_manifest
from scbert_platform.params import TrainParams
from scbert_platform.train.distributed import CollapsedRun, TrainingError, check_resources, fit

pytestmark = pytest.mark.ray


def mlflow_run(workdir: Path, run_id: str) -> tuple[Any, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns.db'}")
    return client, client.get_run(run_id)


def test_pretrain_then_finetune_on_two_workers_tracked_in_mlflow(
    ray_local: object, pbmc_shards: Path, workdir: Path
) -> None:
    """MLM pretraining on one worker, then fine-tuning from its checkpoint on two DDP workers:
    the published freeze, what MLflow holds of the run, the calibrated checkpoint and the
    pyfunc. (One test, so that the suite pays for two Ray Train runs, not three.)"""
    # gene_dropout: fine-tuning's augmentation draws from the worker's generator (pretraining
    # ignores it)
    params = tiny_params(
        workdir / "runs", workers=1, cpus_per_worker=1.0, max_steps=4, gene_dropout=0.1
    )
    pretrained = fit("pretrain", pbmc_shards, params, run_name="pt")
    assert pretrained.steps == 4
    assert 0 <= pretrained.metrics["val/masked_acc"] <= 1
    assert load_pretrained(pretrained.checkpoint).model.config.n_classes is None

    params = params.replace(
        {"train.workers": 2, "train.cpus_per_worker": 0.5, "train.max_steps": 8}
    )
    result = fit("finetune", pbmc_shards, params, init_from=pretrained.checkpoint, run_name="ft")
    assert result.steps == 8
    before = load_pretrained(pretrained.checkpoint).model.state_dict()
    after = load_pretrained(result.checkpoint).model.state_dict()
    # the published freeze: the embedding is not trained, the (single) last block is
    assert (before["token_emb.weight"] == after["token_emb.weight"]).all()
    assert not (
        before["encoder.blocks.0.ff.w1.weight"] == after["encoder.blocks.0.ff.w1.weight"]
    ).all()
    assert {"val/macro_f1", "test/accuracy", "test/macro_f1"} <= set(result.metrics)
    assert result.metrics["val/best_macro_f1"] >= result.metrics["val/macro_f1"]
    assert result.metrics["val/best_step"] in (4.0, 8.0)
    # without train.average_from the kept model is the best step's: scored again after
    # training, on the same validation cells, it scores the same
    assert result.metrics["val/kept_macro_f1"] == pytest.approx(result.metrics["val/best_macro_f1"])

    client, run = mlflow_run(workdir, result.mlflow_run_id)
    assert run.data.params["train.workers"] == "2"
    assert run.data.params["train.lr"] == "0.001"
    manifest = read_manifest(pbmc_shards)
    assert run.data.tags["scbert.panel_sha256"] == manifest["panel"]["sha256"]
    assert run.data.tags["scbert.source_sha256"] == manifest["source"]["sha256"]
    manifest_bytes = (pbmc_shards / "manifest.json").read_bytes()
    assert run.data.tags["scbert.manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [2, 4, 6, 8]
    assert len(client.get_metric_history(run.info.run_id, "val/macro_f1")) == 2
    assert "test/f1/Dendritic" in run.data.metrics
    artifacts = set()
    for folder in ("", "model", "evaluation", "data"):
        artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, folder or None)}
    assert {"params.yaml", "system.json", "model/config.json", "model/labels.json"} <= artifacts
    assert {"evaluation/confusion_matrix.png", "evaluation/test_report.md"} <= artifacts
    assert "data/manifest.json" in artifacts
    assert (workdir / "mlartifacts").is_dir() and not (workdir / "mlruns").exists()

    bundle = load_pretrained(result.checkpoint)
    # temperature scaling fitted on the validation cells, folded into the saved head
    assert (Path(result.checkpoint) / "calibration.json").is_file()
    assert (
        result.metrics["calibration/temperature"] > 0 and "val/ece_uncalibrated" in run.data.metrics
    )
    assert bundle.classes == sorted(manifest["labels"]["counts"])
    assert bundle.model.config.n_classes == 10

    # the pyfunc: raw counts in, cell types out, the same as the checkpoint's own prediction
    import mlflow

    from scbert_platform.track.pyfunc import counts_to_tokens, example_counts

    assert result.model_uri is not None
    pyfunc = mlflow.pyfunc.load_model(result.model_uri)
    example = example_counts(pbmc_shards, bundle.panel, n_cells=3)
    out = pyfunc.predict(example)
    assert list(out.index) == list(example.index)
    assert set(out["cell_type"]) <= {*bundle.classes, "Unassigned"}
    tokens = counts_to_tokens(example.to_numpy(), list(example.columns), bundle.panel, n_bins=5)
    expected = bundle.model.eval().predict_proba(tokens).detach().numpy()
    columns = [f"p_{label}" for label in bundle.classes]
    assert abs(out[columns].to_numpy() - expected).max() < 1e-5
    strict = pyfunc.predict(example, params={"threshold": 1.0})
    assert (strict["cell_type"] == "Unassigned").all()


def test_a_collapsed_finetune_fails_is_retried_and_logs_no_model(
    ray_local: object, pbmc_shards: Path, workdir: Path
) -> None:
    """A learning rate of 1e30 makes the first step's weights overflow: the loss is not finite
    at the second step, the run fails with the reason, runs again with another seed, fails
    again, and neither run has a model that could be registered. (The other collapse, one class
    for every validation cell, is tests/test_calibration.py's.)"""
    params = tiny_params(workdir / "runs", max_steps=4, val_every=4, ckpt_every=4, log_every=1)
    params = params.replace({"train.lr": 1e30, "train.max_failures": 0})
    with pytest.raises(CollapsedRun, match="the training loss is nan"):
        fit("finetune", pbmc_shards, params, run_name="dead")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("scbert-finetune").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["dead", "dead-retry1"]
    for run in runs:
        assert run.info.status == "FAILED"
        assert run.data.tags["scbert.failure"].startswith("collapsed: ")
        assert "the training loss is nan" in run.data.tags["scbert.failure"]
        assert "scbert.model_uri" not in run.data.tags and "scbert.checkpoint" not in run.data.tags
    assert runs[0].data.params["train.seed"] != runs[1].data.params["train.seed"]


def test_workers_that_would_starve_ray_data_are_refused() -> None:
    with pytest.raises(TrainingError, match=r"cpus_per_worker=0\.5"):
        check_resources(TrainParams(workers=2, cpus_per_worker=1.0), cluster_cpus=2)
    check_resources(TrainParams(workers=2, cpus_per_worker=0.5), cluster_cpus=2)


@pytest.mark.slow
def test_two_node_cluster_one_worker_per_node(pbmc_shards: Path, workdir: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    # 2 logical CPUs per node (4 on this 2-core machine): a worker takes 0.5 of a node, and
    # Ray Data's tasks and the train controller need a whole CPU somewhere
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"node_slot": 1}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, resources={"node_slot": 1})
    try:
        ray.init(address=cluster.address)
        params = tiny_params(workdir / "runs", workers=2, cpus_per_worker=0.5, max_steps=4)
        result = fit(
            "pretrain",
            pbmc_shards,
            params,
            run_name="two-nodes",
            worker_resources={"node_slot": 1},
        )
        assert result.steps == 4
        workers = workdir / "runs" / "two-nodes" / "workers"
        nodes = {json.loads(p.read_text())["node"] for p in workers.glob("rank*.json")}
        assert len(nodes) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_cli_reports_bad_training_setup(pbmc_shards: Path, workdir: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scbert_platform.cli",
            "finetune",
            str(pbmc_shards),
            "--params",
            "none.yaml",
            "--set",
            "train.unfreeze=half",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "scbert finetune: error:" in result.stderr and "train.unfreeze" in result.stderr
