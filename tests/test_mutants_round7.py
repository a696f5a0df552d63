"""Mutation-testing round 7: the figures and plotting helpers, provenance, the registry, the user-facing
errors, and the evaluation and train entry points with what a run is built from: behaviour no earlier
test pinned down (each test names the property it holds)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

import lipflow.launcher
import lipflow.provenance as provenance
import lipflow.train.trainer
from lipflow.errors import (ArgumentParser, ConfigError, StageError, UnknownNameError, check_distinct_paths, count_argument,
                            json_object_argument, run_guarded)
from lipflow.atomic import sidecar_path
from lipflow.evaluation.__main__ import evaluate
from lipflow.results.cli import refuse_to_replace_other_rows
from lipflow.data.parquet import read_table_parquet, write_table_parquet
from lipflow.experiments import CATALOG
from lipflow.registry import Registry, import_package_modules
from lipflow.results.cli import is_evaluation_table, merge_evals
from lipflow.results.cli import main as results_main
from lipflow.results.figures import check_views, draw
from lipflow.results.figures import main as plots_main
from lipflow.results.plotting import colors, is_lipflow_figure, pyplot, read_view
from lipflow.train.__main__ import main as train_main
from lipflow.errors import out_of_memory
from lipflow.train.stop import Preempted
from lipflow.train.build import (NextTokenLoss, check_run_directory, ensure_writable, token_splits, training_loss,
                                 weights_of_run)
from test_cli import results_tree  # noqa: F401  (a fixture)
from test_experiments import filled_database  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ figures


def stub_views(con, views: dict[str, int]) -> None:
    """Views named as lipflow's, each of one column ``x`` holding 1..n (n = 0: empty, with the
    comment create_views records on an empty view)."""
    for name, n in views.items():
        con.execute(f"CREATE VIEW {name} AS SELECT range + 1 AS x FROM range({n})")
        if n == 0:
            con.execute(f"COMMENT ON VIEW {name} IS 'empty: no runs of {name}'")


def test_an_empty_headline_is_the_experiments_reason_even_when_its_other_views_have_rows(tmp_path, capsys):
    """The first view an experiment declares decides whether it is drawn, and the reason quoted is the
    view's comment without its "empty: " prefix: strictly an error, else one "skipped" line."""
    con = duckdb.connect()
    stub_views(con, {"lr_transfer": 0, "lr_transfer_runs": 3})
    with pytest.raises(ValueError, match=r"^experiment lr_transfer: view lr_transfer is empty: no runs of lr_transfer$"):
        draw(con, ["lr_transfer"], tmp_path / "f", None, strict=True)
    assert draw(con, ["lr_transfer"], tmp_path / "f", tmp_path / "t", strict=False) == []
    assert capsys.readouterr().err == "skipped lr_transfer: view lr_transfer is empty: no runs of lr_transfer\n"
    assert not (tmp_path / "f").exists() and not (tmp_path / "t").exists()


def test_every_named_experiment_has_its_views_checked_not_just_the_first():
    """A database lacking a view of the second experiment named is refused naming that view."""
    con = duckdb.connect()
    stub_views(con, {"lr_transfer": 1, "lr_transfer_runs": 1})
    check_views(con, Path("x.duckdb"), ["lr_transfer"])
    with pytest.raises(ValueError, match=r"--db x.duckdb has no view precision \(experiment precision\)"):
        check_views(con, Path("x.duckdb"), ["lr_transfer", "precision"])


def test_plots_write_one_table_per_view_print_every_file_and_close_their_figures(filled_database, tmp_path,  # noqa: F811
                                                                                 capsys):
    """With --tables-dir every view of every experiment is a CSV (not only the headline), stdout
    lists exactly the files written, and no matplotlib figure is left open."""
    plt = pyplot()
    open_before = plt.get_fignums()
    out, tables = tmp_path / "figures", tmp_path / "tables"
    assert plots_main(["--db", str(filled_database), "--out-dir", str(out), "--tables-dir", str(tables)]) == 0
    expected = ({out / f"{figure}.{fmt}" for e in CATALOG.values() for figure in e.figures for fmt in ("png", "svg")}
                | {tables / f"{view}.csv" for e in CATALOG.values() for view in e.views})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(expected) == 14 + 10 and set(map(Path, printed)) == expected
    sidecars = ({tables / f"{view}.csv.sha256" for e in CATALOG.values() for view in e.views}
                | {out / f"{figure}.{fmt}.sha256" for e in CATALOG.values() for figure in e.figures
                   for fmt in ("png", "svg")})
    assert set(out.iterdir()) | set(tables.iterdir()) == expected | sidecars
    assert (tables / "lr_transfer_runs.csv").read_text().count("\n") > 1
    assert plt.get_fignums() == open_before


