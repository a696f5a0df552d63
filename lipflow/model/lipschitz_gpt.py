"""``lipschitz_gpt``: the Lipschitz transformer of Newhouse et al. 2025 (arXiv 2507.13338, §3, App. B).

No LayerNorm and no QK-norm. Token embedding rows have RMS ≤ 1 (``project_embeddings``); position
enters only through RoPE on queries and keys, a per-position rotation (orthogonal, so it preserves
every norm in the certificate), so the embedded input sequence is just the token rows. Each of the
N blocks applies two convex residuals x ← (1−α)x + α·F(x), α = 1/(2N), with F = attention
⅓·W_o·softmax(attn_scale·QKᵀ/d_head + causal mask)·V (separate q, k, v, o matrices) and then
F = MLP W_down·φ(W_up·x), φ = GELU/1.128904 (its largest slope) or ReLU. (``lipschitz_gpt_unscaled`` sets those
constants to 1 through ``block_constants``.) The head is a Linear under the same RMS→RMS
weight constraint as the hidden matrices, followed by logits × logit_scale × output_mult (the
µP readout multiplier, set by the parametrization).

Certificate domain. The attention bound needs a bound a on each token's RMS, so the blocks are
certified on D = {X : RMS(x_t) ≤ 1 ∀t}, which holds every embedded sequence. ``forward_embedded``
first maps each token onto that ball (x_t ↦ x_t·min(1, 1/RMS(x_t)), the Euclidean projection onto
D: 1-Lipschitz in ℓ2 and in ∞RMS, the identity on every embedded sequence), so its certificates
hold for all inputs in R^{T×d}: attacks may leave D. ``forward(idx)`` skips the projection (its
inputs are in D already), so training gradients of embedding rows on the boundary are not clipped.

Init (Modula): hidden matrices and the head orthogonal·√(fan_out/fan_in) (RMS→RMS norm 1),
output projections (W_o, W_down) zero, embedding rows at RMS exactly 1.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipflow.model.base import (AttentionSite, LanguageModel, block_attention_sites, causal_scores, rms_operator_norm,
                                spectral_norm)
from lipflow.model.bound import (ATTENTION_OUTPUT_DIVISOR, ACTIVATIONS, Arithmetic, Rounding, attention_gain,
                                 attention_lipschitz, head_spectral_norms, linear_output_bounds, project_rms_ball,
                                 row_norms, unless_overflow)
from lipflow.model.certificate import (Bound, Certificate, Certify, record, residual as residual_certificate,
                                       sequential)
from lipflow.model.registry import MODELS
from lipflow.parametrization import Module, atom, bond, par, residual, seq, tare

ROPE_BASE = 10000.0


def orthogonal_init_(w: torch.Tensor) -> None:
    """W ← orthogonal·√(fan_out/fan_in), so every singular value of W/s is 1 (Modula's Linear init)."""
    fan_out, fan_in = w.shape
    nn.init.orthogonal_(w)
    w.mul_(math.sqrt(fan_out / fan_in))


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + swap(x)·sin, swap exchanging the two entries of each pair (x_2i, x_2i+1); with sin
    signed (−sin_i, +sin_i) per pair that is (x_2i·cos_i − x_2i+1·sin_i, x_2i+1·cos_i + x_2i·sin_i)."""
    return x * cos + torch.stack((x[..., 1::2], x[..., 0::2]), dim=-1).reshape(x.shape) * sin


class _PairRotation(torch.autograd.Function):
    """The rotation R(θ) of every pair, linear in x: its backward is R(θ)ᵀ = R(−θ), the same map with
    −sin (one pass of ``_rotate_pairs`` instead of autograd through slices, products and a stack), and
    differentiable to any order (sharpness takes Hessian-vector products through it), in forward mode
    (its jvp is R(θ) itself) and under vmap. Eager only: under torch.compile ``RotaryEmbedding`` calls
    ``_rotate_pairs`` directly (a custom jvp would break the graph; the compiler fuses the pass anyway)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return _rotate_pairs(x, cos, sin)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])  # the tables (no gradient), version-checked
        ctx.save_for_forward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _PairRotation.apply(grad, cos, -sin), None, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: torch.Tensor, *_: Any) -> torch.Tensor:
        cos, sin = ctx.saved_tensors
        return _PairRotation.apply(x_tangent, cos, sin)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021): rotate pair (x_2i, x_2i+1) of each head by t·θ_i, θ_i = 10000^(−2i/d_head).

    The tables hold cos_i twice and (−sin_i, sin_i) per pair, so the rotation is ``_rotate_pairs``:
    the pairwise formula's products and sums with the same roundings, forward and backward.
    """

    def __init__(self, head_dim: int, context: int):
        super().__init__()
        inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(context, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos().repeat_interleave(2, dim=-1), persistent=False)
        self.register_buffer("sin", torch.stack((-angles.sin(), angles.sin()), dim=-1).flatten(-2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, T, d_head)
        t = x.shape[-2]
        rotate = _rotate_pairs if torch.compiler.is_compiling() else _PairRotation.apply
        return rotate(x, self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype))

    def computed_norm(self, bound: Bound, arithmetic: Arithmetic, n: int) -> Bound:
        """Bound on ‖fl(Rx)‖₂ in fp32 for x of ``n`` entries with ‖x‖₂ ≤ ``bound``. Each entry of a pair
        p = (x_a, x_b) is fl(x_a·c ∓ x_b·s) = x_a·c ∓ x_b·s + e, |e| ≤ γ₂(|x_a c| + |x_b s|) + 2η(1 + γ₂), so by
        Cauchy–Schwarz ‖fl(Rp)‖₂ ≤ (1 + √2·γ₂)·ρ·‖p‖₂ + that η term, with ρ = max √(c² + s²) over the fp32
        tables (1 only for exact cos and sin)."""
        rho = float((self.cos.double().pow(2) + self.sin.double().pow(2)).sqrt().max())
        gamma = arithmetic.gamma(2, arithmetic.unit)
        return arithmetic.in_range((1.0 + math.sqrt(2.0) * gamma) * rho * bound
                                   + math.sqrt(n) * 2.0 * arithmetic.absolute * (1.0 + gamma))


class LipschitzAttention(nn.Module):
    """y = W_o·concat_h softmax(c·RoPE(q_h)·RoPE(k_h)ᵀ + causal mask)·v_h / D with c = attn_scale/d_head,
    D = ``output_divisor`` (Modula's 3).

    ``unscaled`` leaves out the constant 1/D (``output_scale``), which the block folds into its residual.
    """

    def __init__(self, d_model: int, n_heads: int, context: int, attn_scale: float,
                 output_divisor: float = ATTENTION_OUTPUT_DIVISOR):
        super().__init__()
        self.output_divisor = output_divisor
        self.output_scale = 1.0 / output_divisor
        self.context = context
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.score_scale = attn_scale / self.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))
        self.rope = RotaryEmbedding(self.head_dim, context)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """A projection's output (B, T, d_model) as one slice per head, (B, H, T, d_head) (a view)."""
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (self.split_heads(m(x)) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True, scale=self.score_scale)
        return self.o(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unscaled(x) * self.output_scale

    @property
    def first_projection(self) -> nn.Linear:
        return self.q

    def attention_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax scores c·RoPE(q_h)·RoPE(k_h)ᵀ, (B, H, T, T), masked entries 0."""
        q, k = (self.rope(self.split_heads(m(x))) for m in (self.q, self.k))
        return causal_scores(q, k, self.score_scale)

    def modular_structure(self, prefix: str) -> Module:
        """Modula's Attention: W_o ∘ 1/D ∘ (V, softmax ∘ Mul(attn_scale) ∘ mask ∘ QKᵀ/d_head ∘ RoPE
        ∘ (Q, K)). Sensitivity (1 + 2·attn_scale)/D: 1 at attn_scale 1 and D = 3."""
        scores = seq(par(atom(prefix + "q.weight"), atom(prefix + "k.weight")), bond(self.score_scale * self.head_dim))
        return seq(par(atom(prefix + "v.weight"), scores), bond(self.output_scale), atom(prefix + "o.weight"))

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_q, W_k, W_v, W_o), each (fan_out, fan_in)."""
        return self.q.weight, self.k.weight, self.v.weight, self.o.weight

    def weight_norms(self) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(‖W_o‖_RMS→RMS, then σ_max of each head's slice of W_q, W_k, W_v), from the current weights."""
        return (rms_operator_norm(self.o.weight),
                *(head_spectral_norms(m.weight, self.n_heads) for m in (self.q, self.k, self.v)))

    @torch.no_grad()
    def certify(self, a: Bound, coordinates: torch.Tensor | None = None,
                rounding: Rounding | None = None) -> Certificate:
        """For inputs with every RMS(x_s) ≤ a: gain ``attention_gain``, constant ``attention_lipschitz``
        (bound.py), and bounds on max |entry| of each matmul operand and result, and of the scores
        (with ``rounding``, those of ``cast_entries``).

        With A = √d·a, so ‖x_s‖₂ ≤ A for every token:
        - ``q/k/v.input``: |x_s,j| ≤ ‖x_s‖₂ ≤ A.
        - ``q/k/v.output``: |(W x_s)_i| ≤ ‖W_i,:‖₂·A (Cauchy–Schwarz); the max over rows i.
        - ``scores`` z_ts = c·⟨R_t q_t^h, R_s k_s^h⟩ (c = attn_scale/d_head; the RoPE rotations R are
          orthogonal): |z_ts| ≤ c·‖q_t^h‖₂·‖k_s^h‖₂ ≤ c·σ(W_q^h)·σ(W_k^h)·A², the max over heads h.
        - ``o.input``: head h's output y_t^h = Σ_s P_ts·v_s^h is a convex combination (P_ts ≥ 0,
          Σ_s P_ts = 1), so |y_t,j| ≤ max_s |v_s,j| ≤ ‖W_v[j,:]‖₂·A, the ``v.output`` bound.
        - ``o.output`` u_t = W_o·y_t = Σ_h W_o^(h)·W_v^h·z_t^h, where W_o^(h) is W_o's column block of head h
          and z_t^h = Σ_s P^h_ts·x_s is a convex combination of the inputs, so ‖z_t^h‖₂ ≤ A (one such
          point per head): |u_t,i| ≤ A·Σ_h ‖(W_o^(h)·W_v^h)_i,:‖₂. This is u before the constant ⅓
          (``unscaled``, the Linear's actual output).
        """
        A = math.sqrt(self.q.in_features) * a
        o_norm, q_norms, k_norms, v_norms = self.weight_norms()
        lipschitz = attention_lipschitz(o_norm, q_norms, k_norms, v_norms, self.score_scale, self.q.in_features, a,
                                        self.output_divisor)
        if rounding is not None:
            out_norm, entries = self.cast_entries(A, rounding, q_norms, k_norms, v_norms)
            bound = out_norm / math.sqrt(self.q.in_features)
            return Certificate(bound, lipschitz, bound / a, entries)
        w_o = self.o.weight.detach().double()
        w_v = self.v.weight.detach().double()
        d_h = self.head_dim
        o_rows = sum(row_norms(w_o[:, h * d_h:(h + 1) * d_h] @ w_v[h * d_h:(h + 1) * d_h])
                     for h in range(self.n_heads))
        v_out = float(row_norms(self.v.weight).max()) * A
        entries = {"q.input": A, "k.input": A, "v.input": A,
                   "q.output": float(row_norms(self.q.weight).max()) * A,
                   "k.output": float(row_norms(self.k.weight).max()) * A,
                   "v.output": v_out,
                   "scores": self.score_scale * float((q_norms.double() * k_norms.double()).max()) * A * A,
                   "o.input": v_out,
                   "o.output": float(o_rows.max()) * A}
        return Certificate.leaf(a, attention_gain(o_norm, v_norms, self.output_divisor), lipschitz, entries)

    def cast_entries(self, A: float, rounding: Rounding, q_norms: torch.Tensor, k_norms: torch.Tensor,
                     v_norms: torch.Tensor) -> tuple[float, dict[str, float]]:
        """With every Linear's input and output cast (``rounding``), tokens of ‖x_s‖₂ ≤ A and the heads'
        σ(W_q^h), σ(W_k^h), σ(W_v^h) (``weight_norms``): bounds on each
        Linear operand and result before its cast, on the scores, and on ‖y_t‖₂ of the output y = RN(u)/D.

        The cast input x̃ has ‖x̃‖ ≤ X = RN-norm(A); ``q/k/v.output`` ≤ fl-dot(‖W_i,:‖₂·X); per head the cast
        projections ‖q̃^h‖ ≤ RN-norm(fl-matmul-norm(σ(W_q^h)·X)) (k, v likewise), rotated by RoPE in fp32
        (``RotaryEmbedding.computed_norm``), and |scores| ≤ c·max_h ‖Rq̃^h‖‖Rk̃^h‖ through a dot product of
        length d_h and at most 5 roundings of the scale (SDPA's math backend multiplies q and k by √c each);
        ``o.input`` z_t = Σ_s P_ts ṽ_s is a computed weighted average of at most ``context`` cast values
        (``Arithmetic.average``): |z_t,j| ≤ avg(RN(fl-dot(‖W_v[j,:]‖₂·X))) and ‖z_t^h‖ ≤ avg(‖ṽ^h‖);
        ``o.output`` ≤ fl-dot(min(‖W_o[i,:]‖₂·‖z̃‖, (|W_o|·|z̃|)_i)) for the cast z̃. fl-dot and
        fl-matmul-norm are ``rounding.arithmetic``'s fp32 products. The product formula of ``certify`` does
        not hold here: the casts between W_v and W_o break W_o^(h)W_v^h's cancellations (W_o·W_v = 0 still
        gives a nonzero cast output)."""
        arithmetic = rounding.arithmetic
        d, d_h, heads = self.q.in_features, self.head_dim, self.n_heads
        x = rounding.norm(A, d)
        q_h, k_h, v_h = (rounding.norm(arithmetic.matmul_norm(m.weight.reshape(heads, d_h, d), n.double(), x), d_h)
                         for n, m in ((q_norms, self.q), (k_norms, self.k), (v_norms, self.v)))
        q_rot, k_rot = (self.rope.computed_norm(n, arithmetic, d_h) for n in (q_h, k_h))
        # SDPA's math backend scales q and k by √c first (two roundings each), which must stay in range
        scaled = arithmetic.ops(math.sqrt(self.score_scale) * float(torch.maximum(q_rot, k_rot).max()), 2)
        products = arithmetic.ops(self.score_scale * float((q_rot * k_rot).max()), 5)
        scores = unless_overflow(scaled, arithmetic.dot(products, d_h), arithmetic.limit)
        v_out = arithmetic.dot(row_norms(self.v.weight) * x, d)
        z_entries = arithmetic.average(rounding.entry(v_out), self.context)
        z_norm = rounding.norm(float(arithmetic.average(v_h, self.context, d_h).pow(2).sum().sqrt()), d)
        o_out = arithmetic.dot(linear_output_bounds(self.o.weight, z_norm, rounding.entry(z_entries)), d)
        out_norm = rounding.norm(arithmetic.matmul_norm(self.o.weight, spectral_norm(self.o.weight), z_norm), d) \
            / self.output_divisor
        entries = {"q.input": A, "k.input": A, "v.input": A,
                   "q.output": arithmetic.dot(float(row_norms(self.q.weight).max()) * x, d),
                   "k.output": arithmetic.dot(float(row_norms(self.k.weight).max()) * x, d),
                   "v.output": float(v_out.max()),
                   "scores": scores,
                   "o.input": float(z_entries.max()),
                   "o.output": float(o_out.max())}
        return out_norm, entries


class FeedForward(nn.Module):
    """y = W_down·φ(W_up·x); Lipschitz ‖W_down‖‖W_up‖ (φ is 1-Lipschitz), RMS gain φ.gain times that.

    φ = scale·base (e.g. GELU/1.128904): ``unscaled`` is W_down·base(W_up·x), and the constant
    ``output_scale`` = φ's scale is left to the block's residual (W_down is linear).
    """

    def __init__(self, d_model: int, ratio: int, activation: str):
        super().__init__()
        self.up = nn.Linear(d_model, ratio * d_model, bias=False)
        self.down = nn.Linear(ratio * d_model, d_model, bias=False)
        self.act = ACTIVATIONS.get(activation)
        self.output_scale = self.act.scale

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act.base(self.up(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unscaled(x) * self.output_scale

    def modular_structure(self, prefix: str) -> Module:
        """W_down ∘ φ ∘ W_up, φ 1-Lipschitz (sensitivity 1, Modula's GeLU/ReLU bonds)."""
        return seq(atom(prefix + "up.weight"), bond(1.0), atom(prefix + "down.weight"))

    @torch.no_grad()
    def certify(self, a: Bound, coordinates: torch.Tensor | None = None,
                rounding: Rounding | None = None) -> Certificate:
        """For inputs with RMS(x) ≤ a: constant L = ‖W_down‖‖W_up‖ (RMS→RMS), gain φ.gain·L, and bounds on
        max |entry| of both matmuls' operands and results.

        With A = √d·a and κ = gain/scale, the bound |base(h)| ≤ κ·|h| of the unscaled activation (κ = 1
        for GELU: |GELU(h)| = |h|·Φ(h) ≤ |h|; and for ReLU):
        - ``up.input``: |x_j| ≤ ‖x‖₂ ≤ A;  ``up.output``: |h_j| ≤ β_j = ‖W_up[j,:]‖₂·A (Cauchy–Schwarz).
        - ``down.input`` g = base(h): |g_j| ≤ κ·β_j, and ‖g‖₂ ≤ κ·‖h‖₂ ≤ κ·σ(W_up)·A.
        - ``down.output``: |(W_down g)_i| ≤ min(‖W_down[i,:]‖₂·κσ(W_up)A, Σ_j |W_down[i,j]|·κβ_j)
          (``linear_output_bounds``), before the constant ``output_scale`` (the Linear's actual output).

        With ``rounding`` (every Linear's input and output cast), the same before each cast, with the fp32
        products of ``rounding.arithmetic`` (fl-dot, fl-matmul-norm): the cast input has ‖x̃‖ ≤ X =
        RN-norm(A), so β_j = fl-dot(‖W_up[j,:]‖₂·X); the cast h̃ has |h̃_j| ≤ RN(β_j) and ‖h̃‖ ≤
        RN-norm(fl-matmul-norm(σ(W_up)·X)), g = base(h̃) computed in fp32 is within κ(1 + e) of those
        (``Activation.computed_bound``: e = ``fp32_excess``, inf past the kernel's ``fp32_input_max``),
        its cast g̃ within RN of g, and ``down.output`` ≤
        fl-dot(``linear_output_bounds`` for g̃); the branch output scale·RN(W_down·g̃) has ℓ2 norm ≤
        scale·RN-norm(fl-matmul-norm(σ(W_down)·‖g̃‖)).
        """
        A = math.sqrt(self.up.in_features) * a
        kappa = self.act.gain / self.act.scale
        lipschitz = rms_operator_norm(self.down.weight) * rms_operator_norm(self.up.weight)
        if rounding is not None:
            arithmetic = rounding.arithmetic
            d, hidden = self.up.in_features, self.up.out_features
            x = rounding.norm(A, d)
            beta = arithmetic.dot(row_norms(self.up.weight) * x, d)
            g = kappa * self.act.computed_bound(rounding.entry(beta))
            h_norm = arithmetic.matmul_norm(self.up.weight, spectral_norm(self.up.weight), x)
            g_norm = rounding.norm(kappa * self.act.computed_bound(rounding.norm(h_norm, hidden)), hidden)
            down = arithmetic.dot(linear_output_bounds(self.down.weight, g_norm, rounding.entry(g)), hidden)
            entries = {"up.input": A, "up.output": float(beta.max()), "down.input": float(g.max()),
                       "down.output": float(down.max())}
            out_norm = arithmetic.matmul_norm(self.down.weight, spectral_norm(self.down.weight), g_norm)
            bound = self.output_scale * rounding.norm(out_norm, d) / math.sqrt(d)
            return Certificate(bound, lipschitz, bound / a, entries)
        beta = row_norms(self.up.weight) * A
        down = linear_output_bounds(self.down.weight, kappa * spectral_norm(self.up.weight) * A, kappa * beta)
        entries = {"up.input": A, "up.output": float(beta.max()), "down.input": kappa * float(beta.max()),
                   "down.output": float(down.max())}
        return Certificate.leaf(a, self.act.gain * lipschitz, lipschitz, entries)


class LipschitzBlock(nn.Module):
    """x ← κx + β·attn(x); x ← κx + β·mlp(x): the convex residual κ = 1−α, β = α = 1/(2N) (Modula), or
    κ = β = 1 (``lipschitz_gpt_unscaled``)."""

    def __init__(self, cfg: dict[str, Any], keep: float, weight: float, attention_divisor: float):
        super().__init__()
        d = cfg["d_model"]
        self.keep, self.weight = keep, weight
        self.attn = LipschitzAttention(d, cfg["n_heads"], cfg["context"], cfg["attn_scale"], attention_divisor)
        self.mlp = FeedForward(d, cfg["mlp_ratio"], cfg["activation"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """κx + β·s·u(x) computed as κ·(x + (βs/κ)·u(x)), u = the branch without its constant output
        scale s: one fused add and one scaling per branch instead of four passes."""
        for branch in (self.attn, self.mlp):
            x = torch.add(x, branch.unscaled(x), alpha=self.weight * branch.output_scale / self.keep)
            if self.keep != 1.0:
                x.mul_(self.keep)
        return x

    def modular_structure(self, prefix: str) -> Module:
        return seq(residual(self.keep, self.weight, self.attn.modular_structure(prefix + "attn.")),
                   residual(self.keep, self.weight, self.mlp.modular_structure(prefix + "mlp.")))

    def certify(self, a: Bound, coordinates: torch.Tensor | None = None,
                rounding: Rounding | None = None) -> Certificate:
        """The two residuals in sequence, from RMS bound ``a`` on every input token: the MLP is
        certified at a_mid = a·(κ + β·g_att), the output bound is a_mid·(κ + β·g_mlp), entries are keyed
        ``attn.q.input`` … ``mlp.down.output`` (with ``rounding``: of the branches' cast Linears, and each
        residual's fp32 arithmetic, ``computed_residual``). The fused form of ``forward`` computes the same
        κx + β·s·u(x); its Linears see x and produce the unscaled u, which the branch entries cover.
        """
        attn, mlp = (self.computed_residual(functools.partial(branch.certify, rounding=rounding), rounding)
                     for branch in (self.attn, self.mlp))
        return sequential([("attn.", attn), ("mlp.", mlp)], a, coordinates)

    def computed_residual(self, branch: Certify, rounding: Rounding | None) -> Certify:
        """κx + β·f(x) (``residual``), and with ``rounding`` as ``forward`` computes it in fp32: κ̂·fl(x + α̂·u)
        with α = βs/κ and κ rounded to fp32, five roundings in all, so the RMS bound is
        ``rounding.arithmetic.ops``(κa + β·bound_f, 5); the sum before ×κ̂, up to √d/κ times that per entry,
        must stay in fp32's range (else no bound: inf)."""
        certify = residual_certificate(self.keep, self.weight, branch)
        if rounding is None:
            return certify
        arithmetic, root_d = rounding.arithmetic, math.sqrt(self.attn.q.in_features)

        def certify_computed(a: Bound, coordinates: torch.Tensor | None = None) -> Certificate:
            exact = certify(a, coordinates)
            before_keep = arithmetic.ops(root_d * exact.bound / self.keep, 3)
            bound = unless_overflow(before_keep, arithmetic.ops(exact.bound, 5), arithmetic.limit)
            return Certificate(bound, exact.lipschitz, bound / a, exact.entries)
        return certify_computed


@MODELS.register("lipschitz_gpt")
class LipschitzGPT(LanguageModel):
    """Token embedding (rows RMS ≤ 1) → N Lipschitz blocks → head × logit_scale × output_mult.

    cfg keys: d_model, n_layers, n_heads, context (required; d_model/n_heads even); mlp_ratio (4),
    activation (gelu|relu, gelu), attn_scale (1.0), logit_scale (1.0). ``depth_mup`` must be false:
    the residuals' branch scaling (``block_constants``: the convex residual's 1/(2N) here) is fixed,
    and the certificate depends on it.
    Certificates: ``lipschitz_bound()`` (∞RMS → ∞RMS) and ``lipschitz_bound_l2(seq_len)`` (flattened
    ℓ2 → ℓ2), both for ``forward_embedded`` on all inputs, and ``activation_bounds()``, all read off
    ``certificate(a)``: the blocks' and the readout's certificates composed by lipflow.model.certificate.
    """

    input_radius = 1.0  # the certificate's domain: every token of the embedded input has RMS ≤ this
    # experiment.ipynb's Shakespeare config (Arongil/lipschitz-transformers 158692e): Embed.tare(),
    # blocks.tare(blocks_mass = 16), out.tare(); the paper (App. D) uses blocks_mass 32
    modular_masses = {"embed": 1.0, "blocks": 16.0, "head": 1.0}

    def __init__(self, cfg: dict[str, Any], vocab_size: int):
        super().__init__()
        d, n_layers, n_heads = cfg["d_model"], cfg["n_layers"], cfg["n_heads"]
        if d % n_heads or (d // n_heads) % 2:
            raise ValueError(f"d_model={d} / n_heads={n_heads} must be an even integer (RoPE rotates pairs)")
        if cfg["depth_mup"]:
            raise ValueError("depth_mup: lipschitz_gpt's residuals fix their own branch scaling (the certificate "
                             "depends on it); set depth_mup: false")
        self.vocab_size, self.context = vocab_size, cfg["context"]
        self.tok = nn.Embedding(vocab_size, d)
        self.blocks = nn.ModuleList(LipschitzBlock(cfg, *self.block_constants(n_layers)) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab_size, bias=False)
        self.logit_scale = float(cfg["logit_scale"])
        self.output_mult = 1.0  # µP readout multiplier, set by the parametrization
        self.reset_parameters()

    @staticmethod
    def block_constants(n_layers: int) -> tuple[float, float, float]:
        """(κ, β, D): residuals x ← κx + β·F(x) and attention divided by D. Modula's GPT: the convex
        residual κ = 1−α, β = α = 1/(2N), and D = 3."""
        alpha = 1.0 / (2 * n_layers)
        return 1.0 - alpha, alpha, ATTENTION_OUTPUT_DIVISOR

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.tok.weight.normal_()
        self.tok.weight.div_(self.tok.weight.pow(2).mean(dim=1, keepdim=True).sqrt())
        for block in self.blocks:
            for w in (block.attn.q.weight, block.attn.k.weight, block.attn.v.weight, block.mlp.up.weight):
                orthogonal_init_(w)
            block.attn.o.weight.zero_()
            block.mlp.down.weight.zero_()
        orthogonal_init_(self.head.weight)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        self.check_length(idx)
        self.check_token_ids(idx)
        return self.tok(idx)

    def attention_layers(self) -> list[AttentionSite]:
        return block_attention_sites(self.blocks)

    def modular_structure(self, masses: dict[str, float]) -> Module:
        """Modula's GPT: Mul(logit_scale) ∘ head ∘ blocks ∘ embed, each part tared to its mass."""
        blocks = seq(*(block.modular_structure(f"blocks.{i}.") for i, block in enumerate(self.blocks)))
        return seq(tare(atom("tok.weight"), masses["embed"]), tare(blocks, masses["blocks"]),
                   tare(atom("head.weight"), masses["head"]), bond(self.logit_scale))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._blocks_and_head(self.embed(idx))

    def forward_embedded(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for any embedded sequence: project each token onto RMS ≤ 1, then blocks and head."""
        return self._blocks_and_head(self.project_to_domain(x))

    def _blocks_and_head(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            self._record(f"block{i}", x)
        logits = self.head(x)
        if self.logit_scale * self.output_mult != 1.0:
            logits = logits * (self.logit_scale * self.output_mult)
        self._record("logits", logits)
        return logits

    @torch.no_grad()
    def project_embeddings(self) -> None:
        """Shrink every embedding row with RMS > 1 back to RMS 1 (rows inside the ball are untouched)."""
        self.tok.weight.copy_(project_rms_ball(self.tok.weight, self.input_radius))

    def project_to_domain(self, x: torch.Tensor) -> torch.Tensor:
        """Euclidean projection of an embedded sequence (…, T, d) onto D = {RMS(x_t) ≤ 1 ∀t}."""
        return project_rms_ball(x, self.input_radius)

    def body_certificate(self, a: Bound, coordinates: torch.Tensor | None = None,
                         rounding: Rounding | None = None) -> Certificate:
        """The block stack in sequence from RMS bound ``a`` on every input token (App. B's two passes in
        one: the bound follows each residual with the modules' RMS gains and each block's constant uses
        the bound at its input), recording the residual stream after block i (``block{i}``: a token with
        RMS ≤ a has every |entry| ≤ ‖x‖₂ ≤ √d·a)."""
        root_d = math.sqrt(self.tok.embedding_dim)
        parts = []
        for i, block in enumerate(self.blocks):
            parts += [(f"blocks.{i}.", functools.partial(block.certify, rounding=rounding)),
                      ("", record(f"block{i}", lambda b, _: root_d * b))]
        return sequential(parts, a, coordinates)

    def readout_certificate(self, a: Bound, coordinates: torch.Tensor | None = None,
                            rounding: Rounding | None = None) -> Certificate:
        """head × s (s = |logit_scale·output_mult|) on tokens with RMS ≤ a: constant and gain
        s·‖W_head‖_RMS→RMS; entries ``head.input`` √d·a, ``head.output`` max_j ‖W_head[j,:]‖₂·√d·a
        (Cauchy–Schwarz) and ``logits`` s times that. With ``rounding`` the head reads the cast input
        (‖x̃‖ ≤ RN-norm(√d·a)) through an fp32 dot product (``Arithmetic.dot``) and the logits are
        s·RN(head output) in fp32 (s rounded, then the product)."""
        d = self.tok.embedding_dim
        root_d = math.sqrt(d)
        scale = abs(self.logit_scale * self.output_mult)
        row_norm = float(row_norms(self.head.weight).max())
        if rounding is None:
            head_output = row_norm * (root_d * a)
            logits = scale * head_output
        else:
            head_output = rounding.arithmetic.dot(row_norm * rounding.norm(root_d * a, d), d)
            logits = rounding.arithmetic.ops(scale * rounding.entry(head_output), 2)
        lipschitz = scale * rms_operator_norm(self.head.weight)
        return Certificate.leaf(a, lipschitz, lipschitz, {"head.input": root_d * a, "head.output": head_output,
                                                          "logits": logits})

    @torch.no_grad()
    def certificate(self, a: Bound | None = None, rounding: Rounding | None = None) -> Certificate:
        """Blocks then readout from RMS bound ``a`` on every input token (default the domain's 1); with
        ``rounding``, the entries of the model whose Linears cast their inputs and outputs."""
        a = self.input_radius if a is None else a
        return sequential([("", functools.partial(self.body_certificate, rounding=rounding)),
                           ("", functools.partial(self.readout_certificate, rounding=rounding))], a)

    def body_lipschitz(self) -> float:
        """∞RMS→∞RMS constant L_body of the block stack on D."""
        return self.body_certificate(self.input_radius).lipschitz

    def activation_bounds(self, rounding: Rounding | None = None) -> dict[str, float]:
        """Bounds on max |entry|, over every token sequence, of each Linear's input and output (keys
        ``blocks.{i}.attn.q.input`` … ``head.output``, the names ``precision.linear_hooks`` uses), of each
        block's attention scores (``blocks.{i}.attn.scores``), of the residual stream after block i
        (``block{i}``) and of the logits (``logits``), all from the current weights.

        Domain: ``forward_embedded`` on any input (it projects every token onto RMS ≤ 1) and ``forward`` on
        token ids (rows of the embedding), so the RMS bound starts at a₀ = max(1, max row RMS of the
        embedding) — 1 whenever ``project_embeddings`` has run. With ``rounding``, those of the model whose
        Linears cast their inputs and outputs (``bound.Rounding``; each Linear's values before its cast),
        computed in fp32 in between: then the projection's own fp32 result may reach RMS 1·(1 + γ_{d+7})
        (the RMS through a sum of d squares, a mean, a square root and two scalings, then x·(1/RMS)).
        """
        d = self.tok.embedding_dim
        radius = self.input_radius if rounding is None else rounding.arithmetic.ops(self.input_radius, d + 7)
        a = max(radius, float(self.tok.weight.detach().double().pow(2).mean(dim=1).sqrt().max()))
        return self.certificate(a, rounding).entries

    def lipschitz_bound(self) -> float:
        """Certified L with ‖f(X)−f(Y)‖_∞RMS ≤ L·‖X−Y‖_∞RMS for f = ``forward_embedded``, all X, Y.

        ‖X‖_∞RMS = max over tokens of the per-token RMS (over d for X, over V for the logits).
        L = L_body·|logit_scale·output_mult|·‖W_head‖_RMS→RMS, from the current weights (exact SVDs);
        the input projection onto D is 1-Lipschitz, so the bound holds on all of R^{T×d}.
        """
        return self.certificate().lipschitz

    def lipschitz_bound_l2(self, seq_len: int | None = None) -> float:
        """Certified L₂ with ‖f(X)−f(Y)‖₂ ≤ L₂·‖X−Y‖₂, both flattened (T·d inputs, T·V logits).

        The projection onto D is 1-Lipschitz in ℓ2. The body maps max_t‖dx_t‖₂ to max_t‖dy_t‖₂ with
        factor L_body (d → d, so the RMS normalizations cancel); the head per token has ℓ2 constant
        |logit_scale·output_mult|·σ_max(W_head); ‖dlogits‖₂ ≤ √T·max_t‖dlogit_t‖₂ and
        max_t‖dx_t‖₂ ≤ ‖dX‖₂. So L₂ = √T·|logit_scale·output_mult|·σ_max(W_head)·L_body
        = √(T·V/d)·L_∞RMS, for sequences of at most T = ``seq_len`` tokens (default: the context).
        """
        seq_len = self.context if seq_len is None else seq_len
        scale = abs(self.logit_scale * self.output_mult)
        return math.sqrt(seq_len) * scale * spectral_norm(self.head.weight) * self.body_lipschitz()
