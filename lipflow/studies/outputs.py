"""What a study's command may replace: its own earlier output only, a file that matches its
``.sha256`` sidecar *and* is of the kind the command writes there
(:func:`lipflow.atomic.refuse_to_replace_unsealed`). A run's weights or metrics match their sidecars
too, so a sidecar alone is no proof that a file is the study's."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq


def parquet_with_columns(columns: Iterable[str]) -> Callable[[Path], bool]:
    """A test of whether a file is a Parquet table whose columns are exactly ``columns``, in order."""
    expected = list(columns)

    def is_table(path: Path) -> bool:
        try:
            return pq.read_schema(path).names == expected
        except (pa.ArrowException, OSError):
            return False

    return is_table


RECEIPT_KEY = "written"  # the one key of a study's table command's --receipt (lipflow.atomic.write_receipt)
