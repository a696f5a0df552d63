"""Mutation-testing round 5: properties of the launcher (lipflow.distributed), the stop watch
(lipflow.train.stop), the ``lipflow`` command (lipflow.cli), the schema validator
(lipflow.config.schema) and the results stage's input checks (lipflow.results.inputs) that the rest of
the suite did not pin down: each test here fails for a plausible wrong version of the code."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from lipflow import distributed
from test_distributed_launch import alive
from test_cli import results_tree  # noqa: F401  (a fixture)
from test_distributed_mutants import launcher_process


# --- lipflow.distributed ------------------------------------------------------------------------------

def test_a_worker_takes_the_gpu_of_its_local_rank_not_of_its_global_rank(monkeypatch):
    """Under torchrun over several machines RANK and LOCAL_RANK differ: worker 3 of 4, the second on
    its machine, uses cuda:1 (its machine has no cuda:3) and records both ranks."""
    import torch.distributed as dist

    devices = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: devices.append(str(device)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: None)
    monkeypatch.setattr(dist, "new_group", lambda **kw: object())
    topo, device = distributed.init_from_env(torch.device("cuda"))
    assert str(device) == "cuda:1" and devices == ["cuda:1"]
    assert (topo.rank, topo.world, topo.local_rank, topo.is_main) == (3, 4, 1, False)


def test_exit_code_counts_every_signal_as_128_plus_n():
    """Every signal N is reported as 128 + N, SIGHUP (N = 1, a closed terminal or ssh session) too:
    a worker it killed must not make the launcher exit with -1 (255 in the shell)."""
    assert [distributed.exit_code(-int(s)) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGABRT)] == [129, 130, 134]


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_repeated_stop_signals_do_not_postpone_the_sigkill_deadline(tmp_path):
    """The SIGKILL deadline starts at the first stop signal passed on: SIGTERM sent again and again to the
    launcher (an impatient user's ``kill``, a scheduler repeating it) does not keep postponing the SIGKILL
    of a worker stuck in a collective, so the launcher still returns (137)."""
    specs = [{"sleep": 120, "on_term": "ignore"}, {"sleep": 120, "on_term": "ignore"}]
    # the driver's own SIGTERM handler (which the launcher puts back) ignores the signals sent once it returned
    with launcher_process(tmp_path, specs, kill_after_s=0.5,
                          driver_setup="signal.signal(signal.SIGTERM, lambda *a: None)") as (driver, _, pids):
        give_up = time.monotonic() + 30  # 60 times KILL_AFTER_S: only a postponed deadline lasts this long
        while any(alive(pid) for pid in pids) and time.monotonic() < give_up:
            driver.send_signal(signal.SIGTERM)  # more often than KILL_AFTER_S, again and again
            time.sleep(0.1)
        assert not any(alive(pid) for pid in pids), "the stuck workers were never killed"
        code = driver.wait(timeout=30)
    assert code == 128 + signal.SIGKILL, code


# --- lipflow.train.stop -------------------------------------------------------------------------------

def test_the_first_stop_signal_decides_the_exit_code():
    """A Ctrl-C (SIGINT) followed by a SIGTERM (the scheduler's, while the step in flight finishes)
    stops the run as interrupted: exit 130 and SIGINT named, the signal that stopped it, not the later one."""
    from lipflow.train.stop import SigtermWatch

    with SigtermWatch(distributed.Topology()) as watch:
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next statement
        os.kill(os.getpid(), signal.SIGTERM)
        stop = watch.stop(5)
    assert stop.exit_code == 128 + signal.SIGINT and "SIGINT at step 5" in str(stop)


# --- lipflow.cli --------------------------------------------------------------------------------------

def sample_in_process(results: Path, run_id: str, *args: str) -> int:
    """``lipflow sample RUN_ID --results RESULTS --prompt The --device cpu ARGS`` in this process."""
    from lipflow import cli

    return cli.main(["sample", run_id, "--results", str(results), "--prompt", "The", "--device", "cpu", *args])


def test_sample_at_temperature_zero_draws_the_greedy_tokens(results_tree, capsys):  # noqa: F811
    """``--temperature 0`` is allowed (>= 0) and is greedy decoding (the sampler takes it as 1e-6): the
    command prints the prompt followed by the most likely token at each step."""
    from lipflow.api import load_run
    from lipflow.data.loader import load_tokenizer

    results, run_id = results_tree
    assert sample_in_process(results, run_id, "--tokens", "6", "--temperature", "0") == 0
    run = load_run(run_id, results=results, device="cpu")
    tokenizer = load_tokenizer(run.data_dir)
    idx = torch.tensor([tokenizer.encode("The").ids])
    with torch.no_grad():
        for _ in range(6):
            idx = torch.cat([idx, run.model(idx[:, -run.model.context:])[:, -1, :].argmax(-1, keepdim=True)], dim=1)
    assert capsys.readouterr().out == tokenizer.decode(idx[0].tolist(), skip_special_tokens=False) + "\n"


def test_sample_refuses_zero_tokens(results_tree, capsys):  # noqa: F811
    """``--tokens 0`` is one error line and exit 2 (at least one token is drawn), not the bare prompt."""
    results, run_id = results_tree
    assert sample_in_process(results, run_id, "--tokens", "0") == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--tokens must be between 1 and 281,474,976,710,656 (2^48), got 0" in captured.err
    assert sample_in_process(results, run_id, "--tokens", str(10**20)) == 2  # islice's OverflowError, --tokens unnamed
    captured = capsys.readouterr()
    assert captured.out == "" and f"--tokens must be between 1 and 281,474,976,710,656 (2^48), got {10**20}" in captured.err


def test_sample_whose_probabilities_overflow_is_one_line(results_tree, capsys):  # noqa: F811
    """Finite weights so large that the logits overflow (softmax of ±inf is NaN) make torch.multinomial
    fail; the command turns that into one line advising a lower --temperature, not a traceback."""
    from safetensors.torch import load_file

    from lipflow.train.checkpoint import save_weights

    results, run_id = results_tree
    run_dir = results / "runs" / run_id
    weights = {name: w * 1e30 if w.is_floating_point() else w
               for name, w in load_file(run_dir / "model.safetensors").items()}
    info = json.loads((run_dir / "config.json").read_text())
    save_weights(run_dir / "model.safetensors", weights, {"config": info["config"], "vocab_size": info["vocab_size"]})
    assert sample_in_process(results, run_id, "--tokens", "3") == 2
    err = capsys.readouterr().err
    assert f"run {run_id}'s next-token probabilities are not finite for this prompt" in err, err


def test_query_table_counts_its_rows_in_words():
    """The table ends with its row count: "(0 rows)", "(1 row)", "(2 rows)"."""
    from lipflow.cli import format_rows

    assert [format_rows(["x"], [(1,)] * n, "table").splitlines()[-1] for n in (0, 1, 2)] == \
        ["(0 rows)", "(1 row)", "(2 rows)"]


def test_query_table_columns_are_as_wide_as_their_header():
    """A column's width is that of its widest cell or header, so a header longer than every value
    still lines up with its separator and values (NULL shown as NULL, floats to 6 digits)."""
    from lipflow.cli import format_rows

    text = format_rows(["run_id", "val_loss", "n"], [("a", 1.23456789, None), ("bb", float("nan"), 7)], "table")
    assert text.splitlines() == ["run_id | val_loss | n   ",
                                 "-------+----------+-----",
                                 "a      | 1.23457  | NULL",
                                 "bb     | nan      | 7   ",
                                 "(2 rows)"]


def test_query_that_would_write_names_the_database_read_only(tmp_path, capsys):
    """A SELECT that would change the database (``nextval`` advances a sequence) is one line saying the
    results database is read-only for queries, with DuckDB's own words after it."""
    import duckdb

    from lipflow import cli

    db = tmp_path / "seq.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("CREATE SEQUENCE s")
    assert cli.main(["query", "SELECT nextval('s')", "--db", str(db)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "the results database is read-only for queries (" in captured.err, captured.err


def test_emit_flushes_each_piece_at_once(monkeypatch):
    """``emit`` hands its text to the reader at once (``lipflow sample`` shows each token as it is drawn,
    also through a pipe, where Python's stdout would hold it in its buffer until the end)."""
    from lipflow import cli

    class Stream:
        def __init__(self):
            self.buffered, self.flushed = "", ""

        def write(self, text):
            self.buffered += text
            return len(text)

        def flush(self):
            self.flushed, self.buffered = self.flushed + self.buffered, ""

    stream = Stream()
    monkeypatch.setattr(sys, "stdout", stream)
    cli.emit("The", end="")
    assert stream.flushed == "The"
    cli.emit(" end")
    assert stream.flushed == "The end\n"


# --- lipflow.config.schema ----------------------------------------------------------------------------

def test_the_cache_of_passed_values_tells_true_from_1_and_1_from_1_0():
    """The validator's cache of passed scalar values is keyed by the value's type too: True == 1 == 1.0
    in Python, but after ``depth_mup: true`` passed, ``depth_mup: 1`` is still not a boolean, and after
    ``n_layers: 1`` passed, neither ``true`` nor ``1.0`` is an integer."""
    from lipflow.config.schema import first_error, make_validator

    validator = make_validator(definition="run")
    assert first_error(validator, {"depth_mup": True, "n_layers": 1}) is None
    assert "depth_mup: 1 is not of type 'boolean'" in first_error(validator, {"depth_mup": 1})
    assert "n_layers: True is not of type 'integer'" in first_error(validator, {"n_layers": True})
    assert "n_layers: 1.0 is not of type 'integer'" in first_error(validator, {"n_layers": 1.0})


def test_an_unknown_top_level_key_is_named_without_a_leading_dot():
    """A typo at the config's top level is named as the user wrote it: unknown key 'evaluation', not
    '.evaluation' (keys below the top level are named by their dotted path)."""
    from lipflow.config import ConfigError, check_config

    with pytest.raises(ConfigError) as err:
        check_config({"evaluation": {}})
    assert "unknown key 'evaluation' (did you mean 'evaluations'?)" in str(err.value), str(err.value)


def test_a_violation_of_the_whole_instance_names_the_top_level():
    """An error about the instance itself (no key path, no prefix) says where it is: "<top level>: …",
    not a line that starts with a bare colon."""
    from lipflow.config.schema import first_error, make_validator

    assert first_error(make_validator(definition="run"), []) == "<top level>: [] is not of type 'object'"


def test_of_several_violations_the_one_nearest_the_top_level_is_reported():
    """Of several violations, the most relevant (jsonschema's best_match: the shallowest) is the one
    line: a wrong ``tokenizer.kind`` is reported before a wrong element deep in ``corpus.paths``,
    though the schema lists corpus first."""
    from lipflow.config import ConfigError, check_config

    with pytest.raises(ConfigError) as err:
        check_config({"corpus": {"paths": [1]}, "tokenizer": {"kind": "word"}})
    assert "tokenizer.kind: 'word' is not one of char, bpe, file" in str(err.value), str(err.value)


def test_a_filled_default_is_a_copy_of_the_schemas():
    """Each filled ``default`` is the instance's own copy: changing one run's filled ``lmo_radius`` changes
    neither another run's nor the default the (cached) validator fills next time."""
    from lipflow.config.schema import first_error, make_validator

    validator = make_validator(fill=True, definition="run")
    first, second = {}, {}
    assert first_error(validator, first) is None and first["lmo_radius"] == {}
    first["lmo_radius"]["hidden"] = 3.0
    assert first_error(validator, second) is None and second["lmo_radius"] == {}


def test_a_validator_that_does_not_fill_leaves_the_instance_as_it_was():
    """Without ``fill`` the validator only checks: a run config read back from config.json is compared
    as the run wrote it, with no schema default added (``checked_config`` returns it unchanged)."""
    from lipflow.config.schema import first_error, make_validator
    from lipflow.results.inputs import checked_config

    cfg = {"lr": 0.5}
    assert first_error(make_validator(definition="run"), cfg) is None and cfg == {"lr": 0.5}
    assert checked_config(Path("runs/x/config.json"), {"config": {"lr": 0.5}}) == {"lr": 0.5}


def test_a_non_text_value_where_a_pattern_applies_is_a_type_error_not_a_crash():
    """``pattern`` constrains strings only (JSON Schema): a number given as a name, or a run named by a
    number (a YAML key ``1:``), is the one line "… is not of type 'string'", not a TypeError traceback
    from matching a regular expression against an int."""
    from lipflow.config import ConfigError, check_config

    for config, expected in [({"corpus": {"name": 5}}, "corpus.name: 5 is not of type 'string'"),
                             ({"runs": {1: {}}}, "runs: 1 is not of type 'string'")]:
        with pytest.raises(ConfigError) as err:
            check_config(config)
        assert expected in str(err.value), str(err.value)


def test_a_boolean_is_not_an_integer():
    """``n_layers: true`` is refused as not an integer (Python counts a bool as an int; the schema does not)."""
    from lipflow.config.schema import first_error, make_validator

    assert first_error(make_validator(definition="run"), {"n_layers": True}) == \
        "n_layers: True is not of type 'integer'"


# --- lipflow.results.inputs ---------------------------------------------------------------------------

def test_a_whole_number_must_fit_64_bits_exactly():
    """A run.json integer is at most 2**63 - 1 and at least -2**63 (DuckDB's BIGINT); 2**63 is refused
    naming the file and key."""
    from lipflow.results.inputs import JSON_FORMS, check_value

    path = Path("runs/x/run.json")
    assert [check_value(path, "steps", v, JSON_FORMS["int64"]) for v in (2**63 - 1, -2**63)] == [2**63 - 1, -2**63]
    with pytest.raises(ValueError, match=r"runs/x/run.json: steps is 9223372036854775808, beyond a 64-bit integer"):
        check_value(path, "steps", 2**63, JSON_FORMS["int64"])


def run_summary(**values) -> dict:
    """A run.json as the trainer writes it: every field, most of them null."""
    from lipflow.results import SUMMARY_COLUMNS

    return {**{key: None for key in SUMMARY_COLUMNS}, "run_id": "x-00000000", "status": "completed", "versions": {},
            **values}


def test_versions_are_one_text_whatever_the_order_of_their_keys():
    """run.json's ``versions`` object is kept as JSON text with sorted keys, so two runs with the same
    versions written in another order hold the same text (GROUP BY versions, = comparisons)."""
    from lipflow.results.inputs import summary_values

    path = Path("runs/x-00000000/run.json")
    texts = {summary_values(path, run_summary(versions=versions))["versions"]
             for versions in ({"torch": "2.5", "duckdb": "1.1"}, {"duckdb": "1.1", "torch": "2.5"})}
    assert texts == {'{"duckdb": "1.1", "torch": "2.5"}'}


def test_an_evaluation_whose_values_are_all_null_is_an_evaluation_table():
    """A ``value`` column of nulls only (Arrow's null type: every value of the evaluation was missing)
    is still numbers as far as the views go: the table is accepted, not refused as 'not numbers'."""
    import pyarrow as pa

    from lipflow.results.inputs import check_evaluation_table

    table = pa.table({"run_id": ["x-00000000"], "eval": ["rank"], "metric": ["stable_rank"], "value": pa.nulls(1)})
    assert table.schema.field("value").type == pa.null()
    check_evaluation_table(Path("evals.parquet"), table)  # no error
    with pytest.raises(ValueError, match="its column 'value' is string, not numbers"):
        check_evaluation_table(Path("evals.parquet"), table.set_column(3, "value", pa.array(["1.0"])))


def test_a_run_directory_is_named_however_its_path_is_spelled(tmp_path, monkeypatch):
    """``.`` (a stage run inside the run directory), a trailing slash or ``..`` name the directory they
    lead to, so a run.json read there is checked against its directory's real name."""
    from lipflow.results.inputs import check_names_its_run, directory_name

    run_dir = tmp_path / "runs" / "x-00000000"
    (run_dir / "sub").mkdir(parents=True)
    monkeypatch.chdir(run_dir)
    assert [directory_name(Path(p)) for p in (".", "sub/..", f"{run_dir}/")] == ["x-00000000"] * 3
    check_names_its_run(Path("run.json"), "x-00000000")  # no error
    with pytest.raises(ValueError, match="run_id is 'y-00000000', but its run directory is 'x-00000000'"):
        check_names_its_run(Path("run.json"), "y-00000000")


def test_a_time_of_zero_is_no_time():
    """run.json's times are Unix seconds; 0 (like null) is no time and becomes NULL, not 1970-01-01
    (which no run trained at), while any other second is that UTC time."""
    import datetime as dt

    from lipflow.results.inputs import summary_values

    values = summary_values(Path("runs/x-00000000/run.json"), run_summary(start_time=0, end_time=86400.5))
    assert values["start_time"] is None and values["end_time"] == dt.datetime(1970, 1, 2, 0, 0, 0, 500000)


def test_files_are_merged_by_column_name_with_the_widest_number_type():
    """Tables merged into one take every column of any file (null where a file lacks it) and a number
    column written as int32 in one file and int64 or float64 in another takes the widest type."""
    import pyarrow as pa

    from lipflow.results.inputs import concat_files

    named = [(Path("a.parquet"), pa.table({"run_id": ["a"], "value": pa.array([1], pa.int32())})),
             (Path("b.parquet"), pa.table({"run_id": ["b"], "value": pa.array([2.5], pa.float64()),
                                           "seed": pa.array([7], pa.int64())}))]
    merged = concat_files(named, "evaluation files")
    assert merged.schema.field("value").type == pa.float64() and merged.column_names == ["run_id", "value", "seed"]
    assert merged.to_pylist() == [{"run_id": "a", "value": 1.0, "seed": None}, {"run_id": "b", "value": 2.5, "seed": 7}]
