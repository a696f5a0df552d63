"""Mutation-testing round 6: properties of the crash-safe writers (lipflow.atomic), the corpus stage
(lipflow.data.corpus) and its Parquet helpers (lipflow.data.parquet), the results database
(lipflow.results.database), the Plan and its rule functions (lipflow.plan, lipflow.plan_rules) and the
training telemetry (lipflow.train.telemetry) that the rest of the suite did not pin down: each test here
fails for a plausible wrong version of the code."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch

from lipflow import atomic, distributed
from lipflow.atomic import (HOST, atomic_dir, atomic_write, is_clutter, is_temporary, read_json, read_verified,
                            refuse_foreign, refuse_to_replace, sidecar_path, write_json_atomic, write_with_sidecar)
from lipflow.data import DataError
from lipflow.data.corpus import CorpusConfig, _paragraph_documents, build_corpus, expand_paths, not_a_corpus
from lipflow.errors import IntegrityError
from lipflow.plan import FrozenDict, Plan, freeze, recorded_block
from lipflow.plan_rules import RuleFunctions, param_count
from lipflow.results import database
from lipflow.train import telemetry
from lipflow.train.telemetry import LayerTelemetry, StepLog, StepResult, TensorBoardMirror
from test_database import build_here, results  # noqa: F401  (results: a fixture)


def recorded_fsyncs(monkeypatch) -> list[int]:
    """The inode of each file or folder ``os.fsync`` is called on from now on (each call still syncs)."""
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return synced


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- lipflow.atomic ------------------------------------------------------------------------------------

def test_a_second_sealed_write_replaces_the_first_and_its_checksum(tmp_path):
    """Writing a sealed file again replaces its own earlier 65-byte sidecar (64 hex digits and a
    newline): the sidecar holds the new bytes' sha256 and reading gives the new bytes."""
    path = tmp_path / "t.bin"
    write_with_sidecar(path, b"first")
    write_with_sidecar(path, b"second")
    assert sidecar_path(path).read_bytes() == hashlib.sha256(b"second").hexdigest().encode() + b"\n"
    assert read_verified(path) == b"second"


def test_a_byte_changed_after_sealing_is_an_integrity_error(tmp_path):
    """read_verified compares the bytes with the sidecar: one flipped byte is an IntegrityError."""
    path = tmp_path / "t.bin"
    write_with_sidecar(path, b"abcdef")
    path.write_bytes(b"abcdeg")
    with pytest.raises(IntegrityError, match="corrupt"):
        read_verified(path)


def test_a_user_file_in_the_sidecars_place_stops_the_write_before_anything_is_written(tmp_path):
    """A user's file named like the sidecar is refused before the data file is written: neither is touched."""
    path = tmp_path / "t.bin"
    sidecar_path(path).write_text("my notes\n")
    with pytest.raises(FileExistsError):
        write_with_sidecar(path, b"data")
    assert not path.exists() and sidecar_path(path).read_text() == "my notes\n"


@pytest.mark.parametrize("text", ["[1, 2]", "3", '"text"', "null"])
def test_read_json_refuses_a_json_value_that_is_not_an_object(tmp_path, text):
    """Every JSON file lipflow writes holds an object; another JSON value is a ValueError naming the file."""
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="x.json holds a JSON"):
        read_json(path)


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    """An exception inside atomic_write leaves the final file as it was and deletes the temporary."""
    final = tmp_path / "out"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(final) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert siblings(tmp_path) == ["out"] and final.read_bytes() == b"old"


def test_another_hosts_temporary_is_kept_even_when_its_pid_is_not_alive_here(tmp_path):
    """Stale temporaries are this host's only: another machine's (a shared filesystem), whose pid means
    nothing here, is left alone even when no process of that pid runs on this host."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    final = tmp_path / "out"
    other = tmp_path / f".out.tmp-{HOST}x-{pid}-abc"  # another host whose name starts like ours
    ours_dead = tmp_path / f".out.tmp-{HOST}-{pid}-abc"
    other.write_text("another machine's")
    ours_dead.write_text("a killed write of this host")
    with atomic_write(final) as f:
        f.write(b"x")
    assert other.exists() and not ours_dead.exists()


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def test_written_files_and_folders_get_the_permissions_of_the_umask(tmp_path, umask_027):
    """The temporary is private (mkstemp's 0600, mkdtemp's 0700); the published file and folder get
    what open()/mkdir() would give under the umask: 0640 and 0750 under umask 027."""
    with atomic_write(tmp_path / "f") as f:
        f.write(b"x")
    with atomic_dir(tmp_path / "d", owned=("x",)) as d:
        (d / "x").write_text("x")
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750


def test_json_is_written_indented_with_sorted_keys(tmp_path):
    """write_json_atomic's bytes are stable: keys sorted, two-space indent, a final newline."""
    write_json_atomic(tmp_path / "x.json", {"b": 2, "a": {"d": 1, "c": [1]}})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": {\n    "c": [\n      1\n    ],\n    "d": 1\n  },\n  "b": 2\n}\n'


