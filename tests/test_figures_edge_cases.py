"""Figures and tables of lipflow.plots: row order of the CSV tables, figure errors, degenerate data."""

from __future__ import annotations

import io

import duckdb
import pytest

from lipflow.results.figures import write_table


def test_a_tables_rows_are_sorted_by_every_column_whatever_order_the_view_yields(tmp_path):
    """A view without ORDER BY gave its CSV rows in the order DuckDB produced them (on a database of the
    experiments' views, differently ordered files from one run to the next)."""
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT * FROM (VALUES ('b', 2, 0.5), ('a', 9, NULL), ('b', 1, 0.25), "
                "('a', 3, 1.0)) AS v(method, width, loss)")
    con.execute("CREATE VIEW v AS SELECT * FROM t")
    path = write_table(con, "v", tmp_path)
    assert path.read_text().splitlines() == ["method,width,loss", "a,3,1.0", "a,9,", "b,1,0.25", "b,2,0.5"]


def rank_database_without_b3(tmp_path):
    """One rank_vs_n run whose rank evaluation has no B3 term (a model without attention layers)."""
    from test_experiments import database, run

    from lipflow.experiments import create_views

    runs = [run("rank.a-00000001", experiment="rank_vs_n", train_tokens=640, val_loss=2.5)]
    metrics = [{"run_id": "rank.a-00000001", "step": s, "loss": 2.0, "sharpness": None,
                "preconditioned_sharpness": None} for s in (95, 100)]
    evals = [{"run_id": "rank.a-00000001", "eval": "rank", "metric": "numerical_rank", "value": 8.0, "n": None,
              "matrix": "qk", "rtol": 0.01, "epsilon": None, "attack": None, "k": None, "format": None,
              "scaling": None}]
    con = database(tmp_path, runs, metrics, evals)
    assert create_views(con, log=io.StringIO())["rank_bound"] == ""
    return con


def test_the_rank_figure_without_a_positive_b3_bound_notes_it_instead_of_failing(tmp_path):
    """The B3 panel's log axis had no positive value: saving raised 'Data cannot be log-scaled'."""
    from lipflow.experiments.rank_vs_n import rank_vs_n
    from lipflow.results.plotting import pyplot

    fig = rank_vs_n(rank_database_without_b3(tmp_path))
    fig.savefig(io.BytesIO(), format="png")
    bound = fig.axes[1]
    assert bound.get_yscale() == "linear" and [t.get_text() for t in bound.texts] == ["no positive value to draw"]
    assert fig.axes[0].get_yscale() == "log" and fig.axes[2].get_yscale() == "log"  # the gap is there
    pyplot().close(fig)


def test_a_figure_that_cannot_be_drawn_is_named_in_the_one_line_error(tmp_path, capsys, monkeypatch):
    """matplotlib's message alone ('Data cannot be log-scaled …') did not say which figure failed."""
    from lipflow.experiments import CATALOG
    from lipflow.results.figures import main
    from lipflow.results.plotting import Figure

    def broken(con):
        raise ValueError("Data cannot be log-scaled because all values are <= 0.")

    rank_database_without_b3(tmp_path).close()
    monkeypatch.setitem(CATALOG["rank_vs_n"].figures, "rank_vs_n", Figure(broken, caption="figure_rank_vs_n.rst"))
    out = tmp_path / "figures"
    assert main(["--db", str(tmp_path / "test.duckdb"), "--out-dir", str(out), "--experiment", "rank_vs_n"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "lipflow: error: figure rank_vs_n of experiment rank_vs_n: Data cannot be log-scaled because all values "
        "are <= 0.")
    assert not out.exists()


def test_a_run_without_a_val_accuracy_is_not_on_the_pareto_front(tmp_path):
    """No comparison with a null accuracy holds, so nothing dominated such a run and the view put it on
    its optimizer's front (and the figure's front line began at a point it could not draw)."""
    from test_experiments import database, run

    from lipflow.experiments import create_views

    runs = [run("tradeoff.a-00000001", experiment="lipschitz_tradeoff", lipschitz_bound=3.0, val_accuracy=None),
            run("tradeoff.b-00000002", experiment="lipschitz_tradeoff", lipschitz_bound=30.0, val_accuracy=0.4)]
    con = database(tmp_path, runs)
    create_views(con, log=io.StringIO())
    assert con.sql("select name, on_front from pareto order by name").fetchall() == [
        ("tradeoff.a", False), ("tradeoff.b", True)]


def test_the_activation_figure_counts_runs_it_cannot_place(tmp_path):
    """A run with a null or infinite max activation vanished from the figure without a word, and with
    none finite the axes were empty."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.lipschitz_tradeoff import tradeoff_activation
    from lipflow.results.plotting import pyplot

    runs = [run(f"tradeoff.{c}-0000000{i}", experiment="lipschitz_tradeoff", lipschitz_bound=3.0 * 10 ** i,
                val_accuracy=0.3, max_activation=a) for i, (c, a) in enumerate(zip("abc", (float("inf"), None, 5.0)))]
    con = database(tmp_path, runs)
    create_views(con, log=io.StringIO())
    fig = tradeoff_activation(con)
    assert [t.get_text() for t in fig.axes[0].texts] == ["2 without a finite max activation of 3 runs: not drawn on "
                                                         "this axis"]
    pyplot().close(fig)
    con.execute("UPDATE runs SET max_activation = CASE WHEN run_id LIKE 'tradeoff.a-%' THEN 0.0 "
                "WHEN run_id LIKE 'tradeoff.b-%' THEN 1.0 ELSE 100.0 END")
    fig = tradeoff_activation(con)  # 1 and 100 span a decade: a log axis, where 0 has no place
    assert fig.axes[0].get_yscale() == "log"
    assert [t.get_text() for t in fig.axes[0].texts] == ["1 at 0 of 3 runs: not drawn on this axis"]
    pyplot().close(fig)
    con.execute("UPDATE runs SET max_activation = NULL")
    fig = tradeoff_activation(con)
    assert [t.get_text() for t in fig.axes[0].texts] == ["no run has a finite max activation"]
    pyplot().close(fig)


def test_the_rank_figure_labels_a_linear_rank_panel_as_linear(tmp_path):
    """With neither a gap nor a B3 bound the rank panel is a linear axis with a note; its label said
    'nats/token (log scale)'."""
    from lipflow.experiments.rank_vs_n import rank_vs_n
    from lipflow.results.plotting import pyplot

    con = rank_database_without_b3(tmp_path)
    con.execute("UPDATE runs SET val_loss = NULL")
    fig = rank_vs_n(con)
    assert fig.axes[2].get_yscale() == "linear" and fig.axes[2].get_ylabel() == "nats/token"
    pyplot().close(fig)
    (tmp_path / "b").mkdir()
    fig = rank_vs_n(rank_database_without_b3(tmp_path / "b"))
    assert fig.axes[2].get_yscale() == "log" and fig.axes[2].get_ylabel() == "nats/token (log scale)"
    pyplot().close(fig)


def precision_figure(tmp_path, cells):
    """The precision figure of one run whose precision evaluation holds ``cells`` (metric, value, format,
    scaling)."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.precision import precision

    runs = [run("prec.a-00000001", experiment="precision", max_activation=3.0)]
    row = {"run_id": "prec.a-00000001", "eval": "precision", "n": None, "matrix": None, "rtol": None,
           "epsilon": None, "attack": None, "k": None}
    evals = [{**row, "metric": metric, "value": value, "format": fmt, "scaling": scaling}
             for metric, value, fmt, scaling in cells]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con, log=io.StringIO())["precision"] == ""
    return precision(con)


