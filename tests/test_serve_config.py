"""Serving without a server: the application builder, Serve options from params, model
references, the request schema's translation into counts, and `scbert serve`'s refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, build_model, tiny_config
from pydantic import ValidationError

from scbert import save_pretrained
from scbert_platform.params import ParamsError, ServeParams


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    model = build_model(tiny_config(n_classes=3, gene_embedding="learned"))
    genes = [f"G{i}" for i in range(24)]
    return save_pretrained(model, tmp_path / "model", panel=genes, classes=["B", "NK", "T"])


def test_build_takes_the_serve_section_and_refuses_unknown_keys(checkpoint: Path) -> None:
    from ray.serve import Application

    from scbert_serve.app import build

    app = build({"model": str(checkpoint), "max_replicas": 3, "replica_gpus": 1})
    assert isinstance(app, Application)
    with pytest.raises(ParamsError, match=r"unknown parameter 'serve\.max_replica'"):
        build({"model": str(checkpoint), "max_replica": 3})
    with pytest.raises(ParamsError, match=r"serve\.port"):
        build({"model": str(checkpoint), "port": "eighty"})


def test_the_local_serve_config_builds(checkpoint: Path) -> None:
    import yaml
    from test_infra import serve_config_problems

    from scbert_serve.app import build

    config = yaml.safe_load((REPO_ROOT / "infra" / "serve" / "local.yaml").read_text())
    assert serve_config_problems(config) == []
    (app,) = config["applications"]
    assert app["import_path"] == "scbert_serve.app:build"
    assert config["http_options"]["port"] == app["args"]["port"]
    build({**app["args"], "model": str(checkpoint)})  # the demo's checkpoint may not exist yet


def test_deployment_options_follow_the_params(monkeypatch: pytest.MonkeyPatch) -> None:
    from scbert_serve.app import TOKEN_ENV, deployment_options

    gpu = deployment_options(ServeParams(replica_gpus=1, replica_cpus=2, max_replicas=4))
    assert gpu["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert gpu["autoscaling_config"]["max_replicas"] == 4
    assert gpu["autoscaling_config"]["target_ongoing_requests"] == 2.0
    cpu = deployment_options(ServeParams())
    assert "num_gpus" not in cpu["ray_actor_options"]
    with pytest.raises(ValueError, match="min_replicas"):
        deployment_options(ServeParams(min_replicas=3, max_replicas=2))
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    assert "runtime_env" not in deployment_options(ServeParams())  # builders never copy it
    forwarded = deployment_options(ServeParams(), forward_token=True)["ray_actor_options"]
    assert forwarded["runtime_env"] == {"env_vars": {TOKEN_ENV: "s3cret"}}


def test_model_references_are_checked(checkpoint: Path, workdir: Path) -> None:
    from scbert_serve.app import load_model, resolve_model

    source = resolve_model(str(checkpoint))
    assert (source.uri, source.name, source.version) == (str(checkpoint), "model", None)
    loaded = load_model(source)
    assert len(loaded.panel) == 24 and loaded.classes == ["B", "NK", "T"]
    assert not loaded.model.training
    with pytest.raises(ValueError, match="neither a registry URI"):
        resolve_model(str(workdir / "missing"))
    with pytest.raises(ValueError, match="name a version"):
        resolve_model("models:/scbert-x")
    with pytest.raises(ValueError, match="no version of 'scbert-x' has the alias 'champion'"):
        resolve_model("models:/scbert-x@champion")


def test_scbert_serve_refuses_a_bad_model_before_starting_ray(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    from scbert_platform.cli import main

    was_running = ray.is_initialized()
    assert main(["serve", "--model", "nowhere", "--params", "/dev/null"]) == 2
    assert "scbert serve: error: nowhere: neither a registry URI" in capsys.readouterr().err
    assert ray.is_initialized() == was_running


def test_sparse_and_dense_requests_become_the_same_counts() -> None:
    from scbert_serve.schema import AnnotateRequest

    sparse = AnnotateRequest.model_validate(
        {
            "cells": [
                {"id": "a", "genes": ["X", "Y"], "counts": [1, 2]},
                {"id": "b", "genes": ["Z", "X"], "counts": [5, 3]},
            ]
        }
    )
    counts, genes = sparse.counts()
    assert genes == ["X", "Y", "Z"] and sparse.cell_ids() == ["a", "b"]
    np.testing.assert_array_equal(counts.toarray(), [[1, 2, 0], [3, 0, 5]])
    mapped = AnnotateRequest.model_validate(
        {
            "cells": [
                {"id": "a", "counts": {"X": 1, "Y": 2}},
                {"id": "b", "counts": {"Z": 5, "X": 3}},
            ]
        }
    )
    assert mapped.counts()[1] == genes
    np.testing.assert_array_equal(mapped.counts()[0].toarray(), counts.toarray())
    dense = AnnotateRequest.model_validate(
        {"genes": ["X", "Y", "Z"], "matrix": [[1, 2, 0], [3, 0, 5]]}
    )
    np.testing.assert_array_equal(dense.counts()[0].toarray(), counts.toarray())
    assert dense.cell_ids() == ["cell-0", "cell-1"]
    with pytest.raises(ValidationError, match="'ids' goes with the dense layout"):
        AnnotateRequest.model_validate({"cells": sparse.model_dump()["cells"], "ids": ["a", "b"]})


def test_an_unexpected_failure_is_a_json_500_and_the_replica_goes_on(checkpoint: Path) -> None:
    import asyncio
    from dataclasses import asdict

    from starlette.requests import Request

    from scbert_serve.app import AnnotatorReplica, resolve_model

    replica = AnnotatorReplica(asdict(resolve_model(str(checkpoint))), asdict(ServeParams()))

    async def broken(request: Request) -> None:
        raise RuntimeError("a bug")

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/model",
        "headers": [],
        "query_string": b"",
    }
    response = asyncio.run(replica._handle("/v1/model", Request(scope, receive), broken))
    assert response.status_code == 500
    assert b"internal error (RuntimeError)" in response.body
    answered = asyncio.run(replica.model_info(Request(scope, receive)))
    assert answered.status_code == 200 and b'"classes":["B","NK","T"]' in answered.body


def test_json_depth_counts_brackets_outside_strings_only() -> None:
    from scbert_serve.schema import json_depth

    cases = {
        b"": 0,
        b"1": 0,
        b"[]": 1,
        b'{"a": [[1], {"b": []}]}': 4,
        b'["[[[", "\\"[[", "\\\\"]': 1,  # brackets in strings, escaped quotes and backslashes
        b'["\\\\", [[1]]]': 3,
        b'"no end [[[[': 0,  # json.loads stops at the unterminated string
        b"[" * 50_000: 50_000,
        b"[[]]]]][": 2,
    }
    assert {body: json_depth(body) for body in cases} == cases


def test_json_depth_is_the_parsers_own_depth() -> None:
    import json

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from scbert_serve.schema import json_depth

    def depth(value: object) -> int:
        if isinstance(value, list):
            return 1 + max(map(depth, value), default=0)
        if isinstance(value, dict):
            return 1 + max(map(depth, value.values()), default=0)
        return 0

    text = st.text(alphabet=st.sampled_from('[]{}"\\ab\n\u00e9\u2028'), max_size=6)
    values = st.recursive(
        st.none() | st.integers() | text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=30,
    )

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(values, st.booleans())
    def check(value: object, ascii_only: bool) -> None:
        body = json.dumps(value, ensure_ascii=ascii_only).encode()
        assert json_depth(body) == depth(value)

    check()


def test_json_sizes_are_held_to_the_limits_before_validation() -> None:
    from scbert_serve.schema import BodyLimits, RequestError, check_json_sizes

    limits = BodyLimits(max_cells=2, max_genes=3, max_decoded_bytes=0)
    check_json_sizes({"cells": [{"genes": ["a", "b"]}, {"counts": {"a": 1, "c": 2}}]}, limits)
    for body in ([1, 2, 3], {"cells": "x"}, {"cells": [1, {"genes": 5}]}):
        check_json_sizes(body, limits)  # not shaped like a request: left to validation
    refusals = {
        "3 cells in one request; the limit is serve.max_cells_per_request = 2": {
            "matrix": [[1]] * 3
        },
        "4 genes in one request; the limit is serve.max_genes = 3": {
            "cells": [{"genes": ["a", "b"]}, {"counts": {"c": 1, "d": 2}}]
        },
        "5 genes in one request": {"genes": ["a"], "matrix": [[1] * 5]},
        "the request has no cells": {"cells": []},
    }
    for message, body in refusals.items():
        with pytest.raises(RequestError, match=message):
            check_json_sizes(body, limits)


def test_counts_and_ids_are_strictly_typed() -> None:
    from scbert_serve.schema import AnnotateRequest

    for cell in (
        {"id": "a", "genes": ["X"], "counts": [True]},
        {"id": "a", "genes": ["X"], "counts": ["3"]},
        {"id": "a", "counts": {"X": False}},
        {"id": 1, "genes": ["X"], "counts": [1]},
    ):
        with pytest.raises(ValidationError, match="Input should be a valid"):
            AnnotateRequest.model_validate({"cells": [cell]})
    parsed = AnnotateRequest.model_validate({"cells": [{"id": "a", "counts": {"X": 2**40}}]})
    assert parsed.counts()[0].toarray().tolist() == [[2.0**40]]
