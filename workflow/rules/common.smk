# Helpers shared by all rules: config validation, run resolution, paths and resources, and the
# constants and functions of the ICL study and the experiments (the rule files hold rules only).
import json
import math
import os
import sys

from lipflow.config import ConfigError, check_config, load_config_file, plain_runs, resolve_runs, tokenizer_id
from lipflow.data import DataError
from lipflow.data.corpus import expand_paths
from lipflow.experiments import (EXPERIMENT_FIGURES, EXPERIMENT_VIEWS, experiment_evaluations, selected_experiments,
                                 study_enabled)
from lipflow.icl.config import load_config, training_config, training_jobs

try:
    # Snakemake's YAML loading keeps the last value of a repeated key: reread each config file to refuse one.
    for _configfile in workflow.configfiles:
        load_config_file(_configfile)
    # Validate against workflow/schemas/config.schema.yaml and fill its defaults (one pass, what
    # snakemake.utils.validate does), then the cross-key rules, failing with one line naming the key
    # path before any job starts.
    check_config(config)
except ConfigError as err:
    sys.exit(f"lipflow: {err}")

# Rules pass DATA_DIR and TOKENS_DIR (and results/icl, results/figures) as literal params.
# `snakemake --lint` suggests deriving them from input or output, but Snakemake does not record a
# derived param for the params rerun trigger, so that switch would rerun every existing result once
# (and cost a function call per job in a dry run): the 9 "prefix ... hardcoded" lints are kept on purpose.
DATA_DIR = f"results/data/{config['corpus']['name']}"
try:
    # The files the corpus reads (globs expanded now) and a `file` tokenizer: inputs of their rules, so an
    # edited or a newly matching file reruns the data steps and the runs trained on them.
    CORPUS_FILES = [] if config["corpus"]["source"] == "embedded" else expand_paths(config["corpus"]["paths"])
    TOKENIZER_FILES = [config["tokenizer"]["path"]] if config["tokenizer"]["kind"] == "file" else []
    RUNS = resolve_runs(config)
    TOKENS_DIR = f"{DATA_DIR}/{tokenizer_id(config['tokenizer'])}"
except (ConfigError, DataError) as err:
    sys.exit(f"lipflow: {err}")

if config["runs"] and not plain_runs(config):
    print(f"lipflow: experiments selected, so the {len(config['runs'])} run(s) of `runs` are not trained "
          "(set runs_with_experiments: true to include them)", file=sys.stderr)
EVALUATIONS = list(config["evaluations"]["enabled"])


def run_evaluations(run):
    """The checkpoint evaluations of one run: its experiment's list, else evaluations.enabled."""
    own = experiment_evaluations(config, RUNS[run])
    return EVALUATIONS if own is None else own


ALL_EVALUATIONS = sorted({name for run in RUNS for name in run_evaluations(run)} | set(EVALUATIONS))
DATABASE = "results/lipflow.duckdb"
# Written by the database job after the database is in place. Snakemake checks only the outputs that
# something asks for, so every rule that reads the database asks for this too: a failed build (which
# leaves the previous database, an update() output) is then always rerun.
DATABASE_RECEIPT = f"{DATABASE}.built"
ENV = "../../envs/lipflow.yaml"


wildcard_constraints:
    run="[A-Za-z0-9][A-Za-z0-9_.-]{0,63}-[0-9a-f]{8}",
    evaluation="|".join(ALL_EVALUATIONS) or "(?!)",  # an empty list matches nothing


def evaluation_params_json(wildcards):
    """One evaluation's parameters (schema defaults filled) as JSON."""
    return json.dumps(config["evaluations"][wildcards.evaluation], sort_keys=True)


def evaluation_files(run):
    return expand("results/runs/{run}/evals/{evaluation}.parquet", run=run, evaluation=run_evaluations(run))


def run_evaluation_files(wildcards):
    return evaluation_files(wildcards.run)


def run_evaluation_checksums(wildcards):
    """The sidecars of run_evaluation_files: each evaluation job's receipt (see rule evaluate)."""
    return [f"{path}.sha256" for path in evaluation_files(wildcards.run)]


def evaluation_receipts(wildcards):
    """Every run's evaluation and merged-evaluation sidecars, for `rule all`: Snakemake does not
    look below an up-to-date output for a missing intermediate file, so a receipt deleted by a
    failed evaluation must be asked for by the target itself to be rebuilt."""
    return [f"{path}.sha256" for run in RUNS for path in (*evaluation_files(run), f"results/runs/{run}/evals.parquet")]


def run_config_json(wildcards):
    """The resolved config of one run, passed to the training job as JSON."""
    return json.dumps(RUNS[wildcards.run], sort_keys=True)


def config_block_json(block):
    """A top-level config block as JSON (a change to it reruns the rule through params)."""
    return json.dumps(config[block], sort_keys=True)


