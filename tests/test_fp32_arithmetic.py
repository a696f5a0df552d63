"""The fp32 arithmetic between a precision simulation's casts (``lipflow.model.bound.Arithmetic``).

The cast model's activation bounds once treated every fp32 operation between two casts as exact. Each
test here shows torch's fp32 result of one such step beyond the exact-arithmetic bound (so the proof
needed the term) and within the bound ``Arithmetic`` gives it; the last ones check that the models'
bounds carry those terms at every Linear output, the scores and the attention output.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lipflow.config import run_defaults
from lipflow.evaluation.number_formats import FORMATS, simulate_cast
from lipflow.model import build_model
from lipflow.model.bound import (ACTIVATIONS, GELU_FP32_EXCESS, MATMUL_UNIT, Arithmetic, Rounding,
                                 abs_operator_norm_bound)

FP32 = Arithmetic.fp32()
EXACT = Arithmetic(0.0, 0.0, 0.0)
# the kernels' side of the proof on the GPU too (bench/gpu_check runs the cuda-marked tests)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs a CUDA GPU")])]


def test_gamma_is_the_compounded_rounding_bound_and_infinite_from_ku_one():
    u = 2.0 ** -24
    assert FP32.unit == u and FP32.matmul_unit == u and FP32.absolute == 2.0 ** -150
    assert Arithmetic.gamma(3, u) == 3 * u / (1 - 3 * u)
    assert (1 + u) ** 3 <= 1 + Arithmetic.gamma(3, u) and 1 / (1 - u) ** 3 <= 1 + Arithmetic.gamma(3, u)
    # a weighted average: numerator and denominator through 3·terms + 2 roundings each, the quotient one more
    assert FP32.average(1.0, 10) == (1 + Arithmetic.gamma(33, u)) / (1 - Arithmetic.gamma(32, u))
    assert Arithmetic.gamma(2 ** 11, 2.0 ** -11) == math.inf  # TF32 over 2048 terms: no bound
    tf32 = Arithmetic(2.0 ** -24, 2.0 ** -11, 2.0 ** -150)
    assert tf32.average(1.0, 1024) == math.inf and tf32.dot(1.0, 4096) == math.inf


def test_the_matmul_unit_follows_torchs_float32_matmul_precision():
    """TF32 (precision 'high') rounds a matmul's operands to 10 mantissa bits: a proof for fp32 products
    would not cover it."""
    previous = torch.get_float32_matmul_precision()
    try:
        for precision, unit in MATMUL_UNIT.items():
            torch.set_float32_matmul_precision(precision)
            assert Arithmetic.fp32().matmul_unit == unit
    finally:
        torch.set_float32_matmul_precision(previous)
    assert MATMUL_UNIT == {"highest": 2.0 ** -24, "high": 2.0 ** -11, "medium": 2.0 ** -9}


def test_an_fp32_dot_product_exceeds_cauchy_schwarz_and_stays_within_the_dot_bound():
    """fl(⟨w, w⟩) of a torch matmul against the exact ‖w‖₂² (math.fsum of the exactly representable
    squares): Cauchy–Schwarz holds with equality, and the fp32 result lies above it for some rows,
    never above (1 + γ_n)·‖w‖₂²; the product's norm stays within ``matmul_norm``."""
    generator = torch.Generator().manual_seed(0)
    n = 512
    w = torch.randn(256, n, generator=generator)
    products = w @ w.T
    exact = torch.tensor([math.fsum(float(v) ** 2 for v in row) for row in w.double()], dtype=torch.float64)
    computed = products.diagonal().double()
    assert int((computed > exact).sum()) > 10
    assert bool((computed <= FP32.dot(exact, n)).all())
    x = w[0]
    bound = FP32.matmul_norm(torch.linalg.matrix_norm(w.double(), 2).item(), float(abs_operator_norm_bound(w)),
                             math.sqrt(exact[0].item()), n, w.shape[0])
    assert (w @ x).double().norm().item() <= bound


def test_the_abs_operator_norm_bound_bounds_the_spectral_norm_of_the_absolute_value():
    """(‖W‖₁‖W‖_∞)^½ ≥ σ_max(|W|) ≥ σ_max(W), with equality for a nonnegative rank-one W = 1·1ᵀ; per slice for a
    stack."""
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(4, 6, 9, generator=generator)
    bounds = abs_operator_norm_bound(w)
    assert bounds.shape == (4,)
    assert bool((bounds >= torch.linalg.matrix_norm(w.double().abs(), 2) * (1 - 1e-12)).all())
    assert abs_operator_norm_bound(torch.ones(6, 9)).item() == pytest.approx(math.sqrt(54.0), rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [SDPBackend.MATH, None])