def test_a_precision_panel_of_a_scaling_not_evaluated_says_so(tmp_path):
    """With evaluations.precision.scalings: [none] the per-tensor panel was drawn empty, without a word."""
    from lipflow.results.plotting import pyplot

    fig = precision_figure(tmp_path, (("accuracy", 0.3, "fp32", None), ("accuracy", 0.29, "fp8_e4m3", "none"),
                                      ("accuracy_delta", -0.01, "fp8_e4m3", "none")))
    unscaled, scaled = fig.axes[:2]
    assert unscaled.get_title() == "unscaled casts"  # no int8 row: the title claimed int8 bars it did not draw
    assert [t.get_text() for t in unscaled.texts] == [] and len(unscaled.patches) == 1
    assert [t.get_text() for t in scaled.texts] == ["no casts with scaling per_tensor\n"
                                                    "(see evaluations.precision.scalings)"]
    pyplot().close(fig)


def test_a_precision_bar_of_no_change_is_a_dot_on_the_zero_line(tmp_path):
    """A format that changed no prediction (fp16, often) drew a bar of height 0: nothing, as if it had not
    been evaluated. Its change of 0 is now a dot; a format not evaluated still draws nothing."""
    from lipflow.results.plotting import pyplot

    fig = precision_figure(tmp_path, (("accuracy", 0.3, "fp32", None), ("accuracy", 0.3, "fp16", "none"),
                                      ("accuracy_delta", 0.0, "fp16", "none"), ("accuracy", 0.29, "fp8_e4m3", "none"),
                                      ("accuracy_delta", -0.01, "fp8_e4m3", "none")))
    dots = [(x, y) for line in fig.axes[0].lines if line.get_marker() == "o" for x, y in line.get_xydata()]
    assert dots == [(0.0, 0.0)]  # fp16 (the first format), not fp8_e4m3
    pyplot().close(fig)


def test_the_precision_figure_draws_the_proven_and_observed_activation_maxima_of_precision_bounds(tmp_path):
    """View precision_bounds (proven vs observed max |activation| per run, the e4m3 verdict) had no figure,
    only its table. A panel below the bars draws, per run in order of fp32 accuracy, the observed max (●)
    and the proven one (▲, filled where e4m3 is proven safe), and e4m3's largest value; a run without an
    analytic bound has its observed max and a note."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.precision import precision
    from lipflow.results.plotting import pyplot

    row = {"eval": "precision", "n": None, "matrix": None, "rtol": None, "epsilon": None, "attack": None, "k": None,
           "scaling": None}
    cells = {"prec.cap-00000001": (0.26, 6.0, 12.0, 1.0), "prec.free-00000002": (0.35, 26.0, 1300.0, 0.0),
             "prec.gpt-00000003": (0.31, 18.0, None, None)}
    runs = [run(rid, experiment="precision", model="gpt" if "gpt" in rid else "lipschitz_gpt",
                weight_constraint="spectral_soft_cap" if "cap" in rid else "none", max_activation=3.0) for rid in cells]
    evals = [{**row, "run_id": rid, "metric": metric, "value": value, "format": fmt}
             for rid, (accuracy, observed, proven, safe) in cells.items()
             for metric, value, fmt in (("accuracy", accuracy, "fp32"), ("observed_max_activation", observed, None),
                                        ("proven_max_activation", proven, None),
                                        ("proven_over_observed", proven and proven / observed, None),
                                        ("fp8_safe_proven", safe, "fp8_e4m3"))
             if value is not None]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con, log=io.StringIO())["precision_bounds"] == ""
    fig = precision(con)
    bounds = fig.axes[2]
    assert [t.get_text() for t in bounds.get_xticklabels()] == ["cap\nfp32 26.0 %", "gpt\nfp32 31.0 %",
                                                                "free\nfp32 35.0 %"]
    points = {(line.get_marker(), float(line.get_xdata()[0]), float(line.get_ydata()[0])): line
              for line in bounds.lines if line.get_marker() in ("o", "^")}
    assert set(points) == {("o", 0, 6.0), ("^", 0, 12.0), ("o", 1, 18.0), ("o", 2, 26.0), ("^", 2, 1300.0)}
    assert points["^", 0, 12.0].get_markerfacecolor() != "none"  # e4m3 proven safe
    assert points["^", 2, 1300.0].get_markerfacecolor() == "none"  # not proven
    assert bounds.get_yscale() == "log"
    assert [float(line.get_ydata()[0]) for line in bounds.lines if line.get_linestyle() == "--"] == [448.0]
    assert "no analytic bound" in [t.get_text() for t in bounds.texts]
    pyplot().close(fig)


def test_the_precision_figure_does_not_call_e4m3_unproven_where_e4m3_was_not_evaluated(tmp_path):
    """With evaluations.precision.formats without fp8_e4m3 no run has an e4m3 verdict (e4m3_proven_safe
    NULL), yet its ▲ was drawn hollow, which the legend reads as "e4m3 not proven (cast model's bound >
    max)": a claim about a format that was never evaluated. Such a ▲ is half filled and the legend says
    e4m3 was not evaluated."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.precision import precision
    from lipflow.results.plotting import pyplot

    row = {"run_id": "prec.cap-00000001", "eval": "precision", "n": None, "matrix": None, "rtol": None,
           "epsilon": None, "attack": None, "k": None, "scaling": None}
    evals = [{**row, "metric": metric, "value": value, "format": fmt}
             for metric, value, fmt in (("accuracy", 0.26, "fp32"), ("observed_max_activation", 6.0, None),
                                        ("proven_max_activation", 12.0, None), ("proven_over_observed", 2.0, None),
                                        ("fp8_safe_proven", 1.0, "bf16"))]
    runs = [run("prec.cap-00000001", experiment="precision", model="lipschitz_gpt",
                weight_constraint="spectral_soft_cap", max_activation=3.0)]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con, log=io.StringIO())["precision_bounds"] == ""
    fig = precision(con)
    bounds = fig.axes[2]
    (proven,) = [line for line in bounds.lines if line.get_marker() == "^"]
    assert proven.get_fillstyle() == "bottom"  # neither filled (proven safe) nor hollow (not proven)
    labels = [text.get_text() for text in bounds.get_legend().get_texts()]
    assert "proven; e4m3 not evaluated (evaluations.precision.formats)" in labels
    assert not any("e4m3 not proven" in label or "e4m3 proven safe" in label for label in labels)
    pyplot().close(fig)


