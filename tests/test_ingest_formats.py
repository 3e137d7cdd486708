"""Every input format and option of ``scbert ingest`` gives the same shards, equal to the
published preprocessing done directly with scanpy; and the ``fold`` column is stratified, stable
and seeded."""

from __future__ import annotations

import gzip
import warnings
from collections import Counter
from collections.abc import Callable
from glob import glob
from pathlib import Path
from typing import Any

import anndata
import h5py
import loompy
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scanpy as sc
import scipy.io
import scipy.sparse as sp

from scbert_platform.data.ingest import ingest
from scbert_platform.data.manifest import read_manifest
from scbert_platform.params import DataParams

N_CELLS, N_GENES, N_SPARSE = 60, 80, 4
MIN_GENES = 10
LABELS = ("B cell", "NK cell", "T cell")
# the panel: 60 of the data's genes in shuffled order, and 8 genes the data lacks
PANEL = [f"G{j:04d}" for j in np.random.default_rng(1).permutation(N_GENES)[:60]]
PANEL[5:5] = [f"ABSENT{j}" for j in range(8)]


UNLABELLED: dict[str, Any] = {"label_key": ""}  # 10x files carry no labels


def quiet(log: str) -> None:
    """``ingest``'s progress log, silenced."""


def count_adata() -> anndata.AnnData:
    """Negative-binomial counts (CSR float32) with a count of 1 in every cell; the first
    ``N_SPARSE`` cells express fewer than ``MIN_GENES`` genes (QC drops them); obs['cell_type'],
    var['gene_ids'] (Ensembl-like)."""
    rng = np.random.default_rng(0)
    mean = rng.gamma(0.8, 3.0, size=N_GENES)
    mean[0] = 60.0
    x = rng.negative_binomial(2, 2 / (2 + mean), size=(N_CELLS, N_GENES))
    x[:N_SPARSE, 6:] = 0
    x[np.arange(N_CELLS), rng.integers(0, N_GENES, N_CELLS)] = 1
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([LABELS[i % 3] for i in range(N_CELLS)])},
        index=[f"AAACCTG-{i:04d}" for i in range(N_CELLS)],
    )
    var = pd.DataFrame(
        {"gene_ids": [f"ENSG{j:011d}" for j in range(N_GENES)]},
        index=[f"G{j:04d}" for j in range(N_GENES)],
    )
    return anndata.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs, var=var)


COUNTS = count_adata()


def reference(adata: anndata.AnnData, panel: list[str]) -> anndata.AnnData:
    """The published preprocessing with scanpy: align to the panel (missing genes 0), drop cells
    with < MIN_GENES genes, normalize_total(1e4), log2(1 + x). ``obs['n_counts']``: panel counts."""
    positions = adata.var_names.get_indexer(panel)
    dense = np.zeros((adata.n_obs, len(panel)), dtype=np.float32)
    dense[:, positions >= 0] = adata.X.toarray()[:, positions[positions >= 0]]
    aligned = anndata.AnnData(sp.csr_matrix(dense), obs=adata.obs.copy())
    sc.pp.filter_cells(aligned, min_genes=MIN_GENES)
    aligned.obs["n_counts"] = np.asarray(aligned.X.sum(axis=1)).ravel()
    sc.pp.normalize_total(aligned, target_sum=1e4)
    sc.pp.log1p(aligned, base=2)
    return aligned


def read_cells(output: Path) -> pa.Table:
    return pq.ParquetDataset(sorted(glob(str(output / "part-*.parquet")))).read()


def assert_matches(cells: pa.Table, expected: anndata.AnnData, *, labelled: bool = True) -> None:
    assert cells.column("cell_id").to_pylist() == expected.obs_names.tolist()
    labels = expected.obs["cell_type"].astype(str).tolist() if labelled else [None] * expected.n_obs
    assert cells.column("label").to_pylist() == labels
    x = sp.csr_matrix(expected.X)
    gene_idx, value = cells.column("gene_idx"), cells.column("value")
    for i in range(expected.n_obs):
        row = x[i]
        np.testing.assert_array_equal(gene_idx[i].values.to_numpy(), row.indices)
        np.testing.assert_allclose(value[i].values.to_numpy(), row.data, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cells.column("n_genes").to_numpy(), np.diff(x.indptr))
    np.testing.assert_allclose(cells.column("n_counts").to_numpy(), expected.obs["n_counts"])