def test_colors_are_tab10_up_to_four_and_evenly_spaced_viridis_beyond():
    """colors(n): the first n tab10 colours for n <= 4; for n > 4, viridis at 0, 1/(n-1), ..., 1."""
    plt = pyplot()
    tab10, viridis = plt.get_cmap("tab10"), plt.get_cmap("viridis")
    assert colors(1) == [tab10(0)]
    assert colors(4) == [tab10(0), tab10(1), tab10(2), tab10(3)]
    assert colors(5) == [viridis(0.0), viridis(0.25), viridis(0.5), viridis(0.75), viridis(1.0)]


def test_read_view_applies_its_order_clause():
    con = duckdb.connect()
    stub_views(con, {"v": 4})
    assert read_view(con, "v", "ORDER BY x DESC")["x"].tolist() == [4, 3, 2, 1]


def test_a_file_that_is_neither_png_nor_svg_is_no_lipflow_figure(tmp_path):
    """Only a .png or .svg file can carry the mark; the mark's bytes in a .pdf do not make it one."""
    plt = pyplot()
    fig, ax = plt.subplots()
    fig.savefig(tmp_path / "ours.png", format="png", metadata={"Software": "lipflow"})
    plt.close(fig)
    (tmp_path / "ours.pdf").write_bytes((tmp_path / "ours.png").read_bytes())
    assert is_lipflow_figure(tmp_path / "ours.png") and not is_lipflow_figure(tmp_path / "ours.pdf")


# ------------------------------------------------------------------------------------------ merge-evals


def evaluation_file(path: Path, rows: list[tuple[str, str]]) -> Path:
    """An evaluation table (with its checksum) of one row per (run id, evaluation)."""
    write_table_parquet(path, pa.table({"run_id": [r for r, _ in rows], "eval": [e for _, e in rows],
                                        "metric": ["loss"] * len(rows), "value": [1.0] * len(rows)}))
    return path


def test_merge_evals_refuses_one_file_holding_rows_of_two_runs(tmp_path):
    mixed = evaluation_file(tmp_path / "val.parquet", [("a-0000000a", "val"), ("b-0000000b", "val")])
    with pytest.raises(ValueError, match="val.parquet holds rows of run 'b-0000000b', not of --run-id 'a-0000000a'"):
        merge_evals(tmp_path / "evals.parquet", [mixed], "a-0000000a")
    assert not (tmp_path / "evals.parquet").exists()


def test_merge_evals_reruns_over_its_table_whose_sidecar_snakemake_deleted(tmp_path):
    """The merged table is an update() output (kept by Snakemake before a rerun), its sidecar a plain one
    (deleted): the run check of --out read the table through its sidecar, so every rerun of the rule
    (an evaluation added to evaluations.enabled) failed with 'has no checksum file'."""
    out = tmp_path / "evals.parquet"
    val = evaluation_file(tmp_path / "val.parquet", [("a-0000000a", "val")])
    merge_evals(out, [val], "a-0000000a")
    sidecar_path(out).unlink()
    rank = evaluation_file(tmp_path / "rank.parquet", [("a-0000000a", "rank")])
    merge_evals(out, [val, rank], "a-0000000a")
    assert sorted(read_table_parquet(out).column("eval").to_pylist()) == ["rank", "val"]
    with pytest.raises(FileExistsError, match="holds the val rows of run a-0000000a"):
        merge_evals(out, [], "b-0000000b")


