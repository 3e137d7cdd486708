"""An independent reference of the published Performer forward (explicit n x n attention), used
to check ``ScBert.attention_sums`` (paper Fig. 5) and, again, the forward output.

The reference reads the published state-dict layout (``to_published_state_dict``) and follows the
published formulas (performer-pytorch as vendored by scBERT):
    data_normalizer = d^-1/4, ratio = m^-1/2, data_dash = (x * normalizer) @ P^T,
    diag = |x|^2 / 2 * normalizer^2,
    phi(q) = ratio * (exp(dash - diag - max over the row) + eps),
    phi(k) = ratio * (exp(dash - diag - max over the key tensor) + eps),
    out = phi(q) (phi(k)^T v) / (phi(q) . sum_n phi(k)).
The published key max is over the whole (b, h, n, m) tensor, so a cell's output depends on its
batch-mates; run one cell at a time it is the max over the cell, which ours computes for any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, random_tokens, sharpen, tiny_config

from scbert import ScBert, favor_attention, orthogonal_features
from scbert.attention import KERNEL_EPS as OUR_EPS
from scbert.checkpoint import to_published_state_dict

LAYER = "performer.net.layers.{}."
PUBLISHED_EPS = 1e-4  # softmax_kernel(..., eps=1e-4) of the published performer


@dataclass
class Reference:
    logits: torch.Tensor  # head output
    encodings: torch.Tensor  # (b, n, dim) after the final LayerNorm
    attention: list[torch.Tensor]  # per layer, (b, h, n, n)


def softmax_kernel(x: torch.Tensor, projection: torch.Tensor, *, is_query: bool) -> torch.Tensor:
    """Published softmax_kernel: x (b, h, n, d) -> phi(x) (b, h, n, m).

    The stabiliser is a constant for autograd, as in ours (the published code differentiates
    through its max; it changes the output only through eps, so gradients differ by O(eps)).
    """
    normalizer = x.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    dash = (x * normalizer) @ projection.T
    diag = x.square().sum(dim=-1, keepdim=True) / 2 * normalizer**2
    # queries: each row's max; keys: the max over the whole batch tensor, as published
    stabiliser = dash.detach().amax(dim=-1, keepdim=True) if is_query else dash.detach().amax()
    return ratio * (torch.exp(dash - diag - stabiliser) + PUBLISHED_EPS)


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Published FAVOR+ attention of q, k, v (b, h, n, d): the output (b, h, n, d) and the
    explicit attention matrix A = D^-1 phi(q) phi(k)^T (b, h, n, n)."""
    phi_q = softmax_kernel(q, projection, is_query=True)
    phi_k = softmax_kernel(k, projection, is_query=False)
    d_inv = 1.0 / (phi_q @ phi_k.sum(dim=-2).unsqueeze(-1))  # (b, h, n, 1)
    out = (phi_q @ (phi_k.transpose(-1, -2) @ v)) * d_inv  # linear in n, as published
    matrix = (phi_q @ phi_k.transpose(-1, -2)) * d_inv
    torch.testing.assert_close((matrix @ v).detach(), out.detach())
    return out, matrix


def published_forward(state: dict[str, torch.Tensor], tokens: torch.Tensor) -> Reference:
    """The published PerformerLM forward in float64, with the attention matrices made explicit."""
    sd = {k: v.double() if v.dtype != torch.float64 else v for k, v in state.items()}
    sd = {k: v for k, v in sd.items() if v.is_floating_point()}
    depth = len({k.split(".")[3] for k in sd if k.startswith("performer.net.layers.")})
    dim = sd["token_emb.weight"].shape[1]
    x = sd["token_emb.weight"][tokens]
    if "pos_emb.emb.weight" in sd:
        x = x + sd["pos_emb.emb.weight"]
    b, n, _ = x.shape
    attention = []
    for i in range(depth):
        p = LAYER.format(i)
        projection = sd[p + "0.fn.fast_attention.projection_matrix"]
        dim_head = projection.shape[1]
        h = F.layer_norm(x, (dim,), sd[p + "0.norm.weight"], sd[p + "0.norm.bias"])
        q, k, v = (
            (h @ sd[p + f"0.fn.to_{c}.weight"].T).reshape(b, n, -1, dim_head).transpose(1, 2)
            for c in "qkv"
        )
        out, matrix = linear_attention(q, k, v, projection)
        attention.append(matrix)
        out = out.transpose(1, 2).reshape(b, n, -1)
        x = x + out @ sd[p + "0.fn.to_out.weight"].T + sd[p + "0.fn.to_out.bias"]
        h = F.layer_norm(x, (dim,), sd[p + "1.norm.weight"], sd[p + "1.norm.bias"])
        h = F.gelu(h @ sd[p + "1.fn.fn.w1.weight"].T + sd[p + "1.fn.fn.w1.bias"])
        x = x + h @ sd[p + "1.fn.fn.w2.weight"].T + sd[p + "1.fn.fn.w2.bias"]
    x = F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"])
    return Reference(logits=_head(sd, x), encodings=x, attention=attention)


