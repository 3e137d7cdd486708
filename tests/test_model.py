"""The model on tiny configs: shapes, determinism, batch invariance, FAVOR+ accuracy, training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, random_tokens, sharpen, tiny_config

from scbert import (
    UNASSIGNED,
    ScBert,
    assign_cell_types,
    favor_attention,
    load_pretrained,
    orthogonal_features,
    save_pretrained,
)
from scbert.model import CellTypeHead

MakeModel = Callable[..., ScBert]
N_GENES, N_BINS, DIM = 24, 5, 16


def same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(map(torch.equal, first, second))


def projections(model: ScBert) -> list[torch.Tensor]:
    """Copies of the random projections: the buffers named ``projection`` of the encoder."""
    return [b.clone() for n, b in model.named_buffers() if n.endswith("projection")]


# ----------------------------------------------------------------------------------- shapes


def test_output_shapes(make_model: MakeModel) -> None:
    tokens = random_tokens(3, N_GENES, N_BINS)
    classifier = make_model(n_classes=4)
    lm = make_model()
    with torch.no_grad():
        assert classifier(tokens).shape == (3, 4)
        assert lm(tokens).shape == (3, N_GENES + 1, N_BINS + 2)
        assert lm.encode(tokens).shape == (3, N_GENES + 1, DIM)
        assert classifier.encode(tokens).shape == (3, N_GENES + 1, DIM)
        assert lm.embed_cells(tokens).shape == (3, DIM)
        proba = classifier.predict_proba(tokens)
    assert proba.shape == (3, 4)
    assert (proba >= 0).all()
    torch.testing.assert_close(proba.sum(dim=1), torch.ones(3))


def test_embed_cells_is_mean_over_gene_positions(make_model: MakeModel) -> None:
    model = make_model()
    tokens = random_tokens(2, N_GENES, N_BINS)
    with torch.no_grad():
        expected = model.encode(tokens)[:, :N_GENES].mean(dim=1)
        torch.testing.assert_close(model.embed_cells(tokens), expected)


def test_predict_gives_probabilities_and_either_embedding_from_one_pass(
    make_model: MakeModel,
) -> None:
    model = make_model(n_classes=3).eval()
    tokens = random_tokens(4, N_GENES, N_BINS)
    with torch.no_grad():
        proba, cells = model.predict(tokens)
        torch.testing.assert_close(proba, model.predict_proba(tokens))
        torch.testing.assert_close(cells, model.embed_cells(tokens))
        _, hidden = model.predict(tokens, embedding="classifier")
        assert hidden.shape == (4, model.config.cls_hidden[1])
        with pytest.raises(ValueError, match="embedding must be one of"):
            model.predict(tokens, embedding="pca")
        pretraining = make_model().eval()
        proba, cells = pretraining.predict(tokens)
        assert proba.shape == (4, 0) and cells.shape == (4, model.config.dim)
        with pytest.raises(ValueError, match="needs a fine-tuned model"):
            pretraining.predict(tokens, embedding="classifier")


def test_fold_temperature_divides_the_logits(make_model: MakeModel) -> None:
    model = make_model(n_classes=3).eval()
    tokens = random_tokens(4, N_GENES, N_BINS)
    with torch.no_grad():
        logits = model(tokens)
        model.head.fold_temperature(2.5)
        torch.testing.assert_close(model(tokens), logits / 2.5)
        with pytest.raises(ValueError, match="temperature must be > 0"):
            model.head.fold_temperature(0.0)


def test_predict_proba_needs_a_classifier(make_model: MakeModel) -> None:
    with pytest.raises(ValueError):
        make_model().predict_proba(random_tokens(1, N_GENES, N_BINS))


def test_wrong_token_shape_rejected(make_model: MakeModel) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="n_genes"):
        model(random_tokens(2, N_GENES, N_BINS)[:, :-1])  # appended position missing


def test_with_cell_type_head_makes_a_classifier(make_model: MakeModel) -> None:
    model = make_model()
    encoder_before = {k: v.clone() for k, v in model.state_dict().items() if "head" not in k}
    assert model.with_cell_type_head(3) is model
    assert model.config.n_classes == 3
    tokens = random_tokens(2, N_GENES, N_BINS)
    with torch.no_grad():
        assert model(tokens).shape == (2, 3)
        assert model.predict_proba(tokens).shape == (2, 3)
    after = model.state_dict()
    for key, value in encoder_before.items():
        torch.testing.assert_close(after[key], value)


def test_the_head_reads_the_tokens_only_when_asked() -> None:
    """``cls_token_input``: each position's token (as a number) is added to the encoder's
    per-gene scalar, the same weights as without it; the published head does not see them."""
    tokens = random_tokens(4, N_GENES, N_BINS)
    for token_input in (False, True):
        model = build_model(tiny_config(n_classes=3, cls_token_input=token_input)).eval()
        head = model.head
        assert isinstance(head, CellTypeHead)
        with torch.no_grad():  # the encoder's scalar is 0 everywhere: only the tokens remain
            head.per_gene.weight.zero_()
            head.per_gene.bias.zero_()
            logits = model(tokens)
            proba, hidden = model.predict(tokens, embedding="classifier")
            fed = tokens.float() if token_input else torch.zeros(tokens.shape)
            last_hidden = head.act(head.fc2(head.act(head.fc1(fed))))
            expected = head.fc3(last_hidden)
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(hidden, last_hidden)
        torch.testing.assert_close(proba, expected.softmax(dim=-1))
        assert (logits[0] != logits[1]).any() == token_input  # the cells differ in their tokens
    plain = build_model(tiny_config(n_classes=3)).state_dict()
    assert model.state_dict().keys() == plain.keys()  # no parameter of its own
    assert model.with_cell_type_head(2, token_input=False).config.cls_token_input is False


def test_the_encoder_gate_starts_shut_and_is_learned(tmp_path: Path) -> None:
    """``cls_encoder_gate``: the head starts from the tokens alone (the encoder's scalar times a
    gate at 0), the gate gets a gradient, and it travels with the checkpoint."""
    tokens = random_tokens(4, N_GENES, N_BINS)
    labels = torch.tensor([0, 1, 2, 0])
    model = build_model(tiny_config(n_classes=3, cls_token_input=True, cls_encoder_gate=True))
    head = model.head
    assert isinstance(head, CellTypeHead) and head.encoder_gate is not None
    assert float(head.encoder_gate) == 0.0
    with torch.no_grad():
        fed = tokens.float()
        expected = head.fc3(head.act(head.fc2(head.act(head.fc1(fed)))))
        torch.testing.assert_close(model.eval()(tokens), expected)  # the encoder not read yet
    loss = torch.nn.functional.cross_entropy(model.train()(tokens), labels)
    loss.backward()
    assert head.encoder_gate.grad is not None and float(head.encoder_gate.grad) != 0.0
    with torch.no_grad():
        head.encoder_gate.fill_(0.5)
    save_pretrained(
        model, tmp_path / "gated", panel=[f"g{i}" for i in range(N_GENES)], classes=["a", "b", "c"]
    )
    loaded = load_pretrained(tmp_path / "gated").model
    assert loaded.config.cls_encoder_gate is True
    torch.testing.assert_close(loaded.eval()(tokens), model.eval()(tokens))
    assert float(loaded.head.encoder_gate) == 0.5
    plain = build_model(tiny_config(n_classes=3, cls_token_input=True)).state_dict()
    assert set(model.state_dict()) - set(plain) == {"head.encoder_gate"}
    with pytest.raises(ValueError, match="cls_encoder_gate"):
        tiny_config(n_classes=3, cls_encoder_gate=True)  # without the tokens: a blind start
    assert model.with_cell_type_head(2, encoder_gate=False).head.encoder_gate is None


def test_assign_cell_types() -> None:
    proba = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.05, 0.05, 0.9], [0.5, 0.3, 0.2]])
    names = assign_cell_types(proba, ["B", "T", "NK"], threshold=0.5)
    assert names == ["B", UNASSIGNED, "NK", "B"]
    assert UNASSIGNED == "Unassigned"
    assert assign_cell_types(proba, ["B", "T", "NK"], threshold=0.95) == [UNASSIGNED] * 4
    with pytest.raises(ValueError):
        assign_cell_types(proba, ["B", "T"])


# -------------------------------------------------------------- determinism, batch invariance


def test_eval_is_deterministic(make_model: MakeModel) -> None:
    model = make_model(n_classes=3)
    tokens = random_tokens(4, N_GENES, N_BINS)
    with torch.no_grad():
        first, second = model(tokens), model(tokens)
    assert torch.equal(first, second)
    assert same(projections(model), projections(model))


@pytest.mark.parametrize("n_classes", [None, 3])
@pytest.mark.parametrize("huge_mate", [False, True])
def test_batch_invariance(make_model: MakeModel, n_classes: int | None, huge_mate: bool) -> None:
    """A cell's output does not depend on its batch-mates (the published code's does; that this
    test would see it: test_attention_sums.py::test_batch_max_would_be_detected)."""
    model = sharpen(make_model(n_classes=n_classes, depth=2, seed=1))
    cells = random_tokens(3, N_GENES, N_BINS, seed=11)
    with torch.no_grad():
        alone = [model(cells[i : i + 1]) for i in range(3)]
        for trial in range(3):
            batch = random_tokens(8, N_GENES, N_BINS, seed=100 + trial, density=0.8)
            if huge_mate:
                batch[5, :-1] = N_BINS  # every gene in the top bin
            slots = [0, 3, 7]
            batch[slots] = cells
            out = model(batch)
            for i, slot in enumerate(slots):
                assert (out[slot] - alone[i][0]).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------ FAVOR+


def favor_error(n_features: int, seed: int) -> float:
    """Mean |FAVOR+ - exact softmax attention| for small random q, k, v (float64)."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (
        scale * torch.randn(1, 2, 32, 8, generator=generator, dtype=torch.float64)
        for scale in (0.5, 0.5, 1.0)
    )
    projection = orthogonal_features(
        n_features, 8, generator=torch.Generator().manual_seed(1000 + seed)
    )
    approx = favor_attention(q, k, v, projection.double())[0]
    exact = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    return (approx - exact).abs().mean().item()