def test_a_link_is_never_replaced_even_to_a_file_of_the_stages_kind(tmp_path):
    """refuse_to_replace refuses a symlink, even one to a file that passes ``is_ours``."""
    target = tmp_path / "ours.json"
    target.write_text("{}")
    (tmp_path / "link.json").symlink_to(target)
    with pytest.raises(FileExistsError, match="link.json"):
        refuse_to_replace(tmp_path / "link.json", "--out", "a receipt", lambda p: True)


def test_clutter_files_do_not_make_a_folder_foreign(tmp_path):
    """Finder's .DS_Store and ._ files, Thumbs.db… in the stage's own folder are no one's work."""
    final = tmp_path / "out"
    final.mkdir()
    for name in (".DS_Store", "._x", "Thumbs.db", ".nfs0001"):
        (final / name).write_text("")
    refuse_foreign(final, owned=("x",))
    assert is_clutter("._train.jsonl") and not is_clutter("notes.txt")


def test_a_folder_whose_check_cannot_read_it_is_refused_in_one_error(tmp_path):
    """An OSError of ``ours`` (an unreadable file) is a FileExistsError naming it, not a crash."""
    final = tmp_path / "out"
    final.mkdir()

    def ours(folder):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / "x"))

    with pytest.raises(FileExistsError, match=r"x cannot be read: Permission denied"):
        refuse_foreign(final, owned=("x",), ours=ours)


def test_a_file_a_user_put_into_the_folder_during_the_build_is_kept(tmp_path):
    """atomic_dir checks the folder again just before the swap: a file a user added meanwhile stops
    the swap, and stays, with the old output."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "x").write_text("old")
    with pytest.raises(FileExistsError, match="notes.txt"):
        with atomic_dir(final, owned=("x",)) as d:
            (d / "x").write_text("new")
            (final / "notes.txt").write_text("mine")
    assert (final / "notes.txt").read_text() == "mine" and (final / "x").read_text() == "old"
    assert siblings(tmp_path) == ["out"]


def test_a_failed_atomic_dir_leaves_no_temporary(tmp_path):
    """An exception inside atomic_dir deletes the temporary folder and leaves no output."""
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out", owned=("x",)) as d:
            (d / "x").write_text("half")
            raise RuntimeError("boom")
    assert siblings(tmp_path) == []


def test_replacing_a_folder_leaves_nothing_of_the_old_one_beside_it(tmp_path):
    """The old folder, moved aside for the swap, is deleted: only the new folder remains."""
    final = tmp_path / "out"
    for text in ("old", "new"):
        with atomic_dir(final, owned=("x",)) as d:
            (d / "x").write_text(text)
    assert siblings(tmp_path) == ["out"] and (final / "x").read_text() == "new"


def test_only_temporary_siblings_count_as_temporary():
    """is_temporary: dot-names with .tmp- or .old- only; a user's hidden file is no temporary."""
    assert is_temporary(".out.tmp-h-1-x") and is_temporary(".out.old-h-1-x")
    assert not is_temporary(".hidden") and not is_temporary("a.tmp-1") and not is_temporary(".bashrc")


def test_the_data_and_the_folder_are_fsynced(tmp_path, monkeypatch):
    """atomic_write fsyncs the file it publishes and then its folder (the rename is durable only then)."""
    synced = recorded_fsyncs(monkeypatch)
    final = tmp_path / "out"
    with atomic_write(final) as f:
        f.write(b"x")
    assert synced == [final.stat().st_ino, tmp_path.stat().st_ino]


def test_writing_over_a_folder_names_the_folder_not_a_temporary(tmp_path):
    """atomic_write onto a directory is an IsADirectoryError naming it (never a temporary name), and
    the directory is untouched."""
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError) as err:
        with atomic_write(tmp_path / "d") as f:
            f.write(b"x")
    assert ".tmp-" not in str(err.value) and siblings(tmp_path) == ["d"]


def test_a_full_disk_error_names_the_final_file(tmp_path, monkeypatch):
    """An OSError without a file name (ENOSPC from fsync) is re-raised naming the file asked for."""
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    final = tmp_path / "out"
    with pytest.raises(OSError) as err:
        with atomic_write(final) as f:
            f.write(b"x")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(final)
    assert siblings(tmp_path) == []


# --- lipflow.data.corpus -------------------------------------------------------------------------------


def test_a_paragraph_group_ends_at_the_blank_line_that_brings_it_to_exactly_2000_characters(tmp_path):
    """The cut is at >= 2,000 characters: a blank line that makes the group exactly 2,000 long ends it."""
    path = tmp_path / "book.txt"
    path.write_text("a" * 1998 + "\n" + "\n" + "b\n")
    assert list(_paragraph_documents(str(path))) == ["a" * 1998 + "\n\n", "b\n"]


