"""The runs block's training-curve figure (lipflow/results/training_curves.py): it draws what the
database holds for the runs of `runs` and nothing else, and its command refuses what it must."""

import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from lipflow.results import training_curves
from lipflow.results.figures import main as plots_main
from lipflow.results.plotting import is_lipflow_figure, pyplot

PANEL = {column: i for i, (column, *_) in enumerate(training_curves.PANELS)}


def metric_rows(run_id: str, steps: int, eval_every: int, bound: float | None, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(1, steps + 1):
        at_eval = step % eval_every == 0
        rows.append({"run_id": run_id, "step": step, "loss": float(3 - step / steps + rng.normal(0, 0.1)),
                     "grad_norm": float(rng.uniform(0.5, 2)),
                     "val_loss": float(3 - step / steps) if at_eval else None,
                     "val_accuracy": step / (2 * steps) if at_eval else None,
                     "lipschitz_bound": bound * step if at_eval and bound is not None else None,
                     "max_activation": float(10 + step) if at_eval else None})
    return rows


def write_database(path: Path, runs: list[dict], metrics: list[dict]) -> Path:
    con = duckdb.connect(str(path))
    for name, rows in (("runs", runs), ("train_metrics", metrics)):
        con.register("rows", pa.Table.from_pylist(rows))
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM rows")
        con.unregister("rows")
    con.close()
    return path


def run_row(run_id: str, experiment: str | None = None, model: str = "gpt", constraint: str = "none",
            diverged_step: int | None = None) -> dict:
    return {"run_id": run_id, "name": run_id.rsplit("-", 1)[0], "experiment": experiment, "model": model,
            "optimizer": "adamw" if model == "gpt" else "muon", "weight_constraint": constraint,
            "status": "completed" if diverged_step is None else "diverged", "diverged_step": diverged_step}


@pytest.fixture
def results_db(tmp_path) -> Path:
    """Two runs of `runs` (one with a certificate, one whose last loss is non-finite) and an experiment run."""
    metrics = metric_rows("baseline-00000001", 100, 25, None, 0) + metric_rows("lipschitz-00000002", 100, 25, 2.0, 1)
    metrics += metric_rows("lrt.w16-00000003", 100, 25, 5.0, 2)
    metrics[99]["loss"] = math.inf
    metrics[50]["grad_norm"] = 0.0  # off a log axis
    metrics[60]["grad_norm"] = 1e-3
    runs = [run_row("baseline-00000001", diverged_step=100), run_row("lipschitz-00000002", model="lipschitz_gpt",
                                                                     constraint="spectral_soft_cap"),
            run_row("lrt.w16-00000003", experiment="lr_transfer")]
    return write_database(tmp_path / "results.duckdb", runs, metrics)


def test_each_panel_draws_the_databases_values_of_the_runs_of_runs_only(results_db):
    con = duckdb.connect(str(results_db), read_only=True)
    rows = con.execute("SELECT run_id, step, loss, grad_norm, val_loss, lipschitz_bound FROM train_metrics "
                       "ORDER BY run_id, step").df()
    fig = training_curves.draw(con)
    axes = fig.axes[:len(training_curves.PANELS)]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "baseline (gpt, adamw): diverged at step 100", "lipschitz (lipschitz_gpt, muon, spectral_soft_cap)"]
    accuracy = axes[PANEL["val_accuracy"]].lines[0].get_ydata()  # drawn in %
    np.testing.assert_allclose(accuracy, [100 * s / 200 for s in (25, 50, 75, 100)])
    assert axes[PANEL["val_loss"]].get_ylabel() == "nats/token"

    val = [line.get_ydata() for line in axes[PANEL["val_loss"]].lines]
    assert len(val) == 2  # the experiment run is not drawn
    for drawn, run_id in zip(val, ("baseline-00000001", "lipschitz-00000002")):
        np.testing.assert_array_equal(drawn, rows[rows.run_id == run_id].val_loss.dropna().to_numpy())
    bound = axes[PANEL["lipschitz_bound"]].lines
    assert len(bound) == 1 and list(bound[0].get_xdata()) == [25, 50, 75, 100]  # gpt has no certificate
    assert axes[PANEL["lipschitz_bound"]].get_yscale() == "linear"  # 50…200: within a decade
    assert axes[PANEL["grad_norm"]].get_yscale() == "log"  # 0.5…2 and one 1e-3: more than a decade

    raw, mean = axes[PANEL["loss"]].lines[:2]  # the baseline's: its last loss is inf, left out
    loss = rows[rows.run_id == "baseline-00000001"].loss.to_numpy()[:99]
    np.testing.assert_array_equal(raw.get_ydata(), loss)
    window = training_curves.smoothing_window(99)
    assert window == 1 and training_curves.smoothing_window(1000) == 20
    np.testing.assert_allclose(mean.get_ydata(), loss)  # a window of 1 is the loss itself
    grad = axes[PANEL["grad_norm"]].lines[0]
    assert len(grad.get_xdata()) == 99 and 51 not in list(grad.get_xdata())  # 0 is off a log axis
    pyplot().close(fig)