def test_fp32_attention_leaves_the_convex_hull_of_its_values_and_stays_within_the_average_bound(backend, device):
    """softmax(z)·V is a convex combination of the values, so in exact arithmetic no output entry exceeds
    the largest |value|; torch's fp32 SDPA (math backend and the default one) exceeds it at equal values
    for a fraction of the outputs, and stays within ``Arithmetic.average``, per entry and per head's ℓ2 norm."""
    generator = torch.Generator().manual_seed(2)
    T, d_h = 256, 8
    q, k = (3.0 * torch.randn(16, 2, T, d_h, generator=generator).to(device) for _ in range(2))
    v = torch.full((16, 2, T, d_h), 0.7, device=device)
    context = sdpa_kernel([backend]) if backend is not None else torch.no_grad()
    with context:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    top = float(torch.tensor(0.7))
    assert float(y.max()) > top or device == "cuda"  # the GPU's kernels may happen to stay inside
    assert float(y.max()) <= FP32.average(top, T)
    assert float(y.norm(dim=-1).max()) <= FP32.average(float(v.norm(dim=-1).max()), T, d_h)
    assert EXACT.average(top, T) == top


def test_fp32_rope_can_lengthen_a_pair_and_stays_within_its_computed_norm():
    """RoPE is a rotation, but its fp32 tables and products are not: ‖fl(Rx)‖₂ exceeds ‖x‖₂ for some heads
    and positions, never ``RotaryEmbedding.computed_norm``."""
    model = build_model(run_defaults(model="lipschitz_gpt", d_model=64, n_layers=1, n_heads=2, context=256), 16)
    rope = model.blocks[0].attn.rope
    x = torch.randn(64, 2, 256, 32, generator=torch.Generator().manual_seed(3))
    norms = x.double().norm(dim=-1)
    rotated = rope(x).double().norm(dim=-1)
    assert bool((rotated > norms).any())
    assert bool((rotated <= rope.computed_norm(norms, FP32, 32)).all())


@pytest.mark.parametrize("device", DEVICES)
def test_gelu_and_relu_computed_in_fp32_stay_within_their_excess(device):
    """|fl(base(x))| ≤ (1 + e)|x| (``Activation.fp32_excess``) on 4 M points across fp32's range: the
    assumption the cast model's MLP bounds make about torch's activation kernels."""
    x = torch.cat([torch.linspace(-30.0, 30.0, 2_000_001), torch.logspace(-38, 38, 1_000_001),
                   -torch.logspace(-38, 38, 1_000_001)]).float().to(device)
    for name in ACTIVATIONS.names():
        act = ACTIVATIONS.get(name)
        assert bool((act.base(x).double().abs() <= (1 + act.fp32_excess) * x.double().abs()).all()), name
    assert ACTIVATIONS.get("relu").fp32_excess == 0.0


def test_the_fused_fp32_residual_stays_within_five_roundings():
    """κ·fl(x + α̂u) as ``LipschitzBlock.forward`` computes it (α = βs/κ, κ and α rounded to fp32) exceeds the
    exact κ|x| + βs|u| at some entries and stays within ``Arithmetic.ops``(·, 5) at every one."""
    generator = torch.Generator().manual_seed(4)
    keep, weight, scale = 1 - 1 / 6, 1 / 6, 1 / 3
    x, u = (torch.randn(100_000, generator=generator) for _ in range(2))
    u = u.abs() * x.sign()  # same signs: no cancellation, the exact value is κ|x| + βs|u|
    computed = torch.add(x, u, alpha=weight * scale / keep).mul_(keep).double().abs()
    exact = keep * x.double().abs() + weight * scale * u.double().abs()
    assert bool((computed > exact).any())
    assert bool((computed <= FP32.ops(exact, 5)).all())