def data_params(panel: Path, **overrides: Any) -> DataParams:
    values = {"panel": str(panel), "min_genes": MIN_GENES, "label_key": "cell_type"}
    return DataParams(**{**values, **overrides})


@pytest.fixture(scope="module")
def panel_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("panel") / "panel.txt"
    path.write_text("".join(f"{gene}\n" for gene in PANEL))
    return path


@pytest.fixture(scope="module")
def expected() -> anndata.AnnData:
    return reference(COUNTS, PANEL)


def run(source: Path, output: Path, params: DataParams) -> pa.Table:
    ingest(source, output, params, executor="local", log=quiet)
    return read_cells(output)


# ---------------------------------------------------------------------------------------------
# Formats: each writes COUNTS under a folder and returns (path, DataParams overrides)


def lognorm(adata: anndata.AnnData, base: float | None = None) -> anndata.AnnData:
    """log1p(normalize_total(counts)) as a user would have it (natural log unless ``base``)."""
    out = adata.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out, base=base)
    return out


def h5ad_csr(folder: Path) -> tuple[Path, dict[str, Any]]:
    COUNTS.write_h5ad(folder / "csr.h5ad")
    return folder / "csr.h5ad", {}


def h5ad_dense(folder: Path) -> tuple[Path, dict[str, Any]]:
    adata = COUNTS.copy()
    adata.X = adata.X.toarray().astype(np.int32)
    adata.write_h5ad(folder / "dense.h5ad")
    return folder / "dense.h5ad", {}


def h5ad_csc(folder: Path) -> tuple[Path, dict[str, Any]]:
    adata = COUNTS.copy()
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(folder / "csc.h5ad")
    return folder / "csc.h5ad", {}


def h5ad_layer(folder: Path) -> tuple[Path, dict[str, Any]]:
    adata = lognorm(COUNTS)
    adata.layers["counts"] = COUNTS.X.copy()
    adata.write_h5ad(folder / "layer.h5ad")
    return folder / "layer.h5ad", {"layer": "counts"}


def h5ad_raw(folder: Path) -> tuple[Path, dict[str, Any]]:
    """Counts of all genes in .raw; .X log-normalised and subset to 50 'variable' genes."""
    adata = COUNTS.copy()
    adata.raw = COUNTS
    adata = lognorm(adata)[:, 10:60].copy()
    adata.write_h5ad(folder / "raw.h5ad")
    return folder / "raw.h5ad", {"use_raw": True}


def features_and_barcodes(adata: anndata.AnnData) -> tuple[list[str], list[str], list[str]]:
    """10x feature rows: the genes, then one antibody capture (dropped by gex_only)."""
    ids = [*adata.var["gene_ids"], "CD3_TotalSeqB"]
    names = [*adata.var_names, "CD3"]
    types = ["Gene Expression"] * adata.n_vars + ["Antibody Capture"]
    return ids, names, types


def with_antibody(adata: anndata.AnnData) -> sp.csr_matrix:
    """cells x (genes + 1 antibody) counts, int32."""
    antibody = np.arange(adata.n_obs, dtype=np.int32)[:, None] % 7 + 1
    return sp.csr_matrix(sp.hstack([adata.X.astype(np.int32), antibody]), dtype=np.int32)


def tenx_h5(folder: Path) -> tuple[Path, dict[str, Any]]:
    """Cell Ranger v3 .h5: /matrix holds the genes x cells CSC (= cells x genes CSR)."""
    x = with_antibody(COUNTS)
    ids, names, types = features_and_barcodes(COUNTS)
    path = folder / "filtered_feature_bc_matrix.h5"
    with h5py.File(path, "w") as f:
        matrix = f.create_group("matrix")
        matrix["data"] = x.data
        matrix["indices"] = x.indices.astype(np.int64)
        matrix["indptr"] = x.indptr.astype(np.int64)
        matrix["shape"] = np.array([x.shape[1], x.shape[0]], dtype=np.int32)
        matrix["barcodes"] = np.array(COUNTS.obs_names, dtype="S")
        features = matrix.create_group("features")
        features["id"] = np.array(ids, dtype="S")
        features["name"] = np.array(names, dtype="S")
        features["feature_type"] = np.array(types, dtype="S")
        features["genome"] = np.array(["GRCh38"] * len(ids), dtype="S")
        features["_all_tag_keys"] = np.array([b"genome"])
    return path, UNLABELLED


