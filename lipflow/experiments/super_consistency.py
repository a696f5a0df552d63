"""super_consistency: the sharpness curves across widths and depths, and their spread.

Noci et al. 2024 (arXiv 2402.17457). Views ``sharpness_spread`` (headline) and ``sharpness_curves``;
figure ``sharpness``. Runs: super_consistency.yaml. A setting is the run's label on the grid's first
axis, ``param``; the seeds of one setting and size are averaged before the spread across sizes.
"""

from __future__ import annotations

import math

from lipflow.results.plotting import Figure, colors, pyplot, read_view, whole_number_x_axis
from lipflow.results.views import RUNS_NEED, Part, View

SHARPNESS_CURVES = View(
    caption="table_sharpness_curves.rst",
    columns=("run_id", "name", "setting", "parametrization", "depth_mup", "optimizer", "lr", "width", "depth", "seed",
             "step", "sharpness", "preconditioned_sharpness", "loss"),
    types={"BIGINT": ("depth",),
           "DOUBLE": ("sharpness", "preconditioned_sharpness", "loss")},
    # the setting is the run's label on the grid's first axis (`param`: sc.<setting>.<width>.L<depth>…): two
    # labels of one parametrization differing in another key (weight decay, betas) are two settings
    parts=(Part(requires={"runs": RUNS_NEED + ("parametrization", "depth_mup", "optimizer", "lr", "d_model",
                                               "n_layers", "seed"),
                          "train_metrics": ("run_id", "step", "sharpness", "preconditioned_sharpness", "loss")},
                absent_reason="no super_consistency runs with sharpness in the database",
                sql="""
        SELECT r.run_id, r.name, split_part(r.name, '.', 2) AS setting, r.parametrization, r.depth_mup, r.optimizer,
               r.lr, r.d_model AS width, r.n_layers AS depth, r.seed, m.step, m.sharpness, m.preconditioned_sharpness,
               m.loss
        FROM train_metrics AS m JOIN runs AS r USING (run_id)
        WHERE r.experiment = 'super_consistency' AND m.sharpness IS NOT NULL"""),),
)

SHARPNESS_SPREAD = View(
    caption="table_sharpness_spread.rst",
    columns=("axis", "setting", "parametrization", "depth_mup", "optimizer", "lr", "fixed_size", "step", "n_models",
             "min_sharpness", "max_sharpness", "mean_sharpness", "spread", "mean_preconditioned_sharpness",
             "preconditioned_spread"),
    types={"VARCHAR": ("axis",),
           "BIGINT": ("fixed_size", "n_models"),
           "DOUBLE": ("min_sharpness", "max_sharpness", "mean_sharpness", "spread", "mean_preconditioned_sharpness",
                      "preconditioned_spread")},
    depends_on=("sharpness_curves",),
    parts=(Part(requires={"sharpness_curves": ("setting", "parametrization", "width", "depth", "step", "sharpness")},
                absent_reason="no super_consistency runs with sharpness at two or more widths or depths of one "
                              "setting in the database",
                sql="""
        -- one value per setting, size and step: its seeds' mean, so the spread across sizes holds no seed noise
        WITH sizes AS (
            SELECT setting, parametrization, depth_mup, optimizer, lr, width, depth, step,
                   avg(sharpness) AS sharpness, avg(preconditioned_sharpness) AS preconditioned_sharpness
            FROM sharpness_curves GROUP BY setting, parametrization, depth_mup, optimizer, lr, width, depth, step),
        groups AS (
            SELECT 'width' AS axis, setting, parametrization, depth_mup, optimizer, lr, depth AS fixed_size, step,
                   count(*) AS n_models, min(sharpness) AS min_sharpness,
                   max(sharpness) AS max_sharpness, avg(sharpness) AS mean_sharpness,
                   min(preconditioned_sharpness) AS min_pre, max(preconditioned_sharpness) AS max_pre,
                   avg(preconditioned_sharpness) AS mean_preconditioned_sharpness
            FROM sizes GROUP BY setting, parametrization, depth_mup, optimizer, lr, depth, step
            UNION ALL
            SELECT 'depth' AS axis, setting, parametrization, depth_mup, optimizer, lr, width AS fixed_size, step,
                   count(*), min(sharpness), max(sharpness), avg(sharpness),
                   min(preconditioned_sharpness), max(preconditioned_sharpness), avg(preconditioned_sharpness)
            FROM sizes GROUP BY setting, parametrization, depth_mup, optimizer, lr, width, step)
        SELECT axis, setting, parametrization, depth_mup, optimizer, lr, fixed_size, step, n_models, min_sharpness,
               max_sharpness, mean_sharpness, (max_sharpness - min_sharpness) / abs(mean_sharpness) AS spread,
               mean_preconditioned_sharpness,
               (max_pre - min_pre) / abs(mean_preconditioned_sharpness) AS preconditioned_spread
        FROM groups WHERE n_models >= 2"""),),
)

