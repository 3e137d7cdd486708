"""The annotation service for real: Ray Serve on 127.0.0.1, the model from the MLflow registry,
real pbmc68k cells as HTTP requests, bearer auth, bad input, a fuzzer, Prometheus metrics,
autoscaling from 1 to 2 replicas and back, and a model swap under load without a failed request.

One Serve application serves the whole module (starting one takes seconds); the tests run in
file order, the swap last. Every client is bounded in requests and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from conftest import finetuned_run

pytestmark = [pytest.mark.serve, pytest.mark.ray, pytest.mark.slow]

TOKEN = "test-token-0123456789"
MODEL = "scbert-pbmc-serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """The deployed app: its URL, an authorised session, the params and the test data."""

    def __init__(self, url: str, params: Any, counts: Any, obs: Any, root: Path):
        self.url, self.params, self.root = url, params, root
        self.counts, self.obs = counts, obs  # cells x panel raw counts; label and fold
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {TOKEN}"

    def post(self, body: Any = None, **kwargs: Any) -> requests.Response:
        if body is not None:
            kwargs["json"] = body
        return self.session.post(f"{self.url}/v1/annotate", timeout=60, **kwargs)

    def sparse(self, rows: slice, **options: Any) -> dict[str, Any]:
        from scbert_serve.schema import sparse_cells

        return {"cells": sparse_cells(self.counts.iloc[rows]), **options}


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, pbmc_shards: Path, _ray_shutdown_at_exit: None
) -> Iterator[Service]:
    from ray import serve

    from scbert_platform.cluster import start_ray
    from scbert_platform.data.loader import ShardInfo
    from scbert_platform.params import ServeParams
    from scbert_platform.track.pyfunc import shard_counts
    from scbert_platform.track.registry import promote, register
    from scbert_serve.app import run

    root = tmp_path_factory.mktemp("serve")
    info = ShardInfo.read(pbmc_shards)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("SCBERT_API_TOKEN", TOKEN)
        patch.chdir(root)
        run_id = finetuned_run(root, 0.5, seed=0, genes=info.panel, classes=info.labels)
        register(run_id, name=MODEL)
        promote(MODEL)
        start_ray(num_cpus=2)
        params = ServeParams(
            model=f"models:/{MODEL}@champion",
            port=free_port(),
            min_replicas=1,
            max_replicas=2,
            target_ongoing_requests=1.0,
            upscale_delay_s=1.0,
            downscale_delay_s=2.0,
            look_back_period_s=11.0,
            replica_cpus=0.5,
            max_cells_per_request=200,
            max_body_mb=2.0,
            max_genes=1000,  # the panel has 765
            max_decoded_mb=2.0,  # 200 x 765 float32 .h5ad with its chunk buffer: 1.3 MiB
        )
        url = run(params)  # forwards SCBERT_API_TOKEN to the replicas
        counts, obs = shard_counts(pbmc_shards, info.panel, n_cells=200)
        try:
            yield Service(url, params, counts, obs, root)
        finally:
            serve.shutdown()


def test_the_service_and_its_ray_listen_on_loopback_only(service: Service) -> None:
    """The HTTP proxy (serve.host), the controller, the replicas and the local Ray under them
    (this process's descendants): no listening socket on an address other than loopback, and
    Ray's node address is loopback. (The same during a sweep, sampled each second while its Ray
    Train runs go: tests/test_tune.py.)"""
    import ray
    from conftest import listeners, off_loopback

    assert service.post(service.sparse(slice(0, 5))).status_code == 200  # replicas are up
    found = listeners()
    assert off_loopback(found) == [] and len(found) >= 10
    assert ray.util.get_node_ip_address() == "127.0.0.1"


def test_annotate_matches_the_pyfunc_on_real_cells_in_every_layout(service: Service) -> None:
    import anndata
    import mlflow
    import scipy.sparse as sp

    r = service.post(service.sparse(slice(0, 40), top_k=3, return_embedding=True))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {
        "name": MODEL,
        "version": "1",
        "alias": "champion",
        "uri": f"models:/{MODEL}/1",
    }
    assert body["coverage"]["panel_genes"] == 765 and body["coverage"]["unknown_genes"] == 0
    cells = body["cells"]
    assert [c["id"] for c in cells] == list(service.counts.index[:40])
    assert all(len(c["top_k"]) == 3 and len(c["embedding"]) == 16 for c in cells)
    assert all(
        c["n_genes"] == int((row > 0).sum())
        for c, (_, row) in zip(cells, service.counts.iloc[:40].iterrows(), strict=True)
    )

    # the same counts through the registered pyfunc in this process (ingest's functions)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(service.root)
        from scbert_platform.track.runs import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        expected = mlflow.pyfunc.load_model(f"models:/{MODEL}/1").predict(service.counts.iloc[:40])
    assert [c["cell_type"] for c in cells] == expected["cell_type"].tolist()
    np.testing.assert_allclose(
        [c["probability"] for c in cells], expected["probability"], atol=2e-6
    )
    for cell, (_, row) in zip(cells, expected.iterrows(), strict=True):
        top = cell["top_k"][0]
        assert row[f"p_{top['cell_type']}"] == pytest.approx(top["probability"], abs=2e-6)

    # dense JSON and an .h5ad body give the same answer; options as query parameters for .h5ad
    frame = service.counts.iloc[:40]
    dense = service.post(
        {
            "genes": list(frame.columns),
            "matrix": frame.to_numpy().tolist(),
            "ids": list(frame.index),
        }
    ).json()["cells"]
    adata = anndata.AnnData(sp.csr_matrix(frame.to_numpy(np.float32)))
    adata.obs_names, adata.var_names = list(frame.index), list(frame.columns)
    adata.write_h5ad(service.root / "request.h5ad")
    h5ad = service.post(
        data=(service.root / "request.h5ad").read_bytes(),
        headers={"Content-Type": "application/x-hdf5"},
        params={"top_k": "1"},
    ).json()["cells"]
    for a, b, c in zip(cells, dense, h5ad, strict=True):
        assert a["cell_type"] == b["cell_type"] == c["cell_type"]
        assert a["probability"] == pytest.approx(c["probability"], abs=1e-6)
        assert len(c["top_k"]) == 1

    # the threshold decides Unassigned (random weights: top probabilities well below 1)
    strict = service.post(service.sparse(slice(0, 40), threshold=1.0)).json()["cells"]
    assert all(c["unassigned"] and c["cell_type"] == "Unassigned" for c in strict)
    lenient = service.post(service.sparse(slice(0, 40), threshold=0.0)).json()["cells"]
    assert not any(c["unassigned"] for c in lenient)


def test_model_health_and_openapi(service: Service) -> None:
    info = service.session.get(f"{service.url}/v1/model", timeout=10).json()
    assert (info["name"], info["version"], info["alias"]) == (MODEL, "1", "champion")
    assert info["panel_size"] == 765 and len(info["panel_sha256"]) == 64
    assert len(info["classes"]) == 10 and info["config"]["n_genes"] == 765
    limits = ("max_cells_per_request", "max_genes", "max_decoded_bytes", "max_json_depth")
    assert [info[key] for key in limits] == [200, 1000, 2 * 2**20, 32]
    assert requests.get(f"{service.url}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{service.url}/readyz", timeout=10).json()["status"] == "ready"
    schema = requests.get(f"{service.url}/openapi.json", timeout=10).json()
    assert {"/v1/annotate", "/v1/model", "/healthz", "/readyz"} <= set(schema["paths"])
    body = schema["paths"]["/v1/annotate"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-hdf5"} <= set(body)
    request = schema["components"]["schemas"]["AnnotateRequest"]
    assert request["additionalProperties"] is False
    assert {"cells", "genes", "matrix", "threshold", "top_k"} <= set(request["properties"])


def test_bearer_token_is_required_but_healthz_stays_open(service: Service) -> None:
    body = service.sparse(slice(0, 1))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = requests.post(f"{service.url}/v1/annotate", json=body, headers=headers, timeout=10)
        assert r.status_code == 401, r.text
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorised"
    assert requests.get(f"{service.url}/v1/model", timeout=10).status_code == 401
    assert requests.get(f"{service.url}/healthz", timeout=10).status_code == 200
    assert service.post(body).status_code == 200


def cell(genes: Any = ("CD3E",), counts: Any = (3,), cell_id: Any = "c1") -> dict[str, Any]:
    return {"id": cell_id, "genes": list(genes), "counts": list(counts)}


BAD: dict[str, tuple[Any, int, str]] = {
    "malformed JSON": (b'{"cells": [', 400, "not valid JSON"),
    "empty body": (b"", 400, "body is empty"),
    "not an object": ([1, 2], 422, "valid dictionary"),
    "empty cell list": ({"cells": []}, 422, "no cells"),
    "both layouts": ({"cells": [cell()], "genes": ["CD3E"], "matrix": [[1]]}, 422, "either"),
    "neither layout": ({"threshold": 0.5}, 422, "either"),
    "counts not numbers": ({"cells": [cell(counts=["x"])]}, 422, "cells.0.counts.0"),
    "negative count": ({"cells": [cell(counts=[-1])]}, 422, "greater than or equal to 0"),
    "NaN count": (b'{"cells":[{"id":"c","genes":["CD3E"],"counts":[NaN]}]}', 422, "finite"),
    "inf count": (b'{"cells":[{"id":"c","genes":["CD3E"],"counts":[Infinity]}]}', 422, "finite"),
    "huge count": ({"cells": [cell(counts=[1e300])]}, 422, "larger than any count"),
    "fractional count": (
        {"cells": [cell(counts=[2.5])]},
        422,
        "non-integer value 2.5 in cell 'c1'",
    ),
    "map and genes": (
        {"cells": [{"id": "c", "genes": ["CD3E"], "counts": {"CD3E": 1}}]},
        422,
        "so 'genes' must be left out",
    ),
    "lengths differ": ({"cells": [cell(counts=[1, 2])]}, 422, "1 genes but 2 counts"),
    "no panel gene": ({"cells": [cell(genes=["NOT-A-GENE"])]}, 422, "none of the 1 input genes"),
    "duplicated gene": (
        {"cells": [cell(genes=["CD3E", "CD3E"], counts=[1, 2])]},
        422,
        "duplicated genes",
    ),
    "duplicated cell id": ({"cells": [cell(), cell()]}, 422, "duplicated cell ids"),
    "unknown field": ({"cells": [cell()], "thresold": 0.3}, 422, "thresold: Extra inputs"),
    "unknown cell field": ({"cells": [{**cell(), "tissue": "blood"}]}, 422, "tissue"),
    "threshold out of range": ({"cells": [cell()], "threshold": 2}, 422, "threshold"),
    "ragged matrix": ({"genes": ["CD3E", "MS4A1"], "matrix": [[1, 2], [3]]}, 422, "row 1 has 1"),
    "too many cells": (
        {"cells": [cell(cell_id=f"c{i}") for i in range(201)]},
        413,
        "201 cells in one request; the limit is serve.max_cells_per_request = 200",
    ),
    "body too large": (b"{" + b" " * (3 * 2**20) + b"}", 413, "over"),
    "nested 50,000 deep": (b"[" * 50_000, 400, "nests 50000 levels deep; the limit is 32"),
    "nested objects": (b'{"cells":' * 40 + b"1" + b"}" * 40, 400, "the limit is 32"),
    "not UTF-8": (b'{"cells": [{"id": "\xff"}]}', 400, "not valid JSON (UTF-8)"),
    "lone surrogate": (b'{"cells": [], "\\ud800": 1}', 400, "surrogates not allowed"),
    "boolean count": (
        {"cells": [cell(genes=["CD3E", "MS4A1"], counts=[True, 2])]},
        422,
        "cells.0.counts.0: Input should be a valid number",
    ),
    "count as text": ({"cells": [cell(counts=["3"])]}, 422, "cells.0.counts.0: Input should be"),
    "boolean in a counts map": (
        {"cells": [{"id": "c", "counts": {"CD3E": True}}]},
        422,
        "cells.0.counts.0: Input should be a valid number",
    ),
    "boolean in the matrix": (
        {"genes": ["CD3E"], "matrix": [[False]]},
        422,
        "matrix.0.0: Input should be a valid number",
    ),
    "number as id": (
        {"cells": [cell(cell_id=7)]},
        422,
        "cells.0.id: Input should be a valid string",
    ),
    "ids of numbers": (
        {"genes": ["CD3E"], "matrix": [[1]], "ids": [1]},
        422,
        "ids.0: Input should be a valid string",
    ),
    "threshold true": ({"cells": [cell()], "threshold": True}, 422, "threshold: Input should be"),
    "top_k as text": ({"cells": [cell()], "top_k": "3"}, 422, "top_k: Input should be"),
    "gene name too long": (
        {"cells": [cell(genes=["G" * 201])]},
        422,
        "cells.0.genes.0: String should have at most 200 characters",
    ),
    "too many genes in a cell": (
        {"cells": [cell(genes=[f"G{i}" for i in range(1001)], counts=[1] * 1001)]},
        413,
        "1001 genes in one request; the limit is serve.max_genes = 1000",
    ),
    "too many genes across cells": (
        {
            "cells": [
                cell(genes=[f"G{i}" for i in range(k, k + 600)], counts=[1] * 600, cell_id=f"c{k}")
                for k in (0, 600)
            ]
        },
        413,
        "serve.max_genes = 1000",
    ),
    "too many matrix columns": (
        {"genes": ["CD3E"], "matrix": [[1] * 1001]},
        413,
        "1001 genes in one request; the limit is serve.max_genes = 1000",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_naming_the_problem(service: Service, case: str) -> None:
    body, status, fragment = BAD[case]
    if isinstance(body, bytes):
        r = service.post(data=body, headers={"Content-Type": "application/json"})
    else:
        r = service.post(body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"], r.text


def test_other_content_types_and_broken_h5ad_are_refused_and_the_replica_keeps_serving(
    service: Service,
) -> None:
    r = service.post(data=b"a,b\n1,2\n", headers={"Content-Type": "text/csv"})
    assert r.status_code == 415 and "application/x-hdf5" in r.json()["error"]["message"]
    r = service.post(data=b"not hdf5", headers={"Content-Type": "application/x-hdf5"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_h5ad"
    r = service.post(data=b"x", headers={"Content-Type": "application/x-hdf5"}, params={"k": 1})
    assert r.status_code in (400, 422)
    assert service.post(service.sparse(slice(0, 5))).status_code == 200


def test_brackets_inside_strings_are_not_nesting(service: Service) -> None:
    body = service.sparse(slice(0, 2))
    body["cells"][0]["id"] = "[{" * 100
    r = service.post(body)
    assert r.status_code == 200, r.text
    assert r.json()["cells"][0]["id"] == "[{" * 100


def crafted_h5ad_cases() -> dict[str, tuple[Any, int, str, str]]:
    """.h5ad bodies that declare more than the service's limits (max_cells_per_request 200,
    max_genes 1000, max_decoded_mb 2), or what it never reads: (body, status, code, fragment)."""
    from test_h5ad_body import HUGE_DENSE, Crafted

    return {
        "5000 x 200000 dense X": (HUGE_DENSE, 413, "too_many_cells", "5000 cells"),
        "too many genes": (
            Crafted(n_cells=10, n_genes=200_000, written=False),
            413,
            "too_many_genes",
            "200000 genes in one request; the limit is serve.max_genes = 1000",
        ),
        "dense X decoding over the limit": (
            Crafted(n_cells=200, n_genes=1000, dtype="float64", chunks=(200, 1000), written=False),
            413,
            "too_large_decoded",
            "the limit is serve.max_decoded_mb = 2",
        ),
        "huge sparse nnz": (
            Crafted(
                n_cells=200,
                n_genes=1000,
                encoding="csr_matrix",
                dtype="float64",
                nnz=200_000,
                written=False,
            ),
            413,
            "too_large_decoded",
            "X (csr_matrix of 200 x 1000)",
        ),
        "external link": (
            Crafted(edits=("X external link",)),
            422,
            "unsupported_h5ad",
            "external link",
        ),
        "virtual dataset": (Crafted(edits=("X virtual",)), 422, "unsupported_h5ad", "virtual"),
        "string X": (Crafted(dtype="str"), 422, "unsupported_h5ad", "X holds text"),
        "no X": (Crafted(edits=("drop X",)), 422, "invalid_h5ad", "no 'X'"),
        "no var": (Crafted(edits=("drop var",)), 422, "invalid_h5ad", "no 'var' (the gene names)"),
        "indices out of range": (
            Crafted(encoding="csr_matrix", edits=("X indices out of range",)),
            422,
            "invalid_h5ad",
            "could not be read",
        ),
    }


@pytest.mark.parametrize("case", list(crafted_h5ad_cases()))
def test_crafted_h5ad_bodies_get_a_4xx_naming_the_limit(service: Service, case: str) -> None:
    crafted, status, code, fragment = crafted_h5ad_cases()[case]
    body = crafted.body()
    assert len(body) < 2**20  # a small body, whatever it declares
    r = service.post(data=body, headers={"Content-Type": "application/x-hdf5"})
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert fragment in r.json()["error"]["message"], r.text
    assert service.post(service.sparse(slice(0, 2))).status_code == 200


def test_fuzzed_requests_never_get_a_5xx(service: Service) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from test_h5ad_body import crafted_bodies

    genes = [*service.counts.columns[:30], "", "NOT-A-GENE", "cd3e"]
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
    )
    anything = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )
    count = st.one_of(
        st.integers(-3, 1000), st.floats(allow_nan=True, allow_infinity=True), anything
    )
    sparse_cell = st.fixed_dictionaries(
        {
            "id": st.one_of(st.text(max_size=10), anything),
            "genes": st.one_of(st.lists(st.sampled_from(genes), max_size=6), anything),
            "counts": st.one_of(st.lists(count, max_size=6), anything),
        },
        optional={"extra": anything},
    )
    options = {
        "threshold": st.one_of(st.floats(-1, 2), anything),
        "top_k": st.one_of(st.integers(-2, 200), anything),
        "return_embedding": st.one_of(st.booleans(), anything),
    }
    sparse = st.fixed_dictionaries(
        {"cells": st.one_of(st.lists(sparse_cell, max_size=4), anything)}, optional=options
    )
    dense = st.fixed_dictionaries(
        {
            "genes": st.one_of(st.lists(st.sampled_from(genes), max_size=5), anything),
            "matrix": st.one_of(st.lists(st.lists(count, max_size=5), max_size=3), anything),
        },
        optional={"ids": anything, **options},
    )
    panel_genes = st.lists(st.sampled_from(genes[:30]), unique=True, min_size=1, max_size=6)
    well_formed_cell = panel_genes.flatmap(
        lambda gs: st.fixed_dictionaries(
            {
                "genes": st.just(gs),
                "counts": st.lists(
                    st.one_of(st.integers(0, 10_000), st.integers(0, 2**62)),
                    min_size=len(gs),
                    max_size=len(gs),
                ),
            }
        )
    )
    well_formed = st.fixed_dictionaries(
        {
            "cells": st.lists(well_formed_cell, min_size=1, max_size=4).map(
                lambda cells: [{"id": f"c{i}", **c} for i, c in enumerate(cells)]
            )
        },
        optional=options,
    )
    as_json = st.one_of(well_formed, sparse, dense, anything).map(
        lambda body: ("application/json", json.dumps(body, allow_nan=True).encode())
    )
    crafted = crafted_bodies(tuple(service.counts.columns), max_cells=40).map(
        lambda case: ("application/x-hdf5", case.body())
    )
    stop_at = time.monotonic() + 300  # a cap on the whole run: later examples are not sent

    def fuzz(bodies: Any, max_examples: int) -> set[int]:
        seen: list[int] = []

        @settings(
            max_examples=max_examples,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(bodies)
        def check(body: tuple[str, bytes]) -> None:
            if time.monotonic() > stop_at:
                return
            kind, data = body
            r = service.post(data=data, headers={"Content-Type": kind})
            seen.append(r.status_code)
            assert r.status_code < 500, (kind, data[:300], r.text)
            if r.status_code != 200:
                assert r.json()["error"]["message"], r.text

        check()
        assert 0 < len(seen) <= max_examples
        return set(seen)

    assert {200, 422} <= fuzz(as_json, 150)
    assert {200, 400, 422} <= fuzz(nested_json(), 40)
    assert {200, 400, 413, 422} <= fuzz(oversized_json(), 40)
    assert {200, 400, 413, 422} <= fuzz(crafted, 80)
    assert service.post(service.sparse(slice(0, 5))).status_code == 200


CLOSERS = {b"[": b"]", b'{"a":': b"}", b'{"cells":[': b"]}", b'[{"id":': b"}]"}


def nested_json() -> Any:
    """JSON bodies nested up to 60,000 levels (closed or not), or the same brackets inside a
    string (a well-formed request)."""
    from hypothesis import strategies as st

    def body(opener: bytes, depth: int, closed: bool, quoted: bool) -> tuple[str, bytes]:
        nest = opener * depth + (b"1" + CLOSERS[opener] * depth if closed else b"")
        if quoted:
            text = json.dumps(nest.decode()).encode()
            nest = b'{"cells": [{"id": ' + text + b', "genes": ["CD3E"], "counts": [1]}]}'
        return "application/json", nest

    depths = st.integers(1, 60) | st.integers(1, 60_000)
    return st.builds(body, st.sampled_from(list(CLOSERS)), depths, st.booleans(), st.booleans())


def oversized_json() -> Any:
    """Bodies over a limit or close to it: many cells, many genes, long names, many keys, long
    numbers, a counts map of many genes."""
    from hypothesis import strategies as st

    def cells(n: int) -> bytes:
        return json.dumps({"cells": [cell(cell_id=f"c{i}") for i in range(n)]}).encode()

    def genes(n: int) -> bytes:
        return json.dumps({"cells": [cell([f"G{i}" for i in range(n)], [1] * n)]}).encode()

    def counts_map(n: int) -> bytes:
        return json.dumps(
            {"cells": [{"id": "c", "counts": {f"G{i}": 1 for i in range(n)}}]}
        ).encode()

    def name(n: int) -> bytes:
        return json.dumps({"cells": [cell(cell_id="c" * n)]}).encode()

    def keys(n: int) -> bytes:
        return json.dumps({"cells": [cell()], **{f"k{i}": i for i in range(n)}}).encode()

    def digits(n: int) -> bytes:
        return b'{"cells": [{"id": "c", "genes": ["CD3E"], "counts": [' + b"9" * n + b"]}]}"

    makers = [
        (cells, st.integers(150, 400)),
        (genes, st.integers(900, 1200)),
        (counts_map, st.integers(900, 1200)),
        (name, st.integers(150, 200_000)),
        (keys, st.integers(1, 2000)),
        (digits, st.integers(1, 10_000) | st.integers(4000, 10_000)),  # json: 4300 at most
    ]
    return st.one_of([st.builds(make, size) for make, size in makers]).map(
        lambda data: ("application/json", data)
    )


def scrape(port: int, until: Callable[[str], bool], timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if until(text):
            return text
        time.sleep(1.0)
    raise AssertionError(f"metrics did not appear in {timeout} s; last scrape:\n{text[-3000:]}")


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        tags = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if all(tags.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_metrics_are_scraped(service: Service) -> None:
    from scbert_serve.app import metrics_port

    annotated = service.post(service.sparse(slice(0, 30), threshold=1.0))
    assert annotated.status_code == 200
    text = scrape(
        metrics_port(),
        lambda t: (
            sample(t, "ray_scbert_unassigned_total", model_version="1") >= 30
            and sample(t, "ray_scbert_requests_total", status="422") > 0
            # a gauge set once per replica: exported at Ray's next metrics report, maybe later
            and sample(t, "ray_scbert_model_info", model_name=MODEL, model_version="1") >= 1
        ),
    )
    assert sample(text, "ray_scbert_requests_total", route="/v1/annotate", status="200") >= 3
    assert sample(text, "ray_scbert_requests_total", status="401") >= 1
    assert sample(text, "ray_scbert_request_latency_seconds_count", route="/v1/annotate") >= 3
    assert sample(text, "ray_scbert_cells_annotated_total", model_version="1") >= 30
    assert sample(text, "ray_scbert_predicted_total", cell_type="Unassigned") >= 30
    assert sample(text, "ray_scbert_batch_cells_count", model_version="1") >= 3
    assert sample(text, "ray_scbert_batch_requests_sum", model_version="1") >= 3
    assert sample(text, "ray_scbert_model_info", model_name=MODEL, model_version="1") >= 1


def test_the_model_info_gauge_is_set_again_while_the_replica_lives() -> None:
    """Ray's metrics agent drops a gauge value not set again within ~2 export intervals (15-20 s
    here) and a replica does not re-export an unchanged one: the replica keeps setting it."""
    from scbert_serve.metrics import keep_setting

    calls: list[tuple[float, dict[str, str]]] = []

    class Gauge:
        def set(self, value: float, tags: dict[str, str]) -> None:
            calls.append((value, tags))

    stop = threading.Event()
    tags = {"model_name": MODEL, "model_version": "1"}
    every = {"every": 0.01, "stop": stop}
    worker = threading.Thread(target=keep_setting, args=(Gauge(), tags), kwargs=every)
    worker.start()
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    worker.join(timeout=5)
    assert not worker.is_alive()  # it stops when told
    assert len(calls) >= 3 and all(call == (1, tags) for call in calls)


class Load:
    """A bounded closed-loop client: ``threads`` loops posting ``body`` until stopped (or
    ``max_seconds``); records each status and the model version that answered."""

    def __init__(
        self,
        service: Service,
        body: dict[str, Any],
        *,
        threads: int,
        max_seconds: float,
        client: Any = None,
    ):
        """``client``: a ``scbert_serve.client.Client`` (retries) instead of bare requests."""
        self.service, self.body, self.max_seconds = service, body, max_seconds
        self.client = client
        self.stop = threading.Event()
        self.results: list[tuple[int, str | None]] = []
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        deadline = time.monotonic() + self.max_seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                if self.client is not None:
                    r = self.client.post("/v1/annotate", json=self.body, timeout=60)
                else:
                    r = session.post(f"{self.service.url}/v1/annotate", json=self.body, timeout=60)
                version = r.json()["model"]["version"] if r.status_code == 200 else None
                self.results.append((r.status_code, version))
            except Exception as err:  # a client's ServiceUnavailable, a connection error
                self.results.append((0, repr(err)))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


def annotator_pids() -> list[int]:
    """The annotator replicas' processes in this test's Ray (another Ray on the machine may run
    a replica of the same name): Ray titles each actor's process with its class, and names each
    worker's log in the session's folder after its process id."""
    from scbert_platform.cluster import session_logs

    logs = session_logs()
    assert logs is not None
    ours = {int(p.stem.rsplit("_", 1)[1]) for p in logs.glob("python-core-worker-*_*.log")}
    pids = []
    for pid in sorted(ours):
        with contextlib.suppress(OSError):
            if REPLICA_TITLE in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


REPLICA_TITLE = b"ServeReplica:scbert:ScBertAnnotator"


def test_a_killed_replica_costs_the_client_no_request(service: Service) -> None:
    """SIGKILL of the replica under load: requests in flight get 503 + Retry-After from the
    proxy (scbert_serve.proxy), never a bare 500; the client retries them, and none fails."""
    from scbert_serve.app import replica_counts
    from scbert_serve.client import Client

    client = Client(service.url, token=TOKEN, deadline_s=90)
    with Load(
        service, service.sparse(slice(0, 20)), threads=3, max_seconds=150, client=client
    ) as load:
        wait_for(lambda: len(load.results) >= 6, 60, "6 requests answered before the kill")
        killed = annotator_pids()
        assert killed, "no replica process found"
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        at_kill, start = len(load.results), time.monotonic()
        recovery = wait_for(
            lambda: (
                replica_counts().get("RUNNING", 0) >= 1
                and bool(set(annotator_pids()) - set(killed))
            ),
            120,
            "a new replica",
        )
        wait_for(lambda: len(load.results) >= at_kill + 6, 60, "6 requests answered after it")
        waited = time.monotonic() - start
    wait_for(lambda: replica_counts() == {"RUNNING": 1}, 120, "back to 1 replica")
    failed = [r for r in load.results if r[0] != 200]
    print(
        f"replica kill: {len(load.results)} requests of 20 cells from 3 clients, "
        f"{len(failed)} failed as the client saw them, {client.log.retries} retried "
        f"({client.log.by_reason}); a new replica RUNNING {recovery:.1f} s after the kill; "
        f"{len(load.results) - at_kill} answered in the {waited:.1f} s after it"
    )
    assert not failed, failed[:5]
    assert client.log.retries >= 1 and "HTTP 500" not in client.log.by_reason


def test_replicas_scale_from_one_to_two_under_load_and_back(service: Service) -> None:
    from scbert_serve.app import replica_counts

    assert replica_counts().get("RUNNING") == 1
    with Load(service, service.sparse(slice(0, 100)), threads=6, max_seconds=120) as load:
        wait_for(lambda: replica_counts().get("RUNNING") == 2, 100, "scale up to 2 replicas")
    assert load.results and all(status == 200 for status, _ in load.results)
    wait_for(lambda: replica_counts() == {"RUNNING": 1}, 120, "scale back down to 1 replica")


def test_a_promoted_model_replaces_the_replicas_without_a_failed_request(service: Service) -> None:
    from scbert_platform.track.registry import promote, register
    from scbert_serve.app import run

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(service.root)
        patch.setenv("SCBERT_API_TOKEN", TOKEN)
        info_panel = list(service.counts.columns)
        classes = service.session.get(f"{service.url}/v1/model", timeout=10).json()["classes"]
        run_id = finetuned_run(service.root, 0.6, seed=1, genes=info_panel, classes=classes)
        assert register(run_id, name=MODEL).version == "2"
        promote(MODEL)
        with Load(service, service.sparse(slice(0, 5)), threads=2, max_seconds=120) as load:
            time.sleep(1.0)
            run(service.params)  # resolves champion -> version 2: a rolling update
            wait_for(
                lambda: (
                    bool(load.results)
                    and load.results[-1][1] == "2"
                    and service.session.get(f"{service.url}/v1/model", timeout=10).json()["version"]
                    == "2"
                ),
                90,
                "version 2 answers",
            )
            time.sleep(2.0)
    statuses = [status for status, _ in load.results]
    versions = [version for _, version in load.results]
    assert statuses and set(statuses) == {200}, [r for r in load.results if r[0] != 200][:5]
    assert versions[0] == "1" and versions[-1] == "2"
