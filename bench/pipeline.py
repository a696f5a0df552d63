"""Pipeline overhead: lipflow's Snakefile against a bare Snakefile with the same jobs, side by side.

    python bench/pipeline.py [--quick] [--runs N] [--rounds R]

- **Dry run** (``snakemake -n``) of a sweep of N runs (default 1,000; --quick 100): a config whose
  ``runs`` block holds N tiny runs differing in seed, with the val evaluation on, so the DAG has
  N train + N evaluate + N merge jobs plus corpus, tokenize, database, training_curves and all. The
  bare Snakefile has the same rules, the same input and output files (its run ids are the ones
  ``lipflow.plan.resolve_runs`` gives the config) and so the same jobs, but no config
  validation, params, resources, logs or conda, and ``touch`` as every command. Both use the
  repository's workflow profile (profiles/default), so the command-line options are the same.
  The job counts Snakemake reports are checked to be equal. ratio = lipflow / bare.
- **Parse time**: ``snakemake --list-rules`` (parses the Snakefile, builds no DAG) on each, and on
  a one-rule Snakefile (interpreter, imports, command line): parse time = the difference (printed;
  the rows hold the three times). And, in process, what
  ``workflow/rules/common.smk`` does with the config (``check_config``, schema defaults,
  ``resolve_runs``).
- **No-op rerun**: a tiny real run (one run of a 16-wide, 1-layer model, 2 steps, val evaluation;
  two runs without --quick), then ``snakemake`` again, which must report "Nothing to be done"; the
  same for the bare Snakefile after its own real run.

Every timing is the wall clock of a whole ``python -m snakemake`` process; the two sides alternate
for ``--rounds`` rounds (order reversed every other round) and the median is kept. Rows go to
results/bench/pipeline.parquet (--quick: results/bench/quick/).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's directory would come first on sys.path, where bench/tokenize.py
# shadows the standard library's ``tokenize``: put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import copy  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from bench.common import (REPO, add_out_argument, alternating_timings, machine, parse_bench_args,  # noqa: E402
                          print_table, row, save_rows)
from lipflow.config import check_config  # noqa: E402
from lipflow.errors import summary_of  # noqa: E402
from lipflow.plan import resolve_runs  # noqa: E402

BENCH = "pipeline"
PROFILE = REPO / "profiles" / "default"
TINY_RUN = {"d_model": 16, "n_layers": 1, "n_heads": 2, "context": 16, "batch_size": 2, "steps": 2,
            "eval_every": 2, "eval_batches": 1, "checkpoint_every": 0, "device": "cpu"}
EVALUATIONS = ["val"]

BARE_SNAKEFILE = '''\
RUNS = {runs!r}
EVALUATIONS = {evaluations!r}
DATA = "results/data/pydoc"


rule all:
    input: "results/lipflow.duckdb", "results/figures/training_curves.png", "results/figures/training_curves.svg"


rule corpus:
    output: f"{{DATA}}/corpus/train.jsonl", f"{{DATA}}/corpus/val.jsonl", f"{{DATA}}/corpus/corpus.json"
    shell: "touch {{output}}"


rule tokenize:
    input: f"{{DATA}}/corpus/train.jsonl", f"{{DATA}}/corpus/val.jsonl"
    output: f"{{DATA}}/char/manifest.json", f"{{DATA}}/char/tokenizer.json"
    shell: "touch {{output}}"


rule train:
    input: f"{{DATA}}/char/manifest.json"
    output: "results/runs/{{run}}/model.safetensors", "results/runs/{{run}}/config.json",
            "results/runs/{{run}}/train_metrics.parquet", "results/runs/{{run}}/run.json"
    shell: "touch {{output}}"


rule evaluate:
    input: "results/runs/{{run}}/model.safetensors", "results/runs/{{run}}/run.json", f"{{DATA}}/char/manifest.json"
    output: "results/runs/{{run}}/evals/{{evaluation}}.parquet"
    shell: "touch {{output}}"


rule merge_evaluations:
    input: expand("results/runs/{{{{run}}}}/evals/{{evaluation}}.parquet", evaluation=EVALUATIONS)
    output: "results/runs/{{run}}/evals.parquet"
    shell: "touch {{output}}"


rule database:
    input: expand("results/runs/{{run}}/run.json", run=RUNS),
           expand("results/runs/{{run}}/train_metrics.parquet", run=RUNS),
           expand("results/runs/{{run}}/evals.parquet", run=RUNS), f"{{DATA}}/char/manifest.json"
    output: "results/lipflow.duckdb"
    shell: "touch {{output}}"


rule training_curves:
    input: "results/lipflow.duckdb"
    output: "results/figures/training_curves.png", "results/figures/training_curves.svg"
    shell: "touch {{output}}"
'''
ONE_RULE_SNAKEFILE = 'rule one:\n    output: "one.txt"\n    shell: "touch {output}"\n'


def sweep_config(n_runs: int) -> dict[str, Any]:
    """A config with ``n_runs`` tiny runs (seeds 0 … n−1) on the embedded corpus, val evaluation on."""
    return {"corpus": {"name": "pydoc", "source": "embedded"}, "tokenizer": {"kind": "char"},
            "defaults": dict(TINY_RUN), "runs": {f"r{i:04d}": {"seed": i} for i in range(n_runs)},
            "evaluations": {"enabled": EVALUATIONS}}


def resolved_run_ids(config: dict[str, Any]) -> list[str]:
    """What common.smk does with a config: validate, fill the schema's defaults, resolve the run ids."""
    config = copy.deepcopy(config)
    check_config(config)
    return list(resolve_runs(config))