def test_favor_approaches_softmax_attention() -> None:
    errors = [sum(favor_error(m, seed) for seed in range(4)) / 4 for m in (16, 256, 4096)]
    assert errors[0] > errors[1] > errors[2], errors
    # outputs are ~0.15 in magnitude; 16 features give ~0.03 error, 4096 under 0.01 (see below)
    assert errors[2] < 0.015, errors


def test_orthogonal_feature_rows_are_marginally_gaussian() -> None:
    rows = orthogonal_features(100_000, 8, generator=torch.Generator().manual_seed(0)).double()
    # a standard Gaussian's mean over 1e5 rows is within ~0.013 (4 standard errors)
    assert rows.mean(dim=0).abs().max().item() < 0.013
    assert favor_error(65536, 0) < 0.004


def test_orthogonal_features_shape_and_orthogonality() -> None:
    rows = orthogonal_features(20, 8, generator=torch.Generator().manual_seed(0))
    assert rows.shape == (20, 8)
    block = rows[:8] / rows[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8), atol=1e-5, rtol=0)
    same = orthogonal_features(20, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rows, same)


# --------------------------------------------------------------------------- redraw schedule


def test_training_mode_redraws_after_the_interval(make_model: MakeModel) -> None:
    model = make_model(depth=2, feature_redraw_interval=2).train()
    tokens = random_tokens(2, N_GENES, N_BINS)
    start = projections(model)
    for _ in range(2):  # as published: the first `interval` calls are counted
        model(tokens)
    assert same(projections(model), start)
    model(tokens)  # the next call redraws
    redrawn = projections(model)
    assert all(not torch.equal(a, b) for a, b in zip(start, redrawn, strict=True))
    for _ in range(2):
        model(tokens)
    assert same(projections(model), redrawn)
    model(tokens)
    assert all(not torch.equal(a, b) for a, b in zip(redrawn, projections(model), strict=True))


