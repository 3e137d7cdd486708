"""Shared helpers: tiny configs, random tokens, and the published fixtures' location."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from scbert import ScBert, ScBertConfig, load_published
from scbert.checkpoint import to_published_state_dict

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest processes on a 2-core machine: one torch thread each (and in
    # the processes they start: Ray's workers, the CLI, the tutorial's kernel). With torch's
    # default of a thread per core, two processes computing at once oversubscribe the cores and
    # OpenMP's waiting threads spin: test_model's 12,500 small QR decompositions took 130 s
    # instead of 3 s beside the tutorial in a clean-clone run (2026-11-29).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the repo: checkpoints and outputs written by the published scBERT code
PUBLISHED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "original_scbert"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files that start Ray (a test marked ``ray`` or ``slow``) first, each file's tests in
    their order: ``make test``'s two processes take whole files in this order, so the quick files
    come last and fill the end of the run on both, instead of one process running the last Ray
    file alone (2026-11-29: the tutorial's 143 s at the end of a 1,166 s run, the other idle)."""
    heavy = {
        item.path
        for item in items
        if item.get_closest_marker("ray") or item.get_closest_marker("slow")
    }
    items.sort(key=lambda item: item.path not in heavy)  # stable: the folder's order otherwise


TINY: dict[str, Any] = {
    "n_genes": 24,
    "n_bins": 5,
    "dim": 16,
    "depth": 1,
    "heads": 2,
    "dim_head": 8,
    "nb_features": 16,
    "cls_hidden": (16, 8),
}


def tiny_config(**overrides: Any) -> ScBertConfig:
    """A config small enough for a CPU unit test (paper sizes: see ScBertConfig's defaults)."""
    return ScBertConfig(**{**TINY, **overrides})


def build_model(config: ScBertConfig, *, seed: int = 0) -> ScBert:
    """ScBert with seeded random weights (and a seeded random gene2vec when the kind needs it)."""
    generator = torch.Generator().manual_seed(seed)
    gene2vec = None
    if config.gene_embedding == "gene2vec":
        gene2vec = torch.randn(config.n_genes, config.dim, generator=generator)
    torch.manual_seed(seed)
    return ScBert(config=config, gene2vec=gene2vec)


def random_tokens(
    n_cells: int, n_genes: int, n_bins: int, *, seed: int = 0, density: float = 0.4
) -> torch.Tensor:
    """Model input (n_cells, n_genes + 1): ~density of genes expressed (tokens 1..n_bins, some 0),
    the appended position 0."""
    generator = torch.Generator().manual_seed(seed)
    expressed = torch.rand(n_cells, n_genes, generator=generator) < density
    values = torch.randint(0, n_bins + 1, (n_cells, n_genes), generator=generator) * expressed
    return torch.cat([values, torch.zeros(n_cells, 1, dtype=torch.int64)], dim=1)


@pytest.fixture
def make_model() -> Callable[..., ScBert]:
    """Factory: ``make_model(seed=0, **config_overrides)`` -> tiny ScBert in eval mode."""

    def make(*, seed: int = 0, **overrides: Any) -> ScBert:
        return build_model(tiny_config(**overrides), seed=seed).eval()

    return make


@pytest.fixture
def published_dir() -> Path:
    """The published-code fixtures; the test is skipped when ../shared is not checked out."""
    if not (PUBLISHED_FIXTURES / "expected.pt").is_file():
        pytest.skip(f"published scBERT fixtures not found at {PUBLISHED_FIXTURES}")
    return PUBLISHED_FIXTURES


