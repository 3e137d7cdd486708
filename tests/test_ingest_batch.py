"""``data.batch_key`` (``scbert ingest --batch-key COL``): each cell's dataset or batch in a
``batch`` shard column and in the manifest, for leave-one-dataset-out cross-validation over one
shard set built from ``anndata.concat(..., label="dataset")``. Without it the shards and the
folds are as before."""

from __future__ import annotations

import subprocess
import sys
from glob import glob
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from conftest import write_tenx_h5, write_tenx_mtx

from scbert_platform.data.errors import IngestError
from scbert_platform.data.ingest import ingest
from scbert_platform.data.manifest import read_manifest
from scbert_platform.params import DataParams

N_GENES = 50
LABELS = ("B cell", "NK cell", "T cell")
DATASETS = {"lab_a": 40, "lab_b": 30}  # cells per dataset
N_SPARSE_B = 3  # the first cells of lab_b express fewer than MIN_GENES genes: QC drops them
MIN_GENES = 5
# several chunks and several shards, so the batch values cross chunk and shard boundaries
BASE: dict[str, Any] = {
    "min_genes": MIN_GENES,
    "panel_min_cells": 1,
    "label_key": "cell_type",
    "chunk_cells": 16,
    "shard_mb": 0.001,
}


def data_params(**overrides: Any) -> DataParams:
    return DataParams(**{**BASE, **overrides})


def quiet(log: str) -> None:
    """``ingest``'s progress log, silenced."""


def make_adata(n_cells: int, *, seed: int) -> anndata.AnnData:
    """Negative-binomial integer counts (CSR float32), obs['cell_type'] of 3 classes, var_names
    G0000...; gene 0 is highly expressed (counts well over 30)."""
    rng = np.random.default_rng(seed)
    mean = rng.gamma(0.8, 3.0, size=N_GENES)
    mean[0] = 60.0
    x = rng.negative_binomial(2, 2 / (2 + mean), size=(n_cells, N_GENES))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([LABELS[i % 3] for i in range(n_cells)])},
        index=[f"cell{i:04d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"G{j:04d}" for j in range(N_GENES)])
    return anndata.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs, var=var)


def two_datasets() -> anndata.AnnData:
    """Two datasets concatenated as a user would: obs['dataset'] (categorical) names each
    cell's dataset, obs names suffixed '-lab_a' / '-lab_b'."""
    parts = {name: make_adata(n, seed=seed) for seed, (name, n) in enumerate(DATASETS.items())}
    x = parts["lab_b"].X.toarray()
    x[:N_SPARSE_B, 3:] = 0
    parts["lab_b"].X = sp.csr_matrix(x)
    return anndata.concat(parts, label="dataset", index_unique="-")


COMBINED = two_datasets()
KEPT = ~(COMBINED.obs_names.str.startswith(("cell0000-lab_b", "cell0001-lab_b", "cell0002-lab_b")))
EXPECTED_BATCH = dict(
    zip(COMBINED.obs_names[KEPT], COMBINED.obs["dataset"].astype(str)[KEPT], strict=True)
)


def read_cells(output: Path) -> pa.Table:
    return pq.ParquetDataset(sorted(glob(str(output / "part-*.parquet")))).read()