def with_random_matrices(model, fmt: str):
    """Every matrix drawn at σ_max 1 (the init zeroes the output projections), then cast to ``fmt``."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_().div_(torch.linalg.matrix_norm(p, 2))
            p.copy_(simulate_cast(p, FORMATS.get(fmt)))
    return model


def bounds_with(model, arithmetic: Arithmetic, fmt: str = "fp8_e4m3") -> dict[str, float]:
    rounding = dataclasses.replace(Rounding.of(FORMATS.get(fmt).dtype), arithmetic=arithmetic)
    return model.activation_bounds(rounding=rounding)


MATMULS_ONLY = Arithmetic(0.0, 2.0 ** -12, 0.0)  # a coarse matmul unit and exact elementwise steps, and
ELEMENTWISE_ONLY = Arithmetic(2.0 ** -12, 0.0, 0.0)  # the reverse: each isolates one kind of term


def ratios(model, arithmetic: Arithmetic) -> dict[str, float]:
    """Each bound with ``arithmetic`` between bf16 casts over the same bound with exact arithmetic (bf16's
    absolute rounding, ~1e-40, leaves the ratios exact to ~1e-38)."""
    computed, exact = bounds_with(model, arithmetic, "bf16"), bounds_with(model, EXACT, "bf16")
    assert computed.keys() == exact.keys()
    return {key: computed[key] / exact[key] for key in exact}


def lipschitz_lm(activation: str = "gelu"):
    torch.manual_seed(0)
    cfg = run_defaults(model="lipschitz_gpt", d_model=32, n_layers=2, n_heads=2, context=16, activation=activation)
    return with_random_matrices(build_model(cfg, 20), "bf16")


def test_each_linear_output_of_the_lipschitz_gpt_carries_its_dot_product_over_its_input():
    """With only the matmuls rounded (unit 2^−12): each Linear's output bound is (1 + γ_fan_in) above what its
    input's bound alone gives, the attention output (o.input) the average's factor above the values, and
    the scores (1 + γ_d_h) above the two projections' (each ≥ 1 + γ_d: ‖|W|‖₂ ≥ σ_max)."""
    d, d_h, context, gamma = 32, 16, 16, lambda n: Arithmetic.gamma(n, MATMULS_ONLY.matmul_unit)
    ratio = ratios(lipschitz_lm(), MATMULS_ONLY)
    close = 1 - 1e-12
    for i in range(2):
        block = f"blocks.{i}."
        for linear, fan_in in (("attn.q", d), ("attn.k", d), ("attn.v", d), ("attn.o", d), ("mlp.up", d),
                               ("mlp.down", 4 * d)):
            output, source = ratio[f"{block}{linear}.output"], ratio[f"{block}{linear}.input"]
            assert output >= (1 + gamma(fan_in)) * source * close, block + linear
        average = MATMULS_ONLY.average(1.0, context)
        assert ratio[block + "attn.o.input"] >= average * ratio[block + "attn.v.output"] * close
        projections = (1 + gamma(d)) ** 2 * ratio[block + "attn.q.input"] ** 2
        assert ratio[block + "attn.scores"] >= (1 + gamma(d_h)) * projections * close
    assert ratio["head.output"] >= (1 + gamma(d)) * ratio["head.input"] * close
    assert ratio["logits"] == pytest.approx(ratio["head.output"], rel=1e-12)


def test_the_lipschitz_gpts_elementwise_steps_carry_their_roundings():
    """With only elementwise steps rounded (unit 2^−12): the scores carry RoPE's rotation of q and of k and the
    scale's five roundings; the logits the product s·head output (two roundings); the stream after a block
    more than its input; GELU's fp32_excess shows in down.input."""
    gamma = lambda n: Arithmetic.gamma(n, ELEMENTWISE_ONLY.unit)  # noqa: E731
    ratio = ratios(lipschitz_lm(), ELEMENTWISE_ONLY)
    close = 1 - 1e-12
    rotations = (1 + math.sqrt(2) * gamma(2)) ** 2
    for i in range(2):
        block = f"blocks.{i}."
        assert ratio[block + "attn.scores"] >= rotations * (1 + gamma(5)) * ratio[block + "attn.q.input"] ** 2 * close
    assert ratio["block1"] > ratio["block0"] * (1 + gamma(5)) ** 2 * close  # two residuals per block
    assert ratio["logits"] >= (1 + gamma(2)) * ratio["head.output"] * close
    model = lipschitz_lm()
    mlp = model.blocks[0].mlp
    with_excess = bounds_with(model, EXACT, "bf16")["blocks.0.mlp.down.input"]
    mlp.act = dataclasses.replace(mlp.act, fp32_excess=0.0)
    without = bounds_with(model, EXACT, "bf16")["blocks.0.mlp.down.input"]
    assert with_excess == pytest.approx((1 + GELU_FP32_EXCESS) * without, rel=1e-12)


