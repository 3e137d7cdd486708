"""Outputs never destroy what this project did not write: a directory output replaces only an
absent or empty path or an earlier output of its kind; anything else is refused (exit 2) unless
--overwrite, and the root, home and current directories and the inputs never are."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import PBMC_PARAMS, build_model, scbert_cli, tiny_config

from scbert import atomic, save_pretrained


def foreign(folder: Path) -> Path:
    """A folder of the user's own files."""
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "day1.md").write_text("my notes")
    (folder / "results.csv").write_text("a,b\n1,2\n")
    return folder


def survived(folder: Path) -> bool:
    return (folder / "notes" / "day1.md").read_text() == "my notes" and (
        folder / "results.csv"
    ).is_file()


def no_leftovers(parent: Path, *names: str) -> bool:
    """Nothing but ``names`` in ``parent``: no staging or .old directory left behind."""
    return sorted(p.name for p in parent.iterdir()) == sorted(names)


def test_a_directory_output_replaces_only_what_it_wrote(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic.atomic_directory(target, kind="explanation") as staging:  # absent
        (staging / "top_genes.csv").write_text("first")
    marker = json.loads((target / atomic.MARKER).read_text())
    assert marker == {"kind": "explanation", "format_version": atomic.MARKER_VERSION}
    with atomic.atomic_directory(target, kind="explanation") as staging:  # its own output
        (staging / "top_genes.csv").write_text("second")
    assert (target / "top_genes.csv").read_text() == "second"
    assert no_leftovers(tmp_path, "out")

    with pytest.raises(atomic.OutputError, match="scBERT explanation, not shards"):
        atomic.check_output(target, kind="shards")
    (tmp_path / "empty").mkdir()
    atomic.check_output(tmp_path / "empty", kind="shards")
    legacy = tmp_path / "legacy"  # shards written before the marker existed
    legacy.mkdir()
    (legacy / "manifest.json").write_text("{}")
    (legacy / "panel.txt").write_text("CD3E\n")
    atomic.check_output(legacy, kind="shards")


def test_foreign_files_survive_unless_overwrite(tmp_path: Path) -> None:
    mine = foreign(tmp_path / "mine")
    (tmp_path / ".mine.old").mkdir()  # a name the replacement once used for the old copy
    with (
        pytest.raises(atomic.OutputError, match=r"mine exists and holds 2 entries .* --overwrite"),
        atomic.atomic_directory(mine, kind="shards") as staging,
    ):
        (staging / "manifest.json").write_text("{}")
    assert survived(mine)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(atomic.OutputError, match="holds a file"):
        atomic.check_output(afile, kind="shards")
    with pytest.raises(atomic.OutputError, match="is a directory"), atomic.atomic_file(mine):
        pass
    assert survived(mine)

    with atomic.atomic_directory(mine, kind="shards", overwrite=True) as staging:
        (staging / "manifest.json").write_text("{}")
    assert sorted(p.name for p in mine.iterdir()) == [atomic.MARKER, "manifest.json"]
    assert no_leftovers(tmp_path, "mine", ".mine.old", "afile")


@pytest.mark.parametrize("where", ["root", "home", "cwd", "parent of cwd", "input", "input's dir"])
def test_some_paths_are_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    source = work / "data" / "in.h5ad"
    source.write_text("input")
    monkeypatch.chdir(work)
    target = {
        "root": Path("/"),
        "home": Path("~"),
        "cwd": Path("."),
        "parent of cwd": Path(".."),
        "input": source,
        "input's dir": Path("data"),
    }[where]
    with pytest.raises(atomic.OutputError, match="refusing to replace"):
        atomic.check_output(target, kind="shards", overwrite=True, inputs=[source])
    assert source.read_text() == "input"


def test_a_symlinked_output_is_foreign(tmp_path: Path) -> None:
    mine = foreign(tmp_path / "mine")
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(atomic.OutputError, match="symbolic link"):
        atomic.check_output(tmp_path / "link", kind="checkpoint")
    assert survived(mine)


def test_save_pretrained_refuses_a_folder_of_other_files(tmp_path: Path) -> None:
    mine = foreign(tmp_path / "mine")
    model = build_model(tiny_config(n_genes=4))
    with pytest.raises(atomic.OutputError, match="--overwrite"):
        save_pretrained(model, mine, panel=["A", "B", "C", "D"])
    assert survived(mine)
    save_pretrained(model, tmp_path / "ckpt", panel=["A", "B", "C", "D"])
    save_pretrained(model, tmp_path / "ckpt", panel=["A", "B", "C", "E"])  # its own: replaced
    assert (tmp_path / "ckpt" / "panel.txt").read_text().split() == ["A", "B", "C", "E"]


def _params_file(tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"data": PBMC_PARAMS}))
    return path


