"""Checkpoints of the published scBERT code: load them, reproduce their outputs, export ours in
their layout (any config), and round-trip."""

from __future__ import annotations

import json
import pickle
from pathlib import Path, PurePosixPath

import pytest
import torch
from conftest import build_model, random_tokens

from scbert import ScBert, ScBertConfig, export_published, load_published
from scbert.checkpoint import to_published_state_dict


def published_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]


@pytest.fixture
def expected(published_dir: Path) -> dict:
    return torch.load(published_dir / "expected.pt", weights_only=True)


# --------------------------------------------------------------------- the published outputs


def test_config_is_inferred_from_the_state_dict(published_dir: Path) -> None:
    meta = json.loads((published_dir / "meta.json").read_text())
    for name, n_classes in (("pretrained", None), ("finetuned", meta["n_classes"])):
        config = load_published(published_dir / f"{name}_checkpoint.pth").config
        assert config.depth == meta["depth"]
        assert config.heads == meta["heads"]
        assert config.dim_head == meta["dim_head"]
        assert config.n_bins == meta["bin_num"]
        assert config.n_genes == meta["n_genes"]
        assert config.n_classes == n_classes
        assert config.dim == meta["dim"]
        assert config.nb_features == meta["nb_features"]
        assert config.ff_mult == meta["ff_mult"]
        assert config.seq_len == meta["seq_len"]
        assert config.vocab_size == meta["num_tokens"]
        assert config.gene_embedding == "gene2vec"
        if n_classes is not None:
            assert config.cls_hidden[1] == meta["h_dim"]


