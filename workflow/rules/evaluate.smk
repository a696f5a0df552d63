# Each evaluation is its own rule per checkpoint. On a cluster, profiles/slurm puts all of a run's
# evaluations and their merge in the group "evaluation" (one SLURM job per run, not per evaluation);
# the group is set there, not here, because a local run ignores groups but a dry run still pays for them.


rule evaluate:
    input:
        model=rules.train.output.model,
        summary=rules.train.output.summary,
        manifest=rules.tokenize.output.manifest,
    output:
        # update() and a plain sidecar: see rule database (the sidecar is this job's receipt)
        table=update("results/runs/{run}/evals/{evaluation}.parquet"),
        checksum="results/runs/{run}/evals/{evaluation}.parquet.sha256",
    params:
        cfg=evaluation_params_json,
        data_dir=TOKENS_DIR,
        run_dir=lambda wildcards, input: os.path.dirname(input.model),  # derived, not a second literal
    log:
        "results/logs/evaluate/{run}/{evaluation}.log",
    resources:
        mem_mb=config["resources"]["eval_mem_mb"],
        runtime=config["resources"]["eval_runtime"],
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.evaluation --evaluation {wildcards.evaluation} --run-dir {params.run_dir}"
        " --data-dir {params.data_dir} --params-json {params.cfg:q} --out {output.table} > {log} 2>&1"


rule merge_evaluations:
    input:
        tables=run_evaluation_files,
        checksums=run_evaluation_checksums,
    output:
        table=update("results/runs/{run}/evals.parquet"),
        checksum="results/runs/{run}/evals.parquet.sha256",
    log:
        "results/logs/evaluate/{run}/merge.log",
    resources:
        mem_mb=500,
        runtime=5,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.results merge-evals --run-id {wildcards.run} --out {output.table} {input.tables} > {log} 2>&1"