def test_the_precision_panel_draws_the_bound_its_verdict_takes_and_skips_a_ratio_without_an_observed_max(tmp_path):
    """The ▲ is the bound over the observed tensors; the e4m3 verdict takes every bounded tensor, the
    attention scores too, so a hollow ▲ under e4m3's 448 (a run's 389 with scores bounded by 857) read as
    the casts' rounding alone. The bound over every tensor is a ▬ where it is above the ▲, named in the
    legend; a run whose ▲ is that bound has none. An observed max of 0 has no ratio to print (×inf), and
    a run without an fp32 accuracy says so (it printed "fp32 nan %")."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.precision import precision
    from lipflow.results.plotting import pyplot

    row = {"eval": "precision", "n": None, "matrix": None, "rtol": None, "epsilon": None, "attack": None, "k": None,
           "scaling": None}
    cells = {"prec.scores-00000001": (0.31, 16.0, 389.0, 857.0, 0.0), "prec.even-00000002": (0.26, 6.0, 12.0, 12.0, 1.0),
             "prec.zero-00000003": (None, 0.0, 5.0, 5.0, 1.0)}
    runs = [run(rid, experiment="precision", model="lipschitz_gpt", weight_constraint="spectral_soft_cap",
                max_activation=3.0) for rid in cells]
    evals = [{**row, "run_id": rid, "metric": metric, "value": value, "format": fmt}
             for rid, (accuracy, observed, proven, every, safe) in cells.items()
             for metric, value, fmt in (("accuracy", accuracy, "fp32"), ("observed_max_activation", observed, None),
                                        ("proven_max_activation", proven, None),
                                        ("proven_over_observed", proven / observed if observed else float("inf"), None),
                                        ("analytic_activation_bound", every, None), ("fp8_safe_proven", safe, "fp8_e4m3"))
             if value is not None]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con, log=io.StringIO())["precision_bounds"] == ""
    fig = precision(con)
    bounds = fig.axes[2]
    ticks = [t.get_text() for t in bounds.get_xticklabels()]
    assert ticks == ["even\nfp32 26.0 %", "scores\nfp32 31.0 %", "zero\nfp32 no accuracy"], ticks
    every = [(float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in bounds.lines
             if line.get_marker() == "_"]
    assert every == [(1.0, 857.0)]  # only where the scores' bound is above the ▲
    labels = [text.get_text() for text in bounds.get_legend().get_texts()]
    assert "proven for every bounded tensor, attention scores too (not observed)" in labels
    assert sorted(t.get_text() for t in bounds.texts) == ["×2", "×24.3"]  # no ×inf
    pyplot().close(fig)


def rank_database(tmp_path, runs, *, train_loss: float, rtol: float, train_split_tokens: int | None = None):
    """A database of rank_vs_n ``runs`` (their train loss ``train_loss`` at steps 95 and 100, a W_QK rank of 8
    at ``rtol`` and a B3 sum of 1 at n = 10) with its views built; ``train_split_tokens``: the train split's
    size, where the runs' train_tokens need more than the fixture's."""
    from test_experiments import database

    from lipflow.experiments import create_views

    metrics = [{"run_id": r["run_id"], "step": s, "loss": train_loss, "sharpness": None,
                "preconditioned_sharpness": None} for r in runs for s in (95, 100)]
    row = {"eval": "rank", "epsilon": None, "attack": None, "k": None, "format": None, "scaling": None}
    evals = [{**row, "run_id": r["run_id"], "metric": metric, "value": value, "n": n, "matrix": matrix,
              "rtol": rank_rtol}
             for r in runs for metric, value, n, matrix, rank_rtol in (("numerical_rank", 8.0, None, "qk", rtol),
                                                                       ("b3_rademacher_sum", 1.0, 10, None, None))]
    con = database(tmp_path, runs, metrics, evals)
    if train_split_tokens is not None:
        con.execute(f"UPDATE shards SET tokens = {train_split_tokens} WHERE split = 'train'")
    assert create_views(con, log=io.StringIO())["rank_bound"] == ""
    return con


def test_the_rank_figure_without_a_rank_at_rtol_1e_2_notes_it_instead_of_failing(tmp_path):
    """evaluations.rank.rtols: [0.001] (valid) left the view's qk_rank null: the rank panel's log axis had
    no point, and saving the figure raised 'Data cannot be log-scaled', failing the plots job."""
    from test_experiments import run

    from lipflow.experiments.rank_vs_n import rank_vs_n
    from lipflow.results.plotting import pyplot

    runs = [run(f"rank.a{i}-0000000{i}", experiment="rank_vs_n", train_tokens=640 * i, val_loss=2.5 + i)
            for i in (1, 2)]
    fig = rank_vs_n(rank_database(tmp_path, runs, train_loss=2.0, rtol=0.001))
    fig.savefig(io.BytesIO(), format="png")
    rank = fig.axes[2]
    assert rank.get_yscale() == "linear"
    assert [t.get_text() for t in rank.texts] == ["no numerical rank at rtol 1e-2\n(evaluations.rank.rtols lacks 0.01)"]
    assert fig.axes[0].get_yscale() == "log" and fig.axes[1].get_yscale() == "log"
    pyplot().close(fig)


def test_the_rank_figures_n_axes_are_labelled_at_the_trained_n_without_colliding_minor_labels(tmp_path):
    """n from 32 to 782 sequences (1.4 decades) drew matplotlib's minor labels 3×10¹ 4×10¹ 6×10¹ 2×10² …,
    which ran into each other under the panels; the axes name the trained n's instead."""
    from test_experiments import run

    from lipflow.experiments.rank_vs_n import rank_vs_n
    from lipflow.results.plotting import pyplot

    runs = [run(f"rank.a{i}-0000000{i}", experiment="rank_vs_n", train_tokens=64 * n, val_loss=2.5 + 1 / n)
            for i, n in enumerate((32, 128, 512, 782))]
    fig = rank_vs_n(rank_database(tmp_path, runs, train_loss=2.5, rtol=0.01, train_split_tokens=64 * 1000))
    fig.canvas.draw()
    for ax in fig.axes[:2]:
        assert [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()] == []
        assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "128", "512", "782"]
    pyplot().close(fig)


