"""Print benchmark rows as one Markdown table (for the README): bench, metric, value, unit, device, date, commit.

    python bench/summarize.py FILE.parquet [FILE.parquet ...]

Missing files are named and skipped (a section of bench/gpu_check that failed wrote none).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq


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
