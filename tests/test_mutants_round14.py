"""Mutation-testing round 14: the code of the fp32-arithmetic certificates and the round's other changes — the
bounds of lipflow.model.bound's ``Arithmetic`` (matmul_norm's γ of the fan-in and its subnormal term, ops' ℓ2
subnormal term and overflow to inf, average's matmul operand rounding, subnormal term and denominator, the range
check at fp32's largest value), RotaryEmbedding.computed_norm, the attention scores' q·√c overflow, the
residual's sum before ×κ, the MLP's dot products and its GELU past 2¹²⁷, the precision evaluation's SDPA math
backend, the sharpness's ``TopEigenvalue``, json_object_argument's repeated keys (errors.unique_keys), the plots'
--receipt check, the image-MLP study's check_finite_snapshots, the digits split's constants and
refuse_to_replace_other_rows / seal. Each test here holds a property (an fp32 or bf16 computation carried out
step by step in numpy or torch, a cast simulation that overflows, a value computed by hand, the documented
contract) that a plausible wrong version of the code, which the rest of the suite let through, breaks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lipflow.model.bound import Arithmetic

F32 = np.float32
TINY = F32(2.0 ** -149)  # fp32's smallest subnormal


def _fp32() -> Arithmetic:
    """fp32 everywhere, matmul operands unrounded (torch's 'highest' precision, the CPU's)."""
    arithmetic = Arithmetic.fp32()
    return Arithmetic(arithmetic.unit, 0.0, arithmetic.accumulation_unit, arithmetic.absolute, arithmetic.limit)


def _sequential_matvec(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """fl(Wx) in fp32, each product and each partial sum rounded, summed left to right (one of the orders the
    bound covers)."""
    out = np.zeros(w.shape[0], dtype=F32)
    for i in range(w.shape[0]):
        acc = F32(0.0)
        for j in range(w.shape[1]):
            acc = F32(acc + F32(w[i, j] * x[j]))
        out[i] = acc
    return out


# --- bound.Arithmetic ------------------------------------------------------------------------------------------

def test_matmul_norm_covers_a_sum_that_rounds_up_at_every_step_through_the_fan_ins_gamma():
    """Mutants: matmul_norm took γ of the fan-out (or swapped fan_in and fan_out), γ_1 for one output row. The row
    w = x = (1, a, …, a), a = 1.25·2⁻¹², has products 1 and a² = 1.5625u (exact), and summed in order each
    1 + 2ku + 1.5625u rounds up to 1 + 2(k+1)u: 63 steps put fl(w·x) = 1 + 126u, 27.6u above the exact
    σ‖x‖ = ‖x‖² = 1 + 98.4375u, which γ_64 covers and γ_1 (about u) does not."""
    u = 2.0 ** -24
    x = np.array([1.0] + [1.25 * 2.0 ** -12] * 63, dtype=F32)
    computed = float(_sequential_matvec(x[None, :], x)[0])
    assert computed == 1.0 + 126 * u
    norm = math.sqrt(sum(float(v) ** 2 for v in x))
    assert computed - norm ** 2 > 27 * u
    bound = _fp32().matmul_norm(torch.from_numpy(x[None, :].copy()), norm, norm)
    assert computed <= bound < 1.0 + 300 * u


@pytest.mark.parametrize("fan_out, fan_in", [(4, 16), (16, 4)])
def test_matmul_norm_covers_subnormal_products_that_each_round_up_by_half_a_step(fan_out, fan_in):
    """Mutants: matmul_norm dropped its subnormal term √fan_out·fan_in·η(1 + g), or its √fan_out, or swapped
    fan_out and fan_in. W = (½ + 2⁻¹⁰)·ones, x = 2⁻¹⁴⁹·ones (fp32's smallest subnormal): each product
    (½ + 2⁻¹⁰)·2⁻¹⁴⁹ rounds up to 2⁻¹⁴⁹, nearly η = 2⁻¹⁵⁰ above it, and the subnormal sums are exact, so
    ‖fl(Wx)‖ = √fan_out·fan_in·2⁻¹⁴⁹, about twice the exact σ‖x‖ = (½ + 2⁻¹⁰)√fan_out·fan_in·2⁻¹⁴⁹ — as torch's
    fp32 matmul computes it too."""
    w = np.full((fan_out, fan_in), 0.5 + 2.0 ** -10, dtype=F32)
    x = np.full(fan_in, TINY, dtype=F32)
    computed = _sequential_matvec(w, x)
    assert (computed == F32(fan_in) * TINY).all()
    torch_result = torch.from_numpy(w) @ torch.from_numpy(x)
    assert torch.equal(torch_result, torch.from_numpy(computed)) or float(torch_result.abs().max()) == 0.0  # FTZ
    norm = math.sqrt(fan_out) * fan_in * 2.0 ** -149
    sigma, in_norm = (0.5 + 2.0 ** -10) * math.sqrt(fan_out * fan_in), math.sqrt(fan_in) * 2.0 ** -149
    bound = _fp32().matmul_norm(torch.from_numpy(w), sigma, in_norm)
    assert norm <= bound <= 1.01 * norm


def test_ops_covers_subnormal_roundings_in_l2_over_n_entries():
    """Mutant: ops' subnormal term lost its √n (k·η for the whole vector). s·x with s = ½ + 2⁻¹⁰ and x = 2⁻¹⁴⁹
    in each of 16 entries rounds every entry up to 2⁻¹⁴⁹: ‖fl(s·x)‖₂ = 4·2⁻¹⁴⁹, which s‖x‖₂ + √16·η covers and
    s‖x‖₂ + η (2.5·2⁻¹⁴⁹) does not."""
    s = F32(0.5 + 2.0 ** -10)
    x = np.full(16, TINY, dtype=F32)
    computed = float(np.sqrt(np.sum((s * x).astype(np.float64) ** 2)))
    assert computed == 4 * 2.0 ** -149
    bound = _fp32().ops(float(s) * 4 * 2.0 ** -149, 1, 16)
    assert computed <= bound <= 1.01 * computed


def test_ops_past_fp32s_range_is_no_bound():
    """Mutant: ops returned its product without the range check. fp32's largest value times (1 + 2⁻²³) is inf
    in fp32, so no finite number bounds that product: ops says inf; just below the range it stays finite."""
    largest = F32(np.finfo(np.float32).max)
    with np.errstate(over="ignore"):
        assert np.isinf(largest * F32(1 + 2.0 ** -23))
    arithmetic = _fp32()
    assert arithmetic.ops(float(largest) * (1 + 2.0 ** -23), 1) == math.inf
    assert math.isfinite(arithmetic.ops(float(largest) * 0.5, 1))


def test_average_covers_values_rounded_to_bf16_as_matmul_operands():
    """Mutant: average dropped the (1 + u_op)² of the matmul's operand rounding. At torch's 'medium' float32
    matmul precision P̂·V's operands are rounded to bf16 (u_op = 2⁻⁸): one value v = 1 + 0.6·2⁻⁷ of weight 1
    averages to RN_bf16(v) = 1 + 2⁻⁷, above v by 0.8·u_op, far more than fp32's γ terms."""
    v = torch.tensor([[1 + 0.6 * 2.0 ** -7]], dtype=torch.float32)
    p = torch.ones(1, 1)
    computed = float(p.bfloat16().float() @ v.bfloat16().float())
    assert computed == 1 + 2.0 ** -7
    fp32 = _fp32()
    medium = Arithmetic(fp32.unit, 2.0 ** -8, fp32.accumulation_unit, fp32.absolute, fp32.limit)
    assert computed <= medium.average(float(v), 1) < 1 + 2.0 ** -6


def test_average_covers_subnormal_products_that_round_up_in_l2_over_n_entries():
    """Mutant: average's subnormal term lost its √n (k·η for the whole vector). Weights (1, w, w, w, w),
    w = ½ + 2⁻¹⁰, over five values 2⁻¹⁴⁹ in each of 400 entries: each w·2⁻¹⁴⁹ rounds up to 2⁻¹⁴⁹, so every entry's
    numerator is 5·2⁻¹⁴⁹ over a denominator of 3.004, and the quotient 1.66·2⁻¹⁴⁹ rounds to 2·2⁻¹⁴⁹: ‖·‖₂ =
    40·2⁻¹⁴⁹, twice the values' norm 20·2⁻¹⁴⁹ — more than the 17·η the mutant adds, within the 17·√400·η of the
    bound."""
    n, w = 400, F32(0.5 + 2.0 ** -10)
    weights, values = np.array([1, w, w, w, w], dtype=F32), np.full((5, n), TINY, dtype=F32)
    numerator, denominator = np.zeros(n, dtype=F32), F32(0.0)
    for weight, value in zip(weights, values):
        numerator, denominator = (numerator + weight * value).astype(F32), F32(denominator + weight)
    average = (numerator / denominator).astype(F32)
    assert (average == 2 * TINY).all()
    computed = float(np.sqrt(np.sum(average.astype(np.float64) ** 2)))
    assert computed == 40 * 2.0 ** -149
    assert computed <= _fp32().average(20 * 2.0 ** -149, 5, n)


def test_average_is_no_bound_once_its_denominators_roundings_can_reach_zero():
    """Mutant: where 1 − γ_k ≤ 0 (k = 3·terms + 2 roundings with ku ≥ ½: the computed denominator's relative
    lower bound is 0) average's factor was 1 instead of inf. From terms = (2²³ − 2)/3 on it is inf; one term
    fewer it is finite."""
    threshold = (2 ** 23 - 2) // 3
    assert 3 * threshold + 2 == 2 ** 23
    arithmetic = _fp32()
    assert arithmetic.average(1.0, threshold) == math.inf
    assert math.isfinite(arithmetic.average(1e-30, threshold - 1))


def test_a_bound_equal_to_fp32s_largest_value_is_in_range():
    """Mutants: unless_overflow refused check == limit (< for ≤), as a float and as a tensor. fp32's largest
    finite value is a value fp32 holds, so a bound equal to it is kept; the next one up is not."""
    arithmetic = _fp32()
    largest = float(np.finfo(np.float32).max)
    assert arithmetic.in_range(largest) == largest and arithmetic.in_range(largest * (1 + 2.0 ** -30)) == math.inf
    bounds = torch.tensor([1.0, largest, largest * 2], dtype=torch.float64)
    assert arithmetic.in_range(bounds).tolist() == [1.0, largest, math.inf]


# --- lipschitz_gpt.RotaryEmbedding.computed_norm -------------------------------------------------------------

def test_rope_computed_norm_covers_subnormal_products_over_the_heads_entries():
    """Mutants: computed_norm dropped its subnormal term √n·2η(1 + γ₂), or its √n. RoPE in fp32 (the module's own
    forward) of x = 2⁻¹⁴⁹ in all 64 entries (‖x‖₂ = 8·2⁻¹⁴⁹): where a pair's |cos| and |sin| both exceed ½ both
    products round to ±2⁻¹⁴⁹ and the pair becomes (0, ±2·2⁻¹⁴⁹), so some position reaches ‖fl(Rx)‖₂ = 9.9·2⁻¹⁴⁹,
    past 8 + 1 (one η term for the whole vector), within 8 + √64."""
    from lipflow.model.lipschitz_gpt import RotaryEmbedding

    rope, tiny = RotaryEmbedding(64, 1024), 2.0 ** -149
    rotated = rope(torch.full((1, 1, 1024, 64), tiny)).double().norm(dim=-1)
    top = float(rotated.max())
    assert top > 9.5 * tiny
    assert top <= rope.computed_norm(8 * tiny, _fp32(), 64) <= 16.01 * tiny


def test_rope_computed_norm_past_fp32s_range_is_inf():
    """Mutant: computed_norm returned its float64 value without the range check. Pairs of 3·10³⁸ rotate past
    fp32's largest value where |cos| + |sin| > 1.13: the fp32 result holds inf, which no finite bound covers."""
    from lipflow.model.lipschitz_gpt import RotaryEmbedding

    rope, x = RotaryEmbedding(32, 64), torch.full((1, 1, 64, 32), 3e38)
    rotated = float(rope(x).double().norm(dim=-1).max())
    assert rotated == math.inf
    assert rotated <= rope.computed_norm(float(x[0, 0, 0].double().norm()), _fp32(), 32)


def test_attention_whose_query_scaled_by_the_root_of_c_overflows_fp32_is_not_proven_safe_in_bf16():
    """Mutant: the scores' bound dropped the check that SDPA's math backend's first step, q·√c (c = attn_scale /
    d_head = 4 here), stays in fp32's range. Queries of 2·10³⁸ (W_q's first row 10³⁸, token rows 1) fit bf16,
    and with keys of 10⁻³⁰ the scores c·qᵀk would be small, but q·√c = 4·10³⁸ is inf in fp32: the cast
    simulation's logits are NaN, so no proof."""
    from conftest import unscaled_simulation
    from lipflow.config import run_defaults
    from lipflow.evaluation.number_formats import FORMATS
    from lipflow.evaluation.precision import proven_safe
    from lipflow.model import build_model

    model = build_model(run_defaults(model="lipschitz_gpt", d_model=2, n_layers=1, n_heads=1, context=4,
                                     attn_scale=8.0), 4)
    block = model.blocks[0]
    with torch.no_grad():
        model.tok.weight.fill_(1.0)
        for w in (block.attn.q.weight, block.attn.v.weight, block.attn.o.weight, block.mlp.up.weight,
                  block.mlp.down.weight):
            w.zero_()
        block.attn.q.weight[0] = 1e38
        block.attn.k.weight.fill_(1e-30)
        model.head.weight.fill_(1e-3)
    model.eval()
    bf16 = FORMATS.get("bf16")
    _, logits, _ = unscaled_simulation(model, bf16, torch.tensor([[0, 1, 2, 3]]))
    assert not bool(torch.isfinite(logits).all())
    assert proven_safe(model, bf16)[0] == 0.0


def test_a_residual_sum_past_fp32s_range_in_one_entry_is_not_proven_safe_in_bf16():
    """Mutants: computed_residual dropped its check that the sum x + α̂u before ×κ stays in fp32's range, or
    that check's √d (one entry may hold √d times the RMS) or its 1/κ. lipschitz_gpt with d 2, κ = ½, context 1:
    the token row (3.3·10³⁸, 0), W_v and W_o each 1 at [0, 0] (every cast within bf16's 3.39·10³⁸), so
    x + u/3 = 4.4·10³⁸ in the first entry is inf in fp32 while its RMS bound ×κ is finite: the cast simulation's
    logits are NaN, so no proof."""
    from conftest import unscaled_simulation
    from lipflow.config import run_defaults
    from lipflow.evaluation.number_formats import FORMATS
    from lipflow.evaluation.precision import proven_safe
    from lipflow.model import build_model

    model = build_model(run_defaults(model="lipschitz_gpt", d_model=2, n_layers=1, n_heads=1, context=1,
                                     activation="relu"), 4)
    block = model.blocks[0]
    with torch.no_grad():
        model.tok.weight.zero_()
        model.tok.weight[:, 0] = 3.3e38
        for w in (block.attn.q.weight, block.attn.k.weight, block.attn.v.weight, block.attn.o.weight,
                  block.mlp.up.weight, block.mlp.down.weight):
            w.zero_()
        block.attn.v.weight[0, 0] = 1.0
        block.attn.o.weight[0, 0] = 1.0
        model.head.weight.fill_(1e-30)
    model.eval()
    bf16 = FORMATS.get("bf16")
    _, logits, _ = unscaled_simulation(model, bf16, torch.tensor([[1]]))
    assert not bool(torch.isfinite(logits).any())
    assert proven_safe(model, bf16)[0] == 0.0


# --- mlp.layer_certifier with rounding ---------------------------------------------------------------------

def test_mlp_layer_output_bound_covers_a_dot_product_over_the_fan_in_rounding_up_at_every_step():
    """Mutant: the layer's output entries took the dot product's γ of the fan-out (2 classes) instead of the
    fan-in (64 pixels). Row w = x = (1, a, …, a), a = 1.25·2⁻¹², and input x (‖x‖₂ = ‖w‖₂, every |x_j| within
    it): summed in order in fp32 the output is 1 + 126u, 27.6u above Cauchy–Schwarz's ‖w‖‖x‖; the fp32-rounding
    certificate's ``layers.0.output`` covers it."""
    from lipflow.config import run_defaults
    from lipflow.model import build_model
    from lipflow.model.bound import Rounding

    model = build_model(run_defaults(model="mlp", in_features=64, d_model=16, n_layers=1, activation="relu"), 2)
    x = np.array([1.0] + [1.25 * 2.0 ** -12] * 63, dtype=F32)
    with torch.no_grad():
        model.layers[0].weight.zero_()
        model.layers[0].weight[0] = torch.from_numpy(x)
    computed = float(_sequential_matvec(x[None, :], x)[0])
    assert computed == 1.0 + 126 * 2.0 ** -24
    norm = math.sqrt(sum(float(v) ** 2 for v in x))
    bound = model.certificate(norm, Rounding.of(torch.float32)).entries["layers.0.output"]
    assert computed <= bound < 1.0 + 300 * 2.0 ** -24


def test_an_mlp_whose_gelu_input_passes_2_to_the_127_is_not_proven_safe_in_bf16():
    """Mutant: the layer's entry bounds after φ skipped ``Activation.computed_bound`` (GELU's fp32 kernel, inf past
    2¹²⁷). A GELU MLP whose first hidden entry reaches 2.5·10³⁸ (W₀[0, 0], input norm 1) is within bf16's range,
    but fp32 GELU of it is inf and the cast simulation's logits are inf: no proof (the norm path's inf had been
    dropped by the entries' finite min in the next layer)."""
    from conftest import unscaled_simulation
    from lipflow.config import run_defaults
    from lipflow.evaluation.number_formats import FORMATS
    from lipflow.evaluation.precision import proven_safe
    from lipflow.model import build_model

    model = build_model(run_defaults(model="mlp", in_features=2, d_model=2, n_layers=2, activation="gelu",
                                     input_norm=1.0), 2)
    with torch.no_grad():
        model.layers[0].weight.zero_()
        model.layers[0].weight[0, 0] = 2.5e38
        model.layers[1].weight.fill_(1e-30)
    model.eval()
    bf16 = FORMATS.get("bf16")
    _, logits, _ = unscaled_simulation(model, bf16, torch.tensor([[1.0, 0.0]]))
    assert not bool(torch.isfinite(logits).any())
    assert proven_safe(model, bf16)[0] == 0.0


# --- evaluation.precision ------------------------------------------------------------------------------------

def test_the_precision_evaluations_forward_runs_attention_on_sdpas_math_backend_only():
    """Mutant: loss_and_accuracy lost its ``sdpa_kernel([SDPBackend.MATH])``, so the fused kernels (flash,
    memory-efficient, cuDNN) the proof does not bound were allowed. During its forward only the math backend is
    enabled."""
    from torch import nn

    from lipflow.evaluation.precision import loss_and_accuracy

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                         torch.backends.cuda.mem_efficient_sdp_enabled()))
            return torch.zeros(*x.shape, 3)

    loss, accuracy = loss_and_accuracy(Probe(), torch.zeros(2, 4, dtype=torch.long), 2, torch.device("cpu"))
    assert seen == [(True, False, False)] and loss == pytest.approx(math.log(3)) and accuracy == 1.0


