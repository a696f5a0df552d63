"""Every schema enum that names registered things equals its registry's names: a registered name
missing from the enum would be unreachable from a config, and an enum name without an entry would
fail inside a cluster job instead of at parse time."""

import sys

import pytest

from lipflow.config import load_schema, validate
from lipflow.config.schema import SCHEMA_PATH
from lipflow.studies.icl.config import SCHEMA_PATH as ICL_SCHEMA_PATH

EXPERIMENTS_SCHEMA_PATH = SCHEMA_PATH.with_name("experiments.schema.yaml")


def registry_names(module: str, name: str) -> set[str]:
    import importlib

    registry = getattr(importlib.import_module(module), name)
    return set(registry.names() if hasattr(registry, "names") else registry)


def enum_at(schema_path, *path: str) -> tuple[set[str], str]:
    """The enum at a path of keys into a schema file (through ``items`` of an array and a ``$ref``,
    local or to a sibling schema file), and where it is written: the file and its keys, after the ``$ref``."""
    node = load_schema(schema_path)
    for key in path:
        node = node[key]
    node = node.get("items", node)
    if "$ref" in node:
        file, _, pointer = node["$ref"].partition("#")
        schema_path = schema_path.with_name(file) if file else schema_path
        path = tuple(pointer.strip("/").split("/"))
        node = load_schema(schema_path)
        for key in path:
            node = node[key]
    return set(node["enum"]), f"the enum at {'/'.join(path)} of workflow/schemas/{schema_path.name}"


RUN = ("$defs", "run", "properties")
EVALUATIONS = ("properties", "evaluations", "properties")
CASES = {
    "model": (("lipflow.model", "MODELS"), (SCHEMA_PATH, *RUN, "model")),
    "activation": (("lipflow.model.bound", "ACTIVATIONS"), (SCHEMA_PATH, *RUN, "activation")),
    "parametrization": (("lipflow.parametrization", "PARAMETRIZATIONS"),
                        (SCHEMA_PATH, *RUN, "parametrization")),
    "optimizer": (("lipflow.optimizers", "OPTIMIZERS"), (SCHEMA_PATH, *RUN, "optimizer")),
    "ns_coefficients": (("lipflow.optimizers", "NS_COEFFICIENT_SETS"), (SCHEMA_PATH, *RUN, "ns_coefficients")),
    "update_scale": (("lipflow.optimizers", "UPDATE_SCALES"), (SCHEMA_PATH, *RUN, "update_scale")),
    "lmo_norm": (("lipflow.optimizers", "LMOS"), (SCHEMA_PATH, "$defs", "lmo_norm")),
    "weight_constraint": (("lipflow.constraints", "CONSTRAINTS"), (SCHEMA_PATH, *RUN, "weight_constraint")),
    "schedule": (("lipflow.schedules", "SCHEDULES"), (SCHEMA_PATH, *RUN, "schedule")),
    "corpus source": (("lipflow.data.corpus", "SOURCES"),
                      (SCHEMA_PATH, "properties", "corpus", "properties", "source")),
    "tokenizer kind": (("lipflow.data.tokenize", "TOKENIZERS"),
                       (SCHEMA_PATH, "properties", "tokenizer", "properties", "kind")),
    "evaluations.enabled": (("lipflow.evaluation", "EVALUATIONS"), (SCHEMA_PATH, *EVALUATIONS, "enabled")),
    "experiment evaluations": (("lipflow.evaluation", "EVALUATIONS"),
                               (EXPERIMENTS_SCHEMA_PATH, "$defs", "experiment", "properties", "evaluations")),
    "attack objective": (("lipflow.evaluation.robustness", "OBJECTIVES"),
                         (SCHEMA_PATH, *EVALUATIONS, "robustness", "properties", "objective")),
    "number format": (("lipflow.evaluation.number_formats", "FORMATS"),
                      (SCHEMA_PATH, *EVALUATIONS, "precision", "properties", "formats")),
    "scaling": (("lipflow.evaluation.number_formats", "SCALINGS"),
                (SCHEMA_PATH, *EVALUATIONS, "precision", "properties", "scalings")),
    "icl sigma kind": (("lipflow.studies.icl.data", "SIGMA_KINDS"),
                       (ICL_SCHEMA_PATH, "properties", "sigma", "properties", "kind")),
    "icl w_prior": (("lipflow.studies.icl.data", "W_PRIORS"), (ICL_SCHEMA_PATH, "properties", "w_prior")),
    "icl parametrization": (("lipflow.studies.icl.model", "PARAMETRIZATIONS"),
                            (ICL_SCHEMA_PATH, "properties", "parametrization")),
    "icl attention": (("lipflow.studies.icl.model", "ATTENTIONS"), (ICL_SCHEMA_PATH, "properties", "attention")),
}