def test_a_table_with_only_some_evaluation_columns_is_no_evaluation_table(tmp_path):
    pq.write_table(pa.table({"run_id": ["a-0000000a"], "note": ["mine"]}), tmp_path / "mine.parquet")
    assert not is_evaluation_table(tmp_path / "mine.parquet")
    assert is_evaluation_table(evaluation_file(tmp_path / "val.parquet", [("a-0000000a", "val")]))


def test_the_empty_evaluation_table_has_numeric_values(tmp_path):
    merge_evals(tmp_path / "evals.parquet", [], "a-0000000a")
    assert read_table_parquet(tmp_path / "evals.parquet").schema == pa.schema(
        [("run_id", pa.string()), ("eval", pa.string()), ("metric", pa.string()), ("value", pa.float64())])


def test_seal_needs_a_file(capsys):
    with pytest.raises(SystemExit) as stop:
        results_main(["seal"])
    assert stop.value.code == 2 and "the following arguments are required: files" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ provenance


def test_config_hash_is_the_first_12_hex_digits_of_the_sha256_of_canonical_json():
    """Canonical: keys sorted, no spaces, so the insertion order of a dict does not change it."""
    canonical = b'{"a":[1,2],"b":{"c":"x","d":null}}'
    assert provenance.config_hash({"b": {"d": None, "c": "x"}, "a": [1, 2]}) == hashlib.sha256(canonical).hexdigest()[:12]


def test_git_commit_is_lipflows_checkout_head_whatever_the_working_directory(tmp_path, monkeypatch):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("lipflow does not run from a git checkout here")
    monkeypatch.chdir(tmp_path)
    assert provenance.git_commit() == head.stdout.strip()
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True).returncode != 0:
        assert provenance.git_commit(tmp_path) is None


def test_an_uninstalled_package_has_version_none_and_describe_names_the_host(monkeypatch):
    monkeypatch.setattr(provenance, "PACKAGES", ("pyarrow", "no-such-package-of-lipflow"))
    assert provenance.package_versions() == {"pyarrow": pa.__version__, "no-such-package-of-lipflow": None}
    described = provenance.describe({"a": 1})
    assert described["hostname"] == os.uname().nodename and described["versions"]["no-such-package-of-lipflow"] is None


# ------------------------------------------------------------------------------------------ registry


def test_a_registry_refuses_a_name_twice_lists_names_sorted_and_hints_the_closest():
    models = Registry("model")
    for name in ("zeta", "alpha", "mid"):
        models.register(name)(name.upper())
    with pytest.raises(ValueError, match="model 'mid' is registered twice"):
        models.register("mid")(object())
    assert models.get("mid") == "MID" and models.names() == list(models) == ["alpha", "mid", "zeta"]
    with pytest.raises(UnknownNameError) as err:
        models.get("alpah")
    assert str(err.value) == "unknown model 'alpah' (did you mean 'alpha'?); known: alpha, mid, zeta"