def test_a_loss_that_grew_by_decades_gets_a_log_axis(tmp_path):
    """A run whose loss blew up to 3e7 without overflowing (lr 1000, status completed) flattened the
    other runs' losses to a line at 0 on a linear axis."""
    metrics = metric_rows("fine-00000001", 100, 25, None, 0) + metric_rows("blown-00000002", 100, 25, None, 1)
    for row in metrics[100:]:
        row["loss"] *= 1e7
        row["val_loss"] = row["val_loss"] * 1e7 if row["val_loss"] is not None else None
    con = duckdb.connect(str(write_database(tmp_path / "r.duckdb", [run_row("fine-00000001"), run_row("blown-00000002")],
                                            metrics)))
    fig = training_curves.draw(con)
    assert fig.axes[PANEL["loss"]].get_yscale() == fig.axes[PANEL["val_loss"]].get_yscale() == "log"
    assert fig.axes[PANEL["val_accuracy"]].get_yscale() == "linear"
    pyplot().close(fig)
    con = duckdb.connect(str(write_database(tmp_path / "f.duckdb", [run_row("fine-00000001")], metrics[:100])))
    fig = training_curves.draw(con)
    assert fig.axes[PANEL["loss"]].get_yscale() == "linear"  # 2…3.3: within a decade
    pyplot().close(fig)


@pytest.mark.parametrize("steps", [1, 3])
def test_the_step_axis_ticks_whole_steps_only(tmp_path, steps):
    """A run of 1 step (steps: 1) put every panel's step axis at 0.945 … 1.055 with ticks 0.96, 0.98 … 1.04,
    and a run of 3 steps ticked 1.25, 1.5 …: fractional steps. Every tick in view is now a whole step, with
    a tick at each step of so short a run."""
    db = write_database(tmp_path / "r.duckdb", [run_row("short-00000001")], metric_rows("short-00000001", steps, 1, 2.0, 0))
    fig = training_curves.draw(duckdb.connect(str(db)))
    fig.canvas.draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert all(float(t).is_integer() for t in ticks) and set(range(1, steps + 1)) <= set(ticks), ticks
    pyplot().close(fig)


def test_two_runs_of_one_name_are_two_lines_labelled_by_run_id(tmp_path):
    """A database built by hand from every run folder holds an earlier config's run of a name too: the two
    runs were one line with one label, the 20-step run's points interleaved with the 100-step run's."""
    metrics = metric_rows("baseline-00000001", 100, 25, None, 0)
    metrics += metric_rows("baseline-00000002", 20, 10, None, 1)
    db = write_database(tmp_path / "r.duckdb", [run_row("baseline-00000001"), run_row("baseline-00000002")], metrics)
    fig = training_curves.draw(duckdb.connect(str(db), read_only=True))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "baseline-00000001 (gpt, adamw)", "baseline-00000002 (gpt, adamw)"]
    val = fig.axes[PANEL["val_loss"]].lines
    assert [list(line.get_xdata()) for line in val] == [[25, 50, 75, 100], [10, 20]]
    pyplot().close(fig)


def test_the_running_mean_is_the_mean_of_the_last_window_steps(tmp_path):
    metrics = metric_rows("long-00000001", 1000, 100, None, 3)
    con = duckdb.connect(str(write_database(tmp_path / "r.duckdb", [run_row("long-00000001")], metrics)))
    fig = training_curves.draw(con)
    mean = fig.axes[PANEL["loss"]].lines[1].get_ydata()
    loss = np.array([row["loss"] for row in metrics])
    expected = [loss[max(0, i - 19):i + 1].mean() for i in range(len(loss))]
    np.testing.assert_allclose(mean, expected, rtol=1e-12)
    pyplot().close(fig)


def test_the_command_writes_both_formats_and_replaces_only_its_own_figure(results_db, tmp_path, capsys):
    out = tmp_path / "figures"
    args = ["--db", str(results_db), "--out-dir", str(out), "--training-curves"]
    assert plots_main(args) == 0 and plots_main(args) == 0
    paths = [out / f"training_curves.{fmt}" for fmt in ("png", "svg")]
    assert all(is_lipflow_figure(path) for path in paths)
    assert capsys.readouterr().out.split() == [str(path) for path in paths] * 2
    mine = b"my own picture\n"
    paths[1].write_bytes(mine)
    assert plots_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out-dir {paths[1]} exists and is not" in err[0]
    assert paths[1].read_bytes() == mine


