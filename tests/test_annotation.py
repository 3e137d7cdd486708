"""Offline annotation of AnnData (``scbert_platform.infer.annotation``), its figures and its CLI.

The real pbmc68k cells throughout, with a small random-weight model on their panel whose
classifier is made confident (so that cells get different types and the Unassigned rule bites).
What the model predicts is not judged here (tests/test_tutorial.py trains one); what is: the
same answer as the ingest + pyfunc pipeline, the same answer from every input layout and reading
path (counts, log1p, a layer, backed chunks, Ray Data workers), clear refusals of bad input, and
files a user can open.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import build_model, tiny_config

from scbert_platform.infer.annotation import (
    CELL_TYPE,
    EMBEDDING,
    MAJORITY_VOTE,
    PROBABILITY,
    AnnotationError,
    annotate,
    embed,
    predictions_table,
    write_h5ad,
)


@pytest.fixture(scope="module")
def panel_and_labels(pbmc_shards: Path) -> tuple[list[str], list[str]]:
    from scbert_platform.data.loader import ShardInfo

    info = ShardInfo.read(pbmc_shards)
    return list(info.panel), list(info.labels)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, panel_and_labels: Any) -> Path:
    from scbert import save_pretrained

    panel, classes = panel_and_labels  # the model's classes: the data's labels
    config = tiny_config(n_genes=len(panel), n_classes=len(classes), gene_embedding="learned")
    model = build_model(config, seed=1)
    with torch.no_grad():
        model.head.fc3.weight.mul_(60.0)  # confident: some cells above 0.5, some below
    out = tmp_path_factory.mktemp("model") / "tiny"
    save_pretrained(model, out, panel=panel, classes=classes)
    return out


@pytest.fixture
def pbmc(pbmc_h5ad: Path) -> Any:
    import anndata

    return anndata.read_h5ad(pbmc_h5ad)


@pytest.fixture(scope="module")
def counts(pbmc_shards: Path, panel_and_labels: Any) -> Any:
    """Integer counts of the 693 ingested cells (cells x panel DataFrame) and their obs."""
    from scbert_platform.track.pyfunc import shard_counts

    return shard_counts(pbmc_shards, panel_and_labels[0])


def counts_adata(data: Any, **layers: Any) -> Any:
    import anndata

    frame, obs = data
    adata = anndata.AnnData(sp.csr_matrix(frame.to_numpy(dtype=np.float32)), obs=obs.copy())
    adata.obs_names, adata.var_names = list(frame.index), list(frame.columns)
    for name, value in layers.items():
        adata.layers[name] = value
    return adata


def test_annotate_gives_the_pipelines_answer_on_real_cells(
    pbmc: Any, model_dir: Path, counts: Any
) -> None:
    from scbert import load_pretrained
    from scbert_platform.track.pyfunc import counts_to_tokens, predict_tokens

    assert pbmc.X.min() < 0 and pbmc.raw is not None  # scaled .X: .raw must be read
    out = annotate(pbmc, model=str(model_dir), progress=False)
    assert out is pbmc
    summary = pbmc.uns["scbert"]
    assert summary["input"] == {
        "matrix": "raw",
        "values": "log1p",
        "log_base": "e",
        "counts_recovered": "all",
    }
    assert (summary["genes_matched"], summary["panel_coverage"]) == (765, 1.0)
    assert summary["model"]["uri"] == str(model_dir) and summary["embedding"] == "classifier"
    assert summary["n_unassigned"] == int(pbmc.obs["scbert_unassigned"].sum())

    # the same cells through ingest's shards, the pyfunc's tokens and forward pass
    bundle = load_pretrained(model_dir)
    frame, _ = counts
    tokens = counts_to_tokens(
        frame.to_numpy(), list(frame.columns), bundle.panel, n_bins=bundle.model.config.n_bins
    )
    proba, hidden = predict_tokens(bundle.model.eval(), tokens, embedding="classifier")
    rows = pbmc.obs_names.get_indexer(frame.index)
    assert (rows >= 0).all() and len(rows) == 693
    np.testing.assert_allclose(pbmc.obsm["scbert_proba"][rows], proba, atol=2e-6)
    np.testing.assert_allclose(pbmc.obsm[EMBEDDING][rows], hidden, atol=2e-5)

    types = pbmc.obs[CELL_TYPE].astype(str)
    probability = pbmc.obs[PROBABILITY].to_numpy()
    np.testing.assert_allclose(probability, pbmc.obsm["scbert_proba"].max(axis=1))
    assert ((types == "Unassigned") == (probability < 0.5)).all()
    assert (pbmc.obs["scbert_unassigned"] == (probability < 0.5)).all()
    classes = np.asarray(summary["classes"])
    best = classes[pbmc.obsm["scbert_proba"].argmax(axis=1)]
    assert (types[probability >= 0.5] == best[probability >= 0.5]).all()
    assert 0 < (probability < 0.5).sum() < 700 and types.nunique() >= 3  # the test has teeth
    assert pbmc.obs[CELL_TYPE].dtype == "category"

    table = predictions_table(pbmc)
    assert list(table.columns[:3]) == [CELL_TYPE, PROBABILITY, "scbert_unassigned"]
    assert [c for c in table.columns if c.startswith("p_")] == [f"p_{c}" for c in classes]
    assert table.index.name == "cell_id" and len(table) == 700

    with pytest.raises(AnnotationError, match="threshold"):
        annotate(pbmc, model=str(model_dir), threshold=1.5)
    again = annotate(pbmc, model=str(model_dir), threshold=0.0, progress=False, copy=True)
    assert again is not pbmc and not again.obs["scbert_unassigned"].any()


def test_counts_log1p_layers_and_backed_files_agree(
    tmp_path: Path, model_dir: Path, counts: Any
) -> None:
    import anndata
    import scanpy as sc

    raw = counts_adata(counts)
    reference = annotate(raw.copy(), model=str(model_dir), progress=False)
    assert reference.uns["scbert"]["input"]["values"] == "counts"

    def same(other: Any) -> None:
        np.testing.assert_allclose(
            other.obsm["scbert_proba"], reference.obsm["scbert_proba"], atol=1e-5
        )
        assert (other.obs[CELL_TYPE].astype(str) == reference.obs[CELL_TYPE].astype(str)).all()

    logged = raw.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    same(annotate(logged, model=str(model_dir), progress=False))
    assert logged.uns["scbert"]["input"]["values"] == "log1p"

    layered = counts_adata(counts, counts=raw.X.copy())
    layered.X = logged.X
    same(annotate(layered, model=str(model_dir), layer="counts", progress=False))
    assert layered.uns["scbert"]["input"]["matrix"] == "layers/counts"

    # genes in another order, some panel genes missing, genes the panel does not know
    frame, obs = counts
    shuffled = frame[list(frame.columns[::-1][5:])].copy()
    shuffled[["NOT-A-GENE-1", "NOT-A-GENE-2"]] = 3.0
    partial = counts_adata((shuffled, obs))
    annotate(partial, model=str(model_dir), progress=False)
    assert partial.uns["scbert"]["genes_matched"] == len(frame.columns) - 5
    assert partial.uns["scbert"]["genes_in_input"] == len(frame.columns) - 3

    # a backed file, read 100 cells at a time; written back without loading the matrix
    path = tmp_path / "counts.h5ad"
    raw.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    annotate(backed, model=str(model_dir), chunk_cells=100, majority_vote=True, progress=False)
    same(backed)
    write_h5ad(backed, str(tmp_path / "out.h5ad"), source=str(path))
    backed.file.close()
    written = anndata.read_h5ad(tmp_path / "out.h5ad")
    same(written)
    assert (written.X != raw.X).nnz == 0 and MAJORITY_VOTE in written.obs
    assert written.uns["scbert"]["n_cells"] == 693


@pytest.mark.ray
def test_distributed_workers_give_the_local_answer(
    tmp_path: Path, model_dir: Path, counts: Any, ray_local: Any
) -> None:
    import anndata

    raw = counts_adata(counts)
    local = annotate(raw.copy(), model=str(model_dir), progress=False)
    spread = annotate(
        raw.copy(), model=str(model_dir), distributed=True, workers=2, chunk_cells=150
    )
    np.testing.assert_allclose(spread.obsm["scbert_proba"], local.obsm["scbert_proba"], atol=1e-6)
    np.testing.assert_allclose(spread.obsm[EMBEDDING], local.obsm[EMBEDDING], atol=1e-5)
    assert (spread.obs["scbert_n_genes"] == local.obs["scbert_n_genes"]).all()

    path = tmp_path / "counts.h5ad"  # backed: the workers read their chunks from the file
    raw.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    annotate(backed, model=str(model_dir), distributed=True, workers=2, chunk_cells=300)
    np.testing.assert_allclose(backed.obsm["scbert_proba"], local.obsm["scbert_proba"], atol=1e-6)
    backed.file.close()

    broken = raw.copy()  # bad input on a worker surfaces as the same clear error
    broken.X.data[broken.X.indptr[600]] = 0.5
    with pytest.raises(AnnotationError, match=r"non-integer value 0.5 in cell"):
        annotate(broken, model=str(model_dir), input="counts", distributed=True, chunk_cells=300)


def _small(counts: Any, n: int = 20) -> Any:
    frame, obs = counts
    return counts_adata((frame.iloc[:n], obs.iloc[:n]))


def _keep(adata: Any) -> None:
    """No change to the AnnData: the options are what is wrong."""


BAD_INPUT = {
    "scaled .X and no .raw": (
        lambda a: setattr(a, "X", a.X.toarray() - 1.0),
        {},
        r"negative values.*use_raw=True or layer='counts'",
    ),
    "duplicated genes": (
        lambda a: setattr(a, "var_names", [a.var_names[0]] * 2 + list(a.var_names[2:])),
        {},
        r"duplicated gene names.*var_names_make_unique",
    ),
    "no panel gene": (
        lambda a: setattr(a, "var_names", [f"ENSG{i:011d}" for i in range(a.n_vars)]),
        {},
        r"none of the 765 genes.*gene_id_column=",
    ),
    "NaN": (lambda a: a.X.data.__setitem__(0, np.nan), {}, r"NaN/inf values"),
    "normalised, not logged": (
        lambda a: setattr(a, "X", a.X * 7.3),
        {},
        r"too large for log1p.*normalised counts without the log",
    ),
    "log1p asked of counts": (_keep, {"input": "log1p"}, r"look like raw counts.*input='counts'"),
    "fractional counts": (
        lambda a: a.X.data.__setitem__(0, 0.5),
        {"input": "counts"},
        r"non-integer value 0.5 in cell .*input='log1p'",
    ),
    "missing layer": (_keep, {"layer": "spliced"}, r"no layer 'spliced'"),
    "no .raw": (_keep, {"use_raw": True}, r"no \.raw"),
    "layer and raw": (_keep, {"layer": "x", "use_raw": True}, r"either layer or use_raw"),
    "missing gene column": (_keep, {"gene_id_column": "symbol"}, r"var has no column 'symbol'"),
    "bad input kind": (_keep, {"input": "tpm"}, r"input must be"),
    "bad embedding": (_keep, {"embedding": "pca"}, r"embedding must be"),
    "zero batch": (_keep, {"batch_size": 0}, r"batch_size and chunk_cells must be >= 1"),
    "majority vote on a missing column": (
        _keep,
        {"over_clustering": "leiden", "majority_vote": True},
        r"over_clustering names no obs column: 'leiden'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_with_a_clear_message(case: str, counts: Any, model_dir: Path) -> None:
    change, options, message = BAD_INPUT[case]
    adata = _small(counts)
    change(adata)
    with pytest.raises(AnnotationError, match=message):
        annotate(adata, model=str(model_dir), progress=False, **options)


def test_model_references_and_pretraining_checkpoints(
    tmp_path: Path, counts: Any, panel_and_labels: Any
) -> None:
    from scbert import save_pretrained
    from scbert_platform.track.pyfunc import counts_to_tokens

    panel, _ = panel_and_labels
    model = build_model(tiny_config(n_genes=len(panel), gene_embedding="learned"), seed=2).eval()
    save_pretrained(model, tmp_path / "pre", panel=panel)
    adata = _small(counts)
    embed(adata, model=str(tmp_path / "pre"), progress=False)
    assert adata.uns["scbert"]["embedding"] == "encoder" and CELL_TYPE not in adata.obs
    tokens = counts_to_tokens(adata.X, list(adata.var_names), panel, n_bins=5)
    with torch.no_grad():
        expected = model.embed_cells(tokens).numpy()
    np.testing.assert_allclose(adata.obsm[EMBEDDING], expected, atol=1e-5)

    with pytest.raises(ValueError, match=r"pretraining checkpoint.*fine-tuned"):
        annotate(adata, model=str(tmp_path / "pre"))
    with pytest.raises(AnnotationError, match="embedding='classifier' needs a fine-tuned"):
        embed(adata, model=str(tmp_path / "pre"), embedding="classifier")
    with pytest.raises(ValueError, match="neither a registry URI"):
        annotate(adata, model=str(tmp_path / "missing"))


def test_majority_vote_within_clusters(pbmc: Any, model_dir: Path) -> None:
    annotate(
        pbmc, model=str(model_dir), majority_vote=True, over_clustering="louvain", progress=False
    )
    predicted = pbmc.obs[CELL_TYPE].astype(str)
    for cluster, members in pbmc.obs.groupby("louvain", observed=True).groups.items():
        votes = set(pbmc.obs.loc[members, MAJORITY_VOTE].astype(str))
        assert votes == {predicted[members].value_counts().index[0]}, cluster
    annotate(pbmc, model=str(model_dir), over_clustering="louvain", min_prop=1.0, progress=False)
    unanimous = predicted.groupby(pbmc.obs["louvain"], observed=True).nunique() == 1
    heterogeneous = pbmc.obs[MAJORITY_VOTE].astype(str) == "Heterogeneous"
    assert (heterogeneous == ~pbmc.obs["louvain"].map(unanimous).astype(bool)).all()

    annotate(pbmc, model=str(model_dir), majority_vote=True, progress=False)  # own over-clustering
    n_clusters = pbmc.obs["scbert_over_clustering"].nunique()
    assert n_clusters > pbmc.obs["bulk_labels"].nunique()  # over-clustered: finer than the types
    assert pbmc.uns["scbert"]["majority_vote"]["over_clustering"] == "scbert_over_clustering"


def _png(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not blank
    return image


def test_figures_and_scores_logged_to_the_active_run(
    pbmc: Any, model_dir: Path, workdir: Path
) -> None:
    import mlflow
    from sklearn.metrics import adjusted_rand_score

    from scbert_platform.infer.plots import write_plots
    from scbert_platform.track.runs import experiment_id, registry_client

    annotate(pbmc, model=str(model_dir), progress=False)
    with mlflow.start_run(experiment_id=experiment_id("scbert-annotate")) as run:
        scores = write_plots(pbmc, workdir / "plots", label_key="bulk_labels")
    assert scores["logged_to_mlflow"]
    logged = {Path(a.path).name for a in registry_client().list_artifacts(run.info.run_id, "plots")}
    assert logged == {"umap.png", "confusion.png", "probability.png", "scores.json"}
    for name in ("umap.png", "confusion.png", "probability.png"):
        _png(workdir / "plots" / name)
    assert json.loads((workdir / "plots" / "scores.json").read_text())["n_labels"] == 10

    labels = pbmc.obs["bulk_labels"].astype(str)
    assert scores["embedding"]["ari"] == pytest.approx(
        adjusted_rand_score(labels, pbmc.obs["scbert_leiden"])
    )
    assert abs(scores["embedding"]["n_clusters"] - 10) <= 2
    assert abs(scores["expression"]["n_clusters"] - 10) <= 2
    assert 0.2 < scores["expression"]["ari"] < 1.0  # the expression itself knows the types
    assert scores["accuracy"] == pytest.approx((pbmc.obs[CELL_TYPE].astype(str) == labels).mean())
    assert "X_scbert_umap" in pbmc.obsm and "X_umap" in pbmc.obsm  # the user's UMAP is kept

    annotate(pbmc, model=str(model_dir), progress=False)  # a new embedding: derived work dropped
    assert "scbert_neighbors" not in pbmc.uns and "X_scbert_umap" not in pbmc.obsm
    assert "scbert_leiden" not in pbmc.obs and "X_umap" in pbmc.obsm

    # no run active: nothing logged, files still written
    again = write_plots(pbmc, workdir / "plain")
    assert not again["logged_to_mlflow"] and not (workdir / "plain" / "confusion.png").exists()


def test_explain_averages_attention_by_type(pbmc: Any, model_dir: Path, tmp_path: Path) -> None:
    from scbert import load_pretrained
    from scbert_platform.infer.annotation import LoadedModel, chunk_tokens, expression_input
    from scbert_platform.infer.explanation import explain, write_explanation

    explanation = explain(
        pbmc, model=str(model_dir), groupby="bulk_labels", top_n=4, min_cells=15, progress=False
    )
    sizes = pbmc.obs["bulk_labels"].value_counts()
    assert explanation.n_cells == {k: int(v) for k, v in sizes.items() if v >= 15}

    # by hand: every cell's attention sums, averaged over one type
    loaded = LoadedModel.load(str(model_dir), device="cpu")
    found, matrix = expression_input(pbmc)
    positions = loaded.panel.positions(list(found.genes))
    tokens, _, _ = chunk_tokens(
        found, lambda a, b: matrix[a:b], 0, 700, positions, len(loaded.panel), 5
    )
    sums = load_pretrained(model_dir).model.eval().attention_sums(tokens).numpy()
    dendritic = (pbmc.obs["bulk_labels"] == "Dendritic").to_numpy()
    np.testing.assert_allclose(
        explanation.attention.loc["Dendritic"].to_numpy(), sums[dendritic].mean(axis=0), rtol=1e-4
    )
    top = explanation.top[explanation.top["cell_type"] == "Dendritic"]
    assert list(top["gene"]) == list(
        explanation.attention.loc["Dendritic"].sort_values(ascending=False).index[:4]
    )
    assert list(top["rank"]) == [1, 2, 3, 4]

    files = write_explanation(explanation, tmp_path / "explain")
    names = {f.name for f in files}
    assert {"top_genes.csv", "top_genes.gmt", "genes_Dendritic.txt"} <= names
    gmt = (tmp_path / "explain" / "top_genes.gmt").read_text().splitlines()
    assert len(gmt) == len(explanation.n_cells) and all(len(r.split("\t")) == 2 + 4 for r in gmt)
    _png(tmp_path / "explain" / "attention_heatmap.png")
    _png(tmp_path / "explain" / "expression_dotplot.png")

    specific = explain(
        pbmc, model=str(model_dir), groupby="bulk_labels", top_n=4, rank_by="specificity",
        min_cells=15, progress=False,
    )  # fmt: skip
    assert (specific.top.groupby("cell_type")["specificity"].min() > 0).all()
    with pytest.raises(AnnotationError, match="run annotate first"):
        explain(pbmc.copy(), model=str(model_dir))


def test_cli_annotate_embed_explain(
    tmp_path: Path, pbmc_h5ad: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import anndata
    import pandas as pd

    from scbert_platform.cli import main

    out = tmp_path / "annotated.h5ad"
    code = main(
        [
            "annotate", str(pbmc_h5ad), "-m", str(model_dir), "-o", str(out),
            "--csv", str(tmp_path / "predictions.csv"), "--majority-vote", "--quiet",
            "--plots", str(tmp_path / "plots"), "--label-key", "bulk_labels",
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["plots"]["n_labels"] == 10 and sum(summary["cell_types"].values()) == 700
    adata = anndata.read_h5ad(out)
    assert {CELL_TYPE, PROBABILITY, MAJORITY_VOTE} <= set(adata.obs.columns)
    assert adata.obsm[EMBEDDING].shape == (700, 8)  # the tiny classifier's last hidden layer
    assert "X_scbert_umap" in adata.obsm and "scbert_leiden" in adata.obs  # the plots' work kept
    table = pd.read_csv(tmp_path / "predictions.csv", index_col="cell_id")
    assert (table[CELL_TYPE] == adata.obs[CELL_TYPE].astype(str)).all()
    assert (tmp_path / "plots" / "umap.png").is_file()

    embed_args = ["-o", str(tmp_path / "e.h5ad"), "--embedding", "encoder"]
    embed_args += ["--npy", str(tmp_path / "e.npy"), "--quiet"]
    assert main(["embed", str(pbmc_h5ad), "-m", str(model_dir), *embed_args]) == 0
    assert np.load(tmp_path / "e.npy").shape == (700, 16)
    capsys.readouterr()

    assert main(["explain", str(out), "-m", str(model_dir), "--out", str(tmp_path / "x"),
                 "--top-n", "3", "--quiet"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == adata.obs[CELL_TYPE].value_counts().ge(5).sum()  # predicted types
    assert (tmp_path / "x" / "expression_dotplot.png").is_file()

    assert (
        main(["annotate", str(tmp_path / "nope.h5ad"), "-m", str(model_dir), "-o", "o.h5ad"]) == 2
    )
    assert "no such file" in capsys.readouterr().err
    assert (
        main(["annotate", str(pbmc_h5ad), "-m", str(tmp_path), "-o", str(tmp_path / "o.h5ad")]) == 2
    )
    assert "neither a registry URI" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()
