"""The experiments' figures and tables, drawn from the results database's views.

``python -m lipflow.plots --db results/lipflow.duckdb --out-dir results/figures
[--tables-dir results/tables] [--experiment NAME ...]``

Each experiment's file (``lipflow/experiments/<name>.py``) declares its figures (``FIGURES``: a
function reading its views and returning a matplotlib figure), saved as ``<out-dir>/<figure>.png``
and ``.svg`` (Agg backend, written to a temp file and renamed). ``--tables-dir`` also writes each of
the experiment's views as CSV. Without ``--experiment`` every experiment whose headline view has
rows is drawn and the others are listed as skipped; a named experiment whose headline view is empty
is an error that quotes the reason recorded on the view.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Callable

from lipflow.errors import ArgumentParser
from lipflow.experiments import CATALOG
from lipflow.results.plotting import pyplot, read_view

FORMATS = ("png", "svg")


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = out_dir / f"{name}.{fmt}"
        _replace_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight"))
        paths.append(path)
    pyplot().close(fig)
    return paths


def write_table(con, name: str, tables_dir: Path) -> Path:
    tables_dir.mkdir(parents=True, exist_ok=True)
    path = tables_dir / f"{name}.csv"
    _replace_atomically(path, lambda tmp: read_view(con, name).to_csv(tmp, index=False))
    return path


def empty_reason(con, name: str) -> str | None:
    """None when the view has rows; else the comment recorded on it by create_views."""
    if con.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0]:
        return None
    rows = con.execute("SELECT comment FROM duckdb_views() WHERE view_name = ?", [name]).fetchall()
    return (rows[0][0] if rows and rows[0][0] else "empty").removeprefix("empty: ")


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
            written += save_figure(figure.draw(con), out_dir, figure_name)
        if tables_dir is not None:
            written += [write_table(con, view, tables_dir) for view in experiment.views]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m lipflow.plots", description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("results/lipflow.duckdb"))
    parser.add_argument("--out-dir", type=Path, default=Path("results/figures"))
    parser.add_argument("--tables-dir", type=Path, default=None, help="also write each view as CSV here")
    parser.add_argument("--experiment", action="append", default=None,
                        help=f"one of {', '.join(CATALOG)} (repeatable; default: all with data)")
    args = parser.parse_args(argv)
    from lipflow.cli import connect
    from lipflow.errors import run_guarded

    def go() -> int:
        for name in args.experiment or []:
            if name not in CATALOG:
                close = difflib.get_close_matches(name, CATALOG, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown experiment '{name}'{hint}; known: {', '.join(CATALOG)}")
        con = connect(args.db)
        written = draw(con, args.experiment or list(CATALOG), args.out_dir, args.tables_dir,
                       strict=bool(args.experiment))
        for path in written:
            print(path)
        return 0

    return run_guarded(go)
