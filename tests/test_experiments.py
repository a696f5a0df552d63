"""Experiments: grid expansion, the DuckDB views on hand-made tables with known answers, the
figures, and one tiny experiment end to end through Snakemake (with the HTML report)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
import yaml

from conftest import SNAKEMAKE_SINGLE_THREADED
from lipflow.config import SCHEMA_PATH, ConfigError, check_config, validate
from lipflow.plan import Plan, resolve_runs
from lipflow.experiments import (EXPERIMENT_FIGURES, EXPERIMENT_VIEWS, VIEWS, builtin_definitions, create_views,
                                 definitions, expand_experiments, experiment_evaluations, experiment_studies)
from lipflow.data.parquet import write_table_parquet
from lipflow.results import load_study_tables
from lipflow.results.figures import main as plots_main
from lipflow.results.views import Part, View, check_column_types, missing_requirement, view_order
from lipflow.results.views import create_views as create_views_of

REPO = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SHIPPED_EXPERIMENTS = ("icl", "lipschitz_tradeoff", "lr_transfer", "precision", "rank_vs_n", "robustness",
                       "super_consistency")  # an added one joins them (README: What to touch)


def filled(config: dict) -> dict:
    """``config`` validated with the schema's defaults filled, as Plan.from_config hands it on."""
    return validate(config, SCHEMA_PATH)


def base_config(**extra) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config.update(extra)
    return config


# --------------------------------------------------------------------------- expansion

def expected_count(grid) -> int:
    """Runs of a grid or list of grids, counted from the axis lengths (before merging duplicates)."""
    grids = grid if isinstance(grid, list) else [grid or {}]
    return sum(math.prod(len(values) for values in one.values()) for one in grids if one)


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_every_builtin_experiment_expands_to_its_grid_product_with_valid_unique_names(preset):
    blocks = builtin_definitions()
    for name, block in blocks.items():
        runs = expand_experiments(filled({"experiments": [name], "experiment_preset": preset}))
        duplicates = 1 if name == "super_consistency" else 0  # sp·w64·L2 is in both of its grids
        grid = block.get(preset, {}).get("grid")  # a block may leave a preset out: it has no runs there
        assert len(runs) == expected_count(grid) - duplicates, name
        assert all(NAME.match(run) and run.startswith(block["short"] + ".") for run in runs), name
        assert all(cfg["experiment"] == name for cfg in runs.values())
    everything = expand_experiments(filled({"experiments": list(blocks), "experiment_preset": preset}))
    assert len(everything) == sum(len(expand_experiments(filled({"experiments": [n], "experiment_preset": preset})))
                                  for n in blocks)  # names unique across experiments


def test_run_names_and_overrides_follow_the_axes():
    runs = expand_experiments(filled({"experiments": ["lipschitz_tradeoff"]}))
    cfg = runs["tradeoff.muon.soft_cap.s2.lr0.2"]
    assert cfg["optimizer"] == "muon" and cfg["weight_constraint"] == "spectral_soft_cap"
    assert cfg["sigma_max"] == 2.0 and cfg["lr"] == 0.2 and cfg["model"] == "lipschitz_gpt"
    assert cfg["experiment"] == "lipschitz_tradeoff"
    labels = {tuple(run.split(".")[1:3]) for run in runs}
    assert ("adamw", "hammer") in labels and ("muon", "none") in labels and ("muon", "hammer") not in labels


def test_presets_differ_and_the_paper_preset_has_the_papers_sizes():
    for name in builtin_definitions():
        cpu = expand_experiments(filled({"experiments": [name], "experiment_preset": "cpu"}))
        paper = expand_experiments(filled({"experiments": [name], "experiment_preset": "paper"}))
        if cpu:
            assert cpu != paper, name
    paper = expand_experiments(filled({"experiments": ["lipschitz_tradeoff"], "experiment_preset": "paper"}))
    shapes = {(c["d_model"], c["n_layers"], c["n_heads"], c["context"], c["batch_size"], c["steps"])
              for c in paper.values()}
    assert shapes == {(256, 3, 4, 256, 64, 2000)}  # Newhouse et al. 2025, App. D (Shakespeare)
    # Muon as the authors' code trains it: experiments/reference.yaml's Muon, App. D's blocks mass 32
    reference = yaml.safe_load(Path("experiments/reference.yaml").read_text())["runs"]["reference"]
    muon_keys = ("parametrization", "momentum", "nesterov", "ns_coefficients", "ns_steps", "embed_optimizer",
                 "max_embed_inflation")
    muon = [c for c in paper.values() if c["optimizer"] == "muon"]
    assert len(muon) == 59 and all({k: c[k] for k in muon_keys} == {k: reference[k] for k in muon_keys}
                                   and c["masses"] == {**reference["masses"], "blocks": 32.0} for c in muon)
    assert all(c.get("parametrization", "sp") == "sp" for c in paper.values() if c["optimizer"] == "adamw")


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_training_builds_every_run_of_every_preset(preset, monkeypatch):
    """Every run of every experiment's preset passes what the train stage checks when it builds the
    run (``build_learner``: model, optimizer, and the soft cap's lr against what it absorbs at its
    σ_max), with Newton–Schulz's fp32 margin (CPU) and its bf16 margin (CUDA, where the paper preset
    runs); built on the meta device, so paper sizes cost no memory. The paper preset's Muon + soft cap
    at lr 1 was refused at every σ_max: five failed jobs in every paper sweep."""
    import torch

    import lipflow.optimizers.muon as muon
    from lipflow.config import run_defaults
    from lipflow.train.build import build_learner

    configs = expand_experiments(filled({"experiments": list(builtin_definitions()), "experiment_preset": preset}))
    assert sum(cfg.get("weight_constraint") == "spectral_soft_cap" for cfg in configs.values()) >= 10
    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(muon, "_ns_dtype", lambda device: dtype)
        for cfg in configs.values():
            with torch.device("meta"):
                build_learner(run_defaults(**cfg), 65, torch.device("meta"))


def test_all_cpu_runs_resolve_and_validate_as_runs():
    config = base_config(experiments=list(builtin_definitions()))
    check_config(config)
    resolved = resolve_runs(config)
    assert config["runs"] and len(resolved) == len(expand_experiments(config))  # runs block left out
    lrt = [cfg for rid, cfg in resolved.items() if rid.startswith("lrt.")]
    assert lrt and all(cfg["steps"] == 150 and cfg["schedule"] == "linear" for cfg in lrt)
    config["runs_with_experiments"] = True
    names = {rid.rsplit("-", 1)[0] for rid in resolve_runs(config)}
    assert len(names) == len(resolved) + len(config["runs"]) and set(config["runs"]) <= names


def test_unknown_experiment_is_one_line_with_did_you_mean():
    with pytest.raises(ConfigError) as err:
        expand_experiments(filled({"experiments": ["lr_transfr"]}))
    message = str(err.value)
    assert "unknown experiment 'lr_transfr'" in message and "did you mean 'lr_transfer'" in message
    assert "\n" not in message


def test_config_block_merges_over_the_builtin_and_replaces_the_grid():
    override = {"lr_transfer": {"cpu": {"base": {"steps": 7},
                                        "grid": {"method": {"sgd_like": {"optimizer": "adamw"}}, "lr": [0.1, 0.2]}}}}
    runs = expand_experiments(filled({"experiments": ["lr_transfer"], "experiment_definitions": override}))
    assert sorted(runs) == ["lrt.sgd_like.lr0.1", "lrt.sgd_like.lr0.2"]
    assert all(c["steps"] == 7 and c["model"] == "gpt" and c["context"] == 64 for c in runs.values())
    assert definitions(filled({"experiment_definitions": override}))["lr_transfer"]["paper"] == \
        builtin_definitions()["lr_transfer"]["paper"]


def test_clashing_names_and_bad_presets_are_errors():
    clash = {"mine": {"short": "x", "cpu": {"grid": [{"v": {"a": {"lr": 0.1}}}, {"v": {"a": {"lr": 0.2}}}]}}}
    with pytest.raises(ConfigError, match="both named 'x.a'"):
        expand_experiments(filled({"experiments": ["mine"], "experiment_definitions": clash}))
    same = {"mine": {"short": "x", "cpu": {"grid": [{"v": {"a": {"lr": 0.1}}}, {"v": {"a": {"lr": 0.1}}}]}}}
    assert list(expand_experiments(filled({"experiments": ["mine"], "experiment_definitions": same}))) == ["x.a"]
    with pytest.raises(ConfigError, match="both in runs and in an experiment"):
        expand_experiments(filled({"experiments": ["mine"], "experiment_definitions": same, "runs": {"x.a": {}}}))
    with pytest.raises(ConfigError, match="experiment_preset"):
        expand_experiments(filled({"experiments": ["mine"], "experiment_definitions": same, "experiment_preset": "gpu"}))


def test_a_merged_block_names_its_prefix_and_gets_the_schemas_defaults():
    with pytest.raises(ConfigError, match=r"^config error: experiment_definitions\.mine: 'short' is a required"):
        expand_experiments(filled({"experiments": ["mine"], "experiment_definitions": {"mine": {"cpu": {}}}}))
    mine = definitions(filled({"experiment_definitions": {"mine": {"short": "m"}}}))["mine"]
    assert mine == {"short": "m", "evaluations": ["val"], "studies": [], "cpu": {"base": {}, "grid": {}},
                    "paper": {"base": {}, "grid": {}}}
    assert expand_experiments(filled({"experiments": ["mine"], "experiment_definitions": {"mine": {"short": "m"}}})) == {}


def test_schema_rejects_a_bad_block_with_its_path():
    config = base_config(experiment_definitions={"lr_transfer": {"cpu": {"gird": {}}}})
    with pytest.raises(ConfigError, match=r"experiment_definitions\.lr_transfer\.cpu\.gird"):
        check_config(config)


@pytest.mark.parametrize("name", [1, 2024, True, None])
def test_a_block_under_a_name_yaml_reads_as_no_string_is_refused(name):
    """A block named `1:`, `2024:`, `yes:` or `null:` can never be selected (`experiments` lists strings);
    it was accepted silently, never checked, as the name pattern tests strings only."""
    config = base_config(experiment_definitions={name: {"short": "x", "cpu": {"grid": {"lr": [0.1]}}}})
    with pytest.raises(ConfigError, match=rf"^config error: experiment_definitions: {name} is not of type 'string'$"):
        Plan.from_config(config)


def test_experiment_evaluations_and_studies():
    config = filled({"experiments": ["rank_vs_n", "robustness", "icl"]})
    assert experiment_evaluations(config, {"experiment": "rank_vs_n"}) == ["val", "rank"]
    assert experiment_evaluations(config, {"experiment": "lr_transfer"}) == ["val"]
    assert experiment_evaluations(config, {"experiment": None}) is None  # a `runs` run: evaluations.enabled
    assert experiment_studies(config) == ["icl", "image_mlp"]
    assert "icl" in Plan.from_config({"experiments": ["rank_vs_n", "robustness", "icl"]}).studies
    assert "icl" in Plan.from_config({"icl": {"enabled": True}}).studies
    assert "icl" not in Plan.from_config({"icl": {"enabled": False}, "experiments": ["rank_vs_n"]}).studies


def experiment_block_errors(block) -> list[str]:
    """The schema's complaints about one experiment block ($defs/experiment)."""
    from lipflow.config.schema import EXPERIMENTS_SCHEMA, make_validator

    validator = make_validator(EXPERIMENTS_SCHEMA, definition="experiment")  # its $refs resolve as lipflow's do
    return [error.message for error in validator.iter_errors(block)]


def test_every_shipped_experiment_yaml_passes_the_schema():
    files = sorted((REPO / "lipflow" / "experiments").glob("*.yaml"))
    assert [f.stem for f in files] == sorted(builtin_definitions())
    assert set(SHIPPED_EXPERIMENTS) <= set(builtin_definitions())
    for path in files:
        assert experiment_block_errors(yaml.safe_load(path.read_text())) == [], path.name
    broken = {**builtin_definitions()["lr_transfer"], "cpu": {"gird": {}}}
    assert experiment_block_errors(broken)  # the check would catch a bad block


def test_every_caption_an_experiment_names_is_a_report_file_and_every_report_file_is_named():
    from lipflow.experiments import CATALOG

    named = {output.caption for e in CATALOG.values() for output in (*e.views.values(), *e.figures.values())}
    report = {p.name for p in (REPO / "workflow" / "report").glob("*.rst")}
    icl_study = {"figure_icl_loss_vs_layers.rst", "figure_icl_loss_vs_n.rst"}  # workflow/rules/icl.smk
    runs_block = {"figure_training_curves.rst"}  # workflow/rules/results.smk
    assert named <= report and report - named == {"workflow.rst", *icl_study, *runs_block}


@pytest.mark.parametrize("caption", sorted(p.name for p in (Path(__file__).resolve().parent.parent / "workflow"
                                                              / "report").glob("*.rst")))
