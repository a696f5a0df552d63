"""Command line of the ICL study: ``python -m lipflow.studies.icl [--threads N] <command> --config-json JSON ...``.

    train      --config-json J --layers L --n N --out results/icl/runs/L{L}_n{N}.safetensors [--no-progress]
    baselines  --config-json J --out results/icl/runs/baselines.parquet
    collect    --config-json J --baselines B --runs R1.safetensors R2.safetensors ... --out-dir results/icl [--receipt R]
    plot       --config-json J --results-dir results/icl --out-dir results/figures [--receipt R]
    check      --config-json J --results-dir results/icl --out results/icl/summary.json [--strict]
               [--loss-tol 0.10] [--step-tol 0.05]

J is the ``icl:`` block of config.yaml as JSON (missing keys take the schema defaults).
Exit status 2 on a configuration or input error (:func:`lipflow.errors.run_guarded`), 1 when ``check --strict`` fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from lipflow.atomic import (json_object_keys, refuse_to_replace, refuse_to_replace_receipt, refuse_to_replace_unsealed,
                            write_json_atomic, write_receipt)
from lipflow.errors import (ArgumentParser, ConfigError, count_argument, json_object_argument,
                            memory_errors_in_one_line, run_guarded, summary_of)
from lipflow.results.plotting import RECEIPT_KEY as FIGURES_RECEIPT_KEY
from lipflow.studies.icl.config import load_config
from lipflow.studies.outputs import RECEIPT_KEY as TABLES_RECEIPT_KEY


def _config(text: str):
    """The ``icl`` block given as ``--config-json``; a bad one is a ConfigError naming the argument and
    the key, as the image-MLP study's."""
    try:
        return load_config(json_object_argument(text, "--config-json"))
    except ConfigError as err:
        raise ConfigError(f"--config-json: {err}") from None


def _tolerance(text: str) -> float:
    """An argparse ``type``: a number ≥ 0 (inf: no limit); a NaN tolerance failed every check, a negative one too."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"'{text}' is not a number ≥ 0")
    return value


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m lipflow.studies.icl", description=summary_of(__doc__))
    parser.add_argument("--threads", type=count_argument(0), default=0, help="torch CPU threads (0: default)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one L-layer model at context length n")
    train.add_argument("--config-json", required=True)
    train.add_argument("--layers", type=count_argument(1), required=True)
    train.add_argument("--n", type=count_argument(1), required=True)
    train.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    baselines = sub.add_parser("baselines", help="PGD, GD, least squares, Γ⋆ and regression Γ̂")
    baselines.add_argument("--config-json", required=True)
    baselines.add_argument("--out", required=True, help="Parquet path")

    collect = sub.add_parser("collect", help="evaluate checkpoints and write the result tables")
    collect.add_argument("--config-json", required=True)
    collect.add_argument("--baselines", required=True)
    collect.add_argument("--runs", nargs="+", required=True)
    collect.add_argument("--out-dir", required=True)
    collect.add_argument("--receipt", type=Path, default=None,
                         help="written last: the tables written, as JSON (the pipeline's record that the job finished)")

    plot = sub.add_parser("plot", help="loss vs layers and loss vs n figures (PNG and SVG)")
    plot.add_argument("--config-json", required=True)
    plot.add_argument("--results-dir", required=True)
    plot.add_argument("--out-dir", required=True)
    plot.add_argument("--receipt", type=Path, default=None,
                      help="written last: the files drawn, as JSON (the pipeline's record that the job finished)")

    check = sub.add_parser("check", help="trained model vs optimal PGD at (max layers, n)")
    check.add_argument("--config-json", required=True)
    check.add_argument("--results-dir", required=True)
    check.add_argument("--out", required=True, help="JSON summary path")
    check.add_argument("--loss-tol", type=_tolerance, default=0.10)
    check.add_argument("--step-tol", type=_tolerance, default=0.05)
    check.add_argument("--strict", action="store_true", help="exit 1 when the check fails")
    return parser


def refuse_to_replace_earlier_outputs(args) -> None:
    """A FileExistsError before any work when an output path holds a file this command did not write:
    each command replaces only its own kind of output (a checkpoint of the study, a table with the
    columns of the one it writes there, a check summary), never another stage's sealed file."""
    from lipflow.studies.icl.study import is_checkpoint
    from lipflow.studies.icl.tables import BASELINE_SCHEMA, TABLE_SCHEMAS
    from lipflow.studies.outputs import parquet_with_columns

    if args.command == "train":
        refuse_to_replace_unsealed(args.out, "--out", "an ICL study checkpoint", is_checkpoint)
    elif args.command == "baselines":
        refuse_to_replace_unsealed(args.out, "--out", "an ICL baselines table",
                                   parquet_with_columns(BASELINE_SCHEMA.names))
    elif args.command == "collect":
        for name, schema in TABLE_SCHEMAS.items():
            refuse_to_replace_unsealed(Path(args.out_dir) / f"{name}.parquet", "--out-dir",
                                       f"an ICL {name} table", parquet_with_columns(schema.names))
    elif args.command == "check":
        refuse_to_replace(args.out, "--out", "an ICL check summary", is_check_summary)
    if args.command in RECEIPT_KEYS and args.receipt is not None:
        refuse_to_replace_receipt(args.receipt, RECEIPT_KEYS[args.command], f"the ICL {args.command} command")


RECEIPT_KEYS = {"collect": TABLES_RECEIPT_KEY, "plot": FIGURES_RECEIPT_KEY}  # the commands that take --receipt


def is_check_summary(path: Path) -> bool:
    """Whether ``path`` is a JSON summary the ``check`` command wrote: an object with exactly its keys."""
    from lipflow.studies.icl.study import SUMMARY_KEYS, SUMMARY_OPTIONAL_KEYS

    keys = json_object_keys(path)
    return keys is not None and set(SUMMARY_KEYS) <= keys <= {*SUMMARY_KEYS, *SUMMARY_OPTIONAL_KEYS}


# the schema allows each size up to 2^48; their products can exceed any memory
MEMORY_ADVICE = "lower icl.d, icl.batch_size, icl.test_prompts, icl.theory_samples, icl.regression_prompts or n"
MAX_THREADS = 1024  # torch crashes (segfault, overflow) far above any machine's cores


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from lipflow.studies.icl import plots, study

    def go() -> int:
        if args.threads > MAX_THREADS:
            raise ValueError(f"--threads {args.threads}: at most {MAX_THREADS}")
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        refuse_to_replace_earlier_outputs(args)
        with memory_errors_in_one_line(MEMORY_ADVICE):  # a Σ or prompt batch too large for memory
            if args.command == "train":
                cfg = _config(args.config_json)
                study.run_train(cfg, args.layers, args.n, args.out, progress=not args.no_progress)
            elif args.command == "baselines":
                study.run_baselines(_config(args.config_json), args.out)
            elif args.command == "collect":
                written = study.run_collect(_config(args.config_json), args.baselines, args.runs, args.out_dir)
            elif args.command == "plot":
                written = plots.run_plots(args.results_dir, args.out_dir, _config(args.config_json).attention)
            else:
                cfg = _config(args.config_json)
                summary = study.summarize(cfg, args.results_dir, args.loss_tol, args.step_tol)
                text = json.dumps(summary, indent=2)
                write_json_atomic(args.out, summary)
                print(text)
                if args.strict and not summary["passed"]:
                    print("lipflow: error: the ICL headline check failed", file=sys.stderr)
                    return 1
            if args.command in RECEIPT_KEYS and args.receipt is not None:
                write_receipt(args.receipt, RECEIPT_KEYS[args.command], written)
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