def test_importing_a_packages_modules_skips_its_main(tmp_path, monkeypatch):
    package = tmp_path / "mut7pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "entry.py").write_text("LOADED = True\n")
    (package / "__main__.py").write_text("raise SystemExit('__main__ was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import_package_modules("mut7pkg", [str(package)])
    assert "mut7pkg.entry" in sys.modules and "mut7pkg.__main__" not in sys.modules


# ------------------------------------------------------------------------------------------ errors


def guarded(capsys, error: BaseException) -> tuple[int, str]:
    """(exit code, stderr) of run_guarded over a stage raising ``error``."""
    def stage():
        raise error
    code = run_guarded(stage)
    return code, capsys.readouterr().err


def test_run_guarded_prints_one_unquoted_line_and_exits_2(capsys, monkeypatch):
    """A registry miss is its message as is, a plain KeyError is a bug and keeps its traceback (it read as a
    file's "missing key 'lr'"), success (None) is 0, and LIPFLOW_DEBUG=1 keeps the traceback."""
    monkeypatch.delenv("LIPFLOW_DEBUG", raising=False)
    assert guarded(capsys, UnknownNameError("unknown model 'x'; known: a")) == (
        2, "lipflow: error: unknown model 'x'; known: a\n")
    with pytest.raises(KeyError, match="lr"):
        guarded(capsys, KeyError("lr"))
    assert capsys.readouterr().err == ""
    assert str(UnknownNameError("unknown model 'x'")) == "unknown model 'x'"
    assert run_guarded(lambda: None) == 0 and run_guarded(lambda: None) is not None
    monkeypatch.setenv("LIPFLOW_DEBUG", "1")
    with pytest.raises(ValueError, match="bad"):
        run_guarded(lambda: (_ for _ in ()).throw(ValueError("bad")))


def test_a_bad_option_exits_2_with_one_line(capsys):
    parser = ArgumentParser(prog="python -m lipflow.x")
    parser.add_argument("--n", type=count_argument(1))
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--n", "0"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "lipflow: error: argument --n: '0' is not an integer ≥ 1 (see python -m lipflow.x --help)\n"
    assert parser.parse_args(["--n", "1"]).n == 1


def test_the_same_file_by_another_spelling_is_given_twice(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match=r"files: .*x.parquet is given twice"):
        check_distinct_paths([tmp_path / "x.parquet", tmp_path / "sub" / ".." / "x.parquet"], "files")


@pytest.mark.parametrize("text", ["[1]", "3", '"a"', "null"])
def test_a_json_option_must_hold_an_object(text):
    with pytest.raises(ConfigError, match=r"^--params-json must be a JSON object"):
        json_object_argument(text, "--params-json")


# ------------------------------------------------------------------------------------------ evaluation stage


def unfinished_run(parent: Path, folder: str, run_id: str, diverged_step: int | None) -> Path:
    """A run directory holding only the run.json of a run that diverged at ``diverged_step``."""
    run_dir = parent / folder
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "status": "diverged",
                                                  "diverged_step": diverged_step}))
    return run_dir


def test_an_unfinished_run_is_one_skipped_row_at_its_diverged_step(tmp_path, capsys):
    run_dir = unfinished_run(tmp_path, "a-0000000a", "a-0000000a", 7)
    out = tmp_path / "val.parquet"
    assert evaluate("val", run_dir, tmp_path / "no-data", {}, out) == 0
    rows = pq.read_table(out).to_pylist()
    assert [(r["run_id"], r["eval"], r["metric"], r["value"]) for r in rows] == [("a-0000000a", "val", "skipped", 7.0)]


def test_a_folder_named_as_another_run_is_refused_and_one_named_otherwise_is_not(tmp_path):
    with pytest.raises(ValueError, match="run_id is 'a-0000000a', but its run directory is 'b-0000000b'"):
        evaluate("val", unfinished_run(tmp_path, "b-0000000b", "a-0000000a", 1), tmp_path, {}, tmp_path / "1.parquet")
    assert evaluate("val", unfinished_run(tmp_path, "mine", "a-0000000a", 1), tmp_path, {}, tmp_path / "2.parquet") == 0


def test_an_evaluation_table_of_the_same_run_but_another_evaluation_is_not_replaced(tmp_path):
    out = tmp_path / "evals.parquet"
    pq.write_table(pa.table({"run_id": ["a-0000000a"], "eval": ["rank"], "metric": ["m"], "value": [1.0]}), out)
    refuse_to_replace_other_rows(out, "a-0000000a", "rank")
    with pytest.raises(FileExistsError, match="holds the rank rows of run a-0000000a"):
        refuse_to_replace_other_rows(out, "a-0000000a", "val")


# ------------------------------------------------------------------------------------------ what a run is built of


def test_a_run_directory_may_hold_the_stages_entries_and_temporaries_but_no_run_json_without_config(tmp_path):
    """Without config.json: tensorboard/ and an atomic_write temporary are this run's leftovers; a
    train_metrics.parquet is no run's, and weights of another run id are refused."""
    run_dir = tmp_path / "run"
    (run_dir / "tensorboard").mkdir(parents=True)
    (run_dir / ".model.safetensors.tmp-host-1-x").write_bytes(b"")
    check_run_directory(run_dir, "a-0000000a", {})
    save_file({"w": torch.zeros(1)}, run_dir / "model.safetensors", metadata={"lipflow": json.dumps({"run_id": "b-0000000b"})})
    assert weights_of_run(run_dir / "model.safetensors", "b-0000000b")
    assert not weights_of_run(run_dir / "model.safetensors", "a-0000000a")
    with pytest.raises(FileExistsError, match="holds model.safetensors but no config.json"):
        check_run_directory(run_dir, "a-0000000a", {})
    (run_dir / "model.safetensors").unlink()
    (run_dir / "train_metrics.parquet").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="holds train_metrics.parquet but no config.json"):
        check_run_directory(run_dir, "a-0000000a", {})


