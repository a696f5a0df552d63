"""L-layer self-attention on regression prompts (Ahn et al. 2023, eqs. 4, 8, 11; code convention).

Tokens are rows: Z ∈ R^{B×(n+1)×(d+1)}. Layer ℓ with blocks P_ℓ, Q_ℓ ∈ R^{d×d} embeds
P̄ = [[P, 0], [0, 1]] and Q̄ = [[Q, 0], [0, 0]] and updates

    linear:  Z ← Z + (1/n) (Z Q̄ Zᵀ) M (Z P̄ᵀ),   M = diag(1, …, 1, 0) (the query is no key/value)
    softmax: Z ← Z + softmax_keys(Z Q̄ Zᵀ restricted to context keys) (Z_ctx P̄ᵀ)

and the prediction is −Z_L[n+1, d+1]. The linear form is evaluated as Z Q̄ (Zᵀ M Z) P̄ᵀ / n, the
same product reassociated, at O(n d²) instead of O(n² d). Under the sparse parametrization
(P = 0, eq. 8) the x-rows never change and −Q_ℓ is the preconditioner Γ_ℓ of step ℓ of
preconditioned GD from w = 0 (Lemma 1): w_{ℓ+1} = w_ℓ − Γ_ℓ ∇R(w_ℓ).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lipflow.registry import Registry

# name → (x, ctx_x, ctx_labels, Q, P | None) → (Δx | None, Δlabels); x (B, n+1, d) are the
# x-rows of all tokens (queries of the attention), ctx_* the n context tokens (keys/values)
Attention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    tuple[torch.Tensor | None, torch.Tensor],
]
ATTENTIONS: Registry[Attention] = Registry("icl attention")


@ATTENTIONS.register("linear")
def linear_attention(x, ctx_x, ctx_labels, q, p):
    """Δ = (1/n) X Q (X_ctxᵀ Z_ctx) P̄ᵀ: label part X Q c with c = (1/n) Σ_j y_j x_j, x-part
    X Q C Pᵀ with C = (1/n) Σ_j x_j x_jᵀ."""
    n = ctx_x.shape[1]
    c = (ctx_labels.unsqueeze(1) @ ctx_x).squeeze(1) / n  # (B, d)
    delta_labels = (x @ (c @ q.T).unsqueeze(-1)).squeeze(-1)
    if p is None:
        return None, delta_labels
    cov = ctx_x.transpose(1, 2) @ ctx_x / n  # (B, d, d)
    return x @ (q @ cov @ p.T), delta_labels


@ATTENTIONS.register("softmax")
def softmax_attention(x, ctx_x, ctx_labels, q, p):
    """Δ = softmax over context keys of (x_i Q x_jᵀ), applied to the values (P x_j, y_j)."""
    weights = torch.softmax(x @ q @ ctx_x.transpose(1, 2), dim=-1)  # (B, n+1, n)
    delta_labels = weights @ ctx_labels.unsqueeze(-1)
    delta_x = None if p is None else weights @ ctx_x @ p.T
    return delta_x, delta_labels.squeeze(-1)


PARAMETRIZATIONS = Registry("icl parametrization")
PARAMETRIZATIONS.register("sparse")(False)  # value: whether P is learned
PARAMETRIZATIONS.register("full")(True)


class InContextTransformer(nn.Module):
    """Stack of ``n_layers`` single-head attention layers with blocks Q (and P when full)."""

    def __init__(
        self,
        d: int,
        n_layers: int,
        parametrization: str = "sparse",
        attention: str = "linear",
        init_std: float = 1e-4,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.d, self.n_layers = d, n_layers
        self._attend = ATTENTIONS.get(attention)
        learn_p = PARAMETRIZATIONS.get(parametrization)
        init = torch.randn(2, n_layers, d, d, generator=generator) * init_std
        self.q = nn.Parameter(init[0].clone())
        self.p = nn.Parameter(init[1].clone()) if learn_p else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prediction of the query's label, −Z_L[:, n, d], for tokens (B, n+1, d+1)."""
        x, labels = tokens[..., :-1], tokens[..., -1]
        for layer in range(self.n_layers):
            p = None if self.p is None else self.p[layer]
            dx, dlabels = self._attend(x, x[:, :-1], labels[:, :-1], self.q[layer], p)
            labels = labels + dlabels
            if dx is not None:
                x = x + dx
        return -labels[:, -1]

    def preconditioners(self) -> torch.Tensor:
        """Γ_ℓ = −Q_ℓ (L, d, d): the per-layer preconditioners of the sparse model."""
        return -self.q.detach()
