"""FAVOR+ self-attention (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021).

Softmax attention softmax(q k^T / sqrt(d)) v is approximated with positive random features
phi(x) = m^-1/2 (exp(w_j . x' - |x'|^2 / 2 - c) + eps), x' = x d^-1/4, w_j the rows of an
orthogonal Gaussian projection (m, d); attention is then D^-1 phi(q) (phi(k)^T v) with
D = diag(phi(q) phi(k)^T 1), linear in sequence length.

Equal to the published scBERT implementation, with two differences in how it is computed:
- The key stabiliser c is the max over each cell's own features (the published code takes the max
  over the whole batch tensor, so a cell's output depends on its batch-mates; for a batch of one
  the two agree). The query stabiliser is the per-row max, as published. Stabilisers are treated
  as constants in backward.
- The common factor m^-1/2 cancels between numerator and D and is dropped, and the +eps is applied
  to the small (m, d + 1) products instead of the large (n, m) feature maps. A ones column appended
  to v makes D come out of the same matrix product as the numerator.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from scbert.config import ScBertConfig

KERNEL_EPS = 1e-4  # the published softmax_kernel's eps


def orthogonal_features(
    nb_features: int, dim_head: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian orthogonal random projection (nb_features, dim_head), on the CPU.

    Stacked blocks of orthonormal rows (QR of a Gaussian matrix), each row rescaled by the norm of
    an independent Gaussian vector so that rows are marginally Gaussian (FAVOR+, scaling 0). Q is
    sign-corrected (columns times sign(diag R)) so that it is Haar-distributed; the published
    code (performer-pytorch, qr_uniform_q=False) skips this, which biases the kernel estimate.
    Published checkpoints carry their projection, so loading them is unaffected.
    """
    blocks = []
    for _ in range(math.ceil(nb_features / dim_head)):
        gaussian = torch.randn(dim_head, dim_head, generator=generator)
        q, r = torch.linalg.qr(gaussian)
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    rows = torch.cat(blocks)[:nb_features]
    norms = torch.randn(nb_features, dim_head, generator=generator).norm(dim=1)
    return norms[:, None] * rows


def exp_features(
    x: torch.Tensor, projection_t: torch.Tensor, *, per_row: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(w_j . x' - |x'|^2 / 2 - c) for one (cell, head): x (n, d) -> (n, m), and c.

    phi(x) without m^-1/2 and eps. ``projection_t`` is (d, m), already scaled by d^-1/4.
    ``per_row``: c is each row's max (queries, (n, 1)); else the max over the block (keys, ()).
    """
    sq_scale = x.shape[-1] ** -0.5 / 2
    dash = x @ projection_t  # (n, m)
    half_sq_norm = x.square().sum(dim=-1, keepdim=True) * sq_scale  # (n, 1)
    with torch.no_grad():
        stabiliser = dash.detach().amax(dim=-1, keepdim=True) if per_row else dash.detach().amax()
    # in place: (n, m) is the largest tensor of the model; exp_ keeps its output for backward
    return dash.sub_(half_sq_norm + stabiliser).exp_(), stabiliser


def _exp_features_backward(
    x: torch.Tensor, projection_t: torch.Tensor, features: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """d/dx of sum(grad * features), features = exp(x W - |x|^2 / (2 sqrt d) - c), c constant."""
    grad_dash = grad.mul_(features)  # (n, m)
    sq_scale = x.shape[-1] ** -0.5
    return grad_dash @ projection_t.t() - x * (grad_dash.sum(dim=-1, keepdim=True) * sq_scale)


class _KeyContext(torch.autograd.Function):
    """exp-features(k)^T [v, 1] of one (cell, head), (m, d + 1), and the key stabiliser.

    Saves k and v, not the (n, m) features: backward recomputes them (the memory-lean FAVOR+).
    """

    @staticmethod
    def forward(
        ctx: Any, k: torch.Tensor, v1: torch.Tensor, projection_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ek, stabiliser = exp_features(k, projection_t, per_row=False)
        ctx.save_for_backward(k, v1, projection_t)
        ctx.mark_non_differentiable(stabiliser)
        return ek.t() @ v1, stabiliser

    @staticmethod
    def backward(
        ctx: Any, grad_context: torch.Tensor, _: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        k, v1, projection_t = ctx.saved_tensors
        ek, _ = exp_features(k, projection_t, per_row=False)
        grad_context = grad_context.to(ek.dtype)
        grad_v1 = ek @ grad_context  # (n, d + 1)
        grad_k = _exp_features_backward(k, projection_t, ek, v1 @ grad_context.t())
        return grad_k, grad_v1, None


class _QueryOut(torch.autograd.Function):
    """exp-features(q) @ context + eps term of one (cell, head), (n, d + 1); saves q, not the
    (n, m) features, which backward recomputes."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        context: torch.Tensor,
        context_eps: torch.Tensor,
        projection_t: torch.Tensor,
    ) -> torch.Tensor:
        eq, _ = exp_features(q, projection_t, per_row=True)
        ctx.save_for_backward(q, context, projection_t)
        return eq @ context + context_eps

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, context, projection_t = ctx.saved_tensors
        eq, _ = exp_features(q, projection_t, per_row=True)
        grad_out = grad_out.to(eq.dtype)
        grad_context = eq.t() @ grad_out  # (m, d + 1)
        grad_q = _exp_features_backward(q, projection_t, eq, grad_out @ context.t())
        return grad_q, grad_context, grad_out.sum(dim=0), None