def test_the_rank_figures_lines_run_through_each_ns_seed_mean_not_through_every_seed(tmp_path):
    """A seed axis (point_keys pool the seeds of one n_heads into its slope) gave the gap and bound lines one
    vertex per run in n order, so they zig-zagged from one seed to the other at every n; the line runs through
    each n's mean over its seeds and every run is still drawn, as a hollow marker."""
    from test_experiments import run

    from lipflow.experiments.rank_vs_n import rank_vs_n
    from lipflow.results.plotting import pyplot

    losses = {(32, 0): 2.7, (32, 1): 3.1, (128, 0): 2.6, (128, 1): 2.8}  # train loss 2.5: gaps 0.2 0.6 0.1 0.3
    runs = [run(f"rank.n{n}.h1.seed{seed}-{i:08x}", experiment="rank_vs_n", train_tokens=64 * n, seed=seed,
                val_loss=loss) for i, ((n, seed), loss) in enumerate(losses.items())]
    fig = rank_vs_n(rank_database(tmp_path, runs, train_loss=2.5, rtol=0.01, train_split_tokens=64 * 1000))
    for ax, style in ((fig.axes[0], "-"), (fig.axes[1], "--")):
        [line] = [line for line in ax.lines if line.get_linestyle() == style]
        assert list(line.get_xdata()) == [32, 128]
    [gap] = [line for line in fig.axes[0].lines if line.get_linestyle() == "-"]
    assert list(gap.get_ydata()) == pytest.approx([0.4, 0.2])
    seeds = [xy for line in fig.axes[0].lines if line.get_linestyle() == "None" for xy in line.get_xydata()]
    assert sorted((int(x), round(float(y), 9)) for x, y in seeds) == [(32, 0.2), (32, 0.6), (128, 0.1), (128, 0.3)]
    pyplot().close(fig)


def test_the_robustness_figure_has_no_empty_tightness_panel_with_epsilons_0_only(tmp_path):
    """evaluations.robustness.epsilons: [0] (valid) leaves tightness rows only at the half-certified ε
    (attack pgd_half_certified): the tightness panel, which draws the pgd rows, was an empty log–log box."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.robustness import robustness
    from lipflow.results.plotting import pyplot

    runs = [run("robust.a-00000001", experiment="robustness")]
    evals = [{"run_id": "robust.a-00000001", "eval": "robustness", "metric": m, "value": v, "epsilon": e,
              "attack": a, "k": None}
             for m, v, e, a in (("certificate_l2", 200.0, None, None), ("robust_accuracy", 0.5, 0.0, "pgd"),
                                ("certified_accuracy", 0.5, 0.0, None), ("certified_accuracy_local", 0.5, 0.0, None),
                                ("tightness_global", 0.01, 0.008, "pgd_half_certified"),
                                ("tightness_local", 0.99, 0.008, "pgd_half_certified"))]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    fig = robustness(con)
    fig.savefig(io.BytesIO(), format="png")
    assert [ax.get_title() for ax in fig.axes] == ["language model: ℓ2 attack on token embeddings"]
    assert all(ax.lines for ax in fig.axes)
    pyplot().close(fig)


def test_the_robustness_figure_ticks_a_single_k_as_a_whole_number(tmp_path):
    """k_values: [1] gave the substitution panel ticks 0.945, 0.96, … 1.05: MaxNLocator(integer=True) falls
    back to fractional ticks when its range holds fewer than two integers."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.robustness import robustness
    from lipflow.results.plotting import pyplot

    runs = [run("robust.a-00000001", experiment="robustness")]
    evals = [{"run_id": "robust.a-00000001", "eval": "robustness", "metric": "robust_accuracy", "value": v,
              "epsilon": e, "attack": a, "k": k}
             for v, e, a, k in ((0.5, 0.0, "pgd", None), (0.4, None, "greedy", 1), (0.45, None, "random", 1))]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    fig = robustness(con)
    fig.canvas.draw()
    substitutions = fig.axes[1]
    low, high = substitutions.get_xlim()
    ticks = [t for t in substitutions.get_xticks() if low <= t <= high]
    assert ticks == [1.0]
    pyplot().close(fig)