def test_text_without_blank_lines_is_cut_at_the_line_end_reaching_20000_characters(tmp_path):
    """No blank line: a document ends at the first line end once it holds >= 20,000 characters."""
    path = tmp_path / "book.txt"
    path.write_text(("x" * 99 + "\n") * 250)  # 250 lines of 100 characters
    assert [len(doc) for doc in _paragraph_documents(str(path))] == [20_000, 5_000]


def test_a_file_named_twice_is_read_once(tmp_path):
    """A path given by name and again through a glob is one file (its documents are not doubled)."""
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    a = str(tmp_path / "a.txt")
    assert expand_paths([a, str(tmp_path / "*.txt")]) == [a, str(tmp_path / "b.txt")]
    (tmp_path / "link.txt").symlink_to(tmp_path / "b.txt")
    other_spelling = str(tmp_path / ".." / tmp_path.name / "a.txt")  # the same file spelled otherwise
    assert expand_paths([a, other_spelling, str(tmp_path / "b.txt"), str(tmp_path / "link.txt")]) == [
        a, str(tmp_path / "b.txt")]


def test_a_glob_matches_files_only_and_recurses_with_two_stars(tmp_path):
    """A glob yields regular files (never a folder it matches) and ``**`` reaches nested folders."""
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "top.txt").write_text("t")
    (tmp_path / "sub" / "deeper" / "low.txt").write_text("l")
    assert expand_paths([str(tmp_path / "*")]) == [str(tmp_path / "top.txt")]
    assert expand_paths([str(tmp_path / "**" / "*.txt")]) == [str(tmp_path / "sub" / "deeper" / "low.txt"),
                                                              str(tmp_path / "top.txt")]


def test_a_named_pipe_is_refused_as_a_path(tmp_path):
    """A path that is no regular file (a FIFO, which may never end) is a DataError, never read."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="is not a regular file"):
        expand_paths([str(fifo)])


def test_byte_offsets_in_a_single_file_count_bytes_of_the_earlier_lines(tmp_path):
    """In a single file cut into paragraphs, the offset of a bad byte counts the bytes (not the
    characters) of the lines before it; a NUL's offset counts them too."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes("ééé\n".encode() + b"ok \xff\n")  # line 1: 4 characters, 7 bytes
    with pytest.raises(DataError, match=r"invalid byte 0xff at byte offset 10\)"):
        list(_paragraph_documents(str(bad)))
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"first line\nab\x00\n")
    with pytest.raises(DataError, match=r"NUL byte at byte offset 13\)"):
        list(_paragraph_documents(str(nul)))


def test_blank_documents_are_counted_and_characters_are_characters(tmp_path):
    """corpus.json counts the whitespace-only documents skipped, and ``chars`` counts characters
    (``bytes`` their UTF-8 bytes)."""
    docs = ["naïve café " * 20 + str(i) for i in range(12)]
    for i, doc in enumerate(docs):
        (tmp_path / f"d{i:02d}.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "blank1.txt").write_text(" \n\t")
    (tmp_path / "blank2.txt").write_text("\n")
    cfg = CorpusConfig.from_dict({"source": "files", "paths": [str(tmp_path / "*.txt")], "val_fraction": 0.5})
    summary = build_corpus(cfg, tmp_path / "out")
    splits = summary["splits"]
    assert summary["skipped_blank_documents"] == 2
    assert splits["train"]["chars"] + splits["val"]["chars"] == sum(len(d) for d in docs)
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == sum(len(d.encode()) for d in docs)


def test_an_uppercase_lone_surrogate_escape_is_named(tmp_path):
    r"""JSON escapes are case-insensitive: "\uD800" is a lone surrogate as much as "\ud800"."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "fine"}\n{"text": "bad \\uDBFF here"}\n')
    cfg = CorpusConfig.from_dict({"source": "jsonl", "paths": [str(docs)]})
    with pytest.raises(DataError, match=r"docs.jsonl:2: .*lone surrogate \\udbff"):
        build_corpus(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def corpus_folder(root: Path, summary_keys, first_line: dict) -> Path:
    root.mkdir()
    (root / "corpus.json").write_text(json.dumps({key: 0 for key in summary_keys}))
    (root / "train.jsonl").write_text(json.dumps(first_line) + "\n")
    return root


def test_not_a_corpus_tells_the_stages_output_from_a_users_folder(tmp_path):
    """A folder is the stage's output only when its corpus.json has every key the stage writes and
    each JSONL starts with a line holding the key "text" alone; a JSONL without corpus.json is a user's."""
    from lipflow.data.corpus import SUMMARY_KEYS

    assert not_a_corpus(corpus_folder(tmp_path / "ours", SUMMARY_KEYS, {"text": "a"})) is None
    assert "label" not in SUMMARY_KEYS
    assert not_a_corpus(corpus_folder(tmp_path / "labelled", SUMMARY_KEYS, {"text": "a", "label": 1}))
    assert not_a_corpus(corpus_folder(tmp_path / "partial", SUMMARY_KEYS[:-1], {"text": "a"}))
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "train.jsonl").write_text('{"text": "a"}\n')
    assert not_a_corpus(alone) == "it holds train.jsonl but no corpus.json"