def test_the_redraw_count_survives_a_state_dict_load(make_model: MakeModel) -> None:
    """The host keeps the count (no device read per call); a loaded checkpoint's count wins."""
    model = make_model(depth=1, feature_redraw_interval=3).train()
    tokens = random_tokens(2, N_GENES, N_BINS)
    model(tokens)
    assert int(model.encoder.calls_since_redraw) == 1
    state = model.state_dict()
    state["encoder.calls_since_redraw"] = torch.tensor(3)
    model.load_state_dict(state)
    start = projections(model)
    model(tokens)  # 3 calls counted in the checkpoint: this one redraws
    assert all(not torch.equal(a, b) for a, b in zip(start, projections(model), strict=True))
    assert int(model.encoder.calls_since_redraw) == 0


def test_eval_mode_never_redraws(make_model: MakeModel) -> None:
    model = make_model(feature_redraw_interval=2).eval()
    tokens = random_tokens(2, N_GENES, N_BINS)
    start = projections(model)
    with torch.no_grad():
        for _ in range(7):
            model(tokens)
    assert same(projections(model), start)


def test_freeze_projections_stops_redraws(make_model: MakeModel) -> None:
    model = make_model(feature_redraw_interval=2).train()
    model.encoder.freeze_projections()
    tokens = random_tokens(2, N_GENES, N_BINS)
    start = projections(model)
    for _ in range(7):
        model(tokens)
    assert same(projections(model), start)


def test_redraw_is_deterministic_for_a_generator(make_model: MakeModel) -> None:
    first, second = make_model(depth=2, seed=0), make_model(depth=2, seed=1)
    first.encoder.redraw_projections(torch.Generator().manual_seed(5))
    second.encoder.redraw_projections(torch.Generator().manual_seed(5))
    assert same(projections(first), projections(second))
    layers = projections(first)
    assert not torch.equal(layers[0], layers[1])  # each layer gets its own draw
    second.encoder.redraw_projections(torch.Generator().manual_seed(6))
    assert not same(projections(first), projections(second))


