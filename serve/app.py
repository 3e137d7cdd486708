"""The annotation service: a FastAPI app on a loaded model, run by a Ray Serve deployment.

Routes: ``POST /v1/annotate`` (JSON cells or an ``.h5ad`` body), ``GET /v1/model``,
``GET /healthz`` (always open), ``GET /readyz``, and FastAPI's ``/docs`` and ``/openapi.json``.

- The model is resolved once, where the application is built: ``models:/NAME@ALIAS`` becomes the
  concrete ``models:/NAME/VERSION``, so deploying again after ``scbert promote`` changes the
  deployment's arguments and Serve swaps the replicas one by one while the old ones keep serving.
- Requests are aligned to the panel, checked, normalised and binned by the one preprocessing
  path (``pyfunc.aligned_counts``, ``preprocess.tokens_from_counts``) with the values of the
  model's own ``Preprocessing`` record; concurrent requests are merged into one model call by
  ``@serve.batch``; bf16 autocast (and TF32 matmuls) on a GPU.
- Bad input gets a 4xx with ``{"error": {"code", "message", "detail"}}``; nothing a client sends
  takes the replica down. ``SCBERT_API_TOKEN`` in the replica's environment turns on bearer-token
  auth for ``/v1/*`` (constant-time comparison).

Three layers, Ray in the last only: ``AnnotatorReplica(source, settings, load_model=...)``
loads the model through the ``load_model`` callable it is given and answers requests;
``make_api(replica)`` is the FastAPI app with its routes bound to that replica (what a test
drives in-process); ``Annotator`` is the Serve deployment, whose replicas merge requests with
``@serve.batch`` and serve ``make_api(self)``.

``build(args)`` is the application builder for ``serve run`` / a Serve config file
(``import_path: scbert_serve.app:build``, ``args``: the ``serve`` params section).
"""

import asyncio
import hmac
import io
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve

from scbert_platform.infer.models import ModelSource, load_model, resolve_model
from scbert_platform.params import Params, ServeParams
from scbert_serve.h5ad_body import read_h5ad
from scbert_serve.schema import (
    MAX_JSON_DEPTH,
    AnnotateRequest,
    AnnotateResponse,
    BodyLimits,
    CellResult,
    ClassProbability,
    Coverage,
    ErrorResponse,
    Health,
    ModelInfo,
    ModelRef,
    Options,
    Readiness,
    RequestError,
    check_json_sizes,
    json_depth,
)

APP_NAME = "scbert"
LOG = logging.getLogger("ray.serve")
TOKEN_ENV = "SCBERT_API_TOKEN"
JSON_TYPES = ("application/json", "")
H5AD_TYPES = ("application/x-hdf5", "application/x-h5ad", "application/octet-stream")
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON's way to spell half a UTF-16 pair
# A ModelSource -> a LoadedModel (the model in eval mode, its panel, class names and
# preprocessing record): scbert_platform.infer.models.load_model by default
ModelLoader = Callable[[ModelSource], Any]


def error(status: int, code: str, message: str, detail: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def answer(body: BaseModel) -> JSONResponse:
    """A route's 200: ``body``, one of the response models its OpenAPI schema names, as the
    model serialises itself (rendered here, so that a failure to encode it is still answered
    as JSON and counted)."""
    return JSONResponse(body.model_dump(mode="json"))


class _Api(FastAPI):
    def openapi(self) -> dict[str, Any]:
        """FastAPI's schema plus the JSON request body's models (the annotate route reads the
        body itself, to take .h5ad bodies as well)."""
        if self.openapi_schema:
            return self.openapi_schema
        schema = get_openapi(
            title=self.title,
            version=self.version,
            description=self.description,
            routes=self.routes,
        )
        request = AnnotateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request.pop("$defs", {}))
        components["AnnotateRequest"] = request
        self.openapi_schema = schema
        return schema


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "malformed body: not JSON / HDF5, not UTF-8, or nested too deep"),
        (401, "missing or wrong bearer token"),
        (413, "too many cells or genes, too large a body, or an .h5ad that decodes too large"),
        (415, "unsupported content type"),
        (422, "a field is invalid; the message names it"),
    ]
}
# The annotate route reads its body itself (JSON or .h5ad); this documents both.
ANNOTATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/AnnotateRequest"}},
            "application/x-hdf5": {
                "schema": {"type": "string", "format": "binary"},
                "description": "an .h5ad file, raw counts in .X; options as query "
                "parameters (threshold, top_k, return_embedding)",
            },
        },
    }
}


