"""The Plan reproduces what the workflow derived from a config before it existed
(tests/data/plan_golden.json, written from commit 1b9edc6): the same run ids and configs, each run's
evaluations, the studies, the targets and byte-identical params strings (a changed params string
reruns jobs). One intended change since: lipschitz_tradeoff also runs the robustness evaluation
(issue 20), which moved the evaluations of its cases and the `all` cases only; and its paper preset
trains Muon as the authors' code does (modular step sizes at blocks mass 32, the reference's Muon
options, lr 0.03…1), which moved the run ids and configs of the three paper cases that select it,
and then left lr 1 out of its soft-cap runs (refused at every σ_max), which moved the same three; and an
integer written for a number key (max_embed_inflation: 16) is the float it trains as, which moved
the same three again; and the database job's run list is sorted (a reordered config rebuilt the
database), which moved that one params string of the experiment cases — every other case's run ids,
configs and params strings as written at 1b9edc6."""

import copy
import json
from pathlib import Path

import pytest

import lipflow.experiments
import lipflow.plan
from lipflow.config import ConfigError
from lipflow.plan import FrozenDict, Plan
from plan_cases import GOLDEN, digest, golden_cases

CASES = golden_cases()
EXPECTED = json.loads(GOLDEN.read_text())


def test_the_fixture_covers_every_case():
    assert sorted(EXPECTED) == sorted(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_plan_reproduces_the_golden_fixture(name):
    expected = EXPECTED[name]
    plan = Plan.from_config(copy.deepcopy(CASES[name]))
    assert list(plan.runs) == expected["run_ids"]
    assert digest(plan.runs) == expected["runs_sha256"]
    assert digest(plan.evaluations) == expected["evaluations_sha256"]
    assert plan.all_evaluations == expected["all_evaluations"]
    assert list(plan.experiments) == expected["experiments"]
    assert {"icl": "icl" in plan.studies, "image_mlp": "image_mlp" in plan.studies} == expected["studies"]
    assert plan.icl_runs() == [f"results/icl/runs/L{layers}_n{n}.safetensors" for layers, n in expected["icl_jobs"]]
    assert plan.experiment_targets() == expected["experiment_targets"]
    assert plan.trains_runs_block == bool(expected["plain_runs"])
    params = {
        "run_config_json": {run: plan.run_config_json(run) for run in plan.runs},
        "config_block_json": {block: plan.config_block_json(block) for block in ("corpus", "tokenizer")},
        "evaluation_params_json": {e: plan.evaluation_params_json(e) for e in plan.all_evaluations},
        "icl_params": plan.icl_params(),
        "icl_train_params": plan.icl_train_params(),
        "database_runs": plan.database_run_dirs(),
    }
    assert {key: digest(value) for key, value in params.items()} == expected["params_sha256"]
    if "params" in expected:  # small cases keep the strings themselves: a failure shows the difference
        assert params == expected["params"]
        assert json.loads(json.dumps(plan.runs)) == expected["runs"]


def test_reordering_runs_or_experiments_changes_no_params_string():
    """The order of ``runs:`` and ``experiments:`` is not a change: the database job's run list (its one
    params string made from all runs) was in config order, so a reordered config rebuilt the database
    and redrew every figure."""
    config = copy.deepcopy(CASES["all/cpu/runs_true"])
    reordered = copy.deepcopy(config)
    reordered["runs"] = dict(reversed(list(config["runs"].items())))
    reordered["experiments"] = list(reversed(config["experiments"]))
    plan, other = Plan.from_config(config), Plan.from_config(reordered)
    assert list(plan.runs) != list(other.runs) and set(plan.runs) == set(other.runs)
    assert other.database_run_dirs() == plan.database_run_dirs()
    assert plan.database_run_dirs().split() == sorted(f"results/runs/{run}" for run in plan.runs)
    assert {run: other.run_config_json(run) for run in plan.runs} == \
        {run: plan.run_config_json(run) for run in plan.runs}


def test_run_configs_are_read_only_and_copy_to_plain_dicts():
    plan = Plan.from_config(copy.deepcopy(CASES["config.yaml"]))
    run = next(iter(plan.runs.values()))
    for change in (lambda: run.__setitem__("lr", 1.0), lambda: run.update(lr=1.0), lambda: run.pop("lr"),
                   lambda: plan.runs.clear(), lambda: plan.config["corpus"].setdefault("x", 1)):
        with pytest.raises(TypeError, match="read-only"):
            change()
    mutable = copy.deepcopy(run)
    mutable["lr"] = 1.0
    assert type(mutable) is dict and run["lr"] != 1.0
    assert isinstance(plan.runs, FrozenDict) and isinstance(plan.config["corpus"]["paths"], tuple)


def test_definitions_are_computed_once_per_plan(monkeypatch):
    """Before the Plan, ``definitions`` ran once per run (231 times for a 112-run selection)."""
    calls = []
    original = lipflow.experiments.definitions
    monkeypatch.setattr(lipflow.experiments, "definitions", lambda config: calls.append(1) or original(config))
    monkeypatch.setattr(lipflow.plan, "definitions", lipflow.experiments.definitions)
    for name in ("precision/cpu/runs_false", "all/paper/runs_true"):
        calls.clear()
        plan = Plan.from_config(copy.deepcopy(CASES[name]))
        assert len(calls) == 1 and plan.runs


def test_a_bad_config_is_a_config_error_before_anything_is_planned():
    with pytest.raises(ConfigError, match="unknown experiment 'precison'"):
        Plan.from_config({"experiments": ["precison"]})


def test_a_run_id_the_config_does_not_train_is_one_config_error_in_every_rule_function():
    """`snakemake results/runs/<id>/model.safetensors` (or `--forcerun` of an evaluation) for a run of an
    experiment that is not selected failed in the rules' input functions with a bare ``KeyError: '<id>'``."""
    from types import SimpleNamespace

    from lipflow.plan_rules import RuleFunctions

    plan = Plan.from_config({})
    rules = RuleFunctions(plan)
    other = SimpleNamespace(run="rank.n2048.h1-98ee76d1")
    calls = [lambda: plan.run_config_json(other.run), lambda: rules.run_evaluation_files(other),
             lambda: rules.train_mem_mb(other, 1), lambda: rules.train_runtime(other, 1),
             lambda: rules.train_cpus(other)]
    for call in calls:
        with pytest.raises(ConfigError, match=r"run rank.n2048.h1-98ee76d1 is not a run of this config \(a run of "
                                              r"an experiment needs --config experiments=\[<experiment>\]\)"):
            call()
    run = next(iter(plan.runs))
    assert json.loads(plan.run_config_json(run)) == dict(plan.run_config(run))


def test_the_digits_mlp_jobs_runtime_grows_with_its_seeds_and_steps():
    """The image_mlp_robustness rule asked a scheduler for a fixed 60 minutes while the study's work grows with
    image_mlp.seeds (about 20 s per seed on one core at the defaults): a SLURM job past some 180 seeds was
    killed. Its runtime is counted from the block as the training jobs' are: 10 minutes plus a part linear
    in seeds × methods and in steps (Newton–Schulz) — 40 at the defaults, which took 2.1 min on one core —
    doubled on a retry."""
    from lipflow.plan_rules import RuleFunctions

    def runtime(attempt=1, **block):
        return RuleFunctions(Plan.from_config({"image_mlp": block})).image_mlp_runtime(None, attempt)

    assert runtime() == 40 and runtime(attempt=2) == 80
    for seeds in (50, 200):
        assert abs((runtime(seeds=seeds) - 10) - (runtime() - 10) * seeds / 5) <= seeds / 5
    one_method = {"methods": {"muon_soft_cap": {"optimizer": "muon", "lr": 0.05,
                                                "weight_constraint": "spectral_soft_cap", "sigma_max": 3.0}}}
    assert abs((runtime(**one_method) - 10) * 2 - (runtime() - 10)) <= 2
    assert runtime(steps=3000) - 10 >= 1.9 * (runtime() - 10)


def test_an_evaluation_without_a_parameter_block_is_refused_before_any_job(monkeypatch):
    """An evaluation in the schema's enum but without its block under `evaluations` (an incomplete addition)
    passed the config check and failed in the evaluate rule's params with ``KeyError: '<name>'``."""
    checked = lipflow.plan.check_config

    def without_sharpness_block(config):
        checked(config)
        del config["evaluations"]["sharpness"]

    monkeypatch.setattr(lipflow.plan, "check_config", without_sharpness_block)
    with pytest.raises(ConfigError, match=r"evaluation 'sharpness' has no parameter block: add evaluations\.properties"
                                          r"\.sharpness to workflow/schemas/config\.schema\.yaml"):
        Plan.from_config({})
    Plan.from_config({"evaluations": {"enabled": ["val"]}})  # a block no run uses may be absent


def test_a_missing_caption_file_of_a_selected_experiment_is_refused_before_any_job(tmp_path, monkeypatch):
    """An experiment whose view or figure names a caption file that does not exist was planned and trained,
    and its database build failed on the missing file."""
    import shutil

    from lipflow.results import views

    report = tmp_path / "report"
    shutil.copytree(views.REPORT_DIR, report)
    (report / "figure_rank_vs_n.rst").unlink()
    monkeypatch.setattr(views, "REPORT_DIR", report)
    with pytest.raises(ConfigError, match=r"experiment rank_vs_n: caption file .*figure_rank_vs_n\.rst does not exist"):
        Plan.from_config({"experiments": ["rank_vs_n"]})
    Plan.from_config({"experiments": ["lr_transfer"]})  # another experiment's captions are all there


def test_the_readmes_example_run_ids_are_the_default_configs():
    """The README's ``lipflow sample <id>`` and ``lipflow.load_run("<id>")`` examples name run ids that the
    default config.yaml resolves to (they went stale once when a default changed)."""
    import re
    from pathlib import Path

    from lipflow.config import load_config_file

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"lipflow sample ([\w-]+-[0-9a-f]{8})", readme))
    named |= set(re.findall(r'load_run\("([\w-]+-[0-9a-f]{8})"\)', readme))
    assert len(named) == 2, named
    assert named <= set(Plan.from_config(load_config_file(repo / "config.yaml")).runs)


