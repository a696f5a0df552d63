"""precision: low-precision inference of constrained and unconstrained models.

Views ``precision`` (headline) and ``precision_bounds``; figure ``precision`` (both views). Runs: precision.yaml.
"""

from __future__ import annotations

from lipflow.results.plotting import Figure, category_colors, note_on_axes, pyplot, read_view
from lipflow.results.views import RUNS_NEED, Part, View

# The precision experiment's precision-evaluation rows, the first CTE of its two views.
PRECISION_EVALS = """
        WITH e AS (
            SELECT e.* FROM evals AS e JOIN runs AS r USING (run_id)
            WHERE e.eval = 'precision' AND r.experiment = 'precision'),"""

PRECISION = View(
    caption="table_precision.rst",
    columns=("domain", "label", "run_id", "model", "optimizer", "weight_constraint", "max_activation", "format",
             "scaling", "val_loss", "accuracy", "val_loss_delta", "accuracy_delta", "activation_overflow",
             "activation_saturated", "weight_saturated", "fp8_safe_proven", "fp8_safe_observed",
             "real_fp8_accuracy", "simulated_fp8_accuracy"),
    types={"VARCHAR": ("format", "scaling"),
           "DOUBLE": ("val_loss_delta", "accuracy_delta", "activation_overflow", "activation_saturated",
                      "weight_saturated", "fp8_safe_proven", "fp8_safe_observed", "real_fp8_accuracy",
                      "simulated_fp8_accuracy")},
    parts=(Part(requires={"runs": RUNS_NEED + ("model", "optimizer", "weight_constraint", "max_activation"),
                          "evals": ("run_id", "eval", "metric", "value", "format", "scaling")},
                absent_reason="no precision runs with the precision evaluation in the database",
                sql=PRECISION_EVALS + """
        cells AS (
            SELECT run_id, format, scaling,
                   max(value) FILTER (WHERE metric = 'val_loss') AS val_loss,
                   max(value) FILTER (WHERE metric = 'accuracy') AS accuracy,
                   max(value) FILTER (WHERE metric = 'val_loss_delta') AS val_loss_delta,
                   max(value) FILTER (WHERE metric = 'accuracy_delta') AS accuracy_delta,
                   max(value) FILTER (WHERE metric = 'activation_overflow') AS activation_overflow,
                   max(value) FILTER (WHERE metric = 'activation_saturated') AS activation_saturated,
                   max(value) FILTER (WHERE metric = 'weight_saturated') AS weight_saturated,
                   max(value) FILTER (WHERE metric = 'real_fp8_accuracy') AS real_fp8_accuracy,
                   max(value) FILTER (WHERE metric = 'simulated_fp8_accuracy') AS simulated_fp8_accuracy
            FROM e WHERE metric IN ('val_loss', 'accuracy', 'val_loss_delta', 'accuracy_delta',
                                    'activation_overflow', 'activation_saturated', 'weight_saturated',
                                    'real_fp8_accuracy', 'simulated_fp8_accuracy')
            GROUP BY run_id, format, scaling),
        safety AS (
            SELECT run_id, format,
                   max(value) FILTER (WHERE metric = 'fp8_safe_proven') AS fp8_safe_proven,
                   max(value) FILTER (WHERE metric = 'fp8_safe_observed') AS fp8_safe_observed
            FROM e WHERE metric IN ('fp8_safe_proven', 'fp8_safe_observed') GROUP BY run_id, format)
        SELECT 'lm' AS domain, substr(r.name, strpos(r.name, '.') + 1) AS label, r.run_id, r.model, r.optimizer,
               r.weight_constraint, r.max_activation, c.format, c.scaling, c.val_loss, c.accuracy,
               c.val_loss_delta, c.accuracy_delta, c.activation_overflow, c.activation_saturated,
               c.weight_saturated, s.fp8_safe_proven, s.fp8_safe_observed, c.real_fp8_accuracy,
               c.simulated_fp8_accuracy
        FROM cells AS c JOIN runs AS r USING (run_id) LEFT JOIN safety AS s USING (run_id, format)"""),),
)

