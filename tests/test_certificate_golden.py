"""The certified numbers on saved weights equal those recorded before the certificate was made to compose.

tests/data/certificates/ holds, per model, weights after a few Muon steps from a random init
(``<name>.safetensors``) and ``golden.json``: each model's config and output multiplier, and the numbers
the code computed from those weights at commit 1b9edc6 (threaded by hand, before
lipflow/model/certificate.py): the ∞RMS and ℓ2 certificates, the body's constant, every activation bound,
precision's analytic bound and fp8 safety rows, and the rank evaluation's rows. The rank rows were
computed with the exact max GELU′ (``GELU_MAX_SLOPE``) in place of the 1.13 rank.py then used;
``rank_rows_with_1.13`` keeps the two proxies computed with 1.13 for the record (a regeneration drops it).

Every number must be reproduced bit for bit (==): the composed certificate multiplies and adds in the
same order as the hand-threaded one. One exception: the mlp's constant |output_mult|·Π σ_i is now
Π σ_i·|output_mult| (the multiplier is the last part of the sequence), equal within 1e-15 relative (one
rounding of the last product; exactly equal when output_mult is a power of two, e.g. 1).

Regenerate (only for a change that is meant to move the numbers): ``PYTHONPATH=. python3
tests/test_certificate_golden.py`` trains the models anew (torch's Muon may step differently in
another torch); ``… --keep-weights`` recomputes the numbers from the saved weights. The numbers were
so recomputed when the certificates' SVDs moved from float32 to float64 (the float32 σ_max fell
below the float64 one in about half of the matrices, by up to 3e-7 relative), and when the fp8 safety
verdicts moved to the bounds of the cast model (the rows' status texts; every verdict stayed); all else is
as above.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lipflow.config import evaluation_params, run_defaults
from lipflow.evaluation import EVALUATIONS, EvalContext
from lipflow.evaluation.number_formats import FORMATS
from lipflow.evaluation.precision import analytic_activation_bounds, fp8_safety_rows
from lipflow.model import build_model

DATA = Path(__file__).resolve().parent / "data" / "certificates"
GOLDEN = DATA / "golden.json"
FORMAT_NAMES = ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2"]
VOCAB, CLASSES, IN_FEATURES = 16, 5, 12
LM = {"model": "lipschitz_gpt", "d_model": 16, "context": 8, "mlp_ratio": 2, "attn_scale": 1.0, "logit_scale": 1.0,
      "activation": "gelu", "parametrization": "sp", "depth_mup": False, "optimizer": "muon"}
MLP = {"model": "mlp", "in_features": IN_FEATURES, "d_model": 24, "n_classes": CLASSES, "input_norm": 2.0,
       "activation": "gelu", "parametrization": "sp", "depth_mup": False, "optimizer": "muon"}
# name: (config, output_mult, whether embedding rows are projected back to RMS ≤ 1 after training)
MODELS = {
    "lgpt_h1_gelu_l1": ({**LM, "n_layers": 1, "n_heads": 1, "attn_scale": 4.0, "logit_scale": 2.0}, 1.0, True),
    "lgpt_h4_gelu_l3": ({**LM, "n_layers": 3, "n_heads": 4}, 0.3, False),
    "lgpt_h2_relu_l2": ({**LM, "n_layers": 2, "n_heads": 2, "activation": "relu", "attn_scale": 2.0}, 1.0, True),
    "gpt_h2_l2": ({"model": "gpt", "d_model": 16, "n_layers": 2, "n_heads": 2, "context": 8, "mlp_ratio": 2,
                   "parametrization": "sp", "depth_mup": False, "optimizer": "muon"}, 1.0, False),
    "mlp_gelu_l3": ({**MLP, "n_layers": 3}, 0.7, False),
    "mlp_relu_l2": ({**MLP, "n_layers": 2, "activation": "relu"}, 2.0, False),
}
SEQ_LENS = [None, 3]


def load_model(name: str, golden: dict):
    entry = golden["models"][name]
    model = build_model(entry["config"], CLASSES if entry["config"]["model"] == "mlp" else VOCAB)
    model.load_state_dict(load_file(DATA / f"{name}.safetensors"))
    model.output_mult = entry["output_mult"]
    return model.requires_grad_(False).eval()


def rank_rows(model, windows: torch.Tensor, cfg: dict) -> list[dict]:
    """The rank evaluation's rows that read the attention layers (the spectra of named parameters do not)."""
    params = evaluation_params("rank", rtols=[1e-3], n_train=len(windows))
    ctx = EvalContext(model, lambda count: windows[:count], windows, params, run_defaults(**cfg), 3.0, 3.25, torch.device("cpu"), None)
    return [r for r in EVALUATIONS.get("rank")(ctx) if r.get("matrix") in (None, "qk", "ov")]


