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

import itertools
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
    floats = 18 MB at paper size), the whole (b, h, n, m) tensor does not. The key stabiliser of
    the published code is the max over the cell (all heads): each head is first computed with its
    own max c_h, and its (m, d + 1) context is rescaled by exp(c_h - c) once all heads are known.

    With ``column_sums`` also returns sum_i A_ij (b, h, n), in O(n m) per head:
    A = D^-1 phi(q) phi(k)^T, so sum_i A_ij = phi(k_j) . sum_i phi(q_i) / D_i.
    """
    b, h, n, d = q.shape
    projection_t = projection.t().to(q.dtype) * d**-0.25  # (d, m)
    v1 = F.pad(v, (0, 1), value=1.0)  # (b, h, n, d + 1): the ones column yields D
    contexts, stabilisers, key_maps = [], [], []
    for cell, head in itertools.product(range(b), range(h)):
        ek, stabiliser = exp_features(k[cell, head], projection_t, per_row=False)
        contexts.append(ek.t() @ v1[cell, head])  # (m, d + 1)
        stabilisers.append(stabiliser)
        if column_sums:
            key_maps.append(ek)
    rescale = torch.stack(stabilisers).view(b, h)
    rescale = torch.exp(rescale - rescale.amax(dim=1, keepdim=True))  # exp(c_h - c), (b, h)
    # phi(k)^T [v, 1] with phi(k) = ek + eps (up to m^-1/2, which cancels)
    context = torch.stack(contexts).view(b, h, -1, d + 1) * rescale[..., None, None]
    context = context + KERNEL_EPS * v1.sum(dim=-2, keepdim=True)  # (b, h, m, d + 1)
    context_eps = KERNEL_EPS * context.sum(dim=-2)  # (b, h, d + 1): the eps of phi(q)
    outs, sums = [], []
    for index, (cell, head) in enumerate(itertools.product(range(b), range(h))):
        eq, _ = exp_features(q[cell, head], projection_t, per_row=True)
        out = eq @ context[cell, head] + context_eps[cell, head]  # (n, d + 1)
        outs.append(out[:, :-1] / out[:, -1:])
        if column_sums:
            inv_d = out[:, -1].reciprocal()  # (n,)
            weights = eq.t() @ inv_d + KERNEL_EPS * inv_d.sum()  # (m,)
            scaled = key_maps[index] @ weights * rescale[cell, head]
            sums.append(scaled + KERNEL_EPS * weights.sum())  # (n,)
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
