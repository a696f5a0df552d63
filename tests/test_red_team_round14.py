"""Red-team round 14: bad inputs the earlier catalogs did not reach, each one line, exit 2, nothing replaced."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import run_stage
from lipflow.results.inputs import EVALUATION_COLUMNS


def one_error_line(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    return lines[0]


def test_merge_over_a_table_of_evaluation_column_names_but_nested_values_is_one_line(tmp_path):
    """A file at --out with the evaluation columns' names whose run_id holds lists (no evaluation table) is
    refused in one line naming --out, and kept; pyarrow's group-by of list keys raised a traceback."""
    out = tmp_path / "evals.parquet"
    pq.write_table(pa.table({c: pa.array([[1]]) for c in EVALUATION_COLUMNS}), out)
    before = out.read_bytes()
    done = run_stage("lipflow.results", "merge-evals", "--run-id", "r-0000000a", "--out", str(out), cwd=tmp_path)
    line = one_error_line(done)
    assert "--out" in line and str(out) in line, line
    assert out.read_bytes() == before
