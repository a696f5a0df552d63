"""Rank and norm spectra of the weights, and rank- and norm-based generalization bounds (Truong 2024).

Per matrix (every 2-D parameter, and per layer and head W_QK = W_Qʰᵀ W_Kʰ and the value–output map
Ṽ = (W_Oʰ W_Vʰ)ᵀ), from the singular values σ₁ ≥ σ₂ ≥ … computed in float64:

- numerical rank  #{σᵢ > tol}, tol = rtol·σ₁, or max(m, n)·eps_fp32·σ₁ when rtol is None (the
  weights are fp32, so this is numpy's matrix_rank rule at fp32 precision);
- stable rank     ‖A‖_F² / ‖A‖₂²;
- effective rank  exp(H(p)), pᵢ = σᵢ / Σσ (Roy & Vetterli 2007);
- spectral, Frobenius and nuclear norms.

Where attention lives: the model says, through ``model.attention_layers()`` (``AttentionSite``s in
lipflow.model.base: each attention module's projections, head count and score scale, and its block's
MLP M_in / M_out); layers are numbered in that order. Rotary position embeddings (lipschitz_gpt)
rotate q and k per position; W_QK is reported unrotated (relative offset 0), which leaves its rank and
norms per head unchanged only at offset 0. The attention's ``output_scale`` (lipschitz_gpt's ⅓) is
not folded in.

Bounds (all computed with the model's attention scale folded into W_QK; see icl_rank.md Part B):

- ``b3_rademacher``: the Rademacher term of the rigorous rank-parametric bound B3 (icl_rank.md §B3,
  the computable replacement for Truong's theorem, which grows as √rank instead of log rank) for
  the single-head class of that (layer, head), with W_QK, W_V = W_Vʰᵀ and the head's slice of the
  output projection as readout, B_X the largest attention-input token norm seen on training windows,
  n training sequences. B3 is a theorem for one layer; summed over heads it is a capacity proxy for
  the multi-layer model, not a bound on its loss gap.
- ``edelman_norm_proxy``: the norm-based (Edelman et al. 2022 style) multi-layer comparator B_Ed as
  coded by Sakai & Imaizumi (icl_rank.md §B7, dimensionless, no n).
- ``spectrum_adaptive_proxy``: Sakai & Imaizumi's B_ours (§B7): Schatten-p contributions with p
  chosen per matrix; at p = 0 it counts rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from lipflow.evaluation import EVALUATIONS, EvalContext
from lipflow.model.base import AttentionSite
from lipflow.model.bound import ACTIVATIONS

FP32_EPS = float(torch.finfo(torch.float32).eps)


# --- spectra ------------------------------------------------------------------------------------

def singular_values(a: torch.Tensor | np.ndarray) -> np.ndarray:
    """σ₁ ≥ σ₂ ≥ … of ``a`` in float64."""
    t = torch.as_tensor(a).detach().to("cpu", torch.float64)
    return torch.linalg.svdvals(t).numpy()


def numerical_rank(s: np.ndarray, shape: Sequence[int], rtol: float | None = None) -> int:
    """#{σᵢ > tol} with tol = rtol·σ₁, or max(shape)·eps_fp32·σ₁ when ``rtol`` is None."""
    if s.size == 0 or s[0] == 0:
        return 0
    tol = (rtol if rtol is not None else max(shape) * FP32_EPS) * s[0]
    return int((s > tol).sum())


def stable_rank(s: np.ndarray) -> float:
    """‖A‖_F² / ‖A‖₂² (0 for the zero matrix)."""
    return float((s ** 2).sum() / s[0] ** 2) if s.size and s[0] > 0 else 0.0


def effective_rank(s: np.ndarray) -> float:
    """exp of the entropy of σ/Σσ (Roy & Vetterli 2007); 0 for the zero matrix."""
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def norm_21(a: np.ndarray) -> float:
    """‖A‖_{2,1}: the sum of the ℓ₂ norms of A's columns."""
    return float(np.linalg.norm(a, axis=0).sum())