def write_mtx_folder(path: Path, *, compressed: bool) -> Path:
    """matrix.mtx (genes x cells), features.tsv (id, symbol, type), barcodes.tsv; gzipped as
    Cell Ranger v3 writes them, or plain as STARsolo does."""
    x = with_antibody(COUNTS)
    ids, names, types = features_and_barcodes(COUNTS)
    suffix, open_ = (".gz", gzip.open) if compressed else ("", open)
    path.mkdir(parents=True)
    with open_(path / f"matrix.mtx{suffix}", "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(x.T), field="integer")
    with open_(path / f"features.tsv{suffix}", "wt") as handle:
        handle.writelines(f"{i}\t{n}\t{t}\n" for i, n, t in zip(ids, names, types, strict=True))
    with open_(path / f"barcodes.tsv{suffix}", "wt") as handle:
        handle.writelines(f"{barcode}\n" for barcode in COUNTS.obs_names)
    return path


def tenx_mtx(folder: Path) -> tuple[Path, dict[str, Any]]:
    return write_mtx_folder(folder / "filtered_feature_bc_matrix", compressed=True), UNLABELLED


def starsolo_mtx(folder: Path) -> tuple[Path, dict[str, Any]]:
    return write_mtx_folder(folder / "Solo.out" / "Gene" / "filtered", compressed=False), UNLABELLED


def loom_anndata(folder: Path) -> tuple[Path, dict[str, Any]]:
    """Written by anndata: names in the row/column attributes ``var_names`` / ``obs_names``."""
    adata = COUNTS.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.write_loom(folder / "counts.loom")
    return folder / "counts.loom", {}


def loom_loompy(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The loompy convention (velocyto, Linnarsson lab): names in ``Gene`` / ``CellID``."""
    path = folder / "counts.loom"
    loompy.create(
        str(path),
        sp.coo_matrix(COUNTS.X.T),  # genes x cells
        row_attrs={
            "Gene": COUNTS.var_names.to_numpy(),
            "Accession": COUNTS.var["gene_ids"].to_numpy(),
        },
        col_attrs={
            "CellID": COUNTS.obs_names.to_numpy(),
            "cell_type": COUNTS.obs["cell_type"].astype(str).to_numpy(),
        },
    )
    return path, {}


def normalized_ln(folder: Path) -> tuple[Path, dict[str, Any]]:
    adata = lognorm(COUNTS)
    assert adata.uns["log1p"]["base"] is None
    adata.write_h5ad(folder / "ln.h5ad")
    return folder / "ln.h5ad", {"input": "log1p"}


def normalized_log2(folder: Path) -> tuple[Path, dict[str, Any]]:
    adata = lognorm(COUNTS, base=2)
    assert adata.uns["log1p"] == {"base": 2}
    adata.write_h5ad(folder / "log2.h5ad")
    return folder / "log2.h5ad", {"input": "log1p"}


FORMATS = [
    pytest.param(h5ad_csr, id="h5ad-csr"),
    pytest.param(h5ad_dense, id="h5ad-dense-int"),
    pytest.param(h5ad_csc, id="h5ad-csc"),
    pytest.param(h5ad_layer, id="h5ad-layer-counts"),
    pytest.param(h5ad_raw, id="h5ad-raw"),
    pytest.param(tenx_h5, id="10x-h5"),
    pytest.param(tenx_mtx, id="10x-mtx"),
    pytest.param(starsolo_mtx, id="mtx-uncompressed"),
    pytest.param(loom_loompy, id="loom-loompy"),
    pytest.param(loom_anndata, id="loom-anndata"),
    pytest.param(normalized_ln, id="input-log1p-ln"),
    pytest.param(normalized_log2, id="input-log1p-log2"),
]


@pytest.mark.parametrize("write", FORMATS)
def test_every_format_gives_the_reference_shards(
    write: Callable[[Path], tuple[Path, dict[str, Any]]],
    tmp_path: Path,
    panel_file: Path,
    expected: anndata.AnnData,
) -> None:
    source, overrides = write(tmp_path)
    with warnings.catch_warnings():  # anndata's notes on the formats it converts
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", anndata.ImplicitModificationWarning)
        cells = run(source, tmp_path / "cells", data_params(panel_file, **overrides))
    assert_matches(cells, expected, labelled=overrides.get("label_key") != "")
    assert cells.schema.field("gene_idx").type == pa.list_(pa.uint16())
    assert cells.schema.field("value").type == pa.list_(pa.float32())
    manifest = read_manifest(tmp_path / "cells")
    assert manifest["genes"]["found"] == 60
    assert manifest["cells"]["kept"] == N_CELLS - N_SPARSE
    assert manifest["source"]["counts_recovered"] is (overrides.get("input") == "log1p")


# ---------------------------------------------------------------------------------------------
# Alignment options


def test_align_by_ensembl_id_column(tmp_path: Path, expected: anndata.AnnData) -> None:
    source, _ = h5ad_csr(tmp_path)
    ids = dict(zip(COUNTS.var_names, COUNTS.var["gene_ids"], strict=True))
    panel = tmp_path / "panel_ids.txt"
    panel.write_text("".join(f"{ids.get(gene, gene)}\n" for gene in PANEL))
    cells = run(source, tmp_path / "cells", data_params(panel, gene_id_column="gene_ids"))
    assert_matches(cells, expected)


def test_gene2vec_panel_file_order_defines_gene_idx(tmp_path: Path) -> None:
    """A Gene2vec text file (word2vec header, then ``symbol f1 f2 ...``) is a panel in its order."""
    source, _ = h5ad_csr(tmp_path)
    order = PANEL[::-1]
    rng = np.random.default_rng(2)
    lines = [f"{len(order)} 4\n"]
    lines += [f"{g} {' '.join(f'{v:.5f}' for v in rng.normal(size=4))}\n" for g in order]
    gene2vec = tmp_path / "gene2vec_dim_4.txt"
    gene2vec.write_text("".join(lines))
    cells = run(source, tmp_path / "cells", data_params(gene2vec))
    assert_matches(cells, reference(COUNTS, order))
    assert (tmp_path / "cells" / "panel.txt").read_text().split() == order


# ---------------------------------------------------------------------------------------------
# Folds


def folds_by_cell(cells: pa.Table) -> dict[str, int]:
    ids, folds = cells.column("cell_id").to_pylist(), cells.column("fold").to_pylist()
    return dict(zip(ids, folds, strict=True))


def assert_stratified(cells: pa.Table, n_folds: int = 5) -> None:
    """Every label is in every fold, and its fold sizes differ by at most 1."""
    labels, folds = cells.column("label").to_pylist(), cells.column("fold").to_pylist()
    sizes = Counter(zip(labels, folds, strict=True))
    assert set(labels) == set(LABELS)
    for label in LABELS:
        per_fold = [sizes[label, fold] for fold in range(n_folds)]
        assert min(per_fold) >= 1 and max(per_fold) - min(per_fold) <= 1, (label, per_fold)
    assert set(folds) == set(range(n_folds))


@pytest.fixture(scope="module")
def csr_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h5ad_csr(tmp_path_factory.mktemp("csr"))[0]


@pytest.fixture(scope="module")
def folds(csr_h5ad: Path, panel_file: Path, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    return run(csr_h5ad, tmp_path_factory.mktemp("folds") / "cells", data_params(panel_file))


def test_folds_are_stratified(folds: pa.Table) -> None:
    assert folds.schema.field("fold").type == pa.int8()
    assert_stratified(folds)


def test_folds_are_the_same_on_a_rerun(
    folds: pa.Table, csr_h5ad: Path, panel_file: Path, tmp_path: Path
) -> None:
    again = run(csr_h5ad, tmp_path / "cells", data_params(panel_file))
    assert again.column("fold").to_pylist() == folds.column("fold").to_pylist()


def test_folds_do_not_depend_on_row_order(
    folds: pa.Table, panel_file: Path, tmp_path: Path
) -> None:
    permutation = np.random.default_rng(3).permutation(N_CELLS)
    COUNTS[permutation].copy().write_h5ad(tmp_path / "permuted.h5ad")
    permuted = run(tmp_path / "permuted.h5ad", tmp_path / "cells", data_params(panel_file))
    assert folds_by_cell(permuted) == folds_by_cell(folds)
    assert_matches(permuted, reference(COUNTS[permutation].copy(), PANEL))


def test_folds_change_with_the_seed(
    folds: pa.Table, csr_h5ad: Path, panel_file: Path, tmp_path: Path
) -> None:
    other = run(csr_h5ad, tmp_path / "cells", data_params(panel_file, seed=1))
    assert folds_by_cell(other) != folds_by_cell(folds)
    assert other.column("cell_id").to_pylist() == folds.column("cell_id").to_pylist()
    assert_stratified(other)
