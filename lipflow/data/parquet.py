"""Parquet files with a ``.sha256`` sidecar (no torch: the results stage reads them too).

A writer publishes the file atomically (temp file, fsync, rename) with its sidecar
(:func:`lipflow.atomic.write_with_sidecar`); a reader checks the bytes against the sidecar
before parsing them, so a damaged or foreign file is one error naming it.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from lipflow.atomic import read_verified, write_with_sidecar

THREADED_READ_BYTES = 1 << 22  # Parquet files larger than this (4 MiB) are parsed on Arrow's threads


def write_table_parquet(path, table: pa.Table) -> None:
    """Write an Arrow table to ``path`` atomically (temp file, fsync, rename) with a ``.sha256``
    sidecar that :func:`read_table_parquet` checks."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    write_with_sidecar(path, buffer.getvalue().to_pybytes())


def read_table_parquet(path) -> pa.Table:
    """The Arrow table of a Parquet file written by :func:`write_table_parquet`, checked against its
    sidecar; a missing or mismatched sidecar, or bytes that are not Parquet, raise a ValueError
    naming the file."""
    return parse_table_parquet(read_verified(path), path)


def parse_table_parquet(data: bytes, path) -> pa.Table:
    """The Arrow table in the Parquet bytes ``data`` of file ``path`` (named by the ValueError they may raise).

    Parsed from an Arrow-owned copy: ``pq.read_table`` can drop its last reference to its input on one
    of Arrow's threads after it returns, and a buffer wrapping a Python object then takes the GIL; at
    interpreter exit Python stops that thread inside a C++ destructor and the process aborts (SIGABRT,
    'terminate called without an active exception') after a command's error line."""
    buffer = pa.allocate_buffer(len(data))
    pa.FixedSizeBufferWriter(buffer).write(data)
    try:  # Arrow's thread pool pays only for large files (a run's metrics parse 25% faster without it)
        return pq.read_table(pa.BufferReader(buffer), use_threads=len(data) > THREADED_READ_BYTES)
    except pa.ArrowException as err:
        raise ValueError(f"{path} is not a readable Parquet file ({str(err).splitlines()[0]})") from None


def table_of_rows(rows: list[dict]) -> pa.Table:
    """Dict rows as an Arrow table with every row's keys as columns (first-seen order; a key a row
    lacks is null there): ``pa.Table.from_pylist`` alone takes the first row's keys only."""
    columns = dict.fromkeys(key for row in rows for key in row)
    return pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])


def write_rows_parquet(path, rows: list[dict], columns: dict[str, str]) -> None:
    """Write dict rows with a fixed column → Arrow type-name schema (missing keys become null)."""
    schema = pa.schema([(name, pa.type_for_alias(kind)) for name, kind in columns.items()])
    write_table_parquet(path, pa.Table.from_pylist(rows, schema=schema))
