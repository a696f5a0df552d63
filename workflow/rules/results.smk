# Every run's Parquet → one DuckDB file, rebuilt whole (atomically) whenever an input changes.


localrules:
    database,
    training_curves,


rule database:
    input:
        summaries=expand("results/runs/{run}/run.json", run=RUNS),
        metrics=expand("results/runs/{run}/train_metrics.parquet", run=RUNS),
        evals=expand("results/runs/{run}/evals.parquet", run=RUNS),
        evals_checksums=expand("results/runs/{run}/evals.parquet.sha256", run=RUNS),
        # A plain path, not rules.tokenize.output.manifest: a rule reference makes Snakemake hash the
        # whole run lists above once per file (quadratic in runs; 2 s of a 1,000-run dry run).
        # none without runs (the ICL study alone): then no corpus is tokenized for the database's shards table
        manifest=[f"{TOKENS_DIR}/manifest.json"] if RUNS else [],
        # the tables of the studies the config has on, named on the build's command line: it loads no others
        studies=study_tables,
    output:
        # update(): Snakemake does not delete the database before the job (and restores it from its backup
        # after a failure), so the previous one stays readable; the receipt (DATABASE_RECEIPT, a plain
        # output) is deleted, so a failed build is always rerun.
        db=update(DATABASE),
        receipt=DATABASE_RECEIPT,
    params:
        runs=PLAN.database_run_dirs(),
    log:
        "results/logs/database.log",
    resources:
        mem_mb=2000,
        runtime=10,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.results build --out {output.db} --receipt {output.receipt} --manifest {input.manifest}"
        " --run-dirs {params.runs} --study-tables {input.studies}"
        " > {log} 2>&1"


# The runs block's training curves (lipflow/results/training_curves.py), drawn from the database: a few
# seconds, so like the database it runs where Snakemake runs, not as a cluster job.
rule training_curves:
    input:
        db=DATABASE,
        receipt=DATABASE_RECEIPT,
    output:
        # update(), as the experiments' figures: a user's file there is refused by lipflow.plots, never deleted
        figure=update(report("results/figures/training_curves.png", caption="../report/figure_training_curves.rst",
                             category="runs", labels={"figure": "training_curves", "format": "PNG"})),
        vector=update("results/figures/training_curves.svg"),
        sidecars=[update(f"results/figures/training_curves.{ext}.sha256") for ext in ("png", "svg")],
        receipt=figure_receipt("training_curves"),  # plain, written last: a failed job reruns
    log:
        "results/logs/training_curves.log",
    resources:
        mem_mb=2000,
        runtime=10,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.plots --db {input.db} --out-dir results/figures --training-curves"
        " --receipt {output.receipt} > {log} 2>&1"
