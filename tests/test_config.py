"""Config validation: every violation is one line naming the key path; run ids follow the config."""

import copy
import json
import re

import pytest
import yaml

from lipflow.config import ConfigError, check_config
from lipflow.config.runs import LANGUAGE_MODELS
from lipflow.plan import resolve_runs
from lipflow.registry import Registry, UnknownNameError


def resolved(config):
    config = copy.deepcopy(config)
    check_config(config)
    return config


@pytest.mark.parametrize("config, expected", [
    ({"runs": {"a": {"lrr": 0.1}}}, "unknown key 'runs.a.lrr' (did you mean 'lr'?)"),
    ({"corpus": {"sorce": "files"}}, "unknown key 'corpus.sorce' (did you mean 'source'?)"),
    ({"runs": {"a": {"lr": -1}}}, "runs.a.lr: -1 is less than or equal to the minimum of 0"),
    ({"runs": {"a": {"lr": 1e308}}}, "runs.a.lr: 1e+308 is greater than the maximum of 1e+30"),
    ({"runs": {"a": {"sigma_max": 0}}}, "runs.a.sigma_max: 0 is less than the minimum of 1e-30"),
    ({"runs": {"a": {"sigma_max": 1e-310}}}, "runs.a.sigma_max: 1e-310 is less than the minimum of 1e-30"),
    ({"runs": {"a": {"max_embed_inflation": 1e-300}}}, "runs.a.max_embed_inflation: 1e-300 is less than the minimum of 1e-30"),
    ({"runs": {"a": {"steps": 0}}}, "runs.a.steps: 0 is less than the minimum of 1"),
    ({"runs": {"a": {"seed": 2**70}}}, "runs.a.seed: 1180591620717411303424 is greater than the maximum of 4294967295"),
    ({"evaluations": {"robustness": {"seed": 2**40}}}, "evaluations.robustness.seed: 1099511627776 is greater than"),
    ({"runs": {"a": {"d_model": "wide"}}}, "runs.a.d_model: 'wide' is not of type 'integer'"),
    ({"runs": {"a": {"optimizer": "adam"}}}, "runs.a.optimizer: 'adam' is not one of adamw, muon, scion, uscg"),
    ({"runs": {"a'; drop table runs; --": {}}}, "is not allowed"),
    ({"runs": {"../../etc": {}}}, "is not allowed"),
    ({"defaults": {"lr": 0}}, "lr: 0 is less than or equal to the minimum of 0"),
    ({"tokenizer": {"kind": "word"}}, "tokenizer.kind: 'word' is not one of char, bpe, file"),
    ({"runs": {"a\n": {}}}, "runs: 'a\\n' is not allowed"),
    ({"corpus": {"name": "pydoc\n"}}, "corpus.name: 'pydoc\\n' is not allowed"),
    ({"runs": {"a": {"lr": float("nan")}}}, "runs.a.lr: nan is not a finite number"),
    ({"runs": {"a": {"sigma_max": float("inf")}}}, "runs.a.sigma_max: inf is not a finite number"),
    ({"defaults": {"weight_decay": float("inf")}}, "weight_decay: inf is not a finite number"),
    ({"corpus": {"val_fraction": float("nan")}}, "corpus.val_fraction: nan is not a finite number"),
    ({"evaluations": {"robustness": {"epsilons": [0.1, float("nan")]}}},
     "evaluations.robustness.epsilons.1: nan is not a finite number"),
    ({"runs": {"a": {"d_model": 64, "n_heads": 3}}}, "runs.a.n_heads: 3 does not divide d_model 64"),
    ({"runs": {"a": {"steps": 20, "warmup_steps": 500}}},
     "runs.a.warmup_steps: 500 is more than the run's 20 steps, so its lr would never reach lr (it peaks at 0.04·lr)"),
    ({"defaults": {"warmup_steps": 21}, "runs": {"a": {"steps": 20}}}, "defaults.warmup_steps (given to runs.a): 21"),
    ({"corpus": {"source": "embedded", "paths": ["x.txt"]}}, "corpus.paths must be empty for corpus.source 'embedded'"),
    ({"corpus": {"source": "files"}}, "corpus.paths is empty; corpus.source 'files' needs a path or glob"),
    ({"tokenizer": {"kind": "file"}}, "tokenizer.path is required when tokenizer.kind is 'file'"),
    ({"runs": {"a": {"model": "mlp"}}}, "runs.a.model: 'mlp' is the image classifier"),
    ({"runs": {"a": {"model": "lipschitz_gpt", "d_model": 20, "n_heads": 4}}},
     "runs.a.n_heads: lipschitz_gpt needs an even head width (RoPE rotates pairs), d_model 20 / n_heads 4 is odd"),
    ({"runs": {"a": {"model": "lipschitz_gpt_unscaled", "depth_mup": True}}}, "runs.a.depth_mup: lipschitz_gpt_unscaled"),
    ({"runs": {"a": {"model": "gpt", "parametrization": "modular"}}},
     "runs.a.parametrization: 'modular' needs a model with a Lipschitz structure (lipschitz_gpt, lipschitz_gpt_unscaled)"),
    ({"runs": {"a": {"experiment": "lr_transfer"}}}, "runs.a.experiment: set by experiment expansion"),
    ({"runs": {"a": {"model": "gpt", "activation": "relu"}}}, "runs.a.activation: gpt's MLP is nanoGPT's GELU"),
    ({"defaults": {"experiment": "nonsense"}, "runs": {"a": {}}},
     "defaults.experiment (given to runs.a): set by experiment expansion"),
    # keys YAML reads as no string (`1:`, `yes:`, `null:`) are named by their text (were a TypeError traceback)
    ({"defaults": {"steps": 5}, "runs": {1: {}}}, "runs: 1 is not of type 'string'"),
    ({"defaults": {1: 2}}, "unknown key 'defaults.1'; allowed here: activation"),
    ({"runs": {"a": {"masses": {1: 2.0, "blockz": 1.0}}}}, "unknown key 'runs.a.masses.1'; allowed here: blocks"),
    ({"evaluations": {True: {}}}, "unknown key 'evaluations.True'; allowed here: enabled"),
    ({None: 1}, "unknown key 'None'; allowed here: corpus"),
    ({"icl": {"sigma": {1: 2}}}, "unknown key 'icl.sigma.1'; allowed here: eigenvalues"),
])
def test_bad_config_is_one_line_naming_the_key(config, expected):
    with pytest.raises(ConfigError) as err:
        check_config(config)
    message = str(err.value)
    assert "\n" not in message
    assert expected in message


def test_a_warmup_as_long_as_the_run_is_taken_and_reaches_the_lr_at_the_last_step():
    from lipflow.schedules import lr_factor
    check_config({"runs": {"a": {"steps": 20, "warmup_steps": 20}}})
    assert lr_factor("cosine", 19, 20, 20) == 1.0


