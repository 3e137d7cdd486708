"""Ray Train's recovery: a killed worker replaced and its run resumed from the last checkpoint,
and a stopped run resumed by name from the CLI. (Apart from tests/test_train_ray.py so that the
suite's two processes can run the two files side by side.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import scbert_cli, tiny_params
from test_train_ray import mlflow_run

from scbert.atomic import copy_directory
from scbert_platform.train.distributed import TrainingError, fit

pytestmark = pytest.mark.ray


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_training_resumes(
    ray_local: object, pbmc_shards: Path, workdir: Path
) -> None:
    params = tiny_params(
        workdir / "runs", workers=2, max_steps=24, ckpt_every=4, log_every=1, average_from=4
    )
    workers = workdir / "runs" / "kill" / "workers"  # each worker's rank, pid and start step
    killed: list[int] = []

    def registered_checkpoints() -> int:
        """Checkpoints Ray Train has registered (a checkpoint_* folder appears earlier, while it
        is still being written; a kill then restarts from scratch, as it should)."""
        snapshot = workdir / "runs" / "kill" / "checkpoint_manager_snapshot.json"
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return 0

    def kill_rank1_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            record = workers / "rank1.json"
            if registered_checkpoints() and record.is_file():
                pid = json.loads(record.read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_rank1_after_first_checkpoint, daemon=True)
    watcher.start()
    result = fit("finetune", pbmc_shards, params, run_name="kill")
    watcher.join(timeout=5)
    assert killed, "no worker was killed"
    records = [json.loads(p.read_text()) for p in workers.glob("rank*.json")]
    assert killed[0] not in {r["pid"] for r in records}  # the replacement's record
    resumed = [r["started_at_step"] for r in records]
    assert resumed and min(resumed) >= 4 and min(resumed) % 4 == 0  # from a checkpoint
    assert result.steps == 24
    client, run = mlflow_run(workdir, result.mlflow_run_id)
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert steps == set(range(1, 25))  # nothing lost beyond the last checkpoint
    # the weight average (train.average_from=4) went on across the restart: the snapshots of
    # steps 4, 8, ..., 24, the ones before the kill restored from the checkpoint
    assert result.metrics["val/averaged_snapshots"] == 6
    assert run.data.metrics["val/averaged_snapshots"] == 6
    # the kept model (that average) scored on the validation cells after training: the score a
    # sweep or cv ranks the run by, which no validation step gave
    assert 0.0 <= run.data.metrics["val/kept_macro_f1"] <= 1.0
    assert "val/kept_accuracy" in run.data.metrics


def test_a_stopped_run_is_resumed_by_name(
    ray_local: object, pbmc_shards: Path, workdir: Path
) -> None:
    params = tiny_params(workdir / "runs", workers=1, cpus_per_worker=1.0, max_steps=4)
    first = fit("pretrain", pbmc_shards, params, run_name="long")
    assert first.steps == 4
    with pytest.raises(TrainingError, match="--resume long"):
        fit("pretrain", pbmc_shards, params, run_name="long")
    with pytest.raises(TrainingError, match="no run other"):
        fit("pretrain", pbmc_shards, params, run_name="other", resume=True)

    # a longer budget for the same run, resumed as a user would, with --verbose: the Ray
    # workers' own lines come back (a default run keeps them in the logs: tests/test_dvc.py)
    params = params.replace({"train.max_steps": 8})
    params.dump(workdir / "params.yaml")
    # --out over the 4-step model an earlier run copied there: replaced by the 8-step one
    weights = Path(first.checkpoint) / "model.safetensors"
    four_steps = weights.read_bytes()
    copy_directory(first.checkpoint, workdir / "model", kind="checkpoint")
    second = scbert_cli(
        workdir, "--verbose", "pretrain", str(pbmc_shards), "--resume", "long", "--out", "model"
    )
    assert second.returncode == 0, second.stderr[-3000:]
    out = (workdir / "model" / "model.safetensors").read_bytes()
    assert out == weights.read_bytes() != four_steps and "model: model" in second.stderr
    assert second.stdout.startswith("pretrain long: 8 steps; train/loss")
    assert "pretrain: resumed from step 4 (epoch 0)" in second.stderr
    assert "pretrain: 8/8 steps (100%)" in second.stderr  # the bar, as plain lines
    assert "(RayTrainWorker" in second.stderr and "step 8/8 epoch" in second.stderr  # worker
    # the same MLflow run continues
    assert f"MLflow run {first.mlflow_run_id} (experiment scbert-pretrain)" in second.stderr
