"""The steps of ``bench/gpu_check.sh``: one GPU check of the whole platform, in parts.

    python bench/gpu_check.py prep   --out DIR [--device cuda|cpu] [--quick]
    python bench/gpu_check.py part NAME --out DIR [--device cuda|cpu] [--quick]
    python bench/gpu_check.py report --out DIR [--wall-s S]

``prep`` writes the shared inputs (``scbert synth`` cells, ``scbert ingest`` shards, a
random-weight model directory); each part writes ``DIR/parts/NAME.json`` (status ``ok``,
``failed`` or ``skipped`` with a reason, its figures) and its commands' output to
``DIR/logs/NAME.log``; ``report`` joins them into ``DIR/report.json`` and ``DIR/report.md``
and exits 1 when a part that ran failed. Parts:

- ``speed``: ``bench/model_speed.py --json`` (paper size; ``--quick``: tiny sizes);
- ``train``: ``scbert pretrain`` on Ray Train for a few steps, then again with more steps on the
  same run, which resumes from its checkpoint (``--quick``: the first run only); cells/s from
  the MLflow metric ``train/cells_per_s``;
- ``serve``: the Ray Serve app with ``serve.replica_gpus=1`` on CUDA, closed-loop HTTP load
  (``bench/serve_load.py``'s client), and ``GET /v1/model``;
- ``annotate``: ``scbert annotate --distributed`` (Ray Data workers, one per GPU).

Only the standard library is imported at the top: on a machine without Ray, MLflow or AnnData
the parts that need them are skipped, and ``speed`` runs with whatever Python has torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PARTS = {
    "speed": "model speed (bench/model_speed.py)",
    "train": "Ray Train pretraining + resume (scbert pretrain)",
    "serve": "Ray Serve under HTTP load (bench/serve_load.py)",
    "annotate": "offline annotation on Ray Data (scbert annotate --distributed)",
}
NEEDS = {  # importable modules each step needs (missing: the part is skipped)
    "prep": ("torch", "anndata", "pyarrow"),
    "speed": ("torch", "einops"),
    "train": ("torch", "ray", "mlflow", "anndata"),
    "serve": ("torch", "ray", "mlflow", "anndata", "fastapi"),
    "annotate": ("torch", "ray", "mlflow", "anndata"),
}
# paper size on a GPU; tiny sizes (--quick) exercise the same code in seconds on 2 CPUs
SIZES = {
    "full": {"cells": 20_000, "genes": 16_906, "genes_per_cell": 1500.0, "min_genes": 200},
    "quick": {"cells": 400, "genes": 256, "genes_per_cell": 100.0, "min_genes": 40},
}
TINY_MODEL: dict[str, int] = {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "nb_features": 16}
Figures = dict[str, Any]


class Skip(Exception):
    """A part that cannot run here (a dependency or an input is missing)."""


class Check:
    """Paths and settings of one run of the check, shared by its steps."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.out = Path(args.out).resolve()
        self.work = self.out / "work"
        self.device = args.device
        self.quick = args.quick
        self.sizes = SIZES["quick" if args.quick else "full"]
        self.cuda = args.device == "cuda"
        self.log: Path | None = None

    @property
    def h5ad(self) -> Path:
        return self.work / "cells.h5ad"

    @property
    def shards(self) -> Path:
        return self.work / "shards"

    @property
    def model(self) -> Path:
        return self.work / "model"

    def env(self) -> dict[str, str]:
        """The environment of every command: MLflow's store in the work folder, no GPU on CPU."""
        env = dict(os.environ)
        env["MLFLOW_TRACKING_URI"] = tracking_uri(self.work)
        if not self.cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def run(self, cmd: list[str], *, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``cmd`` in the work folder; its output goes to the part's log (and is returned)."""
        start = time.perf_counter()
        done = subprocess.run(
            cmd, cwd=self.work, env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        self._logged(cmd, done, start)
        return done

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``scbert ARGS`` as ``run`` would, but in this process: prep's verbs need no second
        interpreter importing torch and AnnData again (seconds each on 2 loaded CPUs)."""
        import contextlib
        import io

        from scbert_platform.cli import main

        start, out, err, cwd = time.perf_counter(), io.StringIO(), io.StringIO(), os.getcwd()
        os.environ.update(self.env())
        os.chdir(self.work)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(list(args))
        finally:
            os.chdir(cwd)
        done = subprocess.CompletedProcess(scbert(*args), code, out.getvalue(), err.getvalue())
        self._logged(done.args, done, start)
        return done

    def _logged(self, cmd: list[str], done: subprocess.CompletedProcess[str], start: float) -> None:
        """The command and its output into the part's log; a failure raised with its last lines."""
        if self.log is not None:
            with self.log.open("a") as log:
                log.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}")
                log.write(f"[exit {done.returncode} after {time.perf_counter() - start:.1f} s]\n")
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
            raise RuntimeError(f"{' '.join(cmd[2:5])} ... exited {done.returncode}:\n{tail}")


def tracking_uri(work: Path) -> str:
    return f"sqlite:///{work / 'mlruns.db'}"


def scbert(*args: str) -> list[str]:
    """The ``scbert`` CLI with this Python (``scbert_platform`` importable: see gpu_check.sh)."""
    return [sys.executable, "-m", "scbert_platform.cli", *args]


def missing(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


# ---- prep: synthetic cells, shards, a random-weight model ------------------------------------


def prep(check: Check) -> Figures:
    """``scbert synth`` + ``scbert ingest`` and a random-weight model over the shards' panel."""
    sizes = check.sizes
    start = time.perf_counter()
    check.cli(
        "synth", str(check.h5ad), "--cells", str(sizes["cells"]), "--genes",
        str(sizes["genes"]), "--genes-per-cell", str(sizes["genes_per_cell"]), "--quiet",
    )  # fmt: skip
    synth_s = time.perf_counter() - start
    panel = check.work / "panel.txt"  # every synthetic gene, so the paper's 16,906 on a GPU
    panel.write_text("".join(f"{gene}\n" for gene in h5ad_genes(check.h5ad)))
    start = time.perf_counter()
    check.cli(
        "ingest", str(check.h5ad), "--out", str(check.shards), "--panel", str(panel),
        "--label-key", "cell_type", "--executor", "local", "--params", "none.yaml",
        "--set", f"data.min_genes={sizes['min_genes']}",
        "--set", "data.n_folds=20",  # pretraining validates on one fold: 5% of the cells
    )  # fmt: skip
    ingest_s = time.perf_counter() - start
    manifest = json.loads((check.shards / "manifest.json").read_text())
    labels = sorted(manifest["labels"]["counts"])
    genes = (check.shards / "panel.txt").read_text().split()
    write_random_model(check.model, genes, labels, quick=check.quick)
    if not check.quick:  # a fixed random stand-in for gene2vec (panel order), as in the paper
        write_gene2vec(check.work / "gene2vec.npy", len(genes))
    return {
        "n_cells": manifest["cells"]["kept"],
        "n_genes": len(genes),
        "n_classes": len(labels),
        "synth_s": synth_s,
        "ingest_s": ingest_s,
    }


def h5ad_genes(path: Path) -> list[str]:
    import anndata

    backed = anndata.read_h5ad(path, backed="r")
    try:
        return [str(gene) for gene in backed.var_names]
    finally:
        backed.file.close()


def write_random_model(
    directory: Path, genes: list[str], labels: list[str], *, quick: bool
) -> None:
    """A fine-tuned-layout checkpoint with random weights: paper sizes, or tiny ones (quick)."""
    import torch

    from scbert import ScBert, ScBertConfig, save_pretrained

    if quick:
        config = ScBertConfig(
            n_genes=len(genes),
            n_classes=len(labels),
            gene_embedding="learned",
            dim=16,
            depth=1,
            heads=2,
            dim_head=8,
            nb_features=16,
            cls_hidden=(16, 8),
        )  # fmt: skip (the sizes of TINY_MODEL)
        gene2vec = None
    else:
        config = ScBertConfig(n_genes=len(genes), n_classes=len(labels))
        generator = torch.Generator().manual_seed(0)
        gene2vec = torch.randn(config.n_genes, config.dim, generator=generator)
    torch.manual_seed(0)
    model = ScBert(config=config, gene2vec=gene2vec).eval()
    save_pretrained(model, directory, panel=genes, classes=labels, overwrite=True)


def write_gene2vec(path: Path, n_genes: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(path, rng.standard_normal((n_genes, 200)).astype(np.float32))


# ---- part 1: model speed ---------------------------------------------------------------------


def part_speed(check: Check) -> Figures:
    """``bench/model_speed.py --device D [--quick] --json``: its JSON, embedded as it is."""
    out = check.work / "model_speed.json"
    extra = os.environ.get("MODEL_SPEED_ARGS")
    # --quick: one round, two timed repeats (not 10) and no anchor keep the CPU check inside its
    # two minutes; a smoke run's figures are not comparable anyway
    quick = ["--no-anchor", "--repeats", "2"] * check.quick
    flags = extra.split() if extra is not None else ["--rounds", "1", *quick]
    # the options model_speed.py knows, from its source: `--help` would import torch once more
    source = (REPO / "bench/model_speed.py").read_text()
    flags = [flag for flag in flags if not flag.startswith("--") or f'"{flag}"' in source]
    if check.quick and '"--quick"' not in source:
        raise Skip("bench/model_speed.py has no --quick yet (paper size on a CPU takes minutes)")
    cmd = [sys.executable, str(REPO / "bench/model_speed.py"), "--device", check.device]
    cmd += ["--quick"] * check.quick + flags + ["--json", str(out)]
    check.run(cmd)
    speed = json.loads(out.read_text())
    return {"command": cmd[1:], "rows": speed_rows(speed), "model_speed": speed}


def speed_rows(speed: Figures) -> list[Figures]:
    """One line per row and implementation that reports cells/s, whatever the rows are called."""
    rows = speed.get("rows", speed)
    found = []
    for phase, row in rows.items() if isinstance(rows, dict) else ():
        if not isinstance(row, dict):
            continue
        impls = {k: v for k, v in row.items() if isinstance(v, dict) and "cells_per_s" in v}
        if "cells_per_s" in row:
            impls = {"": row}
        for impl, figures in impls.items():
            label = row.get("label", phase)
            found.append(
                {
                    "row": f"{label} ({impl})" if impl else label,
                    "cells_per_s": figures["cells_per_s"],
                    "peak_gib_per_cell": figures.get("peak_gib_per_cell"),
                }
            )
    return found


# ---- part 2: Ray Train -----------------------------------------------------------------------


def train_overrides(check: Check, first: int) -> list[str]:
    """``--set`` flags: tiny sizes (quick) or the paper's; a checkpoint at step ``first``
    (validation there too, on a GPU)."""
    train: dict[str, object] = {
        "train.use_gpu": str(check.cuda).lower(),
        "train.workers": 1,
        "train.cpus_per_worker": 1,
        "train.batch_size": 16 if check.quick else 8,
        "train.grad_accum": 1,
        "train.schedule": "constant",
        "train.log_every": 2 if check.quick else 5,
        "train.ckpt_every": first,
        "train.val_every": 0 if check.quick else first,  # quick: no second Ray Data pipeline
        "train.storage_path": str(check.work / "runs"),
        "data.shuffle_buffer": 128 if check.quick else 1024,
    }
    if check.quick:
        model: dict[str, object] = {f"model.{k}": v for k, v in TINY_MODEL.items()}
        model["model.gene_embedding"] = "learned"
    else:
        model = {"model.gene2vec": str(check.work / "gene2vec.npy")}
    return [flag for key, value in (model | train).items() for flag in ("--set", f"{key}={value}")]


def part_train(check: Check) -> Figures:
    """Pretrain ``first`` steps, then resume the same run to ``second`` steps (--quick: the
    first run only; resuming a run by name is tests/test_train_faults.py's, on the same CLI, and
    a second Ray Train run would add a minute to the test suite's smoke run of this check)."""
    if not (check.shards / "manifest.json").is_file():
        raise Skip("no ingested shards (the prep step failed: see logs/prep.log)")
    first, second = (4, 6) if check.quick else (20, 30)
    common = ["--params", "none.yaml", *train_overrides(check, first)]
    runs: list[Figures] = []
    plan = [(first, ["--run-name", "gpu-check"]), (second, ["--resume", "gpu-check"])]
    for steps, how in plan[: 1 if check.quick else 2]:
        metrics = check.work / f"pretrain-{steps}.json"
        cmd = scbert("pretrain", str(check.shards), *how, "--metrics", str(metrics), *common)
        start = time.perf_counter()
        done = check.run([*cmd, "--set", f"train.max_steps={steps}"])
        summary = json.loads(metrics.read_text())
        resumed = re.search(r"pretrain: resumed from step (\d+)", done.stderr)
        runs.append(
            {
                "steps": summary["steps"],
                "wall_s": time.perf_counter() - start,
                "mlflow_run_id": summary["mlflow_run_id"],
                "resumed_from_step": int(resumed.group(1)) if resumed else None,
                "train_loss": summary.get("train/loss"),
            }
        )
    resumed_from = runs[-1]["resumed_from_step"]
    if not check.quick and (not resumed_from or runs[1]["steps"] != second):
        raise RuntimeError(f"the second run did not resume: {runs[1]}")
    history = cells_per_s_history(check.work, runs[-1]["mlflow_run_id"])
    if not history:
        raise RuntimeError("no train/cells_per_s in the MLflow run")
    return {
        "runs": runs,
        "resumed_from_step": resumed_from,
        "same_mlflow_run": runs[0]["mlflow_run_id"] == runs[-1]["mlflow_run_id"],
        "cells_per_s": history[-1][1],
        "cells_per_s_history": history,
        "tracking_uri": tracking_uri(check.work),
    }


def cells_per_s_history(work: Path, run_id: str) -> list[tuple[int, float]]:
    """(step, value) of ``train/cells_per_s``, read back from the run's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(work))
    history = client.get_metric_history(run_id, "train/cells_per_s")
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


# ---- part 3: Ray Serve -----------------------------------------------------------------------


def part_serve(check: Check) -> Figures:
    """The annotator on Ray Serve (one replica, a GPU on CUDA), under closed-loop HTTP load."""
    if not (check.model / "config.json").is_file():
        raise Skip("no model directory (the prep step failed: see logs/prep.log)")
    sys.path.insert(0, str(REPO / "bench"))
    from serve_load import http_load

    from scbert_platform.cluster import start_ray
    from scbert_platform.params import ServeParams
    from scbert_serve.app import resolve_model, run, stop
    from scbert_serve.client import Client

    settings = ServeParams(
        model=str(check.model),
        host="127.0.0.1",
        port=free_port(),
        min_replicas=1,
        max_replicas=1,
        replica_cpus=1.0,
        replica_gpus=1.0 if check.cuda else 0.0,
        model_batch_cells=256 if check.cuda else 64,
    )
    sizes, levels, seconds = ([10], [1, 4], 1.0) if check.quick else ([1, 100], [1, 8], 5.0)
    start_ray()
    try:
        started = time.perf_counter()
        url = run(settings, resolve_model(settings.model), forward_token=False)
        deploy_s = time.perf_counter() - started
        info = Client(url, deadline_s=60).model()
        rows = []
        for size in sizes:
            payloads = request_bodies(check, info["panel_size"], size)
            http_load(url, payloads[:2], size, 1, 1.0, 10)  # warm-up
            rows += [http_load(url, payloads, size, c, seconds, 2000) for c in levels]
    finally:
        stop()
    return {
        "replica_gpus": settings.replica_gpus,
        "deploy_s": deploy_s,
        "model_info": {k: v for k, v in info.items() if k not in ("classes",)},
        "device": info.get("device"),
        "load": rows,
        "cells_per_s": max(row["cells_per_s"] for row in rows),
    }


def request_bodies(check: Check, n_genes: int, size: int) -> list[bytes]:
    """Sparse JSON requests of ``size`` real (ingested) cells each, at most 8 bodies."""
    from scbert_platform.track.pyfunc import shard_counts
    from scbert_serve.schema import sparse_cells

    panel = (check.shards / "panel.txt").read_text().split()
    assert len(panel) == n_genes, "the served model's panel is the shards' panel"
    frame, _ = shard_counts(check.shards, panel, n_cells=min(8 * size, check.sizes["cells"]))
    bodies = []
    for b in range(8):
        cells = sparse_cells(frame.iloc[[(b * size + i) % len(frame) for i in range(size)]])
        for position, cell in enumerate(cells):
            cell["id"] += f"-{position}"  # a cell may repeat
        bodies.append(json.dumps({"cells": cells}).encode())
    return bodies


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- part 4: offline annotation on Ray Data --------------------------------------------------


def part_annotate(check: Check) -> Figures:
    """``scbert annotate --distributed`` over the synthetic cells: wall time and cells/s."""
    if not (check.model / "config.json").is_file() or not check.h5ad.is_file():
        raise Skip("no synthetic cells or model (the prep step failed: see logs/prep.log)")
    cmd = scbert(
        "annotate", str(check.h5ad), "-m", str(check.model),
        "-o", str(check.work / "annotated.h5ad"), "--distributed", "--backed",
        "--device", check.device, "--quiet",
        "--batch-size", "256" if check.cuda else "64",
    )  # fmt: skip
    start = time.perf_counter()
    done = check.run(cmd)
    wall = time.perf_counter() - start
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    n_cells = sum(summary.get("cell_types", {}).values()) or check.sizes["cells"]
    return {
        "n_cells": n_cells,
        "wall_s": wall,
        "cells_per_s": n_cells / wall,
        "summary": summary,
    }


# ---- running a step, and the report ----------------------------------------------------------

STEPS: dict[str, Callable[[Check], Figures]] = {
    "prep": prep,
    "speed": part_speed,
    "train": part_train,
    "serve": part_serve,
    "annotate": part_annotate,
}


def run_step(check: Check, name: str) -> int:
    """Run one step; its status JSON is written whatever happens (a timeout's SIGTERM too)."""

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # finally blocks run: Serve is stopped, Ray shut down

    signal.signal(signal.SIGTERM, terminated)
    (check.out / "parts").mkdir(parents=True, exist_ok=True)
    (check.out / "logs").mkdir(parents=True, exist_ok=True)
    check.work.mkdir(parents=True, exist_ok=True)
    check.log = check.out / "logs" / f"{name}.log"
    result: Figures = {"name": name, "title": PARTS.get(name, "inputs for parts 2-4")}
    start = time.perf_counter()
    try:
        absent = missing(NEEDS[name])
        if absent:
            raise Skip(f"{', '.join(absent)} not importable by {sys.executable}")
        result.update(status="ok", reason="", figures=STEPS[name](check))
    except Skip as skip:
        result.update(status="skipped", reason=str(skip))
    except KeyboardInterrupt:
        result.update(status="failed", reason="stopped (its timeout, or Ctrl-C)")
    except Exception as error:  # a failed part is reported, and the next part still runs
        result.update(status="failed", reason=f"{type(error).__name__}: {error}")
    result["seconds"] = time.perf_counter() - start
    path = check.out / "parts" / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{name}: {result['status']} in {result['seconds']:.0f} s {result['reason']}".rstrip())
    return 0


def headline(name: str, figures: Figures) -> str:
    """One line of a part's figures for the Markdown table."""
    if name == "speed":
        return "; ".join(f"{r['row']} {r['cells_per_s']:.1f} cells/s" for r in figures["rows"])
    if name == "train":
        runs = figures["runs"]
        if len(runs) > 1:
            how = f"resumed from step {figures['resumed_from_step']} to {runs[1]['steps']}"
        else:
            how = f"{runs[0]['steps']} steps (--quick: no resume)"
        return f"{figures['cells_per_s']:.1f} cells/s (MLflow train/cells_per_s); {how}"
    if name == "serve":
        rows = [
            f"{r['cells_per_request']} cells x {r['concurrency']} clients: p50 {r['p50_ms']:.0f} / "
            f"p95 {r['p95_ms']:.0f} / p99 {r['p99_ms']:.0f} ms, {r['cells_per_s']:.0f} cells/s"
            for r in figures["load"]
        ]
        return f"device {figures['device']}; " + "; ".join(rows)
    if name == "annotate":
        return (
            f"{figures['n_cells']:,} cells in {figures['wall_s']:.1f} s, "
            f"{figures['cells_per_s']:.0f} cells/s"
        )
    if name == "prep":
        return f"{figures['n_cells']:,} cells x {figures['n_genes']:,} genes"
    return ""


def load_status(out: Path, name: str) -> Figures:
    """A step's status JSON, or what its exit code says when it wrote none (killed)."""
    path = out / "parts" / f"{name}.json"
    if path.is_file():
        return dict(json.loads(path.read_text()))
    rc_file = out / "parts" / f"{name}.rc"
    rc = rc_file.read_text().split() if rc_file.is_file() else ["?", "?"]
    why = f"timed out after {rc[1]} s" if rc[0] in ("124", "137") else f"exited {rc[0]}"
    return {"name": name, "title": PARTS.get(name, ""), "status": "failed", "reason": why}


def report(out: Path, device: str, quick: bool, wall_s: float | None) -> int:
    """``report.json`` and ``report.md`` from the parts; 1 when a part that ran failed."""
    steps = {name: load_status(out, name) for name in ("prep", *PARTS)}
    summary = {
        "device": device,
        "quick": quick,
        "python": sys.executable,
        "torch": torch_version(),
        "wall_s": wall_s,
        "ok": all(steps[name]["status"] != "failed" for name in PARTS),
        "prep": steps["prep"],
        "parts": {name: steps[name] for name in PARTS},
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [
        f"# GPU check: device {device}{' (quick)' if quick else ''}",
        "",
        f"python {sys.executable}, torch {summary['torch']}"
        + (f", {wall_s:.0f} s in all" if wall_s is not None else ""),
        "",
        "| part | status | seconds | figures or reason |",
        "|---|---|---:|---|",
    ]
    for name, step in steps.items():
        text = step.get("reason") or ""
        if step["status"] == "ok":
            text = headline(name, step["figures"])
        text = text.replace("|", "/").replace("\n", " ")
        seconds = f"{step['seconds']:.0f}" if "seconds" in step else "-"
        lines.append(f"| {name}: {step.get('title', '')} | {step['status']} | {seconds} | {text} |")
    lines += ["", "Each part's figures: report.json; its commands' output: logs/PART.log.", ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if summary["ok"] else 1


def torch_version() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    cuda = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{torch.__version__}{cuda}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prep", "part", "report"])
    parser.add_argument("name", nargs="?", choices=list(PARTS), help="the part (step part)")
    parser.add_argument("--out", required=True, help="the report folder")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    parser.add_argument("--wall-s", type=float, help="report: the whole check's wall time")
    args = parser.parse_args(argv)
    if args.step == "report":
        return report(Path(args.out), args.device, args.quick, args.wall_s)
    if args.step == "part" and args.name is None:
        parser.error("part: name one of " + ", ".join(PARTS))
    return run_step(Check(args), args.name if args.step == "part" else "prep")


if __name__ == "__main__":
    raise SystemExit(main())
