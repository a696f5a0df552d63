"""The results database: per-run Parquet/JSON and the studies' tables → one DuckDB file.

:func:`build` rebuilds the whole database in a temp file, checkpoints it, reopens it to check
every table's row count and only then renames it into place, so readers never see a half-built
file, a failed build keeps the previous database, and a rebuild is idempotent. Every run and study
file is checked against its ``.sha256`` sidecar; file names are never SQL. A run directory must hold
the run it is named after, each run.json and config.json value must be of the type the trainer
writes, and files loaded into one table must agree on their columns' types
(:mod:`lipflow.results.inputs`): a bad file is one line naming it. Every table is loaded
here (:func:`_fill_database`), then the experiments' views are created on them:

- ``runs``: one row per run: status, flattened config keys, ``config`` (JSON), provenance;
- ``train_metrics``: per-step loss and, at eval steps, val metrics, bound, activations;
- ``evals``: long form (run_id, eval, metric, value, parameter columns);
- ``shards``: the token shards (split, shard, file, tokens, sha256, dtype);
- ``<study>_<name>``: each study table ``<study>/<name>.parquet`` the build is given (``--study-tables``:
  the database rule names those of the studies the config has on), a table of a study outside the
  run grid (``icl_loss_by_layers``…, ``image_mlp_robustness``);
- ``bench``: every ``results/bench/*.parquet`` row (the bench folder beside the database; not the files
  tools leave there, :func:`lipflow.atomic.is_clutter`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa

from lipflow import provenance
from lipflow.atomic import (check_folder_exists, fsync_dir, is_clutter, json_object_keys, read_json,
                            refuse_to_replace, remove_stale_temporaries, sha256_file, temp_prefix, write_json_atomic)
from lipflow.data.parquet import parse_table_parquet, read_table_parquet
from lipflow.data.tokenize import check_manifest
from lipflow.errors import check_distinct_paths, check_utf8
from lipflow.experiments import VIEWS, create_views
from lipflow.plan_rules import STUDY_FILES
from lipflow.results.inputs import (JSON_FORMS, check_evaluation_table, check_summary_matches_metrics, check_value,
                                    checked_config, concat_files, read_run_json, read_run_table, run_id_in,
                                    summary_values)
from lipflow.train.summary import METRIC_COLUMNS, RUN_SUMMARY_FIELDS


def study_table(path: str | os.PathLike[str]) -> str:
    """The table of a study's file ``<study>/<name>.parquet``: ``<study>_<name>``."""
    return f"{Path(path).parent.name}_{Path(path).stem}"


# Studies outside the run grid (the schema's experiment `studies`) and the exact names of their tables.
STUDIES = tuple(STUDY_FILES)
STUDY_TABLES = frozenset(study_table(path) for files in STUDY_FILES.values() for path in files)


# The ``runs`` columns after the config keys: the config as JSON, then the run.json fields, with their
# Arrow types (what a database without runs gets); run_row fills them in this order.
SUMMARY_COLUMNS: dict[str, pa.DataType] = {"config": pa.string(), **{
    name: pa.type_for_alias(alias) for name, alias in RUN_SUMMARY_FIELDS.items()}}
SQL_TYPES = {"string": "VARCHAR", "int64": "BIGINT", "float64": "DOUBLE"}  # of the train-metric columns
VAL_COLUMNS = ("val_loss", "val_accuracy", "val_perplexity")  # from the val evaluation, when it ran