def test_every_report_caption_is_restructuredtext_without_errors(caption):
    """`snakemake --report` renders each caption as reStructuredText: precision_bounds' "max |activation|"
    was a substitution reference, and the report showed docutils' "Undefined substitution referenced"
    error box under the table."""
    from docutils import nodes
    from docutils.core import publish_doctree

    stream = io.StringIO()
    tree = publish_doctree((REPO / "workflow" / "report" / caption).read_text(encoding="utf-8"),
                           settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": stream})
    assert stream.getvalue() == "" and not list(tree.findall(nodes.system_message)), stream.getvalue()


def test_the_robustness_caption_names_the_configured_image_mlp_methods():
    """The caption said "Digits MLP: Muon + spectral soft cap vs AdamW + weight decay" whatever image_mlp.methods
    held. Rendered as `snakemake --report` renders it (Jinja2 over the config the Plan validated and filled),
    it names the configured methods, as reStructuredText without errors."""
    from docutils import nodes
    from docutils.core import publish_doctree
    from jinja2 import Environment, StrictUndefined

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["image_mlp"] = {"methods": {"scion_cap": {"optimizer": "scion"}, "sgd_like_": {"optimizer": "adamw"}}}
    check_config(config)
    template = (REPO / "workflow" / "report" / "figure_robustness.rst").read_text(encoding="utf-8")
    job = type("Snakemake", (), {"config": config})
    caption = Environment(undefined=StrictUndefined).from_string(template).render(snakemake=job)
    assert "its methods ``scion_cap``, ``sgd_like_`` (" in " ".join(caption.split()), caption
    stream = io.StringIO()
    tree = publish_doctree(caption, settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": stream})
    assert stream.getvalue() == "" and not list(tree.findall(nodes.system_message)), stream.getvalue()


def test_the_report_header_names_the_icl_study_when_icl_enabled_runs_it():
    """With `icl.enabled: true` and no experiment selected the report holds the ICL figures and table, but its
    header said "Experiments in this build: []"; it names the study (and not twice when `icl` is selected)."""
    from jinja2 import Environment, StrictUndefined

    template = (REPO / "workflow" / "report" / "workflow.rst").read_text(encoding="utf-8")
    for overlay, says in (({"icl": {"enabled": True}}, True), ({"experiments": ["icl"]}, False), ({}, False)):
        config = {**yaml.safe_load((REPO / "config.yaml").read_text()), **overlay}
        check_config(config)
        job = type("Snakemake", (), {"config": config})
        header = " ".join(Environment(undefined=StrictUndefined).from_string(template).render(snakemake=job).split())
        assert ("in-context-learning study" in header) == says, header


def test_a_malformed_experiment_yaml_is_one_line_naming_the_file(tmp_path):
    from lipflow.experiments import discover

    (tmp_path / "broken.py").write_text("VIEWS = {}\nFIGURES = {}\n")
    (tmp_path / "broken.yaml").write_text("short: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        discover([str(tmp_path)], "lipflow.experiments")
    assert str(tmp_path / "broken.yaml") in str(err.value) and "\n" not in str(err.value)


def test_the_studies_loaded_as_tables_are_the_schemas_studies():
    from lipflow.results import STUDIES

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "experiments.schema.yaml").read_text())
    assert list(STUDIES) == schema["$defs"]["experiment"]["properties"]["studies"]["items"]["enum"]


def test_results_and_experiments_import_neither_torch_nor_matplotlib_until_drawing():
    code = ("import sys, lipflow.experiments, lipflow.results; from lipflow.results import build, main; "
            "import lipflow.results.figures; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


TOY_EXPERIMENT = '''"""toy: val loss against lr (a test's experiment)."""

from lipflow.results.plotting import Figure, pyplot, read_view
from lipflow.results.views import RUNS_NEED, Part, View

VIEWS = {"toy_loss": View(
    caption="table_toy_loss.rst",
    columns=("lr", "val_loss"),
    parts=(Part(requires={"runs": RUNS_NEED + ("lr", "val_loss")}, absent_reason="no toy runs",
                sql="SELECT lr, val_loss FROM runs WHERE experiment = 'toy'"),))}


def toy_loss(con):
    df = read_view(con, "toy_loss", "ORDER BY lr")
    fig, ax = pyplot().subplots()
    ax.plot(df.lr, df.val_loss, "o-")
    return fig


FIGURES = {"toy_loss": Figure(toy_loss, caption="figure_toy_loss.rst")}
'''

TOY_BLOCK = {"short": "toy", "description": "a test's experiment", "evaluations": ["val"],
             "cpu": {"base": {"steps": 10}, "grid": {"lr": [0.1, 0.2]}}}

# Imports lipflow.experiments with the toy's folder on the package's search path, then expands the
# toy, plans it as the Snakefile does (lipflow.plan: the runs the train rule gets, the figure and table
# targets of the plots rule), builds its view on a database of two runs and draws its figure through
# the plots CLI.
TOY_SCRIPT = '''
import importlib.util, io, json, sys
from pathlib import Path
import duckdb
toy_dir, db, out = sys.argv[1:]
spec = importlib.util.find_spec("lipflow.experiments")
spec.submodule_search_locations.append(toy_dir)
package = importlib.util.module_from_spec(spec)
sys.modules["lipflow.experiments"] = package
spec.loader.exec_module(package)
import lipflow.results.views
lipflow.results.views.REPORT_DIR = Path(toy_dir)  # the toy's caption files are beside it
from lipflow.config import SCHEMA_PATH, validate
from lipflow.plan import Plan
from lipflow.results.figures import main
runs = package.expand_experiments(validate({"experiments": ["toy"]}, SCHEMA_PATH))
plan = Plan.from_config({"experiments": ["toy"]})
con = duckdb.connect(db)
con.execute("CREATE TABLE runs AS SELECT * FROM (VALUES ('toy.lr0.1-00000001', 'toy.lr0.1', 'completed', 'toy', 0.1, "
            "2.5), ('toy.lr0.2-00000002', 'toy.lr0.2', 'completed', 'toy', 0.2, 2.0)) AS t(run_id, name, status, "
            "experiment, lr, val_loss)")
status = package.create_views(con, log=io.StringIO())
rows = con.execute("SELECT lr, val_loss FROM toy_loss ORDER BY lr").fetchall()
con.close()
code = main(["--db", db, "--out-dir", out, "--tables-dir", out, "--experiment", "toy"])
print(json.dumps({"runs": runs, "status": status["toy_loss"], "rows": rows, "code": code,
                  "figures": package.EXPERIMENT_FIGURES["toy"], "views": package.EXPERIMENT_VIEWS["toy"],
                  "experiments": sorted(package.CATALOG), "plan_runs": sorted(plan.runs),
                  "targets": plan.experiment_targets()}))
'''


def test_an_experiment_is_one_python_file_and_one_yaml_file(tmp_path):
    """A toy experiment in a folder of its own (added to the package's search path, no other file
    edited) expands into runs, gets its view and draws its figure and table."""
    toy = tmp_path / "toy_experiments"
    toy.mkdir()
    (toy / "toy.py").write_text(TOY_EXPERIMENT)
    (toy / "toy.yaml").write_text(yaml.safe_dump(TOY_BLOCK))
    (toy / "table_toy_loss.rst").write_text("View ``toy_loss``: toy val loss per lr.\n")
    (toy / "figure_toy_loss.rst").write_text("Toy val loss per lr.\n")
    assert experiment_block_errors(TOY_BLOCK) == []
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", TOY_SCRIPT, str(toy), str(tmp_path / "toy.duckdb"), str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["runs"] == {"toy.lr0.1": {"steps": 10, "lr": 0.1, "experiment": "toy"},
                           "toy.lr0.2": {"steps": 10, "lr": 0.2, "experiment": "toy"}}
    assert got["status"] == "" and got["rows"] == [[0.1, 2.5], [0.2, 2.0]] and got["code"] == 0
    assert got["figures"] == ["toy_loss"] and got["views"] == ["toy_loss"]
    assert got["experiments"] == sorted([*builtin_definitions(), "toy"])
    assert [run_id.rsplit("-", 1)[0] for run_id in got["plan_runs"]] == ["toy.lr0.1", "toy.lr0.2"]
    assert got["targets"] == ["results/figures/toy_loss.png", "results/figures/toy_loss.svg",
                              "results/tables/toy_loss.csv"]
    assert (out / "toy_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "toy_loss.csv").read_text().splitlines() == ["lr,val_loss", "0.1,2.5", "0.2,2.0"]


# --------------------------------------------------------------------------- views

def make_table(con, name: str, rows: list[dict]) -> None:
    columns = dict.fromkeys(k for row in rows for k in row)
    con.register("arrow", pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows]))
    con.execute(f"CREATE TABLE {name} AS SELECT * FROM arrow")
    con.unregister("arrow")


RUN_DEFAULTS = {"status": "completed", "experiment": None, "model": "gpt", "optimizer": "adamw",
                "weight_constraint": "none", "sigma_max": 1.0, "lr": 0.01, "parametrization": "sp",
                "depth_mup": False, "d_model": 64, "n_layers": 2, "n_heads": 4, "context": 64, "steps": 100, "seed": 0,
                "train_tokens": None, "lipschitz_bound": None, "max_activation": None, "val_loss": None,
                "final_val_loss": None, "val_accuracy": None, "final_val_accuracy": None}


def run(run_id: str, **settings) -> dict:
    return {"run_id": run_id, "name": run_id.rsplit("-", 1)[0], **RUN_DEFAULTS, **settings}


def database(tmp_path: Path, runs: list[dict], metrics=(), evals=(), extra: dict | None = None):
    """A results database made by hand: runs, train_metrics, evals, shards (+ extra tables)."""
    con = duckdb.connect(str(tmp_path / "test.duckdb"))
    make_table(con, "runs", runs)
    make_table(con, "train_metrics", list(metrics) or [{"run_id": "none", "step": 0, "loss": 0.0, "sharpness": None,
                                                          "preconditioned_sharpness": None}])
    make_table(con, "evals", list(evals) or [{"run_id": "none", "eval": "val", "metric": "loss", "value": 0.0}])
    make_table(con, "shards", [{"split": "train", "tokens": 1000}, {"split": "val", "tokens": 100}])
    for name, rows in (extra or {}).items():
        make_table(con, name, rows)
    return con


def brute_force_front(points: list[tuple[str, float, float]]) -> set[int]:
    """Indices not dominated (bound ≤, accuracy ≥, one strict) by a point of the same optimizer."""
    return {i for i, (opt, b, a) in enumerate(points)
            if not any(o == opt and bb <= b and aa >= a and (bb < b or aa > a) for o, bb, aa in points)}


def test_pareto_front_per_optimizer_matches_brute_force(tmp_path):
    points = [("muon", 2.0, 0.40), ("muon", 5.0, 0.45), ("muon", 5.0, 0.44), ("muon", 9.0, 0.43),
              ("muon", 30.0, 0.50), ("adamw", 3.0, 0.30), ("adamw", 1e6, 0.52), ("adamw", 50.0, 0.29)]
    runs = [run(f"tradeoff.{i}-0000000{i}", experiment="lipschitz_tradeoff", optimizer=o, lipschitz_bound=b,
                val_accuracy=a, max_activation=10.0 * i) for i, (o, b, a) in enumerate(points)]
    runs += [run("tradeoff.div-00000009", experiment="lipschitz_tradeoff", status="diverged", lipschitz_bound=1.0,
                 val_accuracy=0.9),
             run("other-0000000a", lipschitz_bound=1.0, val_accuracy=0.99)]  # not in the experiment
    con = database(tmp_path, runs)
    status = create_views(con)
    assert status["pareto"] == ""
    got = {int(name.split(".")[1]) for name, on in con.sql("select name, on_front from pareto").fetchall() if on}
    assert got == brute_force_front(points) == {0, 1, 4, 5, 6}
    assert con.execute("select count(*) from pareto").fetchall()[0][0] == len(points)


def test_lr_transfer_optimum_and_drift(tmp_path):
    # method sp_adamw: optimum halves with each width doubling → drift 4; muon: same lr → drift 1.
    losses = {("sp_adamw", 32): {0.0025: 2.0, 0.005: 1.9, 0.01: 1.5, 0.02: 1.7},
              ("sp_adamw", 64): {0.0025: 1.6, 0.005: 1.4, 0.01: 1.45, 0.02: 1.8},
              ("sp_adamw", 128): {0.0025: 1.3, 0.005: 1.35, 0.01: 1.6, 0.02: 2.5},
              ("muon", 32): {0.05: 1.5, 0.1: 1.4, 0.2: 1.4},   # tie → the smaller lr
              ("muon", 64): {0.05: 1.45, 0.1: 1.3, 0.2: 1.35}}
    runs, i = [], 0
    for (method, width), curve in losses.items():
        for lr, loss in curve.items():
            runs.append(run(f"lrt.{method}.w{width}.lr{lr}-{i:08x}", experiment="lr_transfer", d_model=width, lr=lr,
                            val_loss=loss))
            i += 1
    runs.append(run(f"lrt.muon.w64.lr1-{i:08x}", experiment="lr_transfer", d_model=64, lr=1.0,
                    status="diverged", val_loss=0.1))  # a diverged run never wins
    con = database(tmp_path, runs)
    create_views(con)
    got = {(m, w): (lr, edge, drift) for m, w, lr, edge, drift in con.sql(
        "select method, width, optimal_lr, at_grid_edge, drift from lr_transfer").fetchall()}
    assert got == {("sp_adamw", 32): (0.01, False, 4.0), ("sp_adamw", 64): (0.005, False, 4.0),
                   ("sp_adamw", 128): (0.0025, True, 4.0),
                   ("muon", 32): (0.1, False, 1.0), ("muon", 64): (0.1, False, 1.0)}
    assert con.execute("select final_loss from lr_transfer_runs where status = 'diverged'").fetchall()[0][0] is None


def test_lr_transfer_method_is_the_grid_label(tmp_path):
    """Two labels of the method axis with one parametrization + optimizer (AdamW with other betas; Muon + a
    weight constraint) were one method `sp+adamw`: four runs at two lrs (n_lrs 4), the optimum over both;
    each label is a method of its own, identical settings included."""
    points = [("adamw_plain", "none", 0.1, 1.5), ("adamw_plain", "none", 0.2, 1.4),
              ("adamw_beta", "none", 0.1, 1.2), ("adamw_beta", "none", 0.2, 1.3),
              ("muon_cap", "spectral_hard_cap", 0.1, 1.1), ("muon_cap", "spectral_hard_cap", 0.2, 1.0),
              ("adamw_again", "none", 0.1, 1.5), ("adamw_again", "none", 0.2, 1.4)]
    runs = [run(f"lrt.{label}.w32.lr{lr}-{i:08x}", experiment="lr_transfer", d_model=32, lr=lr, val_loss=loss,
                weight_constraint=constraint, optimizer="muon" if constraint != "none" else "adamw")
            for i, (label, constraint, lr, loss) in enumerate(points)]
    con = database(tmp_path, runs)
    create_views(con)
    got = {m: rest for m, *rest in con.sql("select method, optimal_lr, best_loss, n_lrs from lr_transfer").fetchall()}
    assert got == {"adamw_plain": [0.2, 1.4, 2], "adamw_beta": [0.1, 1.2, 2], "muon_cap": [0.2, 1.0, 2],
                   "adamw_again": [0.2, 1.4, 2]}


@pytest.mark.parametrize("name, label_axis", [("lr_transfer", "method"), ("super_consistency", "param")])
def test_a_grid_that_does_not_start_with_the_label_axis_is_refused(name, label_axis):
    """The views read a run's method (setting) from the second part of its name: a grid written over the
    built-in one with another axis first would group the runs by that axis's labels, so it is refused in one
    line naming the grid and the axis; the built-in grids start with it."""
    assert all(next(iter(grid)) == label_axis for preset in ("cpu", "paper")
               for grid in builtin_definitions()[name][preset]["grid"])
    grid = {"lr": [0.01, 0.1], label_axis: {"a": {"parametrization": "sp"}}}
    config = filled({"experiments": [name], "experiment_definitions": {name: {"cpu": {"grid": [grid]}}}})
    with pytest.raises(ConfigError, match=rf"^config error: experiment_definitions\.{name}\.cpu\.grid\[0\]: its first "
                                          rf"axis is 'lr', .* put '{label_axis}' first$"):
        expand_experiments(config)
    config["experiment_definitions"][name]["cpu"]["grid"] = [{label_axis: grid[label_axis], "lr": grid["lr"]}]
    assert len(expand_experiments(filled(config))) == 2
    # a config's block naming another label axis would pass the check while the views read the second part
    config["experiment_definitions"][name]["label_axis"] = "lr"
    config["experiment_definitions"][name]["cpu"]["grid"] = [{"lr": grid["lr"], label_axis: grid[label_axis]}]
    with pytest.raises(ConfigError, match=rf"^config error: experiment_definitions\.{name}\.label_axis: set by the "):
        expand_experiments(filled(config))


