"""Baselines on the same folds and input as scBERT (`scbert cv --baseline`), on real cells."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scbert_platform.data.manifest import read_manifest
from scbert_tune.baselines import cross_validate, markdown


@pytest.mark.parametrize("kind", ["logreg", "knn"])
def test_baseline_cross_validation_on_real_cells(pbmc_shards: Path, kind: str) -> None:
    result = cross_validate(pbmc_shards, kind)
    counts = read_manifest(pbmc_shards)["folds"]["counts"]
    assert [f["fold"] for f in result["folds"]] == [0, 1, 2, 3, 4]
    assert [f["n"] for f in result["folds"]] == [counts[str(i)] for i in range(5)]
    assert sum(map(sum, result["confusion_matrix"])) == sum(counts.values())  # every cell once
    assert 0.5 < result["accuracy_mean"] <= 1  # real cell types are learnable from expression
    assert result["accuracy_std"] > 0
    # its probabilities scored as scBERT's are: ECE and the Unassigned rates at 0.5
    for fold in result["folds"]:
        assert 0 <= fold["ece"] <= 1 and 0 < fold["kept"] <= 1
    assert result["ece_mean"] > 0 and "unassigned_correct_std" in result
    assert 0 < result["ece_pooled"] < result["ece_mean"]  # more cells: less binning noise
    # each class's F1 over the folds that test it: a class with cells in every fold (all here)
    # gets the mean of its five F1s, within the range of the folds' macro F1s' classes
    assert set(result["per_class_f1"]) == set(result["labels"])
    assert all(0 <= f1 <= 1 for f1 in result["per_class_f1"].values())
    assert max(result["per_class_f1"].values()) > result["macro_f1_mean"]
    table = markdown([result])
    assert f"| {kind} | 5 |" in table and "±" in table


def test_unknown_baseline_and_missing_flag_are_errors(pbmc_shards: Path) -> None:
    with pytest.raises(ValueError, match="unknown baseline"):
        cross_validate(pbmc_shards, "forest")
    command = [sys.executable, "-m", "scbert_platform.cli", "cv", str(pbmc_shards), "--skip-scbert"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--baseline" in result.stderr
    command += ["--baseline", "knn"]  # the baselines alone, in seconds
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "| knn | 5 |" in result.stdout
    assert "| ECE (all held-out cells) | correct cells Unassigned |" in result.stdout