def _flat_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config keys as columns: nested values as JSON text."""
    return {k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v) for k, v in cfg.items()}


def run_row(run_dir: Path, manifest: Path | None = None, manifest_sha256: str | None = None) -> dict[str, Any]:
    """One ``runs`` row from a run directory's run.json and config.json: both name the directory's run,
    config.json's config hashes to run.json's ``config_hash`` (an edited config.json is refused), the
    run was trained on ``manifest`` (sha256 ``manifest_sha256``, when given: :func:`check_trained_on_manifest`),
    and every value is of the type the trainer writes (:mod:`lipflow.results.inputs`). run.json's
    ``device`` (the device used) takes the column of the config key ``device`` (the setting, e.g.
    auto), which stays in the ``config`` JSON; no other run.json field is a config key (tested)."""
    run_json, config_json = Path(run_dir) / "run.json", Path(run_dir) / "config.json"
    summary, info = read_run_json(run_json), read_run_json(config_json)
    values = summary_values(run_json, summary)
    cfg = checked_config(config_json, info)
    if values["config_hash"] is not None and provenance.config_hash(cfg) != values["config_hash"]:
        raise ValueError(f"{config_json}: its config is not the one run {values['run_id']!r} trained with "
                         f"(its hash differs from {run_json}'s config_hash): edited after training?")
    if manifest is not None:
        check_trained_on_manifest(config_json, info, manifest, manifest_sha256)
    derived = {**values, "config": json.dumps(cfg, sort_keys=True)}
    return {"run_id": values["run_id"], "name": values["run_id"].rsplit("-", 1)[0], "status": values["status"],
            **_as_column_types(_flat_config(cfg)), **{k: derived[k] for k in SUMMARY_COLUMNS}}


def _as_column_types(flat: dict[str, Any]) -> dict[str, Any]:
    """An integer a config of before 2026-12-06 holds for a ``number`` key (``max_bound: 10000000000000000``)
    as the float its column holds: Arrow refuses an integer a double does not hold exactly."""
    from lipflow.config.runs import int_as_float

    floats = _float_columns()
    return {key: int_as_float(value) if key in floats else value for key, value in flat.items()}


@functools.lru_cache(maxsize=1)
def _float_columns() -> frozenset[str]:
    """The ``runs`` columns of type DOUBLE (:func:`runs_schema`), found once, not once per run row."""
    return frozenset(field.name for field in runs_schema() if field.type == pa.float64())


# a config key's column: a mapping or list as its JSON text (_flat_config), other values as the schema types them
CONFIG_COLUMN_TYPES = {"object": pa.string(), "array": pa.string(), "integer": pa.int64(), "number": pa.float64(),
                       "string": pa.string(), "boolean": pa.bool_()}


@functools.lru_cache(maxsize=1)
def runs_schema() -> pa.Schema:
    """The ``runs`` table's columns and types (config keys sorted, as in config.json, and typed by the config
    schema), so a column no run sets (``experiment``, ``diverged_step``…) keeps its type instead of DuckDB's
    NULL, and a database of studies without runs (e.g. only the ICL study) has the columns queries and
    views read."""
    from lipflow.config.runs import run_key_types

    config_fields = []
    for key, types in run_key_types().items():
        (kind,) = {CONFIG_COLUMN_TYPES[kind] for kind in types - {"null"}}  # every run key has one column type
        config_fields.append(pa.field(key, kind))
    config_names = {field.name for field in config_fields}
    summary_fields = [pa.field(k, t) for k, t in SUMMARY_COLUMNS.items() if k not in config_names]
    val_fields = [pa.field(k, pa.float64()) for k in VAL_COLUMNS]
    return pa.schema([pa.field("run_id", pa.string()), pa.field("name", pa.string()), pa.field("status", pa.string()),
                      *config_fields, *summary_fields, *val_fields])


SHARDS_SCHEMA = pa.schema([("split", pa.string()), ("shard", pa.int64()), ("file", pa.string()),
                           ("tokens", pa.int64()), ("sha256", pa.string()), ("dtype", pa.string())])


def shard_rows(manifest_path: Path | None) -> list[dict[str, Any]]:
    """The ``shards`` rows of the token shards' manifest: none without one (a build with no runs, such as
    the ICL study alone, which tokenizes no corpus)."""
    if manifest_path is None:
        return []
    manifest = check_manifest(read_json(manifest_path), manifest_path)
    rows = []
    for split, info in manifest["splits"].items():
        for index, shard in enumerate(info["shards"]):
            rows.append({"split": split, "shard": index, "file": shard["file"], "tokens": shard["num_tokens"],
                         "sha256": shard["sha256"], "dtype": manifest["dtype"]})
    return rows


def quote_identifier(name: str) -> str:
    """``name`` as a DuckDB identifier: double-quoted, inner quotes doubled (any text is one name)."""
    return '"' + name.replace('"', '""') + '"'


def _create_from_arrow(con: duckdb.DuckDBPyConnection, table: str, arrow: pa.Table) -> int:
    """Create ``table`` from an Arrow table (registered, not interpolated); returns its row count."""
    con.register("_lipflow_staging", arrow)
    try:
        con.execute(f"CREATE TABLE {quote_identifier(table)} AS SELECT * FROM _lipflow_staging")
    finally:
        con.unregister("_lipflow_staging")
    return arrow.num_rows


def _create_from_tables(con: duckdb.DuckDBPyConnection, table: str, named: list[tuple[Path, pa.Table]],
                        empty_sql: str) -> int:
    """Create ``table`` from the Arrow tables of files (``named``: file, table; columns unioned by
    name), or with the columns of ``empty_sql`` when there are none; returns its row count. A file
    whose table DuckDB cannot take (no columns, a float16 column…: a property of its schema, so each
    schema is tried once, on its first file) or whose columns' types clash with another's is a
    ValueError naming it."""
    if not named:
        con.execute(f"CREATE TABLE {quote_identifier(table)} ({empty_sql})")
        return 0
    first_of_schema: dict[bytes, tuple[Path, pa.Table]] = {}
    for path, arrow in named:  # keyed by the schema's serialized bytes (metadata included)
        first_of_schema.setdefault(arrow.schema.serialize().to_pybytes(), (path, arrow))
    for path, arrow in first_of_schema.values():
        try:
            con.register("_lipflow_staging", arrow)
        except duckdb.Error as err:
            raise ValueError(f"{path} cannot be loaded into the database ({str(err).splitlines()[0]})") from None
        con.unregister("_lipflow_staging")
    return _create_from_arrow(con, table, concat_files(named, f"the {table} table's files"))


def _create_from_parquet(con: duckdb.DuckDBPyConnection, table: str, files: list[Path], empty_sql: str,
                         verify: bool = True) -> int:
    """Create ``table`` from Parquet files, each read by pyarrow (so a file name is never SQL or a
    glob) and, with ``verify``, checked against its sidecar; returns its row count."""
    read = read_table_parquet if verify else _read_unverified
    return _create_from_tables(con, table, [(f, read(f)) for f in files], empty_sql)


def _read_unverified(path: Path) -> pa.Table:
    """A Parquet file's table, read from its bytes (a folder is an error naming it, never a dataset)."""
    return parse_table_parquet(Path(path).read_bytes(), path)


