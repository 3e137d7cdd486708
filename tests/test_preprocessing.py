"""The one preprocessing path (scbert_platform.data.preprocess) and the model's preprocessing
record: each step on small matrices, the record's round trips, a checkpoint without a record,
and a model trained on data ingested with a non-default target_sum giving the training-time
probabilities through the pyfunc, ``annotate`` and the registry."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import PBMC_PARAMS, build_model, tiny_config, tiny_params

from scbert_platform.data.preprocess import (
    PREPROCESSING_FILE,
    PUBLISHED_DEFAULTS,
    PreprocessError,
    Preprocessing,
    align,
    bin_tokens,
    check_counts,
    count_scale_deviation,
    invert_log1p,
    log_normalise,
    model_preprocessing,
    qc,
    raised_as,
    read_expression,
    recover_counts,
    tokens_from_counts,
)

GENES = [f"G{i}" for i in range(24)]


def cell_of(entry: int) -> str:
    return f"entry {entry}"


# ---------------------------------------------------------------------------------------------
# The steps


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, "NaN/inf"),
        (np.inf, "NaN/inf"),
        (-1.0, "negative values"),
        (0.5, "non-integer value 0.5"),
        (2.0**40, "larger than any count"),
    ],
)
def test_check_counts_names_the_rule_and_the_cell(value: float, message: str) -> None:
    x = sp.csr_matrix(np.array([[1.0, 2.0], [3.0, value]]))
    with pytest.raises(PreprocessError, match=message) as caught:
        check_counts(x, cell_of, hints={k: "HINT" for k in ("finite", "negative", "integer")})
    assert isinstance(caught.value, ValueError) and "entry 3" in str(caught.value)
    assert str(caught.value).endswith("HINT)") or str(caught.value).endswith("HINT")


def test_check_counts_allows_fractions_when_told() -> None:
    check_counts(sp.csr_matrix([[0.5, 2.0]]), cell_of, integers=False)


def test_invert_log1p_in_base_e_and_2_and_refuses_raw_counts() -> None:
    counts = sp.csr_matrix(np.array([[0.0, 1.0, 4.0], [2.5, 0.0, 0.0]]))
    for base, log in ((None, np.log1p), (2.0, lambda v: np.log1p(v) / np.log(2))):
        logged = counts.copy()
        logged.data = log(logged.data)
        np.testing.assert_allclose(invert_log1p(logged, base).toarray(), counts.toarray())
    with pytest.raises(PreprocessError, match="look like raw counts"):
        invert_log1p(sp.csr_matrix([[1.0, 3.0]]), None)


def test_read_expression_checks_then_inverts() -> None:
    x = read_expression(np.log1p([[0.0, 3.0]]), input="log1p", log_base=None)
    np.testing.assert_allclose(x.toarray(), [[0.0, 3.0]])
    with pytest.raises(PreprocessError, match="cell 'c2'"):
        read_expression([[1.0], [-2.0]], input="counts", log_base=None, cell_ids=["c1", "c2"])


def test_counts_recovered_from_scaled_values_exactly() -> None:
    counts = sp.csr_matrix(np.array([[1.0, 0.0, 7.0, 3.0], [0.0, 2.0, 1.0, 0.0]]))
    scaled = sp.csr_matrix(counts.multiply(np.array([[0.37], [12.5]])))
    assert count_scale_deviation(scaled) < 1e-12
    np.testing.assert_array_equal(recover_counts(scaled).toarray(), counts.toarray())
    noisy = scaled.copy()
    noisy.data = noisy.data * (1 + 0.2 * np.arange(noisy.nnz) / noisy.nnz)
    assert count_scale_deviation(noisy) > 0.01


def test_align_handles_missing_extra_and_shuffled_genes() -> None:
    from scbert_platform.data.panel import Panel

    panel = Panel(("A", "B", "C", "D"))
    genes = ["C", "X", "A"]  # shuffled, one unknown; B and D missing
    x = sp.csr_matrix(np.array([[1.0, 5.0, 2.0], [0.0, 9.0, 3.0]]))
    aligned = align(x, panel.positions(genes), len(panel))
    np.testing.assert_array_equal(aligned.toarray(), [[2, 0, 1, 0], [3, 0, 0, 0]])
    assert aligned.has_sorted_indices


def test_qc_drops_cells_with_few_genes_or_no_counts() -> None:
    low, empty = qc(np.array([250, 10, 200, 300]), np.array([5.0, 3.0, 0.0, 9.0]), 200)
    assert low.tolist() == [False, True, False, False]
    assert empty.tolist() == [False, False, True, False]


def test_log_normalise_scales_each_cell_to_target_sum_then_log2() -> None:
    x = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [0.0, 10.0, 10.0]]))
    for target in (1e4, 5000.0):
        values = log_normalise(x, target)
        assert values.dtype == np.float32 and values.nnz == x.nnz
        np.testing.assert_allclose((np.exp2(values.toarray()) - 1).sum(axis=1), target, rtol=1e-5)
    assert log_normalise(sp.csr_matrix((2, 3)), 1e4).nnz == 0


def test_bin_tokens_truncate_and_append_the_zero_position() -> None:
    values = sp.csr_matrix(np.array([[0.5, 1.7, 9.0], [0.0, 0.0, 0.0]], dtype=np.float32))
    tokens = bin_tokens(values, 5)
    assert tokens.tolist() == [[0, 1, 5, 0], [0, 0, 0, 0]]


def test_tokens_follow_the_records_target_sum() -> None:
    rng = np.random.default_rng(0)
    aligned = sp.csr_matrix(rng.poisson(0.8, size=(20, len(GENES))).astype(np.float64))
    # 20 bins: 24 genes' values reach log2(1e4 / 24) = 8.7, above the published 5 bins
    published = tokens_from_counts(aligned, Preprocessing.published(n_bins=20))
    half = tokens_from_counts(aligned, Preprocessing(target_sum=5000.0, n_bins=20))
    assert published.shape == (20, len(GENES) + 1)
    assert (published != half).any()  # the record's value reaches the tokens
    values = log_normalise(aligned, 5000.0)
    np.testing.assert_array_equal(half.numpy(), bin_tokens(values, 20).numpy())


def test_error_types_share_a_base_and_convert() -> None:
    from scbert_platform.data.errors import IngestError
    from scbert_platform.infer.annotation import AnnotationError

    assert issubclass(IngestError, PreprocessError) and issubclass(AnnotationError, ValueError)
    assert issubclass(AnnotationError, PreprocessError)
    assert not issubclass(AnnotationError, IngestError)
    with pytest.raises(AnnotationError, match="negative"), raised_as(AnnotationError):
        check_counts(sp.csr_matrix([[-1.0]]), cell_of)


# ---------------------------------------------------------------------------------------------
# The record


def test_record_round_trips_through_json_and_a_directory(tmp_path: Path) -> None:
    record = Preprocessing(
        input="log1p",
        target_sum=5000.0,
        n_bins=7,
        min_genes=150,
        panel_sha256="ab" * 32,
        gene_id_column="gene_ids",
    )
    assert Preprocessing.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    record.write(tmp_path)
    assert Preprocessing.read(tmp_path) == record
    assert Preprocessing.read(tmp_path / "nowhere") is None
    assert record.tags()["scbert.preprocessing.target_sum"] == "5000.0"
    assert record.tags()["scbert.preprocessing.gene_id_column"] == "gene_ids"
    with pytest.raises(PreprocessError, match="unknown keys \\['bins'\\]"):
        Preprocessing.from_dict(record.to_dict() | {"bins": 3})
    with pytest.raises(PreprocessError, match="target_sum"):
        Preprocessing(target_sum=0)
    (tmp_path / PREPROCESSING_FILE).write_text("{")
    with pytest.raises(PreprocessError, match="damaged"):
        Preprocessing.read(tmp_path)


def test_published_values() -> None:
    record = Preprocessing.published()
    assert (record.input, record.target_sum, record.log_base) == ("counts", 1e4, 2.0)
    assert (record.n_bins, record.min_genes, record.gene_id_column) == (5, 200, None)
    assert Preprocessing.published(n_bins=7).n_bins == 7


def test_record_from_this_and_older_manifests(pbmc_shards: Path) -> None:
    from scbert_platform.data.manifest import read_manifest

    manifest = read_manifest(pbmc_shards)
    record = Preprocessing.from_manifest(manifest, n_bins=5)
    assert record == Preprocessing(
        input="log1p", target_sum=1e4, n_bins=5, panel_sha256=manifest["panel"]["sha256"]
    )
    older = json.loads(json.dumps(manifest))
    for key in ("input", "target_sum", "log_base", "gene_id_column"):
        del older["preprocessing"][key]
    assert Preprocessing.from_manifest(older, n_bins=5) == record
    # before data.input, the source said input_normalized (a bool)
    for section in (older["source"], older["preprocessing"]["params"]):
        section["input_normalized"] = section.pop("input") == "log1p"
    assert Preprocessing.from_manifest(older, n_bins=5) == record
    older["source"]["input_normalized"] = False
    assert Preprocessing.from_manifest(older, n_bins=5).input == "counts"


def tiny_checkpoint(directory: Path, genes: list[str] = GENES) -> Path:
    from scbert import save_pretrained

    config = tiny_config(n_genes=len(genes), n_classes=3, gene_embedding="learned")
    save_pretrained(build_model(config), directory, panel=genes, classes=["B", "NK", "T"])
    return directory


def test_checkpoint_without_a_record_gets_the_published_values_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import anndata

    from scbert_platform.infer.annotation import annotate
    from scbert_platform.infer.models import load_model, resolve_model
    from scbert_platform.track.pyfunc import CHECKPOINT, ScBertAnnotator

    directory = tiny_checkpoint(tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="scbert_platform.data.preprocess"):
        loaded = load_model(resolve_model(str(directory)))
        load_model(resolve_model(str(directory)))
    assert loaded.preprocessing == Preprocessing.published(
        n_bins=5, panel_sha256=loaded.panel.sha256
    )
    assert loaded.preprocessing_source == PUBLISHED_DEFAULTS
    warnings = [r for r in caplog.records if PREPROCESSING_FILE in r.getMessage()]
    assert len(warnings) == 1 and "published values" in warnings[0].getMessage()

    annotator = ScBertAnnotator()
    annotator.load_context(type("Context", (), {"artifacts": {CHECKPOINT: str(directory)}})())
    assert annotator.preprocessing_source == PUBLISHED_DEFAULTS

    adata = anndata.AnnData(np.random.default_rng(0).poisson(2.0, (6, 24)).astype(np.float32))
    adata.var_names = GENES
    annotate(adata, model=loaded, progress=False)
    assert adata.uns["scbert"]["preprocessing_source"] == PUBLISHED_DEFAULTS
    assert adata.uns["scbert"]["preprocessing"]["target_sum"] == 1e4

    # with a record: it is used, and checked against the model
    Preprocessing(target_sum=5000.0, panel_sha256=loaded.panel.sha256).write(directory)
    again = load_model(resolve_model(str(directory)))
    assert (again.preprocessing.target_sum, again.preprocessing_source) == (5000.0, "model")
    Preprocessing(n_bins=7).write(directory)
    with pytest.raises(PreprocessError, match="n_bins=7"):
        model_preprocessing(directory, n_bins=5, panel_sha256=None)


# ---------------------------------------------------------------------------------------------
# A model trained on target_sum=5000 data: every inference path gives the training-time answer


@pytest.fixture(scope="module")
def shards_5000(tmp_path_factory: pytest.TempPathFactory, pbmc_h5ad: Path) -> Path:
    from scbert_platform.data.ingest import ingest
    from scbert_platform.params import DataParams

    out = tmp_path_factory.mktemp("cells") / "pbmc5000"
    params = DataParams(**PBMC_PARAMS, target_sum=5000.0)
    ingest(pbmc_h5ad, out, params, executor="local", log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, shards_5000: Path, _ray_shutdown_at_exit: None
) -> Any:
    """A tiny model fine-tuned a few steps on the target_sum=5000 shards, tracked in a fresh
    MLflow store (its root is ``workdir``)."""
    from scbert_platform.cluster import start_ray
    from scbert_platform.train.distributed import fit

    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(root)
        start_ray(num_cpus=2)
        params = tiny_params(root / "runs", max_steps=4, val_every=4, ckpt_every=4)
        result = fit("finetune", shards_5000, params, run_name="ft5000")
    return root, result


def training_time_probabilities(shards: Path, checkpoint: str) -> tuple[Any, np.ndarray]:
    """The model applied to the shards' tokens, as validation and test evaluation apply it."""
    import torch

    from scbert import load_pretrained
    from scbert_platform.data.loader import iter_local_batches
    from scbert_platform.track.pyfunc import shard_counts
    from scbert_platform.train.loop import predict

    bundle = load_pretrained(checkpoint)
    batches = iter_local_batches(shards, bundle.model.config.n_bins, batch_size=64)
    _, proba = predict(bundle.model, batches, device=torch.device("cpu"))
    counts, _ = shard_counts(shards, bundle.panel)  # the same cells, in the same order
    return counts, proba


