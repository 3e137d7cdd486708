"""The service's Python client against a real HTTP server on 127.0.0.1 that fails on purpose, and
the proxy middleware that answers a lost replica's request with 503 + Retry-After."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from scbert_serve.client import Client, RequestRefused, ServiceUnavailable
from scbert_serve.proxy import ReplicaLossMiddleware

ANSWER = {"cells": [{"id": "c1", "cell_type": "T"}]}


class Script:
    """What the server answers, request after request: (status, headers, body) items; the last
    one repeats."""

    def __init__(self, *replies: tuple[int, dict[str, str], Any]) -> None:
        self.replies, self.seen = list(replies), 0

    def next(self) -> tuple[int, dict[str, str], Any]:
        self.seen += 1
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


@pytest.fixture
def server() -> Iterator[tuple[str, list[Script]]]:
    script: list[Script] = [Script((200, {}, ANSWER))]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            status, headers, body = script[0].next()
            data = json.dumps(body).encode()
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    finally:
        httpd.shutdown()
        httpd.server_close()


LOST = (503, {"Retry-After": "0"}, {"error": {"code": "replica_unavailable", "message": "again"}})


def test_a_lost_replica_is_retried_until_it_answers(server: tuple[str, list[Script]]) -> None:
    url, script = server
    script[0] = Script(LOST, LOST, (429, {}, {}), (200, {}, ANSWER))
    client = Client(url, deadline_s=10, backoff_s=0.01)
    assert client.annotate(cells=[{"id": "c1", "genes": ["CD3E"], "counts": [1]}]) == ANSWER
    assert script[0].seen == 4
    assert client.log.retries == 3 and client.log.by_reason == {"HTTP 503": 2, "HTTP 429": 1}


def test_refusals_and_bugs_are_not_retried(server: tuple[str, list[Script]]) -> None:
    url, script = server
    client = Client(url, deadline_s=10, backoff_s=0.01)
    script[0] = Script((422, {}, {"error": {"code": "invalid", "message": "cells.0.counts.0"}}))
    with pytest.raises(RequestRefused, match=r"HTTP 422 invalid: cells\.0\.counts\.0") as refused:
        client.annotate(cells=[])
    assert refused.value.status == 422 and script[0].seen == 1
    script[0] = Script((500, {}, {"error": {"code": "internal", "message": "a bug"}}))
    assert client.post("/v1/annotate", json={}).status_code == 500
    assert script[0].seen == 1 and client.log.retries == 0


def test_the_deadline_ends_the_retries(server: tuple[str, list[Script]]) -> None:
    url, script = server
    script[0] = Script(LOST)
    client = Client(url, deadline_s=0.5, backoff_s=0.05, max_backoff_s=0.1)
    start = time.monotonic()
    with pytest.raises(
        ServiceUnavailable, match=r"no answer within 0.5 s \(\d+ attempts; last: HTTP 503"
    ):
        client.annotate(cells=[])
    assert time.monotonic() - start < 5 and script[0].seen >= 2


def test_a_service_not_listening_yet_is_waited_for() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = Client(f"http://127.0.0.1:{port}", deadline_s=0.6, backoff_s=0.05, max_backoff_s=0.1)
    with pytest.raises(ServiceUnavailable, match="ConnectionError"):
        client.model()
    assert client.log.by_reason.get("ConnectionError", 0) >= 2
    assert not client.healthy()


def asgi(app: Any) -> tuple[int, dict[bytes, bytes], bytes]:
    """One GET through ``ReplicaLossMiddleware(app)``: status, headers, body."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/v1/model", "headers": []}
    asyncio.run(ReplicaLossMiddleware(app)(scope, receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body


def test_the_proxy_answers_a_request_without_a_response_with_503() -> None:
    async def replica_died(scope: Any, receive: Any, send: Any) -> None:
        return None  # what Ray Serve's proxy does when the replica is gone: nothing sent

    async def proxy_failed(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("lost")

    for app in (replica_died, proxy_failed):
        status, headers, body = asgi(app)
        assert status == 503 and headers[b"retry-after"] == b"1"
        assert json.loads(body)["error"]["code"] == "replica_unavailable"

    async def answered(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": {"code": "internal"}}'})

    assert asgi(answered)[0] == 500  # the application's own answers pass as they are
