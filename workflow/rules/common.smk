# Helpers shared by all rules: config validation, run resolution, paths and resources.
import json
import math
import os
import sys

from lipflow.config import ConfigError, check_config, plain_runs, resolve_runs, tokenizer_id
from lipflow.experiments import experiment_evaluations

try:
    # Validate against workflow/schemas/config.schema.yaml and fill its defaults (one pass, what
    # snakemake.utils.validate does), failing with one line naming the key path before any job starts.
    check_config(config)
except ConfigError as err:
    sys.exit(f"lipflow: {err}")

RUNS = resolve_runs(config)
if config["runs"] and not plain_runs(config):
    print(f"lipflow: experiments selected, so the {len(config['runs'])} run(s) of `runs` are not trained "
          "(set runs_with_experiments: true to include them)", file=sys.stderr)
EVALUATIONS = list(config["evaluations"]["enabled"])


def run_evaluations(run):
    """The checkpoint evaluations of one run: its experiment's list, else evaluations.enabled."""
    own = experiment_evaluations(config, RUNS[run])
    return EVALUATIONS if own is None else own


ALL_EVALUATIONS = sorted({name for run in RUNS for name in run_evaluations(run)} | set(EVALUATIONS))
DATA_DIR = f"results/data/{config['corpus']['name']}"
TOKENS_DIR = f"{DATA_DIR}/{tokenizer_id(config['tokenizer'])}"
DATABASE = "results/lipflow.duckdb"
ENV = "../../envs/lipflow.yaml"


wildcard_constraints:
    run="[A-Za-z0-9][A-Za-z0-9_.-]{0,63}-[0-9a-f]{8}",
    evaluation="|".join(ALL_EVALUATIONS) or "(?!)",  # an empty list matches nothing


def evaluation_params_json(wildcards):
    """One evaluation's parameters (schema defaults filled) as JSON."""
    return json.dumps(config["evaluations"][wildcards.evaluation], sort_keys=True)


def run_evaluation_files(wildcards):
    return expand("results/runs/{run}/evals/{evaluation}.parquet", run=wildcards.run,
                  evaluation=run_evaluations(wildcards.run))


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