# --- evaluation.sharpness.largest_eigenvalue -------------------------------------------------------------------

def _quadratic(a: torch.Tensor):
    """½θᵀAθ over one parameter vector θ: its Hessian is A."""
    theta = torch.randn(a.shape[0], generator=torch.Generator().manual_seed(1), requires_grad=True)
    a32 = a.float()
    return (lambda: 0.5 * theta @ a32 @ theta), [theta]


def test_top_eigenvalue_is_converged_exactly_when_the_residual_test_stopped_lanczos_early():
    """Mutant: ``converged`` tested residual ≤ tol·|θ| while the loop stops on residual < tol·(|θ| + 1e-6). A
    Hessian of scale 1e-9 (spectrum spread over [−1e-9, 1e-9], dimension 120) meets the loop's test at once, so
    Lanczos stops at LANCZOS_MIN_STEPS well short of ``iters``, with a residual still far above 0.01·|θ|: the
    stop and ``converged`` are the same test."""
    from lipflow.evaluation.sharpness import LANCZOS_MIN_STEPS, largest_eigenvalue

    n = 120
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    loss, params = _quadratic((q * torch.linspace(-1e-9, 1e-9, n, dtype=torch.float64)) @ q.T)
    top = largest_eigenvalue(loss, params, iters=60, tol=0.01, generator=torch.Generator().manual_seed(0))
    assert top.steps == LANCZOS_MIN_STEPS < 60
    assert top.residual > 0.01 * abs(top.value)  # the relative part alone is not met
    assert top.converged


