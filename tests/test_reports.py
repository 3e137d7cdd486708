"""Reports the CLI writes (``--metrics`` files, ``annotate``'s stdout under DVC) name paths
relative to the working directory when they are inside it, so committed reports name no
machine's directories."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT

from scbert_platform.cli import portable_paths, write_report


def strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


def test_paths_inside_the_root_become_relative(tmp_path: Path) -> None:
    report = {
        "checkpoint": str(tmp_path / "runs" / "finetune-1" / "model"),
        "nested": [{"uri": str(tmp_path / "data" / "models" / "finetune")}, 3, None],
        "outside": "/elsewhere/model",
        "root": str(tmp_path),
        "model_uri": "models:/scbert-pbmc@champion",
        "relative": "reports/annotate/umap.png",
        "name": "CD4+/CD25 T Reg",
        "score": 0.5,
    }
    assert portable_paths(report, tmp_path) == {
        **report,
        "checkpoint": "runs/finetune-1/model",
        "nested": [{"uri": "data/models/finetune"}, 3, None],
        "root": ".",
    }


def test_a_root_reached_through_a_link_still_matches(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    inside = str((tmp_path / "real" / "runs" / "model").resolve())
    assert portable_paths([inside], tmp_path / "link") == ["runs/model"]


def test_write_report_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_report("reports/finetune.json", {"checkpoint": str(tmp_path / "runs" / "m"), "x": 1.5})
    assert json.loads((tmp_path / "reports" / "finetune.json").read_text()) == {
        "checkpoint": "runs/m",
        "x": 1.5,
    }
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["finetune.json"]


def test_committed_reports_hold_no_absolute_paths() -> None:
    files = sorted((REPO_ROOT / "reports").rglob("*.json"))
    assert files, "no committed reports found"
    for path in files:
        absolute = [s for s in strings(json.loads(path.read_text())) if os.path.isabs(s)]
        assert absolute == [], f"{path.relative_to(REPO_ROOT)} names this machine's paths"