# --- lipflow.data.parquet ------------------------------------------------------------------------------

def test_a_sealed_parquet_file_changed_afterwards_is_refused_before_it_is_parsed(tmp_path):
    """read_table_parquet checks the bytes against the sidecar: a changed file (still valid Parquet) is
    an IntegrityError, never a silently different table."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from lipflow.data.parquet import read_table_parquet, write_table_parquet

    path = tmp_path / "t.parquet"
    write_table_parquet(path, pa.table({"v": [1, 2]}))
    assert read_table_parquet(path).to_pylist() == [{"v": 1}, {"v": 2}]
    pq.write_table(pa.table({"v": [1, 3]}), path)
    with pytest.raises(IntegrityError, match="t.parquet is corrupt"):
        read_table_parquet(path)


def test_bytes_that_are_not_parquet_are_a_value_error_naming_the_file():
    """parse_table_parquet turns Arrow's error into a ValueError naming the file."""
    from lipflow.data.parquet import parse_table_parquet

    with pytest.raises(ValueError, match=r"^x.parquet is not a readable Parquet file"):
        parse_table_parquet(b"certainly not parquet", "x.parquet")


def test_rows_are_written_with_the_given_column_types_missing_keys_null(tmp_path):
    """write_rows_parquet uses the given schema: an int value in a float64 column is a float, a key no
    row has is an all-null column of its type."""
    import pyarrow as pa
    from lipflow.data.parquet import read_table_parquet, write_rows_parquet

    write_rows_parquet(tmp_path / "r.parquet", [{"a": 1}, {"a": 2}], {"a": "float64", "b": "string"})
    table = read_table_parquet(tmp_path / "r.parquet")
    assert table.schema == pa.schema([("a", pa.float64()), ("b", pa.string())])
    assert table.to_pylist() == [{"a": 1.0, "b": None}, {"a": 2.0, "b": None}]


# --- lipflow.results.database --------------------------------------------------------------------------


def test_the_shards_table_numbers_shards_from_zero_and_counts_their_tokens(results):
    """``shards`` has one row per manifest shard: its index within its split (from 0), its file, its
    token count and sha256 exactly as the manifest gives them."""
    out = build_here(results)
    with duckdb.connect(str(out), read_only=True) as con:
        rows = con.execute("SELECT split, shard, file, tokens, sha256, dtype FROM shards").fetchall()
    assert rows == [("train", 0, "train/shard-00000.arrow", 100, "0" * 64, "uint16")]


