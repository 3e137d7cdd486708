"""Our checkpoint directory (save_pretrained / load_pretrained) and the gene2vec loaders."""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model, random_tokens, tiny_config

from scbert import (
    ScBert,
    load_gene2vec_npy,
    load_gene2vec_text,
    load_pretrained,
    save_pretrained,
)
from scbert.atomic import MARKER

N_GENES = 24
PANEL = [f"GENE{i}" for i in range(N_GENES)]
CLASSES = ["B cell", "T cell", "NK cell"]


def classifier(seed: int = 0) -> ScBert:
    model = build_model(tiny_config(n_classes=3, depth=2), seed=seed).eval()
    model.encoder.redraw_projections(torch.Generator().manual_seed(seed + 100))
    return model


def pretraining_model(seed: int = 0) -> ScBert:
    return build_model(tiny_config(gene_embedding="learned"), seed=seed).eval()


def same_outputs(first: ScBert, second: ScBert) -> bool:
    tokens = random_tokens(3, N_GENES, 5, seed=1)
    with torch.no_grad():
        return torch.equal(first.eval()(tokens), second.eval()(tokens))


def test_classifier_round_trip(tmp_path: Path) -> None:
    model = classifier()
    directory = save_pretrained(model, tmp_path / "ckpt", panel=PANEL, classes=CLASSES)
    assert directory == tmp_path / "ckpt"
    files = sorted(p.name for p in directory.iterdir())
    assert files == [MARKER, "config.json", "labels.json", "model.safetensors", "panel.txt"]
    bundle = load_pretrained(directory)
    assert bundle.panel == PANEL
    assert bundle.classes == CLASSES
    assert bundle.model.config == model.config
    assert same_outputs(bundle.model, model)
    for key, value in model.state_dict().items():  # projections and gene2vec included
        assert torch.equal(bundle.model.state_dict()[key], value), key
    assert json.loads((directory / "labels.json").read_text()) == CLASSES
    assert (directory / "panel.txt").read_text().splitlines() == PANEL


def test_pretraining_model_round_trip(tmp_path: Path) -> None:
    model = pretraining_model()
    directory = save_pretrained(model, tmp_path / "ckpt", panel=PANEL)
    files = sorted(p.name for p in directory.iterdir())
    assert files == [MARKER, "config.json", "model.safetensors", "panel.txt"]
    bundle = load_pretrained(directory)
    assert bundle.classes is None
    assert bundle.panel == PANEL
    assert bundle.model.config.gene_embedding == "learned"
    assert any(n.startswith("gene_emb") for n, _ in bundle.model.named_parameters())
    assert same_outputs(bundle.model, model)


@pytest.mark.parametrize(
    ("panel", "classes", "message"),
    [
        (PANEL[:-1], CLASSES, "panel"),
        ([*PANEL[:-1], PANEL[0]], CLASSES, "duplicated"),
        (PANEL, None, "classes"),
        (PANEL, CLASSES[:2], "classes"),
    ],
)
def test_save_rejects_bad_panel_or_classes(
    tmp_path: Path, panel: list[str], classes: list[str] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        save_pretrained(classifier(), tmp_path / "ckpt", panel=panel, classes=classes)
    assert not (tmp_path / "ckpt").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "panel.txt"])
def test_load_names_a_missing_file(tmp_path: Path, missing: str) -> None:
    directory = save_pretrained(classifier(), tmp_path / "ckpt", panel=PANEL, classes=CLASSES)
    (directory / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_pretrained(directory)


def test_load_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "nothing_here")


def test_load_of_a_classifier_without_its_classes_file_fails(tmp_path: Path) -> None:
    directory = save_pretrained(classifier(), tmp_path / "ckpt", panel=PANEL, classes=CLASSES)
    (directory / "labels.json").unlink()
    with pytest.raises((FileNotFoundError, ValueError), match="labels"):
        load_pretrained(directory)


def test_unknown_config_key_lists_the_valid_ones(tmp_path: Path) -> None:
    directory = save_pretrained(classifier(), tmp_path / "ckpt", panel=PANEL, classes=CLASSES)
    meta = json.loads((directory / "config.json").read_text())
    meta["config"]["n_layers"] = 4
    (directory / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="n_layers") as error:
        load_pretrained(directory)
    for valid in ("n_genes", "depth", "dim_head", "nb_features", "n_classes"):
        assert valid in str(error.value)


