"""Mutation-testing round 11: the experiments' DuckDB views (lipflow/experiments/*.py) and the figure helpers
that compute numbers, grid expansion (lipflow.experiments.grid, lipflow.experiments) and the run config
(lipflow.config.runs). Each test here holds a property (the same aggregate computed in plain Python over the
same rows, a hand-computed tiny case, a closed form) that a plausible wrong version of the code, which the
rest of the suite let through, breaks."""

from __future__ import annotations

import math
import re
import statistics

import pytest

from lipflow.experiments import create_views
from test_experiments import database, run


# --- lr_transfer --------------------------------------------------------------------------------------------

def lr_run(i: int, method: str, width: int, lr: float, seed: int = 0, **settings) -> dict:
    return run(f"lrt.{method}.w{width}.lr{lr}.seed{seed}-{i:08x}", experiment="lr_transfer", d_model=width, lr=lr,
               seed=seed, **settings)


def test_lr_transfer_final_loss_is_the_val_loss_when_finite_else_the_final_one_of_completed_runs(tmp_path):
    """final_loss = coalesce(val_loss, final_val_loss) of a completed run when that is finite, else NULL: a
    completed run whose last val loss overflowed (inf, NaN) has no final loss, and a run with both losses is
    ranked by its val_loss."""
    specs = [(1.0, 2.0), (None, 3.0), (math.inf, 0.5), (math.nan, None), (None, None)]
    runs = [lr_run(i, "adamw", 16, 0.1 * (i + 1), val_loss=v, final_val_loss=f) for i, (v, f) in enumerate(specs)]
    con = database(tmp_path, runs)
    create_views(con)
    got = [row[0] for row in con.sql("select final_loss from lr_transfer_runs order by lr").fetchall()]

    def expected(v, f):
        loss = v if v is not None else f
        return loss if loss is not None and math.isfinite(loss) else None

    assert got == [expected(v, f) for v, f in specs] == [1.0, 3.0, None, None, None]
    # the point with the overflowed loss (lr 0.3, 'final' 0.5) is no optimum: the best finite mean is 1.0 at lr 0.1
    assert con.sql("select optimal_lr, best_loss, n_lrs from lr_transfer").fetchall() == [(0.1, 1.0, 2)]


def test_lr_transfer_n_seeds_counts_distinct_seeds_not_runs(tmp_path):
    """n_seeds is the number of distinct seeds of the optimum's point: two runs of one seed (one name under two
    run ids, e.g. a run redone after a config change) are one seed, and the point's loss is the runs' mean."""
    runs = [lr_run(0, "adamw", 16, 0.1, seed=0, val_loss=1.0), lr_run(1, "adamw", 16, 0.1, seed=0, val_loss=2.0),
            lr_run(2, "adamw", 16, 0.1, seed=1, val_loss=3.0), lr_run(3, "adamw", 16, 0.2, seed=0, val_loss=4.0)]
    con = database(tmp_path, runs)
    create_views(con)
    seeds = {r["seed"] for r in runs if r["lr"] == 0.1}
    assert con.sql("select optimal_lr, best_loss, n_seeds from lr_transfer").fetchall() == [
        (0.1, pytest.approx(statistics.mean([1.0, 2.0, 3.0])), len(seeds))]
    assert len(seeds) == 2


def test_seed_means_is_the_mean_over_seeds_and_nan_when_a_seed_has_no_loss():
    """seed_means(runs): one row per (method, width, lr), sorted, with the arithmetic mean of its seeds'
    final losses, NaN as soon as one seed has none: checked against the same grouping in plain Python."""
    import pandas as pd

    from lipflow.experiments.lr_transfer import seed_means

    rows = [("b", 16, 0.1, 1.0), ("b", 16, 0.1, 2.0), ("b", 16, 0.1, 6.0),   # mean 3, median 2
            ("a", 32, 0.2, 5.0), ("a", 32, 0.2, None), ("a", 16, 0.2, 4.0), ("a", 16, 0.1, 0.5),
            ("b", 16, 0.2, 7.0), ("b", 16, 0.2, 9.0)]
    runs = pd.DataFrame(rows, columns=["method", "width", "lr", "final_loss"])
    got = seed_means(runs)
    groups: dict[tuple, list] = {}
    for method, width, lr, loss in rows:
        groups.setdefault((method, width, lr), []).append(loss)
    expected = [(*key, math.nan if None in losses else sum(losses) / len(losses))
                for key, losses in sorted(groups.items())]
    assert list(got.columns) == ["method", "width", "lr", "final_loss"]
    assert [tuple(row) for row in got[["method", "width", "lr"]].itertuples(index=False)] == [e[:3] for e in expected]
    for value, (*_, want) in zip(got.final_loss, expected):
        assert (math.isnan(value) and math.isnan(want)) or value == pytest.approx(want)
    assert got.final_loss.tolist()[-2:] == [3.0, 8.0]


