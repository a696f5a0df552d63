"""Parametrizations: µP coordinate check, the multipliers per optimizer, depth-µP."""

from __future__ import annotations

import math

import pytest
import torch

from lipflow.config import run_defaults
from lipflow.model import build_model
from lipflow.registry import UnknownNameError

VOCAB, CONTEXT, BATCH = 32, 8, 8
WIDTHS = (64, 128, 256, 512)


def lm_cfg(model: str, parametrization: str, width: int, **extra) -> dict:
    return run_defaults(**{"model": model, "d_model": width, "n_layers": 2, "n_heads": 4, "context": CONTEXT,
                           "mlp_ratio": 4, "parametrization": parametrization, "base_width": 64, "optimizer": "adamw",
                           **extra})


def activation_rms_after_adam(cfg: dict, lr: float, steps: int = 4) -> dict[str, float]:
    """Per-layer activation RMS on a fixed random batch after ``steps`` Adam steps at lr·p.lr_mult
    (mup's coord check: a large lr, a few steps, one batch)."""
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    opt = torch.optim.Adam([{"params": [p], "lr": lr * p.lr_mult} for p in model.parameters()])
    tokens = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.project_embeddings()
    model.record_activations = True
    with torch.no_grad():
        model(tokens[:, :-1])
    return {k: v for k, v in model.activation_stats.items() if k.endswith(".rms")}


@pytest.mark.parametrize("model", ["gpt", "lipschitz_gpt"])
def test_coordinate_check_adam_mup_is_flat_and_sp_grows(model):
    stats = {p: {w: activation_rms_after_adam(lm_cfg(model, p, w), lr=1e-2) for w in WIDTHS} for p in ("sp", "mup")}
    for key in stats["mup"][WIDTHS[0]]:
        mup = [stats["mup"][w][key] for w in WIDTHS]
        assert max(mup) / min(mup) < 2.0, f"µP {key} varies with width: {mup}"
    growth = max(stats["sp"][WIDTHS[-1]][k] / stats["sp"][WIDTHS[0]][k] for k in stats["sp"][WIDTHS[0]])
    assert growth > 3.0, f"SP activations should grow with width (×{growth:.2f} from 64 to 512)"


def multipliers(model) -> dict[str, float]:
    return {name: p.lr_mult for name, p in model.named_parameters()}


def test_mup_multipliers_depend_on_the_optimizer_geometry():
    width, m = 256, 4.0  # base_width 64
    adam = build_model(lm_cfg("lipschitz_gpt", "mup", width), VOCAB)
    for name, mult in multipliers(adam).items():
        assert mult == (1 / m if name.startswith("blocks.") else 1.0), name
    assert adam.output_mult == 1 / m and not adam.head.weight.any()
    for optimizer in ("muon", "scion", "uscg"):
        model = build_model(lm_cfg("lipschitz_gpt", "mup", width, optimizer=optimizer), VOCAB)
        assert set(multipliers(model).values()) == {1.0}
        assert model.output_mult == 1.0 and not model.head.weight.any()


def test_width_dimensions_come_from_shapes_not_roles():
    cfg = {**run_defaults(), "model": "mlp", "in_features": 20, "d_model": 128, "n_layers": 3, "parametrization": "mup",
           "base_width": 32, "optimizer": "adamw"}
    model = build_model(cfg, 10)
    # layers.0 is "hidden" for the optimizer, but its fan_in (20) does not grow: µP input weights keep lr
    assert multipliers(model) == {"layers.0.weight": 1.0, "layers.1.weight": 0.25, "layers.2.weight": 1.0}
    assert model.output_mult == 0.25


def test_sp_keeps_the_model_init_and_unit_multipliers():
    model = build_model(lm_cfg("gpt", "sp", 128), VOCAB)
    assert set(multipliers(model).values()) == {1.0}
    assert model.output_mult == 1.0 and model.head.weight.any()


@pytest.mark.parametrize("parametrization,width_mult", [("sp", 1.0), ("mup", 0.5)])
def test_depth_mup_scales_branches_and_hidden_lr_by_inverse_sqrt_depth(parametrization, width_mult):
    cfg = {**lm_cfg("gpt", parametrization, 128), "n_layers": 4, "depth_mup": True}
    model = build_model(cfg, VOCAB)
    assert all(block.branch_scale == 0.5 for block in model.blocks)
    for name, mult in multipliers(model).items():
        hidden = name.startswith("blocks.") and name.endswith(("qkv.weight", "out.weight", "up.weight", "down.weight"))
        assert mult == pytest.approx(width_mult * 0.5 if hidden else 1.0), name