def test_the_robustness_figure_puts_two_panels_a_row(tmp_path):
    """Its four panels stood in one row 21 inches wide (3,100 × 580 pixels): scaled to a screen, the legends
    and tick labels could not be read. Three panels take two rows, the empty cell removed."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.robustness import robustness
    from lipflow.results.plotting import pyplot

    runs = [run("robust.a-00000001", experiment="robustness")]
    evals = [{"run_id": "robust.a-00000001", "eval": "robustness", "metric": m, "value": v, "epsilon": e,
              "attack": a, "k": k}
             for m, v, e, a, k in (("robust_accuracy", 0.5, 0.0, "pgd", None),
                                   ("robust_accuracy", 0.4, None, "greedy", 1),
                                   ("tightness_global", 0.01, 0.1, "pgd", None),
                                   ("tightness_local", 0.5, 0.1, "pgd", None))]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    fig = robustness(con)
    assert len(fig.axes) == 3 and [ax.get_subplotspec().colspan.start for ax in fig.axes] == [0, 1, 0]
    width, height = fig.get_size_inches()
    assert width <= 2 * height, (width, height)
    pyplot().close(fig)


def one_radius_robustness_figure(tmp_path, radius: float):
    """The robustness figure of an LM run and a digits-MLP method evaluated at the one radius ``radius``."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.robustness import robustness

    runs = [run("robust.a-00000001", experiment="robustness")]
    evals = [{"run_id": "robust.a-00000001", "eval": "robustness", "metric": m, "value": 0.5, "epsilon": radius,
              "attack": a, "k": None} for m, a in (("robust_accuracy", "pgd"), ("certified_accuracy", None),
                                                   ("certified_accuracy_local", None))]
    image = [{"method": "m", "optimizer": "muon", "weight_constraint": "none", "seed": 0, "metric": m, "value": 0.5,
              "epsilon": radius} for m in ("robust_accuracy", "certified_accuracy")]
    con = database(tmp_path, runs, evals=evals, extra={"image_mlp_robustness": image})
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    fig = robustness(con)
    fig.canvas.draw()
    return fig


@pytest.mark.parametrize("radius", [0.0, 0.25])
def test_the_robustness_figure_of_one_radius_has_no_negative_or_crowded_epsilon_ticks(tmp_path, radius):
    """epsilons: [0] (valid, for the LM's evaluation and the digits MLP's study) left matplotlib's ±5% around the
    one point: ε ticks −0.04, −0.02, 0, 0.02, 0.04 (and 0.235, 0.24 … 0.265 for [0.25]). Each ε panel now spans
    [0, 2ε] ([0, 1] at ε = 0) with 5% margins: the point inside, every visible tick ≥ 0, a tick at 0."""
    from lipflow.results.plotting import pyplot

    fig = one_radius_robustness_figure(tmp_path, radius)
    assert [ax.get_xlabel()[:2] for ax in fig.axes] == ["ε ", "ε "]
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert min(ticks) == 0.0 and len(ticks) >= 3, ticks
        assert low < radius < high and high > (2 * radius or 1.0), (low, high)
    pyplot().close(fig)


def test_the_robustness_figure_of_one_radius_draws_its_certified_accuracies(tmp_path):
    """At one radius (epsilons: [0]) the certified accuracies, dashed and dotted lines without markers, drew
    nothing though the legend listed them: a line through one point is invisible. They now carry a marker."""
    from lipflow.results.plotting import pyplot

    fig = one_radius_robustness_figure(tmp_path, 0.0)
    drawn = {line.get_label(): line.get_marker() for ax in fig.axes for line in ax.lines}
    assert set(drawn) == {"a: PGD", "a: certified (global)", "a: certified (local) = global at every ε", "m: PGD",
                          "m: certified (global)"}
    assert all(marker not in (None, "None", "") for marker in drawn.values()), drawn
    pyplot().close(fig)


