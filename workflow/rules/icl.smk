# In-context learning study (issue 5; Ahn et al. 2023): linear transformers vs preconditioned GD.
# Configured by the `icl:` block of config.yaml (schema: lipflow/studies/icl/config_schema.yaml).
# Target: icl_all. Training jobs are cached per (L, n): they rerun only when a key that
# changes what is learned (lipflow.studies.icl.config.TRAINING_KEYS) changes.
# Its file lists and params (ICL_RUNS, icl_params …) come from the Plan (common.smk, lipflow/plan_rules.py).


rule icl_all:
    input:
        tables=expand("results/icl/{table}.parquet", table=ICL_TABLES),
        tables_receipt=ICL_TABLES_RECEIPT,
        figures=ICL_FIGURES,
        receipt=ICL_FIGURE_RECEIPT,
        summary="results/icl/summary.json",


rule icl_train:
    message: "ICL: train L={wildcards.layers} layers at n={wildcards.n}"
    output:
        checkpoint="results/icl/runs/L{layers}_n{n}.safetensors",
    log:
        "results/logs/icl/train_L{layers}_n{n}.log",
    wildcard_constraints:
        layers=r"\d+",
        n=r"\d+",
    params:
        config_json=icl_train_params,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.studies.icl --threads {threads} train --config-json {params.config_json:q}"
        " --layers {wildcards.layers} --n {wildcards.n} --out {output.checkpoint} > {log} 2>&1"


rule icl_baselines:
    message: "ICL: optimal PGD, tuned GD, least squares, Γ⋆ and the regression optimum"
    output:
        baselines="results/icl/runs/baselines.parquet",
    log:
        "results/logs/icl/baselines.log",
    params:
        config_json=icl_baselines_params,
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.studies.icl --threads {threads} baselines --config-json {params.config_json:q}"
        " --out {output.baselines} > {log} 2>&1"


rule icl_collect:
    message: "ICL: evaluate the trained models and write results/icl/*.parquet"
    input:
        runs=ICL_RUNS,
        baselines="results/icl/runs/baselines.parquet",
    # update() tables and sidecars (Snakemake backs both up and restores both after a failure, so a failed
    # rerun keeps the previous tables, each matching its sidecar) and a plain receipt, written last: a failed job reruns
    output:
        **{table: update(f"results/icl/{table}.parquet") for table in ICL_TABLES},
        **{f"{table}_sidecar": update(f"results/icl/{table}.parquet.sha256") for table in ICL_TABLES},
        receipt=ICL_TABLES_RECEIPT,
    log:
        "results/logs/icl/collect.log",
    params:
        config_json=icl_params,
        out_dir="results/icl",
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.studies.icl --threads {threads} collect --config-json {params.config_json:q}"
        " --baselines {input.baselines} --runs {input.runs} --out-dir {params.out_dir} --receipt {output.receipt}"
        " > {log} 2>&1"


rule icl_plots:
    message: "ICL: loss vs layers and loss vs n figures"
    input:
        loss_by_layers="results/icl/loss_by_layers.parquet",
        loss_by_n="results/icl/loss_by_n.parquet",
    # update() and a plain receipt, as the experiments' figures (rule experiment_*): a user's file at a figure's
    # path is refused by the plot command, never deleted by Snakemake, and a failed job reruns
    output:
        **{f"{name}_png": update(report(f"results/figures/icl_{name}.png", caption=f"../report/figure_icl_{name}.rst",
                                        category="icl", labels={"figure": f"icl_{name}", "format": "PNG"}))
           for name in ("loss_vs_layers", "loss_vs_n")},
        **{f"{name}_svg": update(f"results/figures/icl_{name}.svg") for name in ("loss_vs_layers", "loss_vs_n")},
        # update() as the figures: Snakemake restores a failed job's figure and its sidecar together
        **{f"{name}_{ext}_sidecar": update(f"results/figures/icl_{name}.{ext}.sha256")
           for name in ("loss_vs_layers", "loss_vs_n") for ext in ("png", "svg")},
        receipt=ICL_FIGURE_RECEIPT,
    log:
        "results/logs/icl/plots.log",
    params:
        results_dir="results/icl",
        out_dir="results/figures",
        caption=icl_caption,  # what the captions (workflow/report/figure_icl_*.rst) say of the config
        config_json=icl_params,
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.studies.icl plot --config-json {params.config_json:q}"
        " --results-dir {params.results_dir} --out-dir {params.out_dir} --receipt {output.receipt} > {log} 2>&1"


rule icl_check:
    message: "ICL: trained model vs optimal PGD at (max layers, n)"
    input:
        agreement="results/icl/agreement.parquet",
        step_sizes="results/icl/step_sizes.parquet",
        preconditioner_error="results/icl/preconditioner_error.parquet",
        loss_by_layers="results/icl/loss_by_layers.parquet",
    output:
        summary="results/icl/summary.json",
    log:
        "results/logs/icl/check.log",
    params:
        config_json=icl_params,
        results_dir="results/icl",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.studies.icl check --config-json {params.config_json:q}"
        " --results-dir {params.results_dir} --out {output.summary} > {log} 2>&1"