@pytest.mark.ray
@pytest.mark.slow
def test_pyfunc_and_annotate_give_the_training_time_probabilities(
    trained: Any, shards_5000: Path
) -> None:
    import anndata
    import mlflow

    from scbert_platform.data.manifest import read_manifest
    from scbert_platform.infer.annotation import PROBABILITIES, annotate
    from scbert_platform.infer.models import load_model, resolve_model
    from scbert_platform.track.pyfunc import counts_to_tokens
    from scbert_platform.track.registry import register
    from scbert_platform.track.runs import registry_client, tracking_uri

    root, result = trained
    checkpoint = Path(result.checkpoint)
    manifest = read_manifest(shards_5000)
    assert manifest["preprocessing"]["target_sum"] == 5000.0
    record = Preprocessing.read(checkpoint)
    assert record == Preprocessing(
        input="log1p",
        target_sum=5000.0,
        n_bins=5,
        min_genes=200,
        panel_sha256=manifest["panel"]["sha256"],
    )
    counts, expected = training_time_probabilities(shards_5000, result.checkpoint)
    cells = counts.iloc[:64]
    expected = expected[:64]
    labels = load_model(resolve_model(str(checkpoint))).classes
    assert labels is not None
    columns = [f"p_{label}" for label in labels]

    with pytest.MonkeyPatch.context() as patch:
        # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI: an earlier test's store may be
        # in it (the fixture's undo restores it), so this store is named by its directory only
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(root)
        mlflow.set_tracking_uri(tracking_uri())
        out = mlflow.pyfunc.load_model(result.model_uri).predict(cells)
        moved = register(result.mlflow_run_id, name="scbert-pbmc5000")
        tags = registry_client().get_model_version("scbert-pbmc5000", moved.version).tags
    np.testing.assert_allclose(out[columns].to_numpy(), expected, atol=2e-6)
    assert tags["scbert.preprocessing.target_sum"] == "5000.0"
    assert tags["scbert.preprocessing.input"] == "log1p"
    assert tags["scbert.preprocessing.n_bins"] == "5"

    adata = anndata.AnnData(sp.csr_matrix(cells.to_numpy(np.float32)))
    adata.obs_names, adata.var_names = list(cells.index), list(cells.columns)
    annotate(adata, model=str(checkpoint), device="cpu", progress=False)
    assert adata.uns["scbert"]["preprocessing_source"] == "model"
    assert list(adata.uns["scbert"]["classes"]) == labels
    np.testing.assert_allclose(adata.obsm[PROBABILITIES], expected, atol=2e-6)

    # the test has teeth: the published 1e4 gives other tokens for these cells
    genes = list(cells.columns)
    published = counts_to_tokens(cells.to_numpy(), genes, genes, n_bins=5)
    ours = counts_to_tokens(cells.to_numpy(), genes, genes, preprocessing=record)
    assert (published != ours).any()


