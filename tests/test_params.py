"""The typed configuration: params.yaml, dotted overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from scbert_platform.params import Params, ParamsError


def test_repo_params_yaml_loads_and_covers_every_section() -> None:
    params = Params.load(REPO_ROOT / "params.yaml")
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert set(raw) == {"model", "data", "train", "pretrain", "finetune", "tune", "serve"}
    assert params.data.label_key == "bulk_labels"
    assert params.model.n_bins == 5 and params.data.min_genes == 200  # the published values


def test_overrides_are_typed() -> None:
    params = Params().override(
        [
            "data.min_genes=300",
            "data.use_raw=true",
            "model.nb_features=null",
            "data.target_sum=5000",
        ]
    )
    assert params.data.min_genes == 300
    assert params.data.use_raw is True
    assert params.model.nb_features is None
    assert params.data.target_sum == 5000.0 and isinstance(params.data.target_sum, float)
    assert Params().override(["data.label_key="]).data.label_key == ""
    assert Params().override(["train.lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 reads 1e-4 as text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.min_gene=3", "unknown parameter 'data.min_gene'.*min_genes"),
        ("date.min_genes=3", "unknown params section 'date'"),
        ("data.min_genes=many", "'data.min_genes' must be int"),
        ("data.min_genes=2.5", "'data.min_genes' must be int"),
        ("data.use_raw=1", "'data.use_raw' must be bool"),
        ("data.min_genes", "not of the form section.key=value"),
        ("min_genes=3", "not a section.key name"),
        ("train.lrate=1e-4", "unknown parameter 'train.lrate'.*lr"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        Params().override([override])


def test_unknown_keys_in_a_file_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  min_genes: 100\n  min_gnes: 3\n")
    with pytest.raises(ParamsError, match=r"data\.min_gnes"):
        Params.load(path)
    path.write_text("- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        Params.load(path)


def test_dump_load_round_trip_and_flat_names(tmp_path: Path) -> None:
    params = Params().override(["data.seed=7", "model.depth=4"])
    params.dump(tmp_path / "p.yaml")
    again = Params.load(tmp_path / "p.yaml")
    assert again == params
    flat = again.flatten()
    assert flat["data.seed"] == 7 and flat["model.depth"] == 4
    assert all(key.count(".") == 1 for key in flat)


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert Params.load(tmp_path / "absent.yaml", ["data.seed=3"]).data.seed == 3


def test_a_stage_section_applies_over_train_and_a_command_line_train_value_wins(
    tmp_path: Path,
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(
        "train:\n  epochs: 4\n  max_steps: 0\npretrain:\n  epochs: 2\nfinetune:\n  max_steps: 300\n"
    )
    assert Params.load(path).train.max_steps == 0  # no stage: train as written
    assert Params.load(path, stage="finetune").train.max_steps == 300
    assert Params.load(path, stage="finetune").train.epochs == 4  # None: train's value
    assert Params.load(path, stage="pretrain").train.epochs == 2
    assert Params.load(path, ["train.max_steps=6"], stage="finetune").train.max_steps == 6
    # a length on the command line replaces the stage's (epochs 3, not 300 steps)
    by_epochs = Params.load(path, ["train.epochs=3"], stage="finetune").train
    assert (by_epochs.epochs, by_epochs.max_steps) == (3, 0)
    assert Params.load(path, ["finetune.max_steps=50"], stage="finetune").train.max_steps == 50
    with pytest.raises(ParamsError, match="unknown stage 'sweep'"):
        Params.load(path, stage="sweep")
    with pytest.raises(ParamsError, match=r"finetune\.max_step'"):
        Params.load(path, ["finetune.max_step=5"])
