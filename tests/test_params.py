"""The typed configuration: params.yaml, dotted overrides, errors that name the key."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT

from scbert_platform.params import (
    AnnotateParams,
    ExplainParams,
    GeneEmbedParams,
    ModelParams,
    Params,
    ParamsError,
    TrainParams,
)


def test_repo_params_yaml_loads_and_covers_every_section() -> None:
    params = Params.load(REPO_ROOT / "params.yaml")
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert set(raw) == set(params.to_dict())
    assert params.data.label_key == "bulk_labels"
    assert params.model.n_bins == 5 and params.data.min_genes == 200  # the published values


def test_overrides_are_typed() -> None:
    params = Params().override(
        [
            "data.min_genes=300",
            "data.use_raw=true",
            "model.nb_features=0",
            "data.target_sum=5000",
        ]
    )
    assert params.data.min_genes == 300
    assert params.data.use_raw is True
    assert params.model.nb_features == 0
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
        ("data.input_normalized=true", "'data.input_normalized' is now data.input: log1p"),
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


def test_params_and_their_sections_are_frozen() -> None:
    params = Params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.seed = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train = TrainParams()


def test_replace_and_override_return_new_params() -> None:
    params = Params()
    changed = params.replace({"train.seed": 3, "model.depth": 2})
    assert (changed.train.seed, changed.model.depth) == (3, 2)
    assert (params.train.seed, params.model.depth) == (0, 6)  # the original is unchanged
    assert changed.data is params.data  # untouched sections are shared
    assert params.override(["train.seed=3", "model.depth=2"]) == changed
    assert params.for_stage("pretrain") == params  # a stage without values changes nothing
    assert dataclasses.replace(params.train, seed=3) == changed.train
    with pytest.raises(ParamsError, match=r"unknown parameter 'train\.sed'"):
        params.replace({"train.sed": 3})
    # the keys of one section change together: a pair that is only valid as a pair
    both = params.replace({"data.layer": "counts", "data.use_raw": False})
    assert both.data.layer == "counts"


def test_model_defaults_are_scbert_configs() -> None:
    from scbert import ScBertConfig

    config = ScBertConfig(n_genes=10)  # its defaults, nb_features resolved (0 -> 266)
    model = ModelParams()
    raw = {f.name: f.default for f in dataclasses.fields(ScBertConfig)}
    for key in ("n_bins", "dim", "depth", "heads", "dim_head", "nb_features", "gene_embedding"):
        assert getattr(model, key) == raw[key], key
    built = model.config(n_genes=10, n_classes=None, gene2vec=True, checkpointing=False)
    assert built.nb_features == config.nb_features == 266
    same = ("n_bins", "dim", "depth", "heads", "dim_head", "gene_embedding")
    assert all(getattr(built, key) == getattr(config, key) for key in same)
    # the one deliberate difference: the platform fine-tunes with a head that cannot die, while
    # ScBertConfig keeps the published relu (what a config.json without the key means)
    assert (model.head_activation, config.cls_activation) == ("leaky_relu", "relu")


def test_importing_params_does_not_import_torch() -> None:
    code = "import sys, scbert_platform.params\nprint('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  loss: hinge\n", r"train\.loss must be one of ce, focal, ldam_drw.*'hinge'"),
        ("train:\n  schedule: cosine\n", r"train\.schedule must be one of"),
        ("train:\n  unfreeze: some\n", r"train\.unfreeze must be published, all or last_k:N"),
        ("train:\n  precision: fp16\n", r"train\.precision must be one of auto, fp32, bf16"),
        ("train:\n  label_smoothing: 1.5\n", r"train\.label_smoothing must be in \[0, 1\)"),
        ("train:\n  gene_dropout: -0.1\n", r"train\.gene_dropout must be in \[0, 1\)"),
        ("train:\n  val_fold: 2\n  test_fold: 2\n", r"train\.test_fold must be -1 or a fold"),
        ("train:\n  warmup_steps: 20\n", r"train\.warmup_steps must be < train\.first_cycle"),
        ("model:\n  gene_embedding: none\n", r"model\.gene_embedding must be one of gene2vec"),
        ("model:\n  head_activation: tanh\n", r"model\.head_activation must be one of relu"),
        ("model:\n  depth: 0\n", r"model\.depth must be >= 1, got 0"),
        ("data:\n  min_coverage: 2\n", r"data\.min_coverage must be in \[0, 1\], got 2\.0"),
        ("data:\n  layer: counts\n  use_raw: true\n", r"data\.use_raw cannot go with data\.layer"),
        ("data:\n  input: normalized\n", r"data\.input must be one of counts, log1p"),
        ("serve:\n  min_replicas: 3\n", r"serve\.min_replicas must be <= serve\.max_replicas"),
        ("finetune:\n  max_steps: -1\n", r"finetune\.max_steps must be >= 0"),
        ("annotate:\n  threshold: 1.5\n", r"annotate\.threshold must be a probability"),
        ("explain:\n  rank_by: mean\n", r"explain\.rank_by must be one of attention, specificity"),
        ("gene_embed:\n  alpha: 0\n", r"gene_embed\.alpha must be in \(0, 1\]"),
    ],
)
def test_a_bad_value_fails_at_load_naming_its_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=message):
        Params.load(path)


def test_bad_values_fail_however_the_params_are_built() -> None:
    with pytest.raises(ParamsError, match=r"train\.loss"):
        Params().override(["train.loss=hinge"])
    with pytest.raises(ParamsError, match=r"train\.loss"):
        TrainParams(loss="hinge")
    with pytest.raises(ParamsError, match=r"train\.lr"):
        dataclasses.replace(TrainParams(), lr=0.0)
    with pytest.raises(ParamsError, match=r"'train\.lr' must be float"):
        TrainParams(lr="fast")
    assert TrainParams(lr=1).lr == 1.0 and isinstance(TrainParams(lr=1).lr, float)


def test_annotate_explain_and_gene_embed_defaults_come_from_params() -> None:
    import argparse

    from scbert_platform import api
    from scbert_platform.cli import build_parser, cmd_annotate
    from scbert_platform.data.gene_embed import learn_gene_embeddings
    from scbert_platform.infer.annotation import annotate, embed
    from scbert_platform.infer.explanation import explain

    def defaults(function: Any) -> dict[str, object]:
        return {
            name: p.default
            for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty
        }

    annotating, explaining, embedding = AnnotateParams(), ExplainParams(), GeneEmbedParams()
    for function in (annotate, api.annotate):
        assert {k: v for k, v in defaults(function).items() if hasattr(annotating, k)} == {
            k: v for k, v in dataclasses.asdict(annotating).items() if k in defaults(function)
        }
    for function in (embed, api.embed):
        found = defaults(function)
        assert found["batch_size"] == annotating.batch_size
        assert found["embedding"] == annotating.embedding
    for function in (explain, api.explain):
        assert {k: v for k, v in defaults(function).items() if hasattr(explaining, k)} == {
            k: v for k, v in dataclasses.asdict(explaining).items() if k in defaults(function)
        }
    found = defaults(learn_gene_embeddings)
    assert found["dim"] == ModelParams().dim
    assert {k: found[k] for k in dataclasses.asdict(embedding)} == dataclasses.asdict(embedding)

    # the CLI's flags default to None: the values come from params.yaml, --set, then the flags
    args = build_parser().parse_args(["annotate", "in.h5ad", "-m", "model", "-o", "out.h5ad"])
    assert args.threshold is None and args.batch_size is None and args.majority_vote is None
    assert args.run is cmd_annotate and isinstance(args, argparse.Namespace)
    args = build_parser().parse_args(["explain", "in.h5ad", "-m", "model", "--out", "x"])
    assert args.top_n is None and args.rank_by is None and args.min_cells is None


def test_the_cli_reads_annotate_and_explain_values_from_params(tmp_path: Path) -> None:
    from scbert_platform.cli import _params, build_parser

    path = tmp_path / "params.yaml"
    path.write_text("annotate:\n  threshold: 0.7\nexplain:\n  top_n: 4\n")
    words = ["annotate", "in.h5ad", "-m", "m", "-o", "o.h5ad", "--params", str(path)]
    args = build_parser().parse_args([*words, "--set", "annotate.batch_size=8"])
    params = _params(args, {"annotate.threshold": args.threshold})
    assert (params.annotate.threshold, params.annotate.batch_size) == (0.7, 8)
    args = build_parser().parse_args([*words, "--threshold", "0.2"])
    assert _params(args, {"annotate.threshold": args.threshold}).annotate.threshold == 0.2
    with pytest.raises(ParamsError, match=r"annotate\.threshold"):
        args = build_parser().parse_args([*words, "--threshold", "2"])
        _params(args, {"annotate.threshold": args.threshold})
