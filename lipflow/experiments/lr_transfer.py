"""lr_transfer: the optimal learning rate per width and its drift across widths, per method.

Pethick et al. 2025 (Scion, arXiv 2502.07529) and µP (Yang et al. 2022). Views ``lr_transfer``
(headline) and ``lr_transfer_runs``; figure ``lr_transfer``. Runs: lr_transfer.yaml. A method is the
run's label on the grid's first axis, ``method``; the seeds of one method, width and lr are averaged.
"""

from __future__ import annotations

from lipflow.results.plotting import Figure, colors, pyplot, read_view
from lipflow.results.views import RUNS_NEED, Part, View

LR_TRANSFER_RUNS = View(
    caption="table_lr_transfer_runs.rst",
    columns=("run_id", "name", "method", "width", "lr", "seed", "status", "final_loss"),
    types={"VARCHAR": ("status",),
           "DOUBLE": ("final_loss",)},
    # the method is the run's label on the grid's first axis (`method`: lrt.<method>.<width>.lr<lr>…), not its
    # parametrization + optimizer, which two methods differing in another key (beta2, momentum, the LMO) share
    parts=(Part(requires={"runs": RUNS_NEED + ("d_model", "lr", "seed", "val_loss", "final_val_loss")},
                absent_reason="no lr_transfer runs in the database",
                sql="""
        SELECT run_id, name, split_part(name, '.', 2) AS method, d_model AS width, lr, seed, status,
               CASE WHEN status = 'completed' AND isfinite(coalesce(val_loss, final_val_loss))
                    THEN coalesce(val_loss, final_val_loss) END AS final_loss
        FROM runs WHERE experiment = 'lr_transfer'"""),),
)

LR_TRANSFER = View(
    caption="table_lr_transfer.rst",
    columns=("method", "width", "optimal_lr", "best_loss", "n_seeds", "n_lrs", "at_grid_edge", "n_widths", "drift"),
    types={"DOUBLE": ("optimal_lr", "best_loss", "drift"),
           "BIGINT": ("n_seeds", "n_lrs", "n_widths"),
           "BOOLEAN": ("at_grid_edge",)},
    depends_on=("lr_transfer_runs",),
    parts=(Part(requires={"lr_transfer_runs": ("method", "width", "lr", "seed", "final_loss")},
                absent_reason="no lr_transfer run in the database ended with a finite val loss",
                sql="""
        -- one point per method, width and lr: its seeds' mean loss, none when a seed has no final loss
        -- (an lr that diverges for one seed is no optimum; the min over seeds would pick the luckiest)
        WITH points AS (
            SELECT method, width, lr, count(DISTINCT seed) AS n_seeds,
                   CASE WHEN count(final_loss) = count(*) THEN avg(final_loss) END AS mean_loss
            FROM lr_transfer_runs GROUP BY method, width, lr),
        -- the grid is every lr tried at the width, diverged ones too: an optimum below a diverged lr is inside it
        grid AS (
            SELECT method, width, min(lr) AS min_lr, max(lr) AS max_lr, count(*) AS grid_lrs
            FROM points GROUP BY method, width),
        ranked AS (
            SELECT method, width, lr, mean_loss, n_seeds,
                   row_number() OVER (PARTITION BY method, width ORDER BY mean_loss, lr) AS rank_in_width,
                   count(*) OVER (PARTITION BY method, width) AS n_lrs
            FROM points WHERE mean_loss IS NOT NULL),
        best AS (
            SELECT method, width, lr AS optimal_lr, mean_loss AS best_loss, n_seeds, n_lrs,
                   grid_lrs > 1 AND (lr = min_lr OR lr = max_lr) AS at_grid_edge
            FROM ranked JOIN grid USING (method, width) WHERE rank_in_width = 1)
        SELECT *, count(*) OVER (PARTITION BY method) AS n_widths,
               max(optimal_lr) OVER (PARTITION BY method) / min(optimal_lr) OVER (PARTITION BY method) AS drift
        FROM best"""),),
)

# headline view first; each view is also written as results/tables/<view>.csv
VIEWS = {"lr_transfer": LR_TRANSFER, "lr_transfer_runs": LR_TRANSFER_RUNS}


