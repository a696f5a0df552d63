"""rank_vs_n: the measured generalization gap and the rank bound against the number of sequences.

Truong 2024 (arXiv 2410.11500). View ``rank_bound``; figure ``rank_vs_n``. Runs: rank_vs_n.yaml.

A run trains on the first ``train_tokens`` of the train split, all of it when that is null or larger
(``TokenShards.num_tokens``): the view's ``n_tokens`` is the smaller of the two (``least`` skips a null),
the split's size being the ``shards`` table's (the manifest the build is given: the token shards
the config's runs train on).
"""

from __future__ import annotations

from lipflow.results.plotting import Figure, colors, note_on_axes, pyplot, read_view, zeros_from_zero
from lipflow.results.views import RUNS_NEED, Part, View

RANK_BOUND = View(
    caption="table_rank_bound.rst",
    columns=("run_id", "name", "n_heads", "d_head", "n_tokens", "n_sequences", "measured_gap", "eval_gap",
             "qk_rank", "qk_stable_rank", "b3_bound", "edelman_norm_proxy", "spectrum_adaptive_proxy", "gap_slope",
             "bound_slope"),
    types={"BIGINT": ("n_heads", "d_head", "n_tokens", "n_sequences"),
           "DOUBLE": ("measured_gap", "eval_gap", "qk_rank", "qk_stable_rank", "b3_bound",
                      "edelman_norm_proxy", "spectrum_adaptive_proxy", "gap_slope", "bound_slope")},
    parts=(Part(requires={"runs": RUNS_NEED + ("n_heads", "d_model", "context", "steps", "train_tokens",
                                               "val_loss", "final_val_loss"),
                          "train_metrics": ("run_id", "step", "loss"),
                          "shards": ("split", "tokens"),
                          "evals": ("run_id", "eval", "metric", "value", "matrix", "rtol", "n")},
                absent_reason="no rank_vs_n runs with the rank evaluation in the database",
                sql="""
        WITH r AS (
            SELECT run_id, name, n_heads, d_model // n_heads AS d_head, steps,
                   coalesce(val_loss, final_val_loss) AS val_loss,
                   least(CAST(train_tokens AS BIGINT),
                         (SELECT CAST(sum(tokens) AS BIGINT) FROM shards WHERE split = 'train')) AS n_tokens,
                   context
            FROM runs WHERE experiment = 'rank_vs_n' AND status = 'completed'),
        train_end AS (
            SELECT m.run_id, avg(m.loss) AS train_loss
            FROM train_metrics AS m JOIN r USING (run_id)
            WHERE m.step > 0.9 * r.steps GROUP BY m.run_id),
        e AS (
            SELECT run_id,
                   max(value) FILTER (WHERE metric = 'generalization_gap') AS eval_gap,
                   max(value) FILTER (WHERE metric = 'b3_rademacher_sum') AS b3_eval,
                   max(n) FILTER (WHERE metric = 'b3_rademacher_sum') AS n_eval,
                   max(value) FILTER (WHERE metric = 'edelman_norm_proxy') AS edelman_norm_proxy,
                   max(value) FILTER (WHERE metric = 'spectrum_adaptive_proxy') AS spectrum_adaptive_proxy,
                   avg(value) FILTER (WHERE metric = 'numerical_rank' AND matrix = 'qk'
                                      AND abs(rtol - 0.01) < 1e-12) AS qk_rank,
                   avg(value) FILTER (WHERE metric = 'stable_rank' AND matrix = 'qk') AS qk_stable_rank
            FROM evals WHERE eval = 'rank' GROUP BY run_id),
        j AS (
            SELECT r.run_id, r.name, r.n_heads, r.d_head, r.n_tokens, r.n_tokens // r.context AS n_sequences,
                   r.val_loss - t.train_loss AS measured_gap, e.eval_gap, e.qk_rank, e.qk_stable_rank,
                   e.b3_eval * sqrt(e.n_eval / (r.n_tokens // r.context)) AS b3_bound,
                   e.edelman_norm_proxy, e.spectrum_adaptive_proxy
            FROM r JOIN train_end AS t USING (run_id) JOIN e USING (run_id)),
        slopes AS (
            SELECT n_heads,
                   regr_slope(ln(measured_gap), ln(n_sequences)) FILTER (WHERE measured_gap > 0) AS gap_slope,
                   regr_slope(ln(b3_bound), ln(n_sequences)) FILTER (WHERE b3_bound > 0) AS bound_slope
            FROM j GROUP BY n_heads)
        SELECT j.*, slopes.gap_slope, slopes.bound_slope FROM j JOIN slopes USING (n_heads)"""),),
)

# headline view first; each view is also written as results/tables/<view>.csv
VIEWS = {"rank_bound": RANK_BOUND}


HEAD_MARKERS = ("o", "s", "^", "D", "v", "P")


def slope_text(slope) -> str:
    """A fitted log–log slope for a legend; none when fewer than two positive points were there to fit."""
    return f"slope {slope:.2f}" if slope == slope and slope is not None else "no slope (under 2 points)"


