"""The repo layout: `platform/` must not shadow the standard library, importing our packages
does no work and pulls in none of the platform's heavy services, and imports go down the layers
(scbert <- scbert_platform <- scbert_tune, scbert_serve)."""

from __future__ import annotations

import ast
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


# folder -> import name (pyproject.toml's package-dir), lowest layer first
PACKAGES = {
    "scbert": "scbert",
    "platform": "scbert_platform",
    "tune": "scbert_tune",
    "serve": "scbert_serve",
}


def module_files() -> dict[str, Path]:
    """Every module of our packages, subpackages included: import name -> file."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def test_every_module_is_found() -> None:
    modules = module_files()
    assert {"scbert.model", "scbert_platform.cli", "scbert_tune.cv", "scbert_serve.app"} <= set(
        modules
    )
    assert len(modules) == sum(1 for folder in PACKAGES for _ in (REPO_ROOT / folder).rglob("*.py"))


def test_imports_create_no_files(tmp_path: Path) -> None:
    run_python(f"import {', '.join(module_files())}", tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


# Which of our packages each one may import: a layer imports only those below it. tune and serve
# are siblings above the platform.
MAY_IMPORT = {
    "scbert": {"scbert"},
    "scbert_platform": {"scbert", "scbert_platform"},
    "scbert_tune": {"scbert", "scbert_platform", "scbert_tune"},
    "scbert_serve": {"scbert", "scbert_platform", "scbert_serve"},
}
# Files allowed to import any layer: the entry points that wire every layer together.
ENTRY_POINTS = {"scbert_platform.cli", "scbert_platform.demo"}
# Known violations kept until they are fixed, each as (importing module, imported package), with
# the reason; empty today. A new violation fails the test; a fixed one must leave this list.
ALLOWED_VIOLATIONS: set[tuple[str, str]] = set()


def our_imports(path: Path) -> set[str]:
    """The packages of ours that a file imports, at its top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name.split(".")[0] for name in names} & set(PACKAGES.values())


def test_imports_go_down_the_layers() -> None:
    """scbert imports none of the platform; the platform imports neither tune nor serve (except
    its CLI and demo); tune and serve import the platform and the model, not each other."""
    found = set()
    for module, path in module_files().items():
        if module in ENTRY_POINTS:
            continue
        layer = module.split(".")[0]
        found |= {(module, imported) for imported in our_imports(path) - MAY_IMPORT[layer]}
    assert found - ALLOWED_VIOLATIONS == set(), "imports against the layers"
    assert ALLOWED_VIOLATIONS - found == set(), "fixed: remove them from ALLOWED_VIOLATIONS"


def test_the_import_check_sees_lazy_imports(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "import os\nfrom scbert import ScBert\n\n\ndef f():\n"
        "    import scbert_serve.app\n    from scbert_tune.cv import x\n    from . import y\n"
    )
    assert our_imports(path) == {"scbert", "scbert_serve", "scbert_tune"}


def test_platform_folder_is_scbert_platform() -> None:
    """The folder is installed under the import name scbert_platform (setuptools package-dir)."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["package-dir"]["scbert_platform"] == "platform"
    out = run_python("import scbert_platform.demo as d; print(d.__file__)", REPO_ROOT)
    assert Path(out.strip()).name == "demo.py"


def test_the_batch_transform_needs_no_ray() -> None:
    """Serving and notebooks use CellBatcher without Ray: importing it must not import Ray."""
    code = (
        "import sys, scbert_platform.data.loader, scbert_platform.data.ingest\n"
        "print('ray' in sys.modules)"
    )
    assert run_python(code, REPO_ROOT).strip() == "False"


def test_the_old_paths_that_logged_models_pickled_still_resolve() -> None:
    """MLflow models logged before platform/ moved into subpackages pickled the pyfunc's class
    and the preprocessing record by their old module paths; loading them must find the same
    classes (platform/pyfunc.py and platform/preprocess.py keep the paths)."""
    import pickle

    from scbert_platform.data.preprocess import Preprocessing
    from scbert_platform.track.pyfunc import ScBertAnnotator

    for old, new in [
        ("scbert_platform.pyfunc\nScBertAnnotator", ScBertAnnotator),
        ("scbert_platform.preprocess\nPreprocessing", Preprocessing),
    ]:
        assert pickle.loads(f"c{old}\n.".encode()) is new  # GLOBAL: what an old pickle holds


def test_no_module_imports_another_modules_private_names() -> None:
    """A name that starts with ``_`` is its module's own: another module that needs it gets a
    public name instead (``from x import _helper`` is how private helpers leaked before)."""
    leaked = set()
    for module, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
                continue
            if node.module.split(".")[0] in PACKAGES.values():
                leaked |= {
                    (module, f"{node.module}.{alias.name}")
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                }
    assert leaked == set()


@pytest.mark.parametrize("pipeline", ["dvc.yaml", "bench/dvc.yaml", "bench/quality/dvc.yaml"])
def test_every_code_dependency_of_a_pipeline_exists(pipeline: str) -> None:
    """A dependency on the project's code (not on data a stage makes) names a file that is
    there: after a module moves, `dvc repro` would otherwise fail on the missing path."""
    import yaml

    folder = (REPO_ROOT / pipeline).parent
    stages = yaml.safe_load((REPO_ROOT / pipeline).read_text())["stages"]
    deps = [
        dep
        for stage in stages.values()
        for dep in stage.get("do", stage).get("deps", [])
        if isinstance(dep, str) and dep.endswith(".py")
    ]
    assert deps, pipeline
    missing = [dep for dep in deps if not (folder / dep).is_file()]
    assert missing == [], f"{pipeline}: {missing}"
