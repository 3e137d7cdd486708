"""The HTTP API in this process, without Ray: ``make_api`` on a replica whose model, a tiny
checkpoint written here, came through the real loader that the replica was given.

Requests go to the FastAPI app through starlette's ``TestClient`` (in this process, no socket).
Every answer is checked against the response model of the route and against the route's
OpenAPI schema.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import build_model, tiny_config
from starlette.testclient import TestClient

GENES = [f"G{i}" for i in range(24)]
CLASSES = ["B", "NK", "T"]
UNKNOWN = ["NOT-A-GENE", "ALSO-NOT"]  # outside the panel: counted in coverage, ignored


def annotate(client: TestClient, body: Any, **kwargs: Any) -> Any:
    """POST /v1/annotate: bytes as they are, anything else as JSON."""
    if isinstance(body, bytes):
        return client.post("/v1/annotate", content=body, **kwargs)
    return client.post("/v1/annotate", json=body, **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scbert import save_pretrained

    model = build_model(tiny_config(n_classes=len(CLASSES), gene_embedding="learned"), seed=3)
    out = tmp_path_factory.mktemp("serve-routes") / "tiny"
    return save_pretrained(model, out, panel=GENES, classes=CLASSES)


@pytest.fixture(scope="module")
def loaded() -> list[Any]:
    """The sources the replica's loader was asked for."""
    return []


@pytest.fixture(scope="module")
def replica(checkpoint: Path, loaded: list[Any]) -> Any:
    from scbert_platform.infer.models import ModelSource, load_model
    from scbert_platform.params import ServeParams
    from scbert_serve.app import TOKEN_ENV, AnnotatorReplica, resolve_model

    def recording_loader(source: ModelSource) -> tuple[Any, list[str], list[str] | None]:
        loaded.append(source)
        return load_model(source)

    settings = ServeParams(top_k=2, max_cells_per_request=50, threshold=0.5)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(TOKEN_ENV, raising=False)
        return AnnotatorReplica(
            asdict(resolve_model(str(checkpoint))), asdict(settings), load_model=recording_loader
        )


@pytest.fixture(scope="module")
def client(replica: Any) -> Iterator[TestClient]:
    from scbert_serve.app import make_api

    with TestClient(make_api(replica)) as client:
        yield client


@pytest.fixture(scope="module")
def openapi(client: TestClient) -> dict[str, Any]:
    answer = client.get("/openapi.json")
    assert answer.status_code == 200
    return dict(answer.json())


def counts(n_cells: int, *, seed: int = 0) -> np.ndarray:
    """Raw counts (cells x GENES + UNKNOWN), about half of them zero; every cell expresses some
    panel genes."""
    rng = np.random.default_rng(seed)
    values = rng.poisson(4.0, size=(n_cells, len(GENES) + len(UNKNOWN)))
    values *= rng.random(values.shape) < 0.5
    values[:, 0] += 1
    return values


def sparse_body(values: np.ndarray, **options: Any) -> dict[str, Any]:
    genes = GENES + UNKNOWN
    cells = [
        {
            "id": f"c{row}",
            "genes": [genes[j] for j in np.flatnonzero(values[row])],
            "counts": [int(v) for v in values[row][values[row] > 0]],
        }
        for row in range(len(values))
    ]
    return {"cells": cells, **options}


def check_schema(openapi: dict[str, Any], method: str, path: str, answer: Any) -> None:
    """``answer``'s JSON is what the route's OpenAPI schema documents for its status, and no
    more: objects with listed properties may have no others."""
    import jsonschema

    documented = openapi["paths"][path][method.lower()]["responses"][str(answer.status_code)]
    schema = documented["content"]["application/json"]["schema"]
    components = copy.deepcopy(openapi["components"])
    for component in components["schemas"].values():
        if "properties" in component:
            component.setdefault("additionalProperties", False)
    jsonschema.validate(answer.json(), {**schema, "components": components})


def test_health_readiness_and_the_injected_loader(
    client: TestClient, checkpoint: Path, loaded: list[Any], openapi: dict[str, Any]
) -> None:
    from scbert_serve.schema import Health, Readiness

    health = client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.json() == {"status": "ready", "model": "tiny", "version": None}
    Health.model_validate(health.json())
    Readiness.model_validate(ready.json())
    check_schema(openapi, "GET", "/healthz", health)
    check_schema(openapi, "GET", "/readyz", ready)
    assert [source.uri for source in loaded] == [str(checkpoint.resolve())]  # once, by the replica


