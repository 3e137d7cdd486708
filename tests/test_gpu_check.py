"""bench/gpu_check.sh in its CPU smoke mode: every part runs (model speed, Ray Train, Ray Serve
under load, distributed annotation) and the report says so.

Run by ``make bench`` (marker ``bench``), not by ``make test``: each part is a command of its own
with a local Ray of its own, about 3 CPU-minutes in all, and what the parts exercise is tested
in the suite (test_train_ray, test_train_faults, test_serve, test_annotation). What only this
run checks is the script and its report, which matter when a GPU machine is lent (docs/gpu.md).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytestmark = [pytest.mark.bench, pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]

PARTS = ("speed", "train", "serve", "annotate")


def test_quick_cpu_check_runs_every_part(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", REPO_ROOT / "bench/gpu_check.sh", "--device", "cpu", "--quick", "--out", tmp_path],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"report: {tmp_path}/report.md" in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    parts = report["parts"]
    assert set(parts) == set(PARTS) and report["ok"]
    assert {name: parts[name]["status"] for name in PARTS} == dict.fromkeys(PARTS, "ok"), parts

    speed = parts["speed"]["figures"]
    assert speed["rows"] and all(row["cells_per_s"] > 0 for row in speed["rows"])
    assert speed["model_speed"]["quick"] is True  # the embedded JSON, as model_speed wrote it
    train = parts["train"]["figures"]
    # --quick: one run, not resumed (resuming by name: tests/test_train_faults.py)
    assert train["cells_per_s"] > 0 and [run["steps"] for run in train["runs"]] == [4]
    assert train["resumed_from_step"] is None and train["same_mlflow_run"]
    serve = parts["serve"]["figures"]
    assert serve["device"] == "cpu" and serve["model_info"]["device"] == "cpu"
    assert serve["cells_per_s"] > 0 and all(row["failed"] == 0 for row in serve["load"])
    assert all(0 < row["p50_ms"] <= row["p99_ms"] for row in serve["load"])
    annotate = parts["annotate"]["figures"]
    assert annotate["n_cells"] > 0 and annotate["cells_per_s"] > 0

    markdown = (tmp_path / "report.md").read_text()
    for name in PARTS:
        assert sum(line.startswith(f"| {name}: ") for line in markdown.splitlines()) == 1