def _fill_database(con: duckdb.DuckDBPyConnection, manifest: Path | None, run_dirs: list[Path], study_tables: list[Path],
                   results: Path) -> dict[str, int]:
    """Create every table and view; returns table → the rows it must hold."""
    shards = shard_rows(manifest)  # the manifest checked before the runs are compared with it
    runs = _run_rows(run_dirs, manifest) if run_dirs else []
    evals = _run_files(run_dirs, "evals.parquet")  # every run has one (merge-evals: empty without evaluations)
    val_loss = {}
    for path, table in evals:
        check_evaluation_table(path, table)
        for r in table.select(["run_id", "eval", "metric", "value"]).to_pylist():
            if r["eval"] == "val" and r["metric"] in ("loss", "accuracy", "perplexity"):
                val_loss.setdefault(r["run_id"], {})[f"val_{r['metric']}"] = r["value"]
    for row in runs:
        row.update({**dict.fromkeys(VAL_COLUMNS), **val_loss.get(row["run_id"], {})})
    rows = {"runs": _create_from_arrow(con, "runs", pa.Table.from_pylist(runs, schema=runs_schema()))}
    metrics = _run_files(run_dirs, "train_metrics.parquet")
    for run_dir, row, (_, table) in zip(run_dirs, runs, metrics):
        check_summary_matches_metrics(Path(run_dir) / "run.json", row, table)
    rows["train_metrics"] = _create_from_tables(con, "train_metrics", metrics,
                                                ", ".join(f"{quote_identifier(name)} {SQL_TYPES[alias]}"
                                                          for name, alias in METRIC_COLUMNS.items()))
    rows["evals"] = _create_from_tables(con, "evals", evals,
                                        "run_id VARCHAR, eval VARCHAR, metric VARCHAR, value DOUBLE")
    rows["shards"] = _create_from_arrow(con, "shards", pa.Table.from_pylist(shards, schema=SHARDS_SCHEMA))
    rows.update(load_study_tables(con, study_tables))
    # hand-appended measurements (bench/common.py), written without a sidecar; not the files tools leave beside
    # them (macOS's AppleDouble ._<name>.parquet on a copy to a USB or network drive), which hold no table
    bench = sorted(path for path in (results / "bench").glob("*.parquet") if not is_clutter(path.name))
    rows["bench"] = _create_from_parquet(con, "bench", bench,
                                         "bench VARCHAR, metric VARCHAR, value DOUBLE, unit VARCHAR, machine VARCHAR, "
                                         "device VARCHAR, date VARCHAR, git_commit VARCHAR", verify=False)
    create_views(con)
    return rows


