"""Mutation-testing round 13: the code of the digits MLP's seeds and the figures' latest changes — the image_mlp
study over seeds (lipflow.studies.image_mlp: run_image_mlp_study, matched_rows, robustness_rows), the robustness
view's seed column and its figure (over_seeds, the min–max band, CERTIFIED_STYLES, "no certificate"), the
tradeoff figure's val-window counts (lipschitz_tradeoff.windows_of) and the precision figure's panel of view
precision_bounds (precision.activation_bounds). Each test here holds a property (a value computed by hand, the
caption's promise, a second way to the same number) that a plausible wrong version of the code, which the rest
of the suite let through, breaks."""

from __future__ import annotations

import io

import pytest
import torch
from matplotlib.colors import to_rgba

from lipflow.config import run_defaults
from lipflow.model import build_model


# --- studies.image_mlp: seeds --------------------------------------------------------------------------------

def _image_cfg(**extra):
    from lipflow.studies.image_mlp import study_config
    return study_config({"width": 16, "n_layers": 2, "epsilons": [0.0, 0.5], "pgd_steps": 3, "seeds": 1, **extra})


def _value(rows, metric, epsilon=None):
    [value] = [r["value"] for r in rows if r["metric"] == metric and r.get("epsilon") == epsilon]
    return value


def test_a_seeds_pgd_restarts_are_drawn_from_that_seed_not_from_the_configs_first_seed():
    """Mutant: robustness_rows seeded its PGD restarts by cfg["seed"] (the first seed) instead of ``seed``, so
    with pgd_restarts > 1 seed 1 of a two-seed study was attacked as seed 0 and differed from the study run at
    seed 1 alone. The rows of (config seed 0, seed 1) are those of (config seed 1, seed 1), and the restarts
    matter: seed 0's differ."""
    from lipflow.studies import image_mlp

    torch.manual_seed(0)
    model = build_model(run_defaults(**image_mlp.mlp_config(_image_cfg())), image_mlp.CLASSES)
    with torch.no_grad():  # weights large enough for confident, attackable logits
        for weight in model.parameters():
            weight.copy_(torch.randn_like(weight) * 3 / weight.shape[-1] ** 0.5)
    split = image_mlp.digits_splits(0)["test"]

    def rows(config_seed: int, seed: int) -> list[dict]:
        cfg = _image_cfg(seed=config_seed, epsilons=[0.5], pgd_restarts=4)
        return image_mlp.robustness_rows(model, split, cfg, seed, method="m")

    second = rows(1, 1)
    assert rows(0, 1) == second
    assert {r["seed"] for r in second} == {1}
    assert _value(rows(0, 0), "robust_loss", 0.5) != _value(second, "robust_loss", 0.5)


def test_the_study_reports_each_methods_best_val_accuracy_per_seed_not_its_last(monkeypatch):
    """Mutant: the progress line's "best val accuracy" was the last snapshot's. Curves whose last snapshot is
    below their best (a: 0.9 at step 30, 0.7 at the end; b: 0.8, then 0.75) report 0.9000 and 0.8000, at each
    of the two seeds in turn (1 of 4 … 4 of 4); each seed is matched at b's best, 0.8."""
    from lipflow.studies import image_mlp

    cfg = _image_cfg(seeds=2, methods={"a": {"optimizer": "adamw"}, "b": {"optimizer": "adamw"}})
    weights = build_model(run_defaults(**image_mlp.mlp_config(cfg)), image_mlp.CLASSES).state_dict()
    curves = [[(10, 0.5), (20, 0.85), (30, 0.9), (40, 0.7)], [(10, 0.6), (20, 0.8), (30, 0.75)]]
    trained = []

    def train(method, cfg, data, seed):
        trained.append(seed)
        return [(step, acc, weights) for step, acc in curves[(len(trained) - 1) % 2]]

    monkeypatch.setattr(image_mlp, "train_snapshots", train)
    monkeypatch.setattr(image_mlp, "robustness_rows", lambda model, split, cfg, seed, **columns: [])
    heard = []
    rows = image_mlp.run_image_mlp_study(cfg, heard.append)
    assert trained == [0, 0, 1, 1]
    assert heard == [f"{name} trained at seed {seed}, best val accuracy {best} ({number} of 4)"
                     for number, (seed, name, best) in enumerate(((0, "a", "0.9000"), (0, "b", "0.8000"),
                                                                  (1, "a", "0.9000"), (1, "b", "0.8000")), 1)]
    assert sorted((r["seed"], r["method"], r["value"]) for r in rows if r["metric"] == "matched_step") == [
        (0, "a", 20.0), (0, "b", 20.0), (1, "a", 20.0), (1, "b", 20.0)]


