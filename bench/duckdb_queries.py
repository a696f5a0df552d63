"""DuckDB: ingest of N synthetic runs through ``lipflow.results.build`` and typical queries on their metrics.

    python bench/duckdb_queries.py [--quick] [--runs N] [--steps S] [--rounds R]

Synthetic run directories (default 1,000 runs × 1,000 steps = 1M ``train_metrics`` rows; --quick
50 × 200), written in the train stage's formats: ``run.json`` and ``config.json`` with complete
schema-resolved configs (a grid over model, optimizer, weight constraint, parametrization, width,
lr and seed; half the runs in experiment ``lipschitz_tradeoff``, half in ``lr_transfer``),
``train_metrics.parquet`` with the train stage's columns (loss every step; val metrics, bound and
activation statistics every 50 steps) and ``evals.parquet`` with the val evaluation's rows.

- **ingest**: ``lipflow.results.build`` of all N run directories into a fresh database (runs,
  train_metrics, evals, shards, bench tables and the experiment views), median of ``--rounds`` // 3
  builds (at least one).
- **queries** on that database, each after one untimed run, median of ``--rounds``, target ≤ 100 ms:
  ``best_run_per_group`` (per model × optimizer × constraint, the run with the lowest final val
  loss, from train_metrics), ``pareto_front`` (per optimizer, the runs no other run beats in both
  final certified bound and val accuracy, from train_metrics), ``lr_transfer_table`` (final val
  loss per method × lr, one column per width, averaged over seeds: a PIVOT over train_metrics),
  and the project's own views ``pareto`` and ``lr_transfer`` as ``lipflow query`` reads them.

Rows go to results/bench/duckdb_queries.parquet (--quick: results/bench/quick/).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory would come first on sys.path, where bench/tokenize.py
# shadows the standard library's ``tokenize`` (imported by torch): put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import (add_out_argument, alternating_timings, default_shards, machine,  # noqa: E402
                          parse_bench_args, print_table, row, run_configs, save_rows)
from lipflow import provenance  # noqa: E402
from lipflow.data.parquet import write_table_parquet  # noqa: E402
from lipflow.errors import summary_of  # noqa: E402
from lipflow.results import build  # noqa: E402
from lipflow.train.trainer import Trainer  # noqa: E402

BENCH = "duckdb_queries"
EVAL_EVERY = 50
TARGET_S = 0.1

GRID = {
    ("model", "optimizer", "weight_constraint"): [("gpt", "adamw", "none"), ("gpt", "muon", "none"),
                                                  ("lipschitz_gpt", "muon", "spectral_soft_cap"),
                                                  ("lipschitz_gpt", "muon", "spectral_hard_cap"),
                                                  ("lipschitz_gpt", "muon", "spectral_normalize")],
    ("parametrization",): [("sp",), ("mup",)],
    ("d_model",): [(64,), (128,), (256,), (512,)],
    ("lr",): [(0.001,), (0.003,), (0.01,), (0.03,), (0.1,)],
}

FINAL = """final AS (
    SELECT run_id, arg_max(val_loss, step) AS val_loss, arg_max(val_accuracy, step) AS val_accuracy,
           arg_max(lipschitz_bound, step) AS bound
    FROM train_metrics WHERE val_loss IS NOT NULL GROUP BY run_id)"""

QUERIES = {
    "best_run_per_group": f"""
        WITH {FINAL}
        SELECT r.model, r.optimizer, r.weight_constraint, arg_min(r.run_id, f.val_loss) AS best_run,
               min(f.val_loss) AS best_val_loss, count(*) AS n_runs
        FROM final AS f JOIN runs AS r USING (run_id)
        GROUP BY r.model, r.optimizer, r.weight_constraint ORDER BY best_val_loss""",
    "pareto_front": f"""
        WITH {FINAL},
        p AS (SELECT r.optimizer, f.* FROM final AS f JOIN runs AS r USING (run_id) WHERE f.bound IS NOT NULL)
        SELECT * FROM p WHERE NOT EXISTS (
            SELECT 1 FROM p AS o
            WHERE o.optimizer = p.optimizer AND o.bound <= p.bound AND o.val_accuracy >= p.val_accuracy
              AND (o.bound < p.bound OR o.val_accuracy > p.val_accuracy))
        ORDER BY optimizer, bound""",
    "lr_transfer_table": f"""
        WITH {FINAL},
        cells AS (
            SELECT r.parametrization || '+' || r.optimizer AS method, r.d_model AS width, r.lr,
                   avg(f.val_loss) AS val_loss
            FROM final AS f JOIN runs AS r USING (run_id) GROUP BY ALL)
        PIVOT cells ON width USING min(val_loss) GROUP BY method, lr ORDER BY method, lr""",
    "view_pareto": "SELECT * FROM pareto WHERE on_front ORDER BY optimizer, lipschitz_bound",
    "view_lr_transfer": "SELECT * FROM lr_transfer ORDER BY method, width",
}


def grid_points(n_runs: int) -> list[dict[str, Any]]:
    """n_runs overrides cycling through GRID's product (in a seeded random order, so any n_runs
    spreads over the groups), each repetition a new seed; runs alternate between the two
    experiments, flipping with each repetition, so every grid point lands in both."""
    product = list(itertools.product(*GRID.values()))
    product = [product[i] for i in np.random.default_rng(0).permutation(len(product))]
    points = []
    for i in range(n_runs):
        values = product[i % len(product)]
        point = {key: v for keys, vals in zip(GRID, values) for key, v in zip(keys, vals)}
        point["seed"] = i // len(product)
        point["experiment"] = "lipschitz_tradeoff" if (i + i // len(product)) % 2 == 0 else "lr_transfer"
        points.append(point)
    return points


def run_name(point: dict[str, Any]) -> str:
    """The name an experiment's grid gives the run (``<short>.<method label>.<width>.<lr>.<seed>``): the
    views read the method from its second part, as from a real lr_transfer run's."""
    method = f"{point['optimizer']}_{point['weight_constraint']}_{point['parametrization']}"
    short = "tradeoff" if point["experiment"] == "lipschitz_tradeoff" else "lrt"
    return f"{short}.{method}.w{point['d_model']}.lr{point['lr']}.seed{point['seed']}"


