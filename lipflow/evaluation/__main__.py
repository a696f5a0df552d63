"""Evaluation stage: one registered evaluation on one checkpoint, long-form rows to Parquet.

    python -m lipflow.evaluation --evaluation NAME --run-dir D --data-dir T --params-json J --out F
        [--device auto|cpu|cuda]

The rows are (run_id, eval, metric, value, parameter columns)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from lipflow.config import RUN_ID_PATTERN, evaluation_params, run_defaults
from lipflow.atomic import check_folder_exists, read_json
from lipflow.data.parquet import table_of_rows, write_table_parquet
from lipflow.errors import (ArgumentParser, json_object_argument, memory_errors_in_one_line, phase_reporter,
                            run_guarded, silent, summary_of)
from lipflow.evaluation import EVALUATIONS, EvalContext
from lipflow.metrics import resolve_device
from lipflow.results.cli import refuse_to_replace_non_evaluation, refuse_to_replace_other_rows
from lipflow.results.inputs import check_names_its_run, directory_name, run_id_in, value_of


def build_context(run_dir: Path, data_dir: Path, params: dict, device: torch.device,
                  report: Callable[[str], None] = silent) -> tuple[EvalContext, dict]:
    from lipflow.api import check_trained_on, load_model
    from lipflow.data.loader import TokenShards
    from lipflow.model.base import non_finite_parameter

    model, info = load_model(run_dir, device)
    broken = non_finite_parameter(model)
    if broken is not None:  # training ends such a run as diverged (evaluate skips it); these were made otherwise
        raise ValueError(f"{run_dir / 'model.safetensors'} has non-finite weights ({broken}) but "
                         f"{run_dir / 'run.json'} says the run completed")
    check_trained_on(run_dir, info, data_dir)
    cfg = run_defaults(**info["config"])  # the run as load_model built it: a key it lacks (added since) at its default
    context = cfg["context"]
    # the tokens the run trained on: the train split's first train_tokens (build.token_splits), not the whole split
    train = TokenShards(data_dir, "train", max_tokens=cfg["train_tokens"])
    if train.vocab_size != info["vocab_size"]:
        raise ValueError(f"{run_dir / 'model.safetensors'} was trained with vocabulary {info['vocab_size']} but the "
                         f"tokenizer in {data_dir} has {train.vocab_size}: tokenizer/checkpoint mismatch")
    if "n_train" in params and params["n_train"] is None:  # the rank bound's n: null = train tokens / context
        params["n_train"] = train.num_tokens // context
    val_windows = TokenShards(data_dir, "val").sequential_windows(context)
    bound_l2 = getattr(model, "lipschitz_bound_l2", None)
    ctx = EvalContext(model=model, first_train_windows=lambda count: train.sequential_windows(context, count),
                      val_windows=val_windows, cfg=params, run=cfg,
                      known_train_loss=None, known_val_loss=None, device=device,  # measured if read
                      certificate=bound_l2() if callable(bound_l2) else None, report=report)
    return ctx, info


def evaluate(name: str, run_dir: Path, data_dir: Path, params: dict, out: Path, device: str = "auto") -> int:
    evaluation = EVALUATIONS.get(name)
    params = evaluation_params(name, **params)
    refuse_to_replace_non_evaluation(out)
    check_folder_exists(out, "--out")  # before the evaluation's minutes, not after them
    summary = read_json(run_dir / "run.json")
    run_id = run_id_in(run_dir / "run.json", summary)
    # a directory named like a run id (the pipeline's results/runs/<run id>) must hold that run, else its rows
    # would be filed under another; a run trained into a folder of another name (train --out-dir) is its own
    if re.fullmatch(RUN_ID_PATTERN, directory_name(run_dir)):
        check_names_its_run(run_dir / "run.json", run_id)
    refuse_to_replace_other_rows(out, run_id, name)
    started = time.monotonic()
    if value_of(summary, "status", run_dir / "run.json") != "completed":
        rows = [{"metric": "skipped", "value": float(summary.get("diverged_step") or 0),
                 "note": f"run status is {summary['status']}"}]
    else:
        if "seed" in params:  # the evaluations that draw random numbers have a seed of their own
            torch.manual_seed(params["seed"])
        with memory_errors_in_one_line(f"lower evaluations.{name}'s batch_size or counts"):
            ctx, _ = build_context(run_dir, data_dir, params, resolve_device(device), phase_reporter(name))
            rows = evaluation(ctx)
    rows = [{"run_id": run_id, "eval": name, **row} for row in rows]
    write_table_parquet(out, table_of_rows(rows))
    print(f"{name}: {len(rows)} rows for {run_id} in {time.monotonic() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m lipflow.evaluation", description=summary_of(__doc__))
    parser.add_argument("--evaluation", required=True, help=f"one of: {', '.join(EVALUATIONS.names())}")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--params-json", default="{}")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    return run_guarded(lambda: evaluate(args.evaluation, args.run_dir, args.data_dir,
                                        json_object_argument(args.params_json, "--params-json"), args.out, args.device))


if __name__ == "__main__":
    sys.exit(main())
