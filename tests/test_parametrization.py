"""Parametrizations: µP coordinate check, the multipliers per optimizer, depth-µP."""

from __future__ import annotations

import math

import pytest
import torch

from lipflow.model import build_model
from lipflow.parametrization import UPDATE_GEOMETRY
from lipflow.registry import UnknownNameError

VOCAB, CONTEXT, BATCH = 32, 8, 8
WIDTHS = (64, 128, 256, 512)


def lm_cfg(model: str, parametrization: str, width: int, **extra) -> dict:
    return {"model": model, "d_model": width, "n_layers": 2, "n_heads": 4, "context": CONTEXT, "mlp_ratio": 4,
            "parametrization": parametrization, "base_width": 64, "optimizer": "adamw", **extra}


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
    cfg = {"model": "mlp", "in_features": 20, "d_model": 128, "n_layers": 3, "parametrization": "mup",
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
    from lipflow.optimizers import OPTIMIZERS, build_optimizer

    assert set(UPDATE_GEOMETRY.names()) == set(OPTIMIZERS.names())
    for name in UPDATE_GEOMETRY:
        cfg = lm_cfg("lipschitz_gpt", "mup", 128, optimizer=name, lr=0.1)
        model = build_model(cfg, VOCAB)
        optimizer = build_optimizer(model, cfg)
        geometry = UPDATE_GEOMETRY.get(name)
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