def disagreement(registered: set[str], listed: set[str], registry: str, where: str) -> str:
    """What to add where, when a registry and a schema list disagree ('' when they agree)."""
    problems = []
    if registered - listed:
        problems.append(f"registered in {registry} but missing from {where}: {sorted(registered - listed)}")
    if listed - registered:
        problems.append(f"in {where} but registered nowhere in {registry}: {sorted(listed - registered)}")
    return "; ".join(problems)


@pytest.mark.parametrize("case", list(CASES))
def test_schema_enum_equals_registry_names(case):
    (module, name), (schema_path, *path) = CASES[case]
    listed, where = enum_at(schema_path, *path)
    problems = disagreement(registry_names(module, name), listed, f"{module}.{name}", where)
    assert not problems, problems


def test_every_evaluation_has_a_parameter_block_and_every_block_an_evaluation():
    blocks = set(load_schema(SCHEMA_PATH)["properties"]["evaluations"]["properties"]) - {"enabled"}
    problems = disagreement(registry_names("lipflow.evaluation", "EVALUATIONS"), blocks, "lipflow.evaluation.EVALUATIONS",
                            "the parameter blocks under properties/evaluations/properties of workflow/schemas/"
                            "config.schema.yaml (an evaluation without parameters has `{type: object, "
                            "additionalProperties: false, default: {}, properties: {}}`)")
    assert not problems, problems


def test_every_experiment_has_figures_and_views_entries():
    from lipflow.experiments import EXPERIMENT_FIGURES, EXPERIMENT_VIEWS, definitions

    assert set(definitions(validate({}, SCHEMA_PATH))) == set(EXPERIMENT_FIGURES) == set(EXPERIMENT_VIEWS)


def test_a_mismatch_is_caught(monkeypatch):
    """The check itself: a name registered but missing from the enum makes the sets differ."""
    from lipflow.optimizers import OPTIMIZERS

    monkeypatch.setitem(OPTIMIZERS._entries, "sgd", object())
    (module, name), (schema_path, *path) = CASES["optimizer"]
    listed, where = enum_at(schema_path, *path)
    assert disagreement(registry_names(module, name), listed, "OPTIMIZERS", where) == (
        "registered in OPTIMIZERS but missing from the enum at $defs/run/properties/optimizer of "
        "workflow/schemas/config.schema.yaml: ['sgd']")



TOY_MODULES = {  # a model and an evaluation, each registered from a file of its own
    "lipflow.model": ("MODELS", """from lipflow.model.gpt import GPT
from lipflow.model.registry import MODELS

MODELS.register("toy")(GPT)
"""),
    "lipflow.evaluation": ("EVALUATIONS", """from lipflow.evaluation import EVALUATIONS

@EVALUATIONS.register("toy")
def toy(ctx):
    return []
"""),
}