def test_the_receipt_holds_the_published_databases_sha256_and_row_counts(results):
    """--receipt: the database's file name, the sha256 of its bytes and each table's rows."""
    out = results / "lipflow.duckdb"
    receipt = results / "db.built"
    database.build(out, results / "manifest.json", sorted((results / "runs").iterdir()), results=results,
                   receipt=receipt)
    written = json.loads(receipt.read_text())
    assert written["database"] == "lipflow.duckdb"
    assert written["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert written["rows"]["runs"] == 2 and written["rows"]["train_metrics"] == 10 and written["rows"]["shards"] == 1


def test_a_json_file_that_is_no_receipt_is_not_replaced_by_one(results):
    """A JSON object with other keys than a receipt's (a user's file) is refused as --receipt."""
    theirs = results / "settings.json"
    theirs.write_text('{"database": "x", "colour": "blue"}')
    with pytest.raises(FileExistsError, match="--receipt"):
        database.build(results / "lipflow.duckdb", results / "manifest.json", sorted((results / "runs").iterdir()),
                       results=results, receipt=theirs)
    assert theirs.read_text() == '{"database": "x", "colour": "blue"}'
    assert not (results / "lipflow.duckdb").exists()


def test_the_receipt_cannot_be_the_database(results):
    """--receipt naming the same file as --out (the receipt would overwrite the database) is a
    ValueError up front, and nothing is written; when the database exists already, that is still
    what the line says (not that the database is no receipt)."""
    out = results / "lipflow.duckdb"
    runs = sorted((results / "runs").iterdir())
    with pytest.raises(ValueError, match="is also --out"):
        database.build(out, results / "manifest.json", runs, results=results,
                       receipt=results / "runs" / ".." / "lipflow.duckdb")
    assert not out.exists()
    database.build(out, results / "manifest.json", runs, results=results)
    built = out.read_bytes()
    with pytest.raises(ValueError, match="is also --out"):
        database.build(out, results / "manifest.json", runs, results=results, receipt=out)
    assert out.read_bytes() == built


def test_a_file_that_mentions_duck_is_no_duckdb_database(tmp_path):
    """A DuckDB file has the magic ``DUCK`` at bytes 8–12; the word elsewhere does not make one."""
    text = tmp_path / "notes.txt"
    text.write_bytes(b"my notes about DUCK databases\n" * 10)
    assert not database.is_duckdb_file(text)
    magic = tmp_path / "m"
    magic.write_bytes(b"\0" * 8 + b"DUCK" + b"\0" * 100)
    assert database.is_duckdb_file(magic)


def test_identifiers_with_quotes_stay_one_name():
    """quote_identifier doubles inner double quotes, so any text is one identifier."""
    assert database.quote_identifier('a"b') == '"a""b"'
    name = 'x"; DROP TABLE y; --'
    with duckdb.connect() as con:
        con.execute(f"CREATE TABLE {database.quote_identifier(name)} (v INT)")
        assert con.execute("SELECT table_name FROM duckdb_tables()").fetchall() == [(name,)]


def test_a_table_whose_row_count_differs_is_a_stage_error(results):
    """check_database compares each table's rows with what the build loaded."""
    from lipflow.errors import StageError

    out = build_here(results)
    database.check_database(out, {"runs": 2, "shards": 1})
    with pytest.raises(StageError, match="table runs holds 2 rows, expected 3"):
        database.check_database(out, {"runs": 3})


def test_the_new_database_is_fsynced_before_it_is_published(results, monkeypatch):
    """The build fsyncs the finished database file (then renames it and fsyncs the folder)."""
    synced = recorded_fsyncs(monkeypatch)
    out = build_here(results)
    assert out.stat().st_ino in synced and results.stat().st_ino in synced


def test_a_database_open_for_writing_elsewhere_is_named(results):
    """--out held open read-write by another process (the duckdb CLI) is a FileExistsError saying so."""
    out = build_here(results)
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys; con = duckdb.connect({str(out)!r}); "
                               "print('open', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(FileExistsError, match="open for writing in another process"):
            database.build(out, results / "manifest.json", sorted((results / "runs").iterdir()), results=results)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


# --- lipflow.plan and lipflow.plan_rules ---------------------------------------------------------------


def rules_for(run: dict, **top) -> tuple[RuleFunctions, object]:
    """The rule functions of a one-run plan, and the wildcards of its run."""
    plan = Plan.from_config({"runs": {"r": {"device": "cpu", **run}}, **top})
    (run_id,) = plan.runs
    return RuleFunctions(plan), type("Wildcards", (), {"run": run_id})


def test_a_frozen_config_refuses_del_and_freezes_its_lists():
    """A Plan's configs are read-only all the way down: ``del`` is refused and lists become tuples
    (JSON unchanged); a deep copy and a pickled copy are plain, changeable dicts."""
    frozen = freeze({"a": [1, {"b": 2}], "c": {"d": 3}})
    with pytest.raises(TypeError):
        del frozen["a"]
    assert isinstance(frozen["a"], tuple) and isinstance(frozen["a"][1], FrozenDict)
    assert json.dumps(frozen) == json.dumps({"a": [1, {"b": 2}], "c": {"d": 3}})
    for thawed in (copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen))):
        assert type(thawed) is dict and type(thawed["c"]) is dict
        thawed["c"]["d"] = 4


@pytest.mark.parametrize("content", ['{"other": {}}', '{"config": [1, 2]}', '{"config": null}', "[]"])
def test_a_recorded_block_that_is_not_there_is_empty(tmp_path, content):
    """recorded_block: a file without the keys, or with something other than an object under them, is {}
    (nothing to compare; the stage reports its own damaged file)."""
    path = tmp_path / "corpus.json"
    path.write_text(content)
    assert recorded_block(str(path), ("config",)) == {}


def test_param_count_is_twelve_L_d_squared_plus_two_V_d():
    """≈ 12·L·d² + 2·V·d at MLP ratio 4: 2 layers of width 64 with a vocabulary of 512 → 98,304 + 65,536."""
    assert param_count({"n_layers": 2, "d_model": 64, "mlp_ratio": 4}, vocab=512) == 163_840
    assert param_count({"n_layers": 1, "d_model": 10, "mlp_ratio": 4}, vocab=100) == 1_200 + 2_000


