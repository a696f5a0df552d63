# Each evaluation is its own rule per checkpoint; all of a run's evaluations and their merge share
# the group "evaluation", so a cluster sees one job per run instead of one per evaluation.


rule evaluate:
    input:
        model=rules.train.output.model,
        summary=rules.train.output.summary,
        manifest=rules.tokenize.output.manifest,
    output:
        "results/runs/{run}/evals/{evaluation}.parquet",
    params:
        cfg=evaluation_params_json,
        data_dir=TOKENS_DIR,
        run_dir="results/runs/{run}",
    log:
        "results/logs/evaluate/{run}/{evaluation}.log",
    group:
        "evaluation"
    resources:
        mem_mb=config["resources"]["eval_mem_mb"],
        runtime=config["resources"]["eval_runtime"],
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.evaluation --evaluation {wildcards.evaluation} --run-dir {params.run_dir}"
        " --data-dir {params.data_dir} --params-json {params.cfg:q} --out {output} > {log} 2>&1"


rule merge_evaluations:
    input:
        run_evaluation_files,
    output:
        "results/runs/{run}/evals.parquet",
    log:
        "results/logs/evaluate/{run}/merge.log",
    group:
        "evaluation"
    resources:
        mem_mb=500,
        runtime=5,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.results merge-evals --out {output} {input} > {log} 2>&1"
