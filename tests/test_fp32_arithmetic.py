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

from conftest import unscaled_simulation
from lipflow.config import run_defaults
from lipflow.evaluation.number_formats import FORMATS, simulate_cast
from lipflow.model import build_model
from lipflow.model.bound import (ACTIVATIONS, FLOAT32_MAX, GELU_FP32_EXCESS, GELU_FP32_INPUT_MAX,
                                 MATMUL_OPERAND_UNIT, Arithmetic, Rounding, abs_operator_norm_bound)

FP32 = Arithmetic.fp32()
EXACT = Arithmetic(0.0, 0.0, 0.0, 0.0, math.inf)  # no rounding between the casts (the activations' fp32_excess stays)
# the kernels' side of the proof on the GPU too (bench/gpu_check runs the cuda-marked tests)
ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_CUDA)]


def test_gamma_is_the_compounded_rounding_bound_and_infinite_from_ku_one():
    u = 2.0 ** -24
    assert FP32.unit == u and FP32.accumulation_unit == u and FP32.operand_unit == 0.0 and FP32.absolute == 2.0 ** -150
    assert FP32.limit == FLOAT32_MAX == torch.finfo(torch.float32).max
    assert Arithmetic.gamma(3, u) == 3 * u / (1 - 3 * u)
    assert (1 + u) ** 3 <= 1 + Arithmetic.gamma(3, u) and 1 / (1 - u) ** 3 <= 1 + Arithmetic.gamma(3, u)
    # a weighted average: numerator and denominator through 3·terms + 2 roundings each, the quotient one more
    assert FP32.average(1.0, 10) == (1 + Arithmetic.gamma(33, u)) / (1 - Arithmetic.gamma(32, u))
    assert Arithmetic.gamma(2 ** 24, u) == math.inf
    # TF32 rounds each operand once, the sum stays fp32: (1 + 2^−11)²(1 + γ_n) − 1, not γ_n of 2^−11
    tf32 = dataclasses.replace(FP32, operand_unit=2.0 ** -11)
    assert tf32.matmul_gamma(4096) == (1 + 2.0 ** -11) ** 2 * (1 + Arithmetic.gamma(4096, u)) - 1 < 2e-3
    # a result past fp32's range is no bound: the online softmax's numerator reaches terms·max|v|
    assert FP32.dot(FLOAT32_MAX, 2) == math.inf and FP32.average(FLOAT32_MAX / 100, 1000) == math.inf
    assert FP32.average(FLOAT32_MAX / 10_000, 1000) < FLOAT32_MAX


def test_the_matmul_operand_unit_follows_torchs_float32_matmul_precision(monkeypatch):
    """TF32 (precision 'high') rounds a matmul's operands to 10 mantissa bits, bf16 ('medium') to 7: a proof for
    fp32 products would not cover them. Where torch cannot say (its per-backend fp32_precision settings mixed
    with the legacy one raise), the coarsest is taken."""
    previous = torch.get_float32_matmul_precision()
    try:
        for precision, unit in MATMUL_OPERAND_UNIT.items():
            torch.set_float32_matmul_precision(precision)
            assert Arithmetic.fp32().operand_unit == unit
    finally:
        torch.set_float32_matmul_precision(previous)
    assert MATMUL_OPERAND_UNIT == {"highest": 0.0, "high": 2.0 ** -11, "medium": torch.finfo(torch.bfloat16).eps / 2}

    def mixed_settings():
        raise RuntimeError("you have used a mix of the legacy and new APIs to set the TF32 status")

    monkeypatch.setattr(torch, "get_float32_matmul_precision", mixed_settings)
    assert Arithmetic.fp32().operand_unit == 2.0 ** -8


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
    bound = FP32.matmul_norm(w, torch.linalg.matrix_norm(w.double(), 2).item(), math.sqrt(exact[0].item()))
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


@pytest.mark.parametrize("device, backend", [("cpu", None), ("cpu", SDPBackend.MATH),
                                             pytest.param("cuda", SDPBackend.MATH, marks=ON_CUDA)])
