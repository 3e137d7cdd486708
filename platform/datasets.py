"""Real datasets that come with installed packages (nothing is downloaded).

``pbmc68k_reduced``: scanpy's wheel ships ``scanpy/datasets/10x_pbmc68k_reduced.h5ad``, 700 cells
of the Zheng et al. 2017 68k PBMC data (the paper's Zheng68K benchmark; 10x Genomics, CC BY 4.0)
with 10 labels in ``obs['bulk_labels']``, 765 genes, log-normalised values (natural log) in
``.raw``. Ingest it with ``data.use_raw=true data.input_normalized=true
data.label_key=bulk_labels``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from scbert.atomic import atomic_file

BUNDLED = {
    "pbmc68k_reduced": ("scanpy", "datasets/10x_pbmc68k_reduced.h5ad"),
}


def bundled_path(name: str) -> Path:
    """Where an installed package keeps the dataset ``name``."""
    if name not in BUNDLED:
        raise KeyError(f"unknown bundled dataset {name!r}; known: {sorted(BUNDLED)}")
    package, relative = BUNDLED[name]
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"dataset {name!r} comes with {package}, which is not installed")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}")
    return path


def fetch(name: str, destination: str | Path) -> Path:
    """Copy a bundled dataset to ``destination`` (a file path)."""
    destination = Path(destination)
    with atomic_file(destination) as staging:
        shutil.copyfile(bundled_path(name), staging)
    return destination