@pytest.mark.parametrize("mlp_ratio", [1, 4, 16])
def test_param_count_is_lipschitz_gpts_parameter_count_at_any_mlp_ratio(mlp_ratio):
    """The memory and runtime estimates' parameter count is lipschitz_gpt's exactly (at MLP ratio 16
    it counted 12·L·d² for the blocks' 36·L·d²: SLURM memory a third of the weights' need)."""
    from lipflow.config import run_defaults
    from lipflow.model import build_model

    cfg = run_defaults(model="lipschitz_gpt", d_model=32, n_layers=3, n_heads=4, mlp_ratio=mlp_ratio)
    model = build_model(cfg, 50)
    assert param_count(cfg, vocab=50) == sum(p.numel() for p in model.parameters())


BIG_RUN = {"d_model": 256, "n_layers": 4, "n_heads": 4, "context": 256, "batch_size": 32, "steps": 10_000,
           "grad_accum": 4}


def test_train_memory_and_time_follow_their_closed_forms_and_double_on_retry(tmp_path, monkeypatch):
    """mem: 1000 MB + (16 B per parameter + 34·B·T·d·L floats of 4 B) / 1e6, times nproc, times the
    attempt; runtime: 10 min + 6·N·tokens / 5 GFLOP/s in minutes (tokens = steps·B·grad_accum·T), times
    the attempt (in a folder without token shards, whose manifest.json would give the vocabulary)."""
    monkeypatch.chdir(tmp_path)
    rules, wildcards = rules_for(BIG_RUN)
    n = 12 * 4 * 256 ** 2 + 2 * 512 * 256  # 3,407,872 parameters
    activations = 34 * 32 * 256 * 256 * 4 * 4
    assert rules.train_mem_mb(wildcards, 1) == int(1000 + (16 * n + activations) / 1e6) == 2195
    assert rules.train_mem_mb(wildcards, 2) == 2 * rules.train_mem_mb(wildcards, 1)
    tokens = 10_000 * 32 * 4 * 256
    assert rules.train_runtime(wildcards, 1) == int(10 + 6 * n * tokens / 5e9 / 60)
    assert rules.train_runtime(wildcards, 3) == 3 * rules.train_runtime(wildcards, 1)


def test_train_memory_and_time_count_the_bpe_vocabulary_the_run_trains_with(tmp_path, monkeypatch):
    """The embedding and head of a BPE vocabulary of 50,000 are 2·V·d parameters: the estimates
    counted a vocabulary of 512 whatever tokenizer.vocab_size was."""
    monkeypatch.chdir(tmp_path)
    bpe = {"tokenizer": {"kind": "bpe", "vocab_size": 50_000}}
    rules, wildcards = rules_for(BIG_RUN, **bpe)
    n = 12 * 4 * 256 ** 2 + 2 * 50_000 * 256
    activations = 34 * 32 * 256 * 256 * 4 * 4
    assert rules.train_mem_mb(wildcards, 1) == int(1000 + (16 * n + activations) / 1e6)
    assert rules.train_runtime(wildcards, 1) == int(10 + 6 * n * (10_000 * 32 * 4 * 256) / 5e9 / 60)