def test_fp32_attention_leaves_the_convex_hull_of_its_values_and_stays_within_the_average_bound(backend, device):
    """softmax(z)·V is a convex combination of the values, so in exact arithmetic no output entry exceeds
    the largest |value|; torch's fp32 SDPA (the math backend the precision simulation runs, and the CPU's
    default) exceeds it at equal values for a fraction of the outputs, and stays within
    ``Arithmetic.average``, per entry and per head's ℓ2 norm."""
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
    top = torch.linspace(2.0 ** 126, 2.0 ** 127, 1_000_001, dtype=torch.float64).float()  # fp32's next-to-top binade
    x = torch.cat([x, top[top < 2.0 ** 127].to(device), -top[top < 2.0 ** 127].to(device)])
    for name in ACTIVATIONS.names():
        act = ACTIVATIONS.get(name)
        assert bool((act.base(x).double().abs() <= (1 + act.fp32_excess) * x.double().abs()).all()), name
    assert ACTIVATIONS.get("relu").fp32_excess == 0.0 and ACTIVATIONS.get("relu").fp32_input_max == math.inf
    gelu = ACTIVATIONS.get("gelu")
    assert gelu.fp32_input_max == GELU_FP32_INPUT_MAX == float(torch.tensor(2.0 ** 127).nextafter(torch.tensor(0.0)))
    assert gelu.computed_bound(2.0 ** 127) == math.inf and gelu.computed_bound(2.0 ** 126) < 2.0 ** 127
    if device == "cpu":  # torch's CPU kernel forms x·(1 + erf(x/√2)) before halving: inf from 2^127 on
        assert bool(torch.isinf(F.gelu(torch.tensor([2.0 ** 127, 3e38]))).all())


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


MATMULS_ONLY = Arithmetic(0.0, 2.0 ** -12, 2.0 ** -12, 0.0, math.inf)  # coarse matmuls, exact elementwise steps,
ELEMENTWISE_ONLY = Arithmetic(2.0 ** -12, 0.0, 0.0, 0.0, math.inf)  # and the reverse: each isolates one kind


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
    d, d_h, context, gamma = 32, 16, 16, MATMULS_ONLY.matmul_gamma
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
        gain = 1 + MATMULS_ONLY.matmul_gamma(fan_in)
        assert ratio[f"layers.{i}.output"] >= gain * ratio[f"layers.{i}.input"] * close
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


def test_tf32_matmuls_raise_the_bounds_and_a_bound_past_fp32s_range_proves_nothing():
    """With TF32 allowed ('high') every matmul's operands carry 2^−11 more: the largest bound of a small
    lipschitz_gpt grows (its verdict stays 1); weights whose bounds pass fp32's range give verdict 0 with
    the reason, not a crash."""
    from lipflow.evaluation.precision import proven_safe

    torch.manual_seed(0)
    model = with_random_matrices(build_model(run_defaults(model="lipschitz_gpt", d_model=16, n_layers=1, n_heads=1,
                                                          context=1024), 8), "bf16")
    bf16 = FORMATS.get("bf16")
    previous = torch.get_float32_matmul_precision()
    try:
        highest = bounds_with(model, Arithmetic.fp32(), "bf16")
        torch.set_float32_matmul_precision("high")
        high, verdict = bounds_with(model, Arithmetic.fp32(), "bf16"), proven_safe(model, bf16)[0]
    finally:
        torch.set_float32_matmul_precision(previous)
    assert verdict == 1.0
    for key in ("blocks.0.attn.q.output", "blocks.0.mlp.down.output", "head.output"):
        assert high[key] >= (1 + 2.0 ** -11) ** 2 * highest[key], key
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e12)
    value, status = proven_safe(model, bf16)
    assert value == 0.0 and status.startswith("no finite analytic bound: a bound passes fp32's range")


def gelu_past_its_kernels_range():
    """A lipschitz_gpt whose MLP input reaches 1.99e38 in bf16 (zero attention, every token row 1, W_up's first
    row 2.5e37): below bf16's 3.39e38, but past 2^127, where torch's fp32 GELU overflows."""
    model = build_model(run_defaults(model="lipschitz_gpt", d_model=16, n_layers=1, n_heads=1, context=4), 8)
    block = model.blocks[0]
    with torch.no_grad():
        for w in (block.attn.q.weight, block.attn.k.weight, block.attn.v.weight, block.attn.o.weight):
            w.zero_()
        block.mlp.up.weight.zero_()
        block.mlp.up.weight[0] = 2.5e37
        block.mlp.down.weight.fill_(1e-30)
        model.tok.weight.fill_(1.0)
        model.head.weight.mul_(1e-3)
    return model


