"""Faults through the pipeline, each made for real: shards and checkpoints damaged on disk, a
second process holding the MLflow database, a full disk under ingest, SIGKILL inside promote.

Each must end in one line that names the file and what to do, with earlier results (the shards,
the previous output, the registry's aliases) left consistent.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import build_model, finetuned_run, tiny_config

from scbert_platform.data.errors import ShardError

NAME = "scbert-toy"
SHARD = "part-00000.parquet"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``scbert ARGV`` in this process (no interpreter start-up): exit code and stderr."""
    from scbert_platform.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def error_line(stderr: str, verb: str) -> str:
    """The verb's error: its last line, one line, no traceback before it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"scbert {verb}: error: "), stderr[-3000:]
    return last


def damaged_copy(shards: Path, directory: Path, damage: str) -> Path:
    """A copy of an ingested directory with one fault made on disk."""
    copy = shutil.copytree(shards, directory)
    shard = copy / SHARD
    data = shard.read_bytes()
    if damage == "truncated":  # a copy or a download cut short
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "corrupted":  # bytes overwritten in the middle, same size (a bad disk)
        middle = len(data) // 2
        shard.write_bytes(data[:middle] + bytes(range(256)) * 16 + data[middle + 4096 :])
    elif damage == "no manifest":
        (copy / "manifest.json").unlink()
    elif damage == "manifest not JSON":  # cut short while being written by hand
        text = (copy / "manifest.json").read_text()
        (copy / "manifest.json").write_text(text[: len(text) // 2])
    return copy


def assert_every_reader_refuses(directory: Path, message: str) -> None:
    """Training's and CV's loaders (local and Ray Data), CV's planner, gene-embed and the
    baselines all stop on the directory before reading a row, with ``message``."""
    from scbert_platform.data.gene_embed import learn_gene_embeddings
    from scbert_platform.data.loader import ShardInfo, cell_dataset, iter_local_batches
    from scbert_platform.params import Params
    from scbert_tune.baselines import cross_validate
    from scbert_tune.cv import plan

    readers: dict[str, Callable[[], object]] = {
        "ShardInfo": lambda: ShardInfo.read(directory),
        "local batches": lambda: next(iter_local_batches(directory, 5)),
        "Ray Data": lambda: cell_dataset(directory, 5),
        "cv plan": lambda: plan(directory, Params()),
        "gene embed": lambda: learn_gene_embeddings(directory, dim=4, progress=False),
        "baseline": lambda: cross_validate(directory, "logreg"),
    }
    for name, read in readers.items():
        with pytest.raises(ShardError, match=message):
            read()
        print(f"{name}: refused")  # shown when a later reader does not


def test_a_truncated_shard_is_named_before_training_starts(
    pbmc_shards: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = damaged_copy(pbmc_shards, workdir / "cells", "truncated")
    assert_every_reader_refuses(shards, rf"{SHARD} is truncated or corrupted \(.* bytes")
    code, stderr = cli(capsys, "finetune", str(shards), "--params", "none.yaml")
    line = error_line(stderr, "finetune")
    assert code == 2
    assert str(shards / SHARD) in line
    assert "`scbert ingest " in line and f"--out {shards}`" in line and "dvc checkout" in line
    assert not (workdir / "mlruns.db").exists()  # refused before an MLflow run was begun


def test_a_shard_corrupted_in_place_is_named(
    pbmc_shards: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same size, so only its sha256 gives it away (the Parquet footer still reads)."""
    import pyarrow.parquet as pq

    shards = damaged_copy(pbmc_shards, workdir / "cells", "corrupted")
    assert pq.ParquetFile(shards / SHARD).metadata.num_rows > 0
    assert_every_reader_refuses(shards, rf"{SHARD} is corrupted \(its sha256")
    code, stderr = cli(capsys, "cv", str(shards), "--skip-scbert", "--baseline", "logreg")
    assert code == 2 and str(shards / SHARD) in error_line(stderr, "cv")


