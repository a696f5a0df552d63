"""Print benchmark rows as one Markdown table (for the README): bench, metric, value, unit, device, date, commit.

    python bench/summarize.py [--exclude SUBSTR ...] FILE.parquet [FILE.parquet ...]

Missing files are named and skipped (a section of bench/gpu_check that failed wrote none); a file that
is not a bench table (not Parquet, or without a column the table shows) is one line naming it, exit
code 2, before anything is printed. Rows whose metric contains an ``--exclude`` string are left out
(bench/gpu_check leaves out train_step's per-op profile rows, which its log prints as a table of their
own).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory would come first on sys.path, where bench/tokenize.py
# shadows the standard library's ``tokenize``: put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from lipflow.data.parquet import parse_table_parquet  # noqa: E402
from lipflow.errors import summary_of  # noqa: E402

COLUMNS = ("bench", "metric", "value", "unit", "device", "date", "git_commit")  # the ones the table shows


def read_rows(path: Path) -> list[dict]:
    """The rows of a bench table; a file that is not Parquet, or lacks a column of :data:`COLUMNS`, is a
    one-line ValueError naming it."""
    table = parse_table_parquet(path.read_bytes(), path)
    missing = [column for column in COLUMNS if column not in table.column_names]
    if missing:
        raise ValueError(f"{path} has no column {missing[0]}: not a bench table (bench/common.py)")
    return table.select(list(COLUMNS)).to_pylist()


def short_commit(commit: str | None) -> str:
    """The commit's first 12 digits, keeping the ``-dirty`` mark of a tree with uncommitted changes (bench/common.py's
    git_commit): a dirty tree's numbers are not that commit's."""
    if not commit:
        return ""
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("--exclude", action="append", default=[], metavar="SUBSTR",
                        help="leave out rows whose metric contains this (repeatable)")
    parser.add_argument("files", nargs="+", metavar="FILE.parquet")
    args = parser.parse_args(argv)
    tables, missing = [], []
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            missing.append(name)
            continue
        try:
            tables.append(read_rows(path))
        except ValueError as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
    print("| bench | metric | value | unit | device | date | commit |")
    print("|---|---|---|---|---|---|---|")
    for rows in tables:
        for r in rows:
            if any(part in (r["metric"] or "") for part in args.exclude):
                continue
            value = "" if r["value"] is None else f"{r['value']:.4g}"
            print(f"| {r['bench']} | {r['metric']} | {value} | {r['unit']} | {r['device']} | "
                  f"{(r['date'] or '')[:10]} | {short_commit(r['git_commit'])} |")
    for name in missing:
        print(f"(no rows: {name} was not written)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