def residual_past_fp32s_range():
    """lipschitz_gpt, d 2, κ = ½: every bound within bf16's 3.39e38, but the residual's sum x + α̂u before ×κ
    reaches 3.85e38, past fp32's range (W_o 8.25e37, W_down's first column 3)."""
    model = build_model(run_defaults(model="lipschitz_gpt", d_model=2, n_layers=1, n_heads=1, context=4,
                                     activation="relu"), 4)
    block = model.blocks[0]
    with torch.no_grad():
        model.tok.weight.fill_(1.0)
        block.attn.q.weight.zero_()
        block.attn.k.weight.zero_()
        block.attn.v.weight.fill_(1.0)
        block.attn.o.weight.fill_(8.25e37)
        block.mlp.up.weight.zero_()
        block.mlp.up.weight[0] = 1.0
        block.mlp.down.weight.zero_()
        block.mlp.down.weight[:, 0] = 3.0
        model.head.weight.fill_(1e-30)
    return model


@pytest.mark.parametrize("case", [gelu_past_its_kernels_range, residual_past_fp32s_range])
def test_an_fp32_intermediate_past_its_range_is_not_proven_safe_in_bf16(case):
    """bf16's range nearly reaches fp32's: every bound of these models is within it, and each was proven safe,
    but their unscaled simulation overflows an fp32 step between two casts (GELU's kernel past 2^127, the
    residual's sum past fp32's max) and returns non-finite logits. The bounds now say inf there."""
    from lipflow.evaluation.precision import cast_activation_bound, proven_safe

    model = case().eval()
    bf16 = FORMATS.get("bf16")
    assert proven_safe(model, bf16)[0] == 0.0 and cast_activation_bound(model, bf16) == math.inf
    _, logits, _ = unscaled_simulation(model, bf16, torch.zeros(1, 3, dtype=torch.long))
    assert not bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("name", [pytest.param(name, marks=ON_CUDA) for name in ("fp8_e4m3", "bf16")])
def test_the_cast_models_bounds_hold_for_the_simulation_on_the_gpu(name):
    """The unscaled simulation run by CUDA's fp32 kernels (matmuls, SDPA, GELU) stays within the cast model's
    bounds, as on the CPU (tests/test_precision.py)."""
    from test_precision import scaled_lipschitz_lm

    model, windows = scaled_lipschitz_lm("lipschitz_gpt")
    fmt = FORMATS.get(name)
    cast_model, _, state = unscaled_simulation(model, fmt, windows[:, :-1], "cuda")
    bounds = cast_model.cpu().activation_bounds(rounding=Rounding.of(fmt.dtype))
    assert state.max_abs and all(state.max_abs[k] <= bounds[k] for k in state.max_abs), \
        {k: (v, bounds[k]) for k, v in state.max_abs.items() if v > bounds[k]}


def test_the_absolute_terms_reach_every_step_of_a_zero_model():
    """Zero weights (bf16 casts of zero are zero): with only the absolute (underflow) term η, each Linear output
    is the dot product's n·η, the scores at least a dot product's and five roundings' (d_h + 5)·η, the
    attention output at least the average's (3T + 2)·η, the logits two roundings' 2η; RoPE's own factor ρ ≥ 1
    is the largest √(c² + s²) of its tables."""
    eta = 2.0 ** -20
    d, d_h, context = 16, 8, 4
    absolute_only = Arithmetic(0.0, 0.0, 0.0, eta, math.inf)
    model = build_model(run_defaults(model="lipschitz_gpt", d_model=d, n_layers=1, n_heads=2, context=context), 8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "tok.weight":
                p.zero_()
    bounds, exact = bounds_with(model, absolute_only, "bf16"), bounds_with(model, EXACT, "bf16")
    tiny = 1e-30  # bf16's own absolute rounding, ~1e-40, in the exact bounds
    assert exact["blocks.0.attn.q.output"] < tiny and exact["logits"] < tiny
    for key in ("attn.q.output", "attn.k.output", "attn.v.output", "mlp.up.output"):
        assert bounds[f"blocks.0.{key}"] == pytest.approx(d * eta, rel=1e-9), key
    assert bounds["blocks.0.attn.scores"] >= (d_h + 5) * eta
    assert bounds["blocks.0.attn.o.input"] >= (3 * context + 2) * eta
    assert bounds["logits"] >= 2 * eta
    rope = model.blocks[0].attn.rope
    rho = float((rope.cos.double() ** 2 + rope.sin.double() ** 2).sqrt().max())
    assert rope.computed_norm(1.0, EXACT, d_h) == rho >= 1.0