# (label axis, a label, an axis the views tell apart, a further axis on a key they do not)
VIEW_POINTS = {"lr_transfer": ("method", {"a": {"optimizer": "adamw"}}, {"lr": [0.01, 0.02]}, ("beta2", [0.95, 0.99])),
               "super_consistency": ("param", {"sp": {"parametrization": "sp"}}, {"n_layers": [1, 2]},
                                     ("weight_decay", [0.0, 0.1])),
               "rank_vs_n": (None, None, {"train_tokens": [2048, 8192]}, ("lr", [0.001, 0.003]))}


@pytest.mark.parametrize("name", sorted(VIEW_POINTS))
def test_runs_the_views_would_average_as_seeds_are_refused(name):
    """lr_transfer averaged every run at one (method, width, lr) as seeds and rank_vs_n fitted one slope per
    n_heads over every run: an axis a user adds after the label (beta2; an lr axis in rank_vs_n) was merged
    into those points without a word (n_seeds stayed 1). Two runs equal on the label and the experiment's
    point_keys but different in another key are refused, naming both and the key; a seed axis, or the key
    given one value per label, passes. The built-in grids of both presets pass."""
    label_axis, label, told_apart, (key, values) = VIEW_POINTS[name]
    block = builtin_definitions()[name]
    assert block.get("label_axis") == label_axis and key not in block["point_keys"]
    for preset in ("cpu", "paper"):
        assert resolve_runs(filled({"experiments": [name], "experiment_preset": preset}))
    grid = {**({label_axis: label} if label_axis else {}), **told_apart, key: values}
    config = {"experiments": [name], "experiment_definitions": {name: {"cpu": {"grid": grid}}}}
    with pytest.raises(ConfigError, match=rf"^config error: experiment '{name}': runs '[^']+' and '[^']+' differ in "
                                          rf"{key}, but its views group runs by .* would average or pool the two; "):
        resolve_runs(filled(config))
    with pytest.raises(ConfigError, match=rf"differ in {key}, "):  # a block written for the other preset too
        Plan.from_config({**config, "experiments": [], "experiment_definitions": {name: {"paper": {"grid": grid}}}})
    del grid[key]
    assert len(resolve_runs(filled(config))) == 2
    grid["seed"] = [0, 1]
    assert len(resolve_runs(filled(config))) == 4
    if label_axis:  # the key varied through the label: two settings, each its own point
        two = {f"{key}{i}": {**next(iter(label.values())), key: value} for i, value in enumerate(values)}
        config["experiment_definitions"][name]["cpu"]["grid"] = {label_axis: two, **told_apart}
        assert len(resolve_runs(filled(config))) == 4


# (label axis, a grid list defining one label twice or with a further key per grid; the key; a legitimate list)
ONE_SETTING_PER_LABEL = {
    "lr_transfer": ("method",
                    [{"method": {"a": {"optimizer": "adamw"}}, "width": {"w32": {"d_model": 32, "n_heads": 2}},
                      "lr": [0.01]},
                     {"method": {"a": {"optimizer": "muon"}}, "width": {"w64": {"d_model": 64, "n_heads": 4}},
                      "lr": [0.01]}], "optimizer"),
    "super_consistency": ("param",
                          [{"param": {"sp": {"parametrization": "sp"}}, "width": {"w32": {"d_model": 32, "n_heads": 2}},
                            "weight_decay": [0.0]},
                           {"param": {"sp": {"parametrization": "sp"}}, "width": {"w64": {"d_model": 64, "n_heads": 4}},
                            "weight_decay": [0.1]}], "weight_decay"),
    "rank_vs_n": (None, [{"train_tokens": [2048], "n_heads": [1], "lr": [0.01]},
                         {"train_tokens": [8192], "n_heads": [1], "lr": [0.001]}], "lr")}


@pytest.mark.parametrize("name", sorted(ONE_SETTING_PER_LABEL))
def test_runs_of_one_label_that_differ_outside_the_views_axes_are_refused(name):
    """point_keys caught two runs at one point only: a label defined twice in a list of grids (AdamW at one
    width, Muon at another, both 'a') or a further key given one value per grid (rank_vs_n's lr per n) put runs
    of two settings on one line, one optimum drift or one slope without a word. Runs of one label may differ
    only in the views' point keys and the keys an axis sets with them (n_heads beside d_model); else refused
    in one line naming both runs and the key. The built-in grids of both presets pass."""
    label_axis, grids, key = ONE_SETTING_PER_LABEL[name]
    for preset in ("cpu", "paper"):
        assert resolve_runs(filled({"experiments": [name], "experiment_preset": preset}))
    config = {"experiments": [name], "experiment_definitions": {name: {"cpu": {"grid": grids}}}}
    of = rf"of label '[^']+' on the '{label_axis}' axis " if label_axis else ""
    with pytest.raises(ConfigError, match=rf"^config error: experiment '{name}': runs '[^']+' and '[^']+' {of}differ "
                                          rf"in {key}, which no axis of its views' points \(.*\) sets: "):
        resolve_runs(filled(config))
    with pytest.raises(ConfigError, match=rf"differ in {key}, "):  # a block written, not selected
        Plan.from_config({**config, "experiments": []})
    if label_axis:  # one label each: two settings
        grids[1] = {**grids[1], label_axis: {"b": next(iter(grids[1][label_axis].values()))}}
    else:  # the key tied to the point axis it goes with
        grids = [{"n": {f"n{i}": {"train_tokens": grid["train_tokens"][0], key: grid[key][0]}
                        for i, grid in enumerate(grids)}, "n_heads": [1]}]
    config["experiment_definitions"][name]["cpu"]["grid"] = grids
    assert len(resolve_runs(filled(config))) == 2


def test_a_key_in_a_label_variant_or_tied_to_a_point_key_follows_the_label_and_the_point():
    """The review's two cases: a key written in the label's variant (weight_decay in super_consistency's `sp`,
    whose variant also sets point keys) differing between two grids of a list was taken for a point axis and let
    through; and a key tied to a point key (n_heads beside d_model) took two values at one d_model of one
    method. Both drew two settings as one; both are refused now, naming both runs and the key."""
    sc = [{"param": {"sp": {"parametrization": "sp", "weight_decay": 0.0}}, "width": {"w32": {"d_model": 32, "n_heads": 2}}},
          {"param": {"sp": {"parametrization": "sp", "weight_decay": 0.1}}, "width": {"w64": {"d_model": 64, "n_heads": 4}}}]
    with pytest.raises(ConfigError, match=r"^config error: experiment 'super_consistency': runs 'sc\.sp\.w32' and "
                                          r"'sc\.sp\.w64' of label 'sp' on the 'param' axis differ in weight_decay, "):
        resolve_runs(filled({"experiments": ["super_consistency"],
                             "experiment_definitions": {"super_consistency": {"cpu": {"grid": sc}}}}))
    method = {"a": {"optimizer": "adamw"}}
    lrt = [{"method": method, "width": {"w32": {"d_model": 32, "n_heads": 2}}, "lr": [0.01, 0.02]},
           {"method": method, "width": {"w32h4": {"d_model": 32, "n_heads": 4}}, "lr": [0.04]}]
    config = {"experiments": ["lr_transfer"], "experiment_definitions": {"lr_transfer": {"cpu": {"grid": lrt}}}}
    with pytest.raises(ConfigError, match=r"^config error: experiment 'lr_transfer': runs 'lrt\.a\.w32\.lr0\.01' and "
                                          r"'lrt\.a\.w32h4\.lr0\.04' of label 'a' on the 'method' axis have d_model 32 "
                                          r"but n_heads 2 and 4: its views would take them for one setting; "):
        resolve_runs(filled(config))
    lrt[1]["width"] = {"w64": {"d_model": 64, "n_heads": 4}}  # one n_heads per d_model: a width axis as it should be
    assert len(resolve_runs(filled(config))) == 3


@pytest.mark.parametrize("name", sorted(VIEW_POINTS))
def test_a_key_set_with_the_seed_is_no_seed_of_one_setting(name):
    """A seed variant axis that sets another key (``r0: {seed: 0, weight_decay: 0.0}, r1: {seed: 1, weight_decay:
    0.1}``) tied that key to seed, a point key, so each seed could take its own value: the views averaged (or
    pooled into one slope) the two settings as seeds without a word. Refused now, naming the key; a seed axis
    that also sets a point key ties the other key to that point key only."""
    label_axis, label, told_apart, (key, values) = VIEW_POINTS[name]
    rep = {f"r{i}": {"seed": i, key: value} for i, value in enumerate(values)}
    grid = {**({label_axis: label} if label_axis else {}), **told_apart, "rep": rep}
    config = {"experiments": [name], "experiment_definitions": {name: {"cpu": {"grid": grid}}}}
    with pytest.raises(ConfigError, match=rf"^config error: experiment '{name}': runs '[^']+' and '[^']+' .*differ "
                                          rf"in {key}, which no axis of its views' points \(.*\) sets: "):
        resolve_runs(filled(config))
    for variant in rep.values():  # the key given one value: a seed axis written as a variant
        variant[key] = values[0]
    assert len(resolve_runs(filled(config))) == 4


# grids of a list that overlap: one run under two names (the axes in another order, or a seed axis of the base seed)
OVERLAPPING_GRIDS = {
    "lr_transfer": [{"method": {"a": {"optimizer": "adamw"}}, "lr": [0.01, 0.02]},
                    {"method": {"a": {"optimizer": "adamw"}}, "lr": [0.01], "seed": [0]}],
    "super_consistency": [{"param": {"sp": {"parametrization": "sp"}}, "n_layers": [1, 2]},
                          {"param": {"sp": {"parametrization": "sp"}}, "depth": {"one": {"n_layers": 1}}}],
    "rank_vs_n": [{"train_tokens": [2048, 8192], "n_heads": [1]}, {"n_heads": [1], "train_tokens": [2048]}]}


@pytest.mark.parametrize("name", sorted(OVERLAPPING_GRIDS))
def test_one_run_under_two_names_is_refused(name):
    """Two grids of a list that overlap gave one run two names (rank.n2048.h1 and rank.h1.n2048): it trained
    twice, and rank_vs_n's slope weighed its point twice (lr_transfer and super_consistency averaged it with
    itself), without a word. Refused in one line naming both runs; the grids without the overlap pass."""
    grids = OVERLAPPING_GRIDS[name]
    config = {"experiments": [name], "experiment_definitions": {name: {"cpu": {"grid": grids}}}}
    with pytest.raises(ConfigError, match=rf"^config error: experiment '{name}': runs '[^']+' and '[^']+' have equal "
                                          r"settings, one run under two names "):
        resolve_runs(filled(config))
    config["experiment_definitions"][name]["cpu"]["grid"] = grids[:1]
    assert len(resolve_runs(filled(config))) == 2


def test_point_keys_are_run_keys_and_only_the_experiments_own():
    """Each point key names a run key (a misspelt one would make every run its own point); a config's block
    cannot set or change them, as it cannot label_axis."""
    from lipflow.config.runs import run_key_types
    blocks = builtin_definitions()
    assert {name for name, block in blocks.items() if "point_keys" in block} == set(VIEW_POINTS)
    assert all(set(block.get("point_keys", ())) <= set(run_key_types()) for block in blocks.values())
    config = filled({"experiments": ["lr_transfer"],
                     "experiment_definitions": {"lr_transfer": {"point_keys": ["d_model", "lr"]}}})
    with pytest.raises(ConfigError, match=r"^config error: experiment_definitions\.lr_transfer\.point_keys: set by "):
        expand_experiments(config)
    restated = filled({"experiments": ["lr_transfer"],  # the same keys in another order: the same point keys
                       "experiment_definitions": {"lr_transfer": {"point_keys": ["seed", "lr", "d_model"]}}})
    assert len(expand_experiments(restated)) == len(expand_experiments(filled({"experiments": ["lr_transfer"]})))
    own = filled({"experiments": ["mine"], "experiment_definitions": {"mine": {  # no views of its own to group by
        "short": "m", "point_keys": ["lr"], "cpu": {"grid": {"lr": [0.1, 0.2]}}}}})
    with pytest.raises(ConfigError, match=r"^config error: experiment_definitions\.mine\.point_keys: describes how an "
                                          r"experiment's views group its runs, and 'mine' has none \(no "
                                          r"lipflow/experiments/mine\.py\); leave point_keys out$"):
        resolve_runs(own)
    own["experiment_definitions"]["mine"] = {"short": "m", "label_axis": "lr", "cpu": {"grid": {"lr": [0.1]}}}
    with pytest.raises(ConfigError, match=r"^config error: experiment_definitions\.mine\.label_axis: describes how "):
        resolve_runs(own)


def test_lr_transfer_averages_the_seeds_of_a_point(tmp_path):
    """A seed axis gave two runs a point, counted as two lrs (n_lrs 4 of 2) with the luckiest seed's loss as
    the optimum's; a point is its seeds' mean, and an lr where a seed diverged is no optimum."""
    from lipflow.experiments.lr_transfer import lr_transfer
    from lipflow.results.plotting import pyplot

    points = [(0.1, 0, 1.0), (0.1, 1, 2.0), (0.2, 0, 1.4), (0.2, 1, 1.4), (0.4, 0, 0.5), (0.4, 1, None)]
    runs = [run(f"lrt.adamw.w16.lr{lr}.seed{seed}-{i:08x}", experiment="lr_transfer", d_model=16, lr=lr, seed=seed,
                val_loss=loss, status="completed" if loss is not None else "diverged")
            for i, (lr, seed, loss) in enumerate(points)]
    con = database(tmp_path, runs)
    create_views(con)
    assert con.sql("select method, optimal_lr, best_loss, n_seeds, n_lrs, at_grid_edge from lr_transfer").fetchall() \
        == [("adamw", 0.2, 1.4, 2, 2, False)]
    fig = lr_transfer(con)  # the width's line joins the means, not each seed's run (a zig-zag at every lr)
    (curve,) = [line for line in fig.axes[0].lines if line.get_linestyle() == "-"]
    assert list(curve.get_xdata()) == [0.1, 0.2] and list(curve.get_ydata()) == [1.5, 1.4]
    assert fig.axes[0].get_title() == "adamw: optimal-lr drift ×1"  # lr 0.4 was tried: 0.2 is inside the grid
    pyplot().close(fig)