def _run_rows(run_dirs: list[Path], manifest: Path) -> list[dict[str, Any]]:
    """The ``runs`` rows of ``run_dirs`` (:func:`run_row`, each trained on ``manifest``); two
    directories of one run (a copy elsewhere) are a ValueError naming both: the run would have two rows."""
    rows, seen, digest = [], {}, sha256_file(manifest)
    for run_dir in run_dirs:
        row = run_row(Path(run_dir), manifest, digest)
        if row["run_id"] in seen:
            raise ValueError(f"--run-dirs: {seen[row['run_id']]} and {run_dir} both hold run {row['run_id']!r}")
        seen[row["run_id"]] = run_dir
        rows.append(row)
    return rows


def check_trained_on_manifest(config_json: Path, info: dict[str, Any], manifest: Path, digest: str) -> None:
    """A ValueError naming ``manifest`` (sha256 ``digest``) when a run's config.json (``info``) records
    the sha256 of another token manifest (runs since the trainer records it): the ``shards`` table
    would describe data the run never saw."""
    recorded = check_value(config_json, "manifest_sha256", info.get("manifest_sha256"), JSON_FORMS["string"])
    if recorded is not None and recorded != digest:
        raise ValueError(f"--manifest {manifest} is not the token manifest run {run_id_in(config_json, info)!r} "
                         f"was trained on ({config_json} records sha256 {recorded[:12]}…, the file has "
                         f"{digest[:12]}…)")


def _run_files(run_dirs: list[Path], name: str) -> list[tuple[Path, pa.Table]]:
    """Each run directory's Parquet file ``name`` with its table (:func:`read_run_table`: checked
    against its sidecar, holding rows of the directory's run only); a missing file is named."""
    return [(path, read_run_table(path)) for path in (Path(d) / name for d in run_dirs)]


def check_study_tables(files: list[Path]) -> None:
    """A ValueError naming the first of ``files`` that is no study table lipflow writes (its table,
    :func:`study_table`, not one of :data:`STUDY_TABLES`: a rebuild would refuse to drop it) or
    whose table another of them makes."""
    seen: dict[str, Path] = {}
    for path in files:
        table = study_table(path)
        if table not in STUDY_TABLES:
            raise ValueError(f"--study-tables: {path} is no study table of lipflow's (<study>/<name>.parquet, "
                             f"one of {', '.join(sorted(STUDY_TABLES))})")
        if table in seen:
            raise ValueError(f"--study-tables: {seen[table]} and {path} are both table {table}")
        seen[table] = path


