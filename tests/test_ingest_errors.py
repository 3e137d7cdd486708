"""Bad input to ``scbert ingest``: each case gets an ``IngestError`` that names the problem and
its fix, and writes nothing (no output directory, an earlier output left byte-for-byte as it
was, no ``.<name>.tmp-*`` staging directory beside it)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scanpy as sc
import scipy.sparse as sp
from conftest import write_tenx_h5, write_tenx_mtx

import scbert_platform.data.ingest as ingest_module
from scbert_platform.data.errors import IngestError
from scbert_platform.data.ingest import ingest
from scbert_platform.data.manifest import read_manifest
from scbert_platform.params import DataParams

pytestmark = pytest.mark.filterwarnings("ignore:(Variable|Observation) names are not unique")

N_CELLS, N_GENES = 60, 80
LABELS = ("B cell", "NK cell", "T cell")
BASE = {"min_genes": 5, "panel_min_cells": 1, "label_key": "cell_type"}


def data_params(**overrides: Any) -> DataParams:
    return DataParams(**{**BASE, **overrides})


def quiet(log: str) -> None:
    """``ingest``'s progress log, silenced."""


def count_matrix(n_cells: int = N_CELLS, n_genes: int = N_GENES, *, seed: int = 0) -> np.ndarray:
    """Negative-binomial counts (cells x genes); gene 0 is highly expressed (counts well over 30,
    so the counts cannot be mistaken for log values)."""
    rng = np.random.default_rng(seed)
    mean = rng.gamma(0.8, 3.0, size=n_genes)
    mean[0] = 60.0
    return rng.negative_binomial(2, 2 / (2 + mean), size=(n_cells, n_genes)).astype(np.int64)


def make_adata(x: np.ndarray | None = None, *, seed: int = 0) -> anndata.AnnData:
    """Integer counts (CSR float32), obs['cell_type'] of 3 classes, var_names G0000..."""
    x = count_matrix(seed=seed) if x is None else x
    n_cells, n_genes = x.shape
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([LABELS[i % 3] for i in range(n_cells)])},
        index=[f"cell{i:04d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"G{j:04d}" for j in range(n_genes)])
    return anndata.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs, var=var)