def template_run(root: Path) -> Path:
    """A real one-step run of the train stage on the default data: the template whose files' fields
    and columns the synthetic runs copy (so they follow the train stage's formats as they change)."""
    data = default_shards(root / "data")
    cfg = run_configs({"d_model": 16, "n_layers": 1, "n_heads": 2, "context": 16, "batch_size": 2, "steps": 1,
                       "eval_every": 1, "eval_batches": 1, "checkpoint_every": 0, "device": "cpu"},
                      {"template": {}})["template"]
    Trainer("template", cfg, data, root / "template", progress=False).run()
    return root / "template"


def metrics_table(schema: pa.Schema, run_id: str, steps: int, rng: np.random.Generator, lipschitz: bool) -> pa.Table:
    """train_metrics of one run in ``schema``: a noisy decaying loss every step; val metrics, activation
    statistics and (lipschitz runs) a certified bound every EVAL_EVERY steps; other columns null."""
    step = np.arange(1, steps + 1)
    loss = 1.5 + 3.0 * np.exp(-step / (0.2 * steps)) + 0.05 * rng.standard_normal(steps)
    no_eval = ~((step % EVAL_EVERY == 0) | (step == steps))
    val_loss = loss + 0.1 + 0.02 * rng.standard_normal(steps)
    max_activation = 1.0 + rng.random(steps)
    activations = [json.dumps({"block0.max_abs": float(a), "block0.rms": float(a) / 3}) for a in max_activation]
    columns = {
        "run_id": pa.array([run_id] * steps), "step": pa.array(step), "loss": pa.array(loss),
        "lr_factor": pa.array(1.0 - step / steps), "tokens": pa.array(step * 16 * 64),
        "val_loss": pa.array(val_loss, mask=no_eval), "val_accuracy": pa.array(np.exp(-val_loss), mask=no_eval),
        "val_perplexity": pa.array(np.exp(val_loss), mask=no_eval),
        "max_activation": pa.array(max_activation, mask=no_eval), "activations": pa.array(activations, mask=no_eval),
        "lipschitz_bound": pa.array(10.0 ** (1 + 2 * rng.random(steps)), mask=no_eval)
        if lipschitz else pa.nulls(steps, pa.float64()),  # gpt (LayerNorm) has no certificate
    }
    return pa.table([columns[f.name].cast(f.type) if f.name in columns else pa.nulls(steps, f.type) for f in schema],
                    schema=schema)