PRECISION_BOUNDS = View(
    caption="table_precision_bounds.rst",
    columns=("label", "run_id", "model", "optimizer", "weight_constraint", "steps", "accuracy",
             "proven_max_activation", "observed_max_activation", "proven_over_observed",
             "analytic_activation_bound", "e4m3_proven_safe", "e4m3_observed_safe", "e5m2_proven_safe",
             "fp16_proven_safe", "matched_label", "matched_accuracy", "matched_proven_max_activation",
             "matched_observed_max_activation", "matched_proven_over_observed"),
    types={"BIGINT": ("steps",),
           "DOUBLE": ("proven_max_activation", "observed_max_activation", "proven_over_observed",
                      "analytic_activation_bound", "e4m3_proven_safe", "e4m3_observed_safe", "e5m2_proven_safe",
                      "fp16_proven_safe", "matched_accuracy", "matched_proven_max_activation",
                      "matched_observed_max_activation", "matched_proven_over_observed"),
           "VARCHAR": ("matched_label",)},
    parts=(Part(requires={"runs": RUNS_NEED + ("model", "optimizer", "weight_constraint", "steps"),
                          "evals": ("run_id", "eval", "metric", "value", "format")},
                absent_reason="no precision runs with the precision evaluation in the database",
                sql=PRECISION_EVALS + """
        per_run AS (
            SELECT run_id,
                   max(value) FILTER (WHERE metric = 'accuracy' AND format = 'fp32') AS accuracy,
                   max(value) FILTER (WHERE metric = 'proven_max_activation') AS proven_max_activation,
                   max(value) FILTER (WHERE metric = 'observed_max_activation') AS observed_max_activation,
                   max(value) FILTER (WHERE metric = 'proven_over_observed') AS proven_over_observed,
                   max(value) FILTER (WHERE metric = 'analytic_activation_bound') AS analytic_activation_bound,
                   max(value) FILTER (WHERE metric = 'fp8_safe_proven' AND format = 'fp8_e4m3') AS e4m3_proven_safe,
                   max(value) FILTER (WHERE metric = 'fp8_safe_observed' AND format = 'fp8_e4m3')
                       AS e4m3_observed_safe,
                   max(value) FILTER (WHERE metric = 'fp8_safe_proven' AND format = 'fp8_e5m2') AS e5m2_proven_safe,
                   max(value) FILTER (WHERE metric = 'fp8_safe_proven' AND format = 'fp16') AS fp16_proven_safe
            FROM e GROUP BY run_id),
        runs_ AS (
            SELECT p.*, substr(r.name, strpos(r.name, '.') + 1) AS label, r.model, r.optimizer,
                   r.weight_constraint, r.steps, r.weight_constraint <> 'none' AS constrained
            FROM per_run AS p JOIN runs AS r USING (run_id)),
        matches AS (
            SELECT a.run_id, b.label AS matched_label, b.accuracy AS matched_accuracy,
                   b.proven_max_activation AS matched_proven_max_activation,
                   b.observed_max_activation AS matched_observed_max_activation,
                   b.proven_over_observed AS matched_proven_over_observed,
                   row_number() OVER (PARTITION BY a.run_id ORDER BY abs(a.accuracy - b.accuracy), b.label) AS rank
            FROM runs_ AS a JOIN runs_ AS b ON a.model = b.model AND a.constrained <> b.constrained)
        SELECT r.label, r.run_id, r.model, r.optimizer, r.weight_constraint, r.steps, r.accuracy,
               r.proven_max_activation, r.observed_max_activation, r.proven_over_observed,
               r.analytic_activation_bound, r.e4m3_proven_safe, r.e4m3_observed_safe, r.e5m2_proven_safe,
               r.fp16_proven_safe, m.matched_label, m.matched_accuracy, m.matched_proven_max_activation,
               m.matched_observed_max_activation, m.matched_proven_over_observed
        FROM runs_ AS r LEFT JOIN matches AS m ON m.run_id = r.run_id AND m.rank = 1"""),),
)