@pytest.fixture(scope="module")
def combined_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("combined") / "combined.h5ad"
    COMBINED.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def with_batches(combined_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("with") / "cells"
    ingest(combined_h5ad, output, data_params(batch_key="dataset"), executor="local", log=quiet)
    return output


@pytest.fixture(scope="module")
def without_batches(combined_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("without") / "cells"
    ingest(combined_h5ad, output, data_params(), executor="local", log=quiet)
    return output


# ---------------------------------------------------------------------------------------------
# The batch column and the manifest


def test_batch_column_holds_each_cells_dataset(with_batches: Path) -> None:
    cells = read_cells(with_batches)
    assert len(read_manifest(with_batches)["shards"]) > 1  # crosses shard boundaries
    assert cells.schema.field("batch").type == pa.string()
    assert cells.column_names[:3] == ["cell_id", "label", "batch"]
    ids, batches = cells.column("cell_id").to_pylist(), cells.column("batch").to_pylist()
    assert dict(zip(ids, batches, strict=True)) == EXPECTED_BATCH
    assert ids == list(EXPECTED_BATCH)  # the input's order, the QC-dropped cells left out


def test_manifest_counts_kept_cells_per_batch(with_batches: Path) -> None:
    manifest = read_manifest(with_batches)
    assert manifest["batches"] == {
        "key": "dataset",
        "counts": {"lab_a": DATASETS["lab_a"], "lab_b": DATASETS["lab_b"] - N_SPARSE_B},
    }
    assert sum(manifest["batches"]["counts"].values()) == manifest["cells"]["kept"]
    assert manifest["preprocessing"]["params"]["batch_key"] == "dataset"


def test_without_batch_key_the_schema_and_manifest_are_unchanged(
    with_batches: Path, without_batches: Path
) -> None:
    plain = read_cells(without_batches)
    assert plain.column_names == [
        "cell_id",
        "label",
        "gene_idx",
        "value",
        "n_counts",
        "n_genes",
        "fold",
    ]
    assert read_manifest(without_batches)["batches"] is None
    # every other column, the folds included (stratified by label), is the same with batch_key
    assert read_cells(with_batches).drop_columns(["batch"]).equals(plain)


@pytest.mark.ray
def test_ray_tasks_write_the_same_batch_column(
    ray_local: Any, combined_h5ad: Path, with_batches: Path, tmp_path: Path
) -> None:
    output = tmp_path / "cells"
    params = data_params(batch_key="dataset", shard_mb=0.003)  # 3 shards: fewer Ray tasks
    ingest(combined_h5ad, output, params, executor="ray", log=quiet)
    assert len(read_manifest(output)["shards"]) == 3
    assert read_cells(output).equals(read_cells(with_batches))
    assert read_manifest(output)["batches"] == read_manifest(with_batches)["batches"]


def test_loom_column_attribute_is_a_batch_key(tmp_path: Path, with_batches: Path) -> None:
    adata = COMBINED.copy()
    adata.obs = adata.obs.astype(str)
    adata.write_loom(tmp_path / "combined.loom")
    output = tmp_path / "cells"
    ingest(
        tmp_path / "combined.loom",
        output,
        data_params(batch_key="dataset"),
        executor="local",
        log=quiet,
    )
    cells = read_cells(output)
    ids, batches = cells.column("cell_id").to_pylist(), cells.column("batch").to_pylist()
    assert dict(zip(ids, batches, strict=True)) == EXPECTED_BATCH
    assert read_manifest(output)["batches"] == read_manifest(with_batches)["batches"]


def test_cli_batch_key_without_labels(tmp_path: Path, combined_h5ad: Path) -> None:
    output = tmp_path / "cells"
    command = [sys.executable, "-m", "scbert_platform.cli", "ingest", str(combined_h5ad)]
    command += ["--out", str(output), "--batch-key", "dataset", "--executor", "local"]
    command += ["--params", str(tmp_path / "no-params.yaml")]
    command += ["--set", f"data.min_genes={MIN_GENES}", "--set", "data.panel_min_cells=1"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cells kept per dataset (data.batch_key): lab_a 40, lab_b 27" in done.stderr
    cells = read_cells(output)
    assert set(cells.column("label").to_pylist()) == {None}
    ids, batches = cells.column("cell_id").to_pylist(), cells.column("batch").to_pylist()
    assert dict(zip(ids, batches, strict=True)) == EXPECTED_BATCH
    manifest = read_manifest(output)
    assert manifest["batches"]["counts"] == {"lab_a": 40, "lab_b": 27}


# ---------------------------------------------------------------------------------------------
# Errors: raised before anything is written


def ingest_fails(source: Path, output: Path, match: str, **overrides: Any) -> None:
    with pytest.raises(IngestError, match=match):
        ingest(source, output, data_params(**overrides), executor="local", log=quiet)
    assert not output.exists()
    assert sorted(output.parent.glob(f".{output.name}.*")) == []


def test_missing_batch_column_lists_the_obs_columns(combined_h5ad: Path, tmp_path: Path) -> None:
    ingest_fails(
        combined_h5ad,
        tmp_path / "cells",
        r"obs has no batch column 'batch' \(data.batch_key\); columns: "
        r"\['cell_type', 'dataset'\]",
        batch_key="batch",
    )


@pytest.mark.parametrize(
    "missing", [pytest.param(np.nan, id="NaN"), pytest.param("", id="empty-string")]
)
def test_missing_batch_values_are_counted(tmp_path: Path, missing: Any) -> None:
    adata = COMBINED.copy()
    dataset = adata.obs["dataset"].astype(object)
    dataset.iloc[[5, 41, 60]] = missing
    adata.obs["dataset"] = pd.Categorical(dataset)  # NaN: no category (code -1)
    adata.write_h5ad(tmp_path / "gaps.h5ad")
    ingest_fails(
        tmp_path / "gaps.h5ad",
        tmp_path / "cells",
        r"batch column 'dataset' \(data.batch_key\) has no value for 3 of 70 cells "
        r"\(e.g. 'cell0005-lab_a', 'cell0001-lab_b', 'cell0020-lab_b'\).*fill them in or drop",
        batch_key="dataset",
    )


def tenx_h5(folder: Path) -> Path:
    """Cell Ranger v3 .h5: no per-cell metadata."""
    return write_tenx_h5(COMBINED, folder / "filtered_feature_bc_matrix.h5")


def tenx_mtx(folder: Path) -> Path:
    """Cell Ranger v3 matrix folder: no per-cell metadata."""
    return write_tenx_mtx(COMBINED, folder / "filtered_feature_bc_matrix")


@pytest.mark.parametrize(
    ("build", "kind"),
    [pytest.param(tenx_h5, "10x_h5", id="10x-h5"), pytest.param(tenx_mtx, "10x_mtx", id="mtx")],
)
def test_formats_without_obs_metadata_are_rejected(tmp_path: Path, build: Any, kind: str) -> None:
    ingest_fails(
        build(tmp_path),
        tmp_path / "cells",
        rf"data.batch_key='dataset' needs an obs column, and a {kind} input has no per-cell "
        r"metadata.*anndata.concat\(..., label='dataset'\).*\.h5ad",
        batch_key="dataset",
        label_key="",
    )


def test_loom_without_the_column_attribute_lists_them(tmp_path: Path) -> None:
    adata = COMBINED.copy()
    adata.obs = adata.obs[["cell_type"]].astype(str)
    adata.write_loom(tmp_path / "combined.loom")
    ingest_fails(
        tmp_path / "combined.loom",
        tmp_path / "cells",
        r"obs has no batch column 'dataset' \(data.batch_key\); column attributes \(col_attrs\): "
        r"\['cell_type'\]",
        batch_key="dataset",
    )
