"""The experiments' figures and tables, drawn from the results database's views, and the ``runs``
block's training curves.

``python -m lipflow.plots --db results/lipflow.duckdb --out-dir results/figures
[--tables-dir results/tables] [--experiment NAME ...]``, or ``… --training-curves`` for the one
figure of :mod:`lipflow.results.training_curves`.

Each experiment's file (``lipflow/experiments/<name>.py``) declares its figures (``FIGURES``: a
function reading its views and returning a matplotlib figure), saved as ``<out-dir>/<figure>.png``
and ``.svg`` (Agg backend, written to a temp file and renamed; a file there that lipflow did not
write is refused, not replaced). ``--tables-dir`` also writes each of
the experiment's views as CSV. Without ``--experiment`` every experiment whose headline view has
rows is drawn and the others are listed as skipped; a named experiment whose headline view is empty
is an error that quotes the reason recorded on the view, and a database without an experiment's view
(not a lipflow database, or one built before the view existed) is an error naming both.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

from lipflow.errors import ArgumentParser, summary_of
from lipflow.experiments import CATALOG
from lipflow.atomic import (check_folder_exists, is_sealed, refuse_to_replace, refuse_to_replace_receipt,
                            refuse_to_replace_sidecar, sidecar_path, write_receipt, write_with_sidecar)
from lipflow.results import training_curves
from lipflow.results.plotting import RECEIPT_KEY, pyplot, read_view, refuse_to_replace_figure, write_figure

FORMATS = ("png", "svg")


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.{fmt}" for fmt in FORMATS]
    for path, fmt in zip(paths, FORMATS):
        write_figure(fig, path, fmt)
    pyplot().close(fig)
    return paths


def write_table(con, name: str, tables_dir: Path) -> Path:
    """View ``name`` as ``<tables_dir>/<name>.csv``, its rows sorted by every column left to right (a
    view without ORDER BY came out in the order DuckDB's threads finished: the same database gave
    differently ordered CSVs from one run to the next), with its ``.sha256`` sidecar, which marks the
    file as lipflow's after the view's columns change (:func:`refuse_to_replace_others`)."""
    tables_dir.mkdir(parents=True, exist_ok=True)
    path = tables_dir / f"{name}.csv"
    write_with_sidecar(path, read_view(con, name, "ORDER BY ALL").to_csv(index=False).encode("utf-8"))
    return path


def view_columns(con, name: str) -> list[str]:
    return [column[0] for column in con.execute(f"SELECT * FROM {name} LIMIT 0").description]


def check_views(con, db: Path, experiments: list[str]) -> None:
    """A ValueError naming ``db`` and the first view of ``experiments`` it lacks (not a lipflow
    database, or one built before the view existed), before anything is read or drawn."""
    present = {name for (name,) in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    for name in experiments:
        missing = [view for view in CATALOG[name].views if view not in present]
        if missing:
            raise ValueError(f"--db {db} has no view {missing[0]} (experiment {name}): not a lipflow database, "
                             "or built before the view existed (rebuild it: snakemake --forcerun database)")


def check_tables(con, db: Path, tables: tuple[str, ...]) -> None:
    """A ValueError naming ``db`` and the first of ``tables`` it lacks (not a lipflow database)."""
    present = {name for (name,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    missing = [table for table in tables if table not in present]
    if missing:
        raise ValueError(f"--db {db} has no table {missing[0]}: not a lipflow database")


NUMBER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT",
                "FLOAT", "DOUBLE", "DECIMAL")


def check_columns(con, db: Path, columns: dict[str, dict[str, str]]) -> None:
    """A ValueError naming ``db``, the table and the column when one of ``columns`` (table → column →
    ``text`` or ``number``) is missing or of another kind (a database edited by hand)."""
    for table, wanted in columns.items():
        types = dict(con.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ?",
                                 [table]).fetchall())
        for column, kind in wanted.items():
            found = types.get(column)
            if found is None:
                raise ValueError(f"--db {db}: table {table} has no column {column} (not a lipflow database?)")
            if found == '"NULL"':  # a column of nulls only (pyarrow's null type): nothing to misread
                continue
            is_number = found.split("(")[0] in NUMBER_TYPES
            if (kind == "number") != is_number or (kind == "text" and found != "VARCHAR"):
                raise ValueError(f"--db {db}: column {table}.{column} is {found}, not {kind} (edited by hand?)")


def refuse_to_replace_others(con, experiments: list[str], out_dir: Path, tables_dir: Path | None) -> None:
    """A FileExistsError before anything is drawn when a figure or table path of ``experiments``
    holds a file lipflow did not write there (a figure without lipflow's mark) or no longer holds what it
    wrote: a table is lipflow's when it matches its sidecar (also one written before its view gained a
    column), or, without a sidecar (written before tables had one), when it has the view's header; a table
    that does not match the sidecar beside it was edited by its user, whatever its header."""
    for name in experiments:
        for figure in CATALOG[name].figures:
            for fmt in FORMATS:
                refuse_to_replace_figure(out_dir / f"{figure}.{fmt}", "--out-dir")
        for view in CATALOG[name].views if tables_dir is not None else ():
            header = ",".join(view_columns(con, view))
            table = tables_dir / f"{view}.csv"
            refuse_to_replace(table, "--tables-dir", f"a table of view {view} as lipflow wrote it (an edited one "
                                                     "no longer matches its .sha256: move it away)",
                              lambda path: is_sealed(path) or (not sidecar_path(path).exists()
                                                               and first_line(path) == header))
            refuse_to_replace_sidecar(table, "--tables-dir")


def first_line(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return f.readline().rstrip("\r\n")


def empty_reason(con, name: str) -> str | None:
    """None when the view has rows; else the comment recorded on it by create_views."""
    if con.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0]:
        return None
    rows = con.execute("SELECT comment FROM duckdb_views() WHERE view_name = ?", [name]).fetchall()
    return (rows[0][0] if rows and rows[0][0] else "empty").removeprefix("empty: ")


def drawn(figure, con, experiment: str, name: str):
    """``figure.draw(con)``; a ValueError (matplotlib's, on data it cannot draw) names the figure and its
    experiment, which matplotlib's own message ("Data cannot be log-scaled …") did not."""
    try:
        return figure.draw(con)
    except ValueError as err:
        raise ValueError(f"figure {name} of experiment {experiment}: {err}") from err


def draw(con, experiments: list[str], out_dir: Path, tables_dir: Path | None, strict: bool) -> list[Path]:
    """Figures (and tables) of ``experiments``; an empty headline view raises when ``strict``."""
    written = []
    for name in experiments:
        experiment = CATALOG[name]
        headline = next(iter(experiment.views))
        reason = empty_reason(con, headline)
        if reason is not None:
            if strict:
                raise ValueError(f"experiment {name}: view {headline} is empty: {reason}")
            print(f"skipped {name}: view {headline} is empty: {reason}", file=sys.stderr)
            continue
        for figure_name, figure in experiment.figures.items():
            written += save_figure(drawn(figure, con, name, figure_name), out_dir, figure_name)
        if tables_dir is not None:
            written += [write_table(con, view, tables_dir) for view in experiment.views]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m lipflow.plots", description=summary_of(__doc__))
    parser.add_argument("--db", type=Path, default=Path("results/lipflow.duckdb"))
    parser.add_argument("--out-dir", type=Path, default=Path("results/figures"))
    parser.add_argument("--tables-dir", type=Path, default=None, help="also write each view as CSV here")
    parser.add_argument("--experiment", action="append", default=None,
                        help=f"one of {', '.join(CATALOG)} (repeatable; default: all with data)")
    parser.add_argument("--training-curves", action="store_true",
                        help=f"draw the runs block's training curves ({training_curves.FIGURE}.png, .svg) "
                             "instead of the experiments' figures")
    parser.add_argument("--receipt", type=Path, default=None,
                        help="written last: the files drawn, as JSON (the pipeline's record that the job finished)")
    args = parser.parse_args(argv)
    if args.training_curves and (args.experiment or args.tables_dir):
        parser.error("--training-curves draws one figure: without --experiment and --tables-dir")
    from lipflow.cli import connect
    from lipflow.errors import run_guarded

    def go() -> int:
        if args.receipt is not None:
            refuse_to_replace_receipt(args.receipt, RECEIPT_KEY, "lipflow.plots")
            if args.receipt.parent not in (args.out_dir, args.tables_dir):  # those two folders it makes itself
                check_folder_exists(args.receipt, "--receipt")  # before the figures are replaced, not after
        for flag, folder in (("--out-dir", args.out_dir), ("--tables-dir", args.tables_dir)):
            if folder is not None and folder.exists() and not folder.is_dir():
                raise NotADirectoryError(f"{flag} {folder} exists and is not a folder")
        if args.training_curves:
            for fmt in FORMATS:
                refuse_to_replace_figure(args.out_dir / f"{training_curves.FIGURE}.{fmt}", "--out-dir")
            con = connect(args.db)
            check_tables(con, args.db, ("runs", "train_metrics"))
            check_columns(con, args.db, training_curves.COLUMNS)
            return finish(save_figure(training_curves.draw(con), args.out_dir, training_curves.FIGURE))
        for name in args.experiment or []:
            if name not in CATALOG:
                close = difflib.get_close_matches(name, CATALOG, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown experiment '{name}'{hint}; known: {', '.join(CATALOG)}")
        con = connect(args.db)
        check_views(con, args.db, args.experiment or list(CATALOG))
        refuse_to_replace_others(con, args.experiment or list(CATALOG), args.out_dir, args.tables_dir)
        return finish(draw(con, args.experiment or list(CATALOG), args.out_dir, args.tables_dir,
                           strict=bool(args.experiment)))

    def finish(written: list[Path]) -> int:
        for path in written:
            print(path)
        if args.receipt is not None:
            write_receipt(args.receipt, RECEIPT_KEY, written)
        return 0

    return run_guarded(go)