def test_sharpness_spread_across_widths_and_depths(tmp_path):
    runs = [run("sc.sp.w32.L2-00000001", experiment="super_consistency", d_model=32, n_layers=2),
            run("sc.sp.w64.L2-00000002", experiment="super_consistency", d_model=64, n_layers=2),
            run("sc.sp.w128.L2-00000003", experiment="super_consistency", d_model=128, n_layers=2),
            run("sc.sp.w64.L4-00000004", experiment="super_consistency", d_model=64, n_layers=4),
            run("sc.mup.w32.L2-00000005", experiment="super_consistency", d_model=32, n_layers=2, parametrization="mup")]
    sharp = {"sc.sp.w32.L2-00000001": [1.0, 2.0], "sc.sp.w64.L2-00000002": [2.0, 2.0],
             "sc.sp.w128.L2-00000003": [3.0, 2.0], "sc.sp.w64.L4-00000004": [5.0, 4.0],
             "sc.mup.w32.L2-00000005": [7.0, 7.0]}
    # The preconditioned sharpness is 10× the sharpness, except sc.c's at step 20 (40 instead of 20).
    metrics = [{"run_id": r, "step": s, "loss": 1.0, "sharpness": v,
                "preconditioned_sharpness": 40.0 if (r, s) == ("sc.sp.w128.L2-00000003", 20) else 10 * v}
               for r, values in sharp.items() for s, v in zip((10, 20), values)]
    metrics += [{"run_id": "sc.sp.w32.L2-00000001", "step": 15, "loss": 1.0, "sharpness": None,
                 "preconditioned_sharpness": None}]
    con = database(tmp_path, runs, metrics)
    create_views(con)
    rows = con.sql("select axis, parametrization, fixed_size, step, n_models, spread, preconditioned_spread "
                   "from sharpness_spread order by axis, step").fetchall()
    # widths 32/64/128 at depth 2: step 10 → (3−1)/2 = 1, step 20 → 0; depths 2/4 at width 64: (5−2)/3.5, (4−2)/3;
    # preconditioned: the same ratios, except widths at step 20: (40 − 20)/(80/3) = 0.75
    assert rows == [("depth", "sp", 64, 10, 2, pytest.approx(3 / 3.5), pytest.approx(3 / 3.5)),
                    ("depth", "sp", 64, 20, 2, pytest.approx(2 / 3), pytest.approx(2 / 3)),
                    ("width", "sp", 2, 10, 3, pytest.approx(1.0), pytest.approx(1.0)),
                    ("width", "sp", 2, 20, 3, pytest.approx(0.0), pytest.approx(0.75))]


def test_rank_bound_gap_rescaled_bound_and_fitted_slopes(tmp_path):
    runs, metrics, evals = [], [], []
    for i, (n_tokens, heads) in enumerate(itertools.product([640, 2560, 10240], [1, 4])):
        run_id = f"rank.{i}-{i:08x}"
        n = n_tokens / 64
        gap = 3.0 * n ** -0.5 * heads
        runs.append(run(run_id, experiment="rank_vs_n", train_tokens=n_tokens, n_heads=heads, steps=100,
                        val_loss=2.0 + gap))
        # train loss 2.0 over the last 10% of steps (91..100), something else before
        metrics += [{"run_id": run_id, "step": s, "loss": 2.0 if s > 90 else 5.0, "sharpness": None,
                     "preconditioned_sharpness": None}
                    for s in range(1, 101)]
        b3_at_eval = 7.0 * n ** 0.2  # at n_eval = 256; rescaled to n it is 7·n^0.2·√(256/n) ∝ n^-0.3
        evals += [{"run_id": run_id, "eval": "rank", "metric": "b3_rademacher_sum", "value": b3_at_eval, "n": 256,
                   "matrix": None, "rtol": None},
                  {"run_id": run_id, "eval": "rank", "metric": "generalization_gap", "value": 0.1, "n": None,
                   "matrix": None, "rtol": None}]
        evals += [{"run_id": run_id, "eval": "rank", "metric": "numerical_rank", "value": float(r), "n": None,
                   "matrix": "qk", "rtol": rtol} for r, rtol in ((3, 0.01), (5, 0.01), (9, 0.001))]
    con = database(tmp_path, runs, metrics, evals)
    con.execute("UPDATE shards SET tokens = 10240 WHERE split = 'train'")  # a split that holds every run's tokens
    create_views(con)
    rows = con.sql("select n_heads, n_sequences, measured_gap, b3_bound, qk_rank, gap_slope, bound_slope "
                   "from rank_bound order by n_heads, n_sequences").df()
    assert len(rows) == 6
    assert rows.n_sequences.tolist() == [10.0, 40.0, 160.0] * 2
    assert rows.measured_gap.tolist() == pytest.approx([3.0 * n ** -0.5 * h for h in (1, 4) for n in (10, 40, 160)])
    assert rows.b3_bound.tolist() == pytest.approx([7.0 * n ** 0.2 * (256 / n) ** 0.5 for n in (10, 40, 160)] * 2)
    assert rows.qk_rank.tolist() == pytest.approx([4.0] * 6)  # mean over heads at rtol 1e-2 only
    assert rows.gap_slope.tolist() == pytest.approx([-0.5] * 6)
    assert rows.bound_slope.tolist() == pytest.approx([-0.3] * 6)


def test_robustness_unites_lm_and_image_mlp_and_precision_pivots(tmp_path):
    runs = [run("robust.lip-00000001", experiment="robustness", model="lipschitz_gpt", optimizer="muon"),
            run("prec.lip-00000002", experiment="precision", model="lipschitz_gpt", max_activation=3.0)]
    evals = [{"run_id": "robust.lip-00000001", "eval": "robustness", "metric": m, "value": v, "epsilon": e,
              "attack": a, "k": k, "format": None, "scaling": None}
             for m, v, e, a, k in [("certificate_l2", 4.0, None, None, None), ("clean_accuracy", 0.5, None, None, None),
                                   ("robust_accuracy", 0.3, 0.5, "pgd", None), ("robust_accuracy", 0.4, None, "greedy", 1),
                                   ("certified_accuracy", 0.2, 0.5, None, None),
                                   ("lipschitz_lower_bound", 1.0, None, "pgd", None),
                                   ("lipschitz_lower_bound", 2.0, None, "all", None)]]
    evals += [{"run_id": "prec.lip-00000002", "eval": "precision", "metric": m, "value": v, "epsilon": None,
               "attack": None, "k": None, "format": f, "scaling": s}
              for m, v, f, s in [("accuracy", 0.5, "fp32", None), ("accuracy", 0.45, "fp8_e4m3", "none"),
                                 ("accuracy_delta", -0.05, "fp8_e4m3", "none"), ("activation_overflow", 3.0, "fp8_e4m3", "none"),
                                 ("accuracy", 0.49, "fp8_e4m3", "per_tensor"), ("fp8_safe_proven", 1.0, "fp8_e4m3", None)]]
    con = database(tmp_path, runs, evals=evals)
    image = tmp_path / "image_mlp"
    image.mkdir()
    method = {"method": "muon_soft_cap", "optimizer": "muon", "weight_constraint": "spectral_soft_cap", "seed": 0}
    write_table_parquet(image / "robustness.parquet", pa.Table.from_pylist([
        {"metric": "certificate_l2", "value": 15.0, **method, "epsilon": None},
        {"metric": "robust_accuracy", "value": 0.8, **method, "epsilon": 0.5},
        {"metric": "matched_step", "value": 300.0, **method, "epsilon": None}]))
    assert load_study_tables(con, [image / "robustness.parquet"]) == {"image_mlp_robustness": 3}
    status = create_views(con)
    assert status["robustness"] == "" and status["precision"] == ""
    rows = con.sql("select domain, label, certificate_l2, metric, attack, epsilon, k, value from robustness "
                   "order by domain, metric, value").fetchall()
    assert rows == [
        ("image_mlp", "muon_soft_cap", 15.0, "robust_accuracy", "pgd", 0.5, None, 0.8),
        ("lm", "lip", 4.0, "certified_accuracy", None, 0.5, None, 0.2),
        ("lm", "lip", 4.0, "clean_accuracy", None, None, None, 0.5),
        ("lm", "lip", 4.0, "lipschitz_lower_bound", None, None, None, 2.0),
        ("lm", "lip", 4.0, "robust_accuracy", "pgd", 0.5, None, 0.3),
        ("lm", "lip", 4.0, "robust_accuracy", "greedy", None, 1, 0.4)]
    cells = con.sql("select format, scaling, accuracy, accuracy_delta, activation_overflow, fp8_safe_proven "
                    "from precision order by format, scaling").fetchall()
    assert cells == [("fp32", None, 0.5, None, None, None), ("fp8_e4m3", "none", 0.45, -0.05, 3.0, 1.0),
                     ("fp8_e4m3", "per_tensor", 0.49, None, None, 1.0)]


def test_local_certificate_rows_reach_the_robustness_and_pareto_views(tmp_path):
    runs = [run("robust.lip-00000001", experiment="robustness", model="lipschitz_gpt", optimizer="muon"),
            run("tradeoff.a-00000002", experiment="lipschitz_tradeoff", lipschitz_bound=5.0, val_accuracy=0.4),
            run("tradeoff.b-00000003", experiment="lipschitz_tradeoff", lipschitz_bound=9.0, val_accuracy=0.5)]
    evals = [{"run_id": rid, "eval": "robustness", "metric": m, "value": v, "epsilon": e, "attack": a, "k": None}
             for rid, m, v, e, a in [("robust.lip-00000001", "certified_accuracy_local", 0.3, 0.5, None),
                                     ("robust.lip-00000001", "tightness_local", 0.2, 0.5, "pgd"),
                                     ("robust.lip-00000001", "tightness_global", 1e-6, 0.5, "pgd"),
                                     ("robust.lip-00000001", "within_100x_local", 0.7, 0.01, "pgd_half_certified"),
                                     ("tradeoff.b-00000003", "half_certified_epsilon", 0.01, None, None)]]
    con = database(tmp_path, runs, evals=evals)
    status = create_views(con)
    assert status["robustness"] == "" and status["pareto"] == ""
    rows = con.sql("select metric, attack, epsilon, value from robustness order by metric").fetchall()
    assert rows == [("certified_accuracy_local", None, 0.5, 0.3), ("tightness_global", "pgd", 0.5, 1e-6),
                    ("tightness_local", "pgd", 0.5, 0.2), ("within_100x_local", "pgd_half_certified", 0.01, 0.7)]
    assert con.sql("select name, local_radius from pareto order by name").fetchall() == [
        ("tradeoff.a", None), ("tradeoff.b", 0.01)]


def test_precision_bounds_pairs_constrained_and_unconstrained_runs_at_the_closest_accuracy(tmp_path):
    """Each run is matched with the run of the same model and the other kind (constrained or not) of the
    closest fp32 accuracy; the baseline gpt (no analytic bound, no constrained twin) gets its observed max
    and no match, and lipschitz_gpt_unscaled's runs match each other only."""
    specs = [("prec.cap-00000001", "lipschitz_gpt", "spectral_soft_cap", 400, 0.30, 4.0, 2.0),
             ("prec.free-00000002", "lipschitz_gpt", "none", 400, 0.45, 900.0, 9.0),
             ("prec.free.T100-00000003", "lipschitz_gpt", "none", 100, 0.28, 300.0, 6.0),
             ("prec.free.T50-00000004", "lipschitz_gpt", "none", 50, 0.20, 100.0, 5.0),
             ("prec.gpt-00000005", "gpt", "none", 400, 0.50, None, 17.0),
             ("prec.ucap-00000006", "lipschitz_gpt_unscaled", "spectral_soft_cap", 400, 0.29, 40.0, 3.0),
             ("prec.ufree-00000007", "lipschitz_gpt_unscaled", "none", 400, 0.44, 5000.0, 12.0)]
    runs = [run(rid, experiment="precision", model=m, weight_constraint=c, steps=t) for rid, m, c, t, *_ in specs]
    evals = []
    for rid, model, _, _, acc, proven, seen in specs:
        rows = [("accuracy", acc, "fp32"), ("observed_max_activation", seen, None),
                ("fp8_safe_proven", float("nan") if proven is None else float(proven <= 448), "fp8_e4m3")]
        if proven is not None:
            rows += [("proven_max_activation", proven, None), ("proven_over_observed", proven / seen, None)]
        evals += [{"run_id": rid, "eval": "precision", "metric": m, "value": v, "format": f, "scaling": None}
                  for m, v, f in rows]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con)["precision_bounds"] == ""
    got = {r[0]: r[1:] for r in con.sql(
        "select label, matched_label, matched_proven_max_activation, proven_over_observed, e4m3_proven_safe "
        "from precision_bounds").fetchall()}
    assert got["cap"] == ("free.T100", 300.0, 2.0, 1.0)          # 0.28 is the closest to 0.30
    assert got["free"][:2] == ("cap", 4.0) and got["free"][3] == 0.0
    assert got["free.T50"][0] == "cap"
    assert got["gpt"][:3] == (None, None, None) and math.isnan(got["gpt"][3])
    assert got["ucap"][:2] == ("ufree", 5000.0) and got["ufree"][:2] == ("ucap", 40.0)


