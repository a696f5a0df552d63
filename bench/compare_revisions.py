"""One benchmark script at two git revisions, side by side: before/after numbers from one run.

    python bench/compare_revisions.py REV_A REV_B SCRIPT [--repeats N] [--metrics SUBSTR ...] -- ARGS...

Checks out both revisions into temporary git worktrees, then runs ``SCRIPT ARGS --out FILE`` in
each, alternating A, B, B, A, … ``--repeats`` times (so drift in the machine's load hits both
alike), and prints, for every metric whose name contains one of ``--metrics`` (default: all), the
median over repeats at each revision and B/A. Rows are not appended anywhere else: the script's own
rows of each repeat stay in the temporary directory. Needs a script that takes ``--out`` (every
bench/*.py does).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory would come first on sys.path, where bench/tokenize.py
# shadows the standard library's ``tokenize``: put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402

from lipflow.errors import summary_of  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, passed = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("rev_a")
    parser.add_argument("rev_b")
    parser.add_argument("script", help="path of the bench script inside the repository, e.g. bench/train_step.py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--metrics", nargs="*", default=[])
    args = parser.parse_args(own)
    values: dict[str, dict[str, list[float]]] = {args.rev_a: defaultdict(list), args.rev_b: defaultdict(list)}
    units: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for rev in (args.rev_a, args.rev_b):
            trees[rev] = Path(tmp) / f"tree-{len(trees)}"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(trees[rev]), rev],
                           check=True)
        try:
            for repeat in range(args.repeats):
                order = [args.rev_a, args.rev_b] if repeat % 2 == 0 else [args.rev_b, args.rev_a]
                for rev in order:
                    out = Path(tmp) / f"{len(list(Path(tmp).glob('*.parquet')))}.parquet"
                    print(f"=== {rev}: {args.script} {' '.join(passed)} (repeat {repeat + 1})", flush=True)
                    subprocess.run([sys.executable, str(trees[rev] / args.script), *passed, "--out", str(out)],
                                   cwd=trees[rev], check=True)
                    for r in pq.read_table(out).to_pylist():
                        if not args.metrics or any(m in r["metric"] for m in args.metrics):
                            values[rev][r["metric"]].append(r["value"])
                            units[r["metric"]] = r["unit"]
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"\n| metric | unit | {args.rev_a} | {args.rev_b} | B/A |\n|---|---|---|---|---|")
    for metric in values[args.rev_a]:
        if metric in values[args.rev_b]:
            a, b = statistics.median(values[args.rev_a][metric]), statistics.median(values[args.rev_b][metric])
            print(f"| {metric} | {units[metric]} | {a:.4g} | {b:.4g} | {b / a if a else float('nan'):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