def test_train_memory_counts_a_file_tokenizers_own_vocabulary(tmp_path, monkeypatch):
    """A tokenizer.json's vocabulary (here 20,000 words, with the end-of-text token the stage adds)
    is the embedding's and head's: the estimate counted the schema's 512 for any file tokenizer."""
    monkeypatch.chdir(tmp_path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(20_000)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    rules, wildcards = rules_for(BIG_RUN, tokenizer={"kind": "file", "path": str(tmp_path / "tokenizer.json")})
    n = 12 * 4 * 256 ** 2 + 2 * 20_001 * 256
    activations = 34 * 32 * 256 * 256 * 4 * 4
    assert rules.train_mem_mb(wildcards, 1) == int(1000 + (16 * n + activations) / 1e6)


@pytest.mark.parametrize("manifest, vocab", [({"vocab_size": 67}, 67), (None, 512), ({"vocab_size": "67"}, 512)])
def test_train_memory_and_time_count_the_tokenized_vocabulary(tmp_path, monkeypatch, manifest, vocab):
    """A char run is sized by its vocabulary as the tokenize stage counted it in manifest.json (Snakemake
    sizes a train job once that input exists), here 67 characters, which the estimate took as 512; until
    it is written, or when it records no vocabulary size, the estimate's 512 stands."""
    monkeypatch.chdir(tmp_path)
    rules, wildcards = rules_for(BIG_RUN)
    if manifest is not None:
        (tmp_path / rules.plan.tokens_dir).mkdir(parents=True)
        (tmp_path / rules.plan.tokens_dir / "manifest.json").write_text(json.dumps(manifest))
    n = 12 * 4 * 256 ** 2 + 2 * vocab * 256
    activations = 34 * 32 * 256 * 256 * 4 * 4
    assert rules.train_mem_mb(wildcards, 1) == int(1000 + (16 * n + activations) / 1e6)
    assert rules.train_runtime(wildcards, 1) == int(10 + 6 * n * (10_000 * 32 * 4 * 256) / 5e9 / 60)


def test_resource_overrides_also_double_on_retry():
    """resources.train_mem_mb / train_runtime replace the estimates and still grow with the attempt."""
    rules, wildcards = rules_for({}, resources={"train_mem_mb": 3000, "train_runtime": 90})
    assert [rules.train_mem_mb(wildcards, a) for a in (1, 2)] == [3000, 6000]
    assert [rules.train_runtime(wildcards, a) for a in (1, 2)] == [90, 180]


@pytest.mark.parametrize("gpu_per_run, nproc, gpus", [(0, 2, 0), (1, 2, 2), (4, 2, 4), (2, 1, 2)])
def test_gpus_per_training_job(gpu_per_run, nproc, gpus):
    """gpu_per_run GPUs, at least one per process, and none when GPUs are not used."""
    rules, wildcards = rules_for({"nproc": nproc}, resources={"gpu_per_run": gpu_per_run})
    assert rules.train_gpus(wildcards) == gpus


def test_evaluation_receipts_include_the_merged_table_of_every_run():
    """`rule all` asks for each evaluation's sidecar and the merged evals.parquet's sidecar of every run."""
    rules, wildcards = rules_for({})
    receipts = rules.evaluation_receipts(wildcards)
    assert f"results/runs/{wildcards.run}/evals.parquet.sha256" in receipts
    assert set(rules.run_evaluation_checksums(wildcards)) < set(receipts)


def test_the_icl_study_is_asked_for_only_when_it_is_on_with_its_summary():
    """Without the ICL study the database waits for none of its tables; with it, `all` asks for its
    tables, figures and summary.json."""
    off, wildcards = rules_for({})
    assert off.icl_tables(wildcards) == [] and off.icl_targets(wildcards) == [] and off.study_tables(wildcards) == []
    on, wildcards = rules_for({}, icl={"enabled": True})
    assert "results/icl/summary.json" in on.icl_targets(wildcards)
    assert on.study_tables(wildcards) == on.icl_tables(wildcards) != []


# --- lipflow.train.telemetry ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def perf_counter(self) -> float:
        return self.now


def step_log(monkeypatch, clock: FakeClock, other_rank=None) -> StepLog:
    """A StepLog of 2 × 8-token windows per step on a fake clock; with ``other_rank``, the mean over
    ranks averages each value with that second rank's row."""
    monkeypatch.setattr(telemetry, "time", clock)
    monkeypatch.setattr(distributed, "mean_tensor_across_ranks",
                        (lambda t, topo: t) if other_rank is None else (lambda t, topo: (t + other_rank) / 2))
    return StepLog({"batch_size": 2, "grad_accum": 1, "context": 8}, distributed.Topology())


def result(loss: float, grad_norm: float, clipped: int = 0) -> StepResult:
    return StepResult(torch.tensor(loss), torch.tensor(grad_norm), torch.tensor(clipped))


def test_the_rows_stop_at_the_first_step_whose_gradient_norm_is_not_finite(monkeypatch):
    """A finite loss with an infinite gradient norm still ends the rows at that step (its update made
    the weights non-finite); later steps are not reported."""
    clock = FakeClock(0.0)
    log = step_log(monkeypatch, clock)
    for step, grad_norm in ((1, 1.0), (2, math.inf), (3, 1.0)):
        log.add(step, 1.0, result(2.0, grad_norm))
    clock.now = 3.0
    rows, bad = log.flush()
    assert bad == 2 and [r["step"] for r in rows] == [1, 2]


def test_step_time_is_the_stretch_shared_by_its_steps_and_rows_are_read_once(monkeypatch):
    """Four steps over 10 s of the clock: 2.5 s each and 16 / 2.5 tokens per second; a second flush
    has nothing left to report."""
    clock = FakeClock(100.0)
    log = step_log(monkeypatch, clock)
    for step in range(1, 5):
        log.add(step, 0.5, result(2.0, 1.0))
    clock.now = 110.0
    rows, bad = log.flush()
    assert bad is None and [r["step_time"] for r in rows] == [2.5] * 4
    assert [r["tokens_per_s"] for r in rows] == [6.4] * 4 and [r["tokens"] for r in rows] == [16, 32, 48, 64]
    assert log.flush() == ([], None)


def test_clipped_updates_averaged_over_ranks_round_to_the_nearest_count(monkeypatch):
    """clipped_updates is the mean over ranks rounded: 3 here and 0 on the other rank give 2 (1.5 → 2),
    not 1."""
    clock = FakeClock(0.0)
    log = step_log(monkeypatch, clock, other_rank=torch.tensor([[2.0, 1.0, 0.0]]))
    log.add(1, 1.0, result(2.0, 1.0, clipped=3))
    clock.now = 1.0
    rows, _ = log.flush()
    assert rows[0]["clipped_updates"] == 2 and rows[0]["loss"] == 2.0


def test_tensorboard_gets_the_numeric_columns_but_not_the_step():
    """Every numeric column but ``step`` (the x axis) becomes a scalar at the row's step."""
    written = []
    mirror = TensorBoardMirror.__new__(TensorBoardMirror)
    mirror.writer = type("W", (), {"add_scalar": lambda self, *a: written.append(a)})()
    mirror.write({"step": 7, "loss": 1.5, "clipped_updates": 2, "layers": "{}", "val_loss": None})
    assert written == [("loss", 1.5, 7), ("clipped_updates", 2, 7)]


def test_layer_telemetry_measures_the_update_records_the_bound_and_the_norm_after_the_constraint():
    """update_norm is ‖ΔW‖_RMS→RMS of the step, update_bound the optimizer's recorded bound and sigma_max
    ‖W‖_RMS→RMS of the constrained matrix: for W (4×2) a multiple of an orthonormal-column matrix,
    ‖cQ‖_RMS→RMS = c·√(2/4)."""
    q = torch.zeros(4, 2)
    q[0, 0] = q[1, 1] = 1.0
    w = torch.nn.Parameter(2.0 * q)
    model = type("M", (), {"param_roles": lambda self: {"hidden": [("w", w)], "head": []}})()
    optimizer = type("O", (), {"state": {w: {"update_norm": torch.tensor(0.75)}}})()
    layers = LayerTelemetry(model, optimizer)
    before = layers.before_step()
    with torch.no_grad():
        w.add_(0.5 * q)  # the step: ΔW = 0.5·Q
    measured = layers.after_step(before)
    with torch.no_grad():
        w.mul_(0.5)  # the constraint: W = 1.25·Q
    layers.after_constraint(measured)
    assert measured["w"]["update_norm"] == pytest.approx(0.5 * 0.5 ** 0.5)
    assert measured["w"]["update_bound"] == 0.75
    assert measured["w"]["sigma_max"] == pytest.approx(1.25 * 0.5 ** 0.5)


# --- lipflow.train.telemetry: the eval step's measurements ---------------------------------------------

@pytest.fixture
def eval_step(char_shards, tiny_run_config):
    """An EvalStepTelemetry over a 2-block lipschitz_gpt on the char shards, with its config and val split."""
    from lipflow.model import build_model
    from lipflow.train.build import token_splits
    from lipflow.train.telemetry import EvalStepTelemetry

    cfg = {**tiny_run_config, "model": "lipschitz_gpt", "n_layers": 2, "sharpness_every": 0}
    train, val = token_splits(char_shards, cfg)
    torch.manual_seed(0)
    model = build_model(cfg, train.vocab_size)
    return EvalStepTelemetry(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1), train, val,
                             torch.device("cpu"), pytest.fail), cfg, val  # no measurement here should warn


