"""DuckDB views over the results tables, declared by the experiments (``lipflow/experiments/<name>.py``).

A :class:`View` has declared output columns (name → DuckDB type) and one or more :class:`Part`\\ s,
each a SELECT with the (table → columns) it needs. :func:`create_views` creates every view on a
freshly built database: a view unites those of its parts whose tables and columns exist and that
select at least one row. A view with none (the experiment did not run, or the ICL study is off) is
still created, empty, with the same columns and types, and ``COMMENT ON VIEW`` records why:
``select view_name, comment from duckdb_views() where comment like 'empty%'``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Mapping

RUNS_NEED = ("run_id", "name", "status", "experiment")  # the runs columns every experiment view filters on


@dataclass(frozen=True)
class Part:
    """One SELECT of a view and the (table → columns) it needs; a view unites its available parts."""

    sql: str
    requires: dict[str, tuple[str, ...]]
    absent_reason: str = ""


@dataclass(frozen=True)
class View:
    """A view: its declared output columns (name → DuckDB type), in order, its parts, and the caption
    (a file of workflow/report) of its CSV table in the Snakemake report."""

    columns: dict[str, str]
    parts: tuple[Part, ...]
    caption: str
    description: str = ""
    depends_on: tuple[str, ...] = field(default_factory=tuple)

    def select(self, part: Part) -> str:
        cols = ", ".join(f"CAST({c} AS {t}) AS {c}" for c, t in self.columns.items())
        return f"SELECT {cols} FROM ({part.sql.strip()})"

    def empty(self) -> str:
        cols = ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in self.columns.items())
        return f"SELECT {cols} WHERE false"


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


def create_views(con, views: Mapping[str, View], log=sys.stderr) -> dict[str, str]:
    """Create each of ``views`` (name → View) on ``con``; returns view → '' (built) or the reason
    it is empty.

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
