"""Results stage: every table loaded into one DuckDB database, the experiments' views on it, and
their figures and tables.

- :mod:`lipflow.results.database`: :func:`build` (runs, metrics, evals, shards, the studies' tables,
  bench measurements), then the views;
- :mod:`lipflow.results.inputs`: the checks of what the build reads (run.json and config.json values,
  run ids, files that share a table);
- :mod:`lipflow.results.views`: :class:`View` and :func:`create_views` (the SQL lives in each
  experiment's file, ``lipflow/experiments/<name>.py``);
- :mod:`lipflow.results.figures`: draws the experiments' figures and writes their views as CSV
  (``python -m lipflow.plots``), and the ``runs`` block's training curves
  (:mod:`lipflow.results.training_curves`);
- :mod:`lipflow.results.cli`: ``python -m lipflow.results build | merge-evals | seal``.

Nothing here imports torch; the public names below are loaded on first use, so an experiment file
can import :mod:`lipflow.results.views` without loading DuckDB.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "build": "lipflow.results.database",
    "check_database": "lipflow.results.database",
    "load_study_tables": "lipflow.results.database",
    "run_row": "lipflow.results.database",
    "SUMMARY_COLUMNS": "lipflow.results.database",
    "STUDIES": "lipflow.results.database",
    "main": "lipflow.results.cli",
    "merge_evals": "lipflow.results.cli",
    "seal": "lipflow.results.cli",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lipflow.results' has no attribute '{name}'")
