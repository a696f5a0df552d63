# Experiments: their runs come from lipflow.experiments.expand_experiments (through resolve_runs in
# common.smk); here are the figures and tables of each experiment (one job per experiment, reading
# the results database), the image-MLP robustness study (scikit-learn digits, the same size under both
# presets: about 2 minutes on one core), and `experiment_targets` for `rule all`.
from lipflow.experiments import EXPERIMENT_FIGURES, EXPERIMENT_VIEWS, selected_experiments, study_enabled

EXPERIMENTS = selected_experiments(config)
IMAGE_MLP = "results/image_mlp/robustness.parquet"  # loaded as table image_mlp_robustness by create_views


def experiment_outputs(name):
    """The figures (PNG and SVG) and tables (CSV) of one experiment."""
    figures = [f"results/figures/{fig}.{ext}" for fig in EXPERIMENT_FIGURES.get(name, ()) for ext in ("png", "svg")]
    return figures + [f"results/tables/{view}.csv" for view in EXPERIMENT_VIEWS.get(name, ())]


def experiment_targets(wildcards=None):
    """Everything the enabled experiments produce (added to `rule all`); the ICL study's outputs come
    from icl_targets (icl.smk), which experiments: [icl] switches on."""
    targets = [path for name in EXPERIMENTS for path in experiment_outputs(name)]
    return targets + experiment_database_inputs()


def experiment_database_inputs(wildcards=None):
    """Files outside the runs that the database loads when their study is on (for `database`'s input):
    the digits-MLP robustness table (loaded by create_views as image_mlp_robustness)."""
    return [IMAGE_MLP] if study_enabled(config, "image_mlp") else []


for _name in EXPERIMENT_FIGURES:

    rule:
        name:
            f"experiment_{_name}"
        input:
            db=DATABASE,
        output:
            figures=[
                report(f"results/figures/{fig}.png", caption=f"../report/figure_{fig}.rst",
                       category=_name, labels={"figure": fig, "format": "PNG"})
                for fig in EXPERIMENT_FIGURES[_name]
            ],
            vectors=[f"results/figures/{fig}.svg" for fig in EXPERIMENT_FIGURES[_name]],
            tables=[
                report(f"results/tables/{view}.csv", caption=f"../report/table_{view}.rst",
                       category=_name, labels={"table": view, "format": "CSV"})
                for view in EXPERIMENT_VIEWS[_name]
            ],
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
            " --experiment {params.experiment} > {log} 2>&1"


rule image_mlp_robustness:
    output:
        IMAGE_MLP,
    log:
        "results/logs/experiments/image_mlp_robustness.log",
    resources:
        mem_mb=2000,
        runtime=60,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.evaluation.image_mlp --out {output} > {log} 2>&1"


report: "../report/workflow.rst"