def test_the_digits_mlp_panel_draws_the_mean_over_seeds_with_their_range(tmp_path):
    """The digits MLP's seeds (image_mlp.seeds) are one line each of PGD and certified accuracy at their mean,
    a band from their min to their max, and the legend's L spans the seeds' certificates; with one seed
    (an LM run) no band is drawn."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.robustness import robustness
    from lipflow.results.plotting import pyplot

    runs = [run("robust.a-00000001", experiment="robustness")]
    evals = [{"run_id": "robust.a-00000001", "eval": "robustness", "metric": "robust_accuracy", "value": v,
              "epsilon": e, "attack": "pgd", "k": None} for e, v in ((0.0, 0.9), (0.5, 0.4))]
    image = [{"method": "m", "optimizer": "muon", "weight_constraint": "spectral_soft_cap", "seed": seed,
              "metric": metric, "value": value, "epsilon": eps}
             for seed, bound, pgd in ((0, 9.5, (0.9, 0.6)), (1, 10.5, (0.96, 0.4)), (2, 9.75, (0.93, 0.5)))
             for metric, value, eps in (("certificate_l2", bound, None), ("robust_accuracy", pgd[0], 0.0),
                                        ("robust_accuracy", pgd[1], 0.5), ("certified_accuracy", pgd[1] / 2, 0.5))]
    con = database(tmp_path, runs, evals=evals, extra={"image_mlp_robustness": image})
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    fig = robustness(con)
    lm_ax, image_ax = fig.axes
    assert "mean of 3 seeds" in image_ax.get_title() and "seeds" not in lm_ax.get_title()
    lines = {line.get_label(): line for line in image_ax.lines}
    assert set(lines) == {"m (L=9.5–10.5): PGD", "m: certified (global)"}
    pgd = lines["m (L=9.5–10.5): PGD"]
    assert list(pgd.get_xdata()) == [0.0, 0.5] and list(pgd.get_ydata()) == pytest.approx([93.0, 50.0])
    assert list(lines["m: certified (global)"].get_ydata()) == pytest.approx([25.0])
    vertices = image_ax.collections[0].get_paths()[0].vertices  # the PGD band
    assert {round(float(y), 6) for y in vertices[:, 1]} >= {90.0, 96.0, 40.0, 60.0}
    assert min(vertices[:, 1]) == pytest.approx(40.0) and max(vertices[:, 1]) == pytest.approx(96.0)
    assert not lm_ax.collections
    pyplot().close(fig)


def test_the_digits_mlp_panel_of_one_radius_draws_its_seeds_range(tmp_path):
    """With one radius (image_mlp.epsilons: [0.5]) the seeds' min–max band was a fill between two points at
    one ε: no area, nothing drawn, while the title promised "band: min–max". The range is drawn as a bar
    at that ε."""
    from matplotlib.collections import LineCollection
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.robustness import robustness
    from lipflow.results.plotting import pyplot

    runs = [run("robust.a-00000001", experiment="robustness")]
    evals = [{"run_id": "robust.a-00000001", "eval": "robustness", "metric": "robust_accuracy", "value": 0.5,
              "epsilon": 0.5, "attack": "pgd", "k": None}]
    image = [{"method": "m", "optimizer": "muon", "weight_constraint": "spectral_soft_cap", "seed": seed,
              "metric": metric, "value": value, "epsilon": eps}
             for seed, bound, pgd in ((0, 9.5, 0.6), (1, 10.5, 0.4), (2, 9.75, 0.5))
             for metric, value, eps in (("certificate_l2", bound, None), ("robust_accuracy", pgd, 0.5),
                                        ("certified_accuracy", pgd / 2, 0.5))]
    con = database(tmp_path, runs, evals=evals, extra={"image_mlp_robustness": image})
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    fig = robustness(con)
    image_ax = fig.axes[1]
    assert "band: min–max" in image_ax.get_title()
    ranges = sorted((float(x0), float(y0), float(x1), float(y1))
                    for bars in image_ax.collections if isinstance(bars, LineCollection)
                    for (x0, y0), (x1, y1) in bars.get_segments())
    assert ranges == pytest.approx([(0.5, 20.0, 0.5, 30.0), (0.5, 40.0, 0.5, 60.0)])  # certified, PGD
    pyplot().close(fig)


def test_the_digits_mlp_legend_gives_one_l_where_the_seeds_certificates_agree(tmp_path):
    """Seeds whose certificates agree to the legend's 3 digits (a soft cap every matrix reaches) were a range of
    one value, "L=27–27"; the legend gives "L=27", and a range only where the seeds differ."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.robustness import robustness
    from lipflow.results.plotting import pyplot

    runs = [run("robust.a-00000001", experiment="robustness")]
    evals = [{"run_id": "robust.a-00000001", "eval": "robustness", "metric": "robust_accuracy", "value": 0.5,
              "epsilon": 0.5, "attack": "pgd", "k": None}]
    image = [{"method": method, "optimizer": "muon", "weight_constraint": "spectral_soft_cap", "seed": seed,
              "metric": metric, "value": value, "epsilon": eps}
             for method, bounds in (("cap", (27.0, 27.001)), ("free", (103.0, 237.0)))
             for seed, bound in enumerate(bounds)
             for metric, value, eps in (("certificate_l2", bound, None), ("robust_accuracy", 0.5 + seed / 10, 0.5),
                                        ("certified_accuracy", 0.25, 0.5))]
    con = database(tmp_path, runs, evals=evals, extra={"image_mlp_robustness": image})
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    fig = robustness(con)
    labels = [line.get_label() for line in fig.axes[1].lines]
    assert "cap (L=27): PGD" in labels and "free (L=103–237): PGD" in labels
    pyplot().close(fig)


def test_the_robustness_figure_shows_a_local_certified_accuracy_equal_to_the_global_one(tmp_path):
    """A model whose local certified accuracy equals the global one at every ε (lipschitz_adamw of the cpu
    preset: 29.7 % at ε = 0, then 0) had its dotted local line drawn exactly over the dashed global one,
    without a marker: one hid the other. Each has its own marker and the legend says they coincide; a model
    whose two differ says nothing of the kind."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.robustness import robustness
    from lipflow.results.plotting import pyplot

    runs = [run("robust.a-00000001", experiment="robustness"), run("robust.b-00000002", experiment="robustness")]
    evals = [{"run_id": rid, "eval": "robustness", "metric": m, "value": v, "epsilon": e, "attack": a, "k": None}
             for rid, local in (("robust.a-00000001", (0.3, 0.0)), ("robust.b-00000002", (0.3, 0.2)))
             for e, pgd, cert, loc in zip((0.0, 0.5), (0.3, 0.25), (0.3, 0.0), local)
             for m, v, a in (("robust_accuracy", pgd, "pgd"), ("certified_accuracy", cert, None),
                             ("certified_accuracy_local", loc, None))]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    fig = robustness(con)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    glob, local = lines["a: certified (global)"], lines["a: certified (local) = global at every ε"]
    assert list(glob.get_ydata()) == list(local.get_ydata()) == [30.0, 0.0]  # the data as measured
    assert (glob.get_linestyle(), glob.get_marker()) != (local.get_linestyle(), local.get_marker())
    assert local.get_marker() not in (None, "None", "") and glob.get_marker() not in (None, "None", "")
    assert glob.get_markerfacecolor() == "none"  # a hollow marker: the local one shows inside it
    assert {"b: certified (global)", "b: certified (local)"} <= set(lines)
    pyplot().close(fig)


def test_the_robustness_figure_of_accuracies_all_zero_has_no_negative_ticks(tmp_path):
    """Untrained tiny runs whose every accuracy is 0 left matplotlib's ±5% around the lone 0: the accuracy
    axes ticked −0.04 … 0.04 %, values an accuracy cannot take. They span [0, 1] % with 5% margins now
    (zeros_from_zero), and a panel with a nonzero accuracy keeps matplotlib's range."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.robustness import robustness
    from lipflow.results.plotting import pyplot

    runs = [run("robust.a-00000001", experiment="robustness")]
    evals = [{"run_id": "robust.a-00000001", "eval": "robustness", "metric": "robust_accuracy", "value": 0.0,
              "epsilon": e, "attack": a, "k": k}
             for e, a, k in ((0.0, "pgd", None), (0.5, "pgd", None), (None, "greedy", 1), (None, "random", 1))]
    image = [{"method": "m", "optimizer": "muon", "weight_constraint": "none", "seed": 0, "metric": "robust_accuracy",
              "value": v, "epsilon": e} for e, v in ((0.0, 0.9), (0.5, 0.4))]
    con = database(tmp_path, runs, evals=evals, extra={"image_mlp_robustness": image})
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    fig = robustness(con)
    fig.canvas.draw()
    *zero_axes, image_ax = fig.axes
    assert len(zero_axes) == 2
    for ax in zero_axes:
        assert ax.get_ylim() == pytest.approx((-0.05, 1.05))
    assert image_ax.get_ylim()[1] > 90
    pyplot().close(fig)


