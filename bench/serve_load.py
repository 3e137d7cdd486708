"""The annotation service under a bounded closed-loop load from 127.0.0.1, against the same
request handler called in-process (no HTTP, no proxy, no batching queue).

    python bench/serve_load.py                       # the demo's model and real pbmc68k cells
    python bench/serve_load.py --model models:/scbert-pbmc68k@champion --seconds 10

For each request size (cells per request) and client concurrency, ``--seconds`` of load (at most
``--max-requests``): latency p50/p95/p99, requests/s and cells/s. The in-process figure runs the
replica's own ``annotate`` handler on the same JSON bodies, one after another, in this process
with the replica's torch thread count: the serving overhead is
``1 - HTTP cells/s / in-process cells/s`` (target at 100-cell requests: at most 20%).
Requests are real cells (counts rebuilt from the ingested shards), sparse JSON, no auth token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo


def bodies(shards: str, panel: list[str], size: int, n_bodies: int) -> list[bytes]:
    """``n_bodies`` sparse JSON requests of ``size`` consecutive real cells each (cycling)."""
    from scbert_platform.track.pyfunc import shard_counts
    from scbert_serve.schema import sparse_cells

    frame, _ = shard_counts(shards, panel)
    out = []
    for b in range(n_bodies):
        rows = [(b * size + i) % len(frame) for i in range(size)]
        cells = sparse_cells(frame.iloc[rows])
        for position, cell in enumerate(cells):
            cell["id"] += f"-{position}"  # a cell may repeat in a small dataset
        out.append(json.dumps({"cells": cells}).encode())
    return out


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def http_load(
    url: str, payloads: list[bytes], size: int, concurrency: int, seconds: float, max_requests: int
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients, each sending its next request when one returns
    (``scbert_serve.client``: a 503 or a dropped connection is retried, and counted)."""
    from scbert_serve.client import Client, ServiceUnavailable

    service = Client(url, deadline_s=60)
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(offset: int) -> None:
        i = offset
        while time.monotonic() < deadline:
            with lock:
                if len(latencies) + len(failures) >= max_requests:
                    return
            start = time.perf_counter()
            try:
                status = service.post(
                    "/v1/annotate",
                    data=payloads[i % len(payloads)],
                    headers={"Content-Type": "application/json"},
                ).status_code
            except ServiceUnavailable:
                status = 0
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed) if status == 200 else failures.append(status)
            i += concurrency

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    p50, p95, p99 = percentiles(latencies)
    return {
        "cells_per_request": size,
        "concurrency": concurrency,
        "requests": len(latencies),
        "failed": len(failures),
        "retried": service.log.retries,
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "requests_per_s": len(latencies) / wall,
        "cells_per_s": len(latencies) * size / wall,
    }


def in_process(
    source: Any, settings: Any, payloads: list[bytes], size: int, seconds: float, max_requests: int
) -> dict[str, Any]:
    """The replica's ``annotate`` handler called directly on the same bodies, one at a time."""
    from dataclasses import asdict

    from starlette.requests import Request

    from scbert_serve.app import AnnotatorReplica

    replica = AnnotatorReplica(asdict(source), asdict(settings))

    async def unbatched(tokens: Any) -> tuple[Any, Any]:
        return replica._forward(tokens)  # @serve.batch's queue exists only inside Serve

    replica._infer = unbatched  # type: ignore[method-assign]

    def request(body: bytes) -> Request:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/annotate",
            "headers": [(b"content-type", b"application/json")],
            "query_string": b"",
        }
        return Request(scope, receive)

    async def loop() -> list[float]:
        latencies: list[float] = []
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline and len(latencies) < max_requests:
            start = time.perf_counter()
            response = await replica.annotate(request(payloads[i % len(payloads)]))
            assert response.status_code == 200, response.body[:300]
            latencies.append(time.perf_counter() - start)
            i += 1
        return latencies

    start = time.perf_counter()
    latencies = asyncio.run(loop())
    wall = time.perf_counter() - start
    p50, p95, p99 = percentiles(latencies)
    return {
        "cells_per_request": size,
        "requests": len(latencies),
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "cells_per_s": len(latencies) * size / wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="data/models/finetune", help="what scbert serve takes")
    parser.add_argument("--shards", default="data/cells/pbmc68k", help="real cells for requests")
    parser.add_argument("--sizes", default="1,100", help="cells per request")
    parser.add_argument("--concurrency", default="1,4,8", help="clients")
    parser.add_argument("--seconds", type=float, default=8.0, help="load per level")
    parser.add_argument("--max-requests", type=int, default=2000, help="cap per level")
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    import torch
    from ray import serve

    from scbert_platform.cluster import start_ray
    from scbert_platform.params import ServeParams
    from scbert_serve.app import load_model, resolve_model, run

    settings = ServeParams(
        model=args.model,
        port=args.port,
        min_replicas=1,
        max_replicas=1,
        replica_cpus=args.replica_cpus,
    )
    source = resolve_model(args.model)
    start_ray()
    url = run(settings, source, forward_token=False)
    panel = load_model(source).panel
    sizes = [int(s) for s in args.sizes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, Any] = {"http": [], "in_process": []}
    try:
        for size in sizes:
            payloads = bodies(args.shards, panel, size, n_bodies=max(8, 700 // size))
            http_load(url, payloads[:2], size, 1, 2.0, 20)  # warm-up
            for concurrency in levels:
                row = http_load(url, payloads, size, concurrency, args.seconds, args.max_requests)
                results["http"].append(row)
                print(
                    f"HTTP {size:>4} cells/request, {concurrency} clients: "
                    f"p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms, "
                    f"p99 {row['p99_ms']:.1f} ms, {row['requests_per_s']:.1f} req/s, "
                    f"{row['cells_per_s']:.0f} cells/s ({row['failed']} failed, "
                    f"{row['retried']} retried)",
                    flush=True,
                )
        serve.shutdown()  # the in-process run gets the machine to itself
        threads = max(1, int(args.replica_cpus))
        torch.set_num_threads(threads)  # as in the replica (Ray sets OMP threads to its CPUs)
        for size in sizes:
            payloads = bodies(args.shards, panel, size, n_bodies=max(8, 700 // size))
            row = in_process(source, settings, payloads, size, args.seconds, args.max_requests)
            results["in_process"].append(row)
            print(
                f"in-process {size:>4} cells/request ({threads} torch thread): "
                f"p50 {row['p50_ms']:.1f} ms, {row['cells_per_s']:.0f} cells/s",
                flush=True,
            )
    finally:
        serve.shutdown()
    print("\n| cells/request | clients | p50 ms | p95 ms | p99 ms | req/s | cells/s | overhead |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {row["cells_per_request"]: row["cells_per_s"] for row in results["in_process"]}
    for row in results["http"]:
        overhead = 1 - row["cells_per_s"] / base[row["cells_per_request"]]
        row["overhead"] = overhead
        print(
            f"| {row['cells_per_request']} | {row['concurrency']} | {row['p50_ms']:.1f} | "
            f"{row['p95_ms']:.1f} | {row['p99_ms']:.1f} | {row['requests_per_s']:.1f} | "
            f"{row['cells_per_s']:.0f} | {overhead:+.0%} |"
        )
    for row in results["in_process"]:
        print(
            f"| {row['cells_per_request']} | in-process | {row['p50_ms']:.1f} | "
            f"{row['p95_ms']:.1f} | {row['p99_ms']:.1f} | - | {row['cells_per_s']:.0f} | - |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