def test_redrawn_projection_is_in_the_state_dict(make_model: MakeModel) -> None:
    model = make_model()
    model.encoder.redraw_projections(torch.Generator().manual_seed(3))
    saved = [v for k, v in model.state_dict().items() if k.endswith("projection")]
    assert same(saved, projections(model))


# ---------------------------------------------------------------------------- gene embedding


def test_gene2vec_is_a_fixed_buffer_with_a_zero_row() -> None:
    config = tiny_config()
    gene2vec = torch.randn(N_GENES, DIM)
    model = ScBert(config=config, gene2vec=gene2vec)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("gene_emb") for n in names)
    table = model.state_dict()["gene_emb.weight"]
    assert table.shape == (N_GENES + 1, DIM)
    torch.testing.assert_close(table[:N_GENES], gene2vec)
    assert torch.equal(table[N_GENES], torch.zeros(DIM))
    # the gene identity reaches the output, and training does not move it
    other = ScBert(config=config, gene2vec=gene2vec * 2)
    other.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k != "gene_emb.weight"}, strict=False
    )
    tokens = random_tokens(2, N_GENES, N_BINS)
    assert not torch.allclose(model.eval()(tokens), other.eval()(tokens))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(tokens).sum().backward()
    optimizer.step()
    torch.testing.assert_close(model.state_dict()["gene_emb.weight"], table)


def test_gene2vec_with_the_appended_row_is_taken_as_is() -> None:
    table = torch.randn(N_GENES + 1, DIM)
    model = ScBert(config=tiny_config(), gene2vec=table)
    torch.testing.assert_close(model.state_dict()["gene_emb.weight"], table)


def test_learned_gene_embedding_is_trained() -> None:
    model = build_model(tiny_config(gene_embedding="learned"))
    gene_params = [p for n, p in model.named_parameters() if n.startswith("gene_emb")]
    assert len(gene_params) == 1
    assert gene_params[0].shape == (N_GENES + 1, DIM) and gene_params[0].requires_grad
    model(random_tokens(2, N_GENES, N_BINS)).sum().backward()
    assert gene_params[0].grad is not None and gene_params[0].grad.abs().sum() > 0


def test_gene2vec_missing_or_misshapen_rejected() -> None:
    with pytest.raises(ValueError, match="gene2vec"):
        ScBert(config=tiny_config(gene_embedding="gene2vec"))
    for shape in [(N_GENES - 1, DIM), (N_GENES, DIM + 1), (N_GENES + 2, DIM)]:
        with pytest.raises(ValueError, match="shape"):
            ScBert(config=tiny_config(), gene2vec=torch.randn(*shape))


def test_gene_embedding_none_has_no_gene_identity() -> None:
    model = build_model(tiny_config(gene_embedding="none"))
    assert not any(n.startswith("gene_emb") for n, _ in model.named_parameters())
    assert "gene_emb.weight" not in model.state_dict()  # zeros, rebuilt from the config
    assert model.gene_emb.weight.abs().sum() == 0


def test_invalid_config_rejected() -> None:
    with pytest.raises(ValueError, match="n_classes"):
        tiny_config(n_classes=1)
    with pytest.raises(ValueError, match="dim"):
        tiny_config(dim=0)
    with pytest.raises(ValueError, match="gene_embedding"):
        tiny_config(gene_embedding="word2vec")


# ---------------------------------------------------------------------------------- training


def test_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(n_classes=4), seed=0).train()
    tokens = random_tokens(8, N_GENES, N_BINS, seed=1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = F.cross_entropy(model(tokens), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(tokens)
    assert F.cross_entropy(logits, labels).item() < 0.05
    assert torch.equal(logits.argmax(dim=1), labels)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    config = tiny_config(depth=2, n_classes=3, feature_redraw_interval=None)
    plain = build_model(config, seed=2).train()
    checkpointed = build_model(
        tiny_config(
            depth=2, n_classes=3, feature_redraw_interval=None, activation_checkpointing=True
        )
    ).train()
    checkpointed.load_state_dict(plain.state_dict())
    calls = {"plain": 0, "checkpointed": 0}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.encoder.blocks[0].register_forward_pre_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    tokens = random_tokens(4, N_GENES, N_BINS, seed=3)
    labels = torch.tensor([0, 1, 2, 0])
    losses = []
    for model in (plain, checkpointed):
        loss = F.cross_entropy(model(tokens), labels)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    grads = dict(checkpointed.named_parameters())
    for name, param in plain.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(grads[name].grad, param.grad, rtol=1e-5, atol=1e-5)
    # the checkpointed block ran again in backward (a pre-hook: recomputation stops early)
    assert calls == {"plain": 1, "checkpointed": 2}