def write_runs(root: Path, n_runs: int, steps: int) -> list[Path]:
    """n_runs synthetic run directories under root/runs, copying the template run's formats."""
    template = template_run(root)
    base_summary = json.loads((template / "run.json").read_text())
    base_info = json.loads((template / "config.json").read_text())
    schema = pq.read_schema(template / "train_metrics.parquet")
    rng = np.random.default_rng(0)
    dirs = []
    for point in grid_points(n_runs):
        cfg = {**base_info["config"], **point}
        config_hash = provenance.config_hash(cfg)
        run_id = f"{run_name(point)}-{config_hash[:8]}"
        table = metrics_table(schema, run_id, steps, rng, cfg["model"] != "gpt")
        last = table.slice(steps - 1).to_pylist()[0]
        run_dir = root / "runs" / run_id
        run_dir.mkdir(parents=True)
        summary = {**base_summary, "run_id": run_id, "config_hash": config_hash, "steps_completed": steps,
                   "lipschitz_bound": last["lipschitz_bound"], "final_val_loss": last["val_loss"],
                   "final_val_accuracy": last["val_accuracy"], "max_activation": last["max_activation"]}
        (run_dir / "run.json").write_text(json.dumps(summary))
        (run_dir / "config.json").write_text(json.dumps({**base_info, "run_id": run_id, "config": cfg}))
        write_table_parquet(run_dir / "train_metrics.parquet", table)  # with its sidecar, as the train stage
        write_table_parquet(run_dir / "evals.parquet", pa.Table.from_pylist([
            {"run_id": run_id, "eval": "val", "metric": metric, "value": value}
            for metric, value in (("loss", last["val_loss"]), ("accuracy", last["val_accuracy"]),
                                  ("perplexity", last["val_perplexity"]))]))
        dirs.append(run_dir)
    return dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("--quick", action="store_true", help="50 runs × 200 steps, 3 rounds (seconds)")
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1000, help="train_metrics rows per run")
    parser.add_argument("--rounds", type=int, default=10, help="query repetitions (median kept); ingest: a third")
    add_out_argument(parser)
    args = parse_bench_args(parser, BENCH, argv)
    n_runs, steps, rounds = (50, 200, 3) if args.quick else (args.runs, args.steps, args.rounds)
    print(f"machine: {machine()}; duckdb {duckdb.__version__}")
    rows, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_dirs = write_runs(root, n_runs, steps)
        database = root / "lipflow.duckdb"
        cwd = os.getcwd()
        os.chdir(root)  # build() reads results/{icl,bench,...} relative to the working directory: empty here
        try:
            ingest = alternating_timings(
                {"ingest": lambda: build(database, root / "data" / "char" / "manifest.json", run_dirs,
                                         results=root / "results")}, max(1, rounds // 3), warmup=0)["ingest"]
        finally:
            os.chdir(cwd)
        con = duckdb.connect(str(database), read_only=True)
        n_rows = con.execute("SELECT count(*) FROM train_metrics").fetchone()[0]
        if n_rows != n_runs * steps:
            raise RuntimeError(f"train_metrics holds {n_rows} rows, expected {n_runs * steps}")
        results: dict[str, int] = {}
        times = alternating_timings(
            {name: (lambda name=name, sql=sql: results.__setitem__(name, len(con.execute(sql).fetchall())))
             for name, sql in QUERIES.items()}, rounds, warmup=1)
        con.close()
    ingest_s = statistics.median(ingest)
    rows += [row(BENCH, "train_metrics_rows", n_rows, "rows"),
             row(BENCH, f"ingest.runs{n_runs}.time", ingest_s, "s"),
             row(BENCH, f"ingest.runs{n_runs}.rows_per_s", n_rows / ingest_s, "rows/s")]
    table.append([f"ingest {n_runs} runs (lipflow.results.build)", ingest_s * 1e3, "", ""])
    for name, t in times.items():
        median = statistics.median(t)
        rows += [row(BENCH, f"query.rows{n_rows}.{name}.time", median, "s"),
                 row(BENCH, f"query.rows{n_rows}.{name}.result_rows", results[name], "rows")]
        table.append([name, median * 1e3, results[name], "yes" if median <= TARGET_S else "NO"])
    print(f"{n_runs} runs × {steps} steps = {n_rows} train_metrics rows; median of {rounds} rounds")
    print_table(["what", "ms", "result rows", "<= 100 ms"], table)
    save_rows(args, BENCH, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