def certified_robustness_figure(tmp_path):
    """The robustness figure of an unconstrained GPT (PGD only) and a Lipschitz GPT (L = 30: certified
    accuracies global and local that differ, tightness)."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.robustness import robustness

    runs = [run("robust.gpt-00000001", experiment="robustness", model="gpt"),
            run("robust.lip-00000002", experiment="robustness", model="lipschitz_gpt")]
    evals = [{"run_id": "robust.gpt-00000001", "eval": "robustness", "metric": "robust_accuracy", "value": v,
              "epsilon": e, "attack": "pgd", "k": None} for e, v in ((0.0, 0.3), (0.5, 0.2))]
    evals += [{"run_id": "robust.lip-00000002", "eval": "robustness", "metric": m, "value": v, "epsilon": e,
               "attack": a, "k": None}
              for m, v, e, a in (("certificate_l2", 30.0, None, None), ("robust_accuracy", 0.3, 0.0, "pgd"),
                                 ("robust_accuracy", 0.25, 0.5, "pgd"), ("certified_accuracy", 0.3, 0.0, None),
                                 ("certified_accuracy", 0.0, 0.5, None), ("certified_accuracy_local", 0.3, 0.0, None),
                                 ("certified_accuracy_local", 0.1, 0.5, None), ("tightness_global", 0.01, 0.5, "pgd"),
                                 ("tightness_local", 0.5, 0.5, "pgd"))]
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    return robustness(con)


def test_the_robustness_figure_names_a_model_without_a_certificate_in_its_certified_panels(tmp_path):
    """gpt_adamw (no certificate: no certified accuracy, no tightness) was left out of the certified lines
    and the tightness panel without a word. Its legend entries there say "no certificate", and nothing is
    drawn for it; its PGD line stays."""
    from lipflow.results.plotting import pyplot

    fig = certified_robustness_figure(tmp_path)
    attack, tightness = fig.axes
    for ax, what in ((attack, "no certified accuracy"), (tightness, "no tightness")):
        legend = [text.get_text() for text in ax.get_legend().get_texts()]
        assert f"gpt: no certificate, {what}" in legend, legend
        [entry] = [line for line in ax.lines if line.get_label() == f"gpt: no certificate, {what}"]
        assert len(entry.get_xdata()) == 0  # named, not drawn
    assert list(next(line for line in attack.lines if line.get_label() == "gpt: PGD").get_ydata()) == [30.0, 20.0]
    pyplot().close(fig)


def test_a_certified_model_without_tightness_rows_is_not_called_uncertified(tmp_path):
    """'no certificate' was inferred from missing rows: a model with a certificate but no tightness rows (a
    certificate of 0 or NaN gives none) was labelled 'no certificate'. The certificate decides now: such a
    model's entry says 'no tightness recorded'."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.robustness import robustness
    from lipflow.results.plotting import pyplot

    runs = [run("robust.lip-00000001", experiment="robustness", model="lipschitz_gpt"),
            run("robust.tight-00000002", experiment="robustness", model="lipschitz_gpt")]
    evals = [{"run_id": rid, "eval": "robustness", "metric": m, "value": v, "epsilon": e, "attack": a, "k": None}
             for rid in ("robust.lip-00000001", "robust.tight-00000002")
             for m, v, e, a in (("certificate_l2", 30.0, None, None), ("robust_accuracy", 0.3, 0.0, "pgd"),
                                ("certified_accuracy", 0.3, 0.0, None))]
    evals.append({"run_id": "robust.tight-00000002", "eval": "robustness", "metric": "tightness_local", "value": 0.5,
                  "epsilon": 0.5, "attack": "pgd", "k": None})
    con = database(tmp_path, runs, evals=evals)
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    fig = robustness(con)
    tightness = fig.axes[1]
    legend = [text.get_text() for text in tightness.get_legend().get_texts()]
    assert "lip: no tightness recorded" in legend and not any("no certificate" in entry for entry in legend)
    pyplot().close(fig)


def test_a_digits_mlp_line_averaging_fewer_seeds_at_some_radius_says_so(tmp_path):
    """The title's 'mean of N seeds' held for every line, but a seed without a value at some ε (a table
    made by hand, a study cut short) was averaged away there without a word. That line's legend entry says
    how many seeds its thinnest point averages."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.robustness import robustness
    from lipflow.results.plotting import pyplot

    image = [{"method": "m", "optimizer": "muon", "weight_constraint": "spectral_soft_cap", "seed": seed,
              "metric": metric, "value": value, "epsilon": eps}
             for seed in (0, 1, 2)
             for metric, value, eps in (("certificate_l2", 10.0, None), ("robust_accuracy", 0.9, 0.0),
                                        ("robust_accuracy", 0.5, 0.5), ("certified_accuracy", 0.8, 0.0),
                                        ("certified_accuracy", 0.2, 0.5))
             if not (seed == 2 and metric == "robust_accuracy" and eps == 0.5)]
    con = database(tmp_path, [run("robust.a-00000001", experiment="other")], extra={"image_mlp_robustness": image})
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    fig = robustness(con)
    labels = {line.get_label() for line in fig.axes[0].lines}
    assert labels == {"m (L=10): PGD (2 of 3 seeds at some ε)", "m: certified (global)"}, labels
    pyplot().close(fig)


def test_a_pareto_front_of_one_run_is_drawn_not_only_named_in_the_legend(tmp_path):
    """An optimizer with one run on its front (a trimmed grid) had a legend entry 'adamw Pareto front' and
    no line: a step through one point draws nothing. The point is ringed in the front's colour."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.lipschitz_tradeoff import tradeoff_accuracy
    from lipflow.results.plotting import pyplot

    runs = [run(f"tradeoff.{i}-0000000{i}", experiment="lipschitz_tradeoff", optimizer=optimizer, lipschitz_bound=b,
                val_accuracy=accuracy, max_activation=1.0)
            for i, (optimizer, b, accuracy) in enumerate((("adamw", 1200.0, 0.26), ("muon", 1.2, 0.25),
                                                          ("muon", 36.0, 0.256)))]
    con = database(tmp_path, runs)
    create_views(con, log=io.StringIO())
    fig = tradeoff_accuracy(con)
    fronts = {line.get_label(): line for line in fig.axes[0].lines}
    assert fronts["adamw Pareto front"].get_marker() == "o"
    assert list(fronts["adamw Pareto front"].get_xydata()[:, 0]) == [1200.0]
    assert fronts["muon Pareto front"].get_marker() == "None"  # two points: a visible step
    pyplot().close(fig)


