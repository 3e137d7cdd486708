"""A small Python client for the annotation service, with retries a pipeline can rely on.

    from scbert_serve.client import Client

    client = Client("http://127.0.0.1:8000", token=os.environ.get("SCBERT_API_TOKEN"))
    answer = client.annotate(cells=[{"id": "c1", "genes": ["CD3E", "MS4A1"], "counts": [3, 1]}])
    answer["cells"][0]["cell_type"]

Retried, with exponential backoff, until ``deadline_s`` has passed: connection errors (the
proxy restarting), 503 (a replica lost mid-request, or no replica yet; its ``Retry-After`` is
honoured), 429 (back-pressure) and 502/504 (a gateway in front). Annotation is idempotent, so
sending a request again is safe. Anything else is final: a 4xx raises ``RequestRefused`` with the
service's message; ``post``/``get`` return the response as it is for callers that look at it.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

RETRIED_STATUSES = frozenset({429, 502, 503, 504})


class ServiceUnavailable(RuntimeError):
    """The service did not answer within the client's deadline."""


class RequestRefused(ValueError):
    """The service answered the request with an error (4xx/5xx): its code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass
class RetryLog:
    """What the client did beyond the first attempts: for a load test's or a pipeline's summary."""

    retries: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str) -> None:
        with self.lock:
            self.retries += 1
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1


class Client:
    """The service at ``url`` (its route prefix included). Thread-safe: one session per thread."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 120.0,
        deadline_s: float = 60.0,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
    ) -> None:
        if deadline_s <= 0 or backoff_s <= 0 or max_backoff_s < backoff_s:
            raise ValueError("deadline_s and backoff_s must be > 0, max_backoff_s >= backoff_s")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s, self.deadline_s = timeout_s, deadline_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.log = RetryLog()
        self._local = threading.local()

    # ---- the service's routes ---------------------------------------------------------------

    def annotate(
        self,
        cells: list[dict[str, Any]] | None = None,
        *,
        genes: list[str] | None = None,
        matrix: list[list[float]] | None = None,
        h5ad: bytes | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Cell types for sparse ``cells``, a dense ``genes`` × ``matrix``, or an ``.h5ad`` body;
        ``options``: threshold, top_k, return_embedding."""
        if h5ad is not None:
            response = self.post(
                "/v1/annotate",
                data=h5ad,
                params=options,
                headers={"Content-Type": "application/x-hdf5"},
            )
        else:
            body: dict[str, Any] = {"cells": cells} if cells is not None else {}
            if genes is not None or matrix is not None:
                body.update(genes=genes, matrix=matrix)
            response = self.post("/v1/annotate", json={**body, **options})
        return self._answer(response)

    def model(self) -> dict[str, Any]:
        """The served model: name, version, classes, panel, limits, device."""
        return self._answer(self.get("/v1/model"))

    def healthy(self) -> bool:
        """Whether the service answers its liveness route now (no retries)."""
        try:
            return self._session().get(f"{self.url}/healthz", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    # ---- requests with retries --------------------------------------------------------------

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send, and send again after a transient failure until the deadline; the response."""
        deadline = time.monotonic() + self.deadline_s
        kwargs.setdefault("timeout", self.timeout_s)
        attempt = 0
        while True:
            try:
                response = self._session().request(method, f"{self.url}{path}", **kwargs)
            except (requests.ConnectionError, requests.Timeout) as err:
                reason, wait, last = type(err).__name__, None, str(err)
            else:
                if response.status_code not in RETRIED_STATUSES:
                    return response
                reason, wait = f"HTTP {response.status_code}", _retry_after(response)
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            pause = wait if wait is not None else self._backoff(attempt)
            if time.monotonic() + pause > deadline:
                raise ServiceUnavailable(
                    f"{method} {self.url}{path}: no answer within {self.deadline_s:g} s "
                    f"({attempt + 1} attempts; last: {last})"
                )
            self.log.add(reason)
            time.sleep(pause)
            attempt += 1

    def _backoff(self, attempt: int) -> float:
        """Exponential, capped, with jitter (clients that failed together do not retry together)."""
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            if self.token:
                session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    def _answer(self, response: requests.Response) -> dict[str, Any]:
        if response.status_code == 200:
            answer: dict[str, Any] = response.json()
            return answer
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", response.text[:500]
        raise RequestRefused(response.status_code, code, message)


def _retry_after(response: requests.Response) -> float | None:
    """The response's ``Retry-After`` in seconds (capped at a minute), or None."""
    value = response.headers.get("retry-after", "")
    try:
        return min(60.0, max(0.0, float(value)))
    except ValueError:
        return None
