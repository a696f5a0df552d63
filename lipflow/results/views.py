"""DuckDB views over the results tables, declared by the experiments (``lipflow/experiments/<name>.py``).

A :class:`View` has declared output columns, in order, and one or more :class:`Part`\\ s, each a
SELECT with the (table → columns) it needs. :func:`create_views` creates every view on a freshly
built database: a view unites those of its parts whose tables and columns exist and that
select at least one row. A view with none (the experiment did not run, or the ICL study is off) is
still created, empty, with the same columns and types, and ``COMMENT ON VIEW`` records why (a
built view's comment is its caption's text):
``select view_name, comment from duckdb_views() where comment like 'empty%'``.

A column name has one DuckDB type in every view: a column that several views have takes its type from
:data:`SHARED_TYPES`; a view types only its own columns (``types``), and
:func:`check_column_types` rejects a name that two views type on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

REPORT_DIR = Path(__file__).resolve().parent.parent.parent / "workflow" / "report"  # the views' captions
RUNS_NEED = ("run_id", "name", "status", "experiment")  # the runs columns every experiment view filters on

# DuckDB type → the columns that several views share, typed once here.
SHARED_COLUMNS: dict[str, tuple[str, ...]] = {
    "VARCHAR": ("run_id", "name", "label", "domain", "model", "optimizer", "weight_constraint", "parametrization",
                "method", "setting"),
    "BIGINT": ("width", "step", "seed"),
    "DOUBLE": ("lr", "accuracy", "val_loss", "max_activation"),
    "BOOLEAN": ("depth_mup",),
}


def by_column(types: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """DuckDB type → columns, turned into column → type; a column listed under two types is an error."""
    typed: dict[str, str] = {}
    for sql_type, columns in types.items():
        for column in columns:
            if column in typed:
                raise ValueError(f"column {column!r} is listed as both {typed[column]} and {sql_type}")
            typed[column] = sql_type
    return typed


SHARED_TYPES: dict[str, str] = by_column(SHARED_COLUMNS)


@dataclass(frozen=True)
class Part:
    """One SELECT of a view and the (table → columns) it needs; a view unites its available parts."""

    sql: str
    requires: dict[str, tuple[str, ...]]
    absent_reason: str = ""


@dataclass(frozen=True)
class View:
    """A view: its output columns, in order, the DuckDB types of those that are its own (type →
    columns; the others' types are :data:`SHARED_TYPES`), its parts, and its caption, a file of
    workflow/report that describes its CSV table in the Snakemake report and the view in DuckDB
    (:attr:`description`). A column with no type, or with a type here and one in SHARED_TYPES, is an
    error when the view is declared."""

    columns: tuple[str, ...]
    parts: tuple[Part, ...]
    caption: str
    types: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    depends_on: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        own = by_column(self.types)
        retyped = sorted(set(own) & set(SHARED_TYPES))
        untyped = [c for c in self.columns if c not in own and c not in SHARED_TYPES]
        unlisted = sorted(set(own) - set(self.columns))
        for problem, names in (("is typed in SHARED_TYPES already; a column has one type in every view", retyped),
                               ("has no type: give it in the view's types", untyped),
                               ("is typed but is not one of the view's columns", unlisted)):
            if names:
                raise ValueError(f"view of {self.caption}: column {names[0]!r} {problem}")

    @property
    def description(self) -> str:
        """The caption file's text on one line, without its ````literal```` markup: the view's comment."""
        return " ".join((REPORT_DIR / self.caption).read_text(encoding="utf-8").replace("``", "").split())

    @property
    def column_types(self) -> dict[str, str]:
        """Output column → DuckDB type, in column order."""
        own = by_column(self.types)
        return {c: own[c] if c in own else SHARED_TYPES[c] for c in self.columns}

    def select(self, part: Part) -> str:
        cols = ", ".join(f"CAST({c} AS {t}) AS {c}" for c, t in self.column_types.items())
        return f"SELECT {cols} FROM ({part.sql.strip()})"

    def empty(self) -> str:
        cols = ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in self.column_types.items())
        return f"SELECT {cols} WHERE false"


def check_column_types(views: Mapping[str, View]) -> None:
    """A column that two views type on their own must be typed once, in SHARED_TYPES (so a name has
    one type in every view); raises ValueError naming the column and both views."""
    typed_by: dict[str, str] = {}
    for name, view in views.items():
        for column in by_column(view.types):
            if column in typed_by:
                raise ValueError(f"column {column!r} is typed by views {typed_by[column]} and {name}: a column views "
                                 "share is typed once, in lipflow.results.views.SHARED_COLUMNS: move it there from both "
                                 "views' types (in their lipflow/experiments/<name>.py)")
            typed_by[column] = name


def _columns(con) -> dict[str, set[str]]:
    rows = con.execute("SELECT table_name, column_name FROM information_schema.columns").fetchall()
    found: dict[str, set[str]] = {}
    for table, column in rows:
        found.setdefault(table, set()).add(column)
    return found


def missing_requirement(con, part: Part) -> str | None:
    """Why ``part`` cannot be built on ``con`` (a missing table or column), or None."""
    present = _columns(con)
    for table, needed in part.requires.items():
        if table not in present:
            return f"table {table} is absent"
        lacking = [c for c in needed if c not in present[table]]
        if lacking:
            return f"{table} has no column {', '.join(lacking)}"
    return None


def create_views(con, views: Mapping[str, View], log=None) -> dict[str, str]:
    """Create each of ``views`` (name → View) on ``con``; returns view → '' (built) or the reason
    it is empty, and prints one status line per view to ``log`` (default stdout: progress, not errors,
    so a failing build's stderr is its one error line).

    A view unites those of its parts whose tables and columns exist and that select at least one
    row; with none, it is created empty (same columns) and commented 'empty: <reason>'.
    """
    status = {}
    for name in view_order(views):
        view = views[name]
        selects, reasons = [], []
        for part in view.parts:
            missing = missing_requirement(con, part)
            if missing is None:
                sql = view.select(part)
                if con.execute(f"SELECT count(*) FROM ({sql})").fetchall()[0][0]:
                    selects.append(sql)
                    continue
            detail = f" ({missing})" if missing and missing not in part.absent_reason else ""
            reasons.append(part.absent_reason + detail)
        body = " UNION ALL ".join(selects) if selects else view.empty()
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
        comment = view.description if selects else f"empty: {'; '.join(reasons)}"
        con.execute(f"COMMENT ON VIEW {name} IS '{_sql_string(comment)}'")
        status[name] = "" if selects else comment
        print(f"view {name}: {'built' if selects else comment}", file=log)
    return status


def view_order(views: Mapping[str, View]) -> list[str]:
    """View names, sorted, with every view after the views it reads (``depends_on``)."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name not in ordered:
            for dependency in views[name].depends_on:
                visit(dependency)
            ordered.append(name)

    for name in sorted(views):
        visit(name)
    return ordered


def _sql_string(text: str) -> str:
    return text.replace("'", "''")
