# One training job per run; a changed run config is a new run id, so nothing trained is overwritten.
# The CPU and GPU counts are constants unless some run needs per-run values (a callable costs
# Snakemake a signature inspection per job). A run of nproc > 1 starts its own workers.


rule train:
    input:
        manifest=rules.tokenize.output.manifest,
    output:
        model="results/runs/{run}/model.safetensors",
        config="results/runs/{run}/config.json",
        metrics="results/runs/{run}/train_metrics.parquet",
        summary="results/runs/{run}/run.json",
    params:
        cfg=run_config_json,
        data_dir=TOKENS_DIR,
        out_dir="results/runs/{run}",
        launcher="python -m",  # a param since finished runs recorded it (a changed param reruns them)
    log:
        "results/logs/train/{run}.log",
    threads: train_cpus if any(run["nproc"] > 1 for run in RUNS.values()) else 2
    resources:
        mem_mb=train_mem_mb,
        runtime=train_runtime,
        cpus_per_task=train_cpus if any(run["nproc"] > 1 for run in RUNS.values()) else 2,
        gpu=train_gpus if config["resources"]["gpu_per_run"] else 0,
    conda:
        ENV
    # exec: the stage replaces the job's shell, so a SIGTERM sent to every process of the job (SLURM's
    # preemption) does not end the job at once by killing its shell while the stage saves its checkpoint
    shell:
        "exec {params.launcher} lipflow.train --run-id {wildcards.run} --config-json {params.cfg:q}"
        " --data-dir {params.data_dir} --out-dir {params.out_dir} > {log} 2>&1"