# headline view first; each view is also written as results/tables/<view>.csv
VIEWS = {"precision": PRECISION, "precision_bounds": PRECISION_BOUNDS}


FORMAT_ORDER = ("fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8")


def precision(con):
    """Change of val accuracy against the model's fp32 accuracy (percentage points) per number format,
    one bar per model (its fp32 accuracy and weight constraint in the legend); unscaled casts (int8:
    weights only, rounded per output channel) and per-tensor scaled casts. Bars from 0 % accuracy hid
    the point differences between formats that the figure is about. A measured change of exactly 0 is a
    dot on the zero line (its bar has no height), so it differs from a format not evaluated. Below, the
    runs' proven and observed max |activation| (:func:`activation_bounds`), in the bars' colours."""
    import numpy as np

    plt = pyplot()
    df = read_view(con, "precision")
    labels = sorted(df.label.unique())
    fp32 = df[df.format == "fp32"].set_index("label").accuracy
    fig = plt.figure(figsize=(12, 9), layout="constrained")
    grid = fig.add_gridspec(2, 2)
    axes = [fig.add_subplot(grid[0, 0])]
    axes.append(fig.add_subplot(grid[0, 1], sharey=axes[0]))
    axes[1].tick_params(labelleft=False)
    color_of = dict(zip(labels, category_colors(len(labels))))
    int8 = " (int8 per channel)" if (df.format == "int8").any() else ""  # evaluations.precision.int8 may be off
    for ax, scaling, title in zip(axes, ("none", "per_tensor"), (f"unscaled casts{int8}", "per-tensor scaled casts")):
        cells = df[(df.format != "fp32") & ((df.scaling == scaling) | ((df.format == "int8") & (scaling == "none")))]
        formats = [f for f in FORMAT_ORDER if f in set(cells.format)]
        width = 0.8 / max(len(labels), 1)
        for i, label in enumerate(labels):
            rows = cells[cells.label == label].set_index("format")
            values = [100 * rows.accuracy_delta.get(f, float("nan")) for f in formats]
            constraint = df[df.label == label].weight_constraint.iloc[0]
            accuracy = f"fp32 {100 * fp32[label]:.1f} %" if label in fp32 else "no fp32 row"
            positions = np.arange(len(formats)) + i * width
            ax.bar(positions, values, width, color=color_of[label], label=f"{label} ({constraint}; {accuracy})")
            unchanged = [x for x, value in zip(positions, values) if value == 0]  # a bar of height 0 is invisible
            ax.plot(unchanged, [0] * len(unchanged), linestyle="none", marker="o", markersize=4,
                    color=color_of[label], markeredgecolor="black", zorder=3)
        ax.axhline(0, color="black", linewidth=0.8)
        if not formats:  # evaluations.precision.scalings left this scaling out (and int8 off, for "none")
            note_on_axes(ax, f"no casts with scaling {scaling}\n(see evaluations.precision.scalings)")
        ax.set_xticks(np.arange(len(formats)) + width * (len(labels) - 1) / 2)
        ax.set_xticklabels(formats, rotation=20)
        ax.set_title(title)
        ax.set_xlabel("number format of weights and matmul activations")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("val accuracy − fp32 accuracy (points)")
    activation_bounds(fig.add_subplot(grid[1, :]), read_view(con, "precision_bounds"), color_of)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=min(len(labels), 3),
               fontsize=8, frameon=False)
    return fig


# the proven bound's ▲ by the run's unscaled e4m3 verdict: proven safe (filled), not proven (hollow), or
# none, fp8_e4m3 not among evaluations.precision.formats (half filled: hollow claimed "not proven")
VERDICT_MARKS = {True: {}, False: {"markerfacecolor": "none"}, "none evaluated": {"fillstyle": "bottom"}}
# the ▬ of the bound over every bounded tensor (the attention scores too), where it is above the ▲
ALL_TENSORS_MARK = {"marker": "_", "markersize": 14, "markeredgewidth": 2.5}