def test_model_info(client: TestClient, openapi: dict[str, Any]) -> None:
    from scbert_serve.schema import ModelInfo

    answer = client.get("/v1/model")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    info = ModelInfo.model_validate(answer.json())
    assert (info.name, info.version, info.alias) == ("tiny", None, None)
    assert (
        info.classes == CLASSES and info.panel_size == len(GENES) and len(info.panel_sha256) == 64
    )
    assert info.config["n_genes"] == len(GENES) and info.config["n_classes"] == len(CLASSES)
    assert (info.threshold, info.top_k, info.max_cells_per_request) == (0.5, 2, 50)
    assert info.max_json_depth == 32
    check_schema(openapi, "GET", "/v1/model", answer)


def test_annotate_json_cells(client: TestClient, openapi: dict[str, Any]) -> None:
    from scbert_serve.schema import AnnotateResponse

    values = counts(8)
    answer = annotate(client, sparse_body(values, top_k=3))
    assert answer.status_code == 200, answer.content
    check_schema(openapi, "POST", "/v1/annotate", answer)
    body = answer.json()
    response = AnnotateResponse.model_validate(body)
    assert response.model.model_dump() == {
        "name": "tiny",
        "version": None,
        "alias": None,
        "uri": response.model.uri,
    }
    named = (values > 0).any(axis=0)  # the sparse layout names a cell's non-zero genes
    matched = int(named[: len(GENES)].sum())
    assert response.coverage.model_dump() == {
        "panel_genes": len(GENES),
        "request_genes": int(named.sum()),
        "matched_genes": matched,
        "fraction": matched / len(GENES),
        "unknown_genes": int(named[len(GENES) :].sum()),
    }
    assert [cell.id for cell in response.cells] == [f"c{i}" for i in range(8)]
    for cell, row in zip(response.cells, values, strict=True):
        assert cell.n_genes == int((row[: len(GENES)] > 0).sum())
        probabilities = [entry.probability for entry in cell.top_k]
        assert len(cell.top_k) == 3 and sorted(probabilities, reverse=True) == probabilities
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)  # all 3 classes
        assert {entry.cell_type for entry in cell.top_k} == set(CLASSES)
        assert cell.probability == probabilities[0]
        if not cell.unassigned:
            assert cell.cell_type == cell.top_k[0].cell_type
    assert all("embedding" not in cell for cell in body["cells"])  # absent, not null

    default_k = annotate(client, sparse_body(values[:2])).json()
    assert [len(cell["top_k"]) for cell in default_k["cells"]] == [2, 2]  # serve.top_k

    embedded = annotate(client, sparse_body(values[:2], return_embedding=True))
    check_schema(openapi, "POST", "/v1/annotate", embedded)
    assert [len(cell["embedding"]) for cell in embedded.json()["cells"]] == [16, 16]  # dim


def test_every_layout_gets_the_same_answer(client: TestClient, tmp_path: Path) -> None:
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    values = counts(5, seed=1)
    genes = GENES + UNKNOWN
    ids = [f"c{i}" for i in range(5)]
    sparse = annotate(client, sparse_body(values)).json()
    dense = annotate(client, {"genes": genes, "matrix": values.tolist(), "ids": ids}).json()
    cells = anndata.AnnData(
        X=sp.csr_matrix(values.astype(np.float32)),
        obs=pd.DataFrame(index=ids),
        var=pd.DataFrame(index=genes),
    )
    cells.write_h5ad(tmp_path / "cells.h5ad")
    h5ad = annotate(
        client,
        (tmp_path / "cells.h5ad").read_bytes(),
        headers={"content-type": "application/x-hdf5"},
        params={"top_k": 2},
    )
    assert h5ad.status_code == 200, h5ad.content
    assert sparse["cells"] == dense["cells"] == h5ad.json()["cells"]
    assert dense["coverage"] == h5ad.json()["coverage"]  # every gene named, zeros included
    assert dense["coverage"]["request_genes"] == len(genes)


