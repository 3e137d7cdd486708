"""The notebook API (``import scbert_platform.api as sb``): one import, a curated ``__all__``,
``model`` required, the expression options as one value, and the same answers as the modules
the CLI runs. Real pbmc68k cells, a small random-weight model on their panel."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import PBMC_PARAMS, build_model, tiny_config

import scbert_platform.api as sb


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, pbmc_shards: Path) -> Path:
    from scbert import save_pretrained
    from scbert_platform.data.loader import ShardInfo

    info = ShardInfo.read(pbmc_shards)
    config = tiny_config(
        n_genes=len(info.panel), n_classes=len(info.labels), gene_embedding="learned"
    )
    model = build_model(config, seed=2)
    with torch.no_grad():
        model.head.fc3.weight.mul_(60.0)  # confident: the Unassigned rule bites for some cells
    out = tmp_path_factory.mktemp("api") / "tiny"
    save_pretrained(model, out, panel=list(info.panel), classes=list(info.labels))
    return out


@pytest.fixture
def pbmc(pbmc_h5ad: Path) -> Any:
    """200 of the real cells: the API's answers are compared with the modules', not judged."""
    import anndata

    return anndata.read_h5ad(pbmc_h5ad)[:200].copy()


def test_one_import_names_what_a_notebook_needs() -> None:
    assert sorted(sb.__all__) == [
        "Expression",
        "LoadedModel",
        "annotate",
        "embed",
        "explain",
        "ingest",
        "load_model",
        "plot",
    ]
    assert all(hasattr(sb, name) for name in sb.__all__)
    for name in ("annotate", "embed", "explain"):  # model is named every time, never a default
        model = inspect.signature(getattr(sb, name)).parameters["model"]
        assert (
            model.default is inspect.Parameter.empty and model.kind is model.POSITIONAL_OR_KEYWORD
        )


def test_annotate_embed_explain_and_plot_from_one_loaded_model(
    pbmc: Any, model_dir: Path, tmp_path: Path
) -> None:
    from scbert_platform.infer.annotation import EMBEDDING, PROBABILITY
    from scbert_platform.infer.annotation import annotate as module_annotate

    model = sb.load_model(model_dir, device="cpu")
    assert isinstance(model, sb.LoadedModel) and model.classes and len(model.panel) == 765
    assert model.preprocessing_source == "published defaults"  # a checkpoint without a record

    raw_log1p = sb.Expression(use_raw=True, input="log1p")
    out = sb.annotate(pbmc, model, expression=raw_log1p, progress=False, copy=True)
    assert out is not pbmc and PROBABILITY in out.obs
    expected = module_annotate(
        pbmc.copy(), str(model_dir), use_raw=True, input="log1p", progress=False
    )
    np.testing.assert_allclose(out.obsm[EMBEDDING], expected.obsm[EMBEDDING], rtol=1e-5, atol=1e-6)
    assert list(out.obs[PROBABILITY]) == pytest.approx(list(expected.obs[PROBABILITY]), abs=1e-6)

    embedded = sb.embed(pbmc.copy(), model_dir, expression=raw_log1p, progress=False)
    assert embedded.obsm[EMBEDDING].shape[0] == pbmc.n_obs

    explanation = sb.explain(out, model, groupby="bulk_labels", top_n=3, progress=False)
    assert set(explanation.genes()) <= set(out.obs["bulk_labels"].astype(str))
    assert all(len(genes) == 3 for genes in explanation.genes().values())

    scores = sb.plot(out, tmp_path / "figures", label_key="bulk_labels", expression=raw_log1p)
    assert all(Path(f).is_file() for f in scores["files"])
    assert (tmp_path / "figures" / "umap.png").is_file()

    with pytest.raises(TypeError):
        sb.annotate(pbmc)  # type: ignore[call-arg]


def test_ingest_takes_data_params_by_name(pbmc_h5ad: Path, tmp_path: Path) -> None:
    report = sb.ingest(pbmc_h5ad, tmp_path / "cells", **PBMC_PARAMS)
    assert report.n_cells_kept == 693
    with pytest.raises(TypeError, match="unknown data parameters \\['min_gene'\\]"):
        sb.ingest(pbmc_h5ad, tmp_path / "other", min_gene=3)