# --- robustness: the view's seed column and the figure -------------------------------------------------------

def _lm_and_digits(tmp_path, image):
    """Views over one LM robustness run (PGD at ε 0 and 0.5) and the digits MLP rows ``image``."""
    from test_experiments import database, run

    from lipflow.experiments import create_views

    runs = [run("robust.a-00000001", experiment="robustness")]
    evals = [{"run_id": "robust.a-00000001", "eval": "robustness", "metric": "robust_accuracy", "value": v,
              "epsilon": e, "attack": "pgd", "k": None} for e, v in ((0.0, 0.9), (0.5, 0.4))]
    con = database(tmp_path, runs, evals=evals, extra={"image_mlp_robustness": image})
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    return con


def _digits(pgd_at_half: dict[int, float]) -> list[dict]:
    """Method m's rows per seed: L = 10 + seed, PGD accuracy 0.95 at ε 0 and ``pgd_at_half[seed]`` at ε 0.5."""
    return [{"method": "m", "optimizer": "muon", "weight_constraint": "spectral_soft_cap", "seed": seed,
             "metric": metric, "value": value, "epsilon": eps}
            for seed, half in pgd_at_half.items()
            for metric, value, eps in (("certificate_l2", 10.0 + seed, None), ("robust_accuracy", 0.95, 0.0),
                                       ("robust_accuracy", half, 0.5))]


def test_the_robustness_view_gives_a_language_models_rows_its_runs_seed(tmp_path):
    """Mutant: the LM part of view robustness selected NULL (or 0) as its seed: the table lost which seed each
    LM run was trained from. Runs at seeds 7 and 3 keep them, beside the digits MLP's seeds."""
    from test_experiments import database, run

    from lipflow.experiments import create_views

    runs = [run("robust.a-00000001", experiment="robustness", seed=7),
            run("robust.b-00000002", experiment="robustness", seed=3)]
    evals = [{"run_id": r["run_id"], "eval": "robustness", "metric": "robust_accuracy", "value": 0.5,
              "epsilon": 0.5, "attack": "pgd", "k": None} for r in runs]
    con = database(tmp_path, runs, evals=evals, extra={"image_mlp_robustness": _digits({0: 0.5, 1: 0.4})})
    assert create_views(con, log=io.StringIO())["robustness"] == ""
    assert con.sql("select distinct domain, label, seed from robustness order by all").fetchall() == [
        ("image_mlp", "m", 0), ("image_mlp", "m", 1), ("lm", "a", 7), ("lm", "b", 3)]


def test_the_digits_mlp_line_is_the_mean_over_seeds_and_two_seeds_have_a_band_one_seed_none(tmp_path):
    """Mutants: over_seeds took the median (PGD accuracies 20, 30 and 70 % at ε 0.5: mean 40, median 30); a
    band only from three seeds (image_mlp.seeds: 2 drew none); the title's "mean of 1 seeds" for one seed.
    Two seeds (25 and 65 %): the line at 45, a band 25–65 at ε 0.5; one seed: its value, no band, no mean in the
    title."""
    from lipflow.experiments.robustness import robustness
    from lipflow.results.plotting import pyplot

    for name, seeds, mean, band in (("three", {0: 0.2, 1: 0.3, 2: 0.7}, 40.0, (20.0, 70.0)),
                                    ("two", {4: 0.25, 5: 0.65}, 45.0, (25.0, 65.0)), ("one", {0: 0.3}, 30.0, None)):
        folder = tmp_path / name
        folder.mkdir()
        fig = robustness(_lm_and_digits(folder, _digits(seeds)))
        image_ax = fig.axes[1]
        [pgd] = [line for line in image_ax.lines if line.get_label().endswith(": PGD")]
        assert list(pgd.get_xdata()) == [0.0, 0.5]
        assert list(pgd.get_ydata()) == pytest.approx([95.0, mean])
        if band is None:
            assert not image_ax.collections and "mean of" not in image_ax.get_title()
            assert pgd.get_label() == "m (L=10): PGD"
        else:
            assert f"mean of {len(seeds)} seeds" in image_ax.get_title()
            [collection] = image_ax.collections
            at_half = {round(float(y), 9) for x, y in collection.get_paths()[0].vertices if x == 0.5}
            assert sorted(at_half) == pytest.approx(band)  # at ε 0.5: the seeds' min and max
        pyplot().close(fig)