# headline view first; each view is also written as results/tables/<view>.csv
VIEWS = {"sharpness_spread": SHARPNESS_SPREAD, "sharpness_curves": SHARPNESS_CURVES}


def _parametrization_label(parametrization: str, depth_mup: bool) -> str:
    return f"{parametrization.upper()}{' + depth-µP' if depth_mup else ''}".replace("MUP", "µP")


def sharpness(con):
    """Sharpness against step (the mean over seeds, as the spread takes it); a panel per (setting, optimizer,
    fixed depth) across widths and per (setting, optimizer, fixed width) across depths; the title gives the mean
    spread. A second row shows Adam's preconditioned sharpness λ_max(P⁻¹H) when the runs logged it."""
    plt = pyplot()
    curves = read_view(con, "sharpness_curves", "ORDER BY step")
    spread = read_view(con, "sharpness_spread")
    panels = []
    for axis, size_col, fixed_col in (("width", "width", "depth"), ("depth", "depth", "width")):
        for key, group in curves.groupby(["setting", "parametrization", "depth_mup", "optimizer", fixed_col, "lr"]):
            if group[size_col].nunique() >= 2:
                panels.append((axis, size_col, fixed_col, key, group))
    rows = [("sharpness", "spread", "top Hessian eigenvalue $\\lambda_{max}$\n(train loss, fixed batch)")]
    if curves.preconditioned_sharpness.notna().any():
        rows.append(("preconditioned_sharpness", "preconditioned_spread",
                     "Adam-preconditioned $\\lambda_{max}(P^{-1}H)$\n(stable below (2+2β₁)/(1−β₁))"))
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4 * len(panels), 3.4 * len(rows)), squeeze=False)
    for row_axes, (column, spread_column, ylabel) in zip(axes, rows):
        for ax, (axis, size_col, fixed_col, (setting, param, depth_mup, optimizer, fixed, lr), group) in zip(
                row_axes, panels):
            sizes = sorted(group[size_col].unique())
            for color, size in zip(colors(len(sizes)), sizes):
                seed_mean = group[group[size_col] == size].groupby("step", as_index=False)[column].mean()
                ax.plot(seed_mean.step, seed_mean[column], "o-", ms=3, color=color, label=f"{size_col} {size}")
            cells = spread[(spread.axis == axis) & (spread.setting == setting) & (spread.parametrization == param)
                           & (spread.depth_mup == depth_mup) & (spread.optimizer == optimizer)
                           & (spread.fixed_size == fixed) & (spread.lr == lr)]
            ax.set_title(f"{setting}: {_parametrization_label(param, depth_mup)} + {optimizer}, {fixed_col} {fixed}\n"
                         f"mean spread {cells[spread_column].mean():.2f}", fontsize=10)
            ax.set_xlabel("training step")
            whole_number_x_axis(ax, group.step)  # one logged step (10) ticked 9.6, 9.8 … 10.4
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            symlog_if_spiky(ax, group[column])
        row_axes[0].set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def symlog_if_spiky(ax, values) -> None:
    """A symmetric log axis (linear within ± the power of ten at or above the median |value|) when a few
    estimates exceed 20× the median magnitude: early power-iteration estimates of ±10³ flattened every
    later curve onto 0."""
    import numpy as np

    magnitudes = np.abs(values.dropna().to_numpy(dtype=float))
    magnitudes = magnitudes[np.isfinite(magnitudes)]
    if len(magnitudes) and (median := float(np.median(magnitudes))) > 0 and magnitudes.max() > 20 * median:
        ax.set_yscale("symlog", linthresh=10 ** math.ceil(math.log10(median)), linscale=1.5)


FIGURES = {"sharpness": Figure(sharpness, caption="figure_sharpness.rst")}