@pytest.mark.parametrize("selected", [[], ["lr_transfer"]], ids=["unselected", "selected"])
def test_a_written_experiment_block_is_validated_whether_or_not_it_is_selected(selected):
    """A mistake in an experiment_definitions block is named before any job even when the block is not
    selected, with the same message as when it is; an unselected valid block adds no runs."""
    grid = {"method": {"m": {"optimizer": "adamw"}}, "lr": [0.1]}  # method first: lr_transfer's label_axis
    written = {"lr_transfer": {"cpu": {"base": {"model": "lipschitz_gptt"}, "grid": grid}}}
    with pytest.raises(ConfigError, match=r"^config error in experiment run lrt\.m\.lr0\.1 \(lr_transfer's cpu preset "
                                          r"or the config's defaults\): model: "
                                          r"'lipschitz_gptt' is not one of .*did you mean 'lipschitz_gpt'"):
        Plan.from_config({"experiments": selected, "experiment_definitions": written})
    written["lr_transfer"]["cpu"]["base"]["model"] = "lipschitz_gpt"
    plan = Plan.from_config({"experiments": selected, "experiment_definitions": written})
    assert [run_id.rsplit("-", 1)[0] for run_id in plan.runs if run_id.startswith("lrt.")] == \
        (["lrt.m.lr0.1"] if selected else [])