def load_study_tables(con: duckdb.DuckDBPyConnection, files: list[Path]) -> dict[str, int]:
    """Create the table of each study file of ``files`` (:func:`study_table`, checked against its
    sidecar), and of no other; returns table → rows."""
    return {study_table(path): _create_from_parquet(con, study_table(path), [Path(path)], "") for path in files}


def check_database(path: Path, rows: dict[str, int]) -> None:
    """Open ``path`` read-only and check that it holds each table of ``rows`` with its row count
    and that every view can be read; a StageError names the first difference."""
    from lipflow.errors import StageError

    with duckdb.connect(str(path), read_only=True) as con:
        for table, expected in rows.items():
            try:
                found = con.execute(f"SELECT count(*) FROM {quote_identifier(table)}").fetchone()[0]
            except duckdb.Error as err:
                raise StageError(f"table {table} is unreadable ({str(err).splitlines()[0]})") from None
            if found != expected:
                raise StageError(f"table {table} holds {found} rows, expected {expected}")
        for (view,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall():
            con.execute(f"SELECT * FROM {quote_identifier(view)} LIMIT 0")


DUCKDB_MAGIC = b"DUCK"  # bytes 8–12 of every DuckDB database file


def is_duckdb_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(12)[8:] == DUCKDB_MAGIC


LIPFLOW_TABLES = ("runs", "shards")  # every lipflow database has them, even with no run


def is_lipflow_database(path: Path) -> bool:
    """Whether ``path`` is a DuckDB database holding lipflow's tables (an earlier build)."""
    if not is_duckdb_file(path):
        return False
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            tables = {name for (name,) in con.execute("SELECT table_name FROM duckdb_tables() "
                                                      "WHERE schema_name = 'main'").fetchall()}
    except duckdb.Error as err:
        if "lock" in str(err).lower():  # a read-write connection elsewhere (the duckdb CLI's default)
            raise FileExistsError(f"--out {path} is open for writing in another process, so it cannot be checked "
                                  "or replaced; close that connection (lipflow.connect() reads without a lock) "
                                  "and rerun") from None
        return False
    return set(LIPFLOW_TABLES) <= tables


BUILT_TABLES = ("runs", "train_metrics", "evals", "shards", "bench")  # and the studies' tables (STUDY_TABLES)
# Every kind of object a DuckDB database keeps (kind, its catalog function, its name column), schemas last: a
# schema holding a user's object is named by that object.
CATALOG_OBJECTS = (("table", "duckdb_tables()", "table_name"), ("view", "duckdb_views()", "view_name"),
                   ("macro", "duckdb_functions()", "function_name"), ("sequence", "duckdb_sequences()", "sequence_name"),
                   ("type", "duckdb_types()", "type_name"), ("index", "duckdb_indexes()", "index_name"),
                   ("trigger", "duckdb_triggers()", "trigger_name"), ("schema", "duckdb_schemas()", "schema_name"))


def database_objects(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str]]:
    """(kind, schema, name) of every object stored in ``con``'s database but DuckDB's own, in
    :data:`CATALOG_OBJECTS` order."""
    found = []
    # duckdb_triggers() came with DuckDB 2's triggers: DuckDB 1.x (pyproject allows >= 1.1) has neither
    catalogs = {row[0] for row in con.execute("SELECT function_name FROM duckdb_functions() WHERE "
                                              "function_type = 'table' AND function_name LIKE 'duckdb_%'").fetchall()}
    for kind, catalog, name in CATALOG_OBJECTS:
        if catalog.removesuffix("()") not in catalogs:
            continue
        internal = "" if kind in ("sequence", "index", "trigger") else " AND NOT internal"  # these have no such column
        found += [(kind, schema, value) for schema, value in con.execute(
            f"SELECT schema_name, {name} FROM {catalog} WHERE database_name = current_database(){internal} "
            f"ORDER BY 1, 2").fetchall()]
    return found


