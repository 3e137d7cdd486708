"""The DVC pipeline for real: repro, no-op re-run, an experiment with -S, push and pull."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, noise_in

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent  # the venv's scbert and dvc
# the pipeline up to the fine-tuned model and the offline annotation with it; its sweep and cv
# stages are the tuning tests' subject (tests/test_tune.py), and its pretrain stage, which no
# stage downstream needs, runs `scbert pretrain` as tests/test_train_faults.py does (with --out;
# `make demo` runs the stage itself): each would take this file past the suite's time budget
DATA_STAGES = ("annotate",)


def run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["DVC_NO_ANALYTICS"] = "1"
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def digest(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {
        str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repository holding the project's pipeline (dvc.yaml, params.yaml) and the
    files its stages depend on, with a local remote."""
    root = tmp_path_factory.mktemp("project")
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    stages = spec["stages"].values()
    outs = {o if isinstance(o, str) else next(iter(o)) for s in stages for o in s.get("outs", [])}
    deps = {d for stage in stages for d in stage.get("deps", [])} - outs  # the code, not data
    for name in ["dvc.yaml", "params.yaml", *sorted(deps)]:
        if (REPO_ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / name, root / name)
    # the pipeline as it is, with training cut to a few steps (the suite's time budget)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"] |= {"max_steps": 6, "val_every": 3, "ckpt_every": 3, "log_every": 3}
    params["finetune"]["max_steps"] = 6  # the stage's own count, over train's
    params["train"]["collapse_check"] = False  # 6 steps may well call every cell one type
    # a tiny model (gene-embed's vectors follow model.dim): the same stages, with a quarter of
    # the work in the annotate stage's passes over the 700 cells (per layer, cell and head)
    params["model"] |= {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "ci@example.org"], root)
    run(["git", "config", "user.name", "CI"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run([str(BIN / "dvc"), "remote", "add", "-d", "local", str(root.parent / "remote")], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline"], root)
    return root


def test_repro_runs_the_pipeline_on_the_real_dataset(project: Path) -> None:
    out = run([str(BIN / "dvc"), "repro", *DATA_STAGES], project)
    for stage in ("fetch", "ingest", "gene-embed", "finetune", "annotate"):
        assert f"Running stage '{stage}'" in out
    assert "Running stage 'pretrain'" not in out
    # legible: progress as plain lines (no terminal here), results, where to look; no internals
    assert noise_in(out) == [], out
    assert "finetune: 6/6 steps (100%)" in out
    assert "finetune finetune-" in out and "test/macro_f1" in out
    assert "mlflow ui --backend-store-uri" in out and "Ray workers' logs: " in out
    assert len(out.splitlines()) < 120, out
    finetune = json.loads((project / "reports" / "finetune.json").read_text())
    assert finetune["steps"] == 6 and 0 <= finetune["test/accuracy"] <= 1
    metrics = json.loads((project / "reports" / "ingest.json").read_text())
    assert metrics == {"cells_input": 700, "cells_kept": 693, "gene_coverage": 1.0, "n_shards": 1}
    vectors = (project / "data" / "gene2vec" / "pbmc68k.txt").read_text().splitlines()
    dim = yaml.safe_load((project / "params.yaml").read_text())["model"]["dim"]
    assert len(vectors) == 765 and len(vectors[0].split()) == 1 + dim
    annotated = json.loads((project / "reports" / "annotate.json").read_text())
    assert annotated["n_cells"] == 700 and annotated["plots"]["n_labels"] == 10
    assert (project / "reports" / "explain" / "top_genes.gmt").is_file()

    again = run([str(BIN / "dvc"), "repro", *DATA_STAGES], project)
    assert "Running stage" not in again
    assert "up to date" in run([str(BIN / "dvc"), "status", *DATA_STAGES], project)


def test_experiment_with_a_changed_parameter_reruns_from_ingest(project: Path) -> None:
    run([str(BIN / "dvc"), "repro", *DATA_STAGES], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "results"], project)
    # up to the first stage after ingest: the change propagates downstream without training
    # again (it would rerun the same way; the suite's time budget)
    out = run([str(BIN / "dvc"), "exp", "run", "-S", "data.min_genes=300", "gene-embed"], project)
    assert "Running stage 'ingest'" in out
    assert "Running stage 'fetch'" not in out
    assert "Running stage 'gene-embed'" in out
    metrics = json.loads((project / "reports" / "ingest.json").read_text())
    assert metrics["cells_input"] == 700
    assert metrics["cells_kept"] < 693
    assert "min_genes: 300" in (project / "params.yaml").read_text()
    run(["git", "checkout", "--", "params.yaml", "dvc.lock", "reports"], project)
    run([str(BIN / "dvc"), "checkout", "-q", "--with-deps", *DATA_STAGES], project)


def test_push_then_pull_restores_the_data(project: Path) -> None:
    run([str(BIN / "dvc"), "repro", *DATA_STAGES], project)
    outputs = [
        project / "data" / name for name in ("raw", "cells", "gene2vec", "models", "annotated")
    ]
    before = {k: v for path in outputs for k, v in digest(path).items() if ".gitignore" not in k}
    run([str(BIN / "dvc"), "push"], project)
    assert any((project.parent / "remote").rglob("*"))
    for path in outputs:
        for item in path.iterdir():
            if item.name != ".gitignore":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    shutil.rmtree(project / ".dvc" / "cache")
    # the stages this file runs (a plain `dvc pull` also wants the pretrain stage's model)
    run([str(BIN / "dvc"), "pull", "--with-deps", *DATA_STAGES], project)
    after = {k: v for path in outputs for k, v in digest(path).items() if ".gitignore" not in k}
    assert after == before