def spectrum_rows(a: torch.Tensor | np.ndarray, rtols: Sequence[float], **columns) -> list[dict]:
    """Long-form rows of every spectral metric of one matrix."""
    s = singular_values(a)
    shape = tuple(a.shape)
    values = {"spectral_norm": float(s[0]) if s.size else 0.0,
              "frobenius_norm": float(np.sqrt((s ** 2).sum())),
              "nuclear_norm": float(s.sum()),
              "stable_rank": stable_rank(s),
              "effective_rank": effective_rank(s)}
    rows = [{"metric": m, "value": v, "rtol": None, **columns} for m, v in values.items()]
    for rtol in (None, *rtols):
        rows.append({"metric": "numerical_rank", "value": float(numerical_rank(s, shape, rtol)),
                     "rtol": None if rtol is None else float(rtol), **columns})  # a DOUBLE column, also for rtols: [1]
    return rows


# --- where attention lives ----------------------------------------------------------------------

@dataclass
class AttentionLayer:
    """One attention layer's weights (PyTorch (fan_out, fan_in) orientation, float64)."""

    name: str
    n_heads: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor              # output projection (d_model, n_heads·d_head)
    scale: float                   # multiplies q·k in the attention logits
    input_proj: nn.Linear          # the Linear that reads the attention input (qkv or q)
    mlp_in: torch.Tensor | None    # the block's MLP up-projection
    mlp_out: torch.Tensor | None   # the block's MLP down-projection

    def _slice(self, w: torch.Tensor, h: int) -> torch.Tensor:
        d_head = w.shape[0] // self.n_heads
        return w[h * d_head:(h + 1) * d_head]

    def qk(self, h: int) -> torch.Tensor:
        """W_QK = W_Qʰᵀ W_Kʰ (d × d): head h's logit for query x, key x' is scale·xᵀ W_QK x'."""
        return self._slice(self.q, h).T @ self._slice(self.k, h)

    def value(self, h: int) -> torch.Tensor:
        """W_V of the single-head class (d × d_head): the value map is x ↦ W_Vᵀ x."""
        return self._slice(self.v, h).T

    def readout(self, h: int) -> torch.Tensor:
        """Head h's columns of the output projection (d_model × d_head)."""
        return self._slice(self.out.T, h).T

    def ov(self, h: int) -> torch.Tensor:
        """Ṽ = (W_Oʰ W_Vʰ)ᵀ (d × d), the value–output map in row-vector orientation."""
        return (self.readout(h) @ self._slice(self.v, h)).T