def lr_transfer(con):
    """Final val loss against lr (the mean over seeds, as the view ranks it), one line per width, one panel
    per method; ★ marks each optimum. The loss axis ends at the 90 % quantile, or at three median−min
    spreads above the median where that is lower (when a tenth of the runs or more blew up, their losses
    set the quantile), plus 30 % of the range (a blown-up run would flatten the rest): a point above it is
    drawn at the top edge as ▲, a point without a final loss (a seed diverged or failed) as × there; the
    title's drift names how many of the method's widths have an optimum, and how many optima lie at the edge
    of the lrs tried (the view's ``at_grid_edge``: the true optimum may lie beyond, so the drift is not measured)."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    points = seed_means(read_view(con, "lr_transfer_runs", "ORDER BY method, width, lr"))
    best = read_view(con, "lr_transfer")
    methods = sorted(points.method.unique())
    widths = sorted(points.width.unique())
    color_of = dict(zip(widths, colors(len(widths))))
    finite = points.final_loss.dropna()
    low, high = (finite.min(), finite.quantile(0.9)) if len(finite) else (0.0, 1.0)
    if len(finite) and finite.median() > low:
        high = min(high, finite.median() + 3 * (finite.median() - low))
    span = (high - low) or 0.1 * max(abs(high), 1.0)  # one loss (or all equal): not a 1e-9 range (ticks "1e−10+2")
    bottom, top = low - 0.05 * span, high + 0.3 * span
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 4), sharey=True, squeeze=False,
                             constrained_layout=True)
    marks = set()
    for ax, method in zip(axes[0], methods):
        points_of = points[points.method == method]
        for width, group in points_of.groupby("width"):
            ok, lost = group[group.final_loss.notna()], group[group.final_loss.isna()]
            ax.plot(ok.lr, ok.final_loss.clip(upper=top), "o-", color=color_of[width], ms=3, label=f"width {width}")
            above = ok[ok.final_loss > top]
            for name, marked, style in (("above", above, {"marker": "^"}), ("lost", lost, {"marker": "x", "mew": 2})):
                if len(marked):  # an empty unclipped line would stretch the layout to the figure's corner
                    ax.plot(marked.lr, [top] * len(marked), ls="", color=color_of[width], ms=7, clip_on=False,
                            zorder=4, **style)
                    marks.add(name)
        opt = best[best.method == method]
        ax.scatter(opt.optimal_lr, opt.best_loss, marker="*", s=120, c=[color_of[w] for w in opt.width],
                   edgecolors="black", zorder=3)
        widths_of = points_of.width.nunique()
        if len(opt):
            within = "" if len(opt) == widths_of else f" ({len(opt)} of {widths_of} widths)"
            edge = int(opt.at_grid_edge.sum())  # the optimum may lie beyond the grid: the drift is not measured
            at_edge = f"\n{edge} of {len(opt)} optima at the lr grid's edge: widen the grid" if edge else ""
            ax.set_title(f"{method}: optimal-lr drift ×{opt.drift.iloc[0]:.3g}{within}{at_edge}", fontsize=10)
        else:
            ax.set_title(f"{method}: no run ended with a finite loss", fontsize=10)
        ax.set_xscale("log", base=2)
        pad = 1.3 if points_of.lr.nunique() > 1 else 2.0  # one lr: an octave each side, so two ticks are in view
        ax.set_xlim(points_of.lr.min() / pad, points_of.lr.max() * pad)  # set, so a panel of diverged runs has one
        ax.set_xlabel("peak learning rate (log₂ scale)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final val loss (nats/token)")
    axes[0][0].set_ylim(bottom, top)
    handles = [Line2D([], [], color=color_of[w], marker="o", ms=3, label=f"width {w}") for w in widths]
    if "above" in marks:
        handles.append(Line2D([], [], ls="", marker="^", color="0.3", label="loss above the axis"))
    if "lost" in marks:
        handles.append(Line2D([], [], ls="", marker="x", mew=2, color="0.3", label="diverged / no final loss"))
    axes[0][0].legend(handles=handles, fontsize=8)
    return fig


def seed_means(runs):
    """One row per method, width and lr: the seeds' mean final loss, NaN when a seed has none (as the view
    ``lr_transfer`` ranks them); one line through every seed's run zig-zagged at each lr."""
    return (runs.groupby(["method", "width", "lr"], as_index=False, sort=True)
            .final_loss.agg(lambda losses: losses.mean(skipna=False)))


FIGURES = {"lr_transfer": Figure(lr_transfer, caption="figure_lr_transfer.rst")}