def test_a_run_directory_of_the_same_config_under_another_run_id_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"run_id": "b-0000000b", "config": {"lr": 0.1}}))
    check_run_directory(tmp_path, "b-0000000b", {"lr": 0.1})
    with pytest.raises(FileExistsError, match=r"holds another run \(run id 'b-0000000b'\)"):
        check_run_directory(tmp_path, "a-0000000a", {"lr": 0.1})


def test_an_unwritable_results_directory_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="is not writable"):
        ensure_writable(tmp_path / "run")


class HalfPrecisionLogits(torch.nn.Module):
    """Logits in bfloat16, as under autocast: one-hot scores of the input tokens over 3 classes."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x, 3).to(torch.bfloat16) * 1.001


def test_the_training_loss_is_fp32_cross_entropy_and_compiled_when_asked():
    """The loss is computed from the logits cast to fp32 (not in bf16), equal to the closed form
    log(2 + e^s) - s for a correct one-hot score s; ``compile`` wraps it in torch.compile."""
    x = torch.tensor([[0, 1, 2]])
    loss = NextTokenLoss(HalfPrecisionLogits())(x, x)
    s = torch.tensor(1.001, dtype=torch.bfloat16).float()
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, torch.log(2 + torch.exp(s)) - s, rtol=0, atol=1e-6)
    model = HalfPrecisionLogits()
    assert type(training_loss(model, {"compile": False})) is NextTokenLoss
    assert type(training_loss(model, {"compile": True})) is not NextTokenLoss


# ------------------------------------------------------------------------------------------ train stage


def train_stage(monkeypatch, tmp_path: Path, cfg: dict, outcome, processes=None, asked=None) -> int:
    """``python -m lipflow.train`` into tmp_path/run with a Trainer whose run() returns ``outcome``
    (or raises it, an exception), as ``processes`` workers of torchrun say (None: not under torchrun);
    each request to stop with the launcher is appended to ``asked``."""
    asked = [] if asked is None else asked

    class Trainer:
        def __init__(self, *args, **kwargs):
            pass

        def run(self):
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

    monkeypatch.setattr(lipflow.train.trainer, "Trainer", Trainer)
    monkeypatch.setattr(lipflow.launcher, "processes_in_env", lambda: processes)
    monkeypatch.setattr(lipflow.launcher, "terminate_with_launcher", lambda: asked.append("asked"))
    return train_main(["--run-id", "tiny-0000000a", "--config-json", json.dumps(cfg), "--data-dir",
                       str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"), "--no-progress"])


def test_the_train_stage_prints_the_summary_line_and_exits_with_a_stops_code(monkeypatch, tmp_path, tiny_run_config,
                                                                            capsys):
    summary = {"run_id": "tiny-0000000a", "status": "completed", "steps_completed": 12, "final_val_loss": 1.5,
               "lipschitz_bound": 3.0, "wall_seconds": 9.0}
    asked = []
    assert train_stage(monkeypatch, tmp_path, tiny_run_config, summary, asked=asked) == 0
    assert asked == []  # started by no launcher: nothing to stop with
    assert json.loads(capsys.readouterr().out) == {k: v for k, v in summary.items() if k != "wall_seconds"}
    assert train_stage(monkeypatch, tmp_path, tiny_run_config, Preempted("stopped at step 3", 143)) == 143
    assert capsys.readouterr().err == "lipflow: stopped at step 3\n"


def test_a_failed_run_removes_only_the_empty_directory_it_created(monkeypatch, tmp_path, tiny_run_config, capsys):
    assert train_stage(monkeypatch, tmp_path, tiny_run_config, ValueError("bad shards")) == 2
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # the user's, made before the stage ran
    assert train_stage(monkeypatch, tmp_path, tiny_run_config, ValueError("bad shards")) == 2
    assert (tmp_path / "run").is_dir()


def test_a_run_under_torchrun_with_another_process_count_is_refused(monkeypatch, tmp_path, tiny_run_config, capsys):
    asked = []
    assert train_stage(monkeypatch, tmp_path, tiny_run_config, {}, processes=2, asked=asked) == 2
    assert asked == ["asked"]  # a worker asks to stop with its launcher before anything else
    assert capsys.readouterr().err.startswith("lipflow: error: nproc: the run's config says 1 processes, but this "
                                              "stage runs as one of 2")


def test_an_allocator_out_of_memory_message_is_one_line_naming_it():
    memory = out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"))
    assert isinstance(memory, StageError)
    assert str(memory) == ("out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): lower d_model, mlp_ratio, "
                           "n_layers, batch_size or context")
    assert out_of_memory(RuntimeError("shapes do not match")) is None


def test_a_context_longer_than_the_val_split_is_refused_naming_it(char_shards, tiny_run_config):
    """token_splits checks both splits: a context the train split holds but the val split does not
    (val tokens − 1 < context) is a DataError naming the val split, before any training."""
    from lipflow.data import DataError
    from lipflow.data.loader import TokenShards

    val_tokens = TokenShards(char_shards, "val").num_tokens
    assert TokenShards(char_shards, "train").num_tokens > val_tokens + 1
    cfg = {**tiny_run_config, "train_tokens": None}
    token_splits(char_shards, {**cfg, "context": val_tokens - 1})  # the longest context both hold
    with pytest.raises(DataError, match=f"context {val_tokens} is longer than the val split"):
        token_splits(char_shards, {**cfg, "context": val_tokens})


def test_a_null_n_train_is_the_train_tokens_per_context(results_tree):  # noqa: F811
    """The rank bound's ``n_train: null`` is the number of context-long training sequences the train
    split holds: its tokens // context (not // (context + 1), a window's length with its target)."""
    from lipflow.data.loader import TokenShards
    from lipflow.evaluation.__main__ import build_context

    results, run_id = results_tree
    data_dir = results / "data" / "char"
    params = {"n_train": None}
    ctx, info = build_context(results / "runs" / run_id, data_dir, params, torch.device("cpu"))
    tokens, context = TokenShards(data_dir, "train").num_tokens, info["config"]["context"]
    assert tokens // context != tokens // (context + 1)  # the two readings differ here
    assert params["n_train"] == ctx.cfg["n_train"] == tokens // context