def icl_tables(layer_losses: dict[int, tuple[float, float]], n: int = 20) -> dict[str, list[dict]]:
    """The ICL study's tables (lipflow.studies.icl.study) for a layer sweep at n and an n sweep at the largest L."""
    top = max(layer_losses)
    by_layers = [{"method": m, "n_layers": L, "n": n, "loss": v, "loss_stderr": 0.0, "expected_loss": None}
                 for L, (model, pgd) in layer_losses.items()
                 for m, v in (("transformer", model), ("pgd", pgd), ("gd", 0.9), ("least_squares", 0.01))]
    by_n = [dict(r, n=k) for r in by_layers if r["n_layers"] == top for k in (n // 2, n)]
    agreement = [{"n_layers": L, "n": n, "reference": ref, "transformer_loss": model, "reference_loss": pgd,
                  "loss_ratio": model / pgd, "prediction_mse": 0.0, "relative_prediction_mse": 1e-3 * L,
                  "prediction_correlation": 0.99} for L, (model, pgd) in layer_losses.items()
                 for ref in ("pgd", "one_step_optimal")]
    steps = [{"n_layers": L, "n": n, "rank": r, "layer": r, "learned": 1.0, "optimal_pgd": 1.0, "rel_error": 0.01 * r}
             for L in layer_losses for r in range(L)]
    return {"icl_loss_by_layers": by_layers, "icl_loss_by_n": by_n, "icl_agreement": agreement,
            "icl_step_sizes": steps}


def test_icl_view_reads_the_icl_tables_and_is_empty_with_a_reason_without_them(tmp_path):
    con = database(tmp_path, [run("x-00000001")], extra=icl_tables({1: (0.5, 0.4), 3: (0.13, 0.13)}))
    create_views(con)
    assert con.sql("select sweep, n_layers, n, ratio_to_pgd, gd_loss, relative_prediction_mse, max_step_size_rel_error "
                   "from icl_vs_pgd order by sweep, n_layers, n").fetchall() == [
        ("layers", 1, 20, pytest.approx(1.25), 0.9, pytest.approx(1e-3), pytest.approx(0.0)),
        ("layers", 3, 20, pytest.approx(1.0), 0.9, pytest.approx(3e-3), pytest.approx(0.02)),
        ("n", 3, 10, pytest.approx(1.0), 0.9, None, None),
        ("n", 3, 20, pytest.approx(1.0), 0.9, pytest.approx(3e-3), pytest.approx(0.02))]
    (tmp_path / "bare").mkdir()
    bare = database(tmp_path / "bare", [run("x-00000001")])
    create_views(bare)
    comment = bare.execute("select comment from duckdb_views() where view_name = 'icl_vs_pgd'").fetchall()[0][0]
    assert comment.startswith("empty:") and "ICL study did not run" in comment


def test_every_view_exists_with_its_declared_columns_whether_empty_or_not(tmp_path):
    con = database(tmp_path, [run("baseline-00000001")])
    status = create_views(con)
    assert set(status) == set(VIEWS.names())
    for name in VIEWS.names():
        described = [(c, t) for c, t, *_ in con.sql(f"describe {name}").fetchall()]
        assert described == list(VIEWS.get(name).column_types.items()), name
        assert con.execute(f"select count(*) from {name}").fetchall()[0][0] == 0
        assert status[name].startswith("empty: ")
    assert all(v in VIEWS for views in EXPERIMENT_VIEWS.values() for v in views)


# --------------------------------------------------------------------------- figures

@pytest.fixture
def filled_database(tmp_path) -> Path:
    """A database on disk whose every headline view has rows."""
    runs, metrics, evals = [], [], []
    for i, (opt, b, a) in enumerate([("muon", 2.0, 0.4), ("muon", 20.0, 0.5), ("adamw", 1e5, 0.45)]):
        runs.append(run(f"tradeoff.{i}-{i:08x}", experiment="lipschitz_tradeoff", optimizer=opt, lipschitz_bound=b,
                        val_accuracy=a, max_activation=3.0 + i, weight_constraint="spectral_soft_cap"))
    for j, (w, lr) in enumerate(itertools.product([32, 64], [0.01, 0.02])):
        runs.append(run(f"lrt.sp_adamw.w{w}.lr{lr}-{10 + j:08x}", experiment="lr_transfer", d_model=w, lr=lr,
                        val_loss=2 + lr * w / 64))
    for j, (p, w) in enumerate(itertools.product(["sp", "mup"], [32, 64])):
        rid = f"sc.{p}.w{w}.L2-{20 + j:08x}"
        runs.append(run(rid, experiment="super_consistency", parametrization=p, d_model=w))
        metrics += [{"run_id": rid, "step": s, "loss": 2.0, "sharpness": s / w,
                     "preconditioned_sharpness": 10 * s / w} for s in (10, 20)]
    for j, n in enumerate([640, 6400]):
        rid = f"rank.{j}-{30 + j:08x}"
        runs.append(run(rid, experiment="rank_vs_n", train_tokens=n, val_loss=2.5 - j * 0.3))
        metrics += [{"run_id": rid, "step": s, "loss": 2.0, "sharpness": None,
                     "preconditioned_sharpness": None} for s in (95, 100)]
        evals += [{"run_id": rid, "eval": "rank", "metric": "b3_rademacher_sum", "value": 50.0, "n": 256, "matrix": None,
                   "rtol": None, "epsilon": None, "attack": None, "k": None, "format": None, "scaling": None},
                  {"run_id": rid, "eval": "rank", "metric": "numerical_rank", "value": 8.0, "n": None, "matrix": "qk",
                   "rtol": 0.01, "epsilon": None, "attack": None, "k": None, "format": None, "scaling": None}]
    runs += [run("robust.m-00000040", experiment="robustness"), run("prec.m-00000041", experiment="precision")]
    evals += [{"run_id": "robust.m-00000040", "eval": "robustness", "metric": "robust_accuracy", "value": 0.5 - e,
               "n": None, "matrix": None, "rtol": None, "epsilon": e, "attack": "pgd", "k": None, "format": None,
               "scaling": None} for e in (0.0, 0.25)]
    evals += [{"run_id": "prec.m-00000041", "eval": "precision", "metric": "accuracy", "value": 0.5, "n": None,
               "matrix": None, "rtol": None, "epsilon": None, "attack": None, "k": None, "format": f, "scaling": s}
              for f, s in (("fp32", None), ("bf16", "none"), ("bf16", "per_tensor"))]
    con = database(tmp_path, runs, metrics, evals, extra=icl_tables({1: (0.5, 0.4), 2: (0.3, 0.25)}))
    status = create_views(con)
    empty = {name: status[views[0]] for name, views in EXPERIMENT_VIEWS.items() if status[views[0]] != ""}
    assert not empty, ("every experiment's headline view needs rows in this database, which the tests of its views and "
                       f"figures read: add its runs' rows to filled_database (tests/test_experiments.py) for {empty}")
    con.close()
    return tmp_path / "test.duckdb"


def test_every_declared_column_is_in_every_part_of_its_view(filled_database):
    """On a database with every table a part needs, each part's SELECT yields every column its view
    declares, and the view's cast of it has the declared names and types in order."""
    con = duckdb.connect(str(filled_database))
    make_table(con, "image_mlp_robustness", [{"method": "muon_soft_cap", "optimizer": "muon",
                                              "weight_constraint": "spectral_soft_cap", "seed": 0,
                                              "metric": "robust_accuracy", "value": 0.8, "epsilon": 0.5}])
    for name in VIEWS.names():
        view = VIEWS.get(name)
        for part in view.parts:
            assert missing_requirement(con, part) is None, name
            produced = {column for column, *_ in con.sql(f"describe select * from ({part.sql})").fetchall()}
            assert set(view.columns) <= produced, (name, sorted(set(view.columns) - produced))
            cast = [(column, sql_type) for column, sql_type, *_ in con.sql(f"describe {view.select(part)}").fetchall()]
            assert cast == list(view.column_types.items()), name


def readme_queries() -> list[str]:
    """Every SQL statement the README shows: each `lipflow query "…"` (but its "..." placeholder), each
    line of its ```sql block and each inline `select …` span."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    queries = [sql for sql in re.findall(r'lipflow query "([^"]+)"', readme) if sql.strip(". …")]
    for block in re.findall(r"^```sql\n(.*?)^```", readme, re.S | re.M):
        queries += [line.strip().rstrip(";") for line in block.splitlines()
                    if line.strip() and not line.startswith("--")]
    return queries + re.findall(r"`(select [^`]+)`", readme, re.I)


def test_every_query_the_readme_shows_runs_on_a_filled_database(filled_database, capsys):
    """README drift: each query the README shows (the quick start's, the Outputs section's, the
    experiments' views) names tables, views and columns that exist and passes `lipflow query`'s checks;
    a renamed view or column (e.g. `pareto.on_front`, `precision_bounds.matched_label`) fails here."""
    from lipflow.cli import main as cli_main

    queries = readme_queries()
    assert len(queries) >= 10 and any("from pareto" in sql for sql in queries), queries
    failed = {}
    for sql in queries:
        if cli_main(["query", sql, "--db", str(filled_database), "--format", "csv"]) != 0:
            failed[sql] = capsys.readouterr().err.strip()
        capsys.readouterr()
    assert not failed, failed


def test_the_readmes_table_of_experiments_names_each_experiment_and_its_views():
    """README drift: the Experiments section's table has one row per experiment of the catalog, and its
    `view` column names exactly that experiment's views (headline first); a new experiment or a renamed
    view would leave the table naming what the database does not have."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n| experiment | what it shows | view |\n", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([a-z_]+)`", cells[0])
        if len(cells) == 3 and name:
            rows[name.group(1)] = tuple(re.findall(r"`([a-z_]+)`", cells[2]))
    assert rows == {name: tuple(views) for name, views in EXPERIMENT_VIEWS.items()}


def test_a_built_view_is_commented_with_its_caption_text(filled_database):
    con = duckdb.connect(str(filled_database), read_only=True)
    comments = dict(con.execute("select view_name, comment from duckdb_views() where not internal").fetchall())
    for views in EXPERIMENT_VIEWS.values():
        caption = (REPO / "workflow" / "report" / VIEWS.get(views[0]).caption).read_text()
        assert comments[views[0]] == " ".join(caption.replace("``", "").split())
        assert comments[views[0]].startswith(f"View {views[0]}: ")


def test_a_column_has_one_type_in_every_view():
    shared = View(columns=("run_id", "lr"), parts=(), caption="t.rst")
    assert shared.column_types == {"run_id": "VARCHAR", "lr": "DOUBLE"}
    with pytest.raises(ValueError, match="'lr' is typed in SHARED_TYPES already"):
        View(columns=("lr",), types={"BIGINT": ("lr",)}, parts=(), caption="t.rst")
    with pytest.raises(ValueError, match="'gap' has no type"):
        View(columns=("run_id", "gap"), parts=(), caption="t.rst")
    with pytest.raises(ValueError, match="'gap' is typed but is not one of the view's columns"):
        View(columns=("run_id",), types={"DOUBLE": ("gap",)}, parts=(), caption="t.rst")
    with pytest.raises(ValueError, match="listed as both DOUBLE and BIGINT"):
        View(columns=("gap",), types={"DOUBLE": ("gap",), "BIGINT": ("gap",)}, parts=(), caption="t.rst")
    mine = View(columns=("gap",), types={"DOUBLE": ("gap",)}, parts=(), caption="a.rst")
    with pytest.raises(ValueError, match="'gap' is typed by views a and b: .*SHARED_COLUMNS: move it there from both "
                                         "views' types"):
        check_column_types({"a": mine, "b": View(columns=("gap",), types={"BIGINT": ("gap",)}, parts=(), caption="b.rst")})
    check_column_types({name: VIEWS.get(name) for name in VIEWS.names()})  # the shipped views agree


def test_plots_cli_writes_every_figure_and_table(filled_database, tmp_path, capsys):
    out, tables = tmp_path / "figures", tmp_path / "tables"
    assert plots_main(["--db", str(filled_database), "--out-dir", str(out), "--tables-dir", str(tables)]) == 0
    assert set(SHIPPED_EXPERIMENTS) <= set(EXPERIMENT_FIGURES)
    for figures in EXPERIMENT_FIGURES.values():
        for fig in figures:
            assert (out / f"{fig}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert b"<svg" in (out / f"{fig}.svg").read_bytes()[:2000]
    lrt = (tables / "lr_transfer.csv").read_text().splitlines()
    assert lrt[0].startswith("method,width,optimal_lr") and len(lrt) == 3
    assert not list(out.glob(".*tmp*"))


def test_plots_cli_replaces_its_own_figures_and_tables_but_no_other_file(filled_database, tmp_path, capsys):
    out, tables = tmp_path / "figures", tmp_path / "tables"
    args = ["--db", str(filled_database), "--out-dir", str(out), "--tables-dir", str(tables)]
    assert plots_main(args) == 0 and plots_main(args) == 0  # the second run replaces the first's files
    figure = next(iter(EXPERIMENT_FIGURES["lr_transfer"]))
    for path, flag in ((out / f"{figure}.png", "--out-dir"), (tables / "lr_transfer.csv", "--tables-dir")):
        path.write_bytes(b"my own figure, or my own table\n")
        assert_plots_refuse_and_keep(args, capsys, path, flag)
        path.unlink()


def test_a_table_lipflow_wrote_before_its_view_changed_columns_is_replaced(filled_database, tmp_path, capsys):
    """A view that gains a column (an upgrade) leaves its earlier CSV with another header: the table's
    sidecar marks it as lipflow's, so the plots job replaces it, where it refused its own file until the user
    deleted it; the same old header without a matching sidecar (edited, or a user's file) is still refused."""
    from lipflow.atomic import sidecar_path, write_with_sidecar

    out, tables = tmp_path / "figures", tmp_path / "tables"
    args = ["--db", str(filled_database), "--out-dir", str(out), "--tables-dir", str(tables)]
    table = tables / "lr_transfer.csv"
    older = b"method,width,optimal_lr,best_loss\nsp+adamw,32,0.01,1.5\n"  # before n_seeds and the rest
    tables.mkdir()
    write_with_sidecar(table, older)
    assert plots_main(args) == 0
    assert table.read_text().splitlines()[0] == "method,width,optimal_lr,best_loss,n_seeds,n_lrs,at_grid_edge,n_widths,drift"
    assert sidecar_path(table).read_text() == hashlib.sha256(table.read_bytes()).hexdigest() + "\n"
    table.write_bytes(older)  # the old header, bytes its sidecar does not seal
    capsys.readouterr()
    assert plots_main(args) == 2
    assert f"--tables-dir {table} exists and is not a table of view lr_transfer" in capsys.readouterr().err
    assert table.read_bytes() == older
    table.unlink()
    sidecar_path(table).write_text("my notes on the table\n")  # a user's file in the sidecar's place
    figure = out / f"{next(iter(EXPERIMENT_FIGURES['lr_transfer']))}.png"
    drawn = figure.stat().st_mtime_ns
    assert plots_main(args) == 2
    assert f"--tables-dir {sidecar_path(table)} exists and is not a sha256 checksum" in capsys.readouterr().err
    assert figure.stat().st_mtime_ns == drawn and not table.exists()  # refused before anything was drawn


def assert_plots_refuse_and_keep(args: list[str], capsys, path: Path, flag: str, what: str = "") -> None:
    """The plots command refuses the file at ``path`` in one line naming ``flag`` (and ``what`` it is not),
    exits 2, and leaves the file as it was."""
    kept = path.read_bytes()
    capsys.readouterr()
    assert plots_main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{flag} {path} exists and is not{what}" in err, err
    assert path.read_bytes() == kept


def test_a_table_of_the_view_edited_by_its_user_is_refused_not_replaced(filled_database, tmp_path, capsys):
    """A table lipflow wrote, then edited by its user (a cell changed, a note added: the header unchanged), no
    longer matches its sidecar: it is the user's now and is refused in one line and kept, where the plots job
    took the header alone as the mark of its own table and wrote over the edit. A table of the view's header
    without a sidecar (written before tables had one) is still replaced, and gains its sidecar."""
    from lipflow.atomic import is_sealed, sidecar_path

    out, tables = tmp_path / "figures", tmp_path / "tables"
    args = ["--db", str(filled_database), "--out-dir", str(out), "--tables-dir", str(tables)]
    assert plots_main(args) == 0
    table = tables / "lr_transfer.csv"
    lines = table.read_text().splitlines()
    edited = "\n".join([lines[0], lines[1] + "  # checked by hand", *lines[2:]]) + "\n"
    table.write_text(edited)
    assert_plots_refuse_and_keep(args, capsys, table, "--tables-dir")
    sidecar_path(table).unlink()  # a table from before sidecars: the view's header, no sidecar
    table.write_text("\n".join(lines) + "\n")
    assert plots_main(args) == 0 and is_sealed(table)


def test_a_table_whose_write_a_crash_cut_short_is_replaced_not_refused(filled_database, tmp_path):
    """A plots job killed between writing a table and cutting its sidecar to the table's digest left the sidecar
    listing two digests (the table's and the one before): the next plots job takes the table for its own and
    replaces it, where it refused lipflow's own table as a user's edit."""
    import hashlib

    from lipflow.atomic import is_sealed, sidecar_path

    out, tables = tmp_path / "figures", tmp_path / "tables"
    args = ["--db", str(filled_database), "--out-dir", str(out), "--tables-dir", str(tables)]
    assert plots_main(args) == 0
    table = tables / "lr_transfer.csv"
    written = sidecar_path(table).read_text()
    sidecar_path(table).write_text(written + hashlib.sha256(b"the table before").hexdigest() + "\n")
    assert plots_main(args) == 0 and is_sealed(table) and sidecar_path(table).read_text() == written


def test_a_figure_lipflow_drew_and_its_user_annotated_is_refused_not_replaced(filled_database, tmp_path, capsys):
    """An SVG lipflow drew, annotated by its user in an editor that keeps the file's metadata (lipflow's mark),
    was taken for lipflow's own by the mark alone and drawn over at the next figures job. Each figure has a
    .sha256 sidecar now: one that no longer matches it is the user's, refused in one line and kept, before
    anything is drawn; a marked figure without a sidecar (drawn before figures had one) is still replaced."""
    from lipflow.atomic import is_sealed, sidecar_path

    out, tables = tmp_path / "figures", tmp_path / "tables"
    args = ["--db", str(filled_database), "--out-dir", str(out), "--tables-dir", str(tables),
            "--experiment", "lr_transfer"]
    assert plots_main(args) == 0
    figure = out / f"{next(iter(EXPERIMENT_FIGURES['lr_transfer']))}.svg"
    assert is_sealed(figure) and is_sealed(figure.with_suffix(".png"))
    annotated = figure.read_text().replace("</svg>", '<text x="9" y="9">checked by hand</text></svg>')
    figure.write_text(annotated)
    table = tables / "lr_transfer.csv"
    written = table.stat().st_mtime_ns
    assert_plots_refuse_and_keep(args, capsys, figure, "--out-dir", " a figure lipflow drew")
    assert table.stat().st_mtime_ns == written
    sidecar_path(figure).unlink()  # a figure from before figures had a sidecar: lipflow's by its mark
    assert plots_main(args) == 0 and is_sealed(figure) and "checked by hand" not in figure.read_text()


def test_plots_cli_names_the_reason_for_an_empty_experiment(tmp_path, capsys):
    con = database(tmp_path, [run("baseline-00000001")])
    create_views(con)
    con.close()
    db = str(tmp_path / "test.duckdb")
    assert plots_main(["--db", db, "--out-dir", str(tmp_path / "f"), "--experiment", "icl"]) == 2
    err = capsys.readouterr().err
    assert "view icl_vs_pgd is empty" in err and "ICL study did not run" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "f").exists()
    assert plots_main(["--db", db, "--experiment", "lr_transfr"]) == 2
    assert "did you mean 'lr_transfer'" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end

TINY_LR_TRANSFER = {
    "lr_transfer": {"cpu": {
        "base": {"steps": 6, "eval_every": 3, "eval_batches": 1, "context": 16, "batch_size": 4, "n_layers": 1},
        "grid": {"method": {"sp_adamw": {"parametrization": "sp", "optimizer": "adamw"}},
                 "width": {"w16": {"d_model": 16, "n_heads": 2}, "w32": {"d_model": 32, "n_heads": 2}},
                 "lr": [0.003, 0.03]}}}}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "-c2", *SNAKEMAKE_SINGLE_THREADED, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_tiny_experiment_end_to_end_fills_view_figure_and_report(tmp_path):
    config = yaml.safe_load((REPO / "tests" / "data" / "tiny_config.yaml").read_text())
    assert config["runs"] and len(config["evaluations"]["enabled"]) == 5
    config.update(experiments=["lr_transfer"], experiment_definitions=TINY_LR_TRANSFER)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # axis order = name order
    done = snakemake(tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    con = duckdb.connect(str(tmp_path / "results" / "lipflow.duckdb"), read_only=True)
    runs = con.sql("select name, status from runs order by name").fetchall()
    assert [r[0] for r in runs] == ["lrt.sp_adamw.w16.lr0.003", "lrt.sp_adamw.w16.lr0.03",
                                    "lrt.sp_adamw.w32.lr0.003", "lrt.sp_adamw.w32.lr0.03"]  # not `runs`
    assert "run(s) of `runs` are not trained" in done.stderr
    assert con.sql("select distinct eval from evals").fetchall() == [("val",)]  # lr_transfer's list only
    best = con.sql("select width, optimal_lr, best_loss, n_lrs, drift from lr_transfer order by width").fetchall()
    curves = con.sql("select width, lr, final_loss from lr_transfer_runs").fetchall()
    for width, optimal_lr, best_loss, n_lrs, drift in best:
        mine = {lr: loss for w, lr, loss in curves if w == width}
        assert n_lrs == 2 and best_loss == min(mine.values()) and mine[optimal_lr] == best_loss
    assert [w for w, *_ in best] == [16, 32]
    optima = [b[1] for b in best]
    assert best[0][4] == pytest.approx(max(optima) / min(optima))
    for ext in ("png", "svg"):
        assert (tmp_path / "results" / "figures" / f"lr_transfer.{ext}").stat().st_size > 1000
    from lipflow.atomic import is_sealed

    assert is_sealed(tmp_path / "results" / "tables" / "lr_transfer.csv")  # its sidecar: an update() output
    report = snakemake(tmp_path, "--report", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tmp_path / "report.html").read_text(errors="replace")
    assert "lr_transfer.png" in html and "optimal" in html


# ---- views' filters, counts and aggregates on hand-made tables (mutation round 3)

def test_pareto_keeps_finite_bounds_of_completed_runs_and_takes_the_largest_half_certified_radius(tmp_path):
    """Only completed runs with a finite bound enter the front; val_accuracy is the eval step's value where
    there is one (final_val_accuracy otherwise); local_radius is max over the run's robustness
    half_certified_epsilon rows (other metrics and evaluations ignored)."""
    runs = [run("tradeoff.a-00000001", experiment="lipschitz_tradeoff", lipschitz_bound=5.0, val_accuracy=0.4,
                final_val_accuracy=0.9),
            run("tradeoff.b-00000002", experiment="lipschitz_tradeoff", lipschitz_bound=9.0, val_accuracy=None,
                final_val_accuracy=0.5),
            run("tradeoff.c-00000003", experiment="lipschitz_tradeoff", lipschitz_bound=None, val_accuracy=0.99),
            run("tradeoff.d-00000004", experiment="lipschitz_tradeoff", lipschitz_bound=float("inf"),
                val_accuracy=0.99),
            run("tradeoff.e-00000005", experiment="lipschitz_tradeoff", lipschitz_bound=1.0, val_accuracy=0.99,
                status="diverged")]
    evals = [{"run_id": rid, "eval": ev, "metric": m, "value": v}
             for rid, ev, m, v in [("tradeoff.a-00000001", "robustness", "half_certified_epsilon", 0.01),
                                   ("tradeoff.a-00000001", "robustness", "half_certified_epsilon", 0.03),
                                   ("tradeoff.a-00000001", "robustness", "half_certified_epsilon", 0.02),
                                   ("tradeoff.a-00000001", "robustness", "certified_accuracy", 0.7),
                                   ("tradeoff.a-00000001", "precision", "half_certified_epsilon", 0.9)]]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con)["pareto"] == ""
    rows = con.sql("select name, val_accuracy, local_radius, on_front from pareto order by name").fetchall()
    # a (bound 5, acc 0.4) and b (bound 9, acc 0.5) are both on the front
    assert rows == [("tradeoff.a", 0.4, 0.03, True), ("tradeoff.b", 0.5, None, True)]


def test_lr_transfer_figure_marks_what_it_cannot_place_and_survives_a_method_that_all_diverged(tmp_path):
    """A method whose every run diverged crashed the figure (a log axis with no positive data); a
    diverged run and a loss above the axis were left out without a mark, and the drift of the widths
    that kept an optimum read as the method's."""
    from lipflow.experiments.lr_transfer import lr_transfer
    from lipflow.results.plotting import pyplot

    runs = [run(f"lrt.sp_adamw.w{w}.lr{lr}-{i:08x}", experiment="lr_transfer", d_model=w, lr=lr, val_loss=loss,
                status="completed" if loss is not None else "diverged")
            for i, (w, lr, loss) in enumerate([(32, 0.01, 2.0), (32, 0.02, 2.1), (32, 0.04, 2.2), (32, 0.08, 2.3),
                                               (32, 0.16, 90.0), (64, 0.01, None), (64, 0.02, None)])]
    runs += [run(f"lrt.scion.w64.lr{lr}-{20 + i:08x}", experiment="lr_transfer", optimizer="scion", lr=lr, val_loss=None,
                 status="diverged") for i, lr in enumerate((0.01, 0.02))]
    con = database(tmp_path, runs)
    create_views(con)
    fig = lr_transfer(con)
    scion, adamw = fig.axes  # panels in method order
    assert scion.get_title() == "scion: no run ended with a finite loss"
    # width 32's optimum is its smallest lr: the drift of an optimum at the grid's edge is no measurement
    assert adamw.get_title() == "sp_adamw: optimal-lr drift ×1 (1 of 2 widths)\n1 of 1 optima at the lr grid's edge: widen the grid"
    top = adamw.get_ylim()[1]
    marked = {(line.get_marker(), tuple(line.get_xdata())) for ax in fig.axes for line in ax.lines
              if line.get_linestyle() == "None" and list(line.get_ydata()) == [top] * len(line.get_ydata())}
    assert marked == {("^", (0.16,)), ("x", (0.01, 0.02))}  # width 32's lr 0.16; width 64's and scion's runs
    assert [t.get_text() for t in scion.get_legend().get_texts()] == [  # the first panel's
        "width 32", "width 64", "loss above the axis", "diverged / no final loss"]
    pyplot().close(fig)


def test_lr_transfer_figure_of_one_final_loss_has_a_readable_loss_and_lr_axis(tmp_path):
    """One run (or every run at one loss) made the loss axis 2 ± 1e-10 (ticks −0.5 … 3.0 under an offset
    "1e−10+2"), and one lr a log axis of ±30 % around it with the only tick, 2⁻⁷, at its edge. The loss axis
    now spans a tenth of the loss, the lr axis an octave each side."""
    from lipflow.experiments.lr_transfer import lr_transfer
    from lipflow.results.plotting import pyplot

    runs = [run(f"lrt.sp_adamw.w{w}.lr0.01-{i:08x}", experiment="lr_transfer", d_model=w, lr=0.01, val_loss=2.0)
            for i, w in enumerate((32, 64))]
    con = database(tmp_path, runs)
    create_views(con)
    fig = lr_transfer(con)
    fig.canvas.draw()
    ax = fig.axes[0]
    bottom, top = ax.get_ylim()
    assert ax.yaxis.get_offset_text().get_text() == "" and bottom < 2.0 < top and top - bottom > 0.05, (bottom, top)
    low, high = ax.get_xlim()
    assert len([t for t in ax.get_xticks() if low <= t <= high]) >= 2 and low < 0.01 < high, (low, high)
    pyplot().close(fig)


def test_lr_transfer_figure_keeps_the_optima_readable_when_the_top_lr_blows_up_at_every_width(tmp_path):
    """The top lr of each width ended completed at a loss of ~10³ (a third of the runs, above the 90 %
    quantile's tenth): the axis ran to 1,700 and every other point lay flat on its floor."""
    from lipflow.experiments.lr_transfer import lr_transfer
    from lipflow.results.plotting import pyplot

    losses = {32: {0.03: 3.5, 0.12: 2.8, 1000.0: 1168.0}, 64: {0.03: 3.3, 0.12: 2.6, 1000.0: 1310.0}}
    runs = [run(f"lrt.sp_adamw.w{w}.lr{lr}-{w + i:08x}", experiment="lr_transfer", d_model=w, lr=lr, val_loss=loss)
            for w, by_lr in losses.items() for i, (lr, loss) in enumerate(by_lr.items())]
    con = database(tmp_path, runs)
    create_views(con)
    fig = lr_transfer(con)
    (ax,) = fig.axes
    bottom, top = ax.get_ylim()
    assert 3.5 < top < 10 and bottom < 2.6, (bottom, top)
    marked = [(line.get_marker(), tuple(line.get_xdata())) for line in ax.lines
              if line.get_linestyle() == "None" and list(line.get_ydata()) == [top] * len(line.get_ydata())]
    assert marked == [("^", (1000.0,)), ("^", (1000.0,))]
    pyplot().close(fig)


def test_rank_figure_marks_gaps_a_log_axis_cannot_show_and_says_what_the_slope_is_over(tmp_path):
    """A gap ≤ 0 vanished from the log panel, and the legend's slope (fitted on the positive gaps only)
    read as fitted on every run; one run gave 'slope nan'."""
    from lipflow.experiments.rank_vs_n import rank_vs_n, slope_text
    from lipflow.results.plotting import pyplot

    gaps = {128: 0.4, 256: 0.2, 512: -0.01, 768: 0.0}  # train tokens (context 64) → val loss − the train loss of the last 10 % of steps
    runs = [run(f"rank.{j}-{40 + j:08x}", experiment="rank_vs_n", train_tokens=n, n_heads=1, val_loss=2.0 + gap)
            for j, (n, gap) in enumerate(gaps.items())]
    metrics = [{"run_id": r["run_id"], "step": s, "loss": 2.0, "sharpness": None, "preconditioned_sharpness": None}
               for r in runs for s in (95, 100)]
    con = database(tmp_path, runs, metrics, evals=[
        {"run_id": r["run_id"], "eval": "rank", "metric": metric, "value": value, "n": n, "matrix": matrix,
         "rtol": rtol, "epsilon": None, "attack": None, "k": None, "format": None, "scaling": None}
        for r in runs for metric, value, n, matrix, rtol in (
            ("b3_rademacher_sum", 50.0, 256, None, None), ("numerical_rank", 8.0, None, "qk", 0.01))])
    create_views(con)
    fig = rank_vs_n(con)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0].endswith("(2 of 4 points)") and labels[1] == "1 head(s): gap ≤ 0"
    floor = fig.axes[0].get_ylim()[0]
    edge = fig.axes[0].lines[1]
    assert edge.get_marker() == "v" and list(edge.get_ydata()) == [floor, floor]
    assert list(edge.get_xdata()) == [8, 12] and floor == pytest.approx(0.1)  # half the smallest positive gap
    assert slope_text(float("nan")) == "no slope (under 2 points)" and slope_text(-0.5) == "slope -0.50"
    pyplot().close(fig)


def test_sharpness_panels_go_symlog_only_when_a_few_estimates_dwarf_the_rest():
    """Early power-iteration estimates of ±10³ flattened every later curve of the preconditioned row onto 0."""
    import pandas as pd

    from lipflow.experiments.super_consistency import symlog_if_spiky
    from lipflow.results.plotting import pyplot

    fig, (spiky, calm) = pyplot().subplots(1, 2)
    symlog_if_spiky(spiky, pd.Series([740.0, -1900.0, 5.0, 6.0, 4.0, 5.5, None]))
    symlog_if_spiky(calm, pd.Series([20.0, 8.0, 10.0, 9.0]))
    assert spiky.get_yscale() == "symlog" and spiky.yaxis.get_transform().linthresh == 10.0  # median 5.75 → 10
    assert calm.get_yscale() == "linear"
    pyplot().close(fig)


def test_lr_transfer_counts_lrs_per_width_and_widths_per_method_and_no_edge_with_one_lr(tmp_path):
    losses = {("sp_adamw", 32): {0.01: 1.5, 0.02: 1.4, 0.04: 1.6},   # optimum inside the grid
              ("sp_adamw", 64): {0.01: 1.3},                         # a single lr: no grid, so no edge
              ("muon", 32): {0.1: 1.2, 0.2: 1.1}}                    # optimum at the grid's edge
    runs = [run(f"lrt.{method}.w{width}.lr{lr}-{i:08x}", experiment="lr_transfer", d_model=width, lr=lr, val_loss=loss)
            for i, ((method, width), lr, loss) in enumerate((key, lr, loss) for key, curve in losses.items()
                                                          for lr, loss in curve.items())]
    con = database(tmp_path, runs)
    create_views(con)
    got = {(m, w): rest for m, w, *rest in con.sql(
        "select method, width, optimal_lr, n_lrs, at_grid_edge, n_widths, drift from lr_transfer").fetchall()}
    assert got == {("sp_adamw", 32): [0.02, 3, False, 2, 2.0], ("sp_adamw", 64): [0.01, 1, False, 2, 2.0],
                   ("muon", 32): [0.2, 2, True, 1, 1.0]}


def test_lr_transfer_edge_is_the_grids_edge_diverged_lrs_included(tmp_path):
    """The grid is every lr tried: an optimum below an lr that diverged lies inside it (widening the grid
    would not help; it was flagged "at the edge" when the edge was taken over the finished runs), and an
    optimum at the largest lr tried is at the edge."""
    curves = {32: [(0.05, 1.5, "completed"), (0.1, 1.4, "completed"), (0.2, None, "diverged")],
              64: [(0.05, 1.5, "completed"), (0.1, 1.4, "completed"), (0.2, 1.3, "completed")]}
    runs = [run(f"lrt.muon.w{width}.lr{lr}-{i:08x}", experiment="lr_transfer", d_model=width, lr=lr, val_loss=loss,
                status=status)
            for i, (width, (lr, loss, status)) in enumerate((w, point) for w, points in curves.items()
                                                            for point in points)]
    con = database(tmp_path, runs)
    create_views(con)
    got = {w: (lr, edge)
           for w, lr, edge in con.sql("select width, optimal_lr, at_grid_edge from lr_transfer").fetchall()}
    assert got == {32: (0.1, False), 64: (0.2, True)}


# ---- mutation round 4: super_consistency, rank_vs_n, robustness, precision and icl views

def test_sharpness_spread_tells_optimizers_apart_in_its_rows_and_figure(tmp_path):
    """The view groups by optimizer, and now shows it: two optimizers' spreads at the same width axis,
    depth and step were two rows that could not be told apart; the figure has a panel per optimizer."""
    runs = [run(f"sc.sp_{opt}.w{w}.L2-0000000{i}", experiment="super_consistency", d_model=w, n_layers=2, optimizer=opt)
            for i, (opt, w) in enumerate([("adamw", 32), ("adamw", 64), ("muon", 32), ("muon", 64)])]
    sharp = {"sc.sp_adamw.w32.L2-00000000": 1.0, "sc.sp_adamw.w64.L2-00000001": 3.0, "sc.sp_muon.w32.L2-00000002": 4.0,
             "sc.sp_muon.w64.L2-00000003": 4.0}
    metrics = [{"run_id": r, "step": 10, "loss": 1.0, "sharpness": v, "preconditioned_sharpness": None}
               for r, v in sharp.items()]
    con = database(tmp_path, runs, metrics)
    create_views(con)
    rows = con.sql("select optimizer, spread from sharpness_spread order by optimizer").fetchall()
    assert rows == [("adamw", pytest.approx(1.0)), ("muon", pytest.approx(0.0))]
    from lipflow.experiments.super_consistency import sharpness

    import matplotlib.pyplot as plt

    figure = sharpness(con)
    titles = [ax.get_title() for ax in figure.axes]
    figure.canvas.draw()
    views = [ax.get_xlim() for ax in figure.axes]  # one logged step (10): whole-step ticks, not 9.96, 9.98 …
    ticks = [[t for t in ax.get_xticks() if low <= t <= high] for ax, (low, high) in zip(figure.axes, views)]
    plt.close(figure)
    assert len(titles) == 2 and "+ adamw" in titles[0] and "+ muon" in titles[1]
    assert "mean spread 1.00" in titles[0] and "mean spread 0.00" in titles[1]
    assert all(10 in panel and all(float(t).is_integer() for t in panel) for panel in ticks), ticks


def test_sharpness_spread_keeps_two_settings_of_one_parametrization_apart(tmp_path):
    """Two labels of the param axis under SP + AdamW differing in another key (weight decay) were one
    setting: each width's spread took both labels' runs (min 1, max 8, n_models 2 of four runs); each label
    is a setting of its own, with its own panel."""
    from lipflow.experiments.super_consistency import sharpness
    from lipflow.results.plotting import pyplot

    sharp = {("sp", 32): 1.0, ("sp", 64): 2.0, ("sp_wd", 32): 4.0, ("sp_wd", 64): 8.0}
    runs = [run(f"sc.{setting}.w{w}.L2-{i:08x}", experiment="super_consistency", d_model=w, n_layers=2)
            for i, (setting, w) in enumerate(sharp)]
    metrics = [{"run_id": r["run_id"], "step": 10, "loss": 1.0, "sharpness": v, "preconditioned_sharpness": None}
               for r, v in zip(runs, sharp.values())]
    con = database(tmp_path, runs, metrics)
    create_views(con)
    rows = con.sql("select setting, n_models, min_sharpness, max_sharpness, spread from sharpness_spread "
                   "order by setting").fetchall()
    assert rows == [("sp", 2, 1.0, 2.0, pytest.approx(1 / 1.5)), ("sp_wd", 2, 4.0, 8.0, pytest.approx(4 / 6))]
    fig = sharpness(con)
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["sp", "sp_wd"]
    pyplot().close(fig)


def test_sharpness_spread_counts_distinct_sizes_skips_missing_sharpness_and_other_experiments(tmp_path):
    """Two seeds of width 64 are one model size, their mean: min, max and mean took each seed as a size of
    its own (seed noise read as spread across widths); a run whose sharpness is NULL and a run of another
    experiment take no part; the spread divides by |mean| (negative sharpness, as early in training, still
    gives a positive spread)."""
    runs = [run("sc.sp.w32.L2-00000001", experiment="super_consistency", d_model=32, n_layers=2),
            run("sc.sp.w64.L2.seed0-00000002", experiment="super_consistency", d_model=64, n_layers=2),
            run("sc.sp.w64.L2.seed1-00000003", experiment="super_consistency", d_model=64, n_layers=2, seed=1),
            run("sc.sp.w128.L2-00000004", experiment="super_consistency", d_model=128, n_layers=2),
            run("lrt.muon.w256.lr0.01-00000005", experiment="lr_transfer", d_model=256, n_layers=2)]
    values = {"sc.sp.w32.L2-00000001": -1.0, "sc.sp.w64.L2.seed0-00000002": -3.0,
              "sc.sp.w64.L2.seed1-00000003": -2.0, "sc.sp.w128.L2-00000004": None,
              "lrt.muon.w256.lr0.01-00000005": -100.0}
    metrics = [{"run_id": r, "step": 10, "loss": 1.0, "sharpness": v,
                "preconditioned_sharpness": None if v is None else 10 * v} for r, v in values.items()]
    con = database(tmp_path, runs, metrics)
    create_views(con)
    assert sorted(r for r, in con.sql("select run_id from sharpness_curves").fetchall()) == [
        "sc.sp.w32.L2-00000001", "sc.sp.w64.L2.seed0-00000002", "sc.sp.w64.L2.seed1-00000003"]
    rows = con.sql("select axis, fixed_size, step, n_models, min_sharpness, max_sharpness, mean_sharpness, spread, "
                   "preconditioned_spread from sharpness_spread").fetchall()
    # widths 32 (−1) and 64 (seeds −3 and −2: −2.5) at depth 2: min −2.5, max −1, mean −1.75, spread 1.5/1.75
    assert rows == [("width", 2, 10, 2, -2.5, -1.0, pytest.approx(-1.75), pytest.approx(6 / 7), pytest.approx(6 / 7))]


def rank_database(tmp_path):
    """rank_vs_n runs (1 head, context 64, 100 steps) with hand-picked numbers:
    r1: 640 train tokens → n = 10; val_loss 2.5 (eval step) beside final_val_loss 9.0 → gap 0.5
    r2: no train_tokens → the train shards' 5120 tokens → n = 80; only final_val_loss 2.3 → gap 0.3
    r4: 2560 tokens → n = 40; val_loss 1.8 → gap −0.2 (no log: out of the gap fit)
    r3: diverged, not in the view. Train loss over steps 91..100 alternates 1.9 / 2.1 (mean 2.0)."""
    specs = [("rank.r1-00000001", "completed", 640, 2.5, 9.0), ("rank.r2-00000002", "completed", None, None, 2.3),
             ("rank.r3-00000003", "diverged", 1280, 2.2, None), ("rank.r4-00000004", "completed", 2560, 1.8, None)]
    runs, metrics, evals = [], [], []
    for rid, status, tokens, val, final in specs:
        runs.append(run(rid, experiment="rank_vs_n", status=status, train_tokens=tokens, val_loss=val,
                        final_val_loss=final, n_heads=1, context=64, steps=100))
        metrics += [{"run_id": rid, "step": s, "loss": 5.0 if s <= 90 else (1.9 if s % 2 else 2.1), "sharpness": None,
                     "preconditioned_sharpness": None} for s in range(1, 101)]
        evals += [{"run_id": rid, "eval": ev, "metric": m, "value": v, "n": n, "matrix": mat, "rtol": rtol}
                  for ev, m, v, n, mat, rtol in [
                      ("rank", "b3_rademacher_sum", 4.0, 256, None, None),
                      ("rank", "generalization_gap", 0.11, None, None, None),
                      ("rank", "edelman_norm_proxy", 7.0, None, None, None),
                      ("rank", "spectrum_adaptive_proxy", 8.0, None, None, None),
                      ("rank", "numerical_rank", 6.0, 1024, "qk", 0.01),
                      ("rank", "stable_rank", 2.0, None, "qk", None),
                      ("rank", "stable_rank", 4.0, None, "qk", None),
                      ("rank", "stable_rank", 10.0, None, "ov", None),
                      ("other", "generalization_gap", 99.0, None, None, None),
                      ("other", "b3_rademacher_sum", 99.0, 9999, None, None),
                      ("other", "stable_rank", 99.0, None, "qk", None)]]
    con = database(tmp_path, runs, metrics, evals)
    con.execute("UPDATE shards SET tokens = 5120 WHERE split = 'train'")  # a split that holds every run's tokens
    return con


def test_rank_bound_columns_on_hand_made_runs(tmp_path):
    con = rank_database(tmp_path)
    assert create_views(con)["rank_bound"] == ""
    rows = con.sql("select name, n_tokens, n_sequences, measured_gap, eval_gap, qk_rank, qk_stable_rank, b3_bound, "
                   "edelman_norm_proxy, spectrum_adaptive_proxy from rank_bound order by name").fetchall()
    expected = [("rank.r1", 640, 10, 0.5), ("rank.r2", 5120, 80, 0.3), ("rank.r4", 2560, 40, -0.2)]
    assert [r[:3] for r in rows] == [e[:3] for e in expected]
    for row, (_, _, n, gap) in zip(rows, expected):
        # eval_gap, qk_rank, mean qk stable rank (2 and 4), B3 rescaled from n_eval = 256 to n, the proxies
        assert row[3:] == (pytest.approx(gap), 0.11, 6.0, pytest.approx(3.0), pytest.approx(4.0 * math.sqrt(256 / n)),
                           7.0, 8.0)


def test_rank_bound_slopes_fit_only_positive_gaps(tmp_path):
    con = rank_database(tmp_path)
    create_views(con)
    slopes = con.sql("select distinct gap_slope, bound_slope from rank_bound").fetchall()
    # gap fit through (10, 0.5) and (80, 0.3) only; the bound is 4·√(256/n) ∝ n^−½ at every n
    assert slopes == [(pytest.approx(math.log(0.3 / 0.5) / math.log(80 / 10)), pytest.approx(-0.5))]


def test_robustness_view_attack_labels_certificates_and_optimizers_per_row(tmp_path):
    """LM: robust_loss is an attack's row (attack kept), half_certified_epsilon reaches the view, the
    certificate is the robustness evaluation's certificate_l2 only (not a larger value of another metric
    or evaluation) and a run without one keeps its rows (NULL certificate). Image MLP: every robust_*
    metric is labelled pgd, clean accuracy has no attack, the optimizer is the method's first word."""
    runs = [run("robust.a-00000001", experiment="robustness"), run("robust.b-00000002", experiment="robustness")]
    evals = [{"run_id": rid, "eval": ev, "metric": m, "value": v, "epsilon": e, "attack": a, "k": None}
             for rid, ev, m, v, e, a in [("robust.a-00000001", "robustness", "certificate_l2", 4.0, None, None),
                                         ("robust.a-00000001", "other", "certificate_l2", 100.0, None, None),
                                         ("robust.a-00000001", "robustness", "robust_loss", 7.5, 0.5, "pgd"),
                                         ("robust.a-00000001", "robustness", "half_certified_epsilon", 0.02, None,
                                          None),
                                         ("robust.b-00000002", "robustness", "clean_accuracy", 0.6, None, None)]]
    # the optimizer is the method's, not its name's first word (a method "softcap" with Muon was "softcap")
    optimizers = {"softcap": ("muon", "spectral_soft_cap"), "adamw_weight_decay": ("adamw", "weight_decay")}
    image = [{"method": m, "optimizer": optimizers[m][0], "weight_constraint": optimizers[m][1], "seed": seed,
              "metric": metric, "value": v, "epsilon": e}
             for m, seed, metric, v, e in [("softcap", 0, "certificate_l2", 15.0, None),
                                           ("softcap", 0, "robust_loss", 1.5, 0.5),
                                           ("softcap", 0, "robust_true_class_probability", 0.7, 0.5),
                                           ("softcap", 1, "certificate_l2", 12.0, None),
                                           ("softcap", 1, "robust_loss", 1.25, 0.5),
                                           ("adamw_weight_decay", 0, "clean_accuracy", 0.9, None)]]
    con = database(tmp_path, runs, evals=evals, extra={"image_mlp_robustness": image})
    assert create_views(con)["robustness"] == ""
    rows = con.sql("select domain, label, optimizer, certificate_l2, metric, attack, epsilon, value from robustness "
                   "order by domain, label, metric, seed").fetchall()
    assert rows == [  # each seed's rows carry that seed's certificate (15 at seed 0, 12 at seed 1)
        ("image_mlp", "adamw_weight_decay", "adamw", None, "clean_accuracy", None, None, 0.9),
        ("image_mlp", "softcap", "muon", 15.0, "robust_loss", "pgd", 0.5, 1.5),
        ("image_mlp", "softcap", "muon", 12.0, "robust_loss", "pgd", 0.5, 1.25),
        ("image_mlp", "softcap", "muon", 15.0, "robust_true_class_probability", "pgd", 0.5, 0.7),
        ("lm", "a", "adamw", 4.0, "half_certified_epsilon", None, None, 0.02),
        ("lm", "a", "adamw", 4.0, "robust_loss", "pgd", 0.5, 7.5),
        ("lm", "b", "adamw", None, "clean_accuracy", None, None, 0.6)]


def test_precision_view_pivots_every_metric_of_the_precision_evaluation_of_precision_runs_only(tmp_path):
    """Each metric lands in its own column; rows of another evaluation (an 'other' accuracy) and precision
    rows of a run of another experiment are ignored."""
    runs = [run("prec.p-00000001", experiment="precision"), run("robust.x-00000002", experiment="robustness")]
    cell = {"val_loss": 3.1, "accuracy": 0.45, "val_loss_delta": 0.2, "accuracy_delta": -0.05,
            "activation_overflow": 2.0, "activation_saturated": 0.01, "weight_saturated": 0.02,
            "real_fp8_accuracy": 0.44, "simulated_fp8_accuracy": 0.43}
    rows = [("prec.p-00000001", "precision", m, v, "fp8_e4m3", "none") for m, v in cell.items()]
    rows += [("prec.p-00000001", "precision", "fp8_safe_proven", 1.0, "fp8_e4m3", None),
             ("prec.p-00000001", "precision", "fp8_safe_observed", 0.0, "fp8_e4m3", None),
             ("prec.p-00000001", "other", "accuracy", 0.99, "fp8_e4m3", "none"),
             ("robust.x-00000002", "precision", "accuracy", 0.5, "fp32", None)]
    evals = [{"run_id": r, "eval": ev, "metric": m, "value": v, "format": f, "scaling": s} for r, ev, m, v, f, s in rows]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con)["precision"] == ""
    columns = ("label", "format", "scaling", *cell, "fp8_safe_proven", "fp8_safe_observed")
    got = con.sql(f"select {', '.join(columns)} from precision").fetchall()
    assert got == [("p", "fp8_e4m3", "none", *cell.values(), 1.0, 0.0)]


def test_precision_bounds_columns_and_the_label_breaks_an_accuracy_tie(tmp_path):
    """cap (fp32 accuracy 0.5; 0.74 in fp8 is not its accuracy) is 0.25 from both free.a (0.75) and free.b
    (0.25): the tie goes to the first label, free.a. Each bound column is its own metric and format."""
    runs = [run(rid, experiment="precision", model="lipschitz_gpt", weight_constraint=c, steps=100)
            for rid, c in [("prec.cap-00000001", "spectral_soft_cap"), ("prec.free.a-00000002", "none"),
                           ("prec.free.b-00000003", "none")]]
    rows = [("prec.cap-00000001", "accuracy", 0.5, "fp32"), ("prec.cap-00000001", "accuracy", 0.74, "fp8_e4m3"),
            ("prec.cap-00000001", "proven_max_activation", 4.0, None),
            ("prec.cap-00000001", "observed_max_activation", 2.0, None),
            ("prec.cap-00000001", "proven_over_observed", 2.0, None),
            ("prec.cap-00000001", "analytic_activation_bound", 8.0, None),
            ("prec.cap-00000001", "fp8_safe_proven", 1.0, "fp8_e4m3"),
            ("prec.cap-00000001", "fp8_safe_observed", 0.0, "fp8_e4m3"),
            ("prec.cap-00000001", "fp8_safe_proven", 0.0, "fp8_e5m2"),
            ("prec.cap-00000001", "fp8_safe_proven", 1.0, "fp16"),
            ("prec.free.a-00000002", "accuracy", 0.75, "fp32"),
            ("prec.free.a-00000002", "proven_max_activation", 300.0, None),
            ("prec.free.a-00000002", "observed_max_activation", 10.0, None),
            ("prec.free.a-00000002", "proven_over_observed", 30.0, None),
            ("prec.free.b-00000003", "accuracy", 0.25, "fp32"),
            ("prec.free.b-00000003", "proven_over_observed", 70.0, None)]
    evals = [{"run_id": r, "eval": "precision", "metric": m, "value": v, "format": f, "scaling": None}
             for r, m, v, f in rows]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con)["precision_bounds"] == ""
    got = con.sql("select steps, accuracy, proven_max_activation, observed_max_activation, proven_over_observed, "
                  "analytic_activation_bound, e4m3_proven_safe, e4m3_observed_safe, e5m2_proven_safe, fp16_proven_safe, "
                  "matched_label, matched_accuracy, matched_proven_max_activation, matched_observed_max_activation, "
                  "matched_proven_over_observed from precision_bounds where label = 'cap'").fetchall()
    assert got == [(100, 0.5, 4.0, 2.0, 2.0, 8.0, 1.0, 0.0, 0.0, 1.0, "free.a", 0.75, 300.0, 10.0, 30.0)]


def test_icl_view_agreement_is_against_pgd_only(tmp_path):
    """icl_agreement has a row per reference; the view's agreement columns are the pgd row's (not a
    mean with the one-step-optimum row)."""
    extra = icl_tables({2: (0.3, 0.25)})
    for row in extra["icl_agreement"]:
        if row["reference"] == "one_step_optimal":
            row.update(prediction_correlation=0.5, relative_prediction_mse=0.9)
    con = database(tmp_path, [run("x-00000001")], extra=extra)
    create_views(con)
    assert con.sql("select sweep, n_layers, n, model_loss, pgd_loss, gd_loss, least_squares_loss, "
                   "prediction_correlation, relative_prediction_mse from icl_vs_pgd where sweep = 'layers'"
                   ).fetchall() == [("layers", 2, 20, 0.3, 0.25, 0.9, 0.01, 0.99, pytest.approx(2e-3))]


def one_column_view(*parts: Part, depends_on: tuple[str, ...] = ()) -> View:
    return View(columns=("run_id",), parts=parts, caption="table_pareto.rst", depends_on=depends_on)


def test_view_order_is_sorted_with_each_view_after_the_views_it_reads():
    views = {"m": one_column_view(), "z_curves": one_column_view(), "a_spread": one_column_view(depends_on=("z_curves",))}
    assert view_order(views) == ["z_curves", "a_spread", "m"]


def test_create_views_unites_parts_with_duplicates_and_builds_a_view_after_the_one_it_reads(tmp_path):
    """UNION ALL keeps every row of every part (a row in both parts, and twice in one, is there 4 times); a
    view that reads another view named after it is built once that one is."""
    con = duckdb.connect()
    make_table(con, "t", [{"run_id": "a"}, {"run_id": "a"}])
    part = Part(sql="SELECT run_id FROM t", requires={"t": ("run_id",)})
    views = {"a_spread": one_column_view(Part(sql="SELECT run_id FROM z_curves", requires={"z_curves": ("run_id",)}),
                                         depends_on=("z_curves",)),
             "z_curves": one_column_view(part, part)}
    assert create_views_of(con, views, log=io.StringIO()) == {"z_curves": "", "a_spread": ""}
    assert con.execute("select count(*) from z_curves").fetchall() == [(4,)]
    assert con.execute("select count(*) from a_spread").fetchall() == [(4,)]


def test_an_empty_views_comment_gives_each_parts_reason_once_and_may_quote(tmp_path):
    """Each unbuildable part adds its reason, with the missing table or column in parentheses unless the
    reason already says it; a reason with a quote is stored as written."""
    con = duckdb.connect()
    make_table(con, "t", [{"run_id": "a"}])
    view = one_column_view(Part(sql="SELECT run_id FROM nope", requires={"nope": ("run_id",)},
                                absent_reason="table nope is absent"),
                           Part(sql="SELECT zzz AS run_id FROM t", requires={"t": ("zzz",)},
                                absent_reason="the run's zzz was not logged"),
                           Part(sql="SELECT run_id FROM t WHERE false", requires={"t": ("run_id",)},
                                absent_reason="no rows"))
    reason = "empty: table nope is absent; the run's zzz was not logged (t has no column zzz); no rows"
    assert create_views_of(con, {"v": view}, log=io.StringIO()) == {"v": reason}
    assert con.execute("select comment from duckdb_views() where view_name = 'v'").fetchall() == [(reason,)]
    assert con.execute("select count(*) from v").fetchall() == [(0,)]


def test_axis_labels_format_integral_floats_as_integers_and_others_to_six_digits():
    from lipflow.experiments.grid import axis_points
    assert [label for label, _ in axis_points("lr", [2.0, 0.000123456789, 1e16, 3])] == [
        "lr2", "lr0.000123457", "lr1e+16", "lr3"]
    assert [label for label, _ in axis_points("depth_mup", [True, False])] == ["depth_mup", "no_depth_mup"]


def test_a_run_name_of_exactly_the_maximum_length_is_allowed_and_one_more_is_not():
    from lipflow.experiments.grid import RUN_NAME_MAX, expand_experiment
    for length, ok in ((RUN_NAME_MAX, True), (RUN_NAME_MAX + 1, False)):
        short = "x" * (length - len(".seed1"))
        block = {"short": short, "cpu": {"base": {"steps": 5}, "grid": {"seed": [1]}}}
        if ok:
            assert expand_experiment("e", block, "cpu") == {f"{short}.seed1": {"steps": 5, "seed": 1, "experiment": "e"}}
        else:
            with pytest.raises(ConfigError, match="longer than"):
                expand_experiment("e", block, "cpu")


def test_a_grid_point_overrides_the_base_and_a_merged_grid_replaces_the_builtin_one_whole():
    from lipflow.experiments.grid import expand_experiment, merge_block
    block = {"short": "t", "cpu": {"base": {"seed": 0, "lr": 0.5}, "grid": {"seed": [1, 2]}}}
    assert expand_experiment("e", block, "cpu") == {"t.seed1": {"seed": 1, "lr": 0.5, "experiment": "e"},
                                                    "t.seed2": {"seed": 2, "lr": 0.5, "experiment": "e"}}
    builtin = {"short": "t", "cpu": {"base": {"seed": 0, "lr": 0.5}, "grid": {"seed": [1, 2], "lr": [0.1, 0.2]}}}
    merged = merge_block(builtin, {"cpu": {"base": {"lr": 0.25}, "grid": {"seed": [3]}}})
    assert merged["cpu"] == {"base": {"seed": 0, "lr": 0.25}, "grid": {"seed": [3]}}
    assert builtin["cpu"]["grid"] == {"seed": [1, 2], "lr": [0.1, 0.2]}  # the builtin block is not changed


def test_two_axes_of_a_grid_setting_the_same_run_key_are_refused():
    """The later axis used to win silently: run `lrt.lr0.01.a` trained at lr 0.5 under a name saying 0.01."""
    conflict = {"lr_transfer": {"cpu": {"grid": {"method": {"m": {"optimizer": "adamw"}}, "lr": [0.01],
                                                 "v": {"a": {"lr": 0.5}}}}}}
    for selected in (["lr_transfer"], []):  # a written block is checked whether or not it is selected
        config = base_config(experiments=selected, experiment_definitions=conflict)
        with pytest.raises(ConfigError) as err:
            Plan.from_config(config)
        message = str(err.value)
        assert message.startswith("config error: experiment_definitions.lr_transfer.cpu.grid: axes 'lr' and 'v' "
                                  "both set run key 'lr'") and "\n" not in message
    # the same key in two grids of a list, or in `base` and one axis, is no conflict
    union = {"mine": {"short": "m", "cpu": {"base": {"lr": 0.1}, "grid": [{"lr": [0.01]}, {"v": {"a": {"lr": 0.5}}}]}}}
    runs = expand_experiments(filled({"experiments": ["mine"], "experiment_definitions": union}))
    assert {name: cfg["lr"] for name, cfg in runs.items()} == {"m.lr0.01": 0.01, "m.a": 0.5}


def test_a_selected_block_without_a_module_trains_its_runs_and_plans_no_figures_job(tmp_path):
    """A block written under experiment_definitions for a name with no lipflow/experiments/<name>.py
    expands into runs, but there is no figures rule for it: its receipt in `rule all` made every
    `snakemake` stop with a MissingInputException for results/figures/mine.drawn."""
    mine = {"mine": {"short": "m", "cpu": {"grid": {"lr": [0.1]}}}}
    plan = Plan.from_config(base_config(experiments=["mine", "rank_vs_n"], experiment_definitions=mine))
    assert [rid.rsplit("-", 1)[0] for rid in plan.runs if rid.startswith("m.")] == ["m.lr0.1"]
    assert plan.figure_receipts() == ["results/figures/rank_vs_n.drawn"]
    assert not [path for path in plan.experiment_targets() if "mine" in path]
    config = base_config(experiments=["mine"], experiment_definitions=mine)
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--configfile", str(tmp_path / "config.yaml"), "-n", "-c1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    assert "m.lr0.1-" in done.stdout and "mine.drawn" not in done.stdout + done.stderr


@pytest.mark.parametrize("grid", [{}, [{}]])
def test_a_selected_experiment_without_runs_or_studies_is_refused(grid):
    """An empty sweep used to plan nothing but the experiment's figures job, drawn from empty views."""
    empty = {"lr_transfer": {"cpu": {"grid": grid}}}
    with pytest.raises(ConfigError) as err:
        Plan.from_config(base_config(experiments=["lr_transfer"], experiment_definitions=empty))
    assert str(err.value).startswith("config error: experiment_definitions.lr_transfer.cpu.grid: experiment "
                                     "'lr_transfer' is selected in experiments but has no runs under preset 'cpu'")
    with pytest.raises(ConfigError, match=r"experiment_definitions\.mine\.cpu\.grid"):
        Plan.from_config(base_config(experiments=["mine"], experiment_definitions={"mine": {"short": "m"}}))
    # not selected, or another preset's grid empty, or a study instead of runs: planned as before
    assert Plan.from_config(base_config(experiment_definitions=empty)).runs
    assert Plan.from_config(base_config(experiments=["lr_transfer"], experiment_preset="paper",
                                        experiment_definitions=empty)).runs
    assert Plan.from_config(base_config(experiments=["icl"])).studies == {"icl"}


@pytest.mark.parametrize("preset_block", [{"base": {"experiment": "rank_vs_n"}},
                                          {"grid": {"v": {"a": {"experiment": "rank_vs_n"}}}}])
def test_an_experiment_block_that_sets_experiment_is_refused(preset_block):
    """`experiment` in `runs` is refused; in an experiment's base or grid it used to be replaced silently."""
    block = {"lr_transfer": {"cpu": preset_block}}
    for selected in (["lr_transfer"], []):
        with pytest.raises(ConfigError) as err:
            Plan.from_config(base_config(experiments=selected, experiment_definitions=block))
        assert str(err.value).startswith("config error: experiment_definitions.lr_transfer.cpu.")
        assert "experiment" in str(err.value) and "\n" not in str(err.value)
