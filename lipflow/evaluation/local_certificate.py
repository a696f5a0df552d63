"""Local (per-input) certified robustness: a second-order bound on the logit margin in an ℓ2 ball.

For one input x (the embedded sequence, T × d; ε an ℓ2 norm over the whole sequence, as the global
certificate's) and each class j ≠ y, the pairwise margin m_j = z_y − z_j = w_jᵀ·features of the last
position's logits (w_j = s·(W_head[y] − W_head[j]); the head is linear) falls over ‖δ‖₂ ≤ ε by at most
drop_j(ε), the minimum of three sound bounds (so margin(x+δ) ≥ min_{j≠y} (m_j(x) − drop_j(ε))):

1. Telescoped (issue 20). The body is layers h_k = f_k(h_{k−1}), h_0 = x. With Δ_k = h_k(x+δ) − h_k(x)
   and J_k = Df_k at the nominal point, Taylor with the integral remainder gives Δ_k = J_kΔ_{k−1} + r_k,
   ‖r_k‖ ≤ ½β_k(ρ_{k−1})·ρ_{k−1}², where ρ_{k−1} ≥ ‖Δ_{k−1}‖ and β_k(ρ) bounds ‖D²f_k‖ on the ball of
   radius ρ around h_{k−1}(x). Unrolled, m_j(x+δ) − m_j(x) = ∇m_j·δ + Σ_k g_{j,k}ᵀr_k with
   g_{j,k} = ∂m_j/∂h_k at x, so  drop_j ≤ ‖∇m_j‖·ε + Σ_k ‖g_{j,k}‖·½β_k(ρ_{k−1})·ρ_{k−1}².
   ∇m_j and g_{j,k} are exact (one batched float64 backward pass that also asks for the gradients at
   the layer outputs, enlarged by GRADIENT_SLACK) for the GRADIENT_CLASSES classes with the smallest
   margins, and bounded by ‖w_j‖·Π_{i>k} L_i(0) for the others. For a per-token layer (the MLP)
   r_k's tokens are separate, ‖r_{k,t}‖ ≤ ½β_k‖Δ_{k−1,t}‖², so ‖g_{j,k}‖ becomes max_t ‖g_{j,k,t}‖.
   The last layer's output gradient is w_j itself (float64, every class), and a GELU layer bounds
   |w_jᵀr_K| ≤ ½κ(w_j)·ρ_{K−1}² directly (``gelu_layer``: κ weighs each hidden unit by |(W_outᵀw_j)_i|).
   Radii: ρ_0 = ε, ρ_k = min(L_k(ρ_{k−1})·ρ_{k−1}, L_k(0)·ρ_{k−1} + ½β_k(ρ_{k−1})·ρ_{k−1}²) (mean
   value; Taylor), with L_k(0) ≥ ‖J_k‖ at the nominal input (``attention_jacobian_norm`` for attention,
   from the exact nominal probabilities and key/value cross-covariances).
   It is never above the first local certificate, ‖∇m_j‖·ε + ½‖w_j‖·β(ε)·ε² with β of the whole
   stack by the chain rule (β(f∘g) ≤ β_f·L_g² + L_f·β_g, so β = Σ_k β_k·L_{<k}²·L_{>k}), term by
   term: ‖g_{j,k}‖ ≤ ‖w_j‖·L_{>k}(0) and ρ_{k−1} ≤ L_{<k}·ε. So that bound is not computed.
2. First order: ‖w_j‖·ρ_K (≤ ‖w_j‖·L(ε)·ε, the stack's Lipschitz constant over the ball).
3. Global: √2·L_global·ε from the global certificate.
As ε → 0 the runner-up's drop over ε tends to ‖∇margin(x)‖₂.

The margin reads the last position only, and every layer after the last attention layer acts per
token, so that attention layer's constants (L, β, ‖J‖) are those of its map onto the last position
(``last_query``), and the ρ_k after it bound the last token's movement. Layer constants come from the
input's actual activations: the residual keep·x + weight·F(x) has L = keep + weight·L_F and
β = weight·β_F; attention as in ``local_attention``, the MLP from max|GELU''| (``gelu_layer``).
``lipschitz_gpt``'s input projection onto the RMS ball is 1-Lipschitz and fixes its own output, so
P(x + δ) lies within ε of P(x) and the expansion is taken at P(x). Supported: ``lipschitz_gpt`` (and
``lipschitz_gpt_unscaled``) and ``mlp`` with GELU (smooth); ReLU has no curvature bound and LayerNorm
(``gpt``) is not covered (``local_certificate`` returns None).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from lipflow.evaluation.local_attention import attention_at, attention_bounds, attention_jacobian_norm, last_query
from lipflow.model.base import LanguageModel, spectral_norm
from lipflow.model.bound import GELU_MAX_SLOPE
from lipflow.model.lipschitz_gpt import LipschitzGPT
from lipflow.model.mlp import LipschitzMLP

# max |GELU''| = max φ(x)(2 − x²) = 2φ(0) = 2/√(2π), at x = 0 (the other extremes, x = ±2, give 0.108)
GELU_MAX_CURVATURE = 2.0 / math.sqrt(2.0 * math.pi)
RADIUS_BISECTIONS = 32  # halvings of log ε between RADIUS_RANGE's ends: radii to a relative 10⁻⁸
GRADIENT_SLACK = 1e-4  # relative allowance for the round-off of the float64 margin gradients (far above it)
# Exact gradients for the classes with the smallest margins; the others use ‖∇m_j‖ ≤ ‖w_j‖·L(0). On the σ_max 2
# Shakespeare model (65 classes) 8 give the same radii as all classes, at an eighth of the backward passes.
GRADIENT_CLASSES = 8
RADIUS_RANGE = (1e-12, 1e4)


class SmoothLayer(NamedTuple):
    """A layer's local constants as functions of the input ball's radius r (B,): (L(r), β(r)), both
    nondecreasing in r; ``per_token``: the layer acts on each token (each row of T × d) separately."""

    bounds: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    per_token: bool = False
    jacobian_norm: Callable[[], torch.Tensor] | None = None  # a tighter bound on L(0) = ‖J‖ at the nominal input
    # κ(w) (…) for readouts w (…, d) of one token's output: |wᵀ·D²f[Δ, Δ]| ≤ κ(w)·‖Δ‖² on any ball
    readout_curvature: Callable[[torch.Tensor], torch.Tensor] | None = None


def nominal_lip(layer: SmoothLayer, zero: torch.Tensor) -> torch.Tensor:
    """L_k(0) ≥ ‖J_k‖ at the nominal input (B,): the smaller of the ball bound at r = 0 and the layer's
    own bound on the Jacobian there."""
    lip = layer.bounds(zero)[0]
    return lip if layer.jacobian_norm is None else torch.minimum(lip, layer.jacobian_norm())


class Propagation(NamedTuple):
    """Bounds over the ε-ball carried through the layers: ``radius`` (B,) (ρ_K ≥ ‖Δh_K‖), the layers'
    input radii ρ_{k−1} and ``remainders`` (both (K, B)): ‖r_k‖ ≤ ½β_k(ρ_{k−1})·ρ_{k−1}²."""

    radius: torch.Tensor
    input_radii: torch.Tensor
    remainders: torch.Tensor


def propagate(layers: list[SmoothLayer], nominal_lips: torch.Tensor, epsilon: torch.Tensor) -> Propagation:
    """Layer k sees the ball of radius ρ_{k−1} around its nominal input, ρ_0 = ε and
    ρ_k = min(L_k(ρ_{k−1})·ρ_{k−1}, L_k(0)·ρ_{k−1} + ½β_k(ρ_{k−1})·ρ_{k−1}²) (mean value; Taylor at the
    nominal point, ‖J_k‖ ≤ L_k(0) = ``nominal_lips[k]``)."""
    radius, radii, remainders = epsilon, [], []
    for layer, nominal_lip in zip(layers, nominal_lips):
        radii.append(radius)
        layer_lip, layer_curv = layer.bounds(radius)
        remainders.append(0.5 * layer_curv * radius * radius)
        radius = torch.minimum(layer_lip * radius, nominal_lip * radius + remainders[-1])
    return Propagation(radius, torch.stack(radii), torch.stack(remainders))


def residual_layer(keep: float, weight: float, branch: SmoothLayer) -> SmoothLayer:
    """x ↦ keep·x + weight·F(x): L = keep + weight·L_F, β = weight·β_F, κ(w) = weight·κ_F(w)."""
    def bounds(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lip, curv = branch.bounds(r)
        return keep + weight * lip, weight * curv
    jacobian_norm = None if branch.jacobian_norm is None else lambda: keep + weight * branch.jacobian_norm()
    readout = None if branch.readout_curvature is None else lambda w: weight * branch.readout_curvature(w)
    return SmoothLayer(bounds, branch.per_token, jacobian_norm, readout)


def gelu_layer(scale: float, w_in: torch.Tensor, w_out: torch.Tensor | None) -> SmoothLayer:
    """x ↦ W_out·scale·GELU(W_in·x) per token (W_out = I when None): (L, β) on any ball and, for a
    readout w, the curvature κ(w).

    D = W_out·diag(scale·GELU'(h))·W_in with |scale·GELU'| ≤ scale·GELU_MAX_SLOPE; D(x) − D(x') =
    W_out·diag(scale·ΔGELU')·W_in with |ΔGELU'_i| ≤ max|GELU''|·|⟨W_in[i], x − x'⟩| ≤
    max|GELU''|·‖W_in[i]‖₂·‖x − x'‖₂. Over a sequence the Jacobian is block diagonal (per token), so
    the same constants hold for the Frobenius norm over the whole sequence. For a readout w,
    wᵀD²f[Δ, Δ] = scale·Σ_i (W_outᵀw)_i·GELU''(h_i)·(W_inΔ)_i², so
    κ(w) = scale·max|GELU''|·σ_max(W_in)²·max_i |(W_outᵀw)_i|.
    """
    out_norm = spectral_norm(w_out) if w_out is not None else 1.0
    in_norm = spectral_norm(w_in)
    max_row = float(w_in.detach().double().norm(dim=1).max())
    lip = scale * GELU_MAX_SLOPE * out_norm * in_norm
    curv = scale * GELU_MAX_CURVATURE * max_row * out_norm * in_norm
    gain = scale * GELU_MAX_CURVATURE * in_norm ** 2

    def readout_curvature(w: torch.Tensor) -> torch.Tensor:
        return gain * (w if w_out is None else w @ w_out.detach().to(w.dtype)).abs().amax(dim=-1)

    return SmoothLayer(lambda r: (torch.full_like(r, lip), torch.full_like(r, curv)), True, None, readout_curvature)


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
            y, rec = attention_at(block.attn, x)
            rec = last_query(rec) if block is model.blocks[-1] else rec
            x = block.keep * x + block.weight * y
            outputs.append(x)
            h = x @ mlp.up.weight.detach().to(x.dtype).T
            x = block.keep * x + block.weight * mlp.output_scale * (
                mlp.act.base(h) @ mlp.down.weight.detach().to(x.dtype).T)
            outputs.append(x)
            layers.append(residual_layer(block.keep, block.weight, SmoothLayer(
                lambda r, rec=rec: attention_bounds(rec, r),
                jacobian_norm=lambda rec=rec: attention_jacobian_norm(rec))))
            layers.append(residual_layer(block.keep, block.weight, gelu_layer(mlp.output_scale, mlp.up.weight,
                                                                               mlp.down.weight)))
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
            layers.append(gelu_layer(model.act.scale, layer.weight, None))
            outputs.append(x)
        if not layers:  # one Linear: the margin is linear in x, an identity stage (L 1, β 0) keeps the form
            layers.append(SmoothLayer(lambda r: (torch.ones_like(r), torch.zeros_like(r)), True))
            outputs.append(x)
        return x, layers, outputs

    return LocalModel(lambda x: x.double(), body, model.output_mult * model.layers[-1].weight.detach().double())


LOCAL_MODELS = {LipschitzGPT: lipschitz_gpt_local, LipschitzMLP: mlp_local}


def local_model(model: LanguageModel) -> LocalModel | None:
    """The float64 local form of ``model``, or None where it is not covered (LayerNorm, ReLU)."""
    build = next((local for cls, local in LOCAL_MODELS.items() if isinstance(model, cls)), None)
    return None if build is None else build(model)


class LocalCertificate:
    """Per-input margin lower bounds over ℓ2 balls, for inputs x (B, …) and labels y (B,)."""

    def __init__(self, local: LocalModel, x: torch.Tensor, labels: torch.Tensor, global_l2: float | None):
        self.global_l2 = global_l2
        x0 = local.prepare(x).detach().requires_grad_(True)
        features, self.layers, outputs = local.body(x0)  # one float64 forward; its graph gives the gradients
        logits_with_graph = features @ local.head.T
        self.logits = logits = logits_with_graph.detach()
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
        input_norms, stage_norms = self._pair_gradient_norms(logits_with_graph, [x0, *outputs], labels, nearest)
        self.gradient_norms = (self.head_norms * jacobian_bound[:, None]).scatter(1, nearest, input_norms)
        stage_bounds = self.head_norms[:, :, None] * suffix_lips.T[:, None, :]   # ‖w_j‖·L_{>k}(0) (B, V, K)
        self.stage_gradient_norms = torch.minimum(stage_bounds, stage_bounds.scatter(
            1, nearest[:, :, None].expand(-1, -1, len(self.layers)), stage_norms))
        last = self.layers[-1]  # its output gradient is w_j itself, at the scored token
        self.readout_curvature = None if last.readout_curvature is None else last.readout_curvature(diff)

    def _pair_gradient_norms(self, logits: torch.Tensor, points: list[torch.Tensor], labels: torch.Tensor,
                             classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For the classes j in ``classes`` (B, J): ‖∇(z_y − z_j)‖₂ at x0 (B, J) and the norms of
        g_{j,k} = ∂(z_y − z_j)/∂h_k at x0 (B, J, K), for per-token layers the largest token's norm;
        ``logits`` carry the graph of the body's forward from ``points`` = [x0, h_1, …, h_K].
        Autograd in float64 (the body's own precision), one pass batched over the J columns, times
        1 + GRADIENT_SLACK for its round-off."""
        n_classes = logits.shape[1]
        pairs = F.one_hot(labels, n_classes)[None] - F.one_hot(classes.T, n_classes)   # (J, B, V)
        grads = torch.autograd.grad(logits, points, pairs.to(logits.dtype), is_grads_batched=True)
        stages = [g.reshape(*g.shape[:2], -1, g.shape[-1]).norm(dim=-1).amax(dim=-1) if layer.per_token
                  else g.flatten(2).norm(dim=2) for g, layer in zip(grads[1:], self.layers)]
        slack = 1.0 + GRADIENT_SLACK
        return (grads[0].flatten(2).norm(dim=2).T.double() * slack,
                torch.stack(stages, dim=-1).transpose(0, 1).double() * slack)

    def pair_drops(self, epsilon: torch.Tensor) -> torch.Tensor:
        """Upper bounds (B, V) on m_j(x) − m_j(x + δ) over ‖δ‖₂ ≤ ε (B,): the minimum of the
        telescoped bound ‖∇m_j‖·ε + Σ_k ‖g_{j,k}‖·½β_kρ_{k−1}², the first-order ‖w_j‖·ρ_K and the
        global √2·L_global·ε."""
        eps = epsilon.double().to(self.margin.device)
        bounds = propagate(self.layers, self.nominal_lips, eps)
        e = eps[:, None]
        stages = self.stage_gradient_norms * bounds.remainders.T[:, None, :]          # (B, V, K)
        if self.readout_curvature is not None:
            last_input = bounds.input_radii[-1][:, None]
            stages[..., -1] = torch.minimum(stages[..., -1], 0.5 * self.readout_curvature * last_input * last_input)
        telescoped = self.gradient_norms * e + stages.sum(-1)
        drop = torch.minimum(telescoped, self.head_norms * bounds.radius[:, None])
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
