"""Print benchmark rows as one Markdown table (for the README): bench, metric, value, unit, device, date, commit.

    python bench/summarize.py [--exclude SUBSTR ...] FILE.parquet [FILE.parquet ...]

Missing files are named and skipped (a section of bench/gpu_check that failed wrote none). Rows whose
metric contains an ``--exclude`` string are left out (bench/gpu_check leaves out train_step's per-op
profile rows, which its log prints as a table of their own).
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

import pyarrow.parquet as pq  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exclude", action="append", default=[], metavar="SUBSTR",
                        help="leave out rows whose metric contains this (repeatable)")
    parser.add_argument("files", nargs="+", metavar="FILE.parquet")
    args = parser.parse_args(argv)
    print("| bench | metric | value | unit | device | date | commit |")
    print("|---|---|---|---|---|---|---|")
    missing = []
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            missing.append(name)
            continue
        for r in pq.read_table(path).to_pylist():
            if any(part in r["metric"] for part in args.exclude):
                continue
            print(f"| {r['bench']} | {r['metric']} | {r['value']:.4g} | {r['unit']} | {r['device']} | "
                  f"{r['date'][:10]} | {(r['git_commit'] or '')[:12]} |")
    for name in missing:
        print(f"(no rows: {name} was not written)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
