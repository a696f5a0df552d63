"""``python -m lipflow.results``: build the database, merge a run's evaluation files, seal old files.

``python -m lipflow.results build --out results/lipflow.duckdb --manifest M --run-dirs D... [--receipt R]``
builds the database (:func:`lipflow.results.database.build`);
``python -m lipflow.results merge-evals --out F E...`` merges one run's evaluation files;
``python -m lipflow.results seal F...`` writes the missing sidecars of trusted older files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from lipflow.atomic import read_verified, sha256_file, sidecar_path, write_bytes_atomic
from lipflow.data.parquet import read_table_parquet, write_table_parquet
from lipflow.errors import ArgumentParser


def merge_evals(out: Path, files: list[Path]) -> None:
    """Concatenate one run's evaluation files (columns unioned by name) into ``out`` (never one of them)."""
    if any(Path(out).resolve() == Path(f).resolve() for f in files):
        raise ValueError(f"--out {out} is also one of the files to merge")
    tables = [read_table_parquet(f) for f in files]
    merged = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    write_table_parquet(Path(out), merged)


def seal(files: list[Path]) -> None:
    """Write the sidecar of each file that has none (results written before lipflow kept checksums
    of its Parquet files: only for files you trust); a file that has one is checked instead. A new
    sidecar takes its file's modification time, so sealing reruns no Snakemake job."""
    for path in files:
        if sidecar_path(path).exists():
            read_verified(path)
            print(f"{path}: sha256 matches its sidecar")
        else:
            write_bytes_atomic(sidecar_path(path), (sha256_file(path) + "\n").encode())
            stat = os.stat(path)
            os.utime(sidecar_path(path), ns=(stat.st_atime_ns, stat.st_mtime_ns))
            print(f"{path}: sidecar written")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m lipflow.results")
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build the DuckDB database")
    p_build.add_argument("--out", type=Path, required=True)
    p_build.add_argument("--manifest", type=Path, required=True)
    p_build.add_argument("--run-dirs", type=Path, nargs="*", default=[])
    p_build.add_argument("--receipt", type=Path, default=None, help="JSON written after the database is in place")
    p_merge = sub.add_parser("merge-evals", help="merge one run's evaluation Parquet files")
    p_merge.add_argument("--out", type=Path, required=True)
    p_merge.add_argument("files", type=Path, nargs="*")
    p_seal = sub.add_parser("seal", help="write missing .sha256 sidecars of trusted files from before checksums")
    p_seal.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args(argv)
    from lipflow.errors import run_guarded

    if args.command == "build":
        from lipflow.results.database import build

        return run_guarded(lambda: build(args.out, args.manifest, args.run_dirs, receipt=args.receipt))
    if args.command == "seal":
        return run_guarded(lambda: seal(args.files))
    return run_guarded(lambda: merge_evals(args.out, args.files))