def test_eval_windows_are_val_windows_of_the_seed_plus_one_with_their_last_target(eval_step):
    """The eval step scores eval_batches × batch_size val windows of context + 1 tokens (inputs and every
    target), drawn from a generator seeded seed + 1, apart from the training batches' seed."""
    telemetry, cfg, val = eval_step
    n = cfg["eval_batches"] * cfg["batch_size"]
    starts = val.sample_starts(n, cfg["context"], torch.Generator().manual_seed(cfg["seed"] + 1)).tolist()
    windows = torch.stack([torch.from_numpy(val.tokens(s, s + cfg["context"] + 1).astype("int64")) for s in starts])
    assert torch.equal(telemetry.val_windows, windows)


def test_an_eval_step_row_holds_metric_columns_and_the_largest_attention_logit(eval_step):
    """The row gets only train_metrics columns (no val 'tokens' count), its max_attention_logit is the
    largest of the per-layer values, measured on the scored windows' inputs, and the model stops
    recording activations afterwards (a later training forward pass leaves its statistics alone)."""
    from lipflow.metrics import max_attention_logits
    from lipflow.train.summary import METRIC_COLUMNS

    telemetry, cfg, _ = eval_step
    row = {}
    telemetry.measure(row, layers=None)
    assert set(row) <= set(METRIC_COLUMNS) and "val_loss" in row, set(row) - set(METRIC_COLUMNS)
    logits = json.loads(row["attention_logits"])
    assert len(set(logits.values())) == 2 and row["max_attention_logit"] == max(logits.values())
    assert logits == pytest.approx(max_attention_logits(telemetry.model, telemetry.val_windows[:, :-1]))
    stats = dict(telemetry.model.activation_stats)
    assert not telemetry.model.record_activations
    telemetry.model(telemetry.val_windows[:1, :-1] * 0)
    assert telemetry.model.activation_stats == stats