def test_unassigned_below_the_threshold(client: TestClient) -> None:
    body = sparse_body(counts(12, seed=2))
    everyone = annotate(client, {**body, "threshold": 0.0}).json()
    assert everyone["threshold"] == 0.0
    assert not any(cell["unassigned"] for cell in everyone["cells"])
    top = sorted({cell["probability"] for cell in everyone["cells"]})
    assert len(top) > 2, "a threshold between the cells' top probabilities needs them to differ"
    threshold = (top[len(top) // 2 - 1] + top[len(top) // 2]) / 2
    some = annotate(client, {**body, "threshold": threshold}).json()
    assert some["threshold"] == threshold
    for cell, reference in zip(some["cells"], everyone["cells"], strict=True):
        below = reference["probability"] < threshold
        assert cell["unassigned"] == below
        assert cell["cell_type"] == ("Unassigned" if below else reference["cell_type"])
        assert cell["top_k"] == reference["top_k"]  # the classes are listed all the same
    assert 0 < sum(cell["unassigned"] for cell in some["cells"]) < len(some["cells"])
    nobody = annotate(client, {**body, "threshold": 1.0}).json()
    assert {cell["cell_type"] for cell in nobody["cells"]} == {"Unassigned"}


BAD_REQUESTS: dict[str, tuple[Any, dict[str, str], int, str, str]] = {
    "not JSON": (b'{"cells": [', {}, 400, "malformed_json", "not valid JSON"),
    "empty body": (b"", {}, 400, "empty_body", "the body is empty"),
    "misspelt option": (
        {"cells": [{"id": "a", "counts": {"G1": 1}}], "thresold": 0.3},
        {},
        422,
        "invalid",
        "thresold: Extra inputs are not permitted",
    ),
    "count as text": (
        {"cells": [{"id": "a", "genes": ["G1"], "counts": ["3"]}]},
        {},
        422,
        "invalid",
        "cells.0.counts.0: Input should be a valid number",
    ),
    "no panel gene": (
        {"cells": [{"id": "a", "counts": {"NOT-A-GENE": 3}}]},
        {},
        422,
        "invalid_counts",
        "",
    ),
    "too many cells": (
        {"cells": [{"id": f"c{i}", "counts": {"G1": 1}} for i in range(51)]},
        {},
        413,
        "too_many_cells",
        "the limit is serve.max_cells_per_request = 50",
    ),
    "text body": (b"G1,G2\n1,2\n", {"content-type": "text/csv"}, 415, "unsupported_media_type", ""),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_the_error_body(
    client: TestClient, openapi: dict[str, Any], case: str
) -> None:
    from scbert_serve.schema import ErrorResponse

    body, headers, status, code, message = BAD_REQUESTS[case]
    answer = annotate(client, body, headers=dict(headers))
    assert answer.status_code == status, answer.content
    error = ErrorResponse.model_validate(answer.json()).error
    assert error.code == code and message in error.message
    check_schema(openapi, "POST", "/v1/annotate", answer)
    assert client.get("/healthz").status_code == 200  # and the replica goes on


def test_a_token_guards_v1_but_not_health(client: TestClient, replica: Any) -> None:
    replica.token = "s3cret"
    try:
        refused = client.get("/v1/model")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["code"] == "unauthorised"
        wrong = client.get("/v1/model", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (
            client.get("/v1/model", headers={"authorization": "Bearer s3cret"}).status_code == 200
        )
        assert client.get("/healthz").status_code == 200
    finally:
        replica.token = None


def test_the_schema_names_the_response_models(openapi: dict[str, Any]) -> None:
    def ok(method: str, path: str) -> str:
        content = openapi["paths"][path][method]["responses"]["200"]["content"]
        return str(content["application/json"]["schema"]["$ref"]).rsplit("/", 1)[-1]

    assert ok("post", "/v1/annotate") == "AnnotateResponse"
    assert ok("get", "/v1/model") == "ModelInfo"
    assert (ok("get", "/healthz"), ok("get", "/readyz")) == ("Health", "Readiness")
    cell = openapi["components"]["schemas"]["CellResult"]
    assert "embedding" in cell["properties"] and "embedding" not in cell["required"]
