# lipflow: corpus → tokenize → train → evaluate → DuckDB.  Thin on purpose: the rules live in
# workflow/rules/*.smk and call `python -m lipflow.<stage>`; nothing here imports torch.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/icl.smk"
include: "workflow/rules/results.smk"
include: "workflow/rules/experiments.smk"


rule all:
    default_target: True
    input:
        # The data stage's outputs by name: Snakemake does not rerun a job whose outputs are missing while
        # the jobs after it are up to date, so a data job that failed after Snakemake deleted its outputs
        # (a refusal, out of memory) would leave an edited corpus untokenized and "Nothing to be done".
        # A build without runs (the ICL study alone) reads no tokens and makes none.
        rules.corpus.output if RUNS else [],
        rules.tokenize.output if RUNS else [],
        DATABASE,
        DATABASE_RECEIPT,
        evaluation_receipts,
        icl_targets,
        experiment_targets,
        training_curve_targets,
        figure_receipts,
        study_receipts,
