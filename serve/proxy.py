"""The HTTP proxy's answer when a replica is lost mid-request: 503 with ``Retry-After``.

Ray Serve's proxy answers a request whose replica died (SIGKILL, out of memory, a lost node)
with a bare 500 and no body, which a client cannot tell from a bug. The proxy takes Starlette
middlewares from the import path in ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, read in the
proxy's own process when it starts; ``middlewares`` below is that callback. A local Ray started
by ``scbert_platform.cluster.start_ray`` gets the variable; on a cluster it is set in the Ray
containers' environment (``infra/kuberay/rayservice.yaml``).

Only responses that never started are replaced: every answer of the application itself (200,
its 4xx, its own 500 for a bug, with a JSON body) passes through untouched. Annotation is
idempotent, so a client may send the request again (``scbert_serve.client`` does).
"""

from __future__ import annotations

import json
import logging
from typing import Any

ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
IMPORT_PATH = "scbert_serve.proxy:middlewares"
RETRY_AFTER_S = 1  # Serve replaces a dead replica within seconds; the others serve meanwhile
LOG = logging.getLogger("ray.serve")

Scope = dict[str, Any]
Message = dict[str, Any]


def unavailable_response() -> tuple[Message, Message]:
    """The 503's two ASGI messages: a JSON error as the application's own errors have."""
    body = json.dumps(
        {
            "error": {
                "code": "replica_unavailable",
                "message": "the replica serving this request stopped before it answered; "
                f"send the request again (retry after {RETRY_AFTER_S} s)",
            }
        }
    ).encode()
    start = {
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


class ReplicaLossMiddleware:
    """ASGI middleware: an HTTP request that ends without a response gets the 503."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            if started:
                raise
            LOG.exception("request to %s failed in the proxy", scope.get("path"))
        if not started:
            for message in unavailable_response():
                await send(message)


def middlewares() -> list[Any]:
    """The proxy callback: the Starlette middlewares Ray Serve's proxy wraps itself in."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLossMiddleware)]