def activation_bounds(ax, bounds, color_of: dict) -> None:
    """View ``precision_bounds`` on ``ax``: per run (ordered by fp32 accuracy, so runs of like accuracy
    stand side by side) the observed max |activation| on the val windows (●) and the proven one, the
    analytic bound for any input over the observed tensors (▲, filled where unscaled e4m3 is proven safe,
    half filled where e4m3 was not evaluated), joined by a line labelled with their ratio (log y); the bound
    over every bounded tensor, the attention scores too (▬, where above ▲: ``analytic_activation_bound``);
    and e4m3's largest value. The e4m3 verdict bounds every tensor of the e4m3-cast model, each cast's
    rounding included, so a ▲ below the line may still be hollow (a ▬ above it, or the rounding)."""
    import numpy as np
    from matplotlib.lines import Line2D

    from lipflow.evaluation.number_formats import FORMATS

    e4m3 = FORMATS.get("fp8_e4m3").max
    runs = bounds[bounds.observed_max_activation.notna()].sort_values(["accuracy", "label"])
    verdicts, beyond_observed = set(), False
    for x, run in enumerate(runs.itertuples()):
        color = color_of.get(run.label, "0.4")
        ax.plot([x], [run.observed_max_activation], "o", color=color, markersize=8)
        if np.isnan(run.proven_max_activation):
            ax.annotate("no analytic bound", (x, run.observed_max_activation), xytext=(0, 10),
                        textcoords="offset points", ha="center", fontsize=8, color="0.4")
            continue
        ax.plot([x, x], [run.observed_max_activation, run.proven_max_activation], "-", color=color)
        verdict = "none evaluated" if np.isnan(run.e4m3_proven_safe) else run.e4m3_proven_safe == 1
        verdicts.add(verdict)
        ax.plot([x], [run.proven_max_activation], "^", color=color, markersize=9, **VERDICT_MARKS[verdict])
        if run.analytic_activation_bound > run.proven_max_activation:  # the scores' bound, unobserved
            ax.plot([x, x], [run.proven_max_activation, run.analytic_activation_bound], ":", color=color)
            ax.plot([x], [run.analytic_activation_bound], color=color, **ALL_TENSORS_MARK)
            beyond_observed = True
        if np.isfinite(run.proven_over_observed):  # an observed max of 0 has no ratio (and no place on log y)
            ax.annotate(f"×{run.proven_over_observed:.3g}", (x, run.proven_max_activation), xytext=(8, 0),
                        textcoords="offset points", va="center", fontsize=8)
    if runs.empty:
        note_on_axes(ax, "no observed max |activation| recorded")
        return
    ax.axhline(e4m3, color="0.5", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(runs)))
    accuracies = ["no accuracy" if np.isnan(accuracy) else f"{100 * accuracy:.1f} %" for accuracy in runs.accuracy]
    ax.set_xticklabels([f"{label}\nfp32 {accuracy}" for label, accuracy in zip(runs.label, accuracies)], fontsize=8)
    ax.set_xlim(-0.5, len(runs) - 0.5)
    ax.set_ylabel("max |activation entry| (log scale)")
    ax.set_title("max |activation|: proven for any input vs observed, runs by fp32 accuracy")
    ax.grid(alpha=0.3, axis="y")
    key = [Line2D([], [], color="0.3", marker="o", linestyle="none", label="observed on the val windows")]
    key += [Line2D([], [], color="0.3", marker="^", linestyle="none", label=label, **VERDICT_MARKS[verdict])
            for verdict, label in ((True, "proven for any input; e4m3 proven safe"),
                                   (False, "proven; e4m3 not proven (cast model's bound > max)"),
                                   ("none evaluated", "proven; e4m3 not evaluated (evaluations.precision.formats)"))
            if verdict in verdicts]
    if beyond_observed:
        key.append(Line2D([], [], color="0.3", linestyle="none", **ALL_TENSORS_MARK,
                          label="proven for every bounded tensor, attention scores too (not observed)"))
    key.append(Line2D([], [], color="0.5", linestyle="--", label=f"fp8 e4m3 max ({e4m3:g})"))
    ax.legend(handles=key, fontsize=8, loc="upper left")


FIGURES = {"precision": Figure(precision, caption="figure_precision.rst")}