def snakemake(snakefile: Path, workdir: Path, *args: str) -> str:
    """Run ``python -m snakemake`` with the repository's workflow profile; its output (it must succeed)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir),
           "--workflow-profile", str(PROFILE), "-c2", *args]
    if (workdir / "config.yaml").is_file():
        cmd += ["--configfile", str(workdir / "config.yaml")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr


def job_count(output: str) -> int:
    found = re.search(r"^total\s+(\d+)\s*$", output, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no job count in snakemake's output:\n{output[-2000:]}")
    return int(found.group(1))


def setup(work: Path, name: str, config: dict[str, Any]) -> tuple[Path, Path, Path]:
    """(lipflow work dir holding ``config``, bare work dir, bare Snakefile for the same run ids)."""
    lip, bare = work / f"{name}-lipflow", work / f"{name}-bare"
    lip.mkdir()
    bare.mkdir()
    (lip / "config.yaml").write_text(yaml.safe_dump(config))
    snakefile = work / f"{name}-bare.smk"
    snakefile.write_text(BARE_SNAKEFILE.format(runs=resolved_run_ids(config), evaluations=EVALUATIONS))
    return lip, bare, snakefile


def median_times(fns: dict, rounds: int, warmup: int) -> dict[str, float]:
    """Each function's median wall-clock seconds over alternating rounds."""
    return {name: statistics.median(t) for name, t in alternating_timings(fns, rounds, warmup).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("--quick", action="store_true", help="100 runs, one round, one tiny real run")
    parser.add_argument("--runs", type=int, default=1000, help="runs in the dry-run sweep")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median kept)")
    add_out_argument(parser)
    args = parse_bench_args(parser, BENCH, argv)
    n_runs, rounds, warmup, tiny_runs = (100, 1, 0, 1) if args.quick else (args.runs, args.rounds, 1, 2)
    print(f"machine: {machine()}")
    rows, table = [], []

    def report(metric: str, value: float, unit: str, what: str) -> None:
        rows.append(row(BENCH, metric, value, unit))
        table.append([what, value, unit])

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = sweep_config(n_runs)
        lip, bare, bare_smk = setup(work, "sweep", config)
        one = work / "one"
        one.mkdir()
        (one / "Snakefile").write_text(ONE_RULE_SNAKEFILE)
        outputs: dict[str, str] = {}
        dry = median_times({
            "lipflow": lambda: outputs.__setitem__("lipflow", snakemake(REPO / "Snakefile", lip, "-n")),
            "bare": lambda: outputs.__setitem__("bare", snakemake(bare_smk, bare, "-n")),
        }, rounds, warmup)
        jobs = {side: job_count(text) for side, text in outputs.items()}
        if jobs["lipflow"] != jobs["bare"]:
            raise RuntimeError(f"the bare Snakefile has {jobs['bare']} jobs, lipflow's {jobs['lipflow']}")
        parse = median_times({
            "startup": lambda: snakemake(one / "Snakefile", one, "--list-rules"),
            "lipflow": lambda: snakemake(REPO / "Snakefile", lip, "--list-rules"),
            "bare": lambda: snakemake(bare_smk, bare, "--list-rules"),
        }, rounds, warmup)
        resolution = median_times({"resolve": lambda: resolved_run_ids(config)}, rounds, warmup)["resolve"]

        tiny = sweep_config(tiny_runs)
        tiny_lip, tiny_bare, tiny_bare_smk = setup(work, "tiny", tiny)
        real = median_times({"lipflow": lambda: snakemake(REPO / "Snakefile", tiny_lip),
                             "bare": lambda: snakemake(tiny_bare_smk, tiny_bare)}, 1, 0)
        reruns: dict[str, str] = {}
        noop = median_times({
            "lipflow": lambda: reruns.__setitem__("lipflow", snakemake(REPO / "Snakefile", tiny_lip)),
            "bare": lambda: reruns.__setitem__("bare", snakemake(tiny_bare_smk, tiny_bare)),
        }, rounds, 0)
        for side, text in reruns.items():
            if "Nothing to be done" not in text:
                raise RuntimeError(f"the {side} rerun was not a no-op:\n{text[-2000:]}")

    sweep = f"dry_run.runs{n_runs}"
    report(f"{sweep}.jobs", jobs["lipflow"], "jobs", f"dry run, {n_runs} runs: jobs (both)")
    report(f"{sweep}.lipflow_time", dry["lipflow"], "s", "  lipflow snakemake -n")
    report(f"{sweep}.bare_time", dry["bare"], "s", "  bare snakemake -n")
    report(f"{sweep}.lipflow_over_bare", dry["lipflow"] / dry["bare"], "x", "  ratio (target <= 1.3)")
    report("list_rules.one_rule_time", parse["startup"], "s", "snakemake --list-rules, one-rule Snakefile")
    report(f"list_rules.runs{n_runs}.lipflow_time", parse["lipflow"], "s", f"  lipflow Snakefile ({n_runs} runs)")
    report(f"list_rules.runs{n_runs}.bare_time", parse["bare"], "s", "  bare Snakefile")
    table.append(["  => lipflow parse time (minus one-rule)", parse["lipflow"] - parse["startup"], "s"])
    table.append(["  => bare parse time (minus one-rule)", parse["bare"] - parse["startup"], "s"])
    report(f"config_resolution.runs{n_runs}_time", resolution, "s",
           "  in process: check_config + defaults + resolve_runs")
    report(f"noop.runs{tiny_runs}.real_run_time", real["lipflow"], "s", f"tiny real run ({tiny_runs} run(s)), lipflow")
    report(f"noop.runs{tiny_runs}.bare_real_run_time", real["bare"], "s", "  bare (touch)")
    report(f"noop.runs{tiny_runs}.lipflow_time", noop["lipflow"], "s", "  no-op rerun, lipflow")
    report(f"noop.runs{tiny_runs}.bare_time", noop["bare"], "s", "  no-op rerun, bare")
    report(f"noop.runs{tiny_runs}.lipflow_over_bare", noop["lipflow"] / noop["bare"], "x", "  ratio")
    print(f"median of {rounds} alternating round(s) after {warmup} warmup; whole snakemake processes")
    print_table(["measurement", "value", "unit"], table)
    save_rows(args, BENCH, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