def sharpen(model: ScBert, *, scale: float = 2.0) -> ScBert:
    """The same model with its query and key weights scaled up, in eval mode.

    Default-initialised tiny models attend almost uniformly, and their cells' key stabilisers
    hardly differ, so tests of attention statistics and of batch invariance would have no teeth.
    Goes through the published layout, whose names are fixed.
    """
    state = to_published_state_dict(model)
    for key in state:
        if key.endswith(("to_q.weight", "to_k.weight")):
            state[key] = state[key] * scale
    return load_published(state).eval()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MLflow's embedded defaults (mlruns.db, mlartifacts/) land in a fresh directory."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tiny_params(storage: Path, **train: Any) -> Any:
    """Params of a tiny model and a few training steps (Ray Train, sweep and CV tests)."""
    from scbert_platform.params import DataParams, ModelParams, Params, TrainParams

    model = ModelParams(
        dim=16, depth=1, heads=2, dim_head=8, nb_features=16, gene_embedding="learned"
    )
    data = DataParams(shuffle_buffer=128)
    defaults: dict[str, Any] = {
        "batch_size": 16,
        "grad_accum": 1,
        "max_steps": 8,
        "ckpt_every": 4,
        "val_every": 4,
        "log_every": 2,
        "lr": 1e-3,
        "schedule": "constant",
        "storage_path": str(storage),
        "cpus_per_worker": 0.5,
        # a few steps of a tiny model may well predict one class: not what these tests are about
        "collapse_check": False,
    }
    return Params(model=model, data=data, train=TrainParams(**(defaults | train)))


@pytest.fixture(scope="session")
def _ray_shutdown_at_exit() -> Any:
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def ray_local(_ray_shutdown_at_exit: None) -> Any:
    """A local Ray (2 CPUs as on this machine, no dashboard), started once and kept; a test that
    needs another cluster shuts it down, and the next test using this fixture starts it again."""
    ray = pytest.importorskip("ray")
    from scbert_platform.cluster import start_ray

    start_ray(num_cpus=2)
    return ray


def scbert_cli(
    workdir: Path, *args: str, timeout: float = 600, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """``scbert ARGS`` in ``workdir`` as a user would run it (output captured, not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "scbert_platform.cli", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def mlflow_client(workdir: Path) -> Any:
    """A client on the tracking store the CLI uses in ``workdir`` (its embedded SQLite file)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlruns.db'}")


def child_runs(workdir: Path, parent: Any) -> list[Any]:
    """The MLflow child runs of ``parent`` (a sweep's or CV's trials)."""
    return mlflow_client(workdir).search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )


# What only Ray's and the libraries' internals print: none of it reaches a user's screen unless
# they ask for it (--verbose); tests of a verb's output check for their absence
NOISE = (
    "Reporting training result",  # Ray Train, every report of every worker
    "(RayTrainWorker",  # worker output forwarded to the driver
    "(TrainController",
    "(SplitCoordinator",
    "(DatasetManager",
    "(raylet)",  # e.g. "8 PYTHON worker processes ... 4x the maximum"
    "Execution plan of Dataset",
    "PreemptionWatcher",
    "exclude_resources",
    "Token authentication is enabled",
    "INFO mlflow",
    "Downloading artifacts",
    "Configuration for experiment",  # Tune's console output
    "View detailed results here",
    "\r",  # a redrawn bar where no terminal is
)


def noise_in(text: str) -> list[str]:
    """The NOISE patterns found in ``text``."""
    return [pattern for pattern in NOISE if pattern in text]


def listeners(root: int | None = None) -> list[tuple[int, str, str, int]]:
    """(pid, process, address, port) of every listening TCP socket of the process ``root``
    (default: this one) and its descendants; none where ``root`` has ended."""
    import psutil

    try:
        top = psutil.Process(root)
        processes = [top, *top.children(recursive=True)]
    except psutil.Error:
        return []
    found = []
    for process in processes:
        try:
            connections, name = process.net_connections(kind="inet"), process.name()
        except psutil.Error:  # ended meanwhile
            continue
        found += [
            (process.pid, name, c.laddr.ip, c.laddr.port)
            for c in connections
            if c.status == psutil.CONN_LISTEN
        ]
    return found


def off_loopback(found: list[tuple[int, str, str, int]]) -> list[tuple[int, str, str, int]]:
    """The ``listeners`` not bound to a loopback address."""
    import ipaddress

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback

    return [entry for entry in found if not loopback(entry[2])]


PBMC_PARAMS: dict[str, Any] = {
    "use_raw": True,
    "input": "log1p",
    "label_key": "bulk_labels",
    "panel_min_cells": 1,
}


@pytest.fixture(scope="session")
def pbmc_h5ad() -> Path:
    """scanpy's bundled real dataset: 700 Zheng68K PBMCs, 10 labels, log-normalised .raw."""
    from scbert_platform.data.datasets import bundled_path

    return bundled_path("pbmc68k_reduced")


