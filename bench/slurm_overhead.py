"""What running on SLURM costs per job, measured on the local one-node test cluster (tests/slurm/cluster.sh).

    python bench/slurm_overhead.py [--jobs N] [--repeats R] [--snakefile FILE --configfile FILE] [--parse-only]
                                   [--out FILE]

Needs root (it brings the cluster up, and down again unless it was already up), except with --parse-only.
Rows go to results/bench/slurm_overhead.parquet:

- ``cluster_bringup`` / ``cluster_teardown``: `cluster.sh up` without the package install (munged, slurmctld,
  slurmd, node idle, one `srun --gpus=1`) and `cluster.sh down`; ``apt_install`` when the packages were missing.
- For batches of 1 and N independent no-op jobs submitted together through profiles/slurm:
  ``submit_to_start`` (SLURM SubmitTime → StartTime, mean over the batch; SLURM keeps whole seconds),
  ``job_wall`` (StartTime → EndTime of a job whose rule only touches a file: the two Snakemake processes the
  plugin starts per job, one by sbatch and one by its inner srun, each parsing the Snakefile), and
  ``workflow_wall`` (the whole `snakemake` call, status polling included).
- ``snakemake_cli_startup``: `snakemake --list-rules` on a one-rule Snakefile (interpreter, imports, CLI), the
  least any Snakemake process costs; ``snakefile_parse.<file>``: parsing ``--snakefile`` with ``--configfile``
  through the API in a fresh interpreter that has already imported snakemake (the Snakefile's own imports count),
  and ``snakefile_parse.one_rule`` for comparison. Each of the two Snakemake processes of a job pays both.
  Best of R (other load only slows a round down).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.common import REPO, add_out_argument, parse_bench_args, row, save_rows  # noqa: E402
from lipflow.errors import summary_of  # noqa: E402

_spec = importlib.util.spec_from_file_location("lipflow_slurm_harness", REPO / "tests" / "slurm" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = harness  # dataclasses look their module up while the class is built
_spec.loader.exec_module(harness)

BENCH = "slurm_overhead"
NOOP_SNAKEFILE = """
localrules: all

rule all:
    input: expand("done/{{i}}.txt", i=range({n}))

rule noop:
    output: "done/{{i}}.txt"
    resources: mem_mb=100, runtime=5
    shell: "touch {{output}}"
"""
ONE_RULE_SNAKEFILE = 'rule one:\n    output: "one.txt"\n    shell: "touch {output}"\n'


def report(rows: list[dict], metric: str, value: float, unit: str = "s") -> None:
    print(f"{metric:<34} {value:10.2f} {unit}")
    rows.append(row(BENCH, metric, value, unit))


def batch(rows: list[dict], n_jobs: int, work: Path) -> None:
    """Submit n_jobs independent no-op jobs at once and report their SLURM timings."""
    workdir = work / f"batch_{n_jobs}"
    workdir.mkdir()
    snakefile = workdir / "Snakefile"
    snakefile.write_text(NOOP_SNAKEFILE.format(n=n_jobs))
    run = harness.run_snakemake_on_slurm(workdir, snakefile)
    if run.returncode != 0 or len(run.jobs) != n_jobs or any(job.state != "COMPLETED" for job in run.jobs):
        raise SystemExit(f"slurm_overhead: the {n_jobs}-job batch did not complete:\n{run.output[-4000:]}")
    suffix = f"{n_jobs}_job{'s' if n_jobs > 1 else ''}"
    report(rows, f"submit_to_start.{suffix}", statistics.mean(job.queue_seconds for job in run.jobs))
    report(rows, f"job_wall.{suffix}", statistics.mean(job.run_seconds for job in run.jobs))
    report(rows, f"workflow_wall.{suffix}", run.seconds)


# Run in a fresh interpreter after `import snakemake`: the time the API takes to parse (include and check) a
# Snakefile with its config files, including the imports the Snakefile itself makes, as in a job's first parse.
PARSE_PROBE = """
import sys, time
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings
snakefile, configfiles = Path(sys.argv[1]), [Path(arg) for arg in sys.argv[2:]]
with SnakemakeApi(OutputSettings()) as api:
    start = time.perf_counter()
    workflow = api.workflow(ResourceSettings(), config_settings=ConfigSettings(configfiles=configfiles),
                            snakefile=snakefile, workdir=snakefile.parent)
    workflow.list_rules()
    seconds = time.perf_counter() - start