@pytest.mark.serve
@pytest.mark.ray
@pytest.mark.slow
def test_http_endpoint_gives_the_training_time_probabilities(
    trained: Any, shards_5000: Path
) -> None:
    """Run under ``flock /tmp/serve-tests.lock`` (Serve's fixed ports are shared)."""
    import socket

    import requests
    from ray import serve

    from scbert_platform.cluster import start_ray
    from scbert_platform.params import ServeParams
    from scbert_serve.app import run
    from scbert_serve.schema import sparse_cells

    _, result = trained
    counts, expected = training_time_probabilities(shards_5000, result.checkpoint)
    cells, expected = counts.iloc[:32], expected[:32]
    labels = json.loads((Path(result.checkpoint) / "labels.json").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    start_ray(num_cpus=2)
    params = ServeParams(model=result.checkpoint, port=port, max_replicas=1, replica_cpus=0.5)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("SCBERT_API_TOKEN", raising=False)
        url = run(params)
    try:
        body = {"cells": sparse_cells(cells), "top_k": len(labels)}
        r = requests.post(f"{url}/v1/annotate", json=body, timeout=120)
    finally:
        serve.shutdown()
    answered = r.json()["cells"] if r.status_code == 200 else pytest.fail(r.text)
    if [c["id"] for c in answered] != list(cells.index):
        pytest.fail("the cells came back in another order")
    proba = np.array(
        [
            [{t["cell_type"]: t["probability"] for t in c["top_k"]}[label] for label in labels]
            for c in answered
        ]
    )
    np.testing.assert_allclose(proba, expected, atol=2e-6)
