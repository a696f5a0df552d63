# Experiments: their runs come from lipflow.experiments.expand_experiments (through the Plan built in
# common.smk); here are the figures and tables of each experiment (one job per experiment, reading
# the results database), each with the report caption its file (lipflow/experiments/<name>.py)
# names, and the image-MLP robustness study (lipflow/studies/image_mlp.py, configured by the
# `image_mlp` block; scikit-learn digits, about 2 minutes on one core at its 5 seeds). IMAGE_MLP and the targets
# for `rule all` come from lipflow/plan.py.

from lipflow.experiments import CATALOG as EXPERIMENT_CATALOG


for _name, _experiment in EXPERIMENT_CATALOG.items():

    rule:
        name:
            f"experiment_{_name}"
        input:
            db=DATABASE,
            receipt=DATABASE_RECEIPT,
        # update(): Snakemake does not delete them before the job, so lipflow.plots decides what it may
        # replace (a figure it drew, a CSV of the view) and a user's file there is refused, never lost;
        # the receipt (plain, written last) makes a failed job rerun
        output:
            figures=[
                update(report(f"results/figures/{fig}.png", caption=f"../report/{figure.caption}",
                              category=_name, labels={"figure": fig, "format": "PNG"}))
                for fig, figure in _experiment.figures.items()
            ],
            vectors=[update(f"results/figures/{fig}.svg") for fig in _experiment.figures],
            # update() as the figures: Snakemake restores a failed job's figure and its sidecar together
            figure_sidecars=[update(f"results/figures/{fig}.{ext}.sha256") for fig in _experiment.figures
                             for ext in ("png", "svg")],
            tables=[
                update(report(f"results/tables/{name}.csv", caption=f"../report/{view.caption}",
                              category=_name, labels={"table": name, "format": "CSV"}))
                for name, view in _experiment.views.items()
            ],
            # update() as the tables: Snakemake restores a failed job's table and its sidecar together
            table_sidecars=[update(f"results/tables/{name}.csv.sha256") for name in _experiment.views],
            receipt=figure_receipt(_name),
        params:
            experiment=_name,
        log:
            f"results/logs/experiments/{_name}.log",
        resources:
            mem_mb=2000,
            runtime=10,
            cpus_per_task=1,
        conda:
            ENV
        shell:
            "python -m lipflow.plots --db {input.db} --out-dir results/figures --tables-dir results/tables"
            " --experiment {params.experiment} --receipt {output.receipt} > {log} 2>&1"


rule image_mlp_robustness:
    # update() table and sidecar and a plain receipt, as rule icl_collect: a failed rerun keeps the previous table
    output:
        table=update(IMAGE_MLP),
        sidecar=update(f"{IMAGE_MLP}.sha256"),
        receipt=IMAGE_MLP_RECEIPT,
    params:
        cfg=config_block_json("image_mlp"),
    log:
        "results/logs/experiments/image_mlp_robustness.log",
    resources:
        mem_mb=2000,
        runtime=image_mlp_runtime,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.studies.image_mlp --config-json {params.cfg:q} --out {output.table}"
        " --receipt {output.receipt} > {log} 2>&1"


report: "../report/workflow.rst"