def test_update_geometry_matches_how_the_optimizers_route_each_role():
    from lipflow.model.base import ROLES
    from lipflow.optimizers import OPTIMIZERS, build_optimizer, declares_geometry, update_geometry

    assert OPTIMIZERS.names() and all(set(update_geometry(name)) == set(ROLES) for name in OPTIMIZERS.names())
    with pytest.raises(ValueError, match="maps every role"):
        declares_geometry(hidden="normalized")
    for name in OPTIMIZERS.names():
        cfg = lm_cfg("lipschitz_gpt", "mup", 128, optimizer=name, lr=0.1)
        model = build_model(cfg, VOCAB)
        optimizer = build_optimizer(model, cfg)
        geometry = update_geometry(name)
        for group in optimizer.param_groups:
            entrywise = (isinstance(optimizer, torch.optim.AdamW) or group.get("kind") == "adamw")
            assert geometry[group["role"]] == ("entrywise" if entrywise else "normalized"), (name, group["role"])
            if group.get("kind") != "adamw":  # Muon's AdamW half runs at adam_lr
                assert all(group["lr"] == pytest.approx(0.1 * p.lr_mult) for p in group["params"])


def test_bad_parametrization_configs_fail_clearly():
    with pytest.raises(UnknownNameError, match="did you mean 'mup'"):
        build_model(lm_cfg("gpt", "mpu", 64), VOCAB)
    cfg = lm_cfg("gpt", "mup", 64)
    del cfg["optimizer"]
    with pytest.raises(ValueError, match="optimizer"):
        build_model(cfg, VOCAB)
    with pytest.raises(UnknownNameError, match="optimizer"):
        build_model(lm_cfg("gpt", "mup", 64, optimizer="sgd"), VOCAB)
    assert math.isclose(build_model(lm_cfg("gpt", "mup", 64), VOCAB).output_mult, 1.0)


def modular_gpt_multipliers(blocks_mass: float | None, **extra) -> dict[str, float]:
    masses = None if blocks_mass is None else {"blocks": blocks_mass}
    cfg = {**lm_cfg("lipschitz_gpt", "modular", 256), "n_layers": 3, "masses": masses, **extra}
    return multipliers(build_model(cfg, VOCAB))


@pytest.mark.parametrize("blocks_mass", [None, 16.0, 32.0])
def test_modular_multipliers_follow_masses_and_downstream_sensitivity(blocks_mass):
    """The d 256, 3-block table by hand (lr 1): total mass M = 1 + m_b + 1; every block and the head
    have sensitivity 1 (convex residual (1−α) + α·1; attention ⅓·(1 + 2) = 1), so embed and head get
    1/M. Each of the 3 blocks has 6 weights: an atom's share of the stack is m_b/(18·M); the residual's
    Mul(α = 1/6) divides it by α; in attention W_o gets ¼ of the branch and (V, scores) ¾ divided by
    the ⅓ downstream, split ⅓ V, ⅔ scores (Q, K half each); in the MLP each Linear gets ½."""
    m_b = 16.0 if blocks_mass is None else blocks_mass
    total, alpha = 2.0 + m_b, 1.0 / 6.0
    attn_branch, mlp_branch = 4 * m_b / (18 * total) / alpha, 2 * m_b / (18 * total) / alpha
    qkv, out = attn_branch * 3 / 4 / (1 / 3) / 3, attn_branch / 4
    closed_form = (8 / 9, 8 / 27, 8 / 27) if m_b == 16 else (16 / 17, 16 / 51, 16 / 51)
    assert (qkv, out, mlp_branch / 2) == pytest.approx(closed_form)
    expected = {"tok.weight": 1 / total, "head.weight": 1 / total}
    for i in range(3):
        expected |= {f"blocks.{i}.attn.{n}.weight": qkv for n in "qkv"}
        expected |= {f"blocks.{i}.attn.o.weight": out, f"blocks.{i}.mlp.up.weight": mlp_branch / 2,
                     f"blocks.{i}.mlp.down.weight": mlp_branch / 2}
    got = modular_gpt_multipliers(blocks_mass)
    assert got == pytest.approx(expected, rel=1e-12)
    rounded = {round(got["tok.weight"], 4), round(got["blocks.0.attn.q.weight"], 3),
               round(got["blocks.2.mlp.up.weight"], 3)}
    assert rounded == ({0.0556, 0.889, 0.296} if m_b == 16 else {0.0294, 0.941, 0.314})