def test_an_evaluation_out_in_a_missing_folder_is_refused_before_any_work(tmp_path):
    """--out in a folder that does not exist was found only when the rows were written, after the
    evaluation's minutes; it is refused first, naming --out (before the run is even read)."""
    out = tmp_path / "missing" / "robustness.parquet"
    with pytest.raises(FileNotFoundError, match=r"^--out .*robustness\.parquet: folder .*missing does not exist$"):
        evaluate("robustness", tmp_path / "no-run", tmp_path / "no-data", {}, out, "cpu")


def test_the_evaluations_read_only_the_train_tokens_a_run_trained_on(char_shards, tiny_run_config, tmp_path):
    """A run with ``train_tokens`` trained on the train split's first that many tokens: rank's n_train
    null, its train loss (the generalization gap) and the windows sharpness and B_X read are of those
    tokens, not of the whole split (whose other windows the run never saw)."""
    from lipflow.evaluation.__main__ import build_context
    from test_bad_inputs import real_fake_run

    train_tokens = 5 * tiny_run_config["context"] + 1  # five whole windows
    run_dir = real_fake_run(tmp_path, char_shards, {**tiny_run_config, "train_tokens": train_tokens})
    params = {"n_train": None}
    ctx, _ = build_context(run_dir, char_shards, params, torch.device("cpu"))
    assert params["n_train"] == train_tokens // tiny_run_config["context"] == 5
    assert ctx.first_train_windows(10 ** 6).shape[0] == 5