def test_the_certified_lines_have_the_captions_styles_and_the_legend_one_l_per_run(tmp_path):
    """Mutants: CERTIFIED_STYLES with global and local swapped in line style (global dotted) or in marker
    (global ×), against the caption's "dashed, hollow ■" global and "dotted, ×" local lines; the legend's L of
    a run from every row of it, not once per seed ("L=30–30" for one run's one certificate)."""
    from test_figures_edge_cases import certified_robustness_figure

    from lipflow.results.plotting import pyplot

    fig = certified_robustness_figure(tmp_path)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    pgd, glob, local = lines["lip (L=30): PGD"], lines["lip: certified (global)"], lines["lip: certified (local)"]
    assert (pgd.get_linestyle(), pgd.get_marker()) == ("-", "o")
    assert (glob.get_linestyle(), glob.get_marker(), glob.get_markerfacecolor()) == ("--", "s", "none")
    assert (local.get_linestyle(), local.get_marker()) == (":", "x")
    assert list(local.get_ydata()) == pytest.approx([30.0, 10.0])
    assert "gpt: PGD" in lines  # no certificate: no L in its label
    pyplot().close(fig)


def test_only_the_model_without_a_certificate_is_named_so_in_the_tightness_panel(tmp_path):
    """Mutant: the tightness panel's ``drawn`` never set, so the Lipschitz GPT, whose global and local tightness
    are drawn, was also listed as "no certificate, no tightness". Only the GPT is."""
    from test_figures_edge_cases import certified_robustness_figure

    from lipflow.results.plotting import pyplot

    fig = certified_robustness_figure(tmp_path)
    tightness = fig.axes[1]
    labels = [line.get_label() for line in tightness.lines]
    assert sorted(labels) == ["gpt: no certificate, no tightness", "lip: global", "lip: local"]
    certified = [line.get_label() for line in fig.axes[0].lines if "no certificate" in line.get_label()]
    assert certified == ["gpt: no certificate, no certified accuracy"]
    pyplot().close(fig)


# --- lipschitz_tradeoff: the val windows of the local radius --------------------------------------------------

def test_the_windows_of_the_drawn_radii_are_one_count_a_range_low_to_high_or_none_recorded():
    """Mutants: windows_of's range written high to low ("64–32"), and a run without a recorded count taken as 0
    windows ("0–64", "0 val windows") instead of left out."""
    import pandas as pd

    from lipflow.experiments.lipschitz_tradeoff import windows_of

    assert windows_of(pd.Series([64.0, 64.0])) == "64 val windows"
    assert windows_of(pd.Series([64.0, 32.0, 48.0, 64.0])) == "32–64 val windows"
    assert windows_of(pd.Series([float("nan"), 64.0])) == "64 val windows"
    assert windows_of(pd.Series([float("nan")])) == "val windows"
    assert windows_of(pd.Series([], dtype=float)) == "val windows"


