"""Smoke test of the benchmarks: ``bench/run_all --quick`` into a temp results dir, then the rows.

No timing is asserted (that would be a test of the machine). What is asserted: every script ran
and wrote finite, positive, stamped rows, and the quantities that do not depend on speed are right —
FLOPs per step against the closed form, Newton–Schulz and soft-cap errors against their
exact-arithmetic predictions from the singular values and against the documented band, job and
row counts against what the configs imply, Lanczos on a tiny gpt against its exact float64 Hessian.
"""

from __future__ import annotations

import datetime
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHES = ("tokenize", "train_step", "constraints", "evals", "sharpness", "pipeline", "duckdb_queries")
COLUMNS = ["bench", "metric", "value", "unit", "machine", "device", "date", "git_commit"]
# one xdist worker runs this module, so run_all --quick (its fixture) runs once (-n 2 --dist loadgroup)
pytestmark = pytest.mark.xdist_group("bench")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    # one torch thread: steadier, and no slower for these tiny shapes, when other tests share the cores
    done = subprocess.run([str(REPO / "bench" / "run_all"), "--quick", "--threads", "1", "--device", "cpu",
                           "--results", str(out)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return out


def values(results: Path, bench: str) -> dict[str, float]:
    rows = pq.read_table(results / f"{bench}.parquet").to_pylist()
    return {r["metric"]: r["value"] for r in rows}


@pytest.mark.parametrize("bench", BENCHES)
def test_each_bench_appends_finite_positive_stamped_rows(results, bench):
    table = pq.read_table(results / f"{bench}.parquet")
    assert table.column_names == COLUMNS
    rows = table.to_pylist()
    assert rows
    for r in rows:
        assert r["bench"] == bench
        assert math.isfinite(r["value"]), r
        if r["unit"] in ("count", "relative"):  # sharpness: misses, 0/1 flags, errors (0 where exact)
            assert r["value"] >= 0, r
        elif r["unit"] != "eigenvalue":  # sharpness: signed (λ_min, power iteration's answer)
            assert r["value"] > 0, r
        assert r["unit"] and r["machine"] and r["device"] == "cpu"
        assert datetime.datetime.fromisoformat(r["date"]).tzinfo is not None


def test_train_step_flops_follow_the_closed_form(results):
    v = values(results, "train_step")
    assert v["torch_threads"] == 1  # run_all passed --threads through
    d, layers, context, batch, accum = 64, 2, 64, 8, 2  # SHAPES["quick"]
    for arm in ("baseline", "lipschitz"):
        m = f"quick.B{batch}x{accum}.{arm}"
        vocab = v[f"{m}.vocab_size"]
        # both models: 12·d² of matrices per block (attention 4d², MLP 8d²) and a d×V head
        n_matmul = layers * 12 * d * d + vocab * d
        tokens = batch * context * accum
        assert v[f"{m}.flops_per_step"] == tokens * (6 * n_matmul + 12 * layers * context * d)
        assert v[f"{m}.tokens_per_s"] * v[f"{m}.step_time"] == pytest.approx(tokens)
        assert v[f"{m}.mfu"] == pytest.approx(v[f"{m}.achieved_flops"] / v[f"quick.B{batch}x{accum}.matmul_peak"])
    assert v[f"quick.B{batch}x{accum}.lipschitz_over_baseline"] == pytest.approx(
        v[f"quick.B{batch}x{accum}.lipschitz.step_time"] / v[f"quick.B{batch}x{accum}.baseline.step_time"])


def test_train_step_times_the_same_arms_at_each_accumulation_count(tmp_path, monkeypatch):
    """--grad-accum 1,3: every timed step draws as many micro-batches as its count says (the trainers read
    the count each step), and each count has its own rows; the profiled step (at the first count) puts
    Newton–Schulz's batched matmuls in the lipschitz arm's optimizer phase, and none in the baseline's
    (every op kept as a row here, whatever its share of the step)."""
    import torch

    sys.path.insert(0, str(REPO))
    import bench.train_step as train_step
    from lipflow.data.loader import ResidentTokens

    draws = []
    sample = ResidentTokens.sample_windows
    monkeypatch.setattr(ResidentTokens, "sample_windows",
                        lambda self, *a, **k: draws.append(1) or sample(self, *a, **k))
    monkeypatch.setattr(train_step, "PROFILE_MIN_SHARE", 0.0)
    threads = torch.get_num_threads()
    out = tmp_path / "train_step.parquet"
    try:
        assert train_step.main(["--quick", "--threads", "1", "--device", "cpu", "--grad-accum", "1,3",
                                "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    # --quick: 1 warmup + 3 timed rounds of 2 arms, at 1 and then 3 micro-batches per step; a profiled step each
    assert len(draws) == (1 + 3) * 2 * (1 + 3) + 2
    v = {r["metric"]: r["value"] for r in pq.read_table(out).to_pylist()}
    for arm in ("baseline", "lipschitz"):
        one, three = f"quick.B8.{arm}", f"quick.B8x3.{arm}"
        assert v[f"{three}.flops_per_step"] == 3 * v[f"{one}.flops_per_step"]
        for m, count in ((one, 1), (three, 3)):
            assert v[f"{m}.tokens_per_s"] * v[f"{m}.step_time"] == pytest.approx(8 * 64 * count)
        # the optimizer and the constraint are timed once: one step's cost whatever its tokens
        assert v[f"{one}.optimizer_step_time"] == v[f"{three}.optimizer_step_time"]
    ops = {m.split(".op_self_time.")[1] for m in v if m.startswith("quick.B8.lipschitz.op_self_time.")}
    assert {"optimizer: aten::bmm", "optimizer: aten::baddbmm"} <= ops, ops
    assert not any("bmm" in m for m in v if m.startswith("quick.B8.baseline.op_self_time.optimizer: "))


def test_train_step_refuses_a_repeated_accumulation_count():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "train_step.py"), "--grad-accum", "30,30"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "'30,30' repeats a count" in done.stderr


def test_train_step_profile_splits_each_arm_into_its_phases(results):
    v = values(results, "train_step")
    for arm, phases in (("baseline", {"forward_backward", "optimizer"}),
                        ("lipschitz", {"forward_backward", "optimizer", "constraint"})):
        m = f"quick.B8x2.{arm}.profiled_time"
        measured = {k[len(m) + 1:]: t for k, t in v.items() if k.startswith(m + ".")}
        assert phases <= set(measured) <= {"forward_backward", "optimizer", "constraint", "other"}
        assert sum(measured.values()) == pytest.approx(v[m])
        ops = {k[len(f"quick.B8x2.{arm}.op_self_time."):]: t for k, t in v.items()
               if k.startswith(f"quick.B8x2.{arm}.op_self_time.")}
        assert ops and sum(ops.values()) <= v[m] * (1 + 1e-9)
    # an op is a row from PROFILE_MIN_SHARE of its arm's profiled time up (which ops run in which phase:
    # test_train_step_times_the_same_arms_at_each_accumulation_count, every op kept)
    sys.path.insert(0, str(REPO))
    from bench.train_step import PROFILE_MIN_SHARE

    for arm in ("baseline", "lipschitz"):
        m = f"quick.B8x2.{arm}"
        assert all(v[k] >= PROFILE_MIN_SHARE * v[f"{m}.profiled_time"] for k in v if k.startswith(f"{m}.op_self_time."))


def test_profile_phases_are_the_innermost_ranges_open_at_each_op():
    import torch

    sys.path.insert(0, str(REPO))
    from bench.train_step import op_self_times

    a = torch.randn(64, 64, requires_grad=True)

    def step():
        with torch.profiler.record_function("forward_backward"):
            torch.tanh(a).sum().backward()
        with torch.no_grad(), torch.profiler.record_function("Optimizer.step#Toy.step"):
            torch.bmm(a[None], a[None])
            with torch.profiler.record_function("weight_constraint"):
                torch.exp(a)
        torch.sigmoid(a.detach())

    times = op_self_times(step, torch.device("cpu"))
    phases = {k.split(": ", 1)[1]: k.split(": ", 1)[0] for k in times}
    assert phases["aten::tanh"] == phases["aten::tanh_backward"] == "forward_backward"
    assert phases["aten::bmm"] == "optimizer" and phases["aten::exp"] == "constraint"
    assert phases["aten::sigmoid"] == "other"
    assert all(t > 0 for t in times.values())


def test_gpu_profile_counts_each_kernel_once_under_the_op_that_launched_it():
    """On a GPU the profiler lists each kernel, and a device-side copy of each range, beside the host op
    that holds the kernel's time: only host events count, phased by their host start (the kernels run
    later). Events shaped as torch.profiler's kineto parser makes them (times in µs)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(REPO))
    from bench.train_step import phase_times

    def event(name, start, end, device=DeviceType.CPU, cpu=0.0, gpu=0.0):
        return SimpleNamespace(name=name, device_type=device, is_async=False, self_cpu_time_total=cpu,
                               self_device_time_total=gpu, time_range=SimpleNamespace(start=start, end=end))

    events = [event("forward_backward", 0, 100), event("aten::mm", 10, 20, gpu=30.0),
              event("Optimizer.step#Muon.step", 100, 150), event("aten::baddbmm", 110, 120, gpu=5.0),
              event("aten::add", 160, 161, gpu=1.0),
              # device side: the kernels (their time is the ops' own) and a range's copy, all running late
              event("sm90_gemm", 95, 125, DeviceType.CUDA, gpu=30.0),
              event("nvjet_baddbmm", 152, 157, DeviceType.CUDA, gpu=5.0),
              event("forward_backward", 90, 200, DeviceType.CUDA, gpu=110.0)]
    times = phase_times(events, on_gpu=True)
    assert times == pytest.approx({"forward_backward: aten::mm": 30e-6, "optimizer: aten::baddbmm": 5e-6,
                                   "other: aten::add": 1e-6})


@pytest.mark.parametrize("n", [256, 512])
def test_constraint_errors_match_their_exact_arithmetic_predictions(results, n):
    v = values(results, "constraints")
    ns, predicted = v[f"n{n}.newton_schulz5_rel_error"], v[f"n{n}.newton_schulz5_rel_error_predicted"]
    assert ns == pytest.approx(predicted, abs=1e-4)
    # 5 quintic steps send σ ≥ 0.00151‖G‖_F into [0.6818, 1.2024] (lipflow.optimizers): error ≤ 0.3182
    assert ns < 0.3182
    soft = v[f"n{n}.soft_cap_rel_error"]
    assert soft == pytest.approx(v[f"n{n}.soft_cap_rel_error_predicted"], rel=1e-4)
    assert 0 < soft < 0.1
    assert v[f"n{n}.soft_cap_top_sigma"] <= 1.0 + 1e-5  # the soft cap's guarantee at σmax = 1
    # "high" float32 matmul precision (TF32 on CUDA) changes no CPU matmul: the same matrix
    assert v[f"n{n}.soft_cap_tf32_top_sigma"] == v[f"n{n}.soft_cap_top_sigma"]


def test_evals_time_every_registered_evaluation_against_a_step(results):
    from lipflow.evaluation import EVALUATIONS

    v = values(results, "evals")
    for run in ("baseline", "lipschitz"):
        step = v[f"{run}.train_step_time"]
        for name in EVALUATIONS.names():
            assert v[f"{run}.{name}_over_train_step"] == pytest.approx(v[f"{run}.{name}_time"] / step)


def test_sharpness_rows_follow_from_the_cases(results):
    """What does not depend on speed: the cluster's exact ends, power iteration finding its −30, the 20-step
    Lanczos reference on the tiny gpt against its exact float64 Hessian, the basis's bytes, and misses,
    caps and products within what the seeds and iteration caps allow."""
    from lipflow.evaluation.sharpness import LANCZOS_MIN_STEPS

    v = values(results, "sharpness")
    assert v["torch_threads"] == 1
    assert (v["cluster.lambda_max"], v["cluster.lambda_min"]) == (10.0, -30.0)
    assert v["cluster.power.nearer_lambda_min"] == 1 and v["cluster.power.eigenvalue"] == pytest.approx(-30, rel=1e-3)
    assert v["tiny_gpt.long_lanczos_relative_error"] < 1e-5
    cases = {m.split(".")[0] for m in v if m.endswith(".lambda_max")}
    assert cases == {"cluster", "tiny_gpt", "baseline", "baseline_preconditioned", "lipschitz",  # Muon: no P⁻¹
                     "sc_sp_w128_preconditioned"}
    for case in cases:
        dim = v[f"{case}.parameters"]
        assert v[f"{case}.parameter_bytes"] == 4 * dim
        for iters in (10, 20):
            m = f"{case}.lanczos{iters}"
            assert v[f"{m}.basis_bytes"] == min(iters, dim) * dim * 4
            assert min(LANCZOS_MIN_STEPS, iters) <= v[f"{m}.hvps_mean"] <= v[f"{m}.hvps_max"] <= iters
            assert v[f"{m}.misses_after_residual_stop"] <= v[f"{m}.misses"] <= v[f"{m}.seeds"] == 2
            assert v[f"{m}.capped"] <= v[f"{m}.seeds"]
            if v[f"{m}.capped"] == 0:
                assert v[f"{m}.misses_after_residual_stop"] == v[f"{m}.misses"]
        assert v[f"{case}.power.hvps"] <= 100  # the sharpness evaluation's default iters


def test_sharpness_bench_exact_hessian_is_the_closed_form():
    """Σ wᵢ cos θᵢ + ½θᵀAθ has Hessian A − diag(w ⊙ cos θ)."""
    sys.path.insert(0, str(REPO))
    import torch

    from bench.sharpness import exact_hessian

    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)
    a = a + a.T
    w, theta = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    got = exact_hessian(lambda t: (w * t.cos()).sum() + 0.5 * t @ a @ t, theta)
    assert got.dtype == torch.float64
    assert torch.allclose(got, a - torch.diag(w * theta.cos()), atol=1e-12)


def test_sharpness_bench_counts_a_miss_only_beyond_the_tolerance():
    sys.path.insert(0, str(REPO))
    from bench.sharpness import count_misses

    assert count_misses([10.0, 9.99, 9.98, 9.9, 10.5], 10.0, 1e-3) == 2  # 9.99 is at λ_max − tol·|λ_max|
    assert count_misses([-2.001, -2.0025, -1.0], -2.0, 1e-3) == 1  # |λ_max| sets the band when λ_max < 0
    assert count_misses([], 1.0, 1e-3) == 0


def test_sharpness_bench_cluster_has_the_spectrum_it_claims_and_products_are_counted():
    """The cluster case's Hessian, read through Hessian-vector products, has ends 10 and −30; the product
    counter agrees with power iteration's own count and leaves HessianOperator as it was."""
    sys.path.insert(0, str(REPO))
    import torch

    from bench.sharpness import cluster_case, counting_products
    from lipflow.evaluation.sharpness import HessianOperator, lanczos_topk, power_iteration

    case = cluster_case(60)
    ritz = lanczos_topk(case.loss_fn, case.params, 60, iters=60, generator=torch.Generator().manual_seed(0))
    assert ritz[0] == pytest.approx(10.0, rel=1e-5) and ritz[1] == pytest.approx(9.9, rel=1e-5)
    assert ritz[-1] == pytest.approx(-30.0, rel=1e-5)
    original = HessianOperator.__call__
    with counting_products() as products:
        result = power_iteration(case.loss_fn, case.params, iters=30, tol=1e-6,
                                 generator=torch.Generator().manual_seed(0))
    assert products[0] == result.iterations > 1 and HessianOperator.__call__ is original


def test_pipeline_dry_run_has_three_jobs_per_run_plus_five(results):
    v = values(results, "pipeline")
    # train, evaluate (val) and merge per run; corpus, tokenize, database, training_curves, all once
    assert v["dry_run.runs100.jobs"] == 3 * 100 + 5
    assert v["dry_run.runs100.lipflow_over_bare"] == pytest.approx(
        v["dry_run.runs100.lipflow_time"] / v["dry_run.runs100.bare_time"])


def test_duckdb_ingests_every_row_and_queries_return_each_group(results):
    sys.path.insert(0, str(REPO))
    from bench.duckdb_queries import grid_points

    v = values(results, "duckdb_queries")
    assert v["train_metrics_rows"] == 50 * 200
    groups = {(p["model"], p["optimizer"], p["weight_constraint"]) for p in grid_points(50)}
    assert v["query.rows10000.best_run_per_group.result_rows"] == len(groups)


SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def test_reference_recipe_trains_the_recipe_file_and_config_yaml_baseline():
    """The bench's arms are experiments/reference.yaml's run (one owner of the recipe) and
    config.yaml's baseline at the recipe's shape, each a valid run config."""
    import yaml

    from bench.common import run_configs
    from bench.reference_recipe import APPENDIX_D, arm_configs, arms

    reference = yaml.safe_load((REPO / "experiments" / "reference.yaml").read_text())["runs"]["reference"]
    baseline = yaml.safe_load((REPO / "config.yaml").read_text())["runs"]["baseline"]
    recipe = arms()
    assert recipe["notebook.s6"] == reference and reference["sigma_max"] == 6.0
    assert recipe["notebook.s2"] == {**reference, "sigma_max": 2.0}
    assert recipe["appendix.s2"] == {**reference, "sigma_max": 2.0, "batch_size": 64,
                                     "masses": {"embed": 1.0, "blocks": 32.0, "head": 1.0}} == {
        **reference, **APPENDIX_D, "sigma_max": 2.0}
    resolved = run_configs({}, recipe)
    assert resolved["baseline"]["model"] == "gpt" and resolved["baseline"]["lr"] == baseline["lr"]
    for key in ("d_model", "n_layers", "n_heads", "context", "batch_size", "steps", "schedule"):
        assert resolved["baseline"][key] == reference[key], key
    full = arm_configs(["notebook.s6", "appendix.s2", "baseline"], "cpu")
    assert [(c["batch_size"], c["steps"], c["eval_every"], c["checkpoint_every"]) for c in full.values()] == [
        (512, 2000, 500, 0), (64, 2000, 500, 0), (512, 2000, 500, 0)]
    assert {c["batch_size"] for c in arm_configs(list(recipe), "cpu", quick=True).values()} == {16}
    assert [(c["steps"], c["eval_every"]) for c in arm_configs(["notebook.s2"], "cpu", steps=300).values()] == [
        (300, 300)]
    assert arm_configs(["notebook.s2"], "cpu", steps=800)["notebook.s2"]["eval_every"] == 500


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data/tinyshakespeare.txt")
def test_reference_recipe_quick_rows_and_their_markdown(tmp_path):
    """bench/reference_recipe.py --quick trains the constrained arm and the baseline on Tiny
    Shakespeare; only the constrained one has a certificate; bench/summarize.py tabulates the rows."""
    out = tmp_path / "reference_recipe.parquet"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "reference_recipe.py"), "--quick", "--device", "cpu",
                           "--arms", "notebook.s2", "baseline", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["metric"].rsplit(".", 2)[-2] + "." + r["metric"].rsplit(".", 1)[-1]: r["value"]
            for r in pq.read_table(out).to_pylist()}
    assert 0 < rows["s2.val_loss"] < 5 and 0 < rows["baseline.val_loss"] < 5
    assert rows["s2.lipschitz_bound"] > 0 and "baseline.lipschitz_bound" not in rows
    assert rows["s2.tokens_per_s"] > 0
    table = subprocess.run([sys.executable, str(REPO / "bench" / "summarize.py"), str(out), str(tmp_path / "none")],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].startswith("| bench | metric |") and len(lines) == 2 + len(pq.read_table(out)) + 1
    assert lines[-1] == f"(no rows: {tmp_path / 'none'} was not written)"
    kept = subprocess.run([sys.executable, str(REPO / "bench" / "summarize.py"), "--exclude", ".baseline.",
                           "--exclude", "tokens_per_s", str(out)], capture_output=True, text=True, timeout=60)
    metrics = [line.split(" | ")[1] for line in kept.stdout.splitlines()[2:]]
    assert metrics == [r["metric"] for r in pq.read_table(out).to_pylist()
                       if ".baseline." not in r["metric"] and "tokens_per_s" not in r["metric"]]
    assert any(".s2." in m for m in metrics)


def test_gpu_check_refuses_an_unknown_argument():
    done = subprocess.run([str(REPO / "bench" / "gpu_check"), "--sections", "x"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "unknown argument '--sections'" in done.stderr


@pytest.mark.parametrize("script", ["gpu_check", "run_all"])
def test_the_bash_scripts_print_their_header_for_help_and_run_nothing(script, tmp_path):
    """``--help`` (or ``-h``) prints the script's header comment, its usage line included, and exits 0
    before anything runs (it was an unknown argument, exit 2)."""
    path = REPO / "bench" / script
    header = path.read_text(encoding="utf-8").split("\nset -uo", 1)[0].splitlines()[1:]
    for flag in ("--help", "-h"):
        done = subprocess.run([str(path), flag, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert done.returncode == 0 and done.stderr == ""
        assert done.stdout.splitlines() == [line[2:] if line.startswith("# ") else line[1:] for line in header]
        assert f"    bench/{script} [" in done.stdout
    assert list(tmp_path.iterdir()) == []  # no results folder, no log


def test_gpu_check_refuses_an_unknown_section():
    """A misspelt --only entry would otherwise run nothing and pass."""
    done = subprocess.run([str(REPO / "bench" / "gpu_check"), "--only", "cuda_tests,train_step_acc"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown section 'train_step_acc'" in done.stderr


def test_gpu_check_takes_relative_paths_from_the_callers_directory(tmp_path):
    """--out and --text relative to where gpu_check is called from (it runs its sections from the repository):
    each section's log lands beside its rows, and the section reads the caller's text file. A stand-in
    Python prints the command lines instead of running them."""
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\necho "ARGS $*"\n')
    stand_in.chmod(0o755)
    caller = tmp_path / "caller"
    caller.mkdir()
    (caller / "corpus.txt").write_text("to be or not to be\n")
    done = subprocess.run([str(REPO / "bench" / "gpu_check"), "--out", "relative", "--text", "corpus.txt",
                           "--only", "reference_recipe"],
                          cwd=caller, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(stand_in)})
    assert done.returncode == 0, done.stderr
    log = (caller / "relative" / "reference_recipe.log").read_text()
    args = log.split("ARGS ", 1)[1].split()
    assert args[args.index("--text") + 1] == str(caller / "corpus.txt")
    assert args[args.index("--out") + 1] == str(caller / "relative" / "reference_recipe.parquet")
    assert not (REPO / "relative").exists()


def test_gpu_check_refuses_an_out_it_cannot_make(tmp_path):
    (tmp_path / "file").write_text("")
    done = subprocess.run([str(REPO / "bench" / "gpu_check"), "--out", str(tmp_path / "file" / "x")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--out: cannot make or write to the directory" in done.stderr


def test_reference_recipe_keeps_each_finished_arm_when_a_later_one_is_stopped(tmp_path, monkeypatch):
    """gpu_check stops a section at its time limit (SIGINT): the arms trained before it keep their rows."""
    import random

    sys.path.insert(0, str(REPO))
    import bench.reference_recipe as recipe

    rng = random.Random(0)
    words = ["the", "king", "and", "queen", "of", "night", "to", "be", "or", "not", "with", "thee"]
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(200)) + "\n")
    trained = []
    run = recipe.Trainer.run

    def run_or_stop(self):
        if trained:
            raise KeyboardInterrupt  # what timeout --signal=INT delivers
        trained.append(self.run_id)
        return run(self)

    monkeypatch.setattr(recipe.Trainer, "run", run_or_stop)
    out = tmp_path / "reference_recipe.parquet"
    with pytest.raises(KeyboardInterrupt):
        recipe.main(["--quick", "--steps", "2", "--device", "cpu", "--text", str(text),
                     "--arms", "notebook.s2", "baseline", "--out", str(out)])
    metrics = [r["metric"] for r in pq.read_table(out).to_pylist()]
    assert trained == ["notebook.s2"] and all(".notebook.s2." in m for m in metrics)
    assert any(m.endswith(".notebook.s2.val_loss") for m in metrics)


def test_gpu_check_fits_its_sections_into_the_budget(tmp_path):
    """--budget bounds the whole call: each section's limit is cut to what is left (less 20 s for the
    timeout's grace and the closing table), and a section with under 30 s left is skipped and counted as
    failed. A stand-in Python that takes 8 s for the CUDA tests and no time for anything else."""
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\ncase "$*" in *"-m pytest"*) sleep 8 ;; *summarize*) echo TABLE ;; esac\n')
    stand_in.chmod(0o755)
    (tmp_path / "text.txt").write_text("to be\n")
    done = subprocess.run([str(REPO / "bench" / "gpu_check"), "--out", str(tmp_path / "out"), "--text",
                           str(tmp_path / "text.txt"), "--budget", "56"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": str(stand_in)})
    limits = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("=== ")
              and "(limit" in line}
    limit = int(limits["cuda_tests"].split("(limit ")[1].split()[0])
    assert 30 <= limit <= 36  # 56 − 20 − the seconds before it, not its own 210
    for name in ("train_step", "constraints", "reference_recipe"):
        assert f"=== {name}: skipped" in done.stdout
    assert done.returncode == 1 and "constraints (no time left)" in done.stderr
    assert done.stdout.rstrip().endswith("TABLE")  # the closing table still printed


@pytest.mark.parametrize("args, message", [
    (["--reference-steps", "0"], "--reference-steps: '0' is not an integer ≥ 1"),
    (["--budget", "6min"], "--budget: '6min' is not a number of seconds"),
    (["--text", "absent.txt"], "is not a file (Tiny Shakespeare, for the reference_recipe section)"),
    (["--out"], "--out needs a value"),
])
def test_gpu_check_refuses_bad_values_before_running_anything(tmp_path, args, message):
    """Found at once, not after the sections before reference_recipe have used up the lease."""
    done = subprocess.run([str(REPO / "bench" / "gpu_check"), *args, *(["--out", str(tmp_path / "out")]
                                                                      if args != ["--out"] else [])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_gpu_check_without_jsonschema_or_its_wheels_stops_at_once(tmp_path):
    """Every section needs jsonschema: a machine without it, and without .whl/ to install it from, is told
    so in one line before anything runs (not by each section's traceback). A stand-in Python without it."""
    if any((REPO / ".whl").glob("*.whl")):
        pytest.skip("this checkout carries .whl/: gpu_check would try to install from it")
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\ncase "$*" in *"import jsonschema"*) exit 1 ;; esac\necho RAN "$*"\n')
    stand_in.chmod(0o755)
    done = subprocess.run([str(REPO / "bench" / "gpu_check"), "--out", str(tmp_path / "out"), "--only", "constraints"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": str(stand_in)})
    assert done.returncode == 2 and "cannot import jsonschema" in done.stderr, done.stderr
    assert "RAN" not in done.stdout and not (tmp_path / "out").exists()


def test_summarize_keeps_the_dirty_mark_of_a_commit(tmp_path):
    """A row measured on a tree with uncommitted changes says so in the table (the hash alone was cut to 12 digits,
    which dropped the mark)."""
    sys.path.insert(0, str(REPO))
    from bench.common import append_rows, row

    out = tmp_path / "t.parquet"
    clean, dirty = row("b", "clean", 1.0, "s"), row("b", "dirty", 2.0, "s")
    clean["git_commit"], dirty["git_commit"] = "a" * 40, "b" * 40 + "-dirty"
    append_rows(out, [clean, dirty, {**row("b", "none", 3.0, "s"), "git_commit": None}])
    done = subprocess.run([sys.executable, str(REPO / "bench" / "summarize.py"), str(out)], capture_output=True,
                          text=True, timeout=60)
    commits = [line.split(" | ")[-1].rstrip(" |") for line in done.stdout.splitlines()[2:]]
    assert commits == ["a" * 12, "b" * 12 + "-dirty", ""]


@pytest.mark.parametrize("args, message", [
    (["bench/train_step.py", "--rounds", "0"], "argument --rounds: '0' is not an integer ≥ 1"),
    (["bench/train_step.py", "--warmup", "-1"], "argument --warmup: '-1' is not an integer ≥ 0"),
    (["bench/constraints.py", "--threads", "-2"], "argument --threads: '-2' is not an integer ≥ 1"),
    (["bench/constraints.py", "--sizes", "256", "0"], "argument --sizes: '0' is not an integer ≥ 1"),
    (["bench/evals.py", "--rounds", "x"], "argument --rounds: 'x' is not an integer ≥ 1"),
    (["bench/train_step.py", "--vocab", "2"], "argument --vocab: '2' is not an integer ≥ 3"),
])
def test_torch_benches_refuse_counts_they_cannot_use(tmp_path, args, message):
    """Found by argparse, before anything is built or timed (--rounds 0 was a traceback from median() of no
    timings after the models were built; a negative --threads one from torch)."""
    done = subprocess.run([sys.executable, str(REPO / args[0]), *args[1:], "--out", str(tmp_path / "x.parquet")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.splitlines()[-1].endswith(message), done.stderr[-2000:]
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("script", ["bench/constraints.py", "bench/reference_recipe.py"])
def test_torch_benches_refuse_cuda_without_a_gpu_in_one_line(tmp_path, script):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    done = subprocess.run([sys.executable, str(REPO / script), "--device", "cuda", "--out", str(tmp_path / "x.parquet")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "no CUDA device" in done.stderr


def test_gpu_check_appends_to_a_sections_log(tmp_path):
    """A second call with the same --out keeps the first call's log, as it keeps its rows."""
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\ncase "$*" in *constraints*) echo "RUN $RUN" ;; esac\n')
    stand_in.chmod(0o755)
    for run in ("first", "second"):
        done = subprocess.run([str(REPO / "bench" / "gpu_check"), "--out", str(tmp_path / "out"), "--only",
                               "constraints"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHON": str(stand_in), "RUN": run})
        assert done.returncode == 0, done.stderr
    log = (tmp_path / "out" / "constraints.log").read_text()
    assert log.index("RUN first") < log.index("RUN second") and log.count("### ") == 2


def test_gpu_check_tabulates_train_step_last(tmp_path):
    """The closing table (≈ 20 kB on a GPU) outgrows a device call's 12,000-character output tail, which keeps
    its end: train_step's rows, the MFU and the ratio, come last so they are the ones kept."""
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\ncase "$*" in *summarize*) echo "TABLE $*" ;; esac\n')
    stand_in.chmod(0o755)
    done = subprocess.run([str(REPO / "bench" / "gpu_check"), "--out", str(tmp_path / "out"), "--only", "constraints"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": str(stand_in)})
    table = done.stdout.split("TABLE ", 1)[1].split()
    assert table[-1] == str(tmp_path / "out" / "train_step.parquet")


def test_compare_revisions_refuses_an_unknown_revision_and_leaves_no_worktree():
    before = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout
    done = subprocess.run([sys.executable, str(REPO / "bench" / "compare_revisions.py"), "HEAD", "no-such-revision",
                           "bench/constraints.py", "--", "--quick"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().endswith("'no-such-revision' is not a commit of " + str(REPO))
    assert subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout == before


def test_compare_revisions_of_a_revision_against_itself_keeps_both_columns(tmp_path):
    """An A/A run (what the machine's noise is) times each side on its own: the two columns had been one list."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "compare_revisions.py"), "HEAD", "HEAD",
                           "bench/constraints.py", "--repeats", "1", "--metrics", "_time", "--",
                           "--sizes", "16", "--rounds", "1", "--device", "cpu", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| n16.")]
    assert len(rows) >= 4 and any(a != b for _, _, a, b, _ in rows)  # each side its own run


def test_reference_recipe_saves_an_arms_training_rows_before_its_fp8_check(tmp_path, monkeypatch):
    """The fp8 branch runs only on a GPU with fp8 tensor cores: exercised here with the kernel check and the
    evaluation stubbed. An arm's training rows are saved before its fp8 check, which cannot take them down."""
    import random

    sys.path.insert(0, str(REPO))
    import bench.reference_recipe as recipe

    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(["to", "be", "or", "not", "king"]) for _ in range(60))
                                for _ in range(200)) + "\n")
    checked = []

    def fp8_accuracy(model, windows):
        checked.append(model)
        if len(checked) > 1:
            raise RuntimeError("fp8 kernel failed")
        return {"scaling": "none", "proven_safe": True, "fp32_loss": 3.0, "simulated_loss": 3.1, "real_loss": 3.2,
                "fp32_accuracy": 0.3, "simulated_accuracy": 0.29, "real_accuracy": 0.28, "max_logit_difference": 0.1}

    monkeypatch.setattr(recipe, "fp8_kernel_available", lambda device: True)
    monkeypatch.setattr(recipe, "real_fp8_accuracy", fp8_accuracy)
    out = tmp_path / "reference_recipe.parquet"
    with pytest.raises(RuntimeError, match="fp8 kernel failed"):
        recipe.main(["--quick", "--steps", "2", "--device", "cpu", "--text", str(text),
                     "--arms", "notebook.s2", "baseline", "--out", str(out)])
    v = {r["metric"].split(".S2.", 1)[1]: (r["value"], r["unit"]) for r in pq.read_table(out).to_pylist()}
    assert v["notebook.s2.fp8_e4m3.real_loss"] == (3.2, "nats")
    assert v["notebook.s2.fp8_e4m3.real_accuracy"] == (0.28, "fraction")
    assert "baseline.val_loss" in v and not any(k.startswith("baseline.fp8") for k in v)


def test_a_source_tree_without_git_takes_its_commit_from_the_environment(tmp_path, monkeypatch):
    """A GPU machine gets a copy of the source without .git: its rows and run.json had no commit. There
    ``$LIPFLOW_GIT_COMMIT`` (set by the caller who knows it) names it; in a checkout, git's answer wins."""
    sys.path.insert(0, str(REPO))
    import bench.common as common
    from lipflow import provenance

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path is found
    monkeypatch.setattr(common, "REPO", tmp_path)
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    assert common.git_commit() is None and provenance.git_commit(tmp_path) is None
    monkeypatch.setenv(provenance.COMMIT_ENV, "c" * 40)
    assert common.git_commit() == "c" * 40 and provenance.git_commit(tmp_path) == "c" * 40
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert provenance.git_commit(REPO) == head != "c" * 40