def test_the_mlps_cast_bounds_carry_each_fp32_step():
    """The mlp: each layer's output (1 + γ_fan_in) above its input's with only the matmuls rounded; the
    activation's and the readout's two roundings with only the elementwise steps rounded."""
    torch.manual_seed(0)
    model = with_random_matrices(build_model(run_defaults(model="mlp", in_features=8, d_model=16, n_layers=3,
                                                          input_norm=3.0), 5), "bf16")
    close = 1 - 1e-12
    ratio = ratios(model, MATMULS_ONLY)
    for i, fan_in in enumerate((8, 16, 16)):
        assert ratio[f"layers.{i}.output"] >= (1 + Arithmetic.gamma(fan_in, MATMULS_ONLY.matmul_unit)) \
            * ratio[f"layers.{i}.input"] * close
    ratio = ratios(model, ELEMENTWISE_ONLY)
    two = 1 + Arithmetic.gamma(2, ELEMENTWISE_ONLY.unit)
    assert ratio["layers.1.input"] == pytest.approx(two * ratio["layers.0.output"], rel=1e-12)  # φ = scale·base
    assert ratio["logits"] == pytest.approx(two * ratio["layers.2.output"], rel=1e-12)
    assert ratio["layers.1.output"] == pytest.approx(two, rel=1e-12)  # its input's norm and entries carry φ's roundings


def test_with_zero_branches_the_residual_streams_bound_is_the_projections_and_residuals_roundings():
    """Zero W_o and W_down: each residual is κx (its branch adds 0), so the exact-arithmetic bound on the stream
    after the block is √d·κ²·1 and the fp32 one carries the projection's d + 7 roundings (forward_embedded's RMS
    ball) and five per residual."""
    d = 16
    model = build_model(run_defaults(model="lipschitz_gpt", d_model=d, n_layers=1, n_heads=1, context=4), 8)
    with torch.no_grad():
        model.tok.weight.mul_(0.5)  # rows at RMS 1/2: the input bound is the projection's radius 1
    fp32, exact = bounds_with(model, FP32, "bf16"), bounds_with(model, EXACT, "bf16")  # bf16: a cast of 0 adds ~1e-40
    keep = model.blocks[0].keep
    assert exact["block0"] == pytest.approx(math.sqrt(d) * keep * keep, rel=1e-12)
    roundings = (1 + Arithmetic.gamma(d + 7, FP32.unit)) * (1 + Arithmetic.gamma(5, FP32.unit)) ** 2
    assert fp32["block0"] == pytest.approx(roundings * exact["block0"], rel=1e-12)


def test_tf32_matmuls_leave_a_long_context_model_unproven():
    """At torch's default fp32 matmul precision a small lipschitz_gpt of context 1024 is proven safe in bf16;
    with TF32 allowed ('high') its attention averages 1024 values through 3074 roundings of 2^−11 each, no
    bound follows, and the verdict is 0, not a crash."""
    from lipflow.evaluation.precision import proven_safe

    torch.manual_seed(0)
    model = build_model(run_defaults(model="lipschitz_gpt", d_model=16, n_layers=1, n_heads=1, context=1024), 8)
    previous = torch.get_float32_matmul_precision()
    try:
        assert proven_safe(model, FORMATS.get("bf16"))[0] == 1.0
        torch.set_float32_matmul_precision("high")
        value, status = proven_safe(model, FORMATS.get("bf16"))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert value == 0.0 and status == "no finite analytic bound at torch's float32 matmul precision 'high'"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["fp8_e4m3", "bf16"])
def test_the_cast_models_bounds_hold_for_the_simulation_on_the_gpu(name):
    """The unscaled simulation run by CUDA's fp32 kernels (matmuls, SDPA, GELU) stays within the cast model's
    bounds, as on the CPU (tests/test_precision.py)."""
    import copy

    from test_precision import scaled_lipschitz_lm

    from lipflow.evaluation.precision import _cast_parameters, linear_hooks

    model, windows = scaled_lipschitz_lm("lipschitz_gpt")
    fmt = FORMATS.get(name)
    cast_model = copy.deepcopy(model)
    _cast_parameters(cast_model, lambda p: simulate_cast(p, fmt))
    bounds = cast_model.activation_bounds(rounding=Rounding.of(fmt.dtype))
    with torch.no_grad(), linear_hooks(cast_model.cuda(), fmt) as state:
        cast_model(windows[:, :-1].cuda())
    assert state.max_abs and all(state.max_abs[k] <= bounds[k] for k in state.max_abs), \
        {k: (v, bounds[k]) for k, v in state.max_abs.items() if v > bounds[k]}