def certified_numbers(model, cfg: dict, windows: torch.Tensor) -> dict:
    """Every number the certificate feeds: bounds, activation bounds, precision's safety rows, rank's rows."""
    seq_lens = [None] if cfg["model"] == "mlp" else SEQ_LENS  # the mlp's certificate has no sequence length
    numbers = {"lipschitz_bound": model.lipschitz_bound(),
               "lipschitz_bound_l2": {str(t): model.lipschitz_bound_l2(*([] if t is None else [t])) for t in seq_lens},
               "analytic_activation_bounds": analytic_activation_bounds(model),
               "fp8_safety_rows": fp8_safety_rows(model, [FORMATS.get(f) for f in FORMAT_NAMES])}
    if cfg["model"] == "lipschitz_gpt":
        numbers["body_lipschitz"] = model.body_lipschitz()
    if cfg["model"] == "mlp":
        numbers["activation_bounds_input_norm_5"] = model.activation_bounds(input_norm=5.0)
    else:
        numbers["rank_rows"] = rank_rows(model, windows, cfg)
    return numbers


def same(found, expected) -> bool:
    """Exact equality of nested JSON-like values (dict keys in the same order), NaN equal to NaN."""
    if isinstance(expected, float) and isinstance(found, float) and math.isnan(expected):
        return math.isnan(found)
    if isinstance(expected, dict) and isinstance(found, dict):
        return list(expected) == list(found) and all(same(found[k], expected[k]) for k in expected)
    if isinstance(expected, list) and isinstance(found, list):
        return len(found) == len(expected) and all(same(f, e) for f, e in zip(found, expected))
    return found == expected


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", list(MODELS))
def test_certified_numbers_equal_the_recorded_ones(golden, name):
    model = load_model(name, golden)
    windows = torch.tensor(golden["windows"])
    found = json.loads(json.dumps(certified_numbers(model, golden["models"][name]["config"], windows)))
    expected = golden["models"][name]["numbers"]
    assert list(expected) == list(found)
    reordered = {"lipschitz_bound", "lipschitz_bound_l2"} if name.startswith("mlp") else set()
    for key in expected:
        if key in reordered:
            assert found[key] == pytest.approx(expected[key], rel=1e-15, abs=0.0), key
        else:
            assert same(found[key], expected[key]), (key, found[key], expected[key])


def test_the_golden_models_are_trained_and_small(golden):
    """The weights left their init (the last layers start at zero) and all files stay small."""
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 300_000
    for name in MODELS:
        model = load_model(name, golden)
        assert all(p.abs().max() > 0 for p in model.parameters())
        if golden["models"][name]["config"]["model"] != "gpt":
            assert golden["models"][name]["numbers"]["lipschitz_bound"] > 0


def train(name: str, cfg: dict, output_mult: float, project: bool) -> torch.nn.Module:
    """Random init, then 8 steps of torch's Muon on the matrices (AdamW on the rest)."""
    torch.manual_seed(sorted(MODELS).index(name))
    model = build_model(cfg, CLASSES if cfg["model"] == "mlp" else VOCAB)
    model.output_mult = output_mult
    roles = model.param_roles()
    matrices = [p for _, p in roles["hidden"] + roles["head"]]
    others = [p for _, p in roles["embed"] + roles["vector"]]
    muon = torch.optim.Muon(matrices, lr=0.05)
    adam = torch.optim.AdamW(others, lr=0.05) if others else None
    for _ in range(8):
        if cfg["model"] == "mlp":
            x, y = torch.randn(32, IN_FEATURES), torch.randint(0, CLASSES, (32,))
            loss = torch.nn.functional.cross_entropy(model(x), y)
        else:
            seq = (torch.randint(0, VOCAB, (16, 1)) + torch.arange(cfg["context"] + 1)) % VOCAB
            loss = torch.nn.functional.cross_entropy(model(seq[:, :-1]).reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
        for opt in filter(None, (muon, adam)):
            opt.zero_grad()
        loss.backward()
        for opt in filter(None, (muon, adam)):
            opt.step()
        if project:
            model.project_embeddings()
    return model.requires_grad_(False).eval()


def write_golden() -> None:
    """Train every model, save its weights and record its certified numbers (see the module docstring)."""
    DATA.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1234)
    windows = torch.randint(0, VOCAB, (6, 9))
    golden = {"windows": windows.tolist(), "models": {}}
    for name, (cfg, output_mult, project) in MODELS.items():
        model = train(name, cfg, output_mult, project)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, DATA / f"{name}.safetensors")
        model = load_model(name, {"models": {name: {"config": cfg, "output_mult": output_mult}}})
        golden["models"][name] = {"config": cfg, "output_mult": output_mult,
                                  "numbers": certified_numbers(model, cfg, windows)}
    GOLDEN.write_text(json.dumps(golden) + "\n")


def recompute_numbers() -> None:
    """Record the certified numbers anew from the saved weights and windows (a change in the
    certificate's arithmetic), keeping everything else in golden.json."""
    golden = json.loads(GOLDEN.read_text())
    windows = torch.tensor(golden["windows"])
    for name, entry in golden["models"].items():
        entry["numbers"] = certified_numbers(load_model(name, golden), entry["config"], windows)
    GOLDEN.write_text(json.dumps(golden) + "\n")


if __name__ == "__main__":
    import sys

    recompute_numbers() if sys.argv[1:] == ["--keep-weights"] else write_golden()
