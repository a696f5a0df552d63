"""The results stage's inputs, checked before they reach a table; each problem is one ValueError
naming the file (and key):

- a run directory's run.json and config.json: each value of the type the trainer writes (the column
  types of :mod:`lipflow.train.summary`, the config schema's types), and the run id they state;
- a run directory's Parquet files: rows of its run only; an evaluation table's columns and types;
- a completed run's run.json against its checksummed metrics' final step;
- Parquet files whose tables go into one table: their columns' types must agree.

Imports neither DuckDB nor torch (the evaluation stage checks run ids with it, ``lipflow.load_run``
reads a run's files with it).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from lipflow.atomic import read_json
from lipflow.data.parquet import read_table_parquet
from lipflow.train.summary import RUN_KEY_FIELDS, RUN_STATUSES, RUN_SUMMARY_FIELDS

# The JSON values run.json holds for each column type of lipflow.train.summary (a time is Unix seconds),
# and their name in an error. Null is allowed but for the key fields; `versions` is an object.
JSON_FORMS: dict[str, tuple[tuple[type, ...], str]] = {
    "string": ((str,), "text"), "int64": ((int,), "a whole number"), "float64": ((int, float), "a number"),
    "bool": ((bool,), "true or false"), "timestamp[us]": ((int, float), "a number")}
OBJECT_FORM: tuple[tuple[type, ...], str] = ((dict,), "an object")
JSON_TEXT_FIELDS = ("versions",)  # run.json objects kept as JSON text in the database
INT64 = range(-2**63, 2**63)
EVALUATION_COLUMNS = ("run_id", "eval", "metric", "value")  # what every evaluation file holds (lipflow.evaluation)


def value_of(obj: dict[str, Any], key: str, path: Path) -> Any:
    """``obj[key]``; a missing key is a ValueError naming ``path`` and the key."""
    try:
        return obj[key]
    except KeyError:
        raise ValueError(f"{path}: missing key {key!r}") from None


def check_value(path: Path, key: str, value: Any, form: tuple[tuple[type, ...], str], nullable: bool = True) -> Any:
    """``value`` when it is of ``form`` (JSON types, their name) or null where ``nullable``; a bool
    is no number and an integer must fit 64 bits. Else a ValueError naming ``path`` and ``key``."""
    types, name = form
    if value is None and nullable:
        return value
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ValueError(f"{path}: {key} is {value!r}, not {name}")
    if isinstance(value, int) and not isinstance(value, bool) and value not in INT64:
        raise ValueError(f"{path}: {key} is {value!r}, beyond a 64-bit integer")
    return value


def timestamp(path: Path, key: str, seconds: float | None) -> dt.datetime | None:
    """Unix seconds as a naive UTC TIMESTAMP (a TIMESTAMPTZ would need pytz in every client); null and 0
    (no run trained at 1970-01-01) are no time, NULL; seconds beyond the years 1–9999 are a ValueError
    naming ``path`` and ``key``."""
    if not seconds:
        return None
    try:
        return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"{path}: {key} is {seconds!r}, not a time (Unix seconds within the years 1-9999)") from None


def summary_values(path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """run.json's fields (``path``), each checked against its type in lipflow.train.summary, as the
    ``runs`` table holds them: times as timestamps, objects as JSON text."""
    values = {}
    for key, alias in {**RUN_KEY_FIELDS, **RUN_SUMMARY_FIELDS}.items():
        form = OBJECT_FORM if key in JSON_TEXT_FIELDS else JSON_FORMS[alias]
        value = check_value(path, key, value_of(summary, key, path), form, nullable=key not in RUN_KEY_FIELDS)
        if key in JSON_TEXT_FIELDS:
            value = json.dumps(value, sort_keys=True)
        elif alias.startswith("timestamp"):
            value = timestamp(path, key, value)
        values[key] = value
    if values["status"] not in RUN_STATUSES:  # an edited status would pass as no run the views count, unchecked
        raise ValueError(f"{path}: status is {values['status']!r}, none of {', '.join(RUN_STATUSES)}")
    return values


@functools.lru_cache(maxsize=1)
def _run_schema_validator():
    from lipflow.config.schema import make_validator

    return make_validator(definition="run")  # not filling: the config is checked as the run wrote it


def checked_config(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """config.json's (``path``) run config, each key of the type the config schema gives it (what
    the train stage accepted), each integer fitting 64 bits; else a ValueError naming the key."""
    from lipflow.config.schema import first_error

    cfg = value_of(info, "config", path)
    problem = first_error(_run_schema_validator(), cfg, prefix="config")
    if problem is not None:
        raise ValueError(f"{path}: {problem}")
    for key, value in cfg.items():
        if isinstance(value, int) and not isinstance(value, bool):
            check_value(path, f"config.{key}", value, JSON_FORMS["int64"])
    return cfg


def directory_name(run_dir: Path) -> str:
    """The name of a run directory however it is spelled (``runs/x/``, ``.``)."""
    return Path(os.path.abspath(run_dir)).name


def run_id_in(path: Path, info: dict[str, Any]) -> str:
    """The ``run_id`` text of run.json or config.json (``path``); else a ValueError naming it."""
    return check_value(path, "run_id", value_of(info, "run_id", path), JSON_FORMS["string"], nullable=False)


def check_names_its_run(path: Path, run_id: str) -> None:
    """A ValueError naming ``path`` (a run directory's run.json or config.json) when ``run_id`` is not
    its directory's name: its rows would be filed under another run (the pipeline keeps run X in
    results/runs/X)."""
    name = directory_name(path.parent)
    if run_id != name:
        raise ValueError(f"{path}: run_id is {run_id!r}, but its run directory is {name!r} (a run directory "
                         "holds the run it is named after)")


def check_rows_of_run(path: Path, table: pa.Table, run_id: str) -> None:
    """A ValueError naming ``path`` (a run directory's Parquet file) when a row is not of ``run_id``."""
    if "run_id" not in table.column_names:
        raise ValueError(f"{path} has no column 'run_id'")
    others = sorted(set(table.column("run_id").unique().to_pylist()) - {run_id}, key=str)
    if others:
        raise ValueError(f"{path} holds rows of run {others[0]!r}, not of its directory's run {run_id!r}")


def read_run_json(path: Path) -> dict[str, Any]:
    """A run directory's run.json or config.json (``path``), which must name its directory's run
    (:func:`check_names_its_run`)."""
    contents = read_json(path)
    check_names_its_run(path, run_id_in(path, contents))
    return contents


def read_run_table(path: Path) -> pa.Table:
    """A run directory's Parquet file (``path``: train_metrics.parquet, evals.parquet), checked against
    its sidecar and holding rows of its directory's run only (:func:`check_rows_of_run`)."""
    table = read_table_parquet(path)
    check_rows_of_run(path, table, directory_name(Path(path).parent))
    return table


# run.json's fields that are a completed run's final (eval) step in its train_metrics: field → metrics column
SUMMARY_OF_FINAL_STEP = {"final_val_loss": "val_loss", "final_val_accuracy": "val_accuracy",
                         "lipschitz_bound": "lipschitz_bound", "max_activation": "max_activation"}


def check_summary_matches_metrics(run_json: Path, summary: dict[str, Any], metrics: pa.Table) -> None:
    """A ValueError naming ``run_json`` (which has no checksum) when a completed run's ``summary`` (its
    fields, or the ``runs`` row made of them) is not what its checksummed metrics say: ``steps_completed``
    the last step, and each field of :data:`SUMMARY_OF_FINAL_STEP` that of the last eval step (the final
    step is one), null where the metrics hold none. A column the metrics lack (from before it was logged)
    or a field the summary lacks (``lipflow.load_run`` reads run.json as written; the build requires
    every field) is not compared. An edit to run.json (a bound of 1.5 for a model without a
    certificate, none for one with it) is refused, never loaded as fact."""
    if summary.get("status") != "completed" or metrics.num_rows == 0 or "step" not in metrics.column_names:
        return
    steps = metrics.column("step").to_pylist()
    last = max(steps)
    if "steps_completed" in summary and summary["steps_completed"] != last:
        raise ValueError(f"{run_json}: steps_completed is {summary['steps_completed']}, but its train_metrics end "
                         f"at step {last} (edited?)")
    final = metrics.slice(len(steps) - 1 - steps[::-1].index(last), 1).to_pylist()[0]
    for key, column in SUMMARY_OF_FINAL_STEP.items():
        if key in summary and column in final and not same_measurement(summary[key], final[column]):
            raise ValueError(f"{run_json}: {key} is {summary[key]!r}, but its train_metrics say {final[column]!r} "
                             f"at the final step {last} (edited?)")


def same_measurement(recorded: float | None, measured: float | None) -> bool:
    """Whether run.json's ``recorded`` value is the metrics' ``measured`` one: both null, both NaN, or
    numbers equal to 1e-9 relative (a value of another type, hand-written, is none of these)."""
    if recorded is None or measured is None:
        return recorded is measured
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (recorded, measured)):
        return False
    if math.isnan(recorded) or math.isnan(measured):
        return math.isnan(recorded) and math.isnan(measured)
    return math.isclose(recorded, measured, rel_tol=1e-9, abs_tol=0.0)


