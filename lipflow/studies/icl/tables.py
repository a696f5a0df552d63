"""The ICL study's result tables: one Arrow schema each, written to results/icl/<table>.parquet
(and loaded into DuckDB as ``icl_<table>`` by :mod:`lipflow.results.database`), plus the baselines
file that the collect job reads (:data:`BASELINE_SCHEMA`). The jobs that fill them are in
:mod:`lipflow.studies.icl.study`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from lipflow.data.parquet import write_table_parquet

LOSS_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("n_layers", pa.int64()),
        ("n", pa.int64()),
        ("loss", pa.float64()),  # mean over the test prompts of (prediction − y_query)²
        ("loss_stderr", pa.float64()),
        ("expected_loss", pa.float64()),  # population value where a closed form exists
    ]
)
BASELINE_SCHEMA = pa.schema(
    list(LOSS_SCHEMA)
    + [
        ("step_sizes", pa.list_(pa.float64())),
        ("preconditioners", pa.list_(pa.list_(pa.float64()))),  # per step, Γ row-major
    ]
)
TABLE_SCHEMAS = {
    "loss_by_layers": LOSS_SCHEMA,
    "loss_by_n": LOSS_SCHEMA,
    "preconditioner": pa.schema(
        [
            ("source", pa.string()),  # transformer or a baseline method
            ("block", pa.string()),  # gamma (= −Q) or p
            ("n_layers", pa.int64()),
            ("n", pa.int64()),
            ("layer", pa.int64()),
            ("row", pa.int64()),
            ("col", pa.int64()),
            ("value", pa.float64()),
        ]
    ),
    "preconditioner_error": pa.schema(
        [
            ("source", pa.string()),
            ("n_layers", pa.int64()),
            ("n", pa.int64()),
            ("layer", pa.int64()),
            ("reference", pa.string()),  # one_step_optimal (Γ⋆) or pgd (a_(rank) Σ⁻¹)
            ("rel_frobenius_error", pa.float64()),
            ("sigma_weighted_error", pa.float64()),
            ("dist_whitened", pa.float64()),  # Dist(Σ^{1/2} Γ Σ^{1/2}, I)
            ("dist_identity", pa.float64()),  # Dist(Γ, I)
            ("step_size", pa.float64()),  # tr(ΣΓ)/d
            ("reference_step_size", pa.float64()),
        ]
    ),
    "step_sizes": pa.schema(
        [
            ("n_layers", pa.int64()),
            ("n", pa.int64()),
            ("rank", pa.int64()),  # position after sorting ascending
            ("layer", pa.int64()),  # the layer that holds it (Lemma 4: any order)
            ("learned", pa.float64()),
            ("optimal_pgd", pa.float64()),
            ("rel_error", pa.float64()),
        ]
    ),
    "agreement": pa.schema(
        [
            ("n_layers", pa.int64()),
            ("n", pa.int64()),
            ("reference", pa.string()),
            ("transformer_loss", pa.float64()),
            ("reference_loss", pa.float64()),
            ("loss_ratio", pa.float64()),
            ("prediction_mse", pa.float64()),  # mean (ŷ_model − ŷ_ref)²
            ("relative_prediction_mse", pa.float64()),  # ÷ mean ŷ_ref²
            ("prediction_correlation", pa.float64()),
        ]
    ),
    "training": pa.schema(
        [
            ("n_layers", pa.int64()),
            ("n", pa.int64()),
            ("step", pa.int64()),
            ("loss", pa.float64()),
            ("lr", pa.float64()),
            ("seconds", pa.float64()),  # wall-clock time since the start of training
        ]
    ),
}
PLOTTED_METHODS = ("transformer", "pgd", "gd", "least_squares")
LOSS_TABLE_METHODS = ("transformer", "pgd", "pgd_constant", "gd", "least_squares", "one_step_optimal")


def write_table(rows: list[dict[str, Any]], schema: pa.Schema, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_table_parquet(path, pa.Table.from_pylist(rows, schema=schema))