def test_the_local_panel_counts_the_windows_of_the_runs_it_draws_only(tmp_path):
    """Mutant: the local panel's window count over every run, also one whose robustness evaluation recorded 32
    windows but no local radius (no local certificate): the panel draws only the run of 64 windows, and says
    64, not "32–64"."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.lipschitz_tradeoff import tradeoff_accuracy
    from lipflow.results.plotting import pyplot

    runs = [run(f"tradeoff.{i}-0000000{i}", experiment="lipschitz_tradeoff", optimizer="muon", lipschitz_bound=b,
                val_accuracy=0.3, max_activation=1.0) for i, b in enumerate((2.0, 8.0))]
    evals = [{"run_id": runs[0]["run_id"], "eval": "robustness", "metric": m, "value": v}
             for m, v in (("half_certified_epsilon", 0.5), ("sequences", 64.0))]
    evals.append({"run_id": runs[1]["run_id"], "eval": "robustness", "metric": "sequences", "value": 32.0})
    con = database(tmp_path, runs, evals=evals)
    create_views(con, log=io.StringIO())
    assert sorted(con.sql("select local_windows, local_radius from pareto").fetchall()) == [(32, None), (64, 0.5)]
    fig = tradeoff_accuracy(con)
    local = fig.axes[1]
    assert "last-position predictions of 64 val windows" in local.get_xlabel()
    assert local.get_title().endswith("(64 val windows)")
    pyplot().close(fig)


# --- precision: the panel of view precision_bounds -----------------------------------------------------------

def test_the_activation_panel_marks_ratios_fills_and_colours_as_the_view_and_bars_say(tmp_path):
    """Mutants of the precision figure's precision_bounds panel: the ratio label observed/proven (×0.5 for a
    proven bound twice the observed max); a run without an e4m3 verdict (NaN) drawn filled, as proven safe; a
    run without an observed max given a place on the axis; the points in grey, not their run's bar colour;
    no line joining the observed and proven maxima. Runs by fp32 accuracy: cap (26 %: 6 → 12, safe), nov
    (30 %: 4 → 8, no verdict: half filled), free (35 %: 26 → 1300, not safe); gone (28 %: proven 10, nothing observed) has no
    place."""
    from test_experiments import database, run

    from lipflow.experiments import create_views
    from lipflow.experiments.precision import precision
    from lipflow.results.plotting import pyplot

    row = {"eval": "precision", "n": None, "matrix": None, "rtol": None, "epsilon": None, "attack": None, "k": None}
    cells = {"prec.cap-00000001": (0.26, 6.0, 12.0, 1.0), "prec.free-00000002": (0.35, 26.0, 1300.0, 0.0),
             "prec.nov-00000003": (0.30, 4.0, 8.0, None), "prec.gone-00000004": (0.28, None, 10.0, None)}
    runs = [run(rid, experiment="precision", model="lipschitz_gpt", max_activation=3.0) for rid in cells]
    evals = [{**row, "run_id": rid, "metric": metric, "value": value, "format": fmt, "scaling": scaling}
             for rid, (accuracy, observed, proven, safe) in cells.items()
             for metric, value, fmt, scaling in (
                 ("accuracy", accuracy, "fp32", None), ("accuracy", accuracy - 0.01, "fp8_e4m3", "none"),
                 ("accuracy_delta", -0.01, "fp8_e4m3", "none"), ("observed_max_activation", observed, None, None),
                 ("proven_max_activation", proven, None, None),
                 ("proven_over_observed", observed and proven / observed, None, None),
                 ("fp8_safe_proven", safe, "fp8_e4m3", None))
             if value is not None]
    con = database(tmp_path, runs, evals=evals)
    built = create_views(con, log=io.StringIO())
    assert built["precision"] == built["precision_bounds"] == ""
    fig = precision(con)
    bars, bounds = fig.axes[0], fig.axes[2]
    bar_colour = {container.get_label().split(" ")[0]: to_rgba(container.patches[0].get_facecolor())
                  for container in bars.containers}
    assert set(bar_colour) == {"cap", "free", "gone", "nov"}
    order = ["cap", "nov", "free"]
    assert [t.get_text().split("\n")[0] for t in bounds.get_xticklabels()] == order
    assert [t.get_text() for t in bounds.texts] == ["×2", "×2", "×50"]
    for x, (label, observed, proven, filled) in enumerate((("cap", 6.0, 12.0, "full"), ("nov", 4.0, 8.0, "bottom"),
                                                           ("free", 26.0, 1300.0, "none"))):
        here = [line for line in bounds.lines if list(line.get_xdata()) in ([x], [x, x])]
        by_marker = {line.get_marker(): line for line in here}
        assert list(by_marker["o"].get_ydata()) == [observed] and list(by_marker["^"].get_ydata()) == [proven]
        [join] = [line for line in here if len(line.get_xdata()) == 2]
        assert sorted(join.get_ydata()) == [observed, proven]
        assert all(to_rgba(line.get_color()) == bar_colour[label] for line in here)
        marker = by_marker["^"]  # filled: proven safe; half: no verdict; hollow: not proven
        assert ("none" if marker.get_markerfacecolor() == "none" else marker.get_fillstyle()) == filled, label
    pyplot().close(fig)