def _key_context(
    k: torch.Tensor, v1: torch.Tensor, projection_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _KeyContext.apply(k, v1, projection_t)  # type: ignore[no-untyped-call]


def _query_out(
    q: torch.Tensor, context: torch.Tensor, context_eps: torch.Tensor, projection_t: torch.Tensor
) -> torch.Tensor:
    return _QueryOut.apply(q, context, context_eps, projection_t)  # type: ignore[no-untyped-call]


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    *,
    column_sums: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FAVOR+ attention for q, k, v (b, h, n, d) -> (b, h, n, d), one (cell, head) at a time.

    An (n, m) feature map of one (cell, head) fits in the CPU's last-level cache (16,907 x 266
    floats = 18 MB at paper size), the whole (b, h, n, m) tensor does not; and backward recomputes
    the maps instead of keeping them (the largest activations of the model). The key stabiliser of
    the published code is the max over the cell (all heads): each head is first computed with its
    own max c_h, and its (m, d + 1) context is rescaled by exp(c_h - c) once all heads are known.

    With ``column_sums`` (no autograd) also returns sum_i A_ij (b, h, n), in O(n m) per head:
    A = D^-1 phi(q) phi(k)^T, so sum_i A_ij = phi(k_j) . sum_i phi(q_i) / D_i.
    """
    if column_sums and torch.is_grad_enabled():
        raise RuntimeError("column_sums is for analysis: call under torch.no_grad()")
    b, h, n, d = q.shape
    projection_t = projection.t().to(q.dtype) * d**-0.25  # (d, m)
    v1 = F.pad(v, (0, 1), value=1.0)  # (b, h, n, d + 1): the ones column yields D
    # unbind, not indexing: indexing's backward builds a zero-filled (b, h, n, d) per slice;
    # q and k are strided views of the fused qkv, and the (n, d) @ (d, m) product runs 15-25%
    # faster on a contiguous copy of one head (4 MB) than on the view
    qs, ks, vs = (
        [head.contiguous() for cell in t.unbind(0) for head in cell.unbind(0)] for t in (q, k, v1)
    )
    contexts, stabilisers = zip(
        *(_key_context(kc, vc, projection_t) for kc, vc in zip(ks, vs, strict=True)),
        strict=True,
    )
    rescale = torch.stack(stabilisers).view(b, h)
    rescale = torch.exp(rescale - rescale.amax(dim=1, keepdim=True))  # exp(c_h - c), (b, h)
    # phi(k)^T [v, 1] with phi(k) = ek + eps (up to m^-1/2, which cancels)
    context = torch.stack(contexts).view(b, h, -1, d + 1) * rescale[..., None, None]
    context = context + KERNEL_EPS * v1.sum(dim=-2, keepdim=True)  # (b, h, m, d + 1)
    context_eps = KERNEL_EPS * context.sum(dim=-2)  # (b, h, d + 1): the eps of phi(q)
    outs: list[torch.Tensor] = []
    sums: list[torch.Tensor] = []
    contexts_c, eps_cs = context.flatten(0, 1).unbind(0), context_eps.flatten(0, 1).unbind(0)
    for qc, kc, context_c, eps_c in zip(qs, ks, contexts_c, eps_cs, strict=True):
        out = _query_out(qc, context_c, eps_c, projection_t)
        outs.append(out[:, :-1] / out[:, -1:])  # (n, d)
        if column_sums:
            eq, _ = exp_features(qc, projection_t, per_row=True)
            ek, _ = exp_features(kc, projection_t, per_row=False)
            inv_d = out[:, -1].reciprocal()  # (n,)
            weights = eq.t() @ inv_d + KERNEL_EPS * inv_d.sum()  # (m,)
            scale = rescale.flatten()[len(sums)]  # exp(c_h - c) of this (cell, head)
            sums.append(ek @ weights * scale + KERNEL_EPS * weights.sum())  # (n,)
    column = torch.stack(sums).view(b, h, n) if column_sums else None
    return torch.stack(outs).view(b, h, n, d), column


class SelfAttention(nn.Module):
    """Multi-head FAVOR+ self-attention: fused q/k/v projection, shared random projection."""

    projection: torch.Tensor  # (nb_features, dim_head) buffer, saved in the state dict

    def __init__(self, *, config: ScBertConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.dim_head = config.dim_head
        self.nb_features = config.nb_features
        self.to_qkv = nn.Linear(config.dim, 3 * config.inner_dim, bias=config.qkv_bias)
        self.to_out = nn.Linear(config.inner_dim, config.dim)
        self.dropout = nn.Dropout(config.attn_dropout)
        self.register_buffer("projection", orthogonal_features(self.nb_features, self.dim_head))

    @torch.no_grad()
    def redraw_projection(self, generator: torch.Generator | None = None) -> None:
        """Draw a new random projection (in place, so the state dict keeps pointing at it)."""
        fresh = orthogonal_features(self.nb_features, self.dim_head, generator=generator)
        self.projection.copy_(fresh)

    def forward(
        self, x: torch.Tensor, *, column_sums: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (b, n, dim) -> (b, n, dim); with ``column_sums`` also mean_heads sum_i A_ij (b, n)."""
        qkv = self.to_qkv(x)  # (b, n, 3 * heads * dim_head)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out, sums = favor_attention(q, k, v, self.projection, column_sums=column_sums)
        sums = None if sums is None else sums.mean(dim=1)
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        return self.dropout(out), sums
