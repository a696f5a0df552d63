"""Figures and tables of lipflow.plots: row order of the CSV tables, figure errors, degenerate data."""

from __future__ import annotations

import duckdb

from lipflow.results.figures import write_table


def test_a_tables_rows_are_sorted_by_every_column_whatever_order_the_view_yields(tmp_path):
    """A view without ORDER BY gave its CSV rows in the order DuckDB produced them (on a database of the
    experiments' views, differently ordered files from one run to the next)."""
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT * FROM (VALUES ('b', 2, 0.5), ('a', 9, NULL), ('b', 1, 0.25), "
                "('a', 3, 1.0)) AS v(method, width, loss)")
    con.execute("CREATE VIEW v AS SELECT * FROM t")
    path = write_table(con, "v", tmp_path)
    assert path.read_text().splitlines() == ["method,width,loss", "a,3,1.0", "a,9,", "b,1,0.25", "b,2,0.5"]