def test_modular_multipliers_of_the_unscaled_model_divide_by_each_downstream_residual():
    """lipschitz_gpt_unscaled (every Mul the identity, the reference's laker-coupling branch), d 256, 3 blocks,
    blocks mass 32, total M = 34: attention has sensitivity 1 + 2 = 3 (no ⅓), so its residual 1 + 3 = 4,
    the MLP's residual 1 + 1 = 2 and a block 8. Block i (of 3) gets (32/M)/3 divided by 8 per later
    block; in it attention gets ⅔ of that divided by the MLP residual's 2, split equally over q, k, v,
    o (o: ¼; (V, scores): ¾ over a sensitivity-1 output, v ⅓ of it, q and k ⅓ each), the MLP ⅓ split
    ½ / ½. The embedding gets 1/M divided by 8³, the head 1/M."""
    m_b, total = 32.0, 34.0
    expected = {"tok.weight": 1 / total / 8 ** 3, "head.weight": 1 / total}
    for i in range(3):
        block = m_b / total / 3 / 8 ** (2 - i)
        expected |= {f"blocks.{i}.attn.{n}.weight": block * (4 / 6) / 2 / 4 for n in "qkvo"}
        expected |= {f"blocks.{i}.mlp.{n}.weight": block * (2 / 6) / 2 for n in ("up", "down")}
    got = modular_gpt_multipliers(m_b, model="lipschitz_gpt_unscaled")
    assert got == pytest.approx(expected, rel=1e-12)
    assert got["blocks.2.mlp.up.weight"] == pytest.approx(16 / 306)  # 6× below the Modula GPT's 16/51


def test_modular_multipliers_see_the_attention_scale_logit_scale_and_mlp_depth():
    base = modular_gpt_multipliers(16.0)
    # softmax scale s: the scores branch has sensitivity 2s, so q, k get 1/s; ⅓·(1 + 2s) ≠ 1 then
    # changes the block's sensitivity, and with it the embedding's share
    scaled = modular_gpt_multipliers(16.0, attn_scale=2.0)
    assert scaled["blocks.2.attn.q.weight"] == pytest.approx(base["blocks.2.attn.q.weight"] / 2)
    assert scaled["blocks.2.attn.v.weight"] == pytest.approx(base["blocks.2.attn.v.weight"])
    assert scaled["tok.weight"] < base["tok.weight"] and scaled["head.weight"] == pytest.approx(base["head.weight"])
    # Modula's final_scale: Mul(c) after the head divides every target by c
    tempered = modular_gpt_multipliers(16.0, logit_scale=4.0)
    assert tempered == pytest.approx({k: v / 4 for k, v in base.items()})
    for n_layers, expected in ((3, [1 / 3] * 3), (1, [1.0])):
        cfg = run_defaults(model="mlp", in_features=20, d_model=32, n_layers=n_layers, parametrization="modular")
        assert list(multipliers(build_model(cfg, 10)).values()) == pytest.approx(expected)
    cfg = {**run_defaults(), "model": "mlp", "in_features": 20, "d_model": 32, "n_layers": 3, "parametrization": "modular",
           "masses": {"blocks": 6.0, "head": 2.0}}
    assert list(multipliers(build_model(cfg, 10)).values()) == pytest.approx([3 / 8, 3 / 8, 1 / 4])


def test_modular_refuses_models_without_a_lipschitz_structure_and_unknown_parts():
    with pytest.raises(ValueError, match="parametrization: 'modular' needs a model with a Lipschitz structure"):
        build_model(lm_cfg("gpt", "modular", 64), VOCAB)
    cfg = {**run_defaults(), "model": "mlp", "in_features": 20, "d_model": 32, "n_layers": 3, "parametrization": "modular",
           "masses": {"embed": 1.0}}
    with pytest.raises(ValueError, match="masses: model 'mlp' has no part embed"):
        build_model(cfg, 10)


@pytest.mark.parametrize("d_model", [64, 256])
def test_mup_readout_multiplier_is_one_where_the_readout_has_no_width_dimension(d_model):
    """mup's MuReadout divides by fan_in/base_fan_in: a one-layer mlp (in_features → n_classes) has no
    dimension that grows with d_model, so its logits must not shrink by base_width/d_model (they did: 0.25 at
    d_model 256, the same (3, 10) model as at 64). A two-layer mlp's readout reads the width: 1/m."""
    one = build_model(run_defaults(model="mlp", d_model=d_model, n_layers=1, parametrization="mup",
                                   optimizer="adamw", base_width=64, in_features=10, n_classes=3), 3)
    two = build_model(run_defaults(model="mlp", d_model=d_model, n_layers=2, parametrization="mup",
                                   optimizer="adamw", base_width=64, in_features=10, n_classes=3), 3)
    assert one.output_mult == 1.0
    assert two.output_mult == pytest.approx(64 / d_model)