@pytest.fixture(scope="session")
def pbmc_shards(tmp_path_factory: pytest.TempPathFactory, pbmc_h5ad: Path) -> Path:
    """The real dataset ingested once per session (in this process)."""
    from scbert_platform.data.ingest import ingest
    from scbert_platform.params import DataParams

    out = tmp_path_factory.mktemp("cells") / "pbmc68k"
    ingest(pbmc_h5ad, out, DataParams(**PBMC_PARAMS), executor="local", log=lambda _: None)
    return out


def write_tenx_h5(adata: Any, path: Path) -> Path:
    """A Cell Ranger v3 ``filtered_feature_bc_matrix.h5`` of ``adata``'s counts (no per-cell
    metadata; Ensembl-like ids, the var names as symbols)."""
    import h5py
    import numpy as np
    import scipy.sparse as sp

    x = sp.csr_matrix(adata.X).astype(np.int32)
    with h5py.File(path, "w") as f:
        matrix = f.create_group("matrix")
        for name in ("data", "indices", "indptr"):
            matrix[name] = getattr(x, name)
        matrix["shape"] = np.array([adata.n_vars, adata.n_obs], dtype=np.int32)
        matrix["barcodes"] = np.array(adata.obs_names, dtype="S")
        features = matrix.create_group("features")
        features["id"] = np.array([f"ENSG{j:011d}" for j in range(adata.n_vars)], dtype="S")
        features["name"] = np.array(adata.var_names, dtype="S")
        features["feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")
        features["genome"] = np.array(["GRCh38"] * adata.n_vars, dtype="S")
    return path


def write_tenx_mtx(adata: Any, folder: Path) -> Path:
    """A Cell Ranger v3 matrix folder of ``adata``'s counts: genes x cells matrix.mtx.gz,
    features.tsv.gz, barcodes.tsv.gz (no per-cell metadata)."""
    import gzip

    import numpy as np
    import scipy.io
    import scipy.sparse as sp

    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(adata.X.T).astype(np.int64), field="integer")
    features = [f"ENSG{j:011d}\t{g}\tGene Expression" for j, g in enumerate(adata.var_names)]
    with gzip.open(folder / "features.tsv.gz", "wt") as handle:
        handle.write("\n".join(features) + "\n")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as handle:
        handle.write("\n".join(adata.obs_names) + "\n")
    return folder


TOY_PANEL = [f"G{i}" for i in range(24)]
TOY_CLASSES = ["B", "NK", "T"]


def finetuned_run(
    workdir: Path,
    macro_f1: float | None,
    *,
    seed: int = 0,
    manifest: str = "m1",
    panel: str = "p1",
    genes: list[str] | None = None,
    classes: list[str] | None = None,
    dataset: str = "toy",
) -> str:
    """A fine-tuning run as `scbert finetune` leaves it (tags, metrics, a pyfunc model), with a
    tiny random-weight model on ``genes`` (default: 24 toy genes) and ``classes``."""
    import mlflow
    import pandas as pd

    from scbert import save_pretrained
    from scbert_platform.track.pyfunc import log_pyfunc
    from scbert_platform.track.runs import MODEL_URI_TAG, experiment_id

    genes, classes = genes or TOY_PANEL, classes or TOY_CLASSES
    checkpoint = workdir / f"ckpt-{seed}"
    config = tiny_config(n_genes=len(genes), n_classes=len(classes), gene_embedding="learned")
    save_pretrained(build_model(config, seed=seed), checkpoint, panel=genes, classes=classes)
    half = len(genes) // 2
    example = pd.DataFrame(
        [[3.0] * half + [0.0] * (len(genes) - half), [0.0] * half + [5.0] * (len(genes) - half)],
        columns=genes,
    )
    with mlflow.start_run(experiment_id=experiment_id("scbert-finetune")) as run:
        mlflow.set_tags(
            {
                "scbert.dataset": dataset,
                "scbert.manifest_sha256": manifest,
                "scbert.panel_sha256": panel,
            }
        )
        if macro_f1 is not None:
            mlflow.log_metric("cv/macro_f1", macro_f1)
        mlflow.set_tag(MODEL_URI_TAG, log_pyfunc(checkpoint, example))
    return str(run.info.run_id)