@pytest.mark.parametrize("run, expected", [
    ({"d_model": 10**26, "n_heads": 1}, "runs.a.d_model: 100000000000000000000000000 is greater than the maximum of 16777216"),
    ({"n_heads": 2**30}, "runs.a.n_heads: 1073741824 is greater than the maximum of 16777216"),
    ({"context": 2**30}, "runs.a.context: 1073741824 is greater than the maximum of 16777216"),
    ({"base_width": 2**30}, "runs.a.base_width: 1073741824 is greater than the maximum of 16777216"),
    ({"n_layers": 2**63}, "runs.a.n_layers: 9223372036854775808 is greater than the maximum of 281474976710656"),
    ({"mlp_ratio": 2**63}, "runs.a.mlp_ratio: 9223372036854775808 is greater than the maximum of 281474976710656"),
    ({"batch_size": 2**63}, "runs.a.batch_size: 9223372036854775808 is greater than the maximum of 281474976710656"),
    ({"steps": 10**26}, "runs.a.steps: 100000000000000000000000000 is greater than the maximum of 281474976710656"),
    ({"train_tokens": 2**63}, "runs.a.train_tokens: 9223372036854775808 is greater than the maximum of 281474976710656"),
    ({"nproc": 5000}, "runs.a.nproc: 5000 is greater than the maximum of 4096"),
    ({"weight_constraint": "spectral_hard_cap", "sigma_max": 1e40},
     "runs.a.sigma_max: 1e+40 is greater than the maximum of 1e+30"),
    ({"optimizer": "scion", "lmo_radius": {"hidden": 1e20}},
     "runs.a.lmo_radius.hidden: 1e+20 is greater than the maximum of 100000000"),
])
def test_sizes_and_scales_no_run_can_use_are_one_line_naming_the_key(run, expected):
    """Sizes torch cannot hold (a d_model of 1e26 overflowed torch.empty in the train job), a σmax
    beyond fp32 (the hard cap's clamp overflowed) and a Scion radius whose lr·ρ leaves fp32 are
    refused before any job runs; the train stage's --config-json is checked the same way."""
    from lipflow.config import run_defaults, stage_run

    with pytest.raises(ConfigError) as err:
        check_config({"runs": {"a": run}})
    assert "\n" not in str(err.value) and expected in str(err.value)
    with pytest.raises(ConfigError) as err:
        stage_run({**run_defaults(), **run})
    assert "\n" not in str(err.value) and expected.replace("runs.a.", "--config-json.") in str(err.value)