print(f"PARSE_SECONDS {seconds}")
"""


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    """Wall time and stdout of `command`; exit with its output if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"slurm_overhead: {' '.join(command)} failed:\n{proc.stdout}{proc.stderr}")
    return seconds, proc.stdout


def parse_seconds(snakefile: Path, configfiles: list[Path], repeats: int) -> float:
    command = [sys.executable, "-c", PARSE_PROBE, str(snakefile), *map(str, configfiles)]
    return min(float(re.search(r"PARSE_SECONDS (\S+)", timed(command, snakefile.parent)[1]).group(1))
               for _ in range(repeats))


def parse_times(rows: list[dict], snakefile: Path, configfile: Path, repeats: int, work: Path) -> None:
    one_rule = work / "one_rule" / "Snakefile"
    one_rule.parent.mkdir()
    one_rule.write_text(ONE_RULE_SNAKEFILE)
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(one_rule), "--list-rules"]
    report(rows, "snakemake_cli_startup", min(timed(command, one_rule.parent)[0] for _ in range(repeats)))
    report(rows, "snakefile_parse.one_rule", parse_seconds(one_rule, [], repeats))
    name = snakefile.relative_to(REPO) if snakefile.is_relative_to(REPO) else snakefile
    report(rows, f"snakefile_parse.{name}", parse_seconds(snakefile, [configfile], repeats))


def seconds_in(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def cluster_timings(rows: list[dict], n_jobs: int, work: Path) -> None:
    """Bring-up, batches of 1 and n_jobs no-op jobs, teardown (the last only if this brought the cluster up)."""
    was_up = harness.cluster_is_up()
    try:
        if was_up:
            print("cluster already up: no bring-up or teardown rows")
        else:
            up = harness.cluster("up")
            install = seconds_in(r"installed .* in ([\d.]+) s", up)
            if install is not None:
                report(rows, "apt_install", install)
            report(rows, "cluster_bringup", seconds_in(r"bring-up ([\d.]+) s", up))
        for size in sorted({1, n_jobs}):
            batch(rows, size, work)
    finally:
        if not was_up:
            down = harness.cluster("down")
            report(rows, "cluster_teardown", seconds_in(r"cluster down in ([\d.]+) s", down))


def main() -> None:
    parser = argparse.ArgumentParser(description=summary_of(__doc__))
    parser.add_argument("--jobs", type=int, default=4, help="size of the concurrent batch (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each parse timing (default 3)")
    parser.add_argument("--snakefile", type=Path, default=REPO / "Snakefile")
    parser.add_argument("--configfile", type=Path,
                        default=REPO / "tests" / "data" / "tiny_config.yaml",
                        help="config for --snakefile (default tests/data/tiny_config.yaml)")
    parser.add_argument("--parse-only", action="store_true", help="only the startup and parse timings")
    add_out_argument(parser, quick=False)
    args = parse_bench_args(parser, BENCH)
    if not args.snakefile.is_file():
        raise SystemExit(f"slurm_overhead: --snakefile {args.snakefile} does not exist")
    if not args.configfile.is_file():
        raise SystemExit(f"slurm_overhead: --configfile {args.configfile} does not exist")
    if not args.parse_only:
        try:
            harness.check_can_run_cluster()
        except harness.SlurmUnavailable as reason:
            raise SystemExit(f"slurm_overhead: {reason} (--parse-only measures without it)") from None

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="slurm_overhead_") as tmp:
        work = Path(tmp)
        parse_times(rows, args.snakefile.resolve(), args.configfile.resolve(), args.repeats, work)
        if not args.parse_only:
            cluster_timings(rows, args.jobs, work)
    save_rows(args, BENCH, rows)


if __name__ == "__main__":
    main()
