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
    an independent Gaussian vector so that rows are marginally Gaussian (FAVOR+, scaling 0).
    """
    blocks = []
    for _ in range(math.ceil(nb_features / dim_head)):
        gaussian = torch.randn(dim_head, dim_head, generator=generator)
        q, _ = torch.linalg.qr(gaussian)
        blocks.append(q.T)
    rows = torch.cat(blocks)[:nb_features]
    norms = torch.randn(nb_features, dim_head, generator=generator).norm(dim=1)
    return norms[:, None] * rows


def exp_features(x: torch.Tensor, projection: torch.Tensor, *, per_cell: bool) -> torch.Tensor:
    """exp(w_j . x' - |x'|^2 / 2 - c), (b, h, n, d) -> (b, h, n, m); phi(x) without m^-1/2 and eps.

    ``per_cell``: c is the max over the cell's (h, n, m) features (keys); else over m (queries).
    """
    scale = x.shape[-1] ** -0.25
    dash = torch.matmul(x, projection.t().to(x.dtype) * scale)  # (b, h, n, m)
    half_sq_norm = x.square().sum(dim=-1, keepdim=True) * (scale * scale / 2)  # (b, h, n, 1)
    with torch.no_grad():
        dims = (1, 2, 3) if per_cell else (-1,)
        stabiliser = dash.detach().amax(dim=dims, keepdim=True)
    # in place: (b, h, n, m) is the largest tensor of the model; exp_ keeps its output for backward
    return dash.sub_(half_sq_norm + stabiliser).exp_()


def favor_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FAVOR+ attention for q, k, v (b, h, n, d).

    Returns (out (b, h, n, d), exp-features of q and k (b, h, n, m), normaliser D (b, h, n)) so
    that callers can derive attention statistics without recomputing the features.
    """
    ek = exp_features(k, projection, per_cell=True)
    v1 = F.pad(v, (0, 1), value=1.0)  # (b, h, n, d + 1)
    # phi(k)^T [v, 1] with phi(k) = ek + eps (up to m^-1/2)
    context = ek.transpose(-1, -2) @ v1 + KERNEL_EPS * v1.sum(
        dim=-2, keepdim=True
    )  # (b, h, m, d + 1)
    eq = exp_features(q, projection, per_cell=False)
    out = eq @ context + KERNEL_EPS * context.sum(dim=-2, keepdim=True)  # (b, h, n, d + 1)
    normaliser = out[..., -1]
    return out[..., :-1] / normaliser.unsqueeze(-1), eq, ek, normaliser


def attention_column_sums(
    eq: torch.Tensor, ek: torch.Tensor, normaliser: torch.Tensor
) -> torch.Tensor:
    """Attention each position receives, sum_i A_ij, (b, h, n), in O(n m) per head.

    A = D^-1 phi(q) phi(k)^T, so sum_i A_ij = phi(k_j) . sum_i phi(q_i) / D_i: the n x n matrix
    is never formed.
    """
    inv_d = normaliser.reciprocal()  # (b, h, n)
    weights = (eq.transpose(-1, -2) @ inv_d.unsqueeze(-1)).squeeze(-1)  # (b, h, m)
    weights = weights + KERNEL_EPS * inv_d.sum(dim=-1, keepdim=True)
    sums = (ek @ weights.unsqueeze(-1)).squeeze(-1)  # (b, h, n)
    return sums + KERNEL_EPS * weights.sum(dim=-1, keepdim=True)


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
        out, eq, ek, normaliser = favor_attention(q, k, v, self.projection)
        sums = attention_column_sums(eq, ek, normaliser).mean(dim=1) if column_sums else None
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        return self.dropout(out), sums