@pytest.mark.parametrize("selected", [[], ["lr_transfer"]], ids=["unselected", "selected"])
def test_a_written_preset_is_validated_under_another_experiment_preset(selected):
    """A mistake in the ``paper`` preset a config writes is named while ``experiment_preset`` is cpu,
    selected or not (it went unnoticed until the day the preset was switched); a valid one adds no run."""
    grid = {"method": {"m": {"optimizer": "adamw"}}, "lr": [0.1]}  # method first: lr_transfer's label_axis
    written = {"lr_transfer": {"paper": {"base": {"model": "lipschitz_gptt"}, "grid": grid}}}
    with pytest.raises(ConfigError, match=r"^config error in experiment run lrt\.m\.lr0\.1 \(lr_transfer's paper preset "
                                          r"or the config's defaults\): model: 'lipschitz_gptt' is not one of"):
        Plan.from_config({"experiments": selected, "experiment_preset": "cpu", "experiment_definitions": written})
    written["lr_transfer"]["paper"]["base"]["model"] = "lipschitz_gpt"
    valid = Plan.from_config({"experiments": selected, "experiment_preset": "cpu", "experiment_definitions": written})
    assert valid.runs.keys() == Plan.from_config({"experiments": selected, "experiment_preset": "cpu"}).runs.keys()


