"""lipschitz_tradeoff: val accuracy and max activation against the certified Lipschitz bound.

Newhouse et al. 2025 (arXiv 2507.13338) §4.3. View ``pareto`` (on_front: the Pareto front per
optimizer); figures ``tradeoff_accuracy`` and ``tradeoff_activation``. Runs: lipschitz_tradeoff.yaml.
"""

from __future__ import annotations

from lipflow.config import SIGMA_MAX_CONSTRAINTS
from lipflow.results.plotting import Figure, colors, note_on_axes, pyplot, read_view, spans_a_decade, zeros_from_zero
from lipflow.results.views import RUNS_NEED, Part, View

READS_SIGMA_MAX = ", ".join(f"'{name}'" for name in SIGMA_MAX_CONSTRAINTS)  # SQL's list of those constraints

PARETO = View(
    caption="table_pareto.rst",
    columns=("run_id", "name", "optimizer", "weight_constraint", "sigma_max", "lr", "lipschitz_bound",
             "val_accuracy", "val_loss", "max_activation", "local_radius", "local_windows", "on_front"),
    types={"DOUBLE": ("sigma_max", "lipschitz_bound", "val_accuracy", "local_radius"),
           "BIGINT": ("local_windows",),
           "BOOLEAN": ("on_front",)},
    parts=(Part(requires={"runs": RUNS_NEED + ("optimizer", "weight_constraint", "sigma_max", "lr",
                                               "lipschitz_bound", "max_activation", "val_accuracy",
                                               "final_val_accuracy", "val_loss", "final_val_loss"),
                          "evals": ("run_id", "eval", "metric", "value")},
                absent_reason="no lipschitz_tradeoff runs in the database",
                sql=f"""
        WITH r AS (
            SELECT run_id, name, optimizer, weight_constraint,
                   CASE WHEN weight_constraint IN ({READS_SIGMA_MAX}) THEN sigma_max END AS sigma_max,
                   lr, lipschitz_bound,
                   coalesce(val_accuracy, final_val_accuracy) AS val_accuracy,
                   coalesce(val_loss, final_val_loss) AS val_loss, max_activation,
                   (SELECT max(e.value) FROM evals AS e WHERE e.run_id = runs.run_id AND e.eval = 'robustness'
                      AND e.metric = 'half_certified_epsilon') AS local_radius,
                   (SELECT max(e.value) FROM evals AS e WHERE e.run_id = runs.run_id AND e.eval = 'robustness'
                      AND e.metric = 'sequences') AS local_windows
            FROM runs
            WHERE experiment = 'lipschitz_tradeoff' AND status = 'completed'
              AND lipschitz_bound IS NOT NULL AND isfinite(lipschitz_bound))
        SELECT r.*, r.val_accuracy IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM r AS o
            WHERE o.optimizer = r.optimizer AND o.lipschitz_bound <= r.lipschitz_bound
              AND o.val_accuracy >= r.val_accuracy
              AND (o.lipschitz_bound < r.lipschitz_bound OR o.val_accuracy > r.val_accuracy)) AS on_front
        FROM r"""),),
)

# headline view first; each view is also written as results/tables/<view>.csv
VIEWS = {"pareto": PARETO}


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


VAL_ACCURACY = "val next-token accuracy (%):\nevery position of the whole val split"  # pareto's: the val evaluation's


def windows_of(counts) -> str:
    """The robustness evaluation's val windows of the runs drawn ("64 val windows", "32–64 …" when
    runs differ; "val windows" when none recorded its count)."""
    counts = sorted({int(n) for n in counts.dropna()})
    return "val windows" if not counts else f"{counts[0]}{f'–{counts[-1]}' if len(counts) > 1 else ''} val windows"