def param_count(cfg, vocab=512):
    """≈ parameters of a GPT-like model: 12·L·d² (blocks) + 2·V·d (embedding and head)."""
    return 12 * cfg["n_layers"] * cfg["d_model"] ** 2 + 2 * vocab * cfg["d_model"]


def train_mem_mb(wildcards, attempt):
    """1 GB of runtime + 16 bytes/parameter (weights, grads, two optimizer moments) + activations
    (≈ 34·B·T·d·L floats, Korthikanti et al. 2022), doubled on each retry."""
    override = config["resources"]["train_mem_mb"]
    if override:
        return override * attempt
    cfg = RUNS[wildcards.run]
    activations = 34 * cfg["batch_size"] * cfg["context"] * cfg["d_model"] * cfg["n_layers"] * 4
    return int(1000 + (16 * param_count(cfg) + activations) / 1e6) * attempt


def train_runtime(wildcards, attempt):
    """Minutes: 6·N·tokens FLOPs at a conservative 5 GFLOP/s (a CPU core), + 10, doubled on retry."""
    override = config["resources"]["train_runtime"]
    if override:
        return override * attempt
    cfg = RUNS[wildcards.run]
    tokens = cfg["steps"] * cfg["batch_size"] * cfg["grad_accum"] * cfg["context"]
    return int(10 + 6 * param_count(cfg) * tokens / 5e9 / 60) * attempt


def train_gpus(wildcards):
    """GPUs for one training job: ``gpu_per_run``, at least one per DDP process when GPUs are used."""
    gpus = config["resources"]["gpu_per_run"]
    return max(gpus, RUNS[wildcards.run]["nproc"]) if gpus else 0


def train_launcher(wildcards):
    """``python -m`` for one process; ``torchrun`` for data-parallel runs (nproc > 1)."""
    nproc = RUNS[wildcards.run]["nproc"]
    return f"torchrun --standalone --nproc_per_node={nproc} -m" if nproc > 1 else "python -m"


# In-context learning study (rules in icl.smk; configured by the `icl:` block)

ICL_CONFIG = load_config(config.get("icl"))
ICL_ENABLED = study_enabled(config, "icl")  # icl.enabled, or an experiment that includes the study
ICL_RUNS = [f"results/icl/runs/L{layers}_n{n}.safetensors" for layers, n in training_jobs(ICL_CONFIG)]
ICL_TABLES = [
    "loss_by_layers", "loss_by_n", "preconditioner", "preconditioner_error",
    "step_sizes", "agreement", "training",
]
ICL_FIGURES = [
    f"results/figures/icl_{name}.{ext}"
    for name in ("loss_vs_layers", "loss_vs_n")
    for ext in ("png", "svg")
]


def icl_tables(wildcards):
    """The study's tables when it is enabled (the DuckDB build loads them as icl_<table>)."""
    return expand("results/icl/{table}.parquet", table=ICL_TABLES) if ICL_ENABLED else []


def icl_targets(wildcards):
    """The study's part of the default target `all`: everything of icl_all when it is enabled."""
    return [*icl_tables(wildcards), *ICL_FIGURES, "results/icl/summary.json"] if ICL_ENABLED else []


def icl_params(wildcards):
    """The whole icl block as JSON (without `enabled`, which changes no result)."""
    return json.dumps({k: v for k, v in ICL_CONFIG.to_dict().items() if k != "enabled"})


def icl_train_params(wildcards):
    """Only the keys that change what a training job learns, so n_grid edits keep models."""
    return json.dumps(training_config(ICL_CONFIG))


# Experiments (rules in experiments.smk)

EXPERIMENTS = selected_experiments(config)
IMAGE_MLP = "results/image_mlp/robustness.parquet"  # loaded as table image_mlp_robustness by create_views


def experiment_outputs(name):
    """The figures (PNG and SVG) and tables (CSV) of one experiment."""
    figures = [f"results/figures/{fig}.{ext}" for fig in EXPERIMENT_FIGURES.get(name, ()) for ext in ("png", "svg")]
    return figures + [f"results/tables/{view}.csv" for view in EXPERIMENT_VIEWS.get(name, ())]


def experiment_targets(wildcards=None):
    """Everything the enabled experiments produce (added to `rule all`); the ICL study's outputs come
    from icl_targets (above), which experiments: [icl] switches on."""
    targets = [path for name in EXPERIMENTS for path in experiment_outputs(name)]
    return targets + experiment_database_inputs()


def experiment_database_inputs(wildcards=None):
    """Files outside the runs that the database loads when their study is on (for `database`'s input):
    the digits-MLP robustness table (loaded by create_views as image_mlp_robustness)."""
    return [IMAGE_MLP] if study_enabled(config, "image_mlp") else []
