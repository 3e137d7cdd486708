"""Gene vectors from co-expression: planted modules recovered, text round trip, bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from scbert.embedding import load_gene2vec_text
from scbert_platform.data.gene_embed import (
    learn_gene_embeddings,
    main,
    ppmi_,
    truncated_svd,
    write_gene2vec_text,
)
from scbert_platform.data.synthetic import make_synthetic

N_TYPES, MODULE_SIZE = 4, 10


def write_shards(adata: ad.AnnData, directory: Path, *, n_shards: int = 2) -> Path:
    """The layout of ``scbert ingest``: normalise to 1e4, log2(1 + x), non-zeros per cell."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = adata.X.tocsr().astype(np.float64)
    scale = 1e4 / np.maximum(counts.sum(axis=1).A1, 1)
    normalised = counts.multiply(scale[:, None]).tocsr()
    normalised.data = np.log2(1 + normalised.data)
    labels = adata.obs["cell_type"].astype(str).tolist()
    bounds = np.linspace(0, adata.n_obs, n_shards + 1).astype(int)
    index_types = [pa.int32(), pa.uint16()]  # ingest may write either
    for shard, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        rows = [normalised[i] for i in range(lo, hi)]
        table = pa.table(
            {
                "cell_id": pa.array(list(adata.obs_names[lo:hi]), pa.string()),
                "label": pa.array(labels[lo:hi], pa.string()),
                "gene_idx": pa.array([r.indices for r in rows], pa.list_(index_types[shard % 2])),
                "value": pa.array(
                    [r.data.astype(np.float32) for r in rows], pa.list_(pa.float32())
                ),
                "n_counts": pa.array(counts[lo:hi].sum(axis=1).A1, pa.float64()),
                "n_genes": pa.array([r.nnz for r in rows], pa.int32()),
                "fold": pa.array(np.arange(lo, hi) % 5, pa.int8()),
            }
        )
        pq.write_table(table, directory / f"part-{shard:05d}.parquet")
    genes = list(adata.var_names)
    (directory / "panel.txt").write_text("\n".join(genes) + "\n", encoding="utf-8")
    manifest = {"panel": {"genes": genes, "n_genes": len(genes)}}
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def planted() -> ad.AnnData:
    return make_synthetic(
        1_500, 120, n_types=N_TYPES, module_size=MODULE_SIZE, mean_genes_per_cell=30, seed=7
    )


