"""Run keys that apply to some runs only (the schema's descriptions say which): where a key does not
apply it changes no weight, bit for bit, and where it applies it does (so the first comparison is not
vacuous). The README's Configuration section states the first half: such a key is accepted, has no
effect and still enters the run id."""

import pytest
import torch

from conftest import documented_training
from lipflow.config import stage_run

GPT_ADAMW = {"model": "gpt", "optimizer": "adamw", "lr": 0.01}
LIPSCHITZ_MUON = {"model": "lipschitz_gpt", "optimizer": "muon", "lr": 0.05, "weight_constraint": "spectral_soft_cap"}
SCION = {"model": "gpt", "optimizer": "scion", "lr": 0.01}

# key: (a value other than the schema default, a run it does not apply to, a run it applies to)
SCOPED_KEYS = {
    "attn_scale": (2.0, GPT_ADAMW, LIPSCHITZ_MUON),
    "logit_scale": (8.0, GPT_ADAMW, LIPSCHITZ_MUON),
    "masses": ({"blocks": 4.0}, LIPSCHITZ_MUON, {**LIPSCHITZ_MUON, "parametrization": "modular"}),
    "base_width": (16, GPT_ADAMW, {**GPT_ADAMW, "parametrization": "mup"}),
    "momentum": (0.5, GPT_ADAMW, {**SCION, "optimizer": "uscg"}),
    "beta1": (0.5, SCION, GPT_ADAMW),
    "beta2": (0.5, SCION, GPT_ADAMW),
    "ns_steps": (3, SCION, LIPSCHITZ_MUON),
    "nesterov": (False, GPT_ADAMW, LIPSCHITZ_MUON),
    "update_scale": ("speedrun", SCION, LIPSCHITZ_MUON),
    "embed_optimizer": ("dualized", GPT_ADAMW, LIPSCHITZ_MUON),
    "adam_lr": (0.1, SCION, LIPSCHITZ_MUON),
    "max_embed_inflation": (1.0, LIPSCHITZ_MUON, {**LIPSCHITZ_MUON, "embed_optimizer": "dualized"}),
    "lmo_norms": ({"hidden": "sign"}, LIPSCHITZ_MUON, SCION),
    "lmo_radius": ({"hidden": 5.0}, GPT_ADAMW, SCION),
    "sigma_max": (0.5, {**LIPSCHITZ_MUON, "weight_constraint": "none"}, LIPSCHITZ_MUON),
    "spectral_wd": (0.5, LIPSCHITZ_MUON, {**LIPSCHITZ_MUON, "weight_constraint": "spectral_weight_decay"}),
}


def trained_weights(char_shards, tiny_run_config, overrides):
    """The weights after three steps of the trainer's documented loop (conftest.documented_training)."""
    return documented_training(char_shards, stage_run({**tiny_run_config, **overrides})).state_dict()


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("key", SCOPED_KEYS)
def test_a_key_changes_the_weights_only_where_it_applies(char_shards, tiny_run_config, key):
    value, inapplicable, applicable = SCOPED_KEYS[key]
    assert value != tiny_run_config[key]
    for run, applies in ((inapplicable, False), (applicable, True)):
        default = trained_weights(char_shards, tiny_run_config, run)
        changed = trained_weights(char_shards, tiny_run_config, {**run, key: value})
        assert same_weights(default, changed) is not applies, (key, run)
