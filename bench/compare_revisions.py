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

from lipflow.errors import count_argument, summary_of  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, passed = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("rev_a")
    parser.add_argument("rev_b")
    parser.add_argument("script", help="path of the bench script inside the repository, e.g. bench/train_step.py")
    parser.add_argument("--repeats", type=count_argument(1), default=3)
    parser.add_argument("--metrics", nargs="*", default=[])
    args = parser.parse_args(own)
    revs = (args.rev_a, args.rev_b)
    for rev in revs:
        found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                               capture_output=True, text=True)
        if found.returncode != 0:
            parser.exit(2, f"{parser.prog}: error: '{rev}' is not a commit of {REPO}\n")
    # keyed by position, so that a revision against itself (an A/A run: the noise) keeps two columns
    values: tuple[dict[str, list[float]], ...] = (defaultdict(list), defaultdict(list))
    units: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees: list[Path] = []
        try:
            for side, rev in enumerate(revs):
                trees.append(Path(tmp) / f"tree-{side}")
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(trees[side]), rev],
                               check=True)
            for repeat in range(args.repeats):
                for side in ((0, 1) if repeat % 2 == 0 else (1, 0)):
                    out = Path(tmp) / f"{len(list(Path(tmp).glob('*.parquet')))}.parquet"
                    print(f"=== {revs[side]}: {args.script} {' '.join(passed)} (repeat {repeat + 1})", flush=True)
                    done = subprocess.run([sys.executable, str(trees[side] / args.script), *passed, "--out", str(out)],
                                          cwd=trees[side])
                    if done.returncode != 0:
                        raise SystemExit(f"compare_revisions: {args.script} failed at {revs[side]} "
                                         f"(exit {done.returncode})")
                    for r in pq.read_table(out).to_pylist():
                        if not args.metrics or any(m in r["metric"] for m in args.metrics):
                            values[side][r["metric"]].append(r["value"])
                            units[r["metric"]] = r["unit"]
        finally:
            for tree in trees:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"\n| metric | unit | {args.rev_a} | {args.rev_b} | B/A |\n|---|---|---|---|---|")
    for metric in values[0]:
        if metric in values[1]:
            a, b = statistics.median(values[0][metric]), statistics.median(values[1][metric])
            print(f"| {metric} | {units[metric]} | {a:.4g} | {b:.4g} | {b / a if a else float('nan'):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