def check_evaluation_table(path: Path, table: pa.Table) -> None:
    """A ValueError naming ``path`` unless its ``table`` is an evaluation table: the
    :data:`EVALUATION_COLUMNS`, every row of a run, ``value`` numbers (the views compute with them)."""
    missing = [c for c in EVALUATION_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} is not an evaluation table (it has no column '{missing[0]}')")
    if table.column("run_id").null_count:
        raise ValueError(f"{path} is not an evaluation table (a row has no run_id)")
    value = table.schema.field("value").type
    if not (pa.types.is_integer(value) or pa.types.is_floating(value) or pa.types.is_null(value)):
        raise ValueError(f"{path} is not an evaluation table (its column 'value' is {value}, not numbers)")


def concat_files(named: list[tuple[Path, pa.Table]], what: str) -> pa.Table:
    """The files' tables (``named``: file, table) as one, columns unioned by name (a number column
    takes the widest type); columns whose types cannot be joined are a ValueError naming ``what``
    and the first two files that clash."""
    try:
        return pa.concat_tables([table for _, table in named], promote_options="permissive")
    except pa.ArrowException as err:
        raise ValueError(f"{what} cannot be merged: {_first_clash(named) or str(err).splitlines()[0]}") from None


def _first_clash(named: list[tuple[Path, pa.Table]]) -> str | None:
    """'<file> and <file> differ (<which column, which types>)' for the first two files whose
    columns cannot be joined, or None when only all of them together clash."""
    for index, (path, table) in enumerate(named):
        for earlier, other in named[:index]:
            try:
                pa.unify_schemas([other.schema, table.schema], promote_options="permissive")
            except pa.ArrowException as err:
                return f"{earlier} and {path} differ ({str(err).splitlines()[0]})"
    return None