def refuse_to_drop_user_objects(out: Path) -> None:
    """A FileExistsError naming the first object of the lipflow database ``out`` that no build makes
    (one a user added: a table or view of another name, or in a schema of theirs, a macro, a
    sequence, a trigger…): the rebuild, a new file, would drop it."""
    with duckdb.connect(str(out), read_only=True) as con:
        objects = database_objects(con)
    ours = {("table", "main", name) for name in (*BUILT_TABLES, *STUDY_TABLES)} | {
        ("view", "main", name) for name in VIEWS}
    added = [(kind, schema, name) for kind, schema, name in objects if (kind, schema, name) not in ours]
    if added:
        kind, schema, name = added[0]
        named = name if kind == "schema" or schema == "main" else f"{schema}.{name}"
        raise FileExistsError(f"--out {out} holds {kind} {named!r}, which lipflow does not build; refusing to "
                              "drop it in a rebuild (copy it into a database of your own and drop it here first)")


RECEIPT_KEYS = ("database", "sha256", "rows")  # what build() writes to --receipt
# what DuckDB keeps beside a database: its write-ahead log (and the two it checkpoints through), its spill folder
DUCKDB_SIDECARS = (".wal", ".wal.recovery", ".wal.checkpoint", ".tmp")


def is_receipt(path: Path) -> bool:
    """Whether ``path`` is a receipt an earlier build wrote (a JSON object with its keys)."""
    return json_object_keys(path) == set(RECEIPT_KEYS)


def remove_other_receipts(out: Path, receipt: Path) -> None:
    """Remove the receipts of ``out`` in ``receipt``'s folder other than ``receipt``: receipts (the database
    rule names each by the inputs it was built from) that record ``out`` as their database. Done before the
    build, so that a database rebuilt from other inputs never stands beside a receipt of the old ones (which
    Snakemake would take as up to date if that run set came back), and again once the new database is in place
    (another checkout sharing the results folder may have written its receipt meanwhile). A receipt is a plain file named as the rule
    names one (:func:`is_receipt_name`): a user's copy of one (``….built.bak``, an editor's ``….built~``) or a
    link named like one is never removed, though it holds a receipt's JSON, and no special file (a named pipe)
    is opened."""
    for path in Path(receipt).parent.iterdir():
        if (path != Path(receipt) and is_receipt_name(out, path.name) and not path.is_symlink() and path.is_file()
                and is_receipt(path) and read_json(path).get("database") == out.name):
            path.unlink()


def is_receipt_name(out: Path, name: str) -> bool:
    """Whether ``name`` is a receipt's of database ``out``, as the database rule names one
    (lipflow.plan_rules.RuleFunctions.database_receipt: ``<out's name>.<12 hex digits>.built``), or named it
    before 2026-12-07 (``<out's name>.built``)."""
    return re.fullmatch(re.escape(out.name) + r"(\.[0-9a-f]{12})?\.built", name) is not None


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself (no lock file left in it) while the body runs: two builds
    of one database (two checkouts sharing results/) publish one at a time, each its database, its receipt and
    the removal of the other's, so no receipt stands beside a database it does not describe. Where the file
    system has no locks (some network file systems), unlocked."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # no locks here: the publication is not serialised
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_out_replaceable(out: Path) -> None:
    """A FileExistsError unless ``out`` is absent or a lipflow database holding none of a user's objects
    (:func:`refuse_to_drop_user_objects`); checked before the build and again just before the swap, since
    a user's session may add one while a long build runs."""
    refuse_to_replace(out, "--out", "a lipflow database", is_lipflow_database)
    if out.exists():
        refuse_to_drop_user_objects(out)