def test_reproduces_the_published_single_cell_outputs(published_dir: Path, expected: dict) -> None:
    tokens = expected["tokens"]
    lm = load_published(published_dir / "pretrained_checkpoint.pth").eval()
    classifier = load_published(published_dir / "finetuned_checkpoint.pth").eval()
    with torch.no_grad():  # the whole batch at once: ours is batch-invariant
        lm_logits, encodings, cls_logits = lm(tokens), lm.encode(tokens), classifier(tokens)
    assert lm_logits.dtype == encodings.dtype == cls_logits.dtype == torch.float32
    torch.testing.assert_close(lm_logits, expected["lm_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(encodings, expected["lm_encodings"], atol=1e-4, rtol=0)
    torch.testing.assert_close(cls_logits, expected["cls_logits"], atol=1e-4, rtol=0)


def test_is_batch_invariant_unlike_the_published_code(published_dir: Path, expected: dict) -> None:
    lm = load_published(published_dir / "pretrained_checkpoint.pth").eval()
    with torch.no_grad():
        ours = lm(expected["tokens"])
    batched = expected["lm_logits_batched"]
    # the published batch-dependent output really differs from its single-cell output ...
    assert (batched - expected["lm_logits"]).abs().max() > 1e-3
    # ... and ours follows the single-cell one
    assert (ours - batched).abs().max() > 1e-3
    assert (ours - expected["lm_logits"]).abs().max() < 1e-4


def test_gene2vec_of_the_fixture_is_the_gene_embedding(published_dir: Path, expected: dict) -> None:
    model = load_published(published_dir / "pretrained_checkpoint.pth")
    table = model.state_dict()["gene_emb.weight"]
    torch.testing.assert_close(table[:-1], expected["gene2vec"])
    assert not any(name.startswith("gene_emb") for name, _ in model.named_parameters())


def test_fixture_export_equals_the_original(published_dir: Path) -> None:
    for name in ("pretrained", "finetuned"):
        original = published_state(published_dir / f"{name}_checkpoint.pth")
        exported = to_published_state_dict(load_published(original))
        assert sorted(exported) == sorted(original)
        for key, value in original.items():
            if key == "pos_emb.emb.weight":  # the published code keeps gene2vec as float64
                assert value.dtype == torch.float64
                value = value.float()
            assert exported[key].dtype == value.dtype, key
            assert exported[key].shape == value.shape, key
            assert torch.equal(exported[key], value), key


def test_loading_uses_weights_only(tmp_path: Path, published_dir: Path) -> None:
    """A checkpoint holding an arbitrary pickled object is refused (torch.load weights_only)."""
    state = published_state(published_dir / "pretrained_checkpoint.pth")
    path = tmp_path / "with_object.pth"
    torch.save({"model_state_dict": state, "args": PurePosixPath("/data")}, path)
    torch.load(path, weights_only=False)  # an ordinary (unsafe) load would accept it
    with pytest.raises(pickle.UnpicklingError):
        load_published(path)


# ------------------------------------------------------------ other configs: layout, round trip

OTHER = {"depth": 3, "heads": 2, "dim_head": 16, "n_bins": 7, "n_genes": 50, "dim": 24}


def published_keys(depth: int, *, classifier: bool) -> list[str]:
    """Key names of PerformerLM.state_dict() of the published code, as in the fixtures."""
    keys = ["token_emb.weight", "pos_emb.emb.weight", "performer.calls_since_last_redraw"]
    for i in range(depth):
        p = f"performer.net.layers.{i}."
        keys += [p + "0.norm.weight", p + "0.norm.bias"]
        keys += [p + "0.fn.fast_attention.projection_matrix"]
        keys += [p + f"0.fn.to_{c}.weight" for c in "qkv"]
        keys += [p + "0.fn.to_out.weight", p + "0.fn.to_out.bias"]
        keys += [p + "1.norm.weight", p + "1.norm.bias"]
        keys += [p + f"1.fn.fn.{w}.{b}" for w in ("w1", "w2") for b in ("weight", "bias")]
    keys += ["norm.weight", "norm.bias"]
    if classifier:
        keys += [
            f"to_out.{m}.{b}" for m in ("conv1", "fc1", "fc2", "fc3") for b in ("weight", "bias")
        ]
    else:
        keys += ["to_out.weight", "to_out.bias"]
    return keys


def expected_shapes(config: ScBertConfig) -> dict[str, tuple[int, ...]]:
    dim, inner, hidden = config.dim, config.inner_dim, config.dim * config.ff_mult
    shapes: dict[str, tuple[int, ...]] = {
        "token_emb.weight": (config.n_bins + 2, dim),
        "pos_emb.emb.weight": (config.n_genes + 1, dim),
        "performer.calls_since_last_redraw": (),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    for i in range(config.depth):
        p = f"performer.net.layers.{i}."
        shapes |= {p + f"{j}.norm.{b}": (dim,) for j in (0, 1) for b in ("weight", "bias")}
        shapes[p + "0.fn.fast_attention.projection_matrix"] = (config.nb_features, config.dim_head)
        shapes |= {p + f"0.fn.to_{c}.weight": (inner, dim) for c in "qkv"}
        shapes[p + "0.fn.to_out.weight"] = (dim, inner)
        shapes[p + "0.fn.to_out.bias"] = (dim,)
        shapes[p + "1.fn.fn.w1.weight"] = (hidden, dim)
        shapes[p + "1.fn.fn.w1.bias"] = (hidden,)
        shapes[p + "1.fn.fn.w2.weight"] = (dim, hidden)
        shapes[p + "1.fn.fn.w2.bias"] = (dim,)
    if config.n_classes is None:
        shapes["to_out.weight"] = (config.vocab_size, dim)
        shapes["to_out.bias"] = (config.vocab_size,)
    else:
        h1, h2 = config.cls_hidden
        shapes["to_out.conv1.weight"] = (1, 1, 1, dim)  # Conv2d(1, 1, (1, dim))
        shapes["to_out.conv1.bias"] = (1,)
        shapes["to_out.fc1.weight"] = (h1, config.seq_len)
        shapes["to_out.fc1.bias"] = (h1,)
        shapes["to_out.fc2.weight"] = (h2, h1)
        shapes["to_out.fc2.bias"] = (h2,)
        shapes["to_out.fc3.weight"] = (config.n_classes, h2)
        shapes["to_out.fc3.bias"] = (config.n_classes,)
    return shapes


@pytest.fixture(params=[4, None], ids=["classifier", "pretrained"])
def other_model(request: pytest.FixtureRequest) -> ScBert:
    return build_model(ScBertConfig(**OTHER, n_classes=request.param), seed=3).eval()


def test_export_has_the_published_layout(other_model: ScBert, tmp_path: Path) -> None:
    config = other_model.config
    classifier = config.n_classes is not None
    path = tmp_path / "exported.pth"
    export_published(other_model, path)
    saved = torch.load(path, weights_only=True)
    assert list(saved) == ["model_state_dict"]
    state = saved["model_state_dict"]
    assert sorted(state) == sorted(published_keys(config.depth, classifier=classifier))
    shapes = expected_shapes(config)
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert state["performer.calls_since_last_redraw"].dtype == torch.int64


def test_published_round_trip(other_model: ScBert, tmp_path: Path) -> None:
    other_model.encoder.redraw_projections(torch.Generator().manual_seed(9))
    path = tmp_path / "exported.pth"
    export_published(other_model, path)
    reloaded = load_published(path).eval()
    assert reloaded.config == other_model.config
    from_dict = load_published(to_published_state_dict(other_model)).eval()
    assert from_dict.config == other_model.config
    tokens = random_tokens(3, OTHER["n_genes"], OTHER["n_bins"], seed=4)
    with torch.no_grad():
        expected = other_model(tokens)
        assert torch.equal(reloaded(tokens), expected)
        assert torch.equal(from_dict(tokens), expected)
    for key, value in other_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_pretrained_without_gene_embedding_needs_n_genes() -> None:
    """pos_embed=False checkpoints have no pos_emb: a pretrained one does not say n_genes."""
    model = build_model(ScBertConfig(**OTHER, gene_embedding="none"), seed=5)
    state = to_published_state_dict(model)
    assert "pos_emb.emb.weight" not in state
    with pytest.raises(ValueError, match="n_genes"):
        load_published(state)


@pytest.mark.parametrize("n_classes", [None, 4])
def test_round_trip_without_gene_embedding(n_classes: int | None) -> None:
    model = build_model(ScBertConfig(**OTHER, n_classes=n_classes, gene_embedding="none"), seed=5)
    model.eval()
    reloaded = load_published(to_published_state_dict(model), n_genes=OTHER["n_genes"]).eval()
    assert reloaded.config == model.config
    tokens = random_tokens(2, OTHER["n_genes"], OTHER["n_bins"])
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), model(tokens))


def test_unknown_keys_rejected_by_name(other_model: ScBert) -> None:
    state = to_published_state_dict(other_model)
    state["performer.net.layers.0.0.fn.rotary.weight"] = torch.zeros(3)
    state["extra_head.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as error:
        load_published(state)
    assert "performer.net.layers.0.0.fn.rotary.weight" in str(error.value)
    assert "extra_head.bias" in str(error.value)


@pytest.mark.parametrize("key", ["to_out.fc4.weight", "performer.net.layers.0.1.fn.fn.w3.weight"])
def test_unknown_keys_matching_a_template_rejected_by_name(key: str) -> None:
    model = build_model(ScBertConfig(**OTHER, n_classes=4), seed=3)
    state = to_published_state_dict(model)
    state[key] = torch.zeros(3)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_published(state)


def test_not_a_published_state_dict() -> None:
    with pytest.raises(ValueError):
        load_published({"weight": torch.zeros(2)})


def test_learned_gene_embedding_exports_as_pos_emb() -> None:
    """The published layout has no trained gene table: it is exported as pos_emb and comes back
    as a fixed gene2vec table, with the same outputs."""
    model = build_model(ScBertConfig(**OTHER, gene_embedding="learned"), seed=6).eval()
    state = to_published_state_dict(model)
    assert tuple(state["pos_emb.emb.weight"].shape) == (OTHER["n_genes"] + 1, OTHER["dim"])
    reloaded = load_published(state).eval()
    assert reloaded.config.gene_embedding == "gene2vec"
    tokens = random_tokens(2, OTHER["n_genes"], OTHER["n_bins"])
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), model(tokens))