def _head(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if "to_out.weight" in sd:  # pretraining: Linear(dim -> n_bins + 2)
        return x @ sd["to_out.weight"].T + sd["to_out.bias"]
    # fine-tuning: Conv2d(1, 1, (1, dim)) + ReLU, flatten, MLP with ReLU
    x = F.relu(x @ sd["to_out.conv1.weight"].reshape(-1) + sd["to_out.conv1.bias"])
    x = F.relu(x @ sd["to_out.fc1.weight"].T + sd["to_out.fc1.bias"])
    x = F.relu(x @ sd["to_out.fc2.weight"].T + sd["to_out.fc2.bias"])
    return x @ sd["to_out.fc3.weight"].T + sd["to_out.fc3.bias"]


def reference_one_cell_at_a_time(state: dict[str, torch.Tensor], tokens: torch.Tensor) -> Reference:
    """The published forward, each cell in a batch of one (the published single-cell outputs)."""
    cells = [published_forward(state, tokens[i : i + 1]) for i in range(tokens.shape[0])]
    return Reference(
        logits=torch.cat([c.logits for c in cells]),
        encodings=torch.cat([c.encodings for c in cells]),
        attention=[torch.cat(layer) for layer in zip(*(c.attention for c in cells), strict=True)],
    )


def sharp_model(*, n_classes: int | None = None, depth: int = 2, seed: int = 0) -> ScBert:
    """A tiny model whose attention is far from uniform."""
    return sharpen(build_model(tiny_config(depth=depth, n_classes=n_classes), seed=seed))


# ------------------------------------------------------------------------------------- tests


def test_reference_reproduces_the_published_fixture(published_dir) -> None:
    """The reference itself is right: it gives the published code's outputs, single-cell and
    batched (with the batch-wide key max)."""
    expected = torch.load(published_dir / "expected.pt", weights_only=True)
    tokens = expected["tokens"]
    state = torch.load(published_dir / "pretrained_checkpoint.pth", weights_only=True)
    state = state["model_state_dict"]
    ref = reference_one_cell_at_a_time(state, tokens)
    torch.testing.assert_close(ref.logits.float(), expected["lm_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ref.encodings.float(), expected["lm_encodings"], atol=1e-4, rtol=0)
    batched = published_forward(state, tokens)
    torch.testing.assert_close(
        batched.logits.float(), expected["lm_logits_batched"], atol=1e-4, rtol=0
    )
    finetuned = torch.load(published_dir / "finetuned_checkpoint.pth", weights_only=True)
    cls = reference_one_cell_at_a_time(finetuned["model_state_dict"], tokens)
    torch.testing.assert_close(cls.logits.float(), expected["cls_logits"], atol=1e-4, rtol=0)


def test_kernel_eps_is_the_published_one() -> None:
    assert OUR_EPS == PUBLISHED_EPS


def test_attention_rows_sum_to_one() -> None:
    model = sharp_model()
    ref = reference_one_cell_at_a_time(to_published_state_dict(model), random_tokens(3, 24, 5))
    for matrix in ref.attention:
        torch.testing.assert_close(matrix.sum(dim=-1), torch.ones(matrix.shape[:-1]).double())
        assert (matrix > 0).all()


@pytest.mark.parametrize("depth", [1, 2])
def test_attention_sums_match_explicit_attention(depth: int) -> None:
    model = sharp_model(depth=depth, seed=depth)
    tokens = random_tokens(4, 24, 5, seed=depth, density=0.6)
    tokens[2, :-1] = 5  # a cell with every gene in the top bin, beside ordinary ones
    ref = reference_one_cell_at_a_time(to_published_state_dict(model), tokens)
    # sum over queries i of A_ij, mean over heads, mean over layers, appended position dropped
    per_layer = [matrix.sum(dim=-2).mean(dim=1) for matrix in ref.attention]
    expected = torch.stack(per_layer).mean(dim=0)[:, :-1]
    sums = model.attention_sums(tokens)
    assert sums.shape == (4, 24)
    torch.testing.assert_close(sums.double(), expected, rtol=1e-4, atol=1e-6)
    # the sharpened attention is far from uniform, so the comparison has teeth
    assert expected.max() > 1.5 * expected.min()
    torch.testing.assert_close(sums.sum(dim=1).double(), expected.sum(dim=1), rtol=1e-4, atol=0)


@pytest.mark.parametrize("n_classes", [None, 3])
def test_forward_matches_the_reference(n_classes: int | None) -> None:
    model = sharp_model(n_classes=n_classes)
    tokens = random_tokens(5, 24, 5, seed=7)
    tokens[1, :-1] = 5
    ref = reference_one_cell_at_a_time(to_published_state_dict(model), tokens)
    with torch.no_grad():  # the whole batch at once: per-cell key max makes it batch-invariant
        logits, encodings = model(tokens), model.encode(tokens)
    torch.testing.assert_close(logits.double(), ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(encodings.double(), ref.encodings, atol=1e-4, rtol=1e-4)


def test_batch_max_would_be_detected() -> None:
    """The batch-invariance tests of test_model.py can fail: with the published batch-wide key
    max, a cell beside a cell of all-top-bin tokens gets a different output."""
    for n_classes in (None, 3):
        model = sharp_model(n_classes=n_classes, seed=1)
        state = to_published_state_dict(model)
        tokens = random_tokens(8, 24, 5, seed=8, density=0.8)
        tokens[5, :-1] = 5
        single = reference_one_cell_at_a_time(state, tokens).logits
        batched = published_forward(state, tokens).logits
        assert (single - batched).abs().max() > 1e-4


# ------------------------------------------------------------------------------- gradients


def test_favor_attention_gradients_match_autograd_of_the_formula() -> None:
    """Ours has a hand-written backward (it recomputes the feature maps): check it against
    autograd through the published formulas, per cell (float64)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 20, 8, generator=generator, dtype=torch.float64) for _ in "qkv")
    k = k * 2  # different key maxima per head and per cell
    k[1] = k[1] * 2
    projection = orthogonal_features(16, 8, generator=generator).double()
    upstream = torch.randn(3, 2, 20, 8, generator=generator, dtype=torch.float64)
    grads = []
    for implementation in ("ours", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        if implementation == "ours":
            out = favor_attention(*leaves, projection)[0]
        else:
            cells = [
                linear_attention(*(t[i : i + 1] for t in leaves), projection) for i in range(3)
            ]
            out = torch.cat([cell_out for cell_out, _ in cells])
        (out * upstream).sum().backward()
        grads.append([t.grad for t in leaves])
        if implementation == "ours":
            forward = out.detach()
        else:
            torch.testing.assert_close(forward, out.detach())
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("n_classes", [None, 3])
def test_model_gradients_match_the_reference(n_classes: int | None) -> None:
    """Every parameter's gradient equals autograd through the reference forward."""
    model = sharp_model(n_classes=n_classes).train()
    model.encoder.freeze_projections()
    tokens = random_tokens(3, 24, 5, seed=5, density=0.6)
    tokens[0, :-1] = 5
    weights = torch.randn(model(tokens).shape, generator=torch.Generator().manual_seed(1))
    (model(tokens) * weights).sum().backward()
    # our gradients in the published layout: a copy of the model holding them as its weights
    holder = ScBert(config=model.config, gene2vec=model.state_dict()["gene_emb.weight"])
    holder.load_state_dict(model.state_dict())
    with torch.no_grad():
        for (name, param), (_, slot) in zip(
            model.named_parameters(), holder.named_parameters(), strict=True
        ):
            assert param.grad is not None, name
            slot.copy_(param.grad)
    ours = to_published_state_dict(holder)
    state = {
        k: v.double().requires_grad_(v.is_floating_point())
        for k, v in to_published_state_dict(model).items()
    }
    ref = reference_one_cell_at_a_time(state, tokens)
    (ref.logits * weights.double()).sum().backward()
    for key, value in state.items():
        if key.endswith("projection_matrix") or key == "pos_emb.emb.weight" or value.grad is None:
            continue
        torch.testing.assert_close(ours[key].double(), value.grad, rtol=1e-3, atol=1e-5, msg=key)
    assert sum(value.grad is not None for value in state.values()) >= 10
