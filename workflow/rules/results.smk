# Every run's Parquet → one DuckDB file, rebuilt whole (atomically) whenever an input changes.


localrules:
    database,


rule database:
    input:
        summaries=expand("results/runs/{run}/run.json", run=RUNS),
        metrics=expand("results/runs/{run}/train_metrics.parquet", run=RUNS),
        evals=expand("results/runs/{run}/evals.parquet", run=RUNS),
        manifest=rules.tokenize.output.manifest,
        icl=icl_tables,
    output:
        DATABASE,
    params:
        runs=" ".join(f"results/runs/{run}" for run in RUNS),
    log:
        "results/logs/database.log",
    resources:
        mem_mb=2000,
        runtime=10,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.results build --out {output} --manifest {input.manifest} --run-dirs {params.runs}"
        " > {log} 2>&1"