def log_axis_or_note(ax, values) -> bool:
    """A log y axis when ``values``, the heights of the panel's points, hold a positive finite one (the
    gap panel passes whether each gap is drawn: a gap ≤ 0 sits on the positive floor); else a note on a
    linear axis. A log axis without positive data raised matplotlib's "Data cannot be log-scaled" when
    the figure was saved (a model without attention layers has no B3 bound)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    if (np.isfinite(values) & (values > 0)).any():
        ax.set_yscale("log")
        return True
    note_on_axes(ax, "no positive value to draw")
    return False


def seed_means(runs, column: str):
    """One row per ``n_sequences``: the mean of ``column`` over its runs (the seeds of a seed axis)."""
    return runs.groupby("n_sequences", as_index=False, sort=True)[column].mean()


def draw_seeds(ax, runs, column: str, marker: str, color) -> None:
    """Each run of an n that has several (a seed axis) as a hollow marker at that n, on the line's x."""
    several = runs[runs.groupby("n_sequences").n_sequences.transform("size") > 1]
    if len(several):
        ax.plot(several.n_sequences, several[column], marker, ls="", color=color, mfc="none", ms=5, alpha=0.7)


def rank_vs_n(con):
    """Measured gap and B3 bound against n (log–log, fitted slopes in the legend) and against rank; a
    marker shape per head count (equal curves hid each other). A gap ≤ 0 (val below train loss), which
    a log axis cannot show and the slope leaves out, is a ▽ on the panel's bottom edge, and the legend
    says over how many points the slope was fitted. The n axes are labelled at the trained n's (matplotlib's
    minor labels of a 1.5-decade span, 3×10¹ 4×10¹ 6×10¹ …, ran into each other). With several seeds at an n,
    the gap and bound lines run through their mean (the gap's over the seeds whose gap is > 0, the points its
    slope is fitted to) and each seed is a hollow marker."""
    import pandas as pd
    from matplotlib.ticker import NullFormatter

    plt = pyplot()
    df = read_view(con, "rank_bound", "ORDER BY n_heads, n_sequences")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    heads = sorted(df.n_heads.unique())
    positive_gaps = df.measured_gap[df.measured_gap > 0]
    floor = positive_gaps.min() / 2 if len(positive_gaps) else 1e-3
    for i, (color, h) in enumerate(zip(colors(len(heads)), heads)):
        sub, marker = df[df.n_heads == h], HEAD_MARKERS[i % len(HEAD_MARKERS)]
        positive, rest = sub[sub.measured_gap > 0], sub[~(sub.measured_gap > 0) & sub.measured_gap.notna()]
        fitted = "" if rest.empty else f" ({len(positive)} of {len(positive) + len(rest)} points)"
        # the line runs through each n's mean over its seeds (the slope pools them); each seed's run is a hollow
        # marker beside it: a line through the seeds one by one zig-zagged up and down at every n
        gap = seed_means(positive, "measured_gap")
        axes[0].plot(gap.n_sequences, gap.measured_gap, f"{marker}-", color=color,
                     label=f"{h} head(s): {slope_text(sub.gap_slope.iloc[0])}{fitted}")
        draw_seeds(axes[0], positive, "measured_gap", marker, color)
        if len(rest):
            axes[0].plot(rest.n_sequences, [floor] * len(rest), "v", color=color, mfc="none", ms=8, clip_on=False,
                         label=f"{h} head(s): gap ≤ 0")
        bound = seed_means(sub, "b3_bound")
        axes[1].plot(bound.n_sequences, bound.b3_bound, f"{marker}--", color=color,
                     label=f"{h} head(s): {slope_text(sub.bound_slope.iloc[0])}")
        draw_seeds(axes[1], sub, "b3_bound", marker, color)
        axes[2].scatter(sub.qk_rank, sub.measured_gap, color=color, label=f"gap, {h} head(s)")
        axes[2].scatter(sub.qk_rank, sub.b3_bound, color=color, marker="s", facecolors="none",
                        label=f"B3 bound, {h} head(s)")
    shown = (df.measured_gap.notna(), df.b3_bound, pd.concat([df.measured_gap, df.b3_bound]))
    trained_n = sorted(int(n) for n in df.n_sequences.dropna().unique())
    for ax, title, values in zip(axes[:2], ("measured gap vs n", "B3 rank bound vs n"), shown):
        ax.set_xscale("log")
        ax.set_xticks(trained_n, [str(n) for n in trained_n])
        ax.xaxis.set_minor_formatter(NullFormatter())
        log_axis_or_note(ax, values)
        ax.set_xlabel("n = training tokens / context (sequences, log scale)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("val loss − train loss (nats/token)")
    if (df.measured_gap <= 0).any():
        axes[0].set_ylim(bottom=floor)
    axes[1].set_ylabel("B3 Rademacher term at n (nats/token)")
    zeros_from_zero(axes[1], "y", df.b3_bound)
    ranked = df.qk_rank.notna()  # the view's rank is the one at rtol 0.01, absent where rtols lack it
    if ranked.any():
        heights = pd.concat([df.measured_gap[ranked], df.b3_bound[ranked]])
        log_y = log_axis_or_note(axes[2], heights)
        zeros_from_zero(axes[2], "x", df.qk_rank[ranked])
        zeros_from_zero(axes[2], "y", heights)
    else:  # nothing to place: a log axis without data raised "Data cannot be log-scaled" when saved
        log_y = False
        note_on_axes(axes[2], "no numerical rank at rtol 1e-2\n(evaluations.rank.rtols lacks 0.01)")
    axes[2].set_xlabel("mean numerical rank of W_Q W_Kᵀ per head (rtol 1e-2)")
    axes[2].set_ylabel("nats/token" + (" (log scale)" if log_y else ""))  # the note's linear axis is no log one
    axes[2].set_title("gap and bound vs rank")
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


FIGURES = {"rank_vs_n": Figure(rank_vs_n, caption="figure_rank_vs_n.rst")}
