"""Print benchmark rows as one Markdown table (for the README): bench, metric, value, unit, device, date, commit.

    python bench/summarize.py FILE.parquet [FILE.parquet ...]

Missing files are named and skipped (a section of bench/gpu_check that failed wrote none).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory would come first on sys.path, where bench/tokenize.py
# shadows the standard library's ``tokenize``: put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from pathlib import Path  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402


def main(argv: list[str]) -> int:
    print("| bench | metric | value | unit | device | date | commit |")
    print("|---|---|---|---|---|---|---|")
    missing = []
    for name in argv:
        path = Path(name)
        if not path.is_file():
            missing.append(name)
            continue
        for r in pq.read_table(path).to_pylist():
            print(f"| {r['bench']} | {r['metric']} | {r['value']:.4g} | {r['unit']} | {r['device']} | "
                  f"{r['date'][:10]} | {(r['git_commit'] or '')[:12]} |")
    for name in missing:
        print(f"(no rows: {name} was not written)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
