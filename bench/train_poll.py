"""Short fine-tuning runs under Ray Train's default controller poll (2 s) and under the 0.25 s
that ``scbert_platform.cluster.start_ray`` sets for a local Ray (``TRAIN_POLL_ENV``).

Side by side in one run: for each interval a fresh interpreter starts its own local Ray with
that interval and fits the same tiny model on the bundled pbmc68k cells ``--runs`` times (8
optimiser steps, a checkpoint every 4: what the suite's Ray tests and a quick trial do). The
figure is each fit's wall time; the first fit of a Ray session also starts Ray's worker pool.

    python bench/train_poll.py            # 2 runs per interval
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INTERVALS = ("2.0", "0.25")  # Ray Train's default, ours for a local Ray


def child(work: Path, runs: int) -> list[float]:
    """In a fresh interpreter whose environment holds the interval: ``runs`` fits, their walls."""
    from scbert_platform.cluster import start_ray
    from scbert_platform.data.datasets import bundled_path
    from scbert_platform.data.ingest import ingest
    from scbert_platform.params import DataParams, ModelParams, Params, TrainParams
    from scbert_platform.train.distributed import fit

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlruns.db"
    shards = work / "cells"
    data = DataParams(use_raw=True, input="log1p", label_key="bulk_labels", panel_min_cells=1)
    ingest(bundled_path("pbmc68k_reduced"), shards, data, executor="local", log=lambda _: None)
    start_ray(num_cpus=2)
    model = ModelParams(
        dim=16, depth=1, heads=2, dim_head=8, nb_features=16, gene_embedding="learned"
    )
    train = TrainParams(
        batch_size=16,
        grad_accum=1,
        max_steps=8,
        ckpt_every=4,
        val_every=4,
        log_every=2,
        lr=1e-3,
        schedule="constant",
        storage_path=str(work / "runs"),
        cpus_per_worker=0.5,
        collapse_check=False,
    )
    params = Params(model=model, data=data, train=train)
    walls = []
    for i in range(runs):
        start = time.perf_counter()
        fit("finetune", shards, params, run_name=f"poll-{i}")
        walls.append(time.perf_counter() - start)
    return walls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="fits per interval")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child), args.runs)))
        return 0
    rows = {}
    for interval in INTERVALS:
        with tempfile.TemporaryDirectory(prefix="train-poll-") as work:
            env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval}
            done = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--runs",
                    str(args.runs),
                    "--child",
                    work,
                ],
                env=env,
                cwd=work,  # MLflow's artifacts go beside its database, not into the repo
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            rows[interval] = json.loads(done.stdout.strip().splitlines()[-1])
    print("| controller poll | fit wall times (s) | mean |")
    print("| --- | --- | ---: |")
    for interval, walls in rows.items():
        shown = ", ".join(f"{w:.1f}" for w in walls)
        print(f"| {interval} s | {shown} | {sum(walls) / len(walls):.1f} |")
    default, ours = (sum(rows[i]) / len(rows[i]) for i in INTERVALS)
    print(f"\n{INTERVALS[1]} s poll: {default / ours:.2f}x faster per fit than {INTERVALS[0]} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
