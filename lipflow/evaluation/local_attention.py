"""Local constants of ``lipschitz_gpt``'s attention at a nominal input, for the local certificate
(``local_certificate``): the layer's output and record at that input (``attention_at``), its
Lipschitz and curvature bounds over a Frobenius ball around it (``attention_bounds``) and a bound on
its Jacobian's norm at the input itself (``attention_jacobian_norm``), for all query positions or,
through ``last_query``, for the last one only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lipflow.model.base import spectral_norm
from lipflow.model.bound import head_spectral_norms


class AttentionRecord(NamedTuple):
    """One attention layer at the nominal input: rotated queries and keys and the values (B, H, T, d_h),
    the softmax probabilities (B, H, T, T), each key's and value's distance to the query's attended
    mean (B, H, T, T), per-head σ_max of W_q, W_k, W_v (H,), σ_max(W_o)·output scale, the score scale c,
    and σ_max of the whole W_q, W_k, W_v."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    probs: torch.Tensor
    k_spread: torch.Tensor
    v_spread: torch.Tensor
    sigma_q: torch.Tensor
    sigma_k: torch.Tensor
    sigma_v: torch.Tensor
    out_norm: float
    score_scale: float
    sigma_whole: tuple[float, float, float]


def attention_bounds(rec: AttentionRecord, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, β) of one attention layer on the Frobenius ball of radius r (B,) around its nominal input.

    Per head, for every X in the ball: ‖q_t‖ ≤ Q_t = ‖q⁰_t‖ + σ_q·r (RoPE is orthogonal); keys and
    values lie within k̂_ts = ‖k⁰_s − k̄⁰_t‖ + σ_k·r and v̂_ts = ‖v⁰_s − v̄⁰_t‖ + σ_v·r of the nominal
    attention-weighted means k̄⁰_t, v̄⁰_t. Softmax ignores a per-row constant, so the scores move by
    at most Δ_t = c·r·(σ_q·max_s k̂_ts + σ_k·‖q⁰_t‖) after removing c⟨Δq_t, k̄⁰_t⟩, and
    P_ts ≤ P̂_ts = min(1, P⁰_ts·e^{2Δ_t}). Spreads (variance ≤ mean square distance to any point):
    S_t² = Σ_s P_ts‖v_s − v̄_t‖² ≤ min(Σ_s P̂_ts v̂_ts², max_s v̂_ts²), likewise K_t² for the keys.
    With dz = ζ (first order) and ξ (second order) for a direction U (‖U‖_F = 1):
      Do_t = Σ_s P_ts W_v u_s + Σ_s P_ts(ζ_ts − ζ̄_t)(v_s − v̄_t),
      D²o_t = 2Σ_s P_ts(ζ_ts − ζ̄_t)W_v u_s + Σ_s P_ts(ξ_ts − ξ̄_t)(v_s − v̄_t)
              + Σ_s P_ts((ζ_ts − ζ̄_t)² − Var_t ζ)(v_s − v̄_t)   (softmax's Jacobian and Hessian).
    Centred at ζ_c = c⟨W_q u_t, k̄⁰_t⟩: |ζ_ts − ζ_c| ≤ c(σ_q‖u_t‖k̂_ts + Q_tσ_k‖u_s‖) ≤ c·M_t with
    M_t = σ_q·max_s k̂_ts + σ_kQ_t, Var_t ζ ≤ Σ_s P_ts(ζ_ts − ζ_c)², |ξ_ts| ≤ 2cσ_qσ_k‖u_t‖‖u_s‖.
    Weighted Cauchy–Schwarz and Σ_t Σ_s P̂_ts‖u_s‖² ≤ C = max_s Σ_t P̂_ts give
      L_h = σ_v√C + c·(2σ_q²·max_t S_t²K_t² + 2σ_k²·max_s Σ_t S_t²Q_t²P̂_ts)^½,
      β_h = 2√2·σ_v·c·(σ_q²·max_t K_t² + σ_k²·max_s Σ_t Q_t²P̂_ts)^½ + 2cσ_qσ_k·max_t S_t
            + 2√2·c²·(σ_q²·max_t M_t²K_t²S_t² + σ_k²·max_s Σ_t M_t²Q_t²S_t²P̂_ts)^½.
    Each term is c_h·‖W u‖-weighted with per-head coefficients, so the heads combine as in
    ``across_heads`` (stacked, or with the whole matrices' σ and max_h of the coefficient); W_o with its
    output scale multiplies both.
    """
    c = rec.score_scale
    rr = r.view(-1, 1, 1)
    sq, sk, sv = (s.view(1, -1, 1) for s in (rec.sigma_q, rec.sigma_k, rec.sigma_v))
    causal = causal_mask(*rec.probs.shape[-2:], r.device)
    big_q = rec.q.norm(dim=-1) + sq * rr                                         # Q_t (B, H, T)
    k_far = torch.where(causal, rec.k_spread + (sk * rr)[..., None], 0.0)       # k̂_ts (B, H, T, T)
    v_far = torch.where(causal, rec.v_spread + (sv * rr)[..., None], 0.0)
    k_max = k_far.amax(dim=-1)
    shift = c * rr * (sq * k_max + sk * rec.q.norm(dim=-1))                      # Δ_t
    # a nominal probability that underflowed to 0 is below the least subnormal, not 0: with that floor
    # 0·e^{2Δ} = 0·inf (NaN, for sharp attention and large r) becomes the sound P̂ = 1. Where denormals
    # are flushed (torch.set_flush_denormal(True), FTZ/DAZ) the floor itself reads as 0, so a NaN left by
    # 0·inf is also taken as P̂ = 1 (sound: P̂ ≤ 1 always)
    floor = torch.finfo(rec.probs.dtype).smallest_normal * torch.finfo(rec.probs.dtype).eps
    scaled = (rec.probs.clamp_min(floor) * torch.exp(2.0 * shift)[..., None]).nan_to_num(nan=1.0)
    p_hat = torch.where(causal, scaled.clamp(max=1.0), 0.0)
    col = p_hat.sum(dim=-2).amax(dim=-1)                                         # C (B, H)
    spread_sq = torch.minimum((p_hat * v_far.pow(2)).sum(-1), v_far.pow(2).amax(-1))  # S_t²
    k_spread_sq = torch.minimum((p_hat * k_far.pow(2)).sum(-1), k_max.pow(2))         # K_t²

    def col_max(weight: torch.Tensor) -> torch.Tensor:
        """max_s Σ_t weight_t·P̂_ts, (B, H)."""
        return (weight[..., None] * p_hat).sum(dim=-2).amax(dim=-1)

    sq2, sk2, sv1 = sq.squeeze(-1) ** 2, sk.squeeze(-1) ** 2, sv.squeeze(-1)
    wq, wk, wv = rec.sigma_whole
    query_coef, key_coef = (spread_sq * k_spread_sq).amax(-1), col_max(spread_sq * big_q.pow(2))
    lip = across_heads([sv1 * col.sqrt(), c * (2.0 * sq2 * query_coef + 2.0 * sk2 * key_coef).sqrt()],
                       [wv * col.amax(-1).sqrt(),
                        c * (2.0 * wq ** 2 * query_coef.amax(-1) + 2.0 * wk ** 2 * key_coef.amax(-1)).sqrt()])
    m = sq * k_max + sk * big_q
    query_coef, key_coef = k_spread_sq.amax(-1), col_max(big_q.pow(2))
    spread_max = spread_sq.amax(-1).sqrt()
    curv = across_heads(
        [2.0 * math.sqrt(2.0) * c * sv1 * (sq2 * query_coef + sk2 * key_coef).sqrt(),
         2.0 * c * (sq * sk).squeeze(-1) * spread_max,
         2.0 * math.sqrt(2.0) * c * c * (sq2 * (m.pow(2) * k_spread_sq * spread_sq).amax(-1)
                                         + sk2 * col_max(m.pow(2) * big_q.pow(2) * spread_sq)).sqrt()],
        [2.0 * math.sqrt(2.0) * c * wv * (wq ** 2 * query_coef.amax(-1) + wk ** 2 * key_coef.amax(-1)).sqrt(),
         2.0 * c * wq * wk * spread_max.amax(-1), None])
    return rec.out_norm * lip, rec.out_norm * curv


def across_heads(per_head: list[torch.Tensor], whole: list[torch.Tensor | None]) -> torch.Tensor:
    """A bound (B,) for all heads at once from the bounds of terms that add up: per head (B, H), each
    head's sum stacked (ℓ2 over heads); or term by term (Minkowski), each term the smaller of its
    stack over heads and its form with the whole matrices' σ (None: none), B, summed; the smaller.
    The whole form holds where each head's bound is c_h·(Σ_i ‖(W_i U)_h‖²-weighted norms): with
    Σ_h ‖(W U)_h‖² = ‖W U‖² ≤ σ_max(W)²‖U‖², the heads share max_h c_h."""
    together = sum(per_head).pow(2).sum(-1).sqrt()
    apart = sum(h.pow(2).sum(-1).sqrt() if w is None else torch.minimum(h.pow(2).sum(-1).sqrt(), w)
                for h, w in zip(per_head, whole))
    return torch.minimum(together, apart)


def attention_jacobian_norm(rec: AttentionRecord) -> torch.Tensor:
    """‖J‖ ≤ bound (B,) for the attention layer's Jacobian at its nominal input, from the exact
    nominal quantities. Per head, Do_t = Σ_s P_ts W_v u_s + Σ_s P_ts ζ_ts (v_s − v̄_t) with
    ζ_ts = c(⟨R_t W_q u_t, k_s⟩ + ⟨q_t, R_s W_k u_s⟩) (R the RoPE rotations, orthogonal), three operators:
    values P ⊗ W_v, norm ‖P‖₂·σ_v (Kronecker); queries u_t ↦ c·M_t R_t W_q u_t, block diagonal with the
    cross-covariance M_t = Σ_s P_ts (v_s − v̄_t)(k_s − k̄_t)ᵀ, norm ≤ c·σ_q·max_t ‖M_t‖₂; keys
    y_s = R_s W_k u_s (‖y‖ ≤ σ_k‖U‖) ↦ c Σ_s P_ts (v_s − v̄_t) q_tᵀ y_s, rank-one blocks of norm
    n_ts = c·P_ts·‖v_s − v̄_t‖·‖q_t‖, so norm ≤ σ_k·‖n‖₂ (Cauchy–Schwarz over t). Each is at most its
    counterpart in ``attention_bounds`` at r = 0 (‖P‖₂ ≤ √C, ‖M_t‖₂ ≤ S_t·K_t, ‖n‖₂ ≤ that bound's
    weighted sum). Heads (``across_heads``): each operator is block diagonal over heads after the whole
    W_v (W_q, W_k; RoPE rotates within heads), so for all heads the values' norm is also at most
    σ_max(W_v)·max_h ‖P_h‖₂, likewise the others. W_o and the output scale multiply."""
    c, probs = rec.score_scale, rec.probs
    mixing = torch.linalg.matrix_norm(probs, 2)
    cross = (torch.einsum("bhts,bhsi,bhsj->bhtij", probs, rec.v, rec.k)
             - (probs @ rec.v)[..., :, None] * (probs @ rec.k)[..., None, :])
    covariance = c * torch.linalg.matrix_norm(cross, 2).amax(-1)
    rank_one = torch.linalg.matrix_norm(c * probs * rec.v_spread * rec.q.norm(dim=-1)[..., None], 2)
    wq, wk, wv = rec.sigma_whole
    return rec.out_norm * across_heads(
        [rec.sigma_v * mixing, rec.sigma_q * covariance + rec.sigma_k * rank_one],
        [wv * mixing.amax(-1), wq * covariance.amax(-1) + wk * rank_one.amax(-1)])


def causal_mask(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """Which keys each of the last ``n_queries`` query positions attends to, (n_queries, n_keys)."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(n_keys - n_queries)


def last_query(rec: AttentionRecord) -> AttentionRecord:
    """The record of the layer's output at the last position only (queries restricted, keys and
    values kept): after the last attention layer only that row reaches the margin, as the layers that
    follow act per token, so its constants (L, β, ‖J‖) may be those of the map onto that row."""
    return rec._replace(q=rec.q[..., -1:, :], probs=rec.probs[..., -1:, :], k_spread=rec.k_spread[..., -1:, :],
                        v_spread=rec.v_spread[..., -1:, :])


def distance_to_attended_mean(probs: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """‖p_s − Σ_u P_tu p_u‖₂ for every query t and key s, (…, T, T)."""
    mean = probs @ points
    sq_dist = (mean.pow(2).sum(-1)[..., :, None] + points.pow(2).sum(-1)[..., None, :]
               - 2.0 * mean @ points.transpose(-2, -1))
    return sq_dist.clamp_min(0.0).sqrt()


def attention_at(attn, x: torch.Tensor) -> tuple[torch.Tensor, AttentionRecord]:
    """``LipschitzAttention`` in float64 with explicit probabilities: (output, its record)."""
    B, T, C = x.shape
    H = attn.n_heads
    w_q, w_k, w_v, w_o = (m.weight.detach().to(x.dtype) for m in (attn.q, attn.k, attn.v, attn.o))
    q, k, v = (attn.split_heads(x @ w.T) for w in (w_q, w_k, w_v))
    q, k = attn.rope(q), attn.rope(k)
    probs = (attn.score_scale * q @ k.transpose(-2, -1)).masked_fill(~causal_mask(T, T, x.device),
                                                                     float("-inf")).softmax(-1)
    y = (probs @ v).transpose(1, 2).reshape(B, T, C) @ w_o.T * attn.output_scale
    qkv = (attn.q, attn.k, attn.v)
    sigma = [head_spectral_norms(m.weight, H).to(x.device) for m in qkv]  # float64: upper bounds
    q, k, v, probs = q.detach(), k.detach(), v.detach(), probs.detach()
    rec = AttentionRecord(q, k, v, probs, distance_to_attended_mean(probs, k), distance_to_attended_mean(probs, v),
                          *sigma, attn.output_scale * spectral_norm(attn.o.weight), attn.score_scale,
                          tuple(spectral_norm(m.weight) for m in qkv))
    return y, rec
