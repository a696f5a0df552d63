# Shared by all rules: the Plan (lipflow.plan: run configs by id, each run's evaluations, the studies
# and experiments, built once from the validated config) and the functions the rules call
# (lipflow.plan_rules). The rule files hold rules only.
import os
import sys

from lipflow.config import RUN_ID_PATTERN, ConfigError, load_config_file
from lipflow.data import DataError
from lipflow.plan import IMAGE_MLP, IMAGE_MLP_RECEIPT, Plan, figure_receipt
from lipflow.plan_rules import ICL_FIGURE_RECEIPT, ICL_FIGURES, ICL_TABLES, ICL_TABLES_RECEIPT, RuleFunctions

try:
    # Snakemake's YAML loading keeps the last value of a repeated key: reread each config file to refuse one.
    for _configfile in workflow.configfiles:
        load_config_file(_configfile)
    # Validate against workflow/schemas/config.schema.yaml and fill its defaults into `config` (one pass,
    # what snakemake.utils.validate does), then the cross-key rules, failing with one line naming the
    # key path before any job starts.
    PLAN = Plan.from_config(config)
    # The files the corpus reads (globs expanded now) and a `file` tokenizer: inputs of their rules, so an
    # edited or a newly matching file reruns the data steps and the runs trained on them.
    CORPUS_FILES = PLAN.corpus_files()
    PLAN.check_data_folders()
    TOKENIZER_FILES = PLAN.tokenizer_files()
    TOKENS_DIR = PLAN.tokens_dir
except (ConfigError, DataError) as err:
    sys.exit(f"lipflow: {err}")

if config["runs"] and not PLAN.trains_runs_block:
    print(f"lipflow: experiments selected, so the {len(config['runs'])} run(s) of `runs` are not trained "
          "(set runs_with_experiments: true to include them)", file=sys.stderr)

# Rules pass DATA_DIR and TOKENS_DIR (and results/icl, results/figures) as literal params.
# `snakemake --lint` suggests deriving them from input or output, but Snakemake does not record a
# derived param for the params rerun trigger, so that switch would rerun every existing result once
# (and cost a function call per job in a dry run): the 9 "prefix ... hardcoded" lints are kept on purpose.
DATA_DIR = PLAN.data_dir
RUNS = PLAN.runs
DATABASE = "results/lipflow.duckdb"
ENV = "../../envs/lipflow.yaml"

# The in-context learning study's checkpoints (rules in icl.smk; configured by the `icl:` block).
ICL_RUNS = PLAN.icl_runs()


wildcard_constraints:
    run=RUN_ID_PATTERN,
    evaluation="|".join(PLAN.all_evaluations) or "(?!)",  # an empty list matches nothing


# The input, params and resource functions the rules name (lipflow.plan_rules.RuleFunctions).
_RULE_FUNCTIONS = RuleFunctions(PLAN)
run_evaluation_files = _RULE_FUNCTIONS.run_evaluation_files
run_evaluation_checksums = _RULE_FUNCTIONS.run_evaluation_checksums
evaluation_receipts = _RULE_FUNCTIONS.evaluation_receipts
evaluation_params_json = _RULE_FUNCTIONS.evaluation_params_json
run_config_json = _RULE_FUNCTIONS.run_config_json
config_block_json = PLAN.config_block_json
train_mem_mb = _RULE_FUNCTIONS.train_mem_mb
train_runtime = _RULE_FUNCTIONS.train_runtime
image_mlp_runtime = _RULE_FUNCTIONS.image_mlp_runtime
train_gpus = _RULE_FUNCTIONS.train_gpus
train_cpus = _RULE_FUNCTIONS.train_cpus
study_tables = _RULE_FUNCTIONS.study_tables
# Written by the database job after the database is in place, named by what it was built from
# (RuleFunctions.database_receipt). Snakemake checks only the outputs that something asks for, so every
# rule that reads the database asks for this too: a failed build (which leaves the previous database, an
# update() output) is then always rerun.
DATABASE_RECEIPT = _RULE_FUNCTIONS.database_receipt(DATABASE)
icl_targets = _RULE_FUNCTIONS.icl_targets
icl_params = _RULE_FUNCTIONS.icl_params
icl_train_params = _RULE_FUNCTIONS.icl_train_params
icl_baselines_params = _RULE_FUNCTIONS.icl_baselines_params
icl_caption = _RULE_FUNCTIONS.icl_caption
experiment_targets = _RULE_FUNCTIONS.experiment_targets
training_curve_targets = _RULE_FUNCTIONS.training_curve_targets
figure_receipts = _RULE_FUNCTIONS.figure_receipts
study_receipts = _RULE_FUNCTIONS.study_receipts
