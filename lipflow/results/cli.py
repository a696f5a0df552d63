"""``python -m lipflow.results``: build the database, merge a run's evaluation files, seal old files.

``python -m lipflow.results build --out results/lipflow.duckdb [--manifest M] --run-dirs D... [--study-tables F...]
[--receipt R]`` builds the database (:func:`lipflow.results.database.build`; it loads the study tables F
and no others);
``python -m lipflow.results merge-evals --run-id RUN --out F E...`` merges run RUN's evaluation files;
``python -m lipflow.results seal F...`` writes the missing sidecars of trusted older files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lipflow.atomic import (is_checksum, read_verified, refuse_to_replace, refuse_to_replace_sidecar, sha256_file,
                            sidecar_digests, sidecar_path, write_bytes_atomic)
from lipflow.data.parquet import read_table_parquet, write_table_parquet
from lipflow.config import check_run_id
from lipflow.errors import ArgumentParser, check_distinct_paths
from lipflow.results.inputs import EVALUATION_COLUMNS, check_evaluation_table, concat_files


def is_evaluation_table(path: Path) -> bool:
    """Whether ``path`` is a Parquet file with the evaluation columns (an earlier evaluation output)."""
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return False
    return all(c in names for c in EVALUATION_COLUMNS)


def refuse_to_replace_non_evaluation(out: Path) -> None:
    """``out`` may replace an earlier evaluation table only, never a user's other file; nor may its sidecar
    replace anything but a checksum (refused before an evaluation's minutes, not when its table is written)."""
    refuse_to_replace(out, "--out", "an evaluation table", is_evaluation_table)
    refuse_to_replace_sidecar(out)


def refuse_to_replace_other_rows(out: Path, run_id: str, name: str | None = None) -> None:
    """A FileExistsError when ``out`` (an evaluation table) holds rows of another run, or with ``name``
    of another evaluation: writing this one's there would lose them under their file's name. Only the
    table's columns are read, not checked against its sidecar, which Snakemake deletes before a rerun
    (the table itself is an ``update()`` output, kept)."""
    if not out.is_file():
        return
    try:
        held = pq.read_table(out, columns=["run_id", "eval"]).group_by(["run_id", "eval"]).aggregate([]).to_pylist()
    except pa.ArrowException as err:  # columns of those names that hold no run ids (lists: no group-by keys)
        raise FileExistsError(f"--out {out} exists and is not an evaluation table ({str(err).splitlines()[0]}); "
                              "refusing to replace it (if it is a damaged earlier output, delete it)") from None
    other = next((row for row in held if row["run_id"] != run_id or name not in (None, row["eval"])), None)
    if other is not None:
        what = f"the {name} rows" if name is not None else "the rows"
        raise FileExistsError(f"--out {out} holds the {other['eval']} rows of run {other['run_id']}; refusing to "
                              f"replace them with {what} of run {run_id} (choose its own --out)")


def merge_evals(out: Path, files: list[Path], run_id: str) -> None:
    """Concatenate run ``run_id``'s evaluation files (columns unioned by name) into ``out`` (never one of
    them; no files: an empty evaluation table). Each file must be an evaluation table of that run and of
    an evaluation no other file holds, and ``out`` may replace only a table of that run's rows, so no row
    is counted twice, filed under another run, or lost from another run's table."""
    check_run_id(run_id, "--run-id")
    check_distinct_paths(files, "files")
    if any(Path(out).resolve() == Path(f).resolve() for f in files):
        raise ValueError(f"--out {out} is also one of the files to merge")
    refuse_to_replace_non_evaluation(Path(out))
    refuse_to_replace_other_rows(Path(out), run_id)
    tables = [read_table_parquet(f) for f in files]
    evaluations: dict[str, Path] = {}
    for f, table in zip(files, tables):
        check_evaluation_table(f, table)
        others = other_runs(table, run_id)
        if others:
            raise ValueError(f"{f} holds rows of run {others[0]!r}, not of --run-id {run_id!r}: merge one run's "
                             "files at a time")
        for name in table.column("eval").unique().to_pylist():
            if name in evaluations:
                raise ValueError(f"{f} and {evaluations[name]} both hold evaluation '{name}'")
            evaluations[name] = f
    if tables:  # a column that is a number in one file and text in another names both files
        merged = concat_files(list(zip(files, tables)), "the evaluation files")
    else:  # a run with no evaluation (evaluations.enabled: []): an empty evaluation table
        merged = pa.table({c: pa.array([], pa.float64() if c == "value" else pa.string()) for c in EVALUATION_COLUMNS})
    write_table_parquet(Path(out), merged)


def other_runs(table: pa.Table, run_id: str) -> list[str]:
    """The run ids other than ``run_id`` that rows of evaluation ``table`` hold, sorted."""
    return sorted(set(table.column("run_id").unique().to_pylist()) - {run_id})


def seal(files: list[Path]) -> None:
    """Write the sidecar of each file that has none (results written before lipflow kept checksums
    of its Parquet files: only for files you trust); a file that has one is checked instead, and a
    sidecar left with two digests by a write cut short is cut to its file's. A written sidecar takes the
    modification time of its file (a new one) or its own (a cut one), so sealing reruns no Snakemake job. A
    link or anything else that is no checksum in a sidecar's place is refused and kept, as by every write.
    A checksum file among ``files`` (``seal results/figures/*`` names each figure's sidecar too) is skipped,
    not given a sidecar of its own. A named pipe, device or folder among ``files`` is refused before any is
    sealed (reading a pipe waited for a writer for ever; /dev/null was given /dev/null.sha256)."""
    for path in files:
        if path.exists() and not path.is_file():
            raise ValueError(f"{path} is not a regular file; seal writes the sidecars of files from before checksums")
    for path in files:
        if path.name.endswith(".sha256") and is_checksum(path):
            print(f"{path}: a checksum file, skipped")
            continue
        sidecar = sidecar_path(path)
        refuse_to_replace_sidecar(path)
        if sidecar.exists():
            read_verified(path)
            if len(sidecar_digests(sidecar)) == 1:
                print(f"{path}: sha256 matches its sidecar")
                continue
            stat, done = os.stat(sidecar), "sidecar cut to the file's digest (a write of it was cut short)"
        else:
            stat, done = os.stat(path), "sidecar written"
        write_bytes_atomic(sidecar, (sha256_file(path) + "\n").encode())
        os.utime(sidecar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        print(f"{path}: {done}")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m lipflow.results")
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build the DuckDB database")
    p_build.add_argument("--out", type=Path, required=True)
    p_build.add_argument("--manifest", type=Path, nargs="?", default=None,
                         help="the token shards' manifest.json (table shards); needed with --run-dirs, and left "
                              "empty (as the database rule does without runs) for a build of studies alone")
    p_build.add_argument("--run-dirs", type=Path, nargs="*", default=[])
    p_build.add_argument("--study-tables", type=Path, nargs="*", default=[],
                         help="the studies' tables to load (<study>/<name>.parquet → table <study>_<name>)")
    p_build.add_argument("--receipt", type=Path, default=None, help="JSON written after the database is in place")
    p_merge = sub.add_parser("merge-evals", help="merge one run's evaluation Parquet files")
    p_merge.add_argument("--run-id", required=True, help="the run whose evaluation files these are")
    p_merge.add_argument("--out", type=Path, required=True)
    p_merge.add_argument("files", type=Path, nargs="*")
    p_seal = sub.add_parser("seal", help="write missing .sha256 sidecars of trusted files from before checksums")
    p_seal.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args(argv)
    from lipflow.errors import run_guarded

    if args.command == "build":
        from lipflow.results.database import build

        return run_guarded(lambda: build(args.out, args.manifest, args.run_dirs, args.study_tables,
                                         receipt=args.receipt))
    if args.command == "seal":
        return run_guarded(lambda: seal(args.files))
    return run_guarded(lambda: merge_evals(args.out, args.files, args.run_id))
