"""The ``runs`` block's training curves: one figure of every run of ``runs`` (``experiment`` null) in
the results database, read from its ``train_metrics`` table: the train loss at every step (with its
running mean over :func:`smoothing_window` steps), the gradient norm, and at the eval steps the val
loss and accuracy, the certified Lipschitz bound and the largest activation (the two quantities the
constrained models are about: Newhouse et al. 2025 keep both small); every panel but the accuracy
on a log axis when its values span more than a decade (a run whose loss grew to 10⁷ without
overflowing flattened every other run's curve at 0). Drawn by
``python -m lipflow.plots --training-curves`` as ``training_curves.png`` and ``.svg``."""

from __future__ import annotations

import math

from lipflow.results.plotting import category_colors, note_on_axes, pyplot, spans_a_decade, whole_number_x_axis

FIGURE = "training_curves"

# (train_metrics column, panel title, y label, log axis when the values span more than a decade,
# recorded at every step)
PANELS = (
    ("loss", "train loss", "nats/token", True, True),
    ("val_loss", "val loss", "nats/token", True, False),
    ("val_accuracy", "val accuracy", "next-token accuracy (%)", False, False),
    ("grad_norm", "gradient norm", "‖∇loss‖₂", True, True),
    ("lipschitz_bound", "certified Lipschitz bound", "∞RMS bound of the model", True, False),
    ("max_activation", "largest activation |x|", "max |x| in the blocks", True, False),
)
PERCENT = ("val_accuracy",)  # fractions drawn as %

CURVES_SQL = f"""
    SELECT r.run_id, r.name, r.model, r.optimizer, r.weight_constraint, r.status, r.diverged_step, m.step,
           {', '.join(f'm.{c}' for c, *_ in PANELS)}
    FROM train_metrics AS m JOIN runs AS r USING (run_id)
    WHERE r.experiment IS NULL
    ORDER BY r.name, r.run_id, m.step"""


# the columns CURVES_SQL reads, and their kind (text or number): a database edited by hand is named
# in one line instead of failing inside the query or the plot
COLUMNS = {"runs": {"run_id": "text", "name": "text", "model": "text", "optimizer": "text",
                    "weight_constraint": "text", "status": "text", "diverged_step": "number", "experiment": "text"},
           "train_metrics": {"run_id": "text", "step": "number", **{column: "number" for column, *_ in PANELS}}}


def curves(con):
    """The rows the figure draws, a pandas DataFrame: one per (run of ``runs``, step), by name, run id, step."""
    return con.execute(CURVES_SQL).df()


def smoothing_window(steps: int) -> int:
    """Steps in the train loss's running mean: a fiftieth of the run (at least 1), as a TensorBoard-
    like view of a noisy per-batch loss keeps its trend without hiding a spike's step."""
    return max(1, steps // 50)


def run_label(row, by_id: bool = False) -> str:
    """``<name> (<model>, <optimizer>[, <weight constraint>])[: diverged at step N]`` of a row of :func:`curves`;
    with ``by_id`` the run id in place of the name (another run of the database has that name)."""
    constraint = "" if row["weight_constraint"] == "none" else f", {row['weight_constraint']}"
    name = row["run_id"] if by_id else row["name"]
    label = f"{name} ({row['model']}, {row['optimizer']}{constraint})".replace("$", r"\$")  # no mathtext
    if row["status"] == "diverged":
        step = row["diverged_step"]
        label += f": diverged at step {int(step)}" if step is not None and step == step else ": diverged"
    return label


def draw(con):
    """The figure: a panel per :data:`PANELS` entry, a colour per run; non-finite values (a diverged
    run's last loss) and, on a log axis, values ≤ 0 are left out. A ValueError when the database has
    no run of ``runs`` with metrics."""
    from matplotlib.lines import Line2D

    rows = curves(con)
    if rows.empty:
        raise ValueError("the database has no training metrics of a run of `runs` (experiment runs have "
                         "their experiments' figures)")
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), sharex=True, constrained_layout=True)
    # one line per run: two runs of one name (a hand-built database holding an earlier config's run of
    # that name too) were drawn as one line with one label, their steps interleaved
    runs = list(rows.groupby("run_id", sort=False))  # in CURVES_SQL's order: by name, then run id
    ids_of_name = rows.drop_duplicates("run_id")["name"].value_counts()
    legend = []
    for (_, run), color in zip(runs, category_colors(len(runs))):
        label = run_label(run.iloc[0], by_id=ids_of_name[run.iloc[0]["name"]] > 1)
        legend.append(Line2D([], [], color=color, linewidth=1.6, label=label))
        for ax, (column, _, _, log, every_step) in zip(axes.flat, PANELS):
            points = run[["step", column]].dropna()
            # .loc: an empty list of flags (a run with no value here) selects no rows, where [] selected no columns
            points = points.loc[[math.isfinite(v) and (v > 0 or not log) for v in points[column]]]
            if column in PERCENT:
                points = points.assign(**{column: 100 * points[column]})
            if points.empty:
                continue
            alone = "o" if len(points) == 1 else None  # a line through one point (a run of 1 step) draws nothing
            if every_step and column == "loss":
                ax.plot(points.step, points[column], color=color, alpha=0.25, linewidth=0.8)
                mean = points[column].rolling(smoothing_window(len(points)), min_periods=1).mean()
                ax.plot(points.step, mean, color=color, linewidth=1.6, marker=alone, markersize=3)
            elif every_step:
                ax.plot(points.step, points[column], color=color, linewidth=1.0, marker=alone, markersize=3)
            else:
                ax.plot(points.step, points[column], color=color, marker="o", markersize=3, linewidth=1.4)
    for ax, (column, title, unit, log, _) in zip(axes.flat, PANELS):
        ax.set_title(title)
        ax.set_ylabel(unit)
        if log and spans_a_decade(y for line in ax.lines for y in line.get_ydata()):  # else linear reads better
            ax.set_yscale("log")
        if not ax.lines:
            note_on_axes(ax, "no run records it" if column != "lipschitz_bound" else "no run has a certificate")
        ax.grid(True, alpha=0.3)
        whole_number_x_axis(ax, rows.step)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.legend(handles=legend, loc="outside lower center", ncol=min(len(legend), 3), frameon=False)
    fig.suptitle("training curves of the runs of `runs` (train loss: per step, and its running mean)")
    return fig
