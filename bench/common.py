"""Shared benchmark plumbing: one row per measurement, appended to a Parquet file.

Row columns: bench, metric, value, unit, machine (host name + CPU model), device, date (UTC ISO
8601), git_commit (HEAD's hash, with ``-dirty`` appended when tracked files have uncommitted
changes; null outside a repository or before the first commit). Full runs append to
``results/bench/<bench>.parquet`` (the database's ``bench`` table); ``--quick`` smoke runs to
``results/bench/quick/<bench>.parquet``, which the database does not load, so a smoke test's rows
never pass for measurements. Every bench parses its command line with ``parse_bench_args``, which
checks the file before anything is measured: absent, or a Parquet table with exactly these columns
(appending keeps all its rows and columns; anything else is refused in one line, and is left as it
was). Also: side-by-side timing (``alternating_timings``), a text table,
the default config's data (``default_shards``) and schema-resolved run configs (``run_configs``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from lipflow.atomic import atomic_write
from lipflow.errors import count_argument
from lipflow.provenance import carried_commit

REPO = Path(__file__).resolve().parent.parent
SCHEMA = pa.schema([
    ("bench", pa.string()),
    ("metric", pa.string()),
    ("value", pa.float64()),
    ("unit", pa.string()),
    ("machine", pa.string()),
    ("device", pa.string()),
    ("date", pa.string()),
    ("git_commit", pa.string()),
])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{platform.node()} / {cpu_model()} / {os.cpu_count()} cores"


def git_commit() -> str | None:
    """HEAD's hash, ``-dirty`` appended when tracked files differ from it; outside a git checkout (the
    source tree a GPU machine gets) ``$LIPFLOW_GIT_COMMIT``; else None."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--abbrev=40", "--dirty", "--exclude=*"],
                             cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        out = None
    return (out.stdout.strip() if out is not None and out.returncode == 0 else "") or carried_commit()


def add_out_argument(parser: argparse.ArgumentParser, quick: bool = True) -> None:
    """``--out``; ``quick``: the bench has a ``--quick`` smoke mode, whose rows go elsewhere."""
    elsewhere = ", or results/bench/quick/<bench>.parquet with --quick" if quick else ""
    parser.add_argument("--out", type=Path, help=f"Parquet file to append to (default: results/bench/<bench>.parquet"
                                                 f"{elsewhere})")


def add_torch_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--device`` and ``--threads`` options of the benches that time torch code."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=count_argument(1), help="torch CPU threads (default: torch's, one per core; "
                                                             "1 is steadier on a machine shared with other work)")


def torch_setup(args: argparse.Namespace):
    """Apply ``--threads``, resolve ``--device`` and print the machine line; returns the device and its
    label for the rows (torch is imported here, so the other benches never load it)."""
    import torch

    from lipflow.metrics import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    label = device_label(str(device))
    print(f"machine: {machine()}; device: {label}; torch threads: {torch.get_num_threads()}")
    return device, label