def test_every_integer_of_the_config_schema_has_a_maximum():
    """No integer key is left unbounded: each states a maximum, itself or through a local $ref."""
    from lipflow.config import SCHEMA_PATH, load_schema

    schema = load_schema(SCHEMA_PATH)

    def bounded(node):
        ref = node.get("$ref", "")
        target = schema["$defs"][ref.split("/")[-1]] if ref.startswith("#/$defs/") else {}
        return "maximum" in node or "maximum" in target

    def unbounded(node, path):
        if isinstance(node, dict):
            types = node.get("type", [])
            if "integer" in (types if isinstance(types, list) else [types]) and not bounded(node):
                yield path
            for key, child in node.items():
                yield from unbounded(child, f"{path}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                yield from unbounded(child, f"{path}/{i}")

    assert list(unbounded(schema, "#")) == []


@pytest.mark.parametrize("model", LANGUAGE_MODELS)
def test_the_config_refuses_exactly_the_runs_the_model_refuses(model):
    """check_run states, without torch, the rules the model constructors and the parametrization
    enforce when the train job builds the model: over a grid of head widths, depth-µP and
    parametrizations, a run passes the config check if and only if its model builds."""
    import itertools

    from lipflow.model import build_model

    for (d_model, n_heads), depth_mup, parametrization in itertools.product(
            [(24, 4), (20, 4), (16, 16), (24, 3)], [False, True], ["sp", "mup", "modular"]):
        config = {"runs": {"a": {"model": model, "d_model": d_model, "n_heads": n_heads, "n_layers": 2,
                                 "context": 8, "depth_mup": depth_mup, "parametrization": parametrization}}}
        try:
            check_config(config)
            accepted = True
        except ConfigError:
            accepted = False
        run = config["runs"]["a"]
        try:
            build_model(run, 11)
            builds = True
        except ValueError:
            builds = False
        assert accepted == builds, (d_model, n_heads, depth_mup, parametrization)


def test_defaults_fill_and_runs_inherit_defaults_block():
    config = resolved({"defaults": {"d_model": 48, "steps": 7}, "runs": {"a": {"steps": 3}, "b": {}}})
    runs = {run_id.rsplit("-", 1)[0]: cfg for run_id, cfg in resolve_runs(config).items()}
    assert runs["a"]["d_model"] == 48 and runs["a"]["steps"] == 3
    assert runs["b"]["steps"] == 7
    assert runs["b"]["optimizer"] == "adamw"  # schema default
    assert config["corpus"]["source"] == "embedded"


def test_the_default_run_of_a_config_without_runs_inherits_defaults():
    """Without `runs`, the schema's default run (baseline) trained with the schema's settings: the
    config's `defaults` were dropped without a word."""
    runs = list(resolve_runs(resolved({"defaults": {"steps": 7, "d_model": 32}})).values())
    assert [(run["steps"], run["d_model"]) for run in runs] == [(7, 32)]


def test_sweep_validation_skips_no_check_and_fills_like_one_run_at_a_time():
    """Scalar values already validated are not validated again (a per-validator cache): filling a
    30-run sweep must equal filling each run with its own fresh validator (no cache hits across
    runs), and a bad value after the same key's good ones must still be caught."""
    from lipflow.config import make_validator
    from lipflow.config.runs import merge_run_defaults

    runs = {f"r{i}": {"seed": i, "lr": 0.01 * (1 + i % 3), "optimizer": ["adamw", "muon"][i % 2]}
            for i in range(30)}
    config = resolved({"defaults": {"steps": 5}, "runs": runs})
    reference = {"defaults": {"steps": 5}, "runs": copy.deepcopy(runs)}
    merge_run_defaults(reference)
    for name, run in reference["runs"].items():
        make_validator(fill=True).validate({"runs": {name: run}})
    assert config["runs"] == reference["runs"]
    for bad_value, message in [(-1, "runs.r29.lr: -1 is less than or equal"),
                               ("fast", "runs.r29.lr: 'fast' is not of type")]:
        bad = copy.deepcopy(runs)
        bad["r29"]["lr"] = bad_value
        with pytest.raises(ConfigError, match=message):
            check_config({"runs": bad})


def test_run_id_is_a_function_of_the_resolved_config():
    base = {"runs": {"a": {"lr": 0.01}}}
    ids = list(resolve_runs(resolved(base)))
    assert ids == list(resolve_runs(resolved(base)))
    assert ids[0].startswith("a-") and len(ids[0]) == len("a-") + 8
    changed_knob = list(resolve_runs(resolved({"runs": {"a": {"lr": 0.02}}})))
    changed_data = list(resolve_runs(resolved({**base, "tokenizer": {"kind": "bpe"}})))
    assert len({ids[0], changed_knob[0], changed_data[0]}) == 3
    # Spelling out a default does not change the id: the id hashes the *resolved* config.
    explicit = list(resolve_runs(resolved({"runs": {"a": {"lr": 0.01, "optimizer": "adamw"}}})))
    assert explicit == ids


def test_an_integer_written_for_a_number_key_gives_the_same_run_id_as_its_float():
    """``sigma_max: 1`` and ``sigma_max: 1.0`` train alike: one run config and one id (they had two)."""
    def ids(run, defaults=None):
        return list(resolve_runs(resolved({"defaults": defaults or {}, "runs": {"a": run}})))

    as_floats = {"sigma_max": 2.0, "lr": 1.0, "logit_scale": 8.0, "masses": {"blocks": 32.0}, "lmo_radius": {"head": 3.0}}
    as_ints = {"sigma_max": 2, "lr": 1, "logit_scale": 8, "masses": {"blocks": 32}, "lmo_radius": {"head": 3}}
    assert ids(as_ints) == ids(as_floats) == ids({}, defaults=as_ints)
    run = next(iter(resolve_runs(resolved({"runs": {"a": {**as_ints, "steps": 3}}})).values()))
    assert type(run["sigma_max"]) is float and type(run["masses"]["blocks"]) is float and type(run["steps"]) is int
    assert ids({"sigma_max": 2, "steps": 3}) != ids({"sigma_max": 2, "steps": 4})
    # masses {} gives no part a mass, as null does: one id (and a given mass still counts)
    modular = {"model": "lipschitz_gpt", "parametrization": "modular"}
    assert ids({**modular, "masses": {}}) == ids({**modular, "masses": None}) == ids(modular)
    assert ids({**modular, "masses": {"blocks": 8}}) != ids(modular)
    # the train stage run by hand (its --config-json) records the same config, and so the same checkpoint hash
    from lipflow.config import run_defaults, stage_run
    from lipflow.provenance import config_hash

    by_hand = stage_run({**run_defaults(), **as_ints, "steps": 3})
    assert by_hand == stage_run({**run_defaults(), **as_floats, "steps": 3}) == run
    assert type(by_hand["lmo_radius"]["head"]) is float and type(by_hand["steps"]) is int
    assert config_hash(by_hand) == config_hash(run)


def test_a_runs_mapping_key_replaces_the_defaults_mapping_whole():
    """As the README says: run overrides apply key by key, and a mapping value (lmo_radius) is one key."""
    config = {"defaults": {"optimizer": "scion", "lmo_radius": {"head": 3.0}},
              "runs": {"a": {"lmo_radius": {"hidden": 2.0}}, "b": {}}}
    runs = {run_id.split("-")[0]: run for run_id, run in resolve_runs(resolved(config)).items()}
    assert runs["a"]["lmo_radius"] == {"hidden": 2.0} and runs["b"]["lmo_radius"] == {"head": 3.0}
    assert runs["a"]["optimizer"] == runs["b"]["optimizer"] == "scion"


def test_shipped_configs_validate():
    for path in ("config.yaml", "tests/data/tiny_config.yaml"):
        config = yaml.safe_load(open(path))
        resolve_runs(resolved(config))


def overlay(base: dict, top: dict) -> dict:
    """Snakemake's --configfile merge (snakemake.utils.update_config): mappings merge, values replace."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = overlay(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def test_reference_recipe_overlay_validates_and_holds_the_notebook_values():
    recipe = yaml.safe_load(open("experiments/reference.yaml"))
    alone = resolve_runs(resolved(recipe))
    merged = resolve_runs(resolved(overlay(yaml.safe_load(open("config.yaml")), recipe)))
    (run_id, run), = alone.items()
    assert run_id.startswith("reference-") and merged[run_id] == run  # the same run either way
    notebook = {"model": "lipschitz_gpt", "d_model": 256, "n_layers": 3, "n_heads": 4, "context": 256,
                "batch_size": 512, "steps": 2000, "lr": 0.1, "sigma_max": 6.0, "optimizer": "muon",
                "weight_constraint": "spectral_soft_cap", "schedule": "linear", "parametrization": "modular",
                "masses": {"embed": 1.0, "blocks": 16.0, "head": 1.0}, "weight_decay": 0.0, "momentum": 0.9}
    assert {k: run[k] for k in notebook} == notebook


def test_appendix_d_overlay_is_the_reference_recipe_at_app_d_shape():
    """experiments/appendix_d.yaml: its runs are experiments/reference.yaml's run with App. D's batch,
    blocks mass and σ_max (and their own eval cadence); they differ from each other only in the model,
    the lr, the seed and σ_max; appd_gpt is config.yaml's baseline at the same shape and budget."""
    reference = resolve_runs(resolved(yaml.safe_load(open("experiments/reference.yaml"))))
    appendix = resolve_runs(resolved(yaml.safe_load(open("experiments/appendix_d.yaml"))))
    (reference_run,) = reference.values()
    runs = {run_id.rsplit("-", 1)[0]: run for run_id, run in appendix.items()}
    assert sorted(runs) == ["appd_gpt", "appd_s1_unscaled", "appd_s2", "appd_s2_lr03", "appd_s2_lr06",
                            "appd_s2_unscaled", "appd_s2_unscaled_s1", "appd_s3_unscaled"]
    app_d = {"batch_size": 64, "masses": {"embed": 1.0, "blocks": 32.0, "head": 1.0}, "sigma_max": 2.0,
             "eval_every": 250, "checkpoint_every": 500}
    assert runs["appd_s2"] == {**reference_run, **app_d}
    assert runs["appd_s2_lr03"] == {**runs["appd_s2"], "lr": 0.3}
    assert runs["appd_s2_lr06"] == {**runs["appd_s2"], "lr": 0.6}
    unscaled = runs["appd_s2_unscaled"]
    assert unscaled["model"] == "lipschitz_gpt_unscaled" and unscaled["lr"] > runs["appd_s2"]["lr"]
    assert {**unscaled, "model": "lipschitz_gpt", "lr": 0.1} == runs["appd_s2"]
    assert runs["appd_s2_unscaled_s1"] == {**unscaled, "seed": 1}
    assert runs["appd_s1_unscaled"] == {**unscaled, "sigma_max": 1.0}
    assert runs["appd_s3_unscaled"] == {**unscaled, "sigma_max": 3.0}
    baseline = resolve_runs(resolved(yaml.safe_load(open("config.yaml"))))  # config.yaml's baseline run
    (gpt_run,) = [run for run_id, run in baseline.items() if run_id.startswith("baseline-")]
    shape = {key: runs["appd_s2"][key] for key in ("d_model", "n_layers", "n_heads", "context", "mlp_ratio",
                                                   "batch_size", "grad_accum", "steps", "schedule", "warmup_steps",
                                                   "eval_batches", "seed")}
    assert runs["appd_gpt"] == {**gpt_run, **shape, "eval_every": 250, "checkpoint_every": 500}


JSON_SCHEMA_KEYWORDS = {"$schema", "$defs", "$ref", "title", "description", "type", "enum", "const", "default",
                        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern", "minLength",
                        "maxLength", "items", "minItems", "maxItems", "uniqueItems", "properties", "required",
                        "additionalProperties", "propertyNames", "minProperties", "allOf", "anyOf", "oneOf", "not"}


def schema_keys(schema: dict, path: str = "") -> list[tuple[str, str]]:
    """(path, key) for every key of every schema object in ``schema``, descending into subschemas."""
    found = []
    for key, value in schema.items():
        found.append((path, key))
        if key in ("properties", "$defs"):
            for name, sub in value.items():
                found += schema_keys(sub, f"{path}.{name}")
        elif key in ("items", "additionalProperties", "propertyNames", "not") and isinstance(value, dict):
            found += schema_keys(value, f"{path}[{key}]")
        elif key in ("allOf", "anyOf", "oneOf"):
            for i, sub in enumerate(value):
                found += schema_keys(sub, f"{path}[{key}{i}]")
    return found


@pytest.mark.parametrize("path", ["workflow/schemas/config.schema.yaml", "workflow/schemas/experiments.schema.yaml",
                                  "lipflow/studies/icl/config_schema.yaml"])
def test_every_key_of_a_schema_is_a_json_schema_keyword(path):
    """A plain YAML description with a comma inside a flow mapping ({description: lr after warmup, over the
    steps}) ends at the comma, and the rest becomes a key the validator ignores: schedule's description
    lost half, image_mlp.seed's two thirds."""
    strays = [f"{where or '/'}: {key!r}" for where, key in schema_keys(yaml.safe_load(open(path)))
              if key not in JSON_SCHEMA_KEYWORDS]
    assert strays == []


def test_the_conda_environment_holds_the_packages_pyproject_requires():
    """envs/lipflow.yaml (every rule's `conda:`) pins what pyproject.toml does, plus its tensorboard
    extra (a run may set tensorboard: true), and installs no path (Snakemake copies the file elsewhere)."""
    import tomllib

    project = tomllib.load(open("pyproject.toml", "rb"))["project"]
    env = yaml.safe_load(open("envs/lipflow.yaml"))
    (pip,) = [entry["pip"] for entry in env["dependencies"] if isinstance(entry, dict)]
    assert sorted(pip) == sorted(project["dependencies"] + project["optional-dependencies"]["tensorboard"])
    python = next(entry for entry in env["dependencies"] if isinstance(entry, str) and entry.startswith("python="))
    assert project["requires-python"] == ">=" + python.split("=")[1]


def test_registry_suggests_close_names():
    reg = Registry("constraint")
    reg.register("spectral_soft_cap")(object)
    with pytest.raises(UnknownNameError, match=r"unknown constraint 'spectral_softcap' \(did you mean 'spectral_soft_cap'\?\)"):
        reg.get("spectral_softcap")


@pytest.mark.parametrize("text, expected", [
    ("runs:\n  a: {lr: 0.1}\n  a: {lr: 0.2}\n", "at line 3, column 3: duplicate key 'a'"),
    ("defaults:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n", "at line 4, column 3: duplicate key 'lr'"),
    ("runs: {a: {lr: 0.1, lr: 0.2}}\n", "duplicate key 'lr'"),
])
def test_a_repeated_yaml_key_is_an_error_naming_it(tmp_path, text, expected):
    from lipflow.config import load_config_file

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config_file(tmp_path / "c.yaml")
    assert "\n" not in str(err.value) and "c.yaml" in str(err.value)


def test_snakemake_refuses_a_repeated_key_and_a_cross_key_error_before_any_job(tmp_path):
    """Snakemake's own config loading keeps the last value; the workflow rereads the file."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    for text, expected in [("runs:\n  a: {lr: 0.1}\n  a: {lr: 0.2}\n", "duplicate key 'a'"),
                           ("runs:\n  a: {n_heads: 5}\n", "runs.a.n_heads: 5 does not divide d_model 64")]:
        (tmp_path / "config.yaml").write_text(text)
        done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(tmp_path),
                               "--configfile", str(tmp_path / "config.yaml"), "-n", "-c1"],
                              capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stderr.splitlines() if line.startswith("lipflow:")]
        assert done.returncode != 0
        assert len(lines) == 1 and expected in lines[0], done.stderr


def test_a_config_value_that_cannot_be_built_is_one_line_naming_the_file(tmp_path):
    """An integer past Python's 4,300 digits (in YAML, or in JSON, which falls back to YAML) or a YAML
    date of month 13 raised a bare ValueError: one line naming no file."""
    from lipflow.config import load_config_file

    cases = {"big.yaml": "defaults:\n  steps: " + "1" * 5000 + "\n",
             "big.json": '{"defaults": {"steps": ' + "1" * 5000 + "}}",
             "date.yaml": "defaults:\n  seed: 2024-13-01\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=f"^{tmp_path / name}: a value that cannot be read"):
            load_config_file(tmp_path / name)


def test_a_config_file_larger_than_any_config_is_one_line_read_no_further(tmp_path, monkeypatch):
    """`lipflow runs --configfile /dev/zero` (or a data file given by mistake) read without end until the
    kernel killed it for memory: a config file is read up to MAX_CONFIG_BYTES, and a larger one is one
    line naming it (the limit is lowered here to keep the file small)."""
    import lipflow.config.schema
    from lipflow.config import load_config_file

    monkeypatch.setattr(lipflow.config.schema, "MAX_CONFIG_BYTES", 1000, raising=False)
    (tmp_path / "c.yaml").write_text("defaults:\n  steps: 3\n" + "# padding\n" * 200)
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'c.yaml'}: larger than 1,000 bytes") as err:
        load_config_file(tmp_path / "c.yaml")
    assert "\n" not in str(err.value)
    (tmp_path / "small.yaml").write_text("defaults:\n  steps: 3\n")
    assert load_config_file(tmp_path / "small.yaml") == {"defaults": {"steps": 3}}

def test_lipflow_runs_of_a_config_without_runs_prints_nothing(tmp_path, capsys, monkeypatch):
    """The robustness experiment with an empty grid trains no run (its study does the work): `lipflow runs`
    printed one empty line, which `lipflow runs | wc -l` counted as a run."""
    from lipflow.cli import main

    monkeypatch.chdir(tmp_path)  # no config.yaml here: the files named are the config
    (tmp_path / "c.yaml").write_text("experiments: [robustness]\n"
                                     "experiment_definitions: {robustness: {cpu: {grid: []}}}\n")
    assert main(["runs", "--configfile", str(tmp_path / "c.yaml")]) == 0
    assert capsys.readouterr().out == ""


def test_lipflow_runs_takes_config_values_as_snakemake_does(tmp_path, capsys, monkeypatch):
    """`lipflow runs --config experiments=[rank_vs_n]` lists the ids `snakemake --config experiments=[rank_vs_n]`
    trains: the values set over the files, parsed as Snakemake parses them. Without the option argparse read
    `--config` as an abbreviation of `--configfile` and said "config file experiments=[rank_vs_n] does not exist"."""
    from lipflow.cli import main

    monkeypatch.chdir(tmp_path)  # no config.yaml under the files
    (tmp_path / "c.yaml").write_text("runs:\n  a: {lr: 0.1}\n")
    (tmp_path / "overlay.yaml").write_text("experiments: [rank_vs_n]\n")
    assert main(["runs", "--configfile", str(tmp_path / "c.yaml"), str(tmp_path / "overlay.yaml")]) == 0
    from_files = capsys.readouterr().out
    assert main(["runs", "--configfile", str(tmp_path / "c.yaml"), "--config", "experiments=[rank_vs_n]"]) == 0
    assert capsys.readouterr().out == from_files and from_files.startswith("rank.")
    assert main(["runs", "--configfile", str(tmp_path / "c.yaml")]) == 0
    run_a = capsys.readouterr().out
    assert main(["runs", "--configfile", str(tmp_path / "c.yaml"), str(tmp_path / "overlay.yaml"),
                 "--config", "experiments=[]"]) == 0  # over the files, as Snakemake applies --config last
    assert capsys.readouterr().out == run_a and run_a.startswith("a-")
    assert main(["runs", "--configfile", str(tmp_path / "c.yaml"), "--config", "steps"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "name=value" in err


def test_a_json_config_file_is_read_as_json_as_snakemake_reads_it(tmp_path, monkeypatch):
    """json.dump writes 1e-05, which YAML reads as a string: `lipflow runs` refused a JSON config that
    Snakemake (which tries JSON first) accepts; a repeated key is still refused."""
    import json

    from lipflow.cli import main
    from lipflow.config import load_config_file

    monkeypatch.chdir(tmp_path)  # no config.yaml here: the files named are the config
    (tmp_path / "c.json").write_text(json.dumps({"runs": {"a": {"lr": 1e-05, "weight_decay": 1e-06}}}))
    assert load_config_file(tmp_path / "c.json") == {"runs": {"a": {"lr": 1e-05, "weight_decay": 1e-06}}}
    assert main(["runs", "--configfile", str(tmp_path / "c.json")]) == 0
    (tmp_path / "d.json").write_text('{"runs": {"a": {"lr": 0.1}, "a": {"lr": 0.2}}}')
    with pytest.raises(ConfigError, match="d.json: .*duplicate key 'a'"):
        load_config_file(tmp_path / "d.json")


@pytest.mark.parametrize("text, expected", [
    # YAML 1.1 reads an exponent without a dot (or without a sign) as text: the message says how to write it
    ("defaults:\n  lr: 3e-4\n", "defaults.lr: '3e-4' is not of type 'number' (YAML reads 3e-4 as text: write 3.0e-4,"),
    ("runs:\n  a:\n    weight_decay: 1E5\n", "runs.a.weight_decay: '1E5' is not of type 'number' (YAML reads 1E5 as "
     "text: write 1.0e+5,"),
    # what `snakemake --config 'defaults={steps: 5}'` and `--config runs_with_experiments=true` hand over
    ("defaults: {steps: '5'}\n", "defaults.steps: '5' is not of type 'integer' (a number read as text: unquote it in a "
     "config file; snakemake --config reads a value inside"),
    ("runs_with_experiments: 'true'\n", "runs_with_experiments: 'true' is not of type 'boolean' (a boolean read as text: "
     "write true or false in a config file; snakemake --config reads only True and False"),
    # text that is no number or boolean gets no such note
    ("defaults:\n  lr: fast\n", "defaults.lr: 'fast' is not of type 'number'$"),
    ("defaults:\n  lr: .nan\n", "defaults.lr: nan is not a finite number$"),
])
def test_a_number_or_boolean_read_as_text_says_how_to_write_it(tmp_path, text, expected):
    from lipflow.config import load_config_file

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        check_config(load_config_file(tmp_path / "c.yaml"))
    assert "\n" not in str(err.value)
    assert re.search(re.escape(expected).replace(r"\$", "$"), str(err.value)), str(err.value)
    if expected.endswith("$"):
        assert "(" not in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("defaults:\n  # steps: 5\n", "defaults: empty (null), not of type 'object': give it a value or leave the key out"),
    ("runs:\n  a:\n    lr:\n", "runs.a.lr: empty (null), not of type 'number': give it a value or leave the key out"),
])
def test_an_empty_yaml_value_is_named_as_yaml_writes_it(tmp_path, text, expected):
    """A block whose keys were all commented out is YAML's null: the error said Python's 'None is not of type
    'object'', a word the config file never holds."""
    from lipflow.config import load_config_file

    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        check_config(load_config_file(tmp_path / "c.yaml"))
    assert str(err.value).endswith(expected), str(err.value)


def test_lipflow_runs_reads_config_files_as_snakemake_does(tmp_path, capsys, monkeypatch):
    """A YTE template (`__use_yte__: true`), which Snakemake renders, gave `lipflow runs` an unknown key
    '__use_yte__'; a file of no keys, which Snakemake refuses, listed the other files' ids."""
    from lipflow.cli import main

    monkeypatch.chdir(tmp_path)  # no config.yaml here: the files named are the config
    (tmp_path / "template.yaml").write_text("__use_yte__: true\nruns:\n  a:\n    steps: ?2 + 1\n")
    (tmp_path / "plain.yaml").write_text("runs:\n  a:\n    steps: 3\n")
    ids = []
    for name in ("template.yaml", "plain.yaml"):
        assert main(["runs", "--configfile", str(tmp_path / name)]) == 0
        ids.append(capsys.readouterr().out.split())
    assert ids[0] == ids[1] and len(ids[0]) == 1
    (tmp_path / "empty.yaml").write_text("# every line a comment\n")
    assert main(["runs", "--configfile", str(tmp_path / "plain.yaml"), str(tmp_path / "empty.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lipflow: error: {tmp_path / 'empty.yaml'}: ") and err.count("\n") == 1, err


def test_lipflow_runs_lists_the_ids_snakemake_plans_for_the_same_overlays(tmp_path):
    """`lipflow runs --configfile overlay.yaml` read the overlay alone, where snakemake reads config.yaml of
    the working directory first (the Snakefile's `configfile:`): config.yaml's runs were missing and its
    defaults not in the ids. Snakemake merges the overlays first and config.yaml under them, so a key
    an overlay empties (`defaults:`, null) and a later one fills keeps config.yaml's other keys. Without
    config.yaml an overlay alone is the config; with neither both refuse in one line. Of several
    `--configfile` options both keep the last (the README says to list the files after one)."""
    import subprocess
    import sys

    from conftest import REPO, run_stage
    from lipflow.config import RUN_ID_PATTERN

    def planned(*overlays: str, repeated: bool = False) -> tuple[list[str], list[str]]:
        if repeated:
            configfile = [arg for overlay in overlays for arg in ("--configfile", overlay)]
        else:
            configfile = ["--configfile", *overlays] if overlays else []
        dry = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n", "-c1",
                              *configfile], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert dry.returncode == 0, dry.stderr[-3000:]
        listed = run_stage("lipflow.cli", "runs", *configfile, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        return sorted(set(re.findall(rf"wildcards: run=({RUN_ID_PATTERN})", dry.stdout))), sorted(listed.stdout.split())

    (tmp_path / "config.yaml").write_text("defaults: {steps: 7, eval_every: 7}\nruns: {a: {lr: 0.01}, b: {}}\n"
                                          "evaluations: {enabled: []}\n")
    (tmp_path / "overlay.yaml").write_text("runs: {a: {seed: 1}, c: {}}\n")
    (tmp_path / "empties.yaml").write_text("defaults:\n")
    (tmp_path / "fills.yaml").write_text("defaults: {lr: 0.02}\n")
    for overlays in [(), ("overlay.yaml",), ("config.yaml", "overlay.yaml"),
                     ("overlay.yaml", "empties.yaml", "fills.yaml")]:
        snakemake_ids, listed_ids = planned(*overlays)
        assert listed_ids == snakemake_ids and len(listed_ids) == (2 if not overlays else 3), (overlays, listed_ids)
    assert planned("overlay.yaml")[1] == planned("config.yaml", "overlay.yaml")[1] != planned()[1]
    snakemake_ids, listed_ids = planned("overlay.yaml", "fills.yaml", repeated=True)
    assert listed_ids == snakemake_ids == planned("fills.yaml")[1] != planned("overlay.yaml", "fills.yaml")[1]
    (tmp_path / "config.yaml").unlink()
    snakemake_ids, listed_ids = planned("overlay.yaml")
    assert listed_ids == snakemake_ids and [i.split("-")[0] for i in listed_ids] == ["a", "c"]
    listed = run_stage("lipflow.cli", "runs", cwd=tmp_path)
    assert listed.returncode == 2 and listed.stdout == "", listed
    assert listed.stderr == (f"lipflow: error: no config.yaml in the working directory {tmp_path}, which the "
                             "Snakefile reads (run from the checkout, or name config files with --configfile)\n")


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    """`<<: *anchor` then a key of the anchor is an override, not a repeated key."""
    from lipflow.config import load_config_file

    (tmp_path / "c.yaml").write_text("defaults: &d {steps: 5, lr: 0.01}\nruns:\n  a:\n    <<: *d\n    lr: 0.02\n")
    assert load_config_file(tmp_path / "c.yaml")["runs"]["a"] == {"steps": 5, "lr": 0.02}


@pytest.mark.parametrize("overlay", ["reference.yaml", "appendix_d.yaml"])
def test_the_overlay_command_in_the_experiment_file_plans_its_runs(overlay, tmp_path):
    """The `snakemake …` line in the header of experiments/<overlay>, run as written (with -n) in a
    checkout-shaped folder, plans exactly one train job per run of the overlay."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    header = [line[1:].strip() for line in (repo / "experiments" / overlay).read_text().splitlines()
              if line.startswith("#")]
    start = next(i for i, line in enumerate(header) if line.startswith("snakemake "))
    command = header[start]
    while command.endswith("\\"):
        start += 1
        command = command[:-1] + header[start]
    work = tmp_path / "lipflow"
    work.mkdir()
    for name in ("Snakefile", "workflow", "config.yaml", "experiments"):
        (work / name).symlink_to(repo / name)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "tinyshakespeare.txt").write_text("First Citizen:\nSpeak.\n")
    bin_dir = tmp_path / "bin"  # `snakemake` and `lipflow` as this interpreter runs them
    bin_dir.mkdir()
    for tool, module in (("snakemake", "snakemake"), ("lipflow", "lipflow.cli")):
        (bin_dir / tool).write_text(f"#!/bin/sh\nexec {sys.executable} -m {module} \"$@\"\n")
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(repo)}
    done = subprocess.run(["bash", "-c", f"{command} -n"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (command, done.stderr[-3000:])
    runs = yaml.safe_load((repo / "experiments" / overlay).read_text())["runs"]
    planned = re.findall(r"wildcards: run=(\S+)", done.stdout)
    assert sorted(run.rsplit("-", 1)[0] for run in planned) == sorted(runs), done.stdout[-3000:]


@pytest.mark.parametrize("method, key", [
    ({"optimizer": "muon", "ns_coefficients": "you", "ns_steps": 5}, "ns_steps"),
    ({"optimizer": "muon", "parametrization": "modular", "masses": {"embed": 3.0}}, "masses"),
    ({"optimizer": "adamw", "steps": 3000}, "steps"),
    ({"optimizer": "adamw", "schedule": "cosine"}, "schedule"),
    ({"optimizer": "muon", "depth_mup": True}, "depth_mup")])
def test_an_image_mlp_method_sets_only_its_optimizer_and_constraint(method, key):
    """A method of the image_mlp study passed the schema with any run key: the study ignored its steps,
    schedule or seed without a word, and a Newton–Schulz or masses mistake failed inside the study's job.
    Now the config check refuses them, naming the method's key; optimizer and constraint keys pass."""
    config = yaml.safe_load(open("config.yaml"))
    config["image_mlp"] = {"methods": {"m": method}}
    with pytest.raises(ConfigError, match=rf"^config error: image_mlp\.methods\.m\.{key}: "):
        check_config(config)
    config = yaml.safe_load(open("config.yaml"))
    config["image_mlp"] = {"methods": {"m": {"optimizer": "muon", "lr": 0.1, "ns_coefficients": "you", "ns_steps": 6,
                                             "weight_constraint": "spectral_soft_cap", "sigma_max": 2.0}}}
    check_config(config)


def test_the_image_mlp_seeds_end_at_the_largest_seed():
    """image_mlp.seeds counts seeds from image_mlp.seed; the last, seed + seeds − 1, must be a seed (scikit-learn's
    split takes random_state below 2^32): 4294967295 with one seed passes, with two it is refused in one line
    naming image_mlp.seeds, in the config check and in the study's own --config-json check."""
    from lipflow.studies.image_mlp import study_config

    config = yaml.safe_load(open("config.yaml"))
    config["image_mlp"] = {"seed": 4294967294, "seeds": 2}
    check_config(config)
    config["image_mlp"] = {"seed": 4294967295, "seeds": 2}
    with pytest.raises(ConfigError, match=r"^config error: image_mlp\.seeds: seeds 4294967295 … 4294967296 pass "
                                          r"the largest seed, 4294967295;"):
        check_config(config)
    with pytest.raises(ConfigError, match=r"^--config-json: image_mlp\.seeds: seeds 4294967295 … 4294967296"):
        study_config({"seed": 4294967295, "seeds": 2})
    assert study_config({"seed": 4294967295, "seeds": 1})["seeds"] == 1


def test_a_run_key_taken_from_defaults_is_named_where_it_was_written():
    """A cross-key rule broken by a key the run took from ``defaults`` names ``defaults.<key>`` (and the
    run it reached): it named runs.<run>.<key>, a key the user had not written there. A key the run
    sets itself is still named in the run."""
    config = yaml.safe_load(open("config.yaml"))
    config["defaults"] = {"depth_mup": True}
    with pytest.raises(ConfigError, match=r"^config error: defaults\.depth_mup \(given to runs\.lipschitz\): "):
        check_config(config)
    config = yaml.safe_load(open("config.yaml"))
    config["defaults"] = {"experiment": "lr_transfer"}
    with pytest.raises(ConfigError, match=r"^config error: defaults\.experiment \(given to runs\.baseline\): "):
        check_config(config)
    config = yaml.safe_load(open("config.yaml"))
    config["defaults"] = {"depth_mup": False}
    config["runs"]["lipschitz"]["depth_mup"] = True
    with pytest.raises(ConfigError, match=r"^config error: runs\.lipschitz\.depth_mup: "):
        check_config(config)


@pytest.mark.parametrize("name, written, same_as", [
    ("robustness", {"epsilons": [0.0, 0.1, 0.25, 0.5, 1.0, 2.0]}, {}),  # the default radii, written as floats
    ("robustness", {"epsilons": [0.0, 3.0], "lipschitz_radius": 1.0}, {"epsilons": [0, 3], "lipschitz_radius": 1}),
    ("rank", {"rtols": [0.01, 1.0], "bound_rtol": 1.0}, {"rtols": [0.01, 1], "bound_rtol": 1}),
    ("sharpness", {"tol": 2.0}, {"tol": 2}),
])
def test_a_whole_number_written_as_a_float_is_one_evaluation_params_string(name, written, same_as):
    """`epsilons: [0.0, 1.0]` and `[0, 1]` are one params string: the evaluation reads the same numbers, and
    a changed string reruns that evaluation for every run (it did, for every run of a sweep). The defaults'
    own spelling (`[0, 0.1, 0.25, 0.5, 1, 2]`) is the canonical one, so no existing result reruns."""
    from lipflow.config import SCHEMA_PATH, evaluation_params, validate
    from lipflow.plan import Plan

    def params_json(params):
        plan = Plan.from_config({"evaluations": {"enabled": [name], name: copy.deepcopy(params)}})
        return plan.evaluation_params_json(name)

    assert params_json(written) == params_json(same_as)
    assert evaluation_params(name, **written) == evaluation_params(name, **same_as)
    # the schema's defaults keep their params string, as a results tree recorded it
    filled = validate({"evaluations": {name: {}}}, SCHEMA_PATH)["evaluations"][name]
    assert params_json({}) == json.dumps(filled, sort_keys=True)


def test_an_integer_in_the_image_mlp_block_is_one_params_string_with_its_float():
    """`epsilons: [0, 0.5]` and a method's `sigma_max: 3` study the same as `[0.0, 0.5]` and `3.0` (the
    defaults' spelling); they gave another params string, which reran the digits-MLP study."""
    from lipflow.config import SCHEMA_PATH, validate
    from lipflow.plan import Plan

    def block_json(block):
        return Plan.from_config({"image_mlp": copy.deepcopy(block)}).config_block_json("image_mlp")

    ints = {"epsilons": [0, 0.5], "methods": {"m": {"optimizer": "muon", "lr": 0.05, "sigma_max": 3,
                                                        "weight_constraint": "spectral_soft_cap", "weight_decay": 0}}}
    floats = {"epsilons": [0.0, 0.5], "methods": {"m": {"optimizer": "muon", "lr": 0.05, "sigma_max": 3.0,
                                                          "weight_constraint": "spectral_soft_cap", "weight_decay": 0.0}}}
    assert block_json(ints) == block_json(floats)
    assert json.loads(block_json(ints))["methods"]["m"]["sigma_max"] == 3.0
    # the schema's defaults keep their params string, as a results tree recorded it
    assert block_json({}) == json.dumps(validate({"image_mlp": {}}, SCHEMA_PATH)["image_mlp"], sort_keys=True)


def test_the_readmes_name_rule_is_the_schemas():
    """The README's Bad config list named only the characters of $defs/name; a name that does not start with a
    letter or digit, or is longer than the pattern allows, is refused too, and the README did not say so."""
    from pathlib import Path

    from lipflow.config import SCHEMA_PATH

    pattern = yaml.safe_load(Path(SCHEMA_PATH).read_text(encoding="utf-8"))["$defs"]["name"]["pattern"]
    first, rest, most = re.fullmatch(r"\^\[([^\]]+)\]\[([^\]]+)\]\{0,(\d+)\}\$", pattern).groups()
    longest = 1 + int(most)
    assert first == "A-Za-z0-9"  # what "starting with a letter or digit" says
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rule = " ".join(readme.split("a name with a", 1)[1].split("a key repeated", 1)[0].split())
    assert f"`[{rest}]`" in rule and "not starting with a letter or digit" in rule, rule
    assert f"longer than {longest} characters" in rule, rule
    for name, allowed in (("a" * longest, True), ("a" * (longest + 1), False), ("_a", False), (".a", False)):
        if allowed:
            resolved({"runs": {name: {}}})
        else:
            with pytest.raises(ConfigError, match="is not allowed"):
                resolved({"runs": {name: {}}})


@pytest.mark.parametrize("name, reordered", [
    ("precision", {"formats": ["fp8_e5m2", "bf16", "fp8_e4m3", "fp16"], "scalings": ["per_tensor", "none"]}),
    ("rank", {"rtols": [0.001, 0.01]}),
    ("robustness", {"epsilons": [2, 1, 0.5, 0.25, 0.1, 0], "k_values": [4, 2, 1]}),
])
def test_a_reordered_unordered_evaluation_list_is_the_defaults_params_string(name, reordered):
    """Each (format, scaling) cast and each rank tolerance is computed on its own, so the order of `formats`,
    `scalings` and `rtols` changes only the order of the rows; another order gave another params string and
    reran the evaluation for every run. Each list is taken in the direction its default is written
    (`rtols: [0.01, 0.001]` descending), so the defaults keep the params string a results tree recorded."""
    from lipflow.config import SCHEMA_PATH, validate
    from lipflow.plan import Plan

    def params_json(params):
        plan = Plan.from_config({"evaluations": {"enabled": [name], name: copy.deepcopy(params)}})
        return plan.evaluation_params_json(name)

    filled = validate({"evaluations": {name: {}}}, SCHEMA_PATH)["evaluations"][name]
    assert params_json(reordered) == params_json({}) == json.dumps(filled, sort_keys=True)


def test_the_schemas_resolve_from_a_checkout_whose_path_holds_a_space_non_ascii_and_percent(tmp_path):
    """as_uri percent-encodes such a path; the referenced icl schema must still be read back from it."""
    from lipflow.config.schema import SCHEMA_PATH, validate
    checkout = tmp_path / "sp ace ç%20x"
    root = SCHEMA_PATH.parent.parent.parent
    for schema in (*SCHEMA_PATH.parent.glob("*.yaml"), root / "lipflow" / "studies" / "icl" / "config_schema.yaml"):
        copy_path = checkout / schema.relative_to(root)
        copy_path.parent.mkdir(parents=True, exist_ok=True)
        copy_path.write_text(schema.read_text())
    schema_copy = checkout / SCHEMA_PATH.relative_to(root)
    assert validate({"icl": {"d": 3}}, schema_copy)["icl"] == {"d": 3}
    with pytest.raises(ConfigError, match=r"^icl\.d: "):
        validate({"icl": {"d": 0}}, schema_copy)


def test_every_config_key_the_readme_names_is_one_of_the_schemas():
    """README drift: each config key path the README names (`corpus.text_column`, `resources.eval_mem_mb`,
    `image_mlp.methods.<method>.lr`, `robustness.n_sequences` for the `evaluations` block's, and the table
    columns `runs.val_loss`, `train_metrics.lipschitz_bound`) exists, and each value the README shows for a
    key with a fixed set of values (`tokenizer.kind: char | bpe | file`, `ns_coefficients: you`,
    `real_fp8: auto`) is one of them: a renamed key or value would leave the README naming nothing."""
    from pathlib import Path

    from lipflow.config import SCHEMA_PATH
    from lipflow.results.database import VAL_COLUMNS
    from lipflow.train.summary import METRIC_COLUMNS, RUN_KEY_FIELDS, RUN_SUMMARY_FIELDS

    files: dict[Path, dict] = {}

    def load(path: Path) -> dict:
        return files.setdefault(path, yaml.safe_load(path.read_text(encoding="utf-8")))

    def resolve(node: dict, path: Path) -> tuple[dict, Path]:
        """``node`` with its $ref followed (another file's too) and its allOf's properties merged in."""
        while "$ref" in node or "allOf" in node:
            if "$ref" in node:
                target, _, pointer = node["$ref"].partition("#")
                path = (path.parent / target).resolve() if target else path
                found = load(path)
                for part in filter(None, pointer.split("/")):
                    found = found[part]
                node = {**{k: v for k, v in node.items() if k != "$ref"}, **found}
            else:
                merged = {k: v for k, v in node.items() if k != "allOf"}
                for part in node["allOf"]:
                    part, path = resolve(part, path)
                    merged = {**part, **merged, "properties": {**part.get("properties", {}),
                                                               **merged.get("properties", {})}}
                node = merged
        return node, path

    def child(node: dict, path: Path, key: str) -> tuple[dict, Path] | None:
        node, path = resolve(node, path)
        if key in node.get("properties", {}):
            return resolve(node["properties"][key], path)
        extra = node.get("additionalProperties")
        if key.startswith("<") and isinstance(extra, dict):
            return resolve(extra, path)
        if key.startswith("<") and node.get("properties"):
            return {}, path  # `evaluations.<name>`: any of the block's keys
        return None

    def enums(node: dict, path: Path) -> list | None:
        node, path = resolve(node, path)
        if "items" in node:
            return enums(node["items"], path)
        return node.get("enum")

    def every_property(node, path: Path, seen: set, found: dict) -> dict:
        """Key name → every (node, file) of a property of that name, in the whole schema."""
        if isinstance(node, list):
            for item in node:
                every_property(item, path, seen, found)
        elif isinstance(node, dict):
            if isinstance(node.get("$ref"), str) and node["$ref"] not in seen:  # another file's block too
                seen.add(node["$ref"])
                every_property(*resolve({"$ref": node["$ref"]}, path), seen, found)
            if isinstance(node.get("properties"), dict):
                for key, value in node["properties"].items():
                    found.setdefault(key, []).append((value, path))
            for value in node.values():
                every_property(value, path, seen, found)
        return found

    schema_path = Path(SCHEMA_PATH).resolve()
    root = load(schema_path)
    evaluations = child(root, schema_path, "evaluations")[0]["properties"]
    run_keys = set(resolve(root["$defs"]["run"], schema_path)[0]["properties"])
    columns = {"runs": run_keys | set(RUN_KEY_FIELDS) | set(RUN_SUMMARY_FIELDS) | set(VAL_COLUMNS) | {"name", "config"},
               "train_metrics": set(METRIC_COLUMNS)}
    properties = every_property(root, schema_path, set(), {})
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    spans = re.findall(r"`([^`\n]+)`", readme)
    file_suffix = re.compile(r"\.(json|jsonl|py|yaml|smk|parquet|log|written|drawn|built|arrow|txt|safetensors)$")
    unknown, checked = [], 0
    for span in spans:
        key_path, _, value = span.partition(": ")
        if (not re.fullmatch(r"[a-z_][a-z0-9_]*(\.(<[a-z_]+>|[a-z_][a-z0-9_]*))*", key_path)
                or file_suffix.search(key_path)):
            continue
        parts = key_path.split(".")
        if len(parts) > 1 and parts[0] in columns and not (parts[0] == "runs" and len(parts) > 2):
            checked += 1
            if parts[1] not in columns[parts[0]]:
                unknown.append(span)
            continue
        if len(parts) > 1:
            if parts[0] not in root["properties"] and parts[0] not in evaluations:
                continue  # not a config path (`pydoc_data.topics`, `run.model`, …)
            node = (root, schema_path) if parts[0] in root["properties"] else child(root, schema_path, "evaluations")
            for part in parts:
                node = node and child(*node, part)
            checked += 1
            if node is None:
                unknown.append(span)
                continue
            candidates = [node]
        elif value and key_path in properties:
            candidates = [resolve(*found) for found in properties[key_path]]
        else:
            continue
        allowed = [enum for enum in (enums(*candidate) for candidate in candidates) if enum]
        words = [word.strip() for word in re.split(r"[|,\[\]]", value) if word.strip()]
        if value and allowed:
            checked += 1
            if not any(all(word in map(str, enum) or word in map(lambda v: str(v).lower(), enum) for word in words)
                       for enum in allowed):
                unknown.append(span)
    assert checked >= 40 and not unknown, (checked, unknown)
