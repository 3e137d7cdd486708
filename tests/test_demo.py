"""The demo job at paper size: parameter count and one forward pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_demo_runs_at_paper_size() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scbert_platform.demo", "--cells", "1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "encoder 5,004,000" in out  # the paper: about 5.0 M trainable encoder parameters
    assert "nb_features=266" in out
    assert "(1, 16907) -> logits (1, 10)" in out


def test_demo_annotates_test_fold_cells(pbmc_shards, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from conftest import build_model, tiny_config

    from scbert import save_pretrained
    from scbert_platform.data.loader import ShardInfo
    from scbert_platform.demo import run_on_shards

    info = ShardInfo.read(pbmc_shards)
    config = tiny_config(n_genes=info.n_genes, n_classes=len(info.labels), gene_embedding="learned")
    save_pretrained(build_model(config), tmp_path / "m", panel=info.panel, classes=info.labels)
    run_on_shards(str(pbmc_shards), str(tmp_path / "m"), n_cells=8)
    lines = capsys.readouterr().out.splitlines()
    assert "8 real cells of test fold 0" in lines[0]
    assert len(lines) == 9 and all(" -> " in line for line in lines[1:])


def test_tracked_tells_a_fresh_clone_to_rerun_the_reporting_stages(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clone has the committed reports but not the MLflow runs behind them: make demo reruns
    the stages --tracked names, and only those (a stage dvc repro has just run has its run)."""
    import json

    from conftest import finetuned_run

    from scbert_platform.demo import main, tracked

    report = workdir / "cv.json"
    assert not tracked(report)  # no report
    report.write_text(json.dumps({"mlflow_run_id": "0123456789abcdef0123456789abcdef"}))
    assert not tracked(report)  # a run of another machine
    report.write_text(json.dumps({"mlflow_run_id": finetuned_run(workdir, 0.5)}))
    assert tracked(report)
    capsys.readouterr()
    main(["--tracked", str(workdir / "sweep.json"), str(report)])
    out, err = capsys.readouterr()
    assert out == "sweep\n"  # the stage of the report without a run here; cv's run is here
    assert "sweep.json: its MLflow run is not in this machine's tracking store" in err
    main(["--tracked", str(report)])
    assert capsys.readouterr().out == "\n"  # nothing to run again