TOY_SCRIPT = """
import importlib.util, json, sys
package_name, registry, folder = sys.argv[1:]
spec = importlib.util.find_spec(package_name)
spec.submodule_search_locations.append(folder)
package = importlib.util.module_from_spec(spec)
sys.modules[package_name] = package
spec.loader.exec_module(package)
print(json.dumps(getattr(package, registry).names()))
"""


@pytest.mark.parametrize("package", sorted(TOY_MODULES))
def test_adding_a_model_or_an_evaluation_is_adding_a_file(package, tmp_path):
    """A module in a folder on the package's search path registers its entry at import, with no
    import line naming it anywhere (the package imports every module it holds)."""
    import json
    import subprocess

    registry, source = TOY_MODULES[package]
    (tmp_path / "toy_entry.py").write_text(source)
    done = subprocess.run([sys.executable, "-c", TOY_SCRIPT, package, registry, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "toy" in json.loads(done.stdout.splitlines()[-1])


def test_every_figure_file_has_one_maker():
    """Two figures jobs writing one file would be an ambiguous rule (or one job's figure silently the
    other's): the experiments' figures, the runs block's training curves and the ICL study's figures
    are distinct files."""
    from pathlib import Path

    from lipflow.experiments import EXPERIMENT_FIGURES
    from lipflow.plan_rules import ICL_FIGURES

    stems = [figure for figures in EXPERIMENT_FIGURES.values() for figure in figures]
    stems += ["training_curves"] + sorted({Path(path).stem for path in ICL_FIGURES})
    assert len(stems) == len(set(stems)), sorted(stem for stem in stems if stems.count(stem) > 1)


def test_every_metric_an_evaluation_writes_is_named_in_the_readmes_evaluations_section():
    """weight_max_abs_error, analytic_activation_bound, attention_input_max_norm, n_train,
    hessian_trace_stderr, the `_elements` counts and `skipped` were rows of the evaluation tables that
    the README's table of evaluations never named."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Evaluations", 1)[1].split("\n### ", 1)[0]
    named = set(re.findall(r"`([a-z0-9_*/]+)`", section))
    source = "".join(p.read_text(encoding="utf-8") for p in (root / "lipflow" / "evaluation").glob("*.py"))
    metrics = set(re.findall(r'"metric": "([a-z0-9_]+)"', source))
    metrics |= {f"{kind}_{what}" for kind in ("activation", "weight")
                for what in ("elements", "overflow", "saturated", "underflow")}  # f"{kind}_{what}"
    assert {"top_hessian_eigenvalue", "weight_max_abs_error", "skipped"} <= metrics  # the patterns found them

    def documented(metric: str) -> bool:
        kind, _, what = metric.partition("_")
        return (metric in named or any(n.startswith("*") and metric.endswith(n[1:]) for n in named)
                or ("activation_/weight_" + what in named or "_" + what in named) and kind in ("activation", "weight"))

    assert sorted(m for m in metrics if not documented(m)) == []


def test_every_metric_the_readmes_evaluations_table_names_is_a_name_the_evaluations_write():
    """The converse of the test above: each name in the first column of the README's table of evaluations
    (`sequences`, `stable_rank`, `tightness_local`, …) is a string of the evaluation code (lipflow/evaluation/
    and lipflow/metrics.py, whose evaluate_windows names val's rows), so a renamed or removed metric does not
    stay documented. Patterns (`*_delta`, `real_fp8_*`, `_saturated`, `activation_/weight_overflow`) are the
    test above's."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Evaluations", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| metric |")]
    named = {name for row in rows for name in re.findall(r"`([a-z0-9_*/]+)`", row.split(" | ", 1)[0])}
    written = set()
    for path in [*(root / "lipflow" / "evaluation").glob("*.py"), root / "lipflow" / "metrics.py"]:
        written |= {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                    if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    plain = {name for name in named if re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", name)}
    assert {"loss", "perplexity", "stable_rank", "tightness_local", "skipped"} <= plain, sorted(plain)
    assert sorted(plain - written) == []