@pytest.fixture(scope="module")
def shards(planted: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(planted, tmp_path_factory.mktemp("cells") / "synthetic")


def cosine(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit @ unit.T


@pytest.mark.parametrize("weighting", ["binary", "value"])
def test_planted_modules_are_close(planted: ad.AnnData, shards: Path, weighting: str) -> None:
    genes, vectors = learn_gene_embeddings(
        shards,
        dim=16,
        min_cells=1,
        weighting=weighting,
        progress=False,  # type: ignore[arg-type]
    )
    assert genes == list(planted.var_names)
    assert vectors.shape == (120, 16) and vectors.dtype == np.float32
    module = planted.var["module"].to_numpy()
    marker = module >= 0
    sim = cosine(vectors[marker])
    same = module[marker][:, None] == module[marker][None, :]
    off_diagonal = ~np.eye(marker.sum(), dtype=bool)
    within = sim[same & off_diagonal].mean()
    between = sim[~same].mean()
    assert within > between + 0.4, (within, between)


def test_same_seed_same_vectors(shards: Path) -> None:
    _, first = learn_gene_embeddings(shards, dim=8, min_cells=1, progress=False)
    _, second = learn_gene_embeddings(shards, dim=8, min_cells=1, progress=False)
    np.testing.assert_array_equal(first, second)


def test_text_round_trip(shards: Path, tmp_path: Path) -> None:
    genes, vectors = learn_gene_embeddings(shards, dim=16, min_cells=1, progress=False)
    path = write_gene2vec_text(tmp_path / "gene2vec.txt", genes, vectors)
    first = path.read_text(encoding="utf-8").splitlines()[0].split()
    assert first[0] == genes[0] and len(first) == 17  # no header line
    shuffled = genes[::-1]
    loaded = load_gene2vec_text(path, shuffled)
    np.testing.assert_array_equal(loaded.numpy(), vectors[::-1])
    assert [p.name for p in tmp_path.iterdir()] == ["gene2vec.txt"]


def test_never_expressed_and_rare_genes_get_zero_vectors(
    planted: ad.AnnData, tmp_path: Path
) -> None:
    adata = planted.copy()
    counts = adata.X.tolil()
    counts[:, 0] = 0  # never expressed
    counts[:, 1] = 0
    counts[:2, 1] = 5  # expressed in 2 cells
    adata.X = counts.tocsr()
    directory = write_shards(adata, tmp_path / "cells")
    with pytest.warns(UserWarning) as record:
        _, vectors = learn_gene_embeddings(directory, dim=8, min_cells=3, progress=False)
    messages = " ".join(str(w.message) for w in record)
    assert "never expressed" in messages and "fewer than min_cells=3" in messages
    assert not vectors[:2].any()
    assert vectors[2:].any(axis=1).all()


def test_small_panel_is_padded(planted: ad.AnnData, tmp_path: Path) -> None:
    directory = write_shards(planted[:, :12].copy(), tmp_path / "cells", n_shards=1)
    with pytest.warns(UserWarning, match="fewer than dim=16"):
        _, vectors = learn_gene_embeddings(directory, dim=16, min_cells=1, progress=False)
    assert vectors.shape == (12, 16)
    assert not vectors[:, 12:].any() and vectors[:, :12].any()


def test_ppmi_matches_the_formula() -> None:
    cooc = np.array(
        [[7.0, 4.0, 1.0, 0.0], [4.0, 9.0, 1.0, 2.0], [1.0, 1.0, 3.0, 0.0], [0, 2, 0, 0]]
    )
    off = cooc * (1 - np.eye(4))  # a gene is not its own context
    total = off.sum()
    p_joint, p_gene = off / total, off.sum(axis=1) / total
    smoothed = off.sum(axis=0) ** 0.75
    with np.errstate(divide="ignore"):
        expected = np.maximum(0, np.log(p_joint / np.outer(p_gene, smoothed / smoothed.sum())))
    result = ppmi_(torch.tensor(cooc, dtype=torch.float32), alpha=0.75)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_randomized_svd_matches_exact() -> None:
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(300, 12, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(300, 12, generator=generator))[0]
    spectrum = torch.linspace(10, 1, 12)
    matrix = left * spectrum @ right.T + 1e-3 * torch.randn(300, 300, generator=generator)
    u, s = truncated_svd(matrix, 8, exact_up_to=0)
    u_exact, s_exact = truncated_svd(matrix, 8)
    torch.testing.assert_close(s, s_exact, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close((u.T @ u_exact).abs().diagonal(), torch.ones(8), atol=1e-3, rtol=0)


def test_missing_inputs_are_clear_errors(tmp_path: Path, shards: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        learn_gene_embeddings(tmp_path / "nowhere", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no Parquet shards"):
        learn_gene_embeddings(empty, progress=False)
    no_panel = tmp_path / "no_panel"
    no_panel.mkdir()
    (no_panel / "part-00000.parquet").write_bytes((shards / "part-00000.parquet").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"panel\.txt"):
        learn_gene_embeddings(no_panel, progress=False)
    (no_panel / "panel.txt").write_text("GENE00001\nGENE00002\n", encoding="utf-8")
    with pytest.raises(ValueError, match="outside the 2-gene panel"):
        learn_gene_embeddings(no_panel, progress=False)


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not match"):
        write_gene2vec_text(tmp_path / "a.txt", ["A", "B"], np.zeros((3, 4)))
    with pytest.raises(ValueError, match="whitespace"):
        write_gene2vec_text(tmp_path / "a.txt", ["A", "B C"], np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        write_gene2vec_text(tmp_path / "a.txt", ["A", "B"], np.full((2, 4), np.nan))
    assert not list(tmp_path.iterdir())


def test_cli(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g2v.txt"
    assert main([str(shards), "--out", str(out), "--dim", "8", "--min-cells", "1"]) == 0
    assert "shard 2/2" in capsys.readouterr().err
    assert load_gene2vec_text(out, [f"GENE{i:05d}" for i in range(1, 121)]).shape == (120, 8)
    assert main([str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_min_cells_above_every_gene_is_an_error(shards: Path) -> None:
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="min_cells"):
        learn_gene_embeddings(shards, dim=8, min_cells=100_000, progress=False)
