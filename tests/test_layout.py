"""The repo layout: `platform/` must not shadow the standard library, and importing our packages
does no work and pulls in none of the platform's heavy services."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from conftest import REPO_ROOT

SERVICES = ("ray", "mlflow", "dvc", "anndata", "scanpy")


def run_python(code: str, cwd: Path) -> str:
    """Run ``python -c code`` in ``cwd`` (as a user would from there); return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"python -c {code!r} failed in {cwd}:\n{result.stderr}"
    return result.stdout


def test_platform_folder_is_not_a_package() -> None:
    assert (REPO_ROOT / "platform").is_dir()
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_works_from_repo_root() -> None:
    out = run_python(
        "import platform; print(platform.system()); print(platform.__file__)", REPO_ROOT
    )
    system, location = out.splitlines()
    assert system
    assert Path(location).resolve().parent == Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_import_ray_works_from_repo_root() -> None:
    pytest.importorskip("ray")
    run_python("import ray", REPO_ROOT)


def test_import_scbert_leaves_services_out() -> None:
    code = (
        "import json, sys, scbert\n"
        f"print(json.dumps([m for m in {SERVICES!r} if m in sys.modules]))"
    )
    assert json.loads(run_python(code, REPO_ROOT)) == []


def test_imports_create_no_files(tmp_path: Path) -> None:
    packages = {"platform": "scbert_platform", "tune": "scbert_tune", "serve": "scbert_serve"}
    modules = [
        f"{name}.{path.stem}"
        for folder, name in packages.items()
        for path in sorted((REPO_ROOT / folder).glob("*.py"))
        if path.stem != "__init__"
    ]
    run_python(f"import scbert, {', '.join(modules)}", tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


def test_platform_folder_is_scbert_platform() -> None:
    """The folder is installed under the import name scbert_platform (setuptools package-dir)."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["package-dir"]["scbert_platform"] == "platform"
    out = run_python("import scbert_platform.demo as d; print(d.__file__)", REPO_ROOT)
    assert Path(out.strip()).name == "demo.py"


def test_the_batch_transform_needs_no_ray() -> None:
    """Serving and notebooks use CellBatcher without Ray: importing it must not import Ray."""
    code = "import sys, scbert_platform.loader, scbert_platform.ingest\nprint('ray' in sys.modules)"
    assert run_python(code, REPO_ROOT).strip() == "False"