def test_the_tradeoff_figure_says_over_which_data_each_accuracy_and_radius_is_measured(tmp_path):
    """The local panel plotted a radius measured on the robustness evaluation's 64 val windows (one
    prediction each) against an accuracy over every position of the whole val split, labelled only
    "val next-token accuracy" and "local certified radius": the axes and title now say which data."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.lipschitz_tradeoff import tradeoff_accuracy
    from lipflow.results.plotting import pyplot

    runs = [run(f"tradeoff.{i}-0000000{i}", experiment="lipschitz_tradeoff", optimizer="muon", lipschitz_bound=b,
                val_accuracy=0.3, max_activation=1.0) for i, b in enumerate((2.0, 8.0))]
    evals = [{"run_id": r["run_id"], "eval": "robustness", "metric": m, "value": v}
             for r in runs for m, v in (("half_certified_epsilon", 0.5), ("sequences", 64.0))]
    con = database(tmp_path, runs, evals=evals)
    create_views(con, log=io.StringIO())
    assert con.sql("select local_windows from pareto").fetchall() == [(64,), (64,)]
    fig = tradeoff_accuracy(con)
    bound, local = fig.axes
    assert all("whole val split" in ax.get_ylabel() for ax in (bound, local))
    assert "last-position predictions of 64 val windows" in local.get_xlabel()
    assert "whole val split" in local.get_title() and "64 val windows" in local.get_title()
    pyplot().close(fig)


def test_the_tradeoff_figure_says_whether_the_robustness_evaluation_ran_when_no_radius_is_positive(tmp_path):
    """With the robustness evaluation run and every half-certified ε 0 (no correct prediction), the local
    panel said "add the robustness evaluation", which had run; without it, it still says so."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.lipschitz_tradeoff import tradeoff_accuracy
    from lipflow.results.plotting import pyplot

    runs = [run(f"tradeoff.{i}-0000000{i}", experiment="lipschitz_tradeoff", optimizer="muon", lipschitz_bound=b,
                val_accuracy=0.0, max_activation=1.0) for i, b in enumerate((2.0, 8.0))]
    for evaluated in (True, False):
        evals = [{"run_id": r["run_id"], "eval": "robustness", "metric": "half_certified_epsilon", "value": 0.0}
                 for r in runs] if evaluated else []
        folder = tmp_path / str(evaluated)
        folder.mkdir()
        con = database(folder, runs, evals=evals)
        create_views(con, log=io.StringIO())
        fig = tradeoff_accuracy(con)
        [note] = [text.get_text() for text in fig.axes[1].texts]
        assert note.startswith("every run's local certified radius is 0" if evaluated else "no local certificate: add")
        pyplot().close(fig)


def visible_ticks(ax, axis: str) -> list[float]:
    """The ticks of ``ax``'s ``axis`` ("x" or "y") within its limits, after drawing."""
    ax.figure.canvas.draw()
    low, high = ax.get_xlim() if axis == "x" else ax.get_ylim()
    return [t for t in (ax.get_xticks() if axis == "x" else ax.get_yticks()) if low <= t <= high]


def test_the_activation_figure_of_runs_all_at_0_has_no_negative_ticks(tmp_path):
    """Every run's max activation 0 (linear axis) left matplotlib's ±5% around 0: y ticks −0.04 … 0.04 for a
    size that is never negative. The axis spans [0, 1] with 5% margins, the points on its 0 tick."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.lipschitz_tradeoff import tradeoff_activation
    from lipflow.results.plotting import pyplot

    runs = [run(f"tradeoff.{c}-0000000{i}", experiment="lipschitz_tradeoff", lipschitz_bound=3.0 * 10 ** i,
                val_accuracy=0.3, max_activation=0.0) for i, c in enumerate("abc")]
    con = database(tmp_path, runs)
    create_views(con, log=io.StringIO())
    fig = tradeoff_activation(con)
    ticks = visible_ticks(fig.axes[0], "y")
    assert min(ticks) == 0.0 and len(ticks) >= 3, ticks
    pyplot().close(fig)


def test_the_rank_figure_of_zero_ranks_gaps_and_bounds_has_no_negative_ticks(tmp_path):
    """A W_QK rank, a gap and a B3 sum of 0 for every run ticked the B3 panel's y axis and the rank panel's
    both axes −0.04 … 0.04 (no rank or bound is negative); each now spans [0, 1] with 5% margins."""
    from test_experiments import run

    from lipflow.experiments import create_views
    from lipflow.experiments.rank_vs_n import rank_vs_n
    from lipflow.results.plotting import pyplot

    runs = [run(f"rank.a{i}-0000000{i}", experiment="rank_vs_n", train_tokens=640 * i, val_loss=2.0) for i in (1, 2)]
    con = rank_database(tmp_path, runs, train_loss=2.0, rtol=0.01)
    con.execute("UPDATE evals SET value = 0.0")
    create_views(con, log=io.StringIO())
    assert con.sql("select distinct measured_gap, b3_bound, qk_rank from rank_bound").fetchall() == [(0.0, 0.0, 0.0)]
    fig = rank_vs_n(con)
    bound, rank = fig.axes[1], fig.axes[2]
    for ax, axis in ((bound, "y"), (rank, "x"), (rank, "y")):
        ticks = visible_ticks(ax, axis)
        assert min(ticks) == 0.0 and len(ticks) >= 3, (ax.get_title(), axis, ticks)
    pyplot().close(fig)