def parse_bench_args(parser: argparse.ArgumentParser, bench: str,
                     argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line and resolve ``--out`` (:func:`out_path`), checking it before anything is
    measured (:func:`check_out`): a file the rows cannot be appended to is one line and exit code 2, and so
    is a ``--device`` that is not there (``cuda`` without a GPU)."""
    args = parser.parse_args(argv)
    args.out = out_path(args, bench)
    try:
        check_out(args.out)
        if getattr(args, "device", None) is not None:  # a torch bench: --device cuda without a GPU, now
            from lipflow.metrics import resolve_device

            resolve_device(args.device)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return args


def out_path(args: argparse.Namespace, bench: str) -> Path:
    """``--out``, else the default file of ``bench`` for a full or a ``--quick`` run."""
    quick = getattr(args, "quick", False)
    return args.out or REPO / "results" / "bench" / ("quick" if quick else "") / f"{bench}.parquet"


def save_rows(args: argparse.Namespace, bench: str, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to ``--out``, else to the default file of ``bench`` for a full or a ``--quick``
    run, and say where."""
    out = out_path(args, bench)
    try:
        append_rows(out, rows)
    except ValueError as err:  # the file changed while the bench ran
        raise SystemExit(f"bench: error: {err}") from None
    print(f"{len(rows)} rows appended to {out}")


def row(bench: str, metric: str, value: float, unit: str, device: str = "cpu") -> dict[str, Any]:
    """One measurement, stamped with the machine, the UTC time and the git commit."""
    return {
        "bench": bench,
        "metric": metric,
        "value": float(value),
        "unit": unit,
        "machine": machine(),
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


def check_out(path: str | os.PathLike[str]) -> None:
    """A one-line ValueError naming ``path`` unless rows can be appended to it without losing anything:
    it is absent, or a Parquet file whose columns are exactly :data:`SCHEMA`'s (names and types, in any
    order). A folder, a link, another file or a table with other columns is never rewritten."""
    _read_existing(Path(path), schema_only=True)


def _read_existing(path: Path, schema_only: bool = False) -> pa.Table | None:
    """The bench table at ``path`` in :data:`SCHEMA`'s column order (None when absent, or when only its
    schema is checked); anything else is a ValueError naming the file and what differs."""
    if not path.exists() and not path.is_symlink():
        return None
    refusal = "; refusing to append to it (choose another --out)"
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{path} is {'a link' if path.is_symlink() else 'not a regular file'}{refusal}")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path} is not a readable Parquet file ({str(err).splitlines()[0]}){refusal}") from None
    for field in schema:
        if field.name not in SCHEMA.names:
            raise ValueError(f"{path} has column {field.name}, which the bench schema lacks{refusal}")
    for field in SCHEMA:
        if field.name not in schema.names:
            raise ValueError(f"{path} lacks column {field.name}, which the bench schema has{refusal}")
        if schema.get_all_field_indices(field.name) != [schema.get_field_index(field.name)]:
            raise ValueError(f"{path} has column {field.name} more than once{refusal}")
        if schema.field(field.name).type != field.type:
            raise ValueError(f"{path}: column {field.name} is {schema.field(field.name).type}, not the bench "
                             f"schema's {field.type}{refusal}")
    if schema_only:
        return None
    from lipflow.data.parquet import parse_table_parquet

    return parse_table_parquet(path.read_bytes(), path).select(SCHEMA.names).cast(SCHEMA)


def append_rows(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to the Parquet file at ``path`` (created if absent), atomically. An existing file
    must be a bench table (:func:`check_out`): its rows and columns are all kept, or it is left alone."""
    path = Path(path)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    existing = _read_existing(path)
    if existing is not None:
        table = pa.concat_tables([existing, table])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        pq.write_table(table, f)


def device_label(device: str) -> str:
    """``cpu``, or ``cuda:<GPU name>`` for a CUDA device (the row's ``device`` column)."""
    if str(device).startswith("cuda"):
        import torch

        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    return str(device)


def synchronize(device: str) -> None:
    """Wait for queued CUDA kernels, so a wall-clock timer brackets the work itself (no-op on CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def alternating_timings(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                        device: str = "cpu") -> dict[str, list[float]]:
    """Wall-clock seconds of each function over ``rounds`` rounds, run side by side.

    Each round calls every function once, in the given order on even rounds and reversed on odd
    ones, so slow drift (other load, clocks, caches) hits each alike; ``warmup`` untimed rounds
    come first. On CUDA the device is synchronized before and after every call.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Print rows as an aligned text table (floats to 4 significant digits)."""
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for r in body:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def default_shards(work: Path, text: Path | None = None) -> Path:
    """Char-tokenized shards under ``work`` from the corpus and tokenize stages; returns the shard
    directory. Without ``text``: the default config's embedded pydoc corpus; else that text file."""
    from lipflow.data.corpus import CorpusConfig, build_corpus
    from lipflow.data.tokenize import TokenizerConfig, tokenize_corpus

    block = {"name": "pydoc"} if text is None else {"name": text.stem, "source": "files", "paths": [str(text)]}
    build_corpus(CorpusConfig.from_dict(block), work / "corpus")
    tokenize_corpus(TokenizerConfig.from_dict({"kind": "char"}), work / "corpus", work / "char")
    return work / "char"


def default_runs() -> dict[str, dict[str, Any]]:
    """config.yaml's runs ``baseline`` (gpt + AdamW) and ``lipschitz`` (lipschitz_gpt + Muon + soft cap,
    logits × 8), as the config sets them: the arms the train-step benchmark compares."""
    from lipflow.config import load_config_file

    runs = load_config_file(REPO / "config.yaml")["runs"]
    return {"baseline": runs["baseline"], "lipschitz": runs["lipschitz"]}


def add_train_steps_argument(parser: argparse.ArgumentParser) -> None:
    """--train-steps: the steps ``trained_default_runs`` trains before a benchmark measures them."""
    parser.add_argument("--train-steps", type=count_argument(1), default=50, help="steps trained before measuring")


def trained_default_runs(steps: int, device: str, **overrides: Any) -> dict[str, dict[str, Any]]:
    """``default_runs`` completed with config.yaml's ``defaults`` and ``overrides``, trained for ``steps`` steps on
    ``device`` and evaluated at the last one, without checkpoints (``run_configs``): the runs the evals and
    sharpness benchmarks measure."""
    from lipflow.config import load_config_file

    defaults = load_config_file(REPO / "config.yaml")["defaults"]
    return run_configs({**defaults, **overrides, "steps": steps, "eval_every": steps, "checkpoint_every": 0,
                        "device": device}, default_runs())


def reference_run() -> dict[str, Any]:
    """experiments/reference.yaml's run ``reference``: the reference notebook's Shakespeare recipe in
    lipflow keys (shape, modular masses, lr, the reference's Muon options, soft cap at σ_max 6)."""
    from lipflow.config import load_config_file

    return load_config_file(REPO / "experiments" / "reference.yaml")["runs"]["reference"]


def run_configs(defaults: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name → run config, validated and completed with the schema's defaults as the pipeline does."""
    from lipflow.config import check_config

    config = {"defaults": dict(defaults), "runs": {name: dict(overrides) for name, overrides in runs.items()}}
    check_config(config)
    return config["runs"]