def _replica_grpc_on_loopback() -> None:
    """Ray Serve starts an inter-deployment gRPC server in every replica, bound to "[::]:0"
    (every interface) whatever the node's address (``ray/serve/_private/replica.py``). On a Ray
    whose node address is 127.0.0.1 (the local Ray the platform starts, which listens on
    loopback only) its callers can only be on this node, so it is bound to 127.0.0.1 instead.
    Runs in the replica, after the model is loaded and before Serve starts that server; a
    cluster's replicas (any other node address) and Serve versions without that helper are
    left as they are."""
    import ray

    if not ray.is_initialized() or ray.util.get_node_ip_address() != "127.0.0.1":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "loopback", False):
        return

    def bind_loopback(server: Any, address: str) -> Any:
        return original(server, "127.0.0.1:0" if address == "[::]:0" else address)

    bind_loopback.loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind_loopback


class AnnotatorReplica:
    """One replica: the model, its panel and classes, the request checks and the metrics.

    The model comes from ``load_model(ModelSource)`` (default: the registry's or a checkpoint
    directory's, ``scbert_platform.infer.models.load_model``). Runs in any process, without Ray:
    ``make_api(replica)`` puts it behind HTTP, ``bench/serve_load.py`` times it without HTTP, and
    ``Annotator`` below is its Serve deployment, which batches concurrent requests."""

    def __init__(
        self,
        source: dict[str, Any],
        settings: dict[str, Any],
        *,
        load_model: ModelLoader = load_model,
    ) -> None:
        import torch

        from scbert_serve.metrics import ServeMetrics

        self.source = ModelSource(**source)
        self.settings = ServeParams(**settings)
        loaded = load_model(self.source)
        assert loaded.classes is not None  # load_model refuses a checkpoint without cell types
        self.model, self.panel, self.classes = loaded.model, loaded.panel, loaded.classes
        # how the model's training cells were preprocessed: every request goes the same way
        self.preprocessing = loaded.preprocessing
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            # safe: the forward pass runs under bf16 autocast; TF32 only reaches fp32 leftovers
            torch.set_float32_matmul_precision("high")
        self.model.to(self.device)
        self.metrics = ServeMetrics(
            model_name=self.source.name, model_version=self.source.version or "local"
        )
        self.token = os.environ.get(TOKEN_ENV) or None
        self._warm_up()
        self.ready = True

    def _warm_up(self) -> None:
        """One made-up cell through the whole path (compiles scanpy's numba kernels), so the
        first real request is not the slow one."""
        import scipy.sparse as sp

        from scbert_platform.data.preprocess import tokens_from_counts
        from scbert_platform.track.pyfunc import aligned_counts

        genes = list(self.panel.genes[:20])
        counts = sp.csr_matrix(np.arange(1, len(genes) + 1, dtype=np.float64)[None, :])
        aligned = aligned_counts(counts, genes, self.panel, cell_ids=["warm-up"])
        self._forward(tokens_from_counts(aligned, self.preprocessing))

    # ---- what the routes answer (make_api) -----------------------------------------------------

    async def healthz(self) -> Health:
        return Health(status="ok")

    async def readyz(self) -> Readiness:
        return Readiness(status="ready", model=self.source.name, version=self.source.version)

    async def model_info(self, request: Request) -> Response:
        return await self._handle("/v1/model", request, self._model_info)

    async def annotate(self, request: Request) -> Response:
        return await self._handle("/v1/annotate", request, self._annotate)

    def check_health(self) -> None:
        """Serve's periodic health check: a replica without its model is replaced."""
        if not getattr(self, "ready", False):
            raise RuntimeError("model not loaded")

    # ---- request handling ---------------------------------------------------------------------

    async def _handle(self, route: str, request: Request, handler: Any) -> Response:
        start = time.perf_counter()
        try:
            self._authorise(request)
            response = answer(await handler(request))
        except RequestError as refused:
            response = error(refused.status, refused.code, refused.message)
        except ValidationError as invalid:
            detail = [
                {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                for e in invalid.errors(include_url=False, include_input=False)
            ]
            first = detail[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            message = f"{where}: {first['msg']}"
            if len(detail) > 1:
                message += f" (and {len(detail) - 1} more problems)"
            response = error(422, "invalid", message, detail)
        except Exception as failure:  # a bug, not the client's fault: logged, counted, answered
            LOG.exception("%s failed", route)
            response = error(
                500, "internal", f"internal error ({type(failure).__name__}): see the replica log"
            )
        self.metrics.request(route, response.status_code, time.perf_counter() - start)
        return response

    def _authorise(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise RequestError(401, "unauthorised", "send the header Authorization: Bearer TOKEN")

    async def _model_info(self, request: Request) -> ModelInfo:
        return ModelInfo(
            name=self.source.name,
            version=self.source.version,
            alias=self.source.alias,
            uri=self.source.uri,
            classes=self.classes,
            panel_size=len(self.panel),
            panel_sha256=self.panel.sha256,
            config=self.model.config.to_dict(),
            threshold=self.settings.threshold,
            top_k=self.settings.top_k,
            max_cells_per_request=self.settings.max_cells_per_request,
            max_body_bytes=self._max_body(),
            max_genes=self.settings.max_genes,
            max_decoded_bytes=self._limits().max_decoded_bytes,
            max_json_depth=MAX_JSON_DEPTH,
            device=str(self.device),
        )

    def _max_body(self) -> int:
        return int(self.settings.max_body_mb * 2**20)

    async def _body(self, request: Request) -> bytes:
        limit = self._max_body()
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "too_large", f"body of {declared} bytes is over {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, "too_large", f"body is over the limit of {limit} bytes")
        return bytes(body)

    async def _annotate(self, request: Request) -> AnnotateResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in JSON_TYPES + H5AD_TYPES:
            raise RequestError(
                415,
                "unsupported_media_type",
                f"content type {kind!r}: send application/json or application/x-hdf5 (.h5ad)",
            )
        body = await self._body(request)
        if kind in JSON_TYPES:
            parsed = self._parse_json(body)
            counts, genes = parsed.counts()
            ids, options = (
                parsed.cell_ids(),
                Options(
                    threshold=parsed.threshold,
                    top_k=parsed.top_k,
                    return_embedding=parsed.return_embedding,
                ),
            )
        else:
            options = Options.model_validate(dict(request.query_params))
            counts, genes, ids = self._parse_h5ad(body)
        return await self._predict(counts, genes, ids, options)

    def _limits(self) -> BodyLimits:
        return BodyLimits.of(self.settings)

    def _parse_json(self, body: bytes) -> AnnotateRequest:
        """The body's depth measured before it is parsed, its sizes before it is validated
        (strictly: no booleans or strings for numbers)."""
        if not body.strip():
            raise RequestError(400, "empty_body", "the body is empty: send a JSON object")
        depth = json_depth(body)
        if depth > MAX_JSON_DEPTH:
            raise RequestError(
                400,
                "too_deep",
                f"the JSON body nests {depth} levels deep; the limit is {MAX_JSON_DEPTH} "
                "(a request needs 4)",
            )
        try:
            raw = json.loads(body.decode("utf-8-sig"))
            if SURROGATE_ESCAPE.search(body):  # a lone half would fail to encode the answer
                json.dumps(raw, ensure_ascii=False).encode()
        except (ValueError, UnicodeError) as err:
            raise RequestError(
                400, "malformed_json", f"the body is not valid JSON (UTF-8): {err}"
            ) from None
        check_json_sizes(raw, self._limits())
        return AnnotateRequest.model_validate(raw, strict=True)

    def _check_cell_count(self, n_cells: int) -> None:
        self._limits().check_cells(n_cells)

    def _parse_h5ad(self, body: bytes) -> tuple[Any, list[str], list[str]]:
        """X and the obs / var names, read only after the body's declared structure passed
        the limits (``scbert_serve.h5ad_body``)."""
        counts, genes, ids = read_h5ad(io.BytesIO(body), self._limits())
        if len(set(genes)) != len(genes):
            raise RequestError(422, "duplicated_genes", "the .h5ad has duplicated var_names")
        if len(set(ids)) != len(ids):
            raise RequestError(422, "duplicated_ids", "the .h5ad has duplicated obs_names")
        return counts, genes, ids

    async def _predict(
        self, counts: Any, genes: list[str], ids: list[str], options: Options
    ) -> AnnotateResponse:
        from scbert_platform.data.errors import IngestError
        from scbert_platform.data.preprocess import tokens_from_counts
        from scbert_platform.track.pyfunc import aligned_counts

        self._check_cell_count(counts.shape[0])
        try:
            aligned = aligned_counts(counts, genes, self.panel, cell_ids=ids)
        except IngestError as bad:
            raise RequestError(422, "invalid_counts", str(bad)) from None
        tokens = tokens_from_counts(aligned, self.preprocessing)
        proba, embedding = await self._infer(tokens)
        threshold = self.settings.threshold if options.threshold is None else options.threshold
        top_k = min(options.top_k or self.settings.top_k, len(self.classes))
        cells = self._cells(ids, proba, np.diff(aligned.indptr), threshold, top_k)
        if options.return_embedding:
            for cell, vector in zip(cells, embedding.tolist(), strict=True):
                cell.embedding = [round(v, 6) for v in vector]
        predicted = [cell.cell_type for cell in cells]
        self.metrics.predictions(predicted, sum(cell.unassigned for cell in cells))
        return AnnotateResponse(
            model=ModelRef(**self.source.describe()),
            coverage=self._coverage(genes),
            threshold=threshold,
            cells=cells,
        )

    def _coverage(self, genes: list[str]) -> Coverage:
        matched = int((self.panel.positions(genes) >= 0).sum())
        return Coverage(
            panel_genes=len(self.panel),
            request_genes=len(genes),
            matched_genes=matched,
            fraction=matched / len(self.panel),
            unknown_genes=len(genes) - matched,
        )

    def _cells(
        self, ids: list[str], proba: np.ndarray, n_genes: np.ndarray, threshold: float, top_k: int
    ) -> list[CellResult]:
        from scbert import UNASSIGNED
        from scbert_platform.track.pyfunc import cell_types

        order = np.argsort(-proba, axis=1, kind="stable")[:, :top_k]
        names = cell_types(proba, self.classes, threshold)
        return [
            CellResult(
                id=cell_id,
                cell_type=names[row],
                probability=round(float(proba[row, order[row, 0]]), 6),
                unassigned=names[row] == UNASSIGNED,
                n_genes=int(n_genes[row]),
                top_k=[
                    ClassProbability(
                        cell_type=self.classes[j], probability=round(float(proba[row, j]), 6)
                    )
                    for j in order[row]
                ],
            )
            for row, cell_id in enumerate(ids)
        ]

    # ---- the model ------------------------------------------------------------------------------

    async def _infer(self, tokens: Any) -> tuple[np.ndarray, np.ndarray]:
        """One request, one model call (off the event loop): (probabilities, embeddings).
        ``ServeAnnotator`` merges concurrent requests into one call instead."""
        self.metrics.batch(1, len(tokens))
        return await asyncio.to_thread(self._forward, tokens)

    def _forward(self, tokens: Any) -> tuple[np.ndarray, np.ndarray]:
        from scbert_platform.track.pyfunc import predict_tokens

        return predict_tokens(
            self.model, tokens, chunk_cells=self.settings.model_batch_cells, device=self.device
        )


def make_api(replica: AnnotatorReplica) -> FastAPI:
    """The HTTP API with its routes bound to ``replica`` (a loaded model): what each Serve
    replica runs, and an ASGI app that a test drives in-process, without Ray."""
    api = _Api(
        title="scBERT cell-type annotation",
        version="1",
        description="Raw counts in, cell types out (Yang et al., Nat. Mach. Intell. 2022).",
    )

    @api.get("/healthz", response_model=Health, summary="liveness (no auth)")
    async def healthz() -> Health:
        return await replica.healthz()

    @api.get(
        "/readyz",
        response_model=Readiness,
        summary="readiness: the model is loaded and answered its warm-up",
    )
    async def readyz() -> Readiness:
        return await replica.readyz()

    @api.get("/v1/model", response_model=ModelInfo, responses=ERRORS)
    async def model_info(request: Request) -> Response:
        return await replica.model_info(request)

    @api.post(
        "/v1/annotate",
        response_model=AnnotateResponse,
        responses=ERRORS,
        openapi_extra=ANNOTATE_BODY,
    )
    async def annotate(request: Request) -> Response:
        return await replica.annotate(request)

    return api


class ServeAnnotator(AnnotatorReplica):
    """A Serve replica: concurrent requests merged into one model call by ``@serve.batch``,
    the HTTP API built on the loaded model once the constructor has run."""

    def __init__(
        self,
        source: dict[str, Any],
        settings: dict[str, Any],
        *,
        load_model: ModelLoader = load_model,
    ) -> None:
        super().__init__(source, settings, load_model=load_model)
        self._infer.set_max_batch_size(self.settings.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        _replica_grpc_on_loopback()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve's hook for an ingress whose app is built in the replica (``serve.ingress()``)."""
        return make_api(self)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _infer(self, batches: list[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Requests merged into one model call: (probabilities, embeddings) per request."""
        import torch

        sizes = [len(tokens) for tokens in batches]
        self.metrics.batch(len(batches), sum(sizes))
        proba, embedding = await asyncio.to_thread(self._forward, torch.cat(batches))
        bounds = np.cumsum([0, *sizes])
        return [(proba[a:b], embedding[a:b]) for a, b in itertools.pairwise(bounds)]


Annotator = serve.deployment(
    serve.ingress()(ServeAnnotator),
    name="ScBertAnnotator",
    health_check_period_s=5,
    graceful_shutdown_timeout_s=20,
)


def deployment_options(params: ServeParams, *, forward_token: bool = False) -> dict[str, Any]:
    """Serve options from the params: autoscaling, per-replica resources and queue length.
    ``forward_token`` passes this process's ``SCBERT_API_TOKEN`` to the replicas (a local
    ``scbert serve``; on Kubernetes the pods have it from a Secret). The values were checked
    when ``params`` was built (``ServeParams``)."""
    actor: dict[str, Any] = {"num_cpus": params.replica_cpus}
    if params.replica_gpus:
        actor["num_gpus"] = params.replica_gpus
    if forward_token and os.environ.get(TOKEN_ENV):
        actor["runtime_env"] = {"env_vars": {TOKEN_ENV: os.environ[TOKEN_ENV]}}
    return {
        "autoscaling_config": {
            "min_replicas": params.min_replicas,
            "max_replicas": params.max_replicas,
            "target_ongoing_requests": params.target_ongoing_requests,
            "upscale_delay_s": params.upscale_delay_s,
            "downscale_delay_s": params.downscale_delay_s,
            "look_back_period_s": params.look_back_period_s,
        },
        "max_ongoing_requests": params.max_ongoing_requests,
        "ray_actor_options": actor,
    }


def application(
    params: ServeParams,
    source: ModelSource | None = None,
    *,
    forward_token: bool = False,
    load_model: ModelLoader = load_model,
) -> Any:
    """The bound Serve application for ``params`` (the model resolved now unless given; each
    replica loads it with ``load_model``, which Serve pickles to the replicas)."""
    source = source or resolve_model(params.model)
    options = deployment_options(params, forward_token=forward_token)
    return Annotator.options(**options).bind(asdict(source), asdict(params), load_model=load_model)


def build(args: dict[str, Any]) -> Any:
    """Application builder for ``serve run scbert_serve.app:build model=...`` and Serve config
    files: ``args`` are keys of the ``serve`` params section (checked, unknown ones refused)."""
    return application(Params.from_dict({"serve": dict(args)}).serve)


def run(
    params: ServeParams,
    source: ModelSource | None = None,
    *,
    forward_token: bool = True,
    load_model: ModelLoader = load_model,
) -> str:
    """Deploy (or update in place) the application on the current Ray; returns its URL.
    Deploying again with another model version swaps the replicas without downtime."""
    source = source or resolve_model(params.model)
    serve.start(http_options={"host": params.host, "port": params.port})
    serve.run(
        application(params, source, forward_token=forward_token, load_model=load_model),
        name=APP_NAME,
        route_prefix=params.route_prefix,
        blocking=False,
    )
    host = "127.0.0.1" if params.host in ("0.0.0.0", "::") else params.host
    return f"http://{host}:{params.port}{params.route_prefix.rstrip('/')}"


def stop() -> None:
    """Stop serving. A local Ray that this process started is shut down, with Serve's
    controller, proxy and replicas in it. (``serve.shutdown()`` would end with the controller
    killing itself inside its own ``graceful_shutdown`` task, which the raylet reports on the
    screen as a failed task, and ``serve.delete`` waits for ever if a signal to the whole
    process group has already stopped that Ray.) On a joined cluster, Serve is shut down there."""
    import ray

    from scbert_platform.cluster import started_here

    if started_here():
        ray.shutdown()
    else:
        serve.shutdown()


def replica_counts(app_name: str = APP_NAME) -> dict[str, int]:
    """Replicas of the annotator by state (``RUNNING``, ``STARTING``, ``STOPPING``, ...)."""
    status = serve.status().applications.get(app_name)
    if status is None:
        return {}
    deployment = status.deployments.get("ScBertAnnotator")
    return (
        {str(k): int(v) for k, v in (deployment.replica_states or {}).items()} if deployment else {}
    )


def metrics_port() -> int:
    """This node's Ray metrics export port (Prometheus scrapes it)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return int(node["MetricsExportPort"])
    raise RuntimeError("this node is not in ray.nodes()")
