"""Rank metrics against matrices of known spectrum, head slicing against the model's own attention,
and the bounds against closed forms."""

import math

import numpy as np
import pytest
import torch

from lipflow.config import evaluation_params, run_defaults
from lipflow.evaluation import EVALUATIONS, EvalContext
from lipflow.evaluation.rank import (LayerMatrices, b3_terms, dudley_rademacher, edelman_norm_proxy,
                                     find_attention, schatten_contribution, spectrum_rows)
from lipflow.model import build_model


CFG = run_defaults(model="gpt", d_model=32, n_layers=2, n_heads=4, context=8, mlp_ratio=2)


def matrix_with_spectrum(s, shape, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
    sigma = np.zeros(shape)
    sigma[np.arange(len(s)), np.arange(len(s))] = s
    return u @ sigma @ v.T


def metrics(rows):
    return {(r["metric"], r["rtol"]): r["value"] for r in rows}


def test_a_whole_number_rtol_is_a_float_in_its_row():
    """rtols: [1] (or [1.0], which the config spells as the integer) gave an int64 rtol column where every
    other rank table has a DOUBLE one; the rows hold it as a float."""
    rows = spectrum_rows(torch.eye(4), rtols=[1])
    assert {type(row["rtol"]) for row in rows} == {type(None), float}


def test_spectral_metrics_match_the_constructed_spectrum():
    s = np.array([5.0, 3.0, 1.0, 1e-9, 0.0])
    m = metrics(spectrum_rows(torch.tensor(matrix_with_spectrum(s, (8, 5))), rtols=[0.25, 1e-10]))
    assert m[("numerical_rank", None)] == 3          # 1e-9 < 8·eps_fp32·5
    assert m[("numerical_rank", 0.25)] == 2           # σ > 1.25
    assert m[("numerical_rank", 1e-10)] == 4
    assert m[("spectral_norm", None)] == pytest.approx(5.0)
    assert m[("frobenius_norm", None)] == pytest.approx(math.sqrt(35.0))
    assert m[("nuclear_norm", None)] == pytest.approx(9.0)
    assert m[("stable_rank", None)] == pytest.approx(35.0 / 25.0)
    p = np.array([5.0, 3.0, 1.0, 1e-9]) / (9.0 + 1e-9)
    assert m[("effective_rank", None)] == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_head_slices_reproduce_the_models_attention_logits_and_a_constructed_low_rank():
    torch.manual_seed(0)
    model = build_model(CFG, 30)
    attn = model.blocks[1].attn
    d, d_head = 32, 8
    with torch.no_grad():  # head 2: W_Q = A·B with inner dimension 2, so W_Qᵀ W_K has rank 2
        q_rows = torch.randn(d_head, 2) @ torch.randn(2, d)
        attn.qkv.weight[2 * d_head:3 * d_head] = q_rows
    layers = find_attention(model)
    assert [layer.name for layer in layers] == ["blocks.0.attn", "blocks.1.attn"]
    layer = layers[1]
    assert layer.scale == pytest.approx(1 / math.sqrt(d_head)) and layer.mlp_in.shape == (64, 32)

    x = torch.randn(5, d)
    q, k, _ = attn.qkv(x).split(d, dim=1)
    for h in range(4):
        logits = q[:, h * d_head:(h + 1) * d_head] @ k[:, h * d_head:(h + 1) * d_head].T
        assert torch.allclose(x.double() @ layer.qk(h) @ x.double().T, logits.double(), atol=1e-4)
    # the value–output map: head h's contribution to attn.out for a value-weighted input x
    v_h = x @ attn.qkv.weight[2 * d + d_head:2 * d + 2 * d_head].T
    out_h = v_h @ attn.out.weight[:, d_head:2 * d_head].T
    assert torch.allclose(x.double() @ layer.ov(1), out_h.double(), atol=1e-4)

    windows = torch.randint(0, 30, (6, 9))
    ctx = EvalContext(model, lambda count: windows[:count], windows, evaluation_params("rank", rtols=[1e-3], n_train=len(windows)), CFG, 3.0, 3.25, torch.device("cpu"), None)
    rows = EVALUATIONS.get("rank")(ctx)
    ranks = {(r["layer"], r["head"]): r["value"] for r in rows
             if r["metric"] == "numerical_rank" and r.get("matrix") == "qk" and r["rtol"] is None}
    assert ranks[(1, 2)] == 2
    assert all(v == d_head for key, v in ranks.items() if key != (1, 2))
    by_metric = {}
    for r in rows:
        by_metric.setdefault(r["metric"], []).append(r["value"])
    assert by_metric["generalization_gap"] == [pytest.approx(0.25)]
    assert by_metric["b3_rademacher_sum"][0] == pytest.approx(sum(by_metric["b3_rademacher"]))
    assert len(by_metric["b3_rademacher"]) == 8
    assert by_metric["edelman_norm_proxy"][0] > 1 and by_metric["spectrum_adaptive_proxy"][0] > math.sqrt(2)


def test_dudley_integral_matches_its_closed_form_and_the_research_note_example():
    # one term with c = D: ∫₀^D √(P ln(D/ε)) dε = D·√P·Γ(3/2) = D·√P·√π/2
    closed_form = 12 / math.sqrt(100) * 2.0 * math.sqrt(7) * math.sqrt(math.pi) / 2
    assert dudley_rademacher([(7.0, 2.0)], 2.0, 100) == pytest.approx(closed_form, rel=1e-6)
    # icl_rank.md §B3 example: d = k = r = 5, all norm bounds 1, a = √5 → R̂ ≈ 9.4, 2.96, 0.94
    terms, diameter = b3_terms(torch.eye(5) * 1.0, torch.eye(5), torch.eye(5)[0], 1.0)
    assert diameter == pytest.approx(1.0)
    got = [dudley_rademacher(terms, diameter, n) for n in (10 ** 3, 10 ** 4, 10 ** 5)]
    assert got == pytest.approx([9.4, 2.96, 0.94], rel=0.02)


def test_b3_terms_follow_the_stated_constants():
    bx, readout = 1.5, torch.tensor([2.0, 0.0, 0.0])
    terms, diameter = b3_terms(torch.eye(3), 3 * torch.eye(3)[:, :2], readout, bx)
    a_qk, a_v, b_v, b_w = math.sqrt(3), 3 * math.sqrt(2), 3.0, 2.0
    expected = [(7 * 3, 54 * a_qk * b_w * b_v * bx ** 3), (6 * 2, 27 * a_v * b_w * bx), (2, 9 * b_w * b_v * bx)]
    assert np.allclose(terms, expected)
    assert diameter == pytest.approx(b_w * b_v * bx)
    # a rank-1 (4 × 2) matrix readout with Frobenius norm 5 is covered like W_V: P = (4+2+1)·1
    matrix_readout = torch.zeros(4, 2)
    matrix_readout[0, 0] = 5.0
    terms, _ = b3_terms(torch.eye(3), 3 * torch.eye(3)[:, :2], matrix_readout, bx)
    assert np.allclose(terms[2], (7.0, 27 * 5.0 * b_v * bx))


def test_edelman_proxy_and_schatten_contributions_on_diagonal_matrices():
    # diagonal matrices: spectral norm = max |d_i| and ‖·‖_{2,1} = Σ |d_i|
    qk, ov = np.diag([2.0, 1.0]), np.diag([0.5, 0.5])
    m_in, m_out = np.diag([3.0, 1.0]), np.diag([1.0, 1.0])
    one = LayerMatrices([qk], [ov], m_in, m_out)
    xi = (1 * 3 * 0.5 * 3.0) ** (2 / 3) + (1 * 3 * 1.0) ** (2 / 3) + (1 * 4.0) ** (2 / 3) + 2.0 ** (2 / 3)
    assert edelman_norm_proxy([one], 1.13) == pytest.approx((1 + xi) ** 1.5)
    # two layers: α⁰ = L_φ·C₂(M_in¹)·C₂(M_out¹)·C₂(Ṽ¹)·(1 + 4·C₂(QK¹)) = 1.13·3·1·0.5·9
    alpha0 = 1.13 * 3 * 0.5 * 9
    assert edelman_norm_proxy([one, one], 1.13) == pytest.approx((1 + alpha0 ** (2 / 3) * xi + xi) ** 1.5)
    s = np.array([4.0, 1.0, 0.0])
    assert schatten_contribution(s, 0.0, 7.0, 16) == pytest.approx(math.sqrt(2 * 16))       # √(rank·N)
    assert schatten_contribution(s, 2.0, 7.0, 16) == pytest.approx(math.sqrt(math.sqrt(17)) * math.sqrt(7) * 16 ** 0.75)


def test_attention_layers_come_from_the_model():
    """lipschitz_gpt's separate q/k/v/o and the mlp (no attention) through ``model.attention_layers()``."""
    model = build_model({**CFG, "model": "lipschitz_gpt", "attn_scale": 2.0}, 30)
    layers = find_attention(model)
    assert [layer.name for layer in layers] == ["blocks.0.attn", "blocks.1.attn"]
    attn, layer = model.blocks[1].attn, layers[1]
    for found, weight in ((layer.q, attn.q), (layer.k, attn.k), (layer.v, attn.v), (layer.out, attn.o),
                          (layer.mlp_in, model.blocks[1].mlp.up), (layer.mlp_out, model.blocks[1].mlp.down)):
        assert torch.equal(found, weight.weight.double())
    assert layer.scale == 2.0 / 8 and layer.n_heads == 4 and layer.input_proj is attn.q
    assert find_attention(build_model(run_defaults(model="mlp", in_features=4, d_model=8, n_layers=2), 3)) == []


def test_attention_input_norm_is_the_largest_token_l2_norm():
    """B_X is max over tokens of ‖x_t‖₂ of the attention input: tokens (3, 4) and (1, 1) give 5, not the
    largest entry 4."""
    from types import SimpleNamespace

    from lipflow.evaluation.rank import attention_input_norms

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Embedding.from_pretrained(torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, -2.0]]))
            self.proj = torch.nn.Linear(2, 2)

        def forward(self, idx):
            return self.proj(self.tok(idx))

    net = Net()
    layer = SimpleNamespace(input_proj=net.proj)
    both = torch.tensor([[1, 2, 0, 1], [2, 2, 1, 1]])   # the last column is the label, never fed
    assert attention_input_norms(net, [layer], both, 1, torch.device("cpu")) == [pytest.approx(5.0)]
    without = torch.tensor([[1, 2, 1, 0]])               # token 0 only as the label: max(√2, 2) = 2
    assert attention_input_norms(net, [layer], without, 1, torch.device("cpu")) == [pytest.approx(2.0)]