def test_ingest_out_refuses_foreign_files_and_replaces_its_own(
    tmp_path: Path, pbmc_h5ad: Path
) -> None:
    params = ["--params", str(_params_file(tmp_path)), "--executor", "local"]
    notes = foreign(tmp_path / "my_notes")
    refused = scbert_cli(tmp_path, "ingest", str(pbmc_h5ad), "--out", "my_notes", *params)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("scbert ingest: error: my_notes exists and holds 2 entries")
    assert "--overwrite" in refused.stderr and "ingest" not in refused.stdout
    assert survived(notes)
    # the root, home and current directories and the input's folder: unit-tested above
    first = scbert_cli(tmp_path, "ingest", str(pbmc_h5ad), "--out", "cells", *params)
    assert first.returncode == 0, first.stderr
    written = (tmp_path / "cells" / "manifest.json").stat().st_mtime_ns
    again = scbert_cli(tmp_path, "ingest", str(pbmc_h5ad), "--out", "cells", *params)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "cells" / "manifest.json").stat().st_mtime_ns != written
    assert no_leftovers(tmp_path, "my_notes", "cells", "params.yaml")

    forced = scbert_cli(
        tmp_path, "ingest", str(pbmc_h5ad), "--out", "my_notes", "--overwrite", *params
    )
    assert forced.returncode == 0, forced.stderr
    assert atomic.output_kind(notes) == "shards" and not (notes / "results.csv").exists()


@pytest.mark.parametrize("verb", ["pretrain", "finetune", "explain"])
def test_training_and_explain_refuse_a_foreign_out_before_any_work(
    tmp_path: Path, pbmc_shards: Path, pbmc_h5ad: Path, verb: str
) -> None:
    notes = foreign(tmp_path / "my_notes")
    if verb == "explain":
        args = ["explain", str(pbmc_h5ad), "--model", "models:/nothing@champion"]
        an_input = pbmc_h5ad.parent
    else:
        args = [verb, str(pbmc_shards)]
        an_input = pbmc_shards
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # were Ray started, it would fail at once
    refused = scbert_cli(tmp_path, *args, "--out", "my_notes", env=env)
    assert refused.returncode == 2, refused.stderr
    assert f"scbert {verb}: error: my_notes exists and holds 2 entries" in refused.stderr
    assert survived(notes)
    refused = scbert_cli(tmp_path, *args, "--out", str(an_input), "--overwrite", env=env)
    assert refused.returncode == 2 and "holds the input" in refused.stderr, refused.stderr


def test_finetune_out_is_copied_atomically_over_an_earlier_model(tmp_path: Path) -> None:
    """`scbert finetune --out` goes through copy_directory: an earlier model is replaced whole,
    a folder of other files is kept."""
    model = build_model(tiny_config(n_genes=4))
    first = save_pretrained(model, tmp_path / "run1", panel=["A", "B", "C", "D"])
    second = save_pretrained(model, tmp_path / "run2", panel=["A", "B", "C", "E"])
    (tmp_path / "run1" / "extra.txt").write_text("only in run 1")
    atomic.copy_directory(first, tmp_path / "model", kind="checkpoint")
    atomic.copy_directory(second, tmp_path / "model", kind="checkpoint")
    assert (tmp_path / "model" / "panel.txt").read_text().split()[-1] == "E"
    assert not (tmp_path / "model" / "extra.txt").exists()
    with pytest.raises(atomic.OutputError):
        atomic.copy_directory(second, foreign(tmp_path / "mine"), kind="checkpoint")
    assert survived(tmp_path / "mine")
