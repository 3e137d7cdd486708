"""Synthetic counts: shapes, integer counts, planted types, determinism, the streaming writer."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scbert_platform.data.synthetic import main, make_synthetic, write_synthetic_h5ad

N_CELLS, N_GENES = 2_500, 300


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return make_synthetic(N_CELLS, N_GENES, n_types=8, seed=3)


def test_shapes_names_and_metadata(adata: ad.AnnData) -> None:
    assert adata.shape == (N_CELLS, N_GENES)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert adata.obs_names[0] == "cell_000001" and adata.var_names[0] == "GENE00001"
    info = adata.uns["synthetic"]
    assert info["synthetic"] is True and info["seed"] == 3 and info["n_types"] == 8


def test_counts_are_non_negative_integers(adata: ad.AnnData) -> None:
    data = adata.X.data
    assert (data > 0).all()  # CSR holds the non-zeros only
    np.testing.assert_array_equal(data, np.round(data))
    per_cell = np.diff(adata.X.indptr)
    # default 1,500 expressed genes is clipped to half the panel when the panel is small
    assert 0.8 * N_GENES / 2 < per_cell.mean() < 1.2 * N_GENES / 2


def test_labels_and_modules(adata: ad.AnnData) -> None:
    labels = adata.obs["cell_type"].astype(str)
    assert sorted(labels.unique()) == [f"type_{t}" for t in range(8)]
    module = adata.var["module"].to_numpy()
    assert set(np.unique(module)) == {-1, *range(8)}
    sizes = np.bincount(module[module >= 0])
    assert (sizes == sizes[0]).all() and sizes[0] >= 5


def test_module_genes_are_up_in_their_type(adata: ad.AnnData) -> None:
    counts = adata.X.toarray()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    module = adata.var["module"].to_numpy()
    for t in range(8):
        genes = module == t
        own = counts[labels == f"type_{t}"][:, genes].mean()
        other = counts[labels != f"type_{t}"][:, genes].mean()
        assert own > 3 * other, (t, own, other)


def test_same_seed_same_output_other_seed_differs(adata: ad.AnnData) -> None:
    again = make_synthetic(N_CELLS, N_GENES, n_types=8, seed=3)
    assert (again.X != adata.X).nnz == 0
    assert (again.obs["cell_type"] == adata.obs["cell_type"]).all()
    other = make_synthetic(N_CELLS, N_GENES, n_types=8, seed=4)
    assert (other.X != adata.X).nnz > 0


@pytest.mark.parametrize("chunk_cells", [1_000, 700])
def test_streaming_writer_matches_in_memory(
    adata: ad.AnnData, tmp_path: Path, chunk_cells: int
) -> None:
    path = write_synthetic_h5ad(
        tmp_path / "synth.h5ad", N_CELLS, N_GENES, n_types=8, seed=3, chunk_cells=chunk_cells
    )
    backed = ad.read_h5ad(path, backed="r")
    try:
        assert backed.shape == adata.shape
        assert (backed.X[1_234:1_300] != adata.X[1_234:1_300]).nnz == 0
        assert (backed.X[:] != adata.X).nnz == 0
        assert backed.X[:].dtype == adata.X.dtype
        assert list(backed.obs_names) == list(adata.obs_names)
        assert (backed.obs["cell_type"] == adata.obs["cell_type"]).all()
        np.testing.assert_array_equal(backed.var["module"], adata.var["module"])
        assert backed.uns["synthetic"]["synthetic"]
    finally:
        backed.file.close()
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_integer_dtype() -> None:
    small = make_synthetic(50, 40, n_types=2, dtype=np.int32)
    assert small.X.dtype == np.int32


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        make_synthetic(10, 20, n_types=5, module_size=5)
    with pytest.raises(ValueError, match=">= 1"):
        make_synthetic(0, 20)


def test_cli_writes_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.h5ad"
    argv = [str(out), "--cells", "120", "--genes", "60", "--types", "3", "--seed", "1"]
    assert main(argv) == 0
    written = ad.read_h5ad(out)
    assert written.shape == (120, 60)
    assert written.obs["cell_type"].nunique() == 3
    assert "cells written" in capsys.readouterr().err


def test_fewer_cells_give_a_prefix(adata: ad.AnnData) -> None:
    """Blocks are seeded by their index, so a smaller request is the start of a larger one."""
    head = make_synthetic(1_500, N_GENES, n_types=8, seed=3)
    assert (adata.X[:1_500] != head.X).nnz == 0
    assert list(head.obs_names) == list(adata.obs_names[:1_500])
