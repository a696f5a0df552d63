"""Results stage: per-run Parquet/JSON → one DuckDB database.

``python -m lipflow.results build --out results/lipflow.duckdb --manifest M --run-dirs D...``
rebuilds the whole database in a temp file and renames it into place, so readers never see a
half-built file and a rebuild is idempotent. Tables:

- ``runs``: one row per run: status, flattened config keys, ``config`` (JSON), provenance;
- ``train_metrics``: per-step loss and, at eval steps, val metrics, bound, activations;
- ``evals``: long form (run_id, eval, metric, value, parameter columns);
- ``shards``: the token shards (split, file, tokens, sha256);
- ``icl_<name>``: every ``results/icl/<name>.parquet`` of the ICL study;
- ``bench``: every ``results/bench/*.parquet`` row.

``python -m lipflow.results merge-evals --out F E...`` merges one run's evaluation files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from lipflow.experiments import create_views
from lipflow.metrics import write_table_parquet

RESULTS = Path("results")


def _timestamp(seconds: float | None) -> dt.datetime | None:
    """UTC as a naive TIMESTAMP (a TIMESTAMPTZ would need pytz in every client)."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(tzinfo=None) if seconds else None


def run_row(run_dir: Path) -> dict[str, Any]:
    """One ``runs`` row from a run directory's run.json and config.json."""
    summary = json.loads((run_dir / "run.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    flat = {k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v) for k, v in cfg.items()}
    row = {
        "run_id": summary["run_id"], "name": summary["run_id"].rsplit("-", 1)[0],
        "status": summary["status"], **flat,
        "config": json.dumps(cfg, sort_keys=True), "config_hash": summary["config_hash"],
        "git_commit": summary["git_commit"], "versions": json.dumps(summary["versions"], sort_keys=True),
        "hostname": summary["hostname"], "device": summary["device"], "processes": summary["processes"],
        "slurm_job_id": summary["slurm_job_id"], "cuda_visible_devices": summary["cuda_visible_devices"],
        "start_time": _timestamp(summary["start_time"]), "end_time": _timestamp(summary["end_time"]),
        "steps_completed": summary["steps_completed"], "diverged_step": summary["diverged_step"],
        "diverged_reason": summary["diverged_reason"], "resumed": summary["resumed"],
        "n_params": summary["n_params"], "vocab_size": summary["vocab_size"],
        "lipschitz_bound": summary["lipschitz_bound"], "max_activation": summary["max_activation"],
        "final_val_loss": summary["final_val_loss"], "final_val_accuracy": summary["final_val_accuracy"],
    }
    return row


def shard_rows(manifest_path: Path) -> list[dict[str, Any]]:
    manifest = json.loads(Path(manifest_path).read_text())
    rows = []
    for split, info in manifest["splits"].items():
        for index, shard in enumerate(info["shards"]):
            rows.append({"split": split, "shard": index, "file": shard["file"], "tokens": shard["num_tokens"],
                         "sha256": shard["sha256"], "dtype": manifest["dtype"]})
    return rows


def _create_from_rows(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict[str, Any]]) -> None:
    arrow = pa.Table.from_pylist(rows)  # noqa: F841  (read by DuckDB's replacement scan)
    con.execute(f"CREATE TABLE {table} AS SELECT * FROM arrow")


def _create_from_parquet(con: duckdb.DuckDBPyConnection, table: str, files: list[Path], empty_sql: str) -> None:
    if files:
        listing = ", ".join(f"'{f}'" for f in files)
        con.execute(f"CREATE TABLE {table} AS SELECT * FROM read_parquet([{listing}], union_by_name=true)")
    else:
        con.execute(f"CREATE TABLE {table} ({empty_sql})")


def build(out: Path, manifest: Path, run_dirs: list[Path], results: Path = RESULTS) -> None:
    """Build the database at ``out`` from scratch, atomically."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(tmp))
        runs = [run_row(Path(d)) for d in run_dirs]
        val_loss = {}
        for d in run_dirs:
            evals = Path(d) / "evals.parquet"
            if evals.is_file():
                for r in pq.read_table(evals).to_pylist():
                    if r["eval"] == "val" and r["metric"] in ("loss", "accuracy", "perplexity"):
                        val_loss.setdefault(r["run_id"], {})[f"val_{r['metric']}"] = r["value"]
        for row in runs:
            row.update({"val_loss": None, "val_accuracy": None, "val_perplexity": None, **val_loss.get(row["run_id"], {})})
        _create_from_rows(con, "runs", runs)
        _create_from_parquet(con, "train_metrics", [Path(d) / "train_metrics.parquet" for d in run_dirs],
                             "run_id VARCHAR, step BIGINT, loss DOUBLE")
        _create_from_parquet(con, "evals", [p for d in run_dirs if (p := Path(d) / "evals.parquet").is_file()],
                             "run_id VARCHAR, eval VARCHAR, metric VARCHAR, value DOUBLE")
        _create_from_rows(con, "shards", shard_rows(manifest))
        for path in sorted((results / "icl").glob("*.parquet")):
            _create_from_parquet(con, f"icl_{path.stem}", [path], "")
        _create_from_parquet(con, "bench", sorted((results / "bench").glob("*.parquet")),
                             "bench VARCHAR, metric VARCHAR, value DOUBLE, unit VARCHAR, machine VARCHAR, "
                             "device VARCHAR, date VARCHAR, git_commit VARCHAR")
        create_views(con)
        con.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)


def merge_evals(out: Path, files: list[Path]) -> None:
    """Concatenate one run's evaluation files (columns unioned by name) into ``out``."""
    tables = [pq.read_table(f) for f in files]
    merged = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    write_table_parquet(Path(out), merged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lipflow.results")
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build the DuckDB database")
    p_build.add_argument("--out", type=Path, required=True)
    p_build.add_argument("--manifest", type=Path, required=True)
    p_build.add_argument("--run-dirs", type=Path, nargs="*", default=[])
    p_merge = sub.add_parser("merge-evals", help="merge one run's evaluation Parquet files")
    p_merge.add_argument("--out", type=Path, required=True)
    p_merge.add_argument("files", type=Path, nargs="*")
    args = parser.parse_args(argv)
    from lipflow.cli import run_guarded

    if args.command == "build":
        return run_guarded(lambda: build(args.out, args.manifest, args.run_dirs) or 0)
    return run_guarded(lambda: merge_evals(args.out, args.files) or 0)


if __name__ == "__main__":
    sys.exit(main())
