"""bench/reference_side_by_side.py's data plumbing: both implementations must see the same tokens."""

from __future__ import annotations

import numpy as np
import torch

from bench.common import reference_run, run_configs
from bench.reference_side_by_side import (POINTS, SETTINGS, TRACKERS, lipflow_name, lipflow_overrides,
                                          reference_config, reference_function, reference_split, train_starts,
                                          val_windows, weight_norms, write_shards)
from lipflow.config import run_defaults
from lipflow.data.loader import TokenShards
from lipflow.model import build_model

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


def test_shards_hold_the_reference_split_and_windows_match_lipflow_s(tmp_path):
    chars, train, val = reference_split(TEXT)
    assert chars == sorted(set(TEXT)) and len(train) == int(len(TEXT) * 0.9) and len(train) + len(val) == len(TEXT)
    assert "".join(chars[i] for i in np.concatenate([train, val])) == TEXT
    shards = write_shards(chars, train, val, tmp_path / "shards")
    lip_train, lip_val = TokenShards(shards, "train"), TokenShards(shards, "val")
    assert lip_train.vocab_size == len(chars)
    assert np.array_equal(lip_train.tokens(0, len(train)), train) and np.array_equal(lip_val.tokens(0, len(val)), val)
    assert np.array_equal(val_windows(val, 16, None), lip_val.sequential_windows(16).numpy())
    starts = train_starts(len(train), 16, 4, 3, seed=7)
    generator = torch.Generator().manual_seed(7)
    drawn = [lip_train.sample_starts(4, 16, generator).numpy() for _ in range(3)]
    assert np.array_equal(starts, np.stack(drawn))


def test_reference_trackers_name_every_lipschitz_gpt_weight_once():
    cfg = run_defaults(model="lipschitz_gpt", d_model=32, n_layers=2, n_heads=2, context=8)
    model = build_model(cfg, 11)
    trackers = ["embed", "out"] + [f"{t}{i}" for i in range(2) for t in TRACKERS]
    assert sorted(map(lipflow_name, trackers)) == sorted(name for name, _ in model.named_parameters())
    norms = weight_norms(dict(model.state_dict()))
    assert sorted(norms) == sorted(trackers)
    assert abs(norms["embed"] - 1.0) < 1e-5 and abs(norms["q0"] - 1.0) < 1e-4 and norms["w0"] == 0.0


def test_reference_function_compiles_one_function_out_of_a_file(tmp_path):
    source = tmp_path / "utils.py"
    source.write_text("import psutil_is_not_installed\n\ndef double(x):\n    return 2 * x\n")
    assert reference_function(source, "double", {})(21) == 42


# lipflow key → the reference notebook's key for the same setting
SHARED_KEYS = {"d_model": "d_embed", "n_layers": "num_blocks", "n_heads": "num_heads", "context": "seq_len",
               "batch_size": "batch_size", "steps": "steps", "lr": "lr", "momentum": "beta1", "beta1": "beta1",
               "beta2": "beta2",
               "weight_decay": "wd", "spectral_wd": "spectral_wd", "attn_scale": "softmax_scale",
               "logit_scale": "final_scale", "max_embed_inflation": "max_embed_inflation_factor",
               "grad_accum": "accum_steps", "schedule": "schedule", "sigma_max": "w_max"}


def test_both_implementations_get_the_same_settings_from_the_recipe_file():
    """Each side's config at every setting and point: lipflow's is experiments/reference.yaml's run
    at the setting's shape, and every setting both name has the same value on both sides."""
    recipe = reference_run()
    for setting in SETTINGS.values():
        for point, (project, _, constraint, _) in POINTS.items():
            lipflow = run_configs({}, {point: lipflow_overrides(setting, point, 50)})[point]
            reference = reference_config(setting, point, 50)
            assert {key: lipflow[key] for key in SHARED_KEYS} == {key: reference[other]
                                                                  for key, other in SHARED_KEYS.items()}
            assert lipflow["masses"]["blocks"] == reference["blocks_mass"]
            assert (lipflow["weight_constraint"], reference["project"]["default"]) == (constraint, project)
            kept = set(recipe) - set(setting) - {"weight_constraint", "sigma_max", "steps", "eval_every",
                                                 "eval_batches"}
            assert {key: lipflow[key] for key in kept} == {key: recipe[key] for key in kept}