def _float64(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to("cpu", torch.float64)


def attention_layer(site: AttentionSite) -> AttentionLayer:
    """One site's weights in float64, as ``AttentionLayer``."""
    attention = site.attention
    q, k, v, out = (_float64(w) for w in attention.projection_weights())
    mlp_in, mlp_out = (None, None) if site.mlp is None else (_float64(w) for w in site.mlp)
    return AttentionLayer(site.name, attention.n_heads, q, k, v, out, float(attention.score_scale),
                          attention.first_projection, mlp_in, mlp_out)


def find_attention(model: nn.Module) -> list[AttentionLayer]:
    """Every attention layer of ``model``, from ``model.attention_layers()``."""
    return [attention_layer(site) for site in model.attention_layers()]


@torch.no_grad()
def attention_input_norms(model: nn.Module, layers: list[AttentionLayer], windows: torch.Tensor,
                          batch_size: int, device: torch.device) -> list[float]:
    """B_X per layer: the largest ℓ₂ norm of a token's attention input over ``windows``."""
    maxima = [0.0] * len(layers)

    def hook_for(i: int):
        def hook(_module, inputs):
            maxima[i] = max(maxima[i], inputs[0].detach().float().norm(dim=-1).max().item())
        return hook

    handles = [layer.input_proj.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(windows[start:start + batch_size, :-1].to(device))
    finally:
        for h in handles:
            h.remove()
    return maxima


# --- B3: rank-parametric covering bound (icl_rank.md §B3) --------------------------------------

def dudley_rademacher(terms: Sequence[tuple[float, float]], diameter: float, n: int) -> float:
    """Dudley: R̂_n ≤ (12/√n) ∫₀^D √(Σⱼ Pⱼ ln₊(cⱼ/ε)) dε, given a sup-norm covering
    ln N(ε) ≤ Σⱼ Pⱼ ln₊(cⱼ/ε) of a class with outputs in [−D, D] (D = ``diameter``)."""
    if diameter <= 0:
        return 0.0
    from scipy.integrate import quad  # here, not at the top: it costs every stage that lists evaluations 0.4 s

    def integrand(eps: float) -> float:
        return math.sqrt(sum(p * max(0.0, math.log(c / eps)) for p, c in terms if c > 0))

    kinks = sorted(c for _, c in terms if 0 < c < diameter)
    value, _ = quad(integrand, 0.0, diameter, points=kinks or None, limit=200)
    return 12.0 / math.sqrt(n) * value


def b3_terms(qk: torch.Tensor, value: torch.Tensor, readout: torch.Tensor, input_bound: float,
             activation_lipschitz: float = 1.0,
             rtol: float | None = None) -> tuple[list[tuple[float, float]], float]:
    """B3's covering terms [(Pⱼ, cⱼ)] and the output range D for f(X) = w σ(W_Vᵀ Xᵀ softmax(X W_QK x_τ)).

    W_QK (d × d): P = (2d+1)·r_w, c = 54·‖W_QK‖_F·B_w·L_σ·B_V·B_X³; W_V (d × k): P = (d+k+1)·r_v,
    c = 27·‖W_V‖_F·B_w·L_σ·B_X; readout w ∈ ℝᵏ: P = k, c = 9·B_w·L_σ·B_V·B_X (ℓ₂-ball net), or a
    matrix readout (d_out × k), covered like W_V by the Candès–Plan low-rank net: P = (d_out+k+1)·r_o,
    c = 27·‖W_O‖_F·L_σ·B_V·B_X. B_w = ‖w‖₂, B_V = ‖W_V‖₂, D = B_w·L_σ·B_V·B_X. Ranks are numerical
    ranks at ``rtol`` (None: fp32 machine precision, so the weights lie in the class).
    """
    def rank_and_norms(a: torch.Tensor) -> tuple[int, float, float]:
        s = singular_values(a)
        return numerical_rank(s, a.shape, rtol), float(np.sqrt((s ** 2).sum())), float(s[0])

    r_w, a_qk, _ = rank_and_norms(qk)
    r_v, a_v, b_v = rank_and_norms(value)
    d, k = value.shape
    lip, bx = activation_lipschitz, input_bound
    if readout.ndim == 1:
        b_w = float(readout.norm())
        readout_term = (float(k), 9 * b_w * lip * b_v * bx)
    else:
        r_o, a_o, b_w = rank_and_norms(readout)
        readout_term = (float((readout.shape[0] + k + 1) * r_o), 27 * a_o * lip * b_v * bx)
    terms = [(float((2 * d + 1) * r_w), 54 * a_qk * b_w * lip * b_v * bx ** 3),
             (float((d + k + 1) * r_v), 27 * a_v * b_w * lip * bx),
             readout_term]
    return terms, b_w * lip * b_v * bx


# --- Sakai & Imaizumi's multi-layer proxies (icl_rank.md §B7) -----------------------------------

@dataclass
class LayerMatrices:
    """One layer in row-vector orientation: per-head QK and Ṽ (N × N), MLP M_in (N × d_ff), M_out."""

    qk: list[np.ndarray]
    ov: list[np.ndarray]
    mlp_in: np.ndarray | None
    mlp_out: np.ndarray | None


def _c2(a: np.ndarray | None) -> float:
    return 1.0 if a is None else float(singular_values(a)[0])  # an absent MLP contributes factor 1


def depth_amplification(layers: Sequence[LayerMatrices], activation_lipschitz: float) -> list[float]:
    """α^ℓ = ∏_{k>ℓ} L_φ·C₂(M_in^k)·C₂(M_out^k)·Σ_h C₂(Ṽ^{k,h})·(1 + 4·C₂(QK^{k,h}))."""
    factors = []
    for layer in layers:
        heads = sum(_c2(v) * (1 + 4 * _c2(q)) for q, v in zip(layer.qk, layer.ov))
        mlp = activation_lipschitz * _c2(layer.mlp_in) * _c2(layer.mlp_out) if layer.mlp_in is not None else 1.0
        factors.append(mlp * heads)
    return [float(np.prod(factors[i + 1:])) for i in range(len(layers))]


def edelman_norm_proxy(layers: Sequence[LayerMatrices], activation_lipschitz: float) -> float:
    """B_Ed = (1 + Σ_ℓ (α^ℓ)^{2/3} ξ^ℓ)^{3/2}, ξ as coded by Sakai & Imaizumi (icl_rank.md §B7.7)."""
    alpha = depth_amplification(layers, activation_lipschitz)
    total = 0.0
    for a, layer in zip(alpha, layers):
        c_in, c_out = _c2(layer.mlp_in), _c2(layer.mlp_out)
        xi = sum((c_out * c_in * _c2(v) * norm_21(q)) ** (2 / 3) + (c_out * c_in * norm_21(v)) ** (2 / 3)
                 for q, v in zip(layer.qk, layer.ov))
        if layer.mlp_in is not None:
            xi += (c_out * norm_21(layer.mlp_in)) ** (2 / 3) + norm_21(layer.mlp_out) ** (2 / 3)
        total += a ** (2 / 3) * xi
    return float((1 + total) ** 1.5)


def schatten_contribution(s: np.ndarray, p: float, scale: float, width: int) -> float:
    """c(W, p) = S_p^{1/(p+2)}·s^{p/(p+2)}·N^{(p+1)/(p+2)} with S_p = Σσᵢᵖ and S_0 = rank
    (tolerance 1e-10·len(σ)·max(σ₁, 1)), as in Sakai & Imaizumi's code."""
    if p == 0:
        sp = float((s > 1e-10 * len(s) * max(float(s[0]), 1.0)).sum())
    else:
        sp = float((s ** p).sum())
    scale = max(scale, np.finfo(float).tiny)
    return sp ** (1 / (p + 2)) * scale ** (p / (p + 2)) * width ** ((p + 1) / (p + 2))


def spectrum_adaptive_proxy(layers: Sequence[LayerMatrices], activation_lipschitz: float, width: int) -> float:
    """B_ours = Σ over matrices of min_{p ∈ {0, 1/m, …, 2}} c(W, p) + √L, m = ⌈L + ln N⌉,
    scale s = γ·α^ℓ·L with γ(QK) = 2C₂(Ṽ)C₂(M_out)C₂(M_in), γ(Ṽ) = C₂(M_out)C₂(M_in),
    γ(M_in) = C₂(M_out), γ(M_out) = 1."""
    depth = len(layers)
    m = max(1, math.ceil(depth + math.log(max(width, 2))))
    grid = np.arange(0, 2 * m + 1) / m
    alpha = depth_amplification(layers, activation_lipschitz)
    total = 0.0
    for a, layer in zip(alpha, layers):
        c_in, c_out = _c2(layer.mlp_in), _c2(layer.mlp_out)
        matrices = []
        for q, v in zip(layer.qk, layer.ov):
            matrices += [(q, 2 * _c2(v) * c_out * c_in), (v, c_out * c_in)]
        if layer.mlp_in is not None:
            matrices += [(layer.mlp_in, c_out), (layer.mlp_out, 1.0)]
        for w, gamma in matrices:
            s = singular_values(w)
            total += min(schatten_contribution(s, float(p), gamma * a * depth, width) for p in grid)
    return float(total + math.sqrt(depth))


# --- the evaluation ---------------------------------------------------------------------------

@EVALUATIONS.register("rank")
def evaluate(ctx: EvalContext) -> list[dict]:
    """Spectra of every weight matrix and of W_QK / Ṽ per head; B3, B_Ed, B_ours; the measured gap."""
    cfg, model = ctx.cfg, ctx.model.to(ctx.device).eval()
    rtols = list(cfg["rtols"])
    skipped = set() if cfg["include_embeddings"] else {n for n, _ in model.param_roles()["embed"]}
    rows: list[dict] = []
    matrices = [(name, p) for name, p in model.named_parameters() if p.ndim == 2 and name not in skipped]
    for name, p in matrices:
        rows += spectrum_rows(p, rtols, matrix=name, layer=None, head=None)
    ctx.report(f"spectra of {len(matrices)} weight matrices")

    layers = find_attention(model)
    if cfg["n_train"] is None:
        raise ValueError("evaluations.rank.n_train is null: build the context with "
                         "lipflow.evaluation.__main__.build_context, which sets it to train tokens / context")
    n_train = int(cfg["n_train"])
    input_bounds = attention_input_norms(model, layers, ctx.first_train_windows(cfg["bx_windows"]),
                                         cfg["batch_size"], ctx.device)
    lip = ACTIVATIONS.get(ctx.run["activation"]).base_lipschitz  # L_φ = max φ′ (S&I round 1.1289 to 1.13)
    bound_rtol = cfg["bound_rtol"]
    b3_total, per_layer = 0.0, []
    for i, (layer, bx) in enumerate(zip(layers, input_bounds)):
        rows.append({"metric": "attention_input_max_norm", "value": bx, "layer": i})
        qks, ovs = [], []
        for h in range(layer.n_heads):
            qk, ov = layer.qk(h), layer.ov(h)
            rows += spectrum_rows(qk, rtols, matrix="qk", layer=i, head=h)
            qks.append((layer.scale * qk).numpy())
            rows += spectrum_rows(ov, rtols, matrix="ov", layer=i, head=h)
            ovs.append(ov.numpy())
            terms, diameter = b3_terms(layer.scale * qk, layer.value(h), layer.readout(h), bx,
                                       activation_lipschitz=1.0, rtol=bound_rtol)
            r = dudley_rademacher(terms, diameter, n_train)
            b3_total += r
            rows.append({"metric": "b3_rademacher", "value": r, "layer": i, "head": h, "n": n_train})
        per_layer.append(LayerMatrices(qks, ovs, None if layer.mlp_in is None else layer.mlp_in.T.numpy(),
                                       None if layer.mlp_out is None else layer.mlp_out.T.numpy()))
        ctx.report(f"attention layer {i + 1} of {len(layers)}: W_QK and Ṽ spectra, B3 of {layer.n_heads} head(s)")
    if layers:
        rows.append({"metric": "b3_rademacher_sum", "value": b3_total, "n": n_train})
        width = layers[0].q.shape[1]
        rows.append({"metric": "edelman_norm_proxy", "value": edelman_norm_proxy(per_layer, lip)})
        rows.append({"metric": "spectrum_adaptive_proxy", "value": spectrum_adaptive_proxy(per_layer, lip, width)})
    rows.append({"metric": "n_train", "value": float(n_train)})
    if ctx.val_loss is not None and ctx.train_loss is not None:
        rows.append({"metric": "generalization_gap", "value": ctx.val_loss - ctx.train_loss})
    return rows