def test_the_command_refuses_a_database_without_runs_of_runs_in_one_line(tmp_path, capsys):
    db = write_database(tmp_path / "r.duckdb", [run_row("lrt.a-00000001", experiment="lr_transfer")],
                        metric_rows("lrt.a-00000001", 10, 5, None, 0))
    out = tmp_path / "figures"
    assert plots_main(["--db", str(db), "--out-dir", str(out), "--training-curves"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no training metrics of a run of `runs`" in err[0] and not out.exists()
    con = duckdb.connect(str(tmp_path / "other.duckdb"))
    con.execute("CREATE TABLE runs (run_id VARCHAR)")
    con.close()
    assert plots_main(["--db", str(tmp_path / "other.duckdb"), "--out-dir", str(out), "--training-curves"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no table train_metrics: not a lipflow database" in err[0]
    with pytest.raises(SystemExit) as exit_:
        plots_main(["--db", str(db), "--training-curves", "--experiment", "icl"])
    assert exit_.value.code == 2


def test_an_out_dir_that_is_a_file_is_refused_even_when_nothing_would_be_drawn(results_db, tmp_path, capsys):
    """With no experiment's view filled every experiment is skipped: --out-dir was never looked at and a
    file there passed with exit 0."""
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    for extra in ([], ["--training-curves"]):
        assert plots_main(["--db", str(results_db), "--out-dir", str(mine), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out-dir {mine} exists and is not a folder" in err[0]
    assert mine.read_text() == "mine"


@pytest.mark.parametrize("edit, words", [
    ("ALTER TABLE train_metrics DROP COLUMN step", "table train_metrics has no column step"),
    ("ALTER TABLE train_metrics ALTER loss TYPE VARCHAR", "column train_metrics.loss is VARCHAR, not number"),
    ("ALTER TABLE runs ALTER name TYPE INTEGER USING 1", "column runs.name is INTEGER, not text"),
])
def test_a_database_edited_by_hand_is_named_in_one_line(results_db, tmp_path, capsys, edit, words):
    """A column the figure reads that is missing or of another kind is one line naming the database,
    the table and the column (a BinderException or TypeError traceback before)."""
    con = duckdb.connect(str(results_db))
    con.execute(edit)
    con.close()
    out = tmp_path / "figures"
    assert plots_main(["--db", str(results_db), "--out-dir", str(out), "--training-curves"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--db {results_db}: {words}" in err[0], err
    assert not out.exists()


def test_a_dollar_in_a_run_name_is_drawn_as_text(tmp_path):
    """Matplotlib reads $…$ in a legend label as mathtext (an unbalanced one failed the figure)."""
    row = {**run_row("price$-00000001"), "name": "price$ \\frac{"}
    assert training_curves.run_label(row) == "price\\$ \\frac{ (gpt, adamw)"
    db = write_database(tmp_path / "r.duckdb", [row], metric_rows("price$-00000001", 10, 5, None, 0))
    fig = training_curves.draw(duckdb.connect(str(db), read_only=True))
    fig.savefig(tmp_path / "f.png")
    pyplot().close(fig)


def test_the_receipt_lists_the_files_drawn_and_never_replaces_a_users_file(results_db, tmp_path, capsys):
    """--receipt is written last, naming the files drawn; a file there that is no such receipt is
    refused in one line before anything is drawn."""
    import json

    out, receipt = tmp_path / "figures", tmp_path / "training_curves.drawn"
    args = ["--db", str(results_db), "--out-dir", str(out), "--training-curves", "--receipt", str(receipt)]
    assert plots_main(args) == 0 and plots_main(args) == 0
    assert json.loads(receipt.read_text()) == {"drawn": [str(out / f"training_curves.{fmt}") for fmt in ("png", "svg")]}
    receipt.write_text("my notes")
    capsys.readouterr()
    assert plots_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--receipt {receipt} exists and is not a receipt of lipflow.plots" in err[0], err
    assert receipt.read_text() == "my notes"


def test_a_run_of_one_step_is_marked_in_the_per_step_panels(tmp_path):
    """The train loss and gradient norm are lines without markers: a run of 1 step (one point) drew nothing
    there, while the eval panels showed it."""
    metrics = metric_rows("one-00000001", 1, 1, 2.0, 0) + metric_rows("long-00000002", 50, 10, 2.0, 1)
    path = write_database(tmp_path / "results.duckdb", [run_row("one-00000001"), run_row("long-00000002")], metrics)
    fig = training_curves.draw(duckdb.connect(str(path), read_only=True))
    for ax in (fig.axes[0], fig.axes[3]):  # train loss, gradient norm
        single = [line for line in ax.lines if len(line.get_xdata()) == 1 and line.get_alpha() is None]
        assert single and all(line.get_marker() not in ("None", "", None) for line in single)
    pyplot().close(fig)


def test_a_run_that_diverged_before_its_first_eval_step_is_drawn_with_the_others(tmp_path):
    """A run whose loss was NaN at step 2 (a learning rate far too high) has no eval step, so no val
    accuracy: the accuracy panel's percent rescaling read a column its empty selection no longer had
    (KeyError 'val_accuracy'), and `snakemake` failed on the figure of a sweep that otherwise finished."""
    metrics = metric_rows("early-00000001", 2, 25, None, 0) + metric_rows("long-00000002", 50, 10, 2.0, 1)
    metrics[1]["loss"] = math.nan
    path = write_database(tmp_path / "results.duckdb", [run_row("early-00000001", diverged_step=2),
                                                        run_row("long-00000002")], metrics)
    fig = training_curves.draw(duckdb.connect(str(path), read_only=True))
    assert len(fig.axes[PANEL["val_accuracy"]].lines) == 1  # the run with eval steps only
    assert len(fig.axes[PANEL["loss"]].lines) == 4  # each run's per-step loss and its running mean
    pyplot().close(fig)