@pytest.mark.parametrize("damage", ["no manifest", "manifest not JSON"])
def test_a_missing_or_broken_manifest_is_named(
    pbmc_shards: Path, workdir: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    from scbert_platform.data.loader import ShardInfo

    shards = damaged_copy(pbmc_shards, workdir / "cells", damage)
    problem = "is missing" if damage == "no manifest" else r"is not valid JSON \(.*line"
    with pytest.raises(ShardError, match=rf"manifest\.json {problem}"):
        ShardInfo.read(shards)
    code, stderr = cli(capsys, "finetune", str(shards), "--params", "none.yaml")
    line = error_line(stderr, "finetune")
    assert code == 2 and str(shards / "manifest.json") in line and "scbert ingest" in line


def test_a_damaged_checkpoint_is_named_wherever_it_is_loaded(
    pbmc_shards: Path, pbmc_h5ad: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scbert import load_pretrained, save_pretrained
    from scbert.checkpoint import CheckpointError
    from scbert_platform.data.loader import ShardInfo
    from scbert_platform.infer.models import load_model, resolve_model
    from scbert_platform.train.distributed import TrainingError, check_init_from

    info = ShardInfo.read(pbmc_shards)
    config = tiny_config(n_genes=info.n_genes, n_classes=len(info.labels))
    good = save_pretrained(
        build_model(config), workdir / "good", panel=info.panel, classes=info.labels
    )
    weights = (good / "model.safetensors").read_bytes()
    middle = len(weights) // 2

    def damaged(name: str, data: bytes | None, *, digest: bool = True) -> Path:
        directory = shutil.copytree(good, workdir / name)
        if data is None:
            (directory / "model.safetensors").unlink()
        else:
            (directory / "model.safetensors").write_bytes(data)
        if not digest:  # a checkpoint written before config.json recorded the digest
            meta = json.loads((directory / "config.json").read_text())
            del meta["weights_sha256"]
            (directory / "config.json").write_text(json.dumps(meta))
        return directory

    cases = {
        damaged("missing", None): (FileNotFoundError, "model.safetensors missing"),
        damaged("truncated", weights[:middle]): (CheckpointError, "truncated or corrupted"),
        damaged("corrupted", weights[:middle] + b"\xff" * 64 + weights[middle + 64 :]): (
            CheckpointError,
            "truncated or corrupted",
        ),
        damaged("old, truncated", weights[:middle], digest=False): (
            CheckpointError,
            "truncated or corrupted .*incomplete metadata",
        ),
    }
    for directory, (kind, message) in cases.items():
        path = str(directory / "model.safetensors")
        for load in (load_pretrained, lambda d: load_model(resolve_model(str(d)))):
            with pytest.raises(kind, match=message) as error:
                load(directory)
            assert path in str(error.value) and "write it again" in str(error.value)
        with pytest.raises(TrainingError, match=re.escape(f"--init-from {directory} cannot")):
            check_init_from(directory, info)
        out = workdir / "annotated.h5ad"
        code, stderr = cli(
            capsys, "annotate", str(pbmc_h5ad), "--model", str(directory), "--out", str(out)
        )
        assert code == 2 and path in error_line(stderr, "annotate") and not out.exists()
    code, stderr = cli(
        capsys,
        "finetune",
        str(pbmc_shards),
        "--init-from",
        str(workdir / "truncated"),
        "--set",
        "model.gene_embedding=learned",
    )
    assert code == 2 and "truncated/model.safetensors" in error_line(stderr, "finetune")
    load_pretrained(good)  # the original is untouched


# ---------------------------------------------------------------------------------------------
# The registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry after some use: version 1 the champion, version 2 the challenger. Tests copy
    its database (the model artifacts stay here, where the database points)."""
    from scbert_platform.track.registry import promote, register

    directory = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        use_registry(directory, patch)
        register(finetuned_run(directory, 0.8, seed=0))
        promote(NAME, force_reason="the first model")
        register(finetuned_run(directory, 0.8, seed=1))
    return directory


def use_registry(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``directory``'s mlruns.db the one this process uses, as the CLI run there would.
    mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which would win over the directory:
    set then cleared, so that the patch's undo also removes what MLflow sets."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(directory)


def copy_registry(source: Path, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "mlruns.db", directory / "mlruns.db")
    return directory


def version(directory: Path, alias: str) -> Any:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{directory / 'mlruns.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(NAME, alias)


def history(model_version: Any) -> list[dict[str, Any]]:
    return list(json.loads(model_version.tags["scbert.alias_history"]))


# holds the database the way a sqlite3 shell with an open transaction does, until told to stop
HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


def test_a_locked_database_is_named_and_waited_for(
    registry: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scbert_platform.track.registry import promote

    database = copy_registry(registry, workdir) / "mlruns.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, stderr = cli(capsys, "promote", NAME, "--force", "while locked")
    finally:
        holder.communicate("release\n", timeout=60)
    line = error_line(stderr, "promote")
    assert code == 2
    assert f"the MLflow database {database} is locked by another process (waited" in line
    assert str(version(workdir, "champion").version) == "1"  # nothing moved
    assert promote(NAME, force_reason="lock released").version == "2"  # released: it works


@contextmanager
def small_disk(directory: Path, kib: int) -> Iterator[bool]:
    """A tmpfs of ``kib`` KiB at ``directory`` when this process may mount one (root with
    CAP_SYS_ADMIN); yields whether it is mounted."""
    directory.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(directory)]
    try:
        mounted = subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    except OSError:  # no mount command
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(directory)], check=True, timeout=30)


# Where no tmpfs can be mounted: the disk fills up half-way through the first shard
FULL_DISK = """
import errno, io, os, sys
import pyarrow.parquet as pq
from scbert_platform.cli import main
write_table = pq.write_table
def half_then_full(table, where, **kwargs):
    buffer = io.BytesIO()
    write_table(table, buffer, **kwargs)
    with open(where, "wb") as handle:
        handle.write(buffer.getvalue()[: buffer.tell() // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
pq.write_table = half_then_full
sys.exit(main(sys.argv[1:]))
"""


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_a_full_disk_during_ingest_keeps_the_previous_output(
    pbmc_shards: Path, pbmc_h5ad: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    used_kib = sum(-(-p.stat().st_size // 4096) * 4 for p in pbmc_shards.iterdir())
    with small_disk(workdir / "disk", used_kib + 128) as mounted:  # no room for a second copy
        out = shutil.copytree(pbmc_shards, workdir / "disk" / "cells")
        before = digests(out)
        argv = [
            "ingest",
            str(pbmc_h5ad),
            "--out",
            str(out),
            "--use-raw",
            "--input",
            "log1p",
            "--label-key",
            "bulk_labels",
            "--set",
            "data.panel_min_cells=1",
            "--executor",
            "local",
        ]
        if mounted:
            code, stderr = cli(capsys, *argv)
        else:
            run = subprocess.run(
                [sys.executable, "-c", FULL_DISK, *argv],
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=300,
            )
            code, stderr = run.returncode, run.stderr
        line = error_line(stderr, "ingest")
        assert code == 2
        assert f"no space left on the device while writing {out}" in line
        assert f"the previous {out} is unchanged" in line
        assert digests(out) == before
        assert [p.name for p in (workdir / "disk").iterdir()] == ["cells"]  # no staging left
    print("a real tmpfs" if mounted else "ENOSPC simulated (no tmpfs could be mounted)")


# One process per kill point, each forked from this one once it has imported what `scbert`
# needs (eight interpreter start-ups would be most of the test's time): process K runs the CLI
# in its directory and is killed (SIGKILL: no handler, no cleanup) at its K-th registry write.
KILL_AT_WRITE = """
import json, os, signal, sys
from mlflow.tracking import MlflowClient
import scbert_platform.train.distributed, scbert_platform.track.registry
from scbert_platform.cli import main
kill_at = 0
def killing(name):
    write = getattr(MlflowClient, name)
    def call(self, *args, **kwargs):
        global kill_at
        kill_at -= 1
        if kill_at == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return write(self, *args, **kwargs)
    setattr(MlflowClient, name, call)
for name in ("set_registered_model_tag", "set_model_version_tag", "set_registered_model_alias"):
    killing(name)
children = {}
for k, directory, *argv in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        os.chdir(directory)
        kill_at = k
        os._exit(main(argv))
    children[directory] = pid
print(json.dumps({d: os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for d, p in children.items()}))
"""
PROMOTE_WRITES = 5  # intent, previous champion, alias (the commit), forced reason, history
ROLLBACK_WRITES = 3  # intent, alias (the commit), history
REASON = "hotfix"


def test_promote_and_rollback_killed_at_every_step_leave_a_consistent_registry(
    registry: Path,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scbert_platform.track.registry import promote

    promoted = copy_registry(registry, workdir / "promoted")  # v2 champion, to roll back
    use_registry(promoted, monkeypatch)
    promote(NAME, force_reason=REASON)
    use_registry(workdir, monkeypatch)  # the processes below find their own database
    plan = []
    for verb, source, n_writes, argv in [
        ("promote", registry, PROMOTE_WRITES, ["promote", NAME, "--force", REASON]),
        ("rollback", promoted, ROLLBACK_WRITES, ["promote", NAME, "--rollback"]),
    ]:
        for k in range(1, n_writes + 2):  # the last one is not killed: it has n_writes writes
            directory = copy_registry(source, workdir / f"{verb}-{k}")
            plan.append((verb, k, n_writes, directory, argv))
    forks = json.dumps([[k, str(directory), *argv] for _, k, _, directory, argv in plan])
    run = subprocess.run(
        [sys.executable, "-c", KILL_AT_WRITE, forks], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    exit_codes = json.loads(run.stdout.strip().splitlines()[-1])
    for verb, k, n_writes, directory, _ in plan:
        killed = k <= n_writes
        assert exit_codes[str(directory)] == (-signal.SIGKILL if killed else 0), (verb, k)
        use_registry(directory, monkeypatch)
        if killed:
            check = check_killed_promote if verb == "promote" else check_killed_rollback
            check(directory, k, capsys)
        else:
            assert str(version(directory, "champion").version) == (
                "2" if verb == "promote" else "1"
            )


def check_killed_promote(directory: Path, k: int, capsys: pytest.CaptureFixture[str]) -> None:
    """Killed before its k-th write: the alias (write 3, the commit) has moved when k > 3, with
    the previous champion already recorded; promoting again completes the promotion once,
    neither refusing ("already the champion") nor recording it twice."""
    champion = version(directory, "champion")
    assert str(champion.version) == ("2" if k > 3 else "1"), k
    if k > 3:
        assert champion.tags["scbert.previous_champion"] == "1"  # rollback works right away
    code, stderr = cli(capsys, "promote", NAME, "--force", REASON)
    assert code == 0, stderr
    champion = version(directory, "champion")
    assert str(champion.version) == "2" and champion.tags["scbert.forced"] == REASON
    moves = [e for e in history(champion) if e["alias"] == "champion"]
    assert [(e["replaced"], e["why"]) for e in moves] == [("1", f"forced: {REASON}")], k
    code, stderr = cli(capsys, "promote", NAME, "--rollback")
    assert code == 0 and str(version(directory, "champion").version) == "1", stderr


def check_killed_rollback(directory: Path, k: int, capsys: pytest.CaptureFixture[str]) -> None:
    """Killed before its k-th write: the alias (write 2, the commit) has moved when k > 2;
    rolling back again ends on version 1 with one rollback in its history, never rolling back a
    second time past it."""
    assert str(version(directory, "champion").version) == ("1" if k > 2 else "2"), k
    code, stderr = cli(capsys, "promote", NAME, "--rollback")
    assert code == 0, stderr
    champion = version(directory, "champion")
    assert str(champion.version) == "1"
    rollbacks = [e for e in history(champion) if e["why"] == "rollback from version 2"]
    assert len(rollbacks) == 1, (k, history(champion))
    code, stderr = cli(capsys, "promote", NAME, "--force", REASON)  # and forward again
    assert code == 0 and str(version(directory, "champion").version) == "2", stderr