def tradeoff_accuracy(con):
    """Val accuracy (every position of the whole val split) against the certified bound (log x; the
    Pareto front of each optimizer as a line) and against the local certificate's radius: the ℓ2 ε on
    the token embeddings where the local certificate certifies half the clean accuracy of the
    last-position predictions of the robustness evaluation's first n_sequences val windows (counted on
    the axis): certified around each of those windows, not for every input as L is."""
    from matplotlib.ticker import NullFormatter

    plt = pyplot()
    df = read_view(con, "pareto")
    fig, (ax, ax_local) = plt.subplots(1, 2, figsize=(12, 4.5))
    constraints = sorted(df.weight_constraint.unique())
    for color, (optimizer, group) in zip(colors(df.optimizer.nunique()), df.groupby("optimizer")):
        for marker, constraint in zip(MARKERS, constraints):
            sub = group[group.weight_constraint == constraint]
            if len(sub):
                ax.scatter(sub.lipschitz_bound, 100 * sub.val_accuracy, color=color, marker=marker, alpha=0.7,
                           label=f"{optimizer} · {constraint}")
                local = sub[sub.local_radius.notna() & (sub.local_radius > 0)]
                ax_local.scatter(local.local_radius, 100 * local.val_accuracy, color=color, marker=marker,
                                 alpha=0.7, label=f"{optimizer} · {constraint}")
        front = group[group.on_front].sort_values("lipschitz_bound")
        alone = "o" if len(front) == 1 else None  # a step through one point draws nothing: ring the point
        ax.step(front.lipschitz_bound, 100 * front.val_accuracy, where="post", color=color, lw=1.5,
                marker=alone, markersize=11, markerfacecolor="none", label=f"{optimizer} Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("certified Lipschitz bound L of the trained model (log scale)")
    ax.set_ylabel(VAL_ACCURACY)
    ax.set_title("Accuracy vs certified Lipschitz bound (global: any input)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    windows = windows_of(df.local_windows[df.local_radius.notna()])
    radius = (f"local certified radius: ℓ2 ε on the token embeddings where the local certificate\n"
              f"certifies half the clean accuracy, last-position predictions of {windows}")
    if (df.local_radius.fillna(0) > 0).any():
        ax_local.set_xscale("log")
        ax_local.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a 1.5-decade span collided
        ax_local.legend(fontsize=7, ncol=2)
        ax_local.set_xlabel(f"{radius} (log scale)")
    else:
        why = ("every run's local certified radius is 0: fewer than half\nof its robustness windows' correct "
               "predictions have a\npositive radius (untrained? raise n_sequences)" if df.local_radius.notna().any()
               else "no local certificate: add the robustness\nevaluation to this experiment's runs")
        note_on_axes(ax_local, why, color=None)
        ax_local.set_xticks([])
        ax_local.set_yticks([])
        ax_local.set_xlabel(radius)
    ax_local.set_ylabel(VAL_ACCURACY)
    ax_local.set_title(f"Accuracy (whole val split) vs local radius ({windows})")
    ax_local.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def tradeoff_activation(con):
    """Largest |activation| in the residual stream against the certified bound (log x; log y when the
    activations span more than a decade), colour by optimizer and marker by weight constraint as in
    tradeoff_accuracy; runs without a finite max activation (null, or an overflow to inf), which no axis
    can place, and on a log axis those at 0, are counted in a note (they vanished without one)."""
    plt = pyplot()
    df = read_view(con, "pareto")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    constraints = sorted(df.weight_constraint.unique())
    for color, (optimizer, group) in zip(colors(df.optimizer.nunique()), df.groupby("optimizer")):
        for marker, constraint in zip(MARKERS, constraints):
            sub = group[group.weight_constraint == constraint]
            if len(sub):
                ax.scatter(sub.lipschitz_bound, sub.max_activation, color=color, marker=marker, alpha=0.7,
                           label=f"{optimizer} · {constraint}")
    ax.set_xscale("log")
    shown = df.max_activation[(df.max_activation > 0) & (df.max_activation < float("inf"))]
    log_y = spans_a_decade(shown)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("certified Lipschitz bound L (log scale)")
    ax.set_ylabel("max |activation entry| over blocks on val batches" + (" (log scale)" if log_y else ""))
    import numpy as np

    values = df.max_activation.to_numpy(dtype=float)
    unknown = int((~np.isfinite(values)).sum())  # null, NaN or ±inf
    at_zero = int((values <= 0).sum()) if log_y else 0  # a log axis cannot place 0 either
    zeros_from_zero(ax, "y", values)
    if unknown == len(df):
        note_on_axes(ax, "no run has a finite max activation")
    elif unknown or at_zero:
        reasons = [f"{unknown} without a finite max activation"] * bool(unknown) + [f"{at_zero} at 0"] * bool(at_zero)
        ax.text(0.01, 0.01, f"{' and '.join(reasons)} of {len(df)} runs: not drawn on this axis",
                ha="left", va="bottom", transform=ax.transAxes, fontsize=8, color="0.4")
    ax.set_title("Activation size vs certified Lipschitz bound")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: it covered points
    ax.grid(alpha=0.3, which="both")
    return fig


FIGURES = {"tradeoff_accuracy": Figure(tradeoff_accuracy, caption="figure_tradeoff_accuracy.rst"),
           "tradeoff_activation": Figure(tradeoff_activation, caption="figure_tradeoff_activation.rst")}