def test_overwrite_leaves_no_staging_behind(tmp_path: Path) -> None:
    first, second = classifier(seed=0), classifier(seed=1)
    directory = tmp_path / "ckpt"
    save_pretrained(first, directory, panel=PANEL, classes=CLASSES)
    assert not same_outputs(first, second)
    new_classes = ["x", "y", "z"]
    save_pretrained(second, directory, panel=PANEL[::-1], classes=new_classes)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no dot-prefixed leftovers
    bundle = load_pretrained(directory)
    assert same_outputs(bundle.model, second)
    assert bundle.panel == PANEL[::-1]
    assert bundle.classes == new_classes
    # overwriting a fine-tuned checkpoint with a pretraining one drops labels.json
    save_pretrained(pretraining_model(), directory, panel=PANEL)
    assert not (directory / "labels.json").exists()
    assert load_pretrained(directory).classes is None
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# ---------------------------------------------------------------------------------- gene2vec


def test_load_gene2vec_npy(tmp_path: Path) -> None:
    matrix = np.random.default_rng(0).normal(size=(N_GENES, 16))
    path = tmp_path / "gene2vec.npy"
    np.save(path, matrix)
    loaded = load_gene2vec_npy(path, n_genes=N_GENES)
    assert loaded.dtype == torch.float32 and loaded.shape == (N_GENES, 16)
    torch.testing.assert_close(loaded, torch.from_numpy(matrix).float())
    with pytest.raises(ValueError, match=str(N_GENES + 1)):
        load_gene2vec_npy(path, n_genes=N_GENES + 1)
    model = ScBert(config=tiny_config(), gene2vec=loaded)  # usable as the model's table
    torch.testing.assert_close(model.state_dict()["gene_emb.weight"][:-1], loaded)


def write_gene2vec_text(path: Path, vectors: dict[str, list[float]], *, header: bool) -> None:
    lines = [f"{len(vectors)} {len(next(iter(vectors.values())))}"] if header else []
    lines += [f"{gene}\t{' '.join(f'{x:.6f}' for x in v)}" for gene, v in vectors.items()]
    path.write_text("\n".join(lines) + "\n")


VECTORS = {f"G{i}": [float(i), i / 10, -i / 100] for i in range(12)}


@pytest.mark.parametrize("header", [True, False])
def test_load_gene2vec_text_follows_the_panel_order(tmp_path: Path, header: bool) -> None:
    path = tmp_path / "gene2vec.txt"
    write_gene2vec_text(path, VECTORS, header=header)
    panel = [f"G{i}" for i in np.random.default_rng(1).permutation(12)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full coverage: no warning
        loaded = load_gene2vec_text(path, panel)
    assert loaded.shape == (12, 3) and loaded.dtype == torch.float32
    expected = torch.tensor([VECTORS[gene] for gene in panel])
    torch.testing.assert_close(loaded, expected)


def test_low_coverage_is_an_error_naming_missing_genes(tmp_path: Path) -> None:
    path = tmp_path / "gene2vec.txt"
    write_gene2vec_text(path, VECTORS, header=False)
    panel = ["G1", "G2", "NOVEL_A", "NOVEL_B"]
    with pytest.raises(ValueError, match="NOVEL_A") as error:
        load_gene2vec_text(path, panel)
    assert "NOVEL_B" in str(error.value)


def test_partial_coverage_warns_and_gives_zero_rows(tmp_path: Path) -> None:
    path = tmp_path / "gene2vec.txt"
    write_gene2vec_text(path, VECTORS, header=True)
    panel = [*(f"G{i}" for i in range(9)), "NOVEL_A"]  # 90% covered
    with pytest.warns(UserWarning, match="NOVEL_A"):
        loaded = load_gene2vec_text(path, panel, min_coverage=0.8)
    assert torch.equal(loaded[-1], torch.zeros(3))
    torch.testing.assert_close(loaded[:-1], torch.tensor([VECTORS[g] for g in panel[:-1]]))


def test_inconsistent_vector_lengths_rejected(tmp_path: Path) -> None:
    path = tmp_path / "gene2vec.txt"
    path.write_text("G1 0.1 0.2 0.3\nG2 0.1 0.2\n")
    with pytest.raises(ValueError, match=":2"):
        load_gene2vec_text(path, ["G1", "G2"])


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_checkpoint_directory_permissions_follow_the_umask(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    directory = save_pretrained(pretraining_model(), tmp_path / "ckpt", panel=PANEL)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert stat.S_IMODE(directory.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o777 & ~umask