def write_h5ad(adata: anndata.AnnData, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


def write_10x_mtx(adata: anndata.AnnData, folder: Path) -> Path:
    """Cell Ranger v3 matrix folder: genes x cells matrix.mtx.gz, features.tsv.gz, barcodes."""
    return write_tenx_mtx(adata, folder)


def write_panel(path: Path, genes: list[str]) -> Path:
    path.write_text("".join(f"{gene}\n" for gene in genes))
    return path


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory``, by relative path."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def staging_leftovers(output: Path) -> list[str]:
    """Hidden ``.<name>.tmp-*`` / ``.<name>.old`` directories beside ``output``."""
    return sorted(p.name for p in output.parent.glob(f".{output.name}.*"))


def assert_nothing_written(output: Path, before: dict[str, str] | None) -> None:
    if before is None:
        assert not output.exists()
    else:
        assert snapshot(output) == before
    assert staging_leftovers(output) == []


@pytest.fixture
def good_h5ad(tmp_path: Path) -> Path:
    return write_h5ad(make_adata(), tmp_path / "good.h5ad")


@pytest.fixture
def earlier_output(tmp_path: Path, good_h5ad: Path) -> tuple[Path, dict[str, str]]:
    """An output directory from a successful ingest, and its snapshot."""
    output = tmp_path / "cells"
    ingest(good_h5ad, output, data_params(), executor="local", log=quiet)
    before = snapshot(output)
    assert {"manifest.json", "panel.txt", "part-00000.parquet"} <= set(before)
    return output, before


# ---------------------------------------------------------------------------------------------
# The bad inputs: each writes a file under the given folder and returns its path


def non_integer(folder: Path) -> Path:
    adata = make_adata()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return write_h5ad(adata, folder / "lognorm.h5ad")


def with_value(value: float, cell: int = 7) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        x = count_matrix().astype(np.float64)
        x[cell, 3] = value
        adata = make_adata(x)
        adata.X = x  # dense: the bad value is stored whatever it is
        return write_h5ad(adata, folder / "bad_value.h5ad")

    return build


def duplicated_genes(folder: Path) -> Path:
    adata = make_adata()
    names = adata.var_names.tolist()
    names[40], names[41] = names[3], names[17]  # G0003 and G0017 twice each
    adata.var_names = names
    return write_h5ad(adata, folder / "dup_genes.h5ad")


def duplicated_cells(folder: Path) -> Path:
    adata = make_adata()
    names = adata.obs_names.tolist()
    names[30] = names[2]
    adata.obs_names = names
    return write_h5ad(adata, folder / "dup_cells.h5ad")


def no_cells(folder: Path) -> Path:
    return write_h5ad(make_adata()[:0].copy(), folder / "no_cells.h5ad")


def no_genes(folder: Path) -> Path:
    return write_h5ad(make_adata()[:, :0].copy(), folder / "no_genes.h5ad")


def one_class(folder: Path) -> Path:
    adata = make_adata()
    adata.obs["cell_type"] = "T cell"
    return write_h5ad(adata, folder / "one_class.h5ad")


def panel_with_found(n_found: int, n_panel: int = 100) -> Callable[[Path], Path]:
    """Writes the good file and a panel of which ``n_found`` genes are in the data."""

    def build(folder: Path) -> Path:
        genes = [f"G{j:04d}" for j in range(n_found)]
        genes += [f"ABSENT{j}" for j in range(n_panel - n_found)]
        write_panel(folder / "panel.txt", genes)
        return write_h5ad(make_adata(), folder / "good.h5ad")

    return build


def csv_file(folder: Path) -> Path:
    path = folder / "counts.csv"
    make_adata().to_df().to_csv(path)
    return path


def text_named_h5ad(folder: Path) -> Path:
    path = folder / "counts.h5ad"
    make_adata().to_df().to_csv(path)
    return path


def truncated(folder: Path) -> Path:
    whole = write_h5ad(make_adata(), folder / "whole.h5ad").read_bytes()
    path = folder / "truncated.h5ad"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def random_bytes(folder: Path) -> Path:
    path = folder / "corrupt.h5ad"
    path.write_bytes(np.random.default_rng(0).bytes(20_000))
    return path


def good(folder: Path) -> Path:
    return write_h5ad(make_adata(), folder / "good.h5ad")


def nonexistent(folder: Path) -> Path:
    return folder / "missing.h5ad"


def folder_without_matrix(folder: Path) -> Path:
    (folder / "filtered_feature_bc_matrix").mkdir()
    return folder / "filtered_feature_bc_matrix"


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], Path]
    match: str  # the problem ... the fix
    params: dict[str, Any] = field(default_factory=dict)


CASES = {
    "non-integer counts": Case(
        non_integer,
        r"non-integer value .* in cell 'cell0000'.*raw counts.*--input log1p.*--layer.*"
        r"--use-raw",
    ),
    "negative counts": Case(
        with_value(-2.0), r"negative values in cell 'cell0007'.*>= 0.*raw counts.*--layer"
    ),
    "NaN": Case(
        with_value(np.nan), r"1 NaN/inf values .*first in cell 'cell0007'.*fix or drop those cells"
    ),
    "inf": Case(
        with_value(np.inf), r"1 NaN/inf values .*first in cell 'cell0007'.*fix or drop those cells"
    ),
    "count too large for float32 normalisation": Case(
        with_value(1e12), r"value 1e\+12 in cell 'cell0007' is larger than any count"
    ),
    "duplicated gene symbols": Case(
        duplicated_genes,
        r"duplicated gene symbols: 2 gene names .*G0003 \(x2\), G0017 \(x2\).*--make-unique",
    ),
    "duplicated cell ids": Case(
        duplicated_cells, r"duplicated cell ids: 1 cell names .*cell0002 \(x2\).*--make-unique"
    ),
    "no cells": Case(no_cells, r"matrix is empty \(0 cells x 80 genes\)"),
    "no genes": Case(no_genes, r"matrix is empty \(60 cells x 0 genes\)"),
    "label column missing": Case(
        good,
        r"obs has no label column 'celltype' \(data.label_key\); columns: \['cell_type'\]",
        {"label_key": "celltype"},
    ),
    "label column of one class": Case(
        one_class, r"'cell_type' has 1 class\(es\) \['T cell'\].*at least 2.*omit data.label_key"
    ),
    "panel coverage 30%": Case(
        panel_with_found(30),
        r"only 30 of the panel's 100 genes \(30.0%\) are in the data, below "
        r"data.min_coverage=50%.*ABSENT0.*--gene-id-column.*lower data.min_coverage",
        {"panel": "panel.txt"},
    ),
    "panel coverage 49%": Case(
        panel_with_found(49), r"only 49 of the panel's 100 genes \(49.0%\)", {"panel": "panel.txt"}
    ),
    "csv file": Case(
        csv_file, r"unsupported file type '.csv'; give an .h5ad, a 10x .h5, a .loom or a 10x"
    ),
    "text file named .h5ad": Case(
        text_named_h5ad, r"cannot read .*counts.h5ad.*not an .h5ad.*re-export it"
    ),
    "truncated .h5ad": Case(
        truncated, r"cannot read .*truncated.h5ad.*truncated, corrupt.*re-export it"
    ),
    "random bytes named .h5ad": Case(
        random_bytes, r"cannot read .*corrupt.h5ad.*truncated, corrupt.*re-export it"
    ),
    "--input log1p on raw counts": Case(
        good,
        r"declared log-normalised.*look like raw counts; pass --input counts",
        {"input": "log1p"},
    ),
    "QC removes every cell": Case(
        good,
        r"no cell has at least 1000 expressed panel genes \(data.min_genes\); the most any cell "
        r"has is \d+: lower data.min_genes",
        {"min_genes": 1000},
    ),
    "nonexistent input": Case(nonexistent, r"missing.h5ad does not exist"),
    "folder without matrix.mtx": Case(folder_without_matrix, r"without matrix.mtx.*10x mtx"),
    "layer missing": Case(
        good, r"no matrix at layers/counts; layers present: \[\]", {"layer": "counts"}
    ),
    "gene id column missing": Case(
        good,
        r"var has no column 'gene_ids' \(data.gene_id_column\)",
        {"gene_id_column": "gene_ids"},
    ),
}


