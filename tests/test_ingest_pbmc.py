"""Ingest of the real bundled dataset (scanpy's pbmc68k_reduced), on Ray and in-process, and
the atomicity of the output under Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scanpy as sc
import scipy.sparse as sp
from conftest import PBMC_PARAMS, REPO_ROOT

from scbert_platform.data.ingest import ingest
from scbert_platform.data.loader import shard_files
from scbert_platform.data.manifest import MANIFEST, PANEL_FILE, read_manifest
from scbert_platform.params import DataParams


def read_cells(directory: Path) -> pa.Table:
    return pq.ParquetDataset(shard_files(directory)).read()


def reference_pbmc(path: Path) -> tuple[list[str], sp.csr_matrix, list[str]]:
    """The published preprocessing done directly with scanpy on the whole matrix."""
    adata = sc.read_h5ad(path)
    raw = adata.raw.to_adata()
    x = sp.csr_matrix(raw.X, dtype=np.float64)
    x.data = np.expm1(x.data)
    row_min = np.minimum.reduceat(x.data, x.indptr[:-1])
    x.data = np.round(x.data / np.repeat(row_min, np.diff(x.indptr)))
    counts = anndata.AnnData(x.astype(np.float32), obs=raw.obs)
    sc.pp.filter_cells(counts, min_genes=200)
    sc.pp.normalize_total(counts, target_sum=1e4)
    sc.pp.log1p(counts, base=2)
    return counts.obs_names.tolist(), sp.csr_matrix(counts.X), counts.obs["bulk_labels"].tolist()


def test_real_dataset_matches_scanpy_reference(pbmc_shards: Path, pbmc_h5ad: Path) -> None:
    cells = read_cells(pbmc_shards)
    ids, expected, labels = reference_pbmc(pbmc_h5ad)
    assert cells.column("cell_id").to_pylist() == ids
    assert cells.column("label").to_pylist() == labels
    assert cells.schema.field("gene_idx").type == pa.list_(pa.uint16())
    assert cells.schema.field("value").type == pa.list_(pa.float32())
    for i in (0, 1, 100, len(ids) - 1):
        row = expected[i]
        np.testing.assert_array_equal(cells.column("gene_idx")[i].values.to_numpy(), row.indices)
        np.testing.assert_allclose(cells.column("value")[i].values.to_numpy(), row.data, rtol=1e-6)
    n_genes = cells.column("n_genes").to_numpy()
    assert n_genes.min() >= 200
    np.testing.assert_array_equal(n_genes, np.diff(expected.indptr))


def test_real_dataset_manifest(pbmc_shards: Path, pbmc_h5ad: Path) -> None:
    manifest = read_manifest(pbmc_shards)
    assert manifest["cells"] == {
        "input": 700,
        "kept": 693,
        "dropped": {"fewer than 200 expressed panel genes": 7, "no counts in the panel": 0},
        "median_genes_per_kept_cell": manifest["cells"]["median_genes_per_kept_cell"],
    }
    assert sum(manifest["labels"]["counts"].values()) == 693
    assert len(manifest["labels"]["counts"]) == 10
    assert manifest["source"]["sha256"] == hashlib.sha256(pbmc_h5ad.read_bytes()).hexdigest()
    assert manifest["source"]["counts_recovered"] is True
    panel = (pbmc_shards / PANEL_FILE).read_bytes()
    assert manifest["panel"]["sha256"] == hashlib.sha256(panel).hexdigest()
    assert manifest["panel"]["n_genes"] == 765 == len(panel.splitlines())
    assert manifest["genes"]["coverage"] == 1.0
    for shard in manifest["shards"]:
        data = (pbmc_shards / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert sum(int(v) for v in manifest["folds"]["counts"].values()) == 693


def test_folds_are_stratified_on_real_labels(pbmc_shards: Path) -> None:
    cells = read_cells(pbmc_shards).to_pandas()
    per_label = cells.groupby(["label", "fold"]).size().unstack(fill_value=0)
    assert per_label.shape[1] == 5
    assert (per_label.max(axis=1) - per_label.min(axis=1)).max() <= 1


@pytest.mark.ray
def test_ray_data_run_writes_the_same_cells(
    ray_local: object, pbmc_shards: Path, pbmc_h5ad: Path, tmp_path: Path
) -> None:
    """Several chunks and several shards on Ray Data: the same cells, values and folds."""
    params = DataParams(**PBMC_PARAMS, chunk_cells=150, shard_mb=0.05)
    report = ingest(pbmc_h5ad, tmp_path / "pbmc", params, executor="ray", log=lambda _: None)
    assert report.n_shards > 2
    files = shard_files(tmp_path / "pbmc")
    assert [Path(f).name for f in files] == [f"part-{i:05d}.parquet" for i in range(len(files))]
    ours, single = read_cells(tmp_path / "pbmc"), read_cells(pbmc_shards)
    assert ours.equals(single)


def test_rerun_replaces_the_output(pbmc_h5ad: Path, tmp_path: Path) -> None:
    out = tmp_path / "pbmc"
    ingest(pbmc_h5ad, out, DataParams(**PBMC_PARAMS), executor="local", log=lambda _: None)
    (out / "stray.txt").write_text("from an older run")
    params = DataParams(**PBMC_PARAMS, min_genes=250)
    ingest(pbmc_h5ad, out, params, executor="local", log=lambda _: None)
    assert not (out / "stray.txt").exists()
    assert read_manifest(out)["preprocessing"]["min_genes"] == 250
    assert [p.name for p in tmp_path.iterdir()] == ["pbmc"]


def write_counts(path: Path, n_cells: int, n_genes: int, *, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = sp.random(n_cells, n_genes, density=0.2, format="csr", rng=rng, dtype=np.float32)
    x.data = rng.integers(1, 30, x.nnz).astype(np.float32)
    obs_names = [f"cell{i}" for i in range(n_cells)]
    var_names = [f"G{i:05d}" for i in range(n_genes)]
    adata = anndata.AnnData(x, obs={"obs_names": obs_names}, var={"var_names": var_names})
    adata.obs_names, adata.var_names = obs_names, var_names
    adata.write_h5ad(path)


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.mark.slow
def test_ctrl_c_leaves_the_previous_output_intact(tmp_path: Path) -> None:
    source = tmp_path / "counts.h5ad"
    write_counts(source, 30_000, 1_000)
    out = tmp_path / "cells"
    args = [sys.executable, "-m", "scbert_platform.cli", "ingest", str(source), "--out", str(out)]
    args += ["--params", str(tmp_path / "none.yaml"), "--executor", "local"]
    small = ["--set", "data.min_genes=20", "--set", "data.panel_min_cells=1"]
    first = subprocess.run([*args, *small], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = tree_digest(out)
    assert MANIFEST in before

    # a second run with many small shards, interrupted while it writes them
    proc = subprocess.Popen(
        [*args, *small, "--set", "data.shard_mb=0.1", "--set", "data.chunk_cells=1000"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    deadline = time.monotonic() + 120
    staging: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        staging = [p for p in tmp_path.glob(".cells.tmp-*") if any(p.glob("part-*.parquet"))]
        if staging:
            break
        time.sleep(0.05)
    assert staging, "the ingest finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells", "counts.h5ad"]


def test_manifest_is_json_with_the_parameters(pbmc_shards: Path) -> None:
    manifest = json.loads((pbmc_shards / MANIFEST).read_text())
    params = manifest["preprocessing"]["params"]
    assert params["label_key"] == "bulk_labels" and params["min_genes"] == 200
    assert manifest["preprocessing"]["normalize_total"] == 1e4
    assert manifest["preprocessing"]["log"] == "log2(1 + x)"