def test_a_corpus_key_its_source_does_not_read_changes_neither_run_ids_nor_the_data_check(tmp_path, monkeypatch):
    """corpus.text_column names the text of a JSONL or Parquet corpus: under source files it changed every
    run id and the corpus folder refused the config as made from another block; now it is set to the
    schema's default there, while under jsonl it is the corpus's identity."""
    monkeypatch.chdir(tmp_path)
    Path("a.txt").write_text("text")

    def plan(corpus: dict) -> Plan:
        return Plan.from_config({"corpus": {"name": "c", "paths": ["a.txt"], **corpus}})

    files = plan({"source": "files"})
    assert set(plan({"source": "files", "text_column": "body"}).runs) == set(files.runs)
    assert plan({"source": "files", "text_column": "body"}).config["corpus"]["text_column"] == "text"
    assert set(plan({"source": "jsonl", "text_column": "body"}).runs) != set(plan({"source": "jsonl"}).runs)
    record = Path(files.data_dir) / "corpus" / "corpus.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"config": {**files.config["corpus"], "text_column": "body"}}))
    files.check_data_folders()  # recorded by a stage given the inapplicable key: the same documents
    record.write_text(json.dumps({"config": {**files.config["corpus"], "split_seed": 3}}))
    with pytest.raises(ConfigError, match=r"corpus\.split_seed was 3"):
        files.check_data_folders()


def test_the_data_keys_read_by_some_kinds_only_are_schema_keys_and_kinds():
    from lipflow.config import DATA_KEYS_OF_KINDS, SCHEMA_PATH, load_schema

    blocks = load_schema(SCHEMA_PATH)["properties"]
    for name, (kind_key, readers) in DATA_KEYS_OF_KINDS.items():
        properties = blocks[name]["properties"]
        for key, kinds in readers.items():
            assert key in properties and key != kind_key and "default" in properties[key], (name, key)
            assert set(kinds) < set(properties[kind_key]["enum"]), (name, key)


def test_a_tokenizer_key_its_kind_does_not_read_changes_neither_run_ids_nor_the_data_check(tmp_path, monkeypatch):
    """tokenizer.vocab_size is the BPE vocabulary: under kind char it changed every run id (all runs
    retrained on identical tokens) and the data folder refused the config; now it is set to the
    schema's default there, while under kind bpe it is the tokens' identity."""
    def plan(tokenizer: dict) -> Plan:
        return Plan.from_config({"tokenizer": tokenizer})

    assert set(plan({"kind": "char", "vocab_size": 1024}).runs) == set(plan({"kind": "char"}).runs)
    assert plan({"kind": "char", "vocab_size": 1024}).config["tokenizer"]["vocab_size"] == 512
    assert set(plan({"kind": "bpe", "vocab_size": 1024}).runs) != set(plan({"kind": "bpe"}).runs)
    monkeypatch.chdir(tmp_path)
    default = plan({"kind": "char"})
    manifest = Path(default.tokens_dir) / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"tokenizer": {"config": {**default.config["tokenizer"], "vocab_size": 1024}}}))
    default.check_data_folders()  # recorded by a stage given the inapplicable key: the same tokens
    manifest.write_text(json.dumps({"tokenizer": {"config": {**default.config["tokenizer"], "shard_tokens": 2048}}}))
    with pytest.raises(ConfigError, match=r"tokenizer\.shard_tokens was 2048"):
        default.check_data_folders()


def test_a_cross_key_rule_of_an_experiment_run_names_the_preset_its_keys_come_from():
    """super_consistency's paper preset warms up for 100 steps: a config shortening its runs to 50 steps was
    refused as 'experiment run sc….warmup_steps: 100 is more than the run's 50 steps', with no word of where
    the 100 came from (the built-in preset, which the user never wrote); the error names it now."""
    config = {"experiments": ["super_consistency"], "experiment_preset": "paper",
              "experiment_definitions": {"super_consistency": {"paper": {"base": {"steps": 50}}}}}
    with pytest.raises(ConfigError, match=r"^config error: experiment run sc\.\S+\.warmup_steps: 100 is more than the "
                                          r"run's 50 steps, .* \(its keys come from super_consistency's paper preset "
                                          r"and the config's defaults\)$"):
        Plan.from_config(config)