# --- errors.json_object_argument -------------------------------------------------------------------------------

def test_a_repeated_key_is_named_not_the_objects_first_key():
    """Mutant: the refusal named the object's first key (right whenever the first key is the repeated one, as
    in the catalog's case). In {"a": 1, "b": 2, "b": 3} it is b, and a is not named."""
    from lipflow.errors import ConfigError, json_object_argument

    with pytest.raises(ConfigError) as caught:
        json_object_argument('{"a": 1, "b": 2, "c": 4, "b": 3}', "--config-json")
    assert "'b'" in str(caught.value) and "'a'" not in str(caught.value) and "--config-json" in str(caught.value)
    assert json_object_argument('{"a": 1, "b": {"a": 2}}', "--config-json") == {"a": 1, "b": {"a": 2}}


# --- results.figures: --receipt ----------------------------------------------------------------------------------

def test_plots_receipt_in_the_tables_dir_it_makes_is_no_missing_folder(tmp_path, monkeypatch):
    """Mutant: only --out-dir was exempt from the receipt's folder check, so a receipt inside a --tables-dir not
    made yet (which drawing makes, as it makes --out-dir) was refused. Drawing is replaced by one that makes the
    tables folder, as write_table does."""
    import lipflow.cli
    from lipflow.results import figures

    tables = tmp_path / "new" / "tables"
    monkeypatch.setattr(lipflow.cli, "connect", lambda db: None)
    monkeypatch.setattr(figures, "check_views", lambda con, db, names: None)
    monkeypatch.setattr(figures, "refuse_to_replace_others", lambda con, names, out_dir, tables_dir: None)
    monkeypatch.setattr(figures, "draw", lambda con, names, out_dir, tables_dir, strict: tables_dir.mkdir(
        parents=True) or [])
    code = figures.main(["--db", str(tmp_path / "db.duckdb"), "--out-dir", str(tmp_path / "figures"),
                         "--tables-dir", str(tables), "--receipt", str(tables / "x.drawn")])
    assert code == 0 and (tables / "x.drawn").is_file()