# --- rank_vs_n ----------------------------------------------------------------------------------------------

def ls_slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of y on x, written out."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def test_rank_bound_fits_one_slope_per_head_count_over_positive_values_only(tmp_path):
    """gap_slope and bound_slope are the least-squares slopes of ln(gap) and ln(B3 bound) on ln(n) over every
    run of one head count (whatever its d_model), each over the runs whose value is positive: checked against
    the fit written out over the view's own rows."""
    specs = [  # (n_heads, d_model, train_tokens, gap, b3 at n_eval 100)
        (2, 32, 640, 0.50, 3.0), (2, 64, 1280, 0.40, 2.0), (2, 32, 2560, 0.20, 0.0), (2, 64, 5120, 0.15, 1.5),
        (2, 32, 10240, -0.1, 1.1), (4, 64, 640, 0.30, 4.0), (4, 64, 2560, 0.25, 3.0), (4, 64, 10240, 0.05, 2.5)]
    runs, metrics, evals = [], [], []
    for i, (heads, width, tokens, gap, b3) in enumerate(specs):
        run_id = f"rank.{i}-{i:08x}"
        runs.append(run(run_id, experiment="rank_vs_n", n_heads=heads, d_model=width, train_tokens=tokens,
                        steps=10, context=64, val_loss=2.0 + gap))
        metrics.append({"run_id": run_id, "step": 10, "loss": 2.0, "sharpness": None, "preconditioned_sharpness": None})
        evals.append({"run_id": run_id, "eval": "rank", "metric": "b3_rademacher_sum", "value": b3, "n": 100,
                      "matrix": None, "rtol": None})
    con = database(tmp_path, runs, metrics, evals)
    con.execute("UPDATE shards SET tokens = 100000 WHERE split = 'train'")
    create_views(con)
    rows = con.sql("select n_heads, n_sequences, measured_gap, b3_bound, gap_slope, bound_slope from rank_bound "
                   "order by n_heads, n_sequences").fetchall()
    assert len(rows) == len(specs)
    for heads in (2, 4):
        mine = [r for r in rows if r[0] == heads]
        gap_fit = ls_slope([(math.log(n), math.log(g)) for _, n, g, _, _, _ in mine if g > 0])
        bound_fit = ls_slope([(math.log(n), math.log(b)) for _, n, _, b, _, _ in mine if b > 0])
        assert all(r[4] == pytest.approx(gap_fit) and r[5] == pytest.approx(bound_fit) for r in mine)
    assert [r[3] for r in rows if r[0] == 2] == pytest.approx(
        [b3 * math.sqrt(100 / (tokens // 64)) for heads, _, tokens, _, b3 in specs if heads == 2])


# --- lipschitz_tradeoff -------------------------------------------------------------------------------------

def test_pareto_val_loss_and_accuracy_fall_back_to_the_final_evaluation(tmp_path):
    """pareto's val_loss and val_accuracy are the last periodic evaluation's, else the final evaluation's
    (coalesce), per run."""
    specs = [(1.0, 2.0, 0.4, 0.5), (None, 2.5, None, 0.3), (1.5, None, 0.2, None), (None, None, None, None)]
    runs = [run(f"tradeoff.{i}-{i:08x}", experiment="lipschitz_tradeoff", lipschitz_bound=1.0 + i, val_loss=v,
                final_val_loss=fv, val_accuracy=a, final_val_accuracy=fa) for i, (v, fv, a, fa) in enumerate(specs)]
    con = database(tmp_path, runs)
    create_views(con)
    got = con.sql("select val_loss, val_accuracy from pareto order by lipschitz_bound").fetchall()
    assert got == [(v if v is not None else fv, a if a is not None else fa) for v, fv, a, fa in specs]


def test_pareto_front_with_ties_in_bound_or_accuracy_is_the_brute_force_front(tmp_path):
    """A run is on its optimizer's front unless another run of that optimizer has a bound ≤ and an accuracy ≥,
    one of them strictly: an equal accuracy at a lower bound dominates, as does an equal bound at a higher
    accuracy; two equal runs are both on it. Checked against the definition over every pair."""
    points = [("muon", 2.0, 0.5), ("muon", 5.0, 0.5), ("muon", 5.0, 0.6), ("muon", 7.0, 0.6), ("muon", 9.0, 0.7),
              ("muon", 9.0, 0.7), ("adamw", 3.0, 0.4), ("adamw", 3.0, 0.3), ("adamw", 4.0, 0.4)]
    runs = [run(f"tradeoff.{i}-{i:08x}", experiment="lipschitz_tradeoff", optimizer=o, lipschitz_bound=b,
                val_accuracy=a) for i, (o, b, a) in enumerate(points)]
    con = database(tmp_path, runs)
    create_views(con)
    got = {int(name.split(".")[1]) for name, on in con.sql("select name, on_front from pareto").fetchall() if on}
    front = {i for i, (o, b, a) in enumerate(points)
             if not any(oo == o and bb <= b and aa >= a and (bb < b or aa > a) for oo, bb, aa in points)}
    assert got == front == {0, 2, 4, 5, 6}


# --- precision, robustness, super_consistency ---------------------------------------------------------------

def test_precision_and_robustness_labels_are_the_whole_name_after_the_short(tmp_path):
    """A run's label in the precision and robustness views is everything after its name's first dot (the grid
    labels of every axis, `free.T100`), not the first label only: two runs differing on a later axis stay two."""
    names = ["prec.free.T100", "prec.free.T50", "prec.cap"]
    runs = [run(f"{name}-{i:08x}", experiment=exp, model="lipschitz_gpt")
            for i, name in enumerate(names) for exp in ("precision",)]
    runs += [run(f"robust.{name.split('.', 1)[1]}-{i + 10:08x}", experiment="robustness") for i, name in enumerate(names)]
    evals = [{"run_id": r["run_id"], "eval": r["experiment"], "metric": "accuracy" if r["experiment"] == "precision"
              else "clean_accuracy", "value": 0.5, "format": "fp32", "scaling": None, "epsilon": None, "attack": None,
              "k": None} for r in runs]
    con = database(tmp_path, runs, evals=evals)
    create_views(con)
    expected = sorted(name.split(".", 1)[1] for name in names)
    assert [r[0] for r in con.sql("select label from precision order by label").fetchall()] == expected
    assert [r[0] for r in con.sql("select label from precision_bounds order by label").fetchall()] == expected
    assert [r[0] for r in con.sql("select label from robustness order by label").fetchall()] == expected


def test_parametrization_labels_of_the_sharpness_panels():
    """The sharpness panels name a parametrization in capitals with µP spelled so, and depth-µP added."""
    from lipflow.experiments.super_consistency import _parametrization_label

    assert _parametrization_label("mup", False) == "µP"
    assert _parametrization_label("mup", True) == "µP + depth-µP"
    assert _parametrization_label("sp", True) == "SP + depth-µP"
    assert _parametrization_label("modular", False) == "MODULAR"


# --- lipflow.experiments.grid -------------------------------------------------------------------------------

def test_definitions_copy_the_configs_blocks_and_merge_block_its_inputs():
    """definitions(config) fills and returns blocks of its own: neither filling the schema's defaults nor a
    caller editing what it returned changes the config's experiment_definitions (a second definitions() of
    the same config, e.g. Plan's and the Snakefile's, would see another config)."""
    import copy

    from lipflow.config import SCHEMA_PATH, validate
    from lipflow.experiments import definitions
    from lipflow.experiments.grid import merge_block

    config = validate({"experiment_definitions": {
        "mine": {"short": "m", "cpu": {"base": {"lr": 0.1}, "grid": {"seed": [0, 1]}}, "studies": ["icl"]},
        "lr_transfer": {"cpu": {"base": {"steps": 7}, "grid": [{"method": {"a": {"lr": 0.1}}}]}}}}, SCHEMA_PATH)
    before = copy.deepcopy(config)
    first = definitions(config)
    assert config == before
    first["mine"]["cpu"]["base"]["lr"] = 9.0
    first["mine"]["cpu"]["grid"]["seed"].append(2)
    first["mine"]["studies"].append("image_mlp")
    first["lr_transfer"]["cpu"]["grid"][0]["method"]["b"] = {"lr": 0.2}
    first["lr_transfer"]["cpu"]["base"]["steps"] = 8
    assert config == before
    assert definitions(config) == definitions(copy.deepcopy(before))

    builtin, override = {"a": {"x": [1]}, "grid": {"k": [1]}}, {"a": {"y": {"z": [2]}}, "grid": {"j": [3]}, "b": [4]}
    originals = copy.deepcopy((builtin, override))
    merged = merge_block(builtin, override)
    assert merged == {"a": {"x": [1], "y": {"z": [2]}}, "grid": {"j": [3]}, "b": [4]}
    merged["a"]["x"].append(5), merged["a"]["y"]["z"].append(6), merged["grid"]["j"].append(7), merged["b"].append(8)
    assert (builtin, override) == originals


def test_axis_labels_prefix_known_keys_and_use_the_key_itself_for_others():
    """A scalar axis's label is LABEL_PREFIX's short prefix of its key (sigma_max 2 → s2) and, for a key without
    one, the key's own name (beta2 0.95 → beta20.95): a bare value would name two axes' points alike."""
    from lipflow.experiments.grid import LABEL_PREFIX, axis_points

    assert [label for label, _ in axis_points("beta2", [0.9, 0.95])] == ["beta20.9", "beta20.95"]
    assert [label for label, _ in axis_points("momentum", [0.5])] == ["momentum0.5"]
    assert [label for label, _ in axis_points("sigma_max", [2, 0.5])] == ["s2", "s0.5"]
    assert "beta2" not in LABEL_PREFIX and "momentum" not in LABEL_PREFIX
    assert axis_points("beta2", [0.9]) == [("beta20.9", {"beta2": 0.9})]


@pytest.mark.parametrize("axis, values", [("lr", [0.1234561, 0.1234562]), ("seed", [1, 1.0]), ("model", ["gpt", "gpt"])])
def test_an_axis_whose_values_share_a_label_is_refused_by_axis_points(axis, values):
    """Two values of one axis with one label (six significant digits alike, an int and its float, a repeated
    string) are refused where the axis is read, naming the axis: they would name two runs alike."""
    from lipflow.config import ConfigError
    from lipflow.experiments.grid import axis_points

    labels = [label for label, _ in axis_points(axis, values[:1])] * 2
    with pytest.raises(ConfigError, match=rf"grid axis '{axis}' has values with equal labels: {re.escape(str(labels))}"):
        axis_points(axis, values)


def test_every_grid_of_a_list_must_start_with_the_label_axis_and_a_single_grid_is_named_grid():
    """check_label_axis reads each grid of a list: a later grid starting with another axis is refused naming its
    index (grid[1]); a single grid is named `grid`; an empty grid and an experiment without a label axis pass."""
    from lipflow.config import ConfigError
    from lipflow.experiments.grid import check_label_axis

    good, bad = {"method": {"a": {"lr": 0.1}}, "lr": [0.1]}, {"lr": [0.1], "method": {"a": {"lr": 0.1}}}
    check_label_axis("x", "cpu", "method", [good, {}, good])
    check_label_axis("x", "cpu", None, [bad, bad])
    for grids, where in (([good, bad], r"grid\[1\]"), ([good, good, bad], r"grid\[2\]"), (bad, "grid")):
        with pytest.raises(ConfigError, match=rf"^config error: experiment_definitions\.x\.cpu\.{where}: its first "
                                              r"axis is 'lr', but .* put 'method' first$"):
            check_label_axis("x", "cpu", "method", grids)


# --- lipflow.experiments ------------------------------------------------------------------------------------

def test_check_view_points_groups_runs_within_one_experiment_only():
    """A point of the views is one experiment's: two experiments' runs with equal point keys and labels are
    never averaged together (each experiment's views read its own runs), so they are not refused; two runs of
    one experiment at one point differing in a key are, naming both runs (sorted) and the key."""
    from lipflow.config import ConfigError
    from lipflow.experiments import check_view_points

    presets = {"cpu": {"grid": {}}, "paper": {"grid": {}}}  # blocks as definitions() fills them
    blocks = {"e1": {"point_keys": ["lr"], **presets}, "e2": {"point_keys": ["lr"], **presets},
              "e3": {"label_axis": "m", "point_keys": ["lr"], **presets}}
    runs = {"x.a": {"experiment": "e1", "lr": 0.1, "seed": 0}, "y.a": {"experiment": "e2", "lr": 0.1, "seed": 1},
            "z.a.s0": {"experiment": "e3", "lr": 0.1, "seed": 0}, "z.b.s1": {"experiment": "e3", "lr": 0.1, "seed": 1},
            "plain": {"experiment": None, "lr": 0.1, "seed": 2}}
    check_view_points(blocks, runs)
    runs["x.b"] = {"experiment": "e1", "lr": 0.1, "seed": 5}
    with pytest.raises(ConfigError, match=r"runs 'x\.a' and 'x\.b' differ in seed, but its views group runs by lr "):
        check_view_points(blocks, dict(reversed(list(runs.items()))))


def test_two_experiments_making_one_run_name_are_refused():
    """Two selected experiments whose grids name a run alike (one `short`, one label) would make one run of two:
    refused in one line asking for different short names; the same blocks under two shorts expand to both."""
    from lipflow.config import SCHEMA_PATH, ConfigError, validate
    from lipflow.experiments import expand_experiments

    blocks = {"one": {"short": "x", "cpu": {"grid": {"v": {"a": {"lr": 0.1}}}}},
              "two": {"short": "x", "cpu": {"grid": {"v": {"a": {"lr": 0.2}, "b": {"lr": 0.3}}}}}}
    config = validate({"experiments": ["one", "two"], "experiment_definitions": blocks}, SCHEMA_PATH)
    with pytest.raises(ConfigError, match=r"^config error: run 'x\.a' is produced by two experiments; give them "
                                          r"different `short` names$"):
        expand_experiments(config)
    blocks["two"]["short"] = "y"
    config = validate({"experiments": ["one", "two"], "experiment_definitions": blocks}, SCHEMA_PATH)
    runs = expand_experiments(config)
    assert {name: (o["experiment"], o["lr"]) for name, o in runs.items()} == {
        "x.a": ("one", 0.1), "y.a": ("two", 0.2), "y.b": ("two", 0.3)}


def test_a_config_block_may_restate_the_view_keys_of_its_experiment_but_not_change_them():
    """label_axis and point_keys are the experiment's own YAML file's: a config's block that restates them as
    they are (a copy of the built-in block) is taken, one that changes them refused naming the key."""
    from lipflow.config import SCHEMA_PATH, ConfigError, validate
    from lipflow.experiments import builtin_definitions, definitions

    own = builtin_definitions()["lr_transfer"]
    same = {"label_axis": own["label_axis"], "point_keys": list(own["point_keys"]), "cpu": {"base": {"steps": 7}}}
    merged = definitions(validate({"experiment_definitions": {"lr_transfer": same}}, SCHEMA_PATH))["lr_transfer"]
    assert (merged["label_axis"], merged["point_keys"], merged["cpu"]["base"]["steps"]) == \
        (own["label_axis"], own["point_keys"], 7)
    for key, value in (("label_axis", "lr"), ("point_keys", ["d_model", "lr"])):
        with pytest.raises(ConfigError, match=rf"^config error: experiment_definitions\.lr_transfer\.{key}: set by "):
            definitions(validate({"experiment_definitions": {"lr_transfer": {**same, key: value}}}, SCHEMA_PATH))


# --- lipflow.config.runs ------------------------------------------------------------------------------------

def test_named_where_written_renames_only_the_whole_inherited_key():
    """A message naming runs.<run>.<key> is renamed to defaults.<key> (given to runs.<run>) only for a key the
    run took from defaults, and only for that whole key: runs.a.lr inherited does not rename runs.a.lr_x, nor
    runs.ab.lr, and one occurrence is renamed."""
    from lipflow.config.runs import named_where_written

    inherited = {"a": {"lr"}}
    assert named_where_written("config error: runs.a.lr: bad", inherited) == \
        "config error: defaults.lr (given to runs.a): bad"
    for message in ("config error: runs.a.lr_x: bad", "config error: runs.ab.lr: bad", "config error: runs.a.lrs",
                    "config error: runs.a.steps: bad"):
        assert named_where_written(message, inherited) == message
    assert named_where_written("runs.a.lr.x and runs.a.lr", inherited) == "defaults.lr (given to runs.a).x and runs.a.lr"
    assert named_where_written("runs.1.True: bad", {1: {True}}) == "defaults.True (given to runs.1): bad"


def test_int_as_float_turns_only_ints_a_float_holds_into_floats():
    """int_as_float: an int (not a bool) a float holds becomes that float; a bool, a float, a string, None and an
    int beyond float range (10**400: float() raises OverflowError) come back as they are."""
    from lipflow.config.runs import int_as_float

    for value, expected in ((3, 3.0), (-2, -2.0), (0, 0.0), (2 ** 999, float(2 ** 999))):
        got = int_as_float(value)
        assert type(got) is float and got == expected
    for value in (True, False, 2.5, "3", None, 10 ** 400, -(10 ** 400), 2 ** 1000):
        assert int_as_float(value) is value


def test_check_run_id_takes_exactly_a_name_and_eight_hex_digits():
    """A run id is the whole of <name>-<8 hex digits>: a trailing character, a ninth digit, a path or a
    capital hex digit is refused in one line naming the place."""
    from lipflow.config import ConfigError
    from lipflow.config.runs import check_run_id, run_id

    made = run_id("tiny.a", {"lr": 0.1}, {"corpus": {}})
    assert re.fullmatch(r"tiny\.a-[0-9a-f]{8}", made) and check_run_id(made, "x") == made
    for text in (made + "x", made + "0", made + "/..", "a-1234567", "a-1234ABCD", "../a-12345678", "a-12345678\n"):
        with pytest.raises(ConfigError, match=r"^where: .* is not a run id"):
            check_run_id(text, "where")


@pytest.mark.parametrize("model", ["lipschitz_gpt", "lipschitz_gpt_unscaled"])
def test_check_run_refuses_every_odd_head_width_of_a_lipschitz_model_and_no_even_one(model):
    """RoPE rotates pairs: each odd d_model / n_heads (1, 3, 5, 7, …) is refused for a Lipschitz model, each even
    one taken; the baseline gpt takes both."""
    from lipflow.config import ConfigError, run_defaults
    from lipflow.config.runs import check_run

    for d_head in range(1, 13):
        cfg = run_defaults(model=model, d_model=4 * d_head, n_heads=4)
        if d_head % 2:
            with pytest.raises(ConfigError, match=rf"needs an even head width .* d_model {4 * d_head} / n_heads 4 is odd"):
                check_run("runs.a", cfg)
        else:
            check_run("runs.a", cfg)
        check_run("runs.a", run_defaults(model="gpt", d_model=4 * d_head, n_heads=4))


def test_a_fixed_newton_schulz_schedule_takes_exactly_its_step_count():
    """ns_coefficients 'you' is a schedule of exactly 6 steps (FIXED_NS_STEPS): 5 and 7 are refused, each naming
    the count; a schedule without a fixed count takes any ns_steps."""
    from lipflow.config import ConfigError, run_defaults
    from lipflow.config.runs import FIXED_NS_STEPS, check_newton_schulz_steps

    assert FIXED_NS_STEPS == {"you": 6}
    for steps in (1, 5, 7, 12):
        with pytest.raises(ConfigError, match=rf"^config error: w\.ns_steps: ns_coefficients 'you' has exactly 6 "
                                              rf"steps, got {steps}$"):
            check_newton_schulz_steps("w", run_defaults(ns_coefficients="you", ns_steps=steps))
    check_newton_schulz_steps("w", run_defaults(ns_coefficients="you", ns_steps=6))
    for steps in (1, 5, 7):
        check_newton_schulz_steps("w", run_defaults(ns_steps=steps))


def test_whole_floats_become_ints_only_below_two_to_the_53():
    """canonical_evaluation writes a whole float as its int where every int of that size is a float too
    (|x| < 2**53: 3.0 → 3); above, where floats are all whole, it keeps the float (tol 1e20 stays 1e+20 in the
    params string, not a 21-digit integer), in lists too."""
    from lipflow.config import evaluation_params

    small = evaluation_params("sharpness", tol=3.0)["tol"]
    assert type(small) is int and small == 3
    below = evaluation_params("sharpness", tol=2.0 ** 53 - 1)["tol"]
    assert type(below) is int and below == 2 ** 53 - 1
    for big in (2.0 ** 53, 1e20, 1e300):
        kept = evaluation_params("sharpness", tol=big)["tol"]
        assert type(kept) is float and kept == big
    rtols = evaluation_params("rank", rtols=[1e20, 2.0, 0.5])["rtols"]
    assert rtols == [1e20, 2, 0.5] and [type(r) for r in rtols] == [float, int, float]


def test_sharpness_params_take_as_many_lanczos_eigenvalues_as_steps_and_no_single_hutchinson_sample():
    """Lanczos returns at most as many eigenvalues as it takes steps: lanczos_k = lanczos_iters is taken, one
    more refused; Hutchinson's spread needs two samples: 1 is refused, 0 (off) and 2 taken."""
    from lipflow.config import ConfigError, evaluation_params

    for k in (0, 1, 3, 4):
        assert evaluation_params("sharpness", lanczos_k=k, lanczos_iters=4)["lanczos_k"] == k
    with pytest.raises(ConfigError, match=r"lanczos_k: 5 eigenvalues need at least as many Lanczos steps, "
                                          r"lanczos_iters is 4$"):
        evaluation_params("sharpness", lanczos_k=5, lanczos_iters=4)
    for samples in (0, 2, 3):
        assert evaluation_params("sharpness", hutchinson_samples=samples)["hutchinson_samples"] == samples
    with pytest.raises(ConfigError, match="hutchinson_samples: 1 sample gives no standard error"):
        evaluation_params("sharpness", hutchinson_samples=1)


def test_the_image_mlp_radii_in_any_order_are_one_params_string():
    """Each radius's PGD restarts are seeded by the radius, so the order of image_mlp.epsilons changes nothing
    computed: [0.5, 0, 2] and [0, 0.5, 2] are one params string, the radii sorted ascending as floats."""
    import json

    from lipflow.plan import Plan

    def block_json(epsilons):
        return Plan.from_config({"image_mlp": {"epsilons": epsilons}}).config_block_json("image_mlp")

    assert block_json([0.5, 0, 2]) == block_json([0, 0.5, 2.0]) == block_json([2, 0.5, 0.0])
    assert json.loads(block_json([2, 0.5, 0]))["epsilons"] == [0.0, 0.5, 2.0]


def test_a_run_written_without_settings_takes_the_defaults():
    """`runs: {a: }` (YAML's null: a run of the defaults alone) inherits every key of `defaults` as `a: {}`
    does, with one run id."""
    from lipflow.config import check_config
    from lipflow.config.runs import merge_run_defaults

    config = {"defaults": {"lr": 0.5, "steps": 7}, "runs": {"a": None, "b": {"steps": 3}}}
    assert merge_run_defaults(config) == {"a": {"lr", "steps"}, "b": {"lr"}}
    assert config["runs"] == {"a": {"lr": 0.5, "steps": 7}, "b": {"lr": 0.5, "steps": 3}}
    as_null, as_empty = {"defaults": {"lr": 0.5}, "runs": {"a": None}}, {"defaults": {"lr": 0.5}, "runs": {"a": {}}}
    check_config(as_null), check_config(as_empty)
    assert as_null["runs"] == as_empty["runs"] and as_null["runs"]["a"]["lr"] == 0.5