def run_case(case: Case, tmp_path: Path, output: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = case.build(inputs)
    params = dict(case.params)
    if "panel" in params:
        params["panel"] = str(inputs / params["panel"])
    with pytest.raises(IngestError, match=case.match):
        ingest(source, output, data_params(**params), executor="local", log=quiet)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_rejected_and_nothing_written(case: Case, tmp_path: Path) -> None:
    output = tmp_path / "out" / "cells"  # not even the parent is created
    run_case(case, tmp_path, output)
    assert not output.parent.exists()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_leaves_the_earlier_output_intact(
    case: Case, tmp_path: Path, earlier_output: tuple[Path, dict[str, str]]
) -> None:
    output, before = earlier_output
    run_case(case, tmp_path, output)
    assert_nothing_written(output, before)


# ---------------------------------------------------------------------------------------------
# The ways out of some errors


def test_make_unique_suffixes_duplicated_gene_symbols(tmp_path: Path) -> None:
    source = duplicated_genes(tmp_path)
    output = tmp_path / "cells"
    report = ingest(source, output, data_params(make_unique=True), executor="local", log=quiet)
    assert report.n_cells_kept == N_CELLS
    panel = (output / "panel.txt").read_text().split()
    assert {"G0003", "G0003-1", "G0017", "G0017-1"} <= set(panel)
    assert len(panel) == len(set(panel))


def test_make_unique_suffixes_duplicated_cell_ids(tmp_path: Path) -> None:
    source = duplicated_cells(tmp_path)
    output = tmp_path / "cells"
    ingest(source, output, data_params(make_unique=True), executor="local", log=quiet)
    ids = pq.read_table(output / "part-00000.parquet").column("cell_id").to_pylist()
    assert len(ids) == N_CELLS == len(set(ids))
    assert ids[2] == "cell0002" and ids[30] == "cell0002-1"


@pytest.mark.parametrize("n_found", [50, 51])
def test_panel_coverage_at_or_above_threshold_passes(tmp_path: Path, n_found: int) -> None:
    source = panel_with_found(n_found)(tmp_path)
    output = tmp_path / "cells"
    panel = str(tmp_path / "panel.txt")
    ingest(source, output, data_params(panel=panel), executor="local", log=quiet)
    genes = read_manifest(output)["genes"]
    assert (genes["panel"], genes["found"], genes["coverage"]) == (100, n_found, n_found / 100)


# ---------------------------------------------------------------------------------------------
# Errors found late: in a later chunk, on Ray, while writing


def test_bad_value_in_a_later_chunk_names_its_cell(
    tmp_path: Path, earlier_output: tuple[Path, dict[str, str]]
) -> None:
    output, before = earlier_output
    source = with_value(np.nan, cell=55)(tmp_path)
    with pytest.raises(IngestError, match=r"NaN/inf values in cells 40..59 .*'cell0055'"):
        ingest(source, output, data_params(chunk_cells=20), executor="local", log=quiet)
    assert_nothing_written(output, before)


@pytest.mark.ray
def test_bad_value_found_by_a_ray_task(
    tmp_path: Path, earlier_output: tuple[Path, dict[str, str]]
) -> None:
    """The error raised in a Ray task reaches the caller as the same IngestError."""
    output, before = earlier_output
    source = with_value(-1.0, cell=45)(tmp_path)
    with pytest.raises(IngestError, match=r"negative values in cell 'cell0045'.*>= 0"):
        ingest(source, output, data_params(chunk_cells=20), executor="ray", log=quiet)
    assert_nothing_written(output, before)


def test_failure_while_writing_leaves_the_earlier_output_intact(
    tmp_path: Path,
    good_h5ad: Path,
    earlier_output: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output, before = earlier_output
    real_write_shard = ingest_module.write_shard

    def write_then_fail(*args: Any, **kwargs: Any) -> Any:
        real_write_shard(*args, **kwargs)  # a shard lands in the staging directory first
        raise OSError("disk full")

    monkeypatch.setattr(ingest_module, "write_shard", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ingest(good_h5ad, output, data_params(min_genes=6), executor="local", log=quiet)
    assert_nothing_written(output, before)


# ---------------------------------------------------------------------------------------------
# Cases found by these tests and fixed


def test_log1p_input_on_low_raw_counts_is_rejected(tmp_path: Path) -> None:
    source = write_h5ad(make_adata(np.minimum(count_matrix(), 20)), tmp_path / "low.h5ad")
    output = tmp_path / "cells"
    with pytest.raises(IngestError, match=r"look like raw counts; pass --input counts"):
        ingest(source, output, data_params(input="log1p"), executor="local", log=quiet)
    assert_nothing_written(output, None)


def duplicated_genes_10x_h5(folder: Path) -> Path:
    adata = anndata.read_h5ad(duplicated_genes(folder))
    return write_tenx_h5(adata, folder / "dup_genes.h5")


def duplicated_genes_10x_mtx(folder: Path) -> Path:
    adata = anndata.read_h5ad(duplicated_genes(folder))
    return write_10x_mtx(adata, folder / "dup_genes_mtx")


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(duplicated_genes_10x_h5, id="10x-h5"),
        pytest.param(duplicated_genes_10x_mtx, id="10x-mtx"),
    ],
)
def test_duplicated_gene_symbols_in_10x_input_are_reported(
    tmp_path: Path, build: Callable[[Path], Path]
) -> None:
    source = build(tmp_path)
    output = tmp_path / "cells"
    with pytest.raises(IngestError, match=r"duplicated gene symbols: 2 gene names .*G0003 \(x2\)"):
        ingest(source, output, data_params(label_key=""), executor="local", log=quiet)
    assert_nothing_written(output, None)


# ---------------------------------------------------------------------------------------------
# The command line


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "scbert_platform.cli", "ingest", *args]
    command += ["--params", str(tmp_path / "no-params.yaml"), "--executor", "local"]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_cli_exit_codes(tmp_path: Path, good_h5ad: Path) -> None:
    output = tmp_path / "cells"
    corrupt = run_cli(tmp_path, str(random_bytes(tmp_path)), "--out", str(output))
    assert corrupt.returncode == 2
    assert corrupt.stderr.startswith("scbert ingest: error: cannot read ")
    assert "corrupt.h5ad" in corrupt.stderr and "re-export" in corrupt.stderr
    assert not output.exists()

    nan = run_cli(tmp_path, str(with_value(np.nan)(tmp_path)), "--out", str(output))
    assert nan.returncode == 2
    last = nan.stderr.strip().splitlines()[-1]  # after the progress lines
    assert last.startswith("scbert ingest: error: 1 NaN/inf values"), nan.stderr
    assert "Traceback" not in nan.stderr
    assert not output.exists()

    ok = run_cli(
        tmp_path,
        str(good_h5ad),
        "--out",
        str(output),
        "--label-key",
        "cell_type",
        "--set",
        "data.min_genes=5",
        "--set",
        "data.panel_min_cells=1",
    )
    assert ok.returncode == 0, ok.stderr
    assert read_manifest(output)["cells"]["kept"] == N_CELLS