# --- studies.image_mlp.check_finite_snapshots -------------------------------------------------------------------

def test_check_finite_snapshots_names_the_first_snapshot_and_weight_that_is_not_finite():
    """Mutants: the check looked only for NaN in every entry, or for a tensor with no finite entry, or at the
    first or the last snapshot only. Snapshots finite at step 5, one +inf entry in ``b`` at step 10 and NaN
    everywhere at step 15: the error names b and step 10."""
    from lipflow.errors import StageError
    from lipflow.studies.image_mlp import check_finite_snapshots

    fine = {"a": torch.ones(3), "b": torch.ones(2)}
    one_inf = {"a": torch.ones(3), "b": torch.tensor([1.0, math.inf])}
    nan = {"a": torch.full((3,), math.nan), "b": torch.full((2,), math.nan)}
    check_finite_snapshots([(5, 0.5, fine)], "m", 0)
    with pytest.raises(StageError) as caught:
        check_finite_snapshots([(5, 0.5, fine), (10, 0.4, one_inf), (15, 0.1, nan)], "m", 3)
    message = str(caught.value)
    assert "image_mlp.methods.m.lr" in message and "b at step 10" in message and "seed 3" in message, message


# --- studies.digits_split --------------------------------------------------------------------------------------

def test_digits_split_constants_are_the_datasets_size_and_the_studys_fractions():
    """Mutant: DIGITS_IMAGES 1800 (⌈0.5·(1800 − 1080)⌉ is 360 too, so the test split's size let it through). It is
    the number of scikit-learn's 8×8 digits, and the three splits add up to it."""
    from sklearn.datasets import load_digits

    from lipflow.studies.digits_split import DIGITS_IMAGES, images_in_test_split

    assert DIGITS_IMAGES == len(load_digits().target) == 1797
    assert images_in_test_split() == 360


# --- results.cli: refuse_to_replace_other_rows and seal ----------------------------------------------------------

def test_a_table_of_evaluation_names_but_list_values_is_a_file_exists_error(tmp_path):
    """Mutant: the refusal of a file whose run_id and eval hold lists was a ValueError; the function's contract
    (and its callers' one-line refusal of a file to keep) is a FileExistsError naming --out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lipflow.results.cli import refuse_to_replace_other_rows
    from lipflow.results.inputs import EVALUATION_COLUMNS

    out = tmp_path / "evals.parquet"
    pq.write_table(pa.table({c: pa.array([[1]]) for c in EVALUATION_COLUMNS}), out)
    with pytest.raises(FileExistsError, match="--out .* is not an evaluation table"):
        refuse_to_replace_other_rows(out, "r-0000000a")


def test_seal_of_a_missing_file_says_it_is_missing_not_that_it_is_no_regular_file(tmp_path):
    """Mutant: the refusal of pipes, devices and folders also caught a path that does not exist and called it
    "not a regular file". A missing file is reported as missing."""
    from lipflow.results.cli import seal

    with pytest.raises(FileNotFoundError):
        seal([tmp_path / "missing.parquet"])