def check_build_arguments(out: Path, manifest: Path | None, run_dirs: list[Path], study_tables: list[Path],
                          receipt: Path | None) -> None:
    """Before any work: ``out`` is absent or a lipflow database and ``receipt`` absent or a receipt (a
    user's other file, another database or the manifest is never replaced, nor ``out`` or the files
    DuckDB keeps beside it, :data:`DUCKDB_SIDECARS`), run directories come with the ``manifest`` they are
    checked against, no run directory is given twice (its rows would
    be counted twice), each study table is one of lipflow's, once
    (:func:`check_study_tables`), and the receipt's folder exists (else the database would be replaced
    and its receipt missing); ``out`` is UTF-8 text (DuckDB fails on another name: std::bad_cast)."""
    check_utf8(str(out), "--out")
    check_out_replaceable(out)
    if manifest is None and run_dirs:
        raise ValueError("--manifest: needed with --run-dirs (each run is checked against the token shards it "
                         "was trained on)")
    check_distinct_paths(run_dirs, "--run-dirs")
    check_study_tables(study_tables)
    if receipt is not None:
        for suffix in ("", *DUCKDB_SIDECARS):
            if Path(receipt).resolve() == Path(f"{out}{suffix}").resolve():
                raise ValueError(f"--receipt {receipt} is also --out" + (f"'s DuckDB {suffix} file" if suffix else ""))
        refuse_to_replace(receipt, "--receipt", "a receipt of an earlier build", is_receipt)
        check_folder_exists(receipt, "--receipt")


def build(out: Path, manifest: Path | None, run_dirs: list[Path], study_tables: list[Path] = (),
          results: Path | None = None, receipt: Path | None = None) -> None:
    """Build the database at ``out`` from the run directories, the studies' tables ``study_tables``
    (no others) and ``results``/bench (by default ``out``'s folder: the results tree the database is
    built for, whatever the working directory) from scratch in a temp file, checkpoint it, reopen it to
    check every table's row count, and only then rename it onto ``out``. On any failure ``out`` is left as
    it was and the temp file (with its write-ahead log) is removed; a database whose write-ahead
    log survives its checkpoint (e.g. disk full) is a failure, never published, and the old
    database's own log is removed before the rename. ``receipt``, when
    given, is written last: the database's sha256 and each table's row count."""
    from lipflow.errors import StageError

    out = Path(out)
    check_build_arguments(out, manifest, run_dirs, study_tables, receipt)
    remove_stale_temporaries(out)  # what a killed build left
    if receipt is not None:
        remove_other_receipts(out, receipt)
    tmp = out.with_name(temp_prefix(out) + "build")
    wal = Path(f"{tmp}.wal")
    published = False
    try:
        con = duckdb.connect(str(tmp))
        try:
            rows = _fill_database(con, manifest, run_dirs, list(study_tables),
                                  out.parent if results is None else Path(results))
            con.execute("CHECKPOINT")
        finally:
            con.close()
        if wal.exists():
            raise StageError(f"the database's final checkpoint did not complete ({wal.name} remains; disk full?)")
        check_database(tmp, rows)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        with folder_lock(out.parent):  # another checkout sharing results/ publishes its database in turn
            check_out_replaceable(out)  # a user's session may have added an object while the build ran
            # The old database's write-ahead log (a session that wrote to it and never checkpointed) would
            # be replayed onto the new file, which no reader could then open; what it holds are changes to
            # lipflow's own tables (refuse_to_drop_user_objects read it), which the rebuild replaces.
            Path(f"{out}.wal").unlink(missing_ok=True)
            os.replace(tmp, out)
            published = True
            fsync_dir(out.parent)
            if receipt is not None:
                # again: another checkout sharing results/ may have written its receipt while this build ran,
                # and it would stand beside this database of another run set
                remove_other_receipts(out, receipt)
                write_json_atomic(receipt, dict(zip(RECEIPT_KEYS, (out.name, sha256_file(out), rows))))
    except (duckdb.Error, OSError, StageError) as err:
        state = "replaced, but its receipt was not written" if published else "left as it was"
        raise StageError(f"database build failed, {out} {state}: {str(err).splitlines()[0]}") from None
    finally:
        if not published:
            tmp.unlink(missing_ok=True)
            wal.unlink(missing_ok=True)  # the temp database's own log: nothing of it is kept
