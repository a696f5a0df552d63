"""Local (per-input) certified robustness: a second-order bound on the logit margin in an ℓ2 ball.

For one input x (the embedded sequence, T × d; ε an ℓ2 norm over the whole sequence, as the global
certificate's) and each class j ≠ y, the pairwise margin m_j = z_y − z_j of the last position's
logits obeys, for every ‖δ‖₂ ≤ ε (Taylor with the integral remainder along the segment):

    m_j(x + δ) ≥ m_j(x) − ‖∇m_j(x)‖₂·ε − ½·‖w_j‖₂·β(ε)·ε²,

where w_j = s·(W_head[y] − W_head[j]), ∇m_j is exact (autograd in float32, enlarged by
GRADIENT_SLACK) for the GRADIENT_CLASSES classes with the smallest margins and bounded by ‖w_j‖·L(0)
for the others, and β(ε) bounds the operator norm of the second derivative of the block stack over
the ball (so ‖w_j‖β bounds m_j's curvature; the head is linear). Two first-order bounds hold too: ‖w_j‖·L(ε)·ε with L(ε) the block
stack's Lipschitz constant over the ball, and √2·L_global·ε from the global certificate. Each drop
is sound, so their minimum is; margin(x+δ) ≥ min_{j≠y} (m_j(x) − drop_j(ε)), and as ε → 0 the drop
of the runner-up class over ε tends to ‖∇margin(x)‖₂.

L and β compose layer by layer from local constants at this input (β(f∘g) ≤ β_f·L_g² + L_f·β_g;
a layer's ball has radius L_prefix·ε around its nominal input): the convex residual
(1−α)x + α·F(x) has L = (1−α) + α·L_F and β = α·β_F; attention and MLP as in
``attention_bounds`` and ``gelu_layer_bounds``. ``lipschitz_gpt``'s input projection onto the RMS ball is
1-Lipschitz and fixes its own output, so the projected point P(x + δ) lies within ε of P(x) and the
expansion is taken at P(x). Supported: ``lipschitz_gpt`` and ``mlp`` with GELU (smooth); ReLU has no
curvature bound and LayerNorm (``gpt``) is not covered (``local_certificate`` returns None).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from lipflow.model.base import LanguageModel, spectral_norm
from lipflow.model.bound import GELU_MAX_SLOPE, head_spectral_norms
from lipflow.model.lipschitz_gpt import LipschitzGPT
from lipflow.model.mlp import LipschitzMLP

# max |GELU''| = max φ(x)(2 − x²) = 2φ(0) = 2/√(2π), at x = 0 (the other extremes, x = ±2, give 0.108)
GELU_MAX_CURVATURE = 2.0 / math.sqrt(2.0 * math.pi)
RADIUS_BISECTIONS = 32  # halvings of log ε between RADIUS_RANGE's ends: radii to a relative 10⁻⁸
GRADIENT_SLACK = 1e-4  # relative allowance for the float32 round-off of the margin gradients
# Exact gradients for the classes with the smallest margins; the others use ‖∇m_j‖ ≤ ‖w_j‖·L(0). On the σ_max 2
# Shakespeare model (65 classes) 8 give the same radii as all classes, at an eighth of the backward passes.
GRADIENT_CLASSES = 8
RADIUS_RANGE = (1e-12, 1e4)


class AttentionRecord(NamedTuple):
    """One attention layer at the nominal input: rotated queries and keys and the values (B, H, T, d_h),
    the softmax probabilities (B, H, T, T), each key's and value's distance to the query's attended
    mean (B, H, T, T), per-head σ_max of W_q, W_k, W_v (H,), σ_max(W_o)·output scale, the score scale c."""

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


class SmoothLayer(NamedTuple):
    """A layer's local constants as functions of the input ball's radius r (B,): (L(r), β(r)), both
    nondecreasing in r; ``per_token``: the layer acts on each token (last axis) separately."""

    bounds: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    per_token: bool = False
    jacobian_norm: Callable[[], torch.Tensor] | None = None  # a tighter bound on L(0) = ‖J‖ at the nominal input


def nominal_lip(layer: SmoothLayer, zero: torch.Tensor) -> torch.Tensor:
    """L_k(0) ≥ ‖J_k‖ at the nominal input (B,): the smaller of the ball bound at r = 0 and the layer's
    own bound on the Jacobian there."""
    lip = layer.bounds(zero)[0]
    return lip if layer.jacobian_norm is None else torch.minimum(lip, layer.jacobian_norm())


class Propagation(NamedTuple):
    """Bounds over the ε-ball (each (B,)) carried through the layers: ``lip`` and ``curv`` (L, β of the
    whole stack), ``radius`` (ρ_K ≥ ‖Δh_K‖) and ``remainders`` (K, B): ‖r_k‖ ≤ ½β_k(ρ_{k−1})·ρ_{k−1}²."""

    lip: torch.Tensor
    curv: torch.Tensor
    radius: torch.Tensor
    remainders: torch.Tensor


def propagate(layers: list[SmoothLayer], nominal_lips: torch.Tensor, epsilon: torch.Tensor) -> Propagation:
    """Layer k sees the ball of radius ρ_{k−1} around its nominal input, ρ_0 = ε and
    ρ_k = min(L_k(ρ_{k−1})·ρ_{k−1}, L_k(0)·ρ_{k−1} + ½β_k(ρ_{k−1})·ρ_{k−1}²) (mean value; Taylor at the
    nominal point, ‖J_k‖ ≤ L_k(0) = ``nominal_lips[k]``); L and β compose by the chain rule,
    β(f∘g) ≤ β_f·L_g² + L_f·β_g."""
    lip, curv, radius, remainders = torch.ones_like(epsilon), torch.zeros_like(epsilon), epsilon, []
    for layer, nominal_lip in zip(layers, nominal_lips):
        layer_lip, layer_curv = layer.bounds(radius)
        remainders.append(0.5 * layer_curv * radius * radius)
        lip, curv = layer_lip * lip, layer_curv * lip * lip + layer_lip * curv
        radius = torch.minimum(layer_lip * radius, nominal_lip * radius + remainders[-1])
    return Propagation(lip, curv, radius, torch.stack(remainders))


def convex_residual_layer(alpha: float, branch: SmoothLayer) -> SmoothLayer:
    """x ↦ (1−α)x + α·F(x): L = (1−α) + α·L_F, β = α·β_F."""
    def bounds(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lip, curv = branch.bounds(r)
        return (1.0 - alpha) + alpha * lip, alpha * curv
    jacobian_norm = None if branch.jacobian_norm is None else lambda: (1.0 - alpha) + alpha * branch.jacobian_norm()
    return SmoothLayer(bounds, branch.per_token, jacobian_norm)


def gelu_layer_bounds(scale: float, w_in: torch.Tensor, w_out: torch.Tensor | None) -> tuple[float, float]:
    """(L, β) of x ↦ W_out·scale·GELU(W_in·x) per token (W_out = I when None), on any ball.

    D = W_out·diag(scale·GELU'(h))·W_in with |scale·GELU'| ≤ scale·GELU_MAX_SLOPE; D(x) − D(x') =
    W_out·diag(scale·ΔGELU')·W_in with |ΔGELU'_i| ≤ max|GELU''|·|⟨W_in[i], x − x'⟩| ≤
    max|GELU''|·‖W_in[i]‖₂·‖x − x'‖₂. Over a sequence the Jacobian is block diagonal (per token), so
    the same constants hold for the Frobenius norm over the whole sequence.
    """
    out_norm = spectral_norm(w_out) if w_out is not None else 1.0
    in_norm = spectral_norm(w_in)
    max_row = float(w_in.detach().double().norm(dim=1).max())
    return (scale * GELU_MAX_SLOPE * out_norm * in_norm,
            scale * GELU_MAX_CURVATURE * max_row * out_norm * in_norm)


def per_token_gelu_layer(lip: float, curv: float) -> SmoothLayer:
    return SmoothLayer(lambda r: (torch.full_like(r, lip), torch.full_like(r, curv)), per_token=True)


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
    The heads stack (ℓ2 over heads) and W_o with its output scale multiplies both.
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
    p_hat = torch.where(causal, (rec.probs * torch.exp(2.0 * shift)[..., None]).clamp(max=1.0), 0.0)
    col = p_hat.sum(dim=-2).amax(dim=-1)                                         # C (B, H)
    spread_sq = torch.minimum((p_hat * v_far.pow(2)).sum(-1), v_far.pow(2).amax(-1))  # S_t²
    k_spread_sq = torch.minimum((p_hat * k_far.pow(2)).sum(-1), k_max.pow(2))         # K_t²

    def col_max(weight: torch.Tensor) -> torch.Tensor:
        """max_s Σ_t weight_t·P̂_ts, (B, H)."""
        return (weight[..., None] * p_hat).sum(dim=-2).amax(dim=-1)

    sq2, sk2 = sq.squeeze(-1) ** 2, sk.squeeze(-1) ** 2
    lip_h = (sv.squeeze(-1) * col.sqrt()
             + c * (2.0 * sq2 * (spread_sq * k_spread_sq).amax(-1)
                    + 2.0 * sk2 * col_max(spread_sq * big_q.pow(2))).sqrt())
    m = sq * k_max + sk * big_q
    curv_h = (2.0 * math.sqrt(2.0) * sv.squeeze(-1) * c
              * (sq2 * k_spread_sq.amax(-1) + sk2 * col_max(big_q.pow(2))).sqrt()
              + 2.0 * c * (sq * sk).squeeze(-1) * spread_sq.amax(-1).sqrt()
              + 2.0 * math.sqrt(2.0) * c * c
              * (sq2 * (m.pow(2) * k_spread_sq * spread_sq).amax(-1)
                 + sk2 * col_max(m.pow(2) * big_q.pow(2) * spread_sq)).sqrt())
    return rec.out_norm * lip_h.pow(2).sum(-1).sqrt(), rec.out_norm * curv_h.pow(2).sum(-1).sqrt()


def attention_jacobian_norm(rec: AttentionRecord) -> torch.Tensor:
    """‖J‖ ≤ bound (B,) for the attention layer's Jacobian at its nominal input, from the exact
    nominal quantities. Per head, Do_t = Σ_s P_ts W_v u_s + Σ_s P_ts ζ_ts (v_s − v̄_t) with
    ζ_ts = c(⟨R_t W_q u_t, k_s⟩ + ⟨q_t, R_s W_k u_s⟩) (R the RoPE rotations, orthogonal), three operators:
    values P ⊗ W_v, norm ‖P‖₂·σ_v (Kronecker); queries u_t ↦ c·M_t R_t W_q u_t, block diagonal with the
    cross-covariance M_t = Σ_s P_ts (v_s − v̄_t)(k_s − k̄_t)ᵀ, norm ≤ c·σ_q·max_t ‖M_t‖₂; keys
    y_s = R_s W_k u_s (‖y‖ ≤ σ_k‖U‖) ↦ c Σ_s P_ts (v_s − v̄_t) q_tᵀ y_s, rank-one blocks of norm
    n_ts = c·P_ts·‖v_s − v̄_t‖·‖q_t‖, so norm ≤ σ_k·‖n‖₂ (Cauchy–Schwarz over t). Each is at most its
    counterpart in ``attention_bounds`` at r = 0 (‖P‖₂ ≤ √C, ‖M_t‖₂ ≤ S_t·K_t, ‖n‖₂ ≤ that bound's
    weighted sum). Heads stack (ℓ2), W_o and the output scale multiply."""
    c, probs = rec.score_scale, rec.probs
    value = rec.sigma_v * torch.linalg.matrix_norm(probs, 2)
    cross = (torch.einsum("bhts,bhsi,bhsj->bhtij", probs, rec.v, rec.k)
             - (probs @ rec.v)[..., :, None] * (probs @ rec.k)[..., None, :])
    query = c * rec.sigma_q * torch.linalg.matrix_norm(cross, 2).amax(-1)
    key = rec.sigma_k * torch.linalg.matrix_norm(c * probs * rec.v_spread * rec.q.norm(dim=-1)[..., None], 2)
    return rec.out_norm * (value + query + key).pow(2).sum(-1).sqrt()


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


def _attention_nominal(attn, x: torch.Tensor) -> tuple[torch.Tensor, AttentionRecord]:
    """``LipschitzAttention`` in float64 with explicit probabilities: (output, its record)."""
    B, T, C = x.shape
    H, d_h = attn.n_heads, attn.head_dim

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, T, H, d_h).transpose(1, 2)

    w_q, w_k, w_v, w_o = (m.weight.detach().to(x.dtype) for m in (attn.q, attn.k, attn.v, attn.o))
    q, k, v = attn.rope(heads(x @ w_q.T)), attn.rope(heads(x @ w_k.T)), heads(x @ w_v.T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    probs = (attn.score_scale * q @ k.transpose(-2, -1)).masked_fill(~causal, float("-inf")).softmax(-1)
    y = (probs @ v).transpose(1, 2).reshape(B, T, C) @ w_o.T * attn.output_scale
    sigma = [head_spectral_norms(m.weight, H).double().to(x.device) for m in (attn.q, attn.k, attn.v)]
    q, k, v, probs = q.detach(), k.detach(), v.detach(), probs.detach()
    rec = AttentionRecord(q, k, v, probs, distance_to_attended_mean(probs, k), distance_to_attended_mean(probs, v),
                          *sigma, attn.output_scale * spectral_norm(attn.o.weight), attn.score_scale)
    return y, rec


Body = Callable[[torch.Tensor], tuple[torch.Tensor, list[SmoothLayer], list[torch.Tensor]]]


class LocalModel(NamedTuple):
    """A model as a float64 map: body (B, …) → (features (B, d) of the scored position, the layers'
    local constants, each layer's output h_k), head weights, and the input map applied before the body
    (a 1-Lipschitz projection that fixes its output, or the identity)."""

    prepare: Callable[[torch.Tensor], torch.Tensor]
    body: Body
    head: torch.Tensor  # (V, d), scale included


def lipschitz_gpt_local(model) -> LocalModel | None:
    if any(block.mlp.act.base is not F.gelu for block in model.blocks):
        return None

    def body(x: torch.Tensor) -> tuple[torch.Tensor, list[SmoothLayer], list[torch.Tensor]]:
        layers, outputs = [], []
        for block in model.blocks:
            mlp = block.mlp
            y, rec = _attention_nominal(block.attn, x)
            rec = last_query(rec) if block is model.blocks[-1] else rec
            x = (1.0 - block.alpha) * x + block.alpha * y
            outputs.append(x)
            h = x @ mlp.up.weight.detach().to(x.dtype).T
            x = (1.0 - block.alpha) * x + block.alpha * mlp.output_scale * (
                mlp.act.base(h) @ mlp.down.weight.detach().to(x.dtype).T)
            outputs.append(x)
            layers.append(convex_residual_layer(block.alpha, SmoothLayer(
                lambda r, rec=rec: attention_bounds(rec, r), jacobian_norm=lambda rec=rec: attention_jacobian_norm(rec))))
            layers.append(convex_residual_layer(block.alpha, per_token_gelu_layer(
                *gelu_layer_bounds(mlp.output_scale, mlp.up.weight, mlp.down.weight))))
        return x[:, -1, :], layers, outputs

    scale = model.logit_scale * model.output_mult
    return LocalModel(lambda x: model.project_to_domain(x.double()), body,
                      scale * model.head.weight.detach().double())


def mlp_local(model) -> LocalModel | None:
    if model.act.base is not F.gelu:
        return None

    def body(x: torch.Tensor) -> tuple[torch.Tensor, list[SmoothLayer], list[torch.Tensor]]:
        layers, outputs = [], []
        for layer in model.layers[:-1]:
            x = model.act.fn(x @ layer.weight.detach().to(x.dtype).T)
            layers.append(per_token_gelu_layer(*gelu_layer_bounds(model.act.scale, layer.weight, None)))
            outputs.append(x)
        return x, layers, outputs

    return LocalModel(lambda x: x.double(), body, model.output_mult * model.layers[-1].weight.detach().double())


LOCAL_MODELS = {LipschitzGPT: lipschitz_gpt_local, LipschitzMLP: mlp_local}


def local_model(model: LanguageModel) -> LocalModel | None:
    """The float64 local form of ``model``, or None where it is not covered (LayerNorm, ReLU)."""
    build = LOCAL_MODELS.get(type(model))
    return None if build is None else build(model)


class LocalCertificate:
    """Per-input margin lower bounds over ℓ2 balls, for inputs x (B, …) and labels y (B,)."""

    def __init__(self, local: LocalModel, x: torch.Tensor, labels: torch.Tensor, global_l2: float | None):
        self.global_l2 = global_l2
        x0 = local.prepare(x).detach()
        with torch.no_grad():
            features, self.layers, _ = local.body(x0)
        logits = features @ local.head.T
        self.logits = logits
        diff = local.head[labels][:, None, :] - local.head[None, :, :]          # w_j (B, V, d)
        self.head_norms = diff.norm(dim=-1)
        true = logits.gather(1, labels[:, None])
        self.pair_margins = (true - logits).scatter(1, labels[:, None], float("inf"))
        self.margin = self.pair_margins.min(dim=1).values
        nearest = self.pair_margins.argsort(dim=1)[:, :min(GRADIENT_CLASSES, logits.shape[1] - 1)]
        zero = torch.zeros_like(self.margin)
        self.nominal_lips = torch.stack([nominal_lip(layer, zero) for layer in self.layers])  # ≥ ‖J_k‖ at x0 (K, B)
        suffix_lips = torch.cat([self.nominal_lips.flip(0).cumprod(0).flip(0)[1:], torch.ones_like(zero)[None]])
        jacobian_bound = self.nominal_lips[0] * suffix_lips[0]                    # ≥ ‖∂features/∂x‖ at x0
        input_norms, stage_norms = self._pair_gradient_norms(local, x0, labels, nearest)
        self.gradient_norms = (self.head_norms * jacobian_bound[:, None]).scatter(1, nearest, input_norms)
        stage_bounds = self.head_norms[:, :, None] * suffix_lips.T[:, None, :]   # ‖w_j‖·L_{>k}(0) (B, V, K)
        self.stage_gradient_norms = torch.minimum(stage_bounds, stage_bounds.scatter(
            1, nearest[:, :, None].expand(-1, -1, len(self.layers)), stage_norms))

    def _pair_gradient_norms(self, local: LocalModel, x0: torch.Tensor, labels: torch.Tensor,
                             classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For the classes j in ``classes`` (B, J): ‖∇(z_y − z_j)‖₂ at x0 (B, J) and the norms of
        g_{j,k} = ∂(z_y − z_j)/∂h_k at x0 (B, J, K), for per-token layers the largest token's norm.
        Autograd in float32, one batched backward pass per column, times 1 + GRADIENT_SLACK for its
        round-off."""
        x0 = x0.float().requires_grad_(True)
        features, _, outputs = local.body(x0)
        logits = features @ local.head.float().T
        n_classes = logits.shape[1]
        pairs = F.one_hot(labels, n_classes)[None] - F.one_hot(classes.T, n_classes)   # (J, B, V)
        grads = torch.autograd.grad(logits, [x0, *outputs], pairs.to(logits.dtype), is_grads_batched=True)
        stages = [g.reshape(*g.shape[:2], -1, g.shape[-1]).norm(dim=-1).amax(dim=-1) if layer.per_token
                  else g.flatten(2).norm(dim=2) for g, layer in zip(grads[1:], self.layers)]
        slack = 1.0 + GRADIENT_SLACK
        return (grads[0].flatten(2).norm(dim=2).T.double() * slack,
                torch.stack(stages, dim=-1).transpose(0, 1).double() * slack)

    def pair_drops(self, epsilon: torch.Tensor) -> torch.Tensor:
        """Upper bounds (B, V) on m_j(x) − m_j(x + δ) over ‖δ‖₂ ≤ ε (B,): the minimum of the
        telescoped bound ‖∇m_j‖·ε + Σ_k ‖g_{j,k}‖·½β_kρ_{k−1}², the composed second-order bound
        ‖∇m_j‖·ε + ½‖w_j‖·β·ε², the first-order ‖w_j‖·ρ_K and the global √2·L_global·ε."""
        eps = epsilon.double().to(self.margin.device)
        bounds = propagate(self.layers, self.nominal_lips, eps)
        e = eps[:, None]
        telescoped = self.gradient_norms * e + (self.stage_gradient_norms * bounds.remainders.T[:, None, :]).sum(-1)
        composed = self.gradient_norms * e + 0.5 * self.head_norms * bounds.curv[:, None] * e * e
        drop = torch.minimum(torch.minimum(telescoped, composed), self.head_norms * bounds.radius[:, None])
        if self.global_l2 is not None:
            drop = torch.minimum(drop, math.sqrt(2.0) * self.global_l2 * e)
        return drop

    def margin_lower_bound(self, epsilon: torch.Tensor) -> torch.Tensor:
        """min_{j≠y} (m_j(x) − drop_j(ε)) ≤ margin(x + δ) for every ‖δ‖₂ ≤ ε, (B,)."""
        return (self.pair_margins - self.pair_drops(epsilon)).min(dim=1).values

    def margin_drop(self, epsilon: torch.Tensor) -> torch.Tensor:
        """Certified bound on margin(x) − margin(x + δ), (B,)."""
        return self.margin - self.margin_lower_bound(epsilon)

    def radius(self) -> torch.Tensor:
        """Per input (float64) the largest ε found (bisection in log ε) at which the margin provably
        stays positive; 0 where the prediction is wrong or not certified at RADIUS_RANGE[0]."""
        low = torch.full_like(self.margin, math.log(RADIUS_RANGE[0]))
        high = torch.full_like(self.margin, math.log(RADIUS_RANGE[1]))
        certified_low = self.margin_lower_bound(low.exp()) > 0
        for _ in range(RADIUS_BISECTIONS):
            mid = 0.5 * (low + high)
            ok = self.margin_lower_bound(mid.exp()) > 0
            low, high = torch.where(ok, mid, low), torch.where(ok, high, mid)
        return torch.where(certified_low, low.exp(), torch.zeros_like(low))


def local_certificate(model: LanguageModel, x: torch.Tensor, labels: torch.Tensor,
                      global_l2: float | None) -> LocalCertificate | None:
    """The local certificate of ``model`` (``forward_embedded``'s last position, or the classifier's
    output) at embedded inputs ``x``; None for models it does not cover."""
    local = local_model(model)
    return None if local is None else LocalCertificate(local, x, labels, global_l2)
