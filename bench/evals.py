"""Each checkpoint evaluation's cost, in training steps of the same model.

    python bench/evals.py [--quick] [--train-steps S] [--rounds R] [--device auto|cpu|cuda] [--threads N]

For each of config.yaml's two default runs (``baseline``: gpt + adamw; ``lipschitz``:
lipschitz_gpt + muon + spectral_soft_cap, at the default shape d_model 64, 2 layers, context 64,
batch 16) on the default data (embedded pydoc corpus, char tokenizer): train ``--train-steps``
steps with ``Trainer.run()`` (writing a real run directory), time ``--rounds`` further
``Trainer.train_step()`` calls (median = one step), then time every registered evaluation
(``lipflow.evaluation.EVALUATIONS``: val, robustness, precision, rank, sharpness) once on the
evaluate stage's context for that run directory (``build_context``: load the checkpoint and the
windows, and fill the parameters read from the data such as rank's n_train; timed once per run and
built afresh, untimed, for each evaluation, as each evaluate job pays it once more; an evaluation
that reads the train or val loss pays for it, as in the pipeline), and the local certificate alone (``local_certificate``
and its radii, issue 20) for ``LOCAL_SEQUENCES`` val windows of the context's length on the models it
covers. Evaluation parameters: each evaluation's schema defaults (what the pipeline passes today); --quick
overrides some with the smaller ``QUICK_PARAMS``. cost = evaluation seconds / step seconds. Rows go to
results/bench/evals.parquet (--quick: results/bench/quick/).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory would come first on sys.path, where bench/tokenize.py
# shadows the standard library's ``tokenize`` (imported by torch): put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from bench.common import (add_out_argument, add_torch_arguments, add_train_steps_argument,  # noqa: E402
                          alternating_timings, default_shards, parse_bench_args, print_table, row, save_rows,
                          synchronize, torch_setup, trained_default_runs)
from lipflow.config import evaluation_params  # noqa: E402
from lipflow.errors import count_argument, summary_of  # noqa: E402
from lipflow.evaluation import EVALUATIONS  # noqa: E402
from lipflow.evaluation.__main__ import build_context  # noqa: E402
from lipflow.evaluation.local_certificate import local_certificate  # noqa: E402
from lipflow.train.trainer import Trainer  # noqa: E402

BENCH = "evals"

# Smaller settings for --quick (every evaluation still runs each of its parts once).
LOCAL_SEQUENCES = {"default": 64, "quick": 4}  # sequences certified locally (issue 20: 64 of 64 tokens)
QUICK_PARAMS: dict[str, dict[str, Any]] = {
    "val": {},
    "robustness": {"n_sequences": 4, "epsilons": [0.0, 0.5], "pgd_steps": 2, "k_values": [1],
                   "random_trials": 1, "greedy_candidates": 2, "lipschitz_steps": 2},
    "precision": {"max_windows": 4, "formats": ["fp8_e4m3"], "scalings": ["none"]},
    "rank": {"bx_windows": 4},
    "sharpness": {"iters": 2, "batch_size": 2},
}


def timed(fn, device: str) -> tuple[Any, float]:
    """(fn(), its wall-clock seconds), CUDA synchronized around it."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def local_certified_radii(ctx, n_sequences: int) -> torch.Tensor | None:
    """Local certified radii of the first ``n_sequences`` val windows (None: model not covered)."""
    windows = ctx.val_windows[:n_sequences].to(ctx.device)
    with torch.no_grad():
        x = ctx.model.embed(windows[:, :-1]).float()
    cert = local_certificate(ctx.model, x, windows[:, -1], ctx.certificate)
    return None if cert is None else cert.radius()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("--quick", action="store_true", help="2 training steps and QUICK_PARAMS (seconds)")
    add_train_steps_argument(parser)
    parser.add_argument("--rounds", type=count_argument(1), default=10, help="timed training steps (median kept)")
    add_torch_arguments(parser)
    add_out_argument(parser)
    args = parse_bench_args(parser, BENCH, argv)
    device, dev = torch_setup(args)
    train_steps, rounds = (2, 3) if args.quick else (args.train_steps, args.rounds)
    configs = trained_default_runs(train_steps, args.device)
    rows, table = [row(BENCH, "torch_threads", torch.get_num_threads(), "threads", dev)], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = default_shards(work)
        for name, cfg in configs.items():
            run_dir = work / "runs" / name
            trainer = Trainer(name, cfg, data, run_dir, progress=False)
            trainer.run()
            step_s = statistics.median(alternating_timings({name: trainer.train_step}, rounds, 1, str(device))[name])
            label = f"{cfg['model']}+{cfg['optimizer']}+{cfg['weight_constraint']}"
            table.append([label, "train_step", step_s * 1e3, 1.0])
            rows.append(row(BENCH, f"{name}.train_step_time", step_s, "s", dev))
            ctx, build_s = timed(lambda: build_context(run_dir, data, evaluation_params("val"), device)[0], str(device))
            table.append([label, "build_context", build_s * 1e3, build_s / step_s])
            rows += [row(BENCH, f"{name}.build_context_time", build_s, "s", dev),
                     row(BENCH, f"{name}.build_context_over_train_step", build_s / step_s, "x", dev)]
            for evaluation in EVALUATIONS.names():
                params = evaluation_params(evaluation, **(QUICK_PARAMS.get(evaluation, {}) if args.quick else {}))
                ctx = build_context(run_dir, data, params, device)[0]  # fills the params read from the data
                torch.manual_seed(0)
                _, eval_s = timed(lambda: EVALUATIONS.get(evaluation)(ctx), str(device))
                table.append([label, evaluation, eval_s * 1e3, eval_s / step_s])
                rows += [row(BENCH, f"{name}.{evaluation}_time", eval_s, "s", dev),
                         row(BENCH, f"{name}.{evaluation}_over_train_step", eval_s / step_s, "x", dev)]
            local, local_s = timed(lambda: local_certified_radii(ctx, LOCAL_SEQUENCES["quick" if args.quick else
                                                                                       "default"]), str(device))
            if local is not None:
                table.append([label, f"local_certificate ({len(local)} seq)", local_s * 1e3, local_s / step_s])
                rows += [row(BENCH, f"{name}.local_certificate_time", local_s, "s", dev),
                         row(BENCH, f"{name}.local_certificate_over_train_step", local_s / step_s, "x", dev)]
    shape = configs["baseline"]
    print(f"default shape: d_model {shape['d_model']}, {shape['n_layers']} layers, context {shape['context']}, "
          f"batch {shape['batch_size']}; evaluation parameters: {'QUICK_PARAMS' if args.quick else 'defaults'}")
    print_table(["model", "what", "ms", "train steps"], table)
    save_rows(args, BENCH, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
