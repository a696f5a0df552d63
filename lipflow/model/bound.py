"""Certificate arithmetic shared by the Lipschitz models (Newhouse et al. 2025, App. B; Modula).

Norms. For a token vector x ∈ R^n, RMS(x) = ‖x‖₂/√n; for a sequence X ∈ R^{T×n},
‖X‖_∞RMS = max_t RMS(x_t). A weight W of shape (fan_out, fan_in) acts per token with
‖W‖_RMS→RMS = σ_max(W)/√(fan_out/fan_in) (``rms_operator_norm``).

The per-module formulas live here and the rules that compose them (sequential, sum, residual)
in ``lipflow.model.certificate``; the two constants every certificate and evaluation shares are
``GELU_MAX_SLOPE`` and ``ATTENTION_OUTPUT_DIVISOR`` (Modula's ⅓, which ``lipschitz_gpt_unscaled``
replaces by 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lipflow.constraints import squaring_divisor
from lipflow.model.certificate import Bound
from lipflow.registry import Registry

# max_x GELU'(x) = Φ(√2) + √2·φ(√2) = ½(1 + erf(1)) + e⁻¹/√π = 1.1289041… (GELU'' = φ(x)(2 − x²) = 0
# at x = √2). Newhouse et al. 2025 round it to 1.1289, which leaves GELU/1.1289 a slope of 1.0000037.
GELU_MAX_SLOPE = 0.5 * (1.0 + math.erf(1.0)) + math.exp(-1.0) / math.sqrt(math.pi)
# Modula's attention divides its output by 3 (Large et al. 2024): y = W_o·(…)/3, sensitivity ⅓(1 + 2·attn_scale)
# (lipschitz_gpt_unscaled divides by 1).
ATTENTION_OUTPUT_DIVISOR = 3.0


@dataclass(frozen=True)
class Activation:
    """An entrywise activation φ = scale·base, scale = 1/max|base′|, so φ(0) = 0, φ is 1-Lipschitz and
    |φ(x)| ≤ gain·|x| with gain = scale (|base(x)| ≤ |x| for both bases: GELU(x) = xΦ(x), Φ ≤ 1).

    ``scale`` is kept apart so a model can fold it into a following linear step (a residual weight)
    instead of spending an elementwise pass on the widest activation."""

    base: Callable[[torch.Tensor], torch.Tensor]
    base_lipschitz: float  # max |base′|: GELU_MAX_SLOPE for GELU, 1 for ReLU
    fp32_excess: float  # e with |fl(base(x))| ≤ (1 + e)|x| in fp32 for |x| ≤ fp32_input_max
    fp32_input_max: float  # the largest |x| at which the fp32 kernel is known not to overflow

    @property
    def scale(self) -> float:
        return 1.0 / self.base_lipschitz

    @property
    def gain(self) -> float:
        return self.scale

    def fn(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.scale if self.scale != 1.0 else self.base(x)

    def computed_bound(self, bound: Bound) -> Bound:
        """Bound on |fl(base(x))| in fp32 given |x| ≤ ``bound`` (or on ‖fl(base(x))‖₂ given ‖x‖₂ ≤ it):
        (1 + fp32_excess)·bound, inf past ``fp32_input_max``."""
        return unless_overflow(bound, (1.0 + self.fp32_excess) * bound, self.fp32_input_max)


ACTIVATIONS: Registry[Activation] = Registry("activation")
# GELU(x)/max GELU': slope in [−0.1142, 1]. torch's fp32 kernel gives |fl(GELU(x))| ≤ |x| for every finite
# |x| < 2^127 (checked exhaustively on the CPU; tests/test_fp32_arithmetic.py samples it on the CPU and on CUDA)
# and inf above (it forms x·(1 + erf(x/√2)) before halving); the bounds allow 16u more (GELU_FP32_EXCESS).
GELU_FP32_EXCESS = 2.0 ** -20
GELU_FP32_INPUT_MAX = 2.0 ** 127 * (1 - 2.0 ** -24)  # the largest fp32 below 2^127
ACTIVATIONS.register("gelu")(Activation(F.gelu, GELU_MAX_SLOPE, GELU_FP32_EXCESS, GELU_FP32_INPUT_MAX))
ACTIVATIONS.register("relu")(Activation(F.relu, 1.0, 0.0, math.inf))


def head_spectral_norms(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """σ_max of each head's row slice W[h·d_h:(h+1)·d_h, :] (ℓ2→ℓ2) by an SVD in float64 (an upper
    bound's ingredient, as ``spectral_norm``), shape (n_heads,)."""
    fan_out, fan_in = w.shape
    slices = w.detach().double().reshape(n_heads, fan_out // n_heads, fan_in)
    return torch.linalg.matrix_norm(slices, ord=2)


def attention_gain(o_norm: float, v_head_norms: torch.Tensor, output_divisor: float) -> float:
    """RMS gain g_att of W_o·concat_h(P_h V_h)/D (D = ``output_divisor``, Modula's 3):
    RMS(y_t) ≤ g_att·a when every RMS(x_s) ≤ a.

    Each head's output is a convex combination of its values, so ‖o_t^h‖₂ ≤ σ(W_v^h)·a√d, and the
    heads may each pick a different token: ‖o_t‖₂ ≤ (Σ_h σ(W_v^h)²)^½·a√d. Hence
    g_att = ‖W_o‖_RMS→RMS·(Σ_h σ(W_v^h)²)^½/D.
    """
    return o_norm * float(v_head_norms.pow(2).sum().sqrt()) / output_divisor


def attention_lipschitz(o_norm: float, q_head_norms: torch.Tensor, k_head_norms: torch.Tensor,
                        v_head_norms: torch.Tensor, score_scale: float, d_model: int, a: float,
                        output_divisor: float) -> float:
    """∞RMS Lipschitz constant of causal attention on inputs with every RMS(x_s) ≤ a.

    Theorem B.1 of Newhouse et al. (after Large et al. 2024, Prop. 7), per head h with scores
    z_ts = c·q_t·k_s (c = ``score_scale`` = attn_scale/d_head; RoPE rotations are orthogonal and
    leave every norm below unchanged). With A = a√d and every ‖dx_s‖₂ ≤ Δ:
      d(Σ_s P_ts v_s) = Σ_s P_ts dv_s + Σ_s dP_ts v_s,  ‖Σ_s P_ts dv_s‖ ≤ σ_v,h Δ,
      ‖dP_t‖₁ ≤ ‖dz_t‖_∞ (softmax Jacobian: Σ_s P_s|u_s − ū| ≤ max|u|),
      |dz_ts| ≤ c(‖dq_t‖‖k_s‖ + ‖q_t‖‖dk_s‖) ≤ 2c·σ_q,h σ_k,h A Δ,
    so ‖do_t^h‖ ≤ σ_v,h (1 + 2c·d·a²·σ_q,h σ_k,h) Δ. Summing heads in ℓ2 and applying W_o/D
    (D = ``output_divisor``, Modula's 3):
      L_att = ‖W_o‖·(Σ_h σ_v,h² (1 + 2c·d·a²·σ_q,h σ_k,h)²)^½/D.
    With one head, c = attn_scale/d and unit norms this is the paper's ⅓‖W_o‖‖W_v‖(1 + 2a²‖W_q‖‖W_k‖·
    attn_scale), with attn_scale on the QK term only. With H heads the value term carries (Σ_h σ_v,h²)^½
    ≤ √H·‖W_v‖ and the QK term c·d = attn_scale·H, which the paper's formula leaves out.
    """
    qk = 1.0 + 2.0 * score_scale * d_model * a * a * q_head_norms * k_head_norms
    return o_norm * float((v_head_norms * qk).pow(2).sum().sqrt()) / output_divisor


def project_rms_ball(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Shrink each token vector (last dim) whose RMS exceeds ``radius`` onto RMS = radius. The RMS is
    taken of the vector over its ``squaring_divisor``: in float32 a vector with an entry ≥ 1.8e19 (an
    embedding row after a step at a huge learning rate) had RMS inf and was shrunk to 0, so a run went
    on with those tokens' rows silently zeroed instead of on the sphere."""
    divisor = squaring_divisor(x, dim=-1)
    rms = (x / divisor).pow(2).mean(dim=-1, keepdim=True).sqrt() * divisor
    return x * (radius / rms.clamp(min=radius))


FLOAT32_MAX = torch.finfo(torch.float32).max
# The unit to which torch's fp32 matmuls round each operand before accumulating in fp32, per
# ``torch.get_float32_matmul_precision()``: none at 'highest'; TF32's 10 explicit mantissa bits at 'high'
# (bf16x3 rounds less); bf16's 7 at 'medium'.
MATMUL_OPERAND_UNIT = {"highest": 0.0, "high": 2.0 ** -11, "medium": 2.0 ** -8}


def matmul_precision() -> str:
    """torch's float32 matmul precision; 'medium', the coarsest, where torch ≥ 2.9's per-backend
    ``fp32_precision`` settings have been mixed with the legacy one and it cannot say."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "medium"


def unless_overflow(check: Bound, value: Bound, limit: float) -> Bound:
    """``value`` where ``check`` ≤ ``limit``, inf elsewhere (NaN included): a result past fp32's range is inf,
    so no bound follows."""
    if isinstance(check, torch.Tensor) or isinstance(value, torch.Tensor):
        return torch.where(torch.as_tensor(check) <= limit, torch.as_tensor(value), math.inf)
    return value if check <= limit else math.inf


@dataclass(frozen=True)
class Arithmetic:
    """The fp32 arithmetic between a simulation's casts (Higham, Accuracy and Stability of Numerical
    Algorithms, 2002, §2.2 and §3.1): each operation returns the exact result times (1 + δ), |δ| ≤ u = 2^−24,
    plus, for a product or quotient in the subnormal range, an absolute error ≤ η = 2^−150 (a sum with a
    subnormal result is exact); k such roundings compound to at most 1 + γ_k, γ_k = ku/(1 − ku). A dot
    product of n terms, summed in any order, with or without fused multiply-adds, of operands first rounded
    to ``operand_unit`` u_op (TF32 or bf16 where torch's matmul precision allows it, ``MATMUL_OPERAND_UNIT``),
    is within g_n·Σ_j |a_j||b_j| + n·η(1 + g_n) of the exact one, g_n = (1 + u_op)²(1 + γ_n) − 1, γ_n of the
    ``accumulation_unit`` (fp32's u; kept apart from ``unit`` so a test can isolate either). Every
    result must also stay within ``limit``, fp32's largest finite value, or it is inf: a bound past it is
    none (inf). The bounds themselves are computed in float64, whose own roundings (~1e-16 relative) are
    far inside these terms."""

    unit: float
    operand_unit: float
    accumulation_unit: float
    absolute: float
    limit: float

    @classmethod
    def fp32(cls) -> "Arithmetic":
        """fp32 elementwise and in the matmuls' sums, matmul operands at torch's current float32 matmul
        precision."""
        info = torch.finfo(torch.float32)
        return cls(info.eps / 2, MATMUL_OPERAND_UNIT[matmul_precision()], info.eps / 2,
                   info.smallest_normal * info.eps / 2, info.max)

    @staticmethod
    def gamma(k: int, unit: float) -> float:
        """γ_k = ku/(1 − ku), the bound on |θ_k| where Π_{i≤k} (1 + δ_i)^{±1} = 1 + θ_k, |δ_i| ≤ u; inf where
        ku ≥ 1."""
        return k * unit / (1.0 - k * unit) if k * unit < 1.0 else math.inf

    def matmul_gamma(self, n: int) -> float:
        """g_n = (1 + u_op)²(1 + γ_n) − 1: a dot product's relative error bound."""
        return (1.0 + self.operand_unit) ** 2 * (1.0 + self.gamma(n, self.accumulation_unit)) - 1.0

    def in_range(self, bound: Bound) -> Bound:
        """``bound`` where it is within fp32's range, inf elsewhere."""
        return unless_overflow(bound, bound, self.limit)

    def dot(self, bound: Bound, n: int) -> Bound:
        """Bound on |fl(Σ_{j≤n} a_j b_j)| given Σ_j |a_j||b_j| ≤ ``bound`` (every partial sum is within it):
        (1 + g_n)(bound + n·η)."""
        return self.in_range((1.0 + self.matmul_gamma(n)) * (bound + n * self.absolute))

    def matmul_norm(self, w: torch.Tensor, sigma: Bound, in_norm: Bound) -> Bound:
        """Bound on ‖fl(Wx)‖₂ for W (fan_out, fan_in) of σ_max ``sigma`` (or a stack of them, one σ each) and
        ‖x‖₂ ≤ ``in_norm``: the error vector e has |e_i| ≤ g_n(|W||x|)_i + n·η(1 + g_n), so ‖e‖₂ ≤
        g_n‖|W|‖₂‖x‖₂ + √fan_out·n·η(1 + g_n), with ‖|W|‖₂ ≤ ``abs_operator_norm_bound``."""
        fan_out, fan_in = w.shape[-2:]
        g = self.matmul_gamma(fan_in)
        abs_norm = abs_operator_norm_bound(w)
        norm = (sigma + g * (abs_norm if w.ndim > 2 else float(abs_norm))) * in_norm
        return self.in_range(norm + math.sqrt(fan_out) * fan_in * self.absolute * (1.0 + g))

    def ops(self, bound: Bound, k: int, n: int = 1) -> Bound:
        """Bound on the result of ``k`` successive elementwise roundings of products and sums whose terms'
        absolute values add up to at most ``bound``, per entry, or in ℓ2 over ``n`` entries: (1 + γ_k)(bound
        + √n·k·η)."""
        return self.in_range((1.0 + self.gamma(k, self.unit)) * (bound + math.sqrt(n) * k * self.absolute))

    def average(self, bound: Bound, terms: int, n: int = 1) -> Bound:
        """Bound on a computed weighted average Σ_s ŵ_s v_s / Σ_s ŵ_s of ``terms`` values (|v_s| ≤ ``bound``
        per entry, or ‖v_s‖₂ ≤ ``bound`` for vectors of ``n`` entries) with computed weights ŵ_s ≥ 0:
        attention's softmax(z)·V, whether it normalises first (the weights then sum to 1 up to rounding, and the
        products P̂·V are a matmul's) or keeps an online softmax's running sums (flash kernels: its largest
        weight is exp(0) = 1, the numerator reaches Σ_s ŵ_s|v_s| ≤ terms·bound, which must stay in range),
        since the exps' own errors cancel in the ratio. Numerator and denominator each pass through at most
        k = 3·terms + 2 fp32 roundings (a product, a sum and a rescale per term), the numerator's operands
        through the matmul's, and the quotient through one: (1 + u_op)²(1 + γ_{k+1})/(1 − γ_k)·(bound +
        √n·k·η)."""
        k, unit = 3 * terms + 2, max(self.unit, self.accumulation_unit)  # sums of either kind
        denominator = 1.0 - self.gamma(k, unit)  # the denominator's relative lower bound
        factor = ((1.0 + self.operand_unit) ** 2 * (1.0 + self.gamma(k + 1, unit)) / denominator
                  if denominator > 0 else math.inf)
        average = self.in_range(factor * (bound + math.sqrt(n) * k * self.absolute))
        return unless_overflow(terms * bound * factor, average, self.limit)


@dataclass(frozen=True)
class Rounding:
    """A cast y ↦ RN(y) to a number format (round to nearest) of values within its range:
    |RN(y) − y| ≤ u·|y| in the normal range, u = eps/2 = 2^−(mantissa bits + 1), and ≤ η = half the
    subnormal spacing below it (IEEE 754), so |RN(y)| ≤ (1 + u)|y| + η and, for y of n entries,
    ‖RN(y)‖₂ ≤ (1 + u)‖y‖₂ + √n·η. The activation bounds of a model whose Linears cast their inputs and
    outputs (the precision evaluation's simulation) carry these through, and the fp32 ``arithmetic``
    between the casts."""

    unit: float
    absolute: float
    arithmetic: Arithmetic

    @classmethod
    def of(cls, dtype: torch.dtype) -> "Rounding":
        info = torch.finfo(dtype)
        return cls(info.eps / 2, info.smallest_normal * info.eps / 2, Arithmetic.fp32())

    def entry(self, bound: Bound) -> Bound:
        """Bound on |RN(y)| given |y| ≤ ``bound`` (elementwise for a tensor)."""
        return (1.0 + self.unit) * bound + self.absolute

    def norm(self, bound: Bound, n: int) -> Bound:
        """Bound on ‖RN(y)‖₂ given ‖y‖₂ ≤ ``bound`` for y of n entries."""
        return (1.0 + self.unit) * bound + math.sqrt(n) * self.absolute


# -- entry-wise activation bounds ---------------------------------------------------------------
# A per-token bound RMS(x) ≤ a is the ℓ2 bound ‖x‖₂ ≤ √n·a; every entry then has |x_i| ≤ ‖x‖₂ (equality
# for x = √n·a·e_i), and for y = Wx Cauchy–Schwarz gives |y_i| = |⟨W_i,:, x⟩| ≤ ‖W_i,:‖₂·‖x‖₂, with equality
# for x along W_i,:. Bounds are computed in float64 and returned as tensors of per-entry bounds.

def row_norms(w: torch.Tensor) -> torch.Tensor:
    """‖W_i,:‖₂ for every row i of W (float64), shape (fan_out,)."""
    return w.detach().double().norm(dim=1)


def abs_operator_norm_bound(w: torch.Tensor) -> torch.Tensor:
    """An upper bound on ‖|W|‖₂, the spectral norm of W's entrywise absolute value (float64): by the
    Schur test ‖|W|‖₂ ≤ (‖W‖₁‖W‖_∞)^½, the largest absolute column sum times the largest absolute row
    sum; per slice for a stack of matrices (…, fan_out, fan_in)."""
    a = w.detach().double().abs()
    return (a.sum(dim=-2).amax(dim=-1) * a.sum(dim=-1).amax(dim=-1)).sqrt()


def linear_output_bounds(w: torch.Tensor, in_norm: float, in_entry: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output bound on |(Wx)_i| for every x with ‖x‖₂ ≤ ``in_norm`` (and |x_j| ≤ ``in_entry``_j).

    |(Wx)_i| ≤ ‖W_i,:‖₂·‖x‖₂ ≤ ‖W_i,:‖₂·in_norm (Cauchy–Schwarz); with entry bounds also
    |(Wx)_i| ≤ Σ_j |W_ij|·|x_j| ≤ (|W|·in_entry)_i (triangle inequality). Both hold, so their minimum does;
    the second is sharper when the entry bounds are uneven (e.g. after a nonlinearity).
    """
    bound = row_norms(w) * in_norm
    if in_entry is not None:
        bound = torch.minimum(bound, w.detach().double().abs() @ in_entry.double())
    return bound
