"""The train package's contracts (the loop is the documented algorithm; run.json and the metric
columns are what lipflow.train.summary declares) and the evaluate stage computing only what an
evaluation reads."""

import json
import math
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from conftest import documented_training
import lipflow.metrics
from lipflow.config import check_config, evaluation_params, run_defaults
from lipflow.evaluation.__main__ import evaluate
from lipflow.model import build_model
from lipflow.train.build import build_learner, token_splits
from lipflow.train.summary import METRIC_COLUMNS, RUN_KEY_FIELDS, RUN_SUMMARY_FIELDS, run_summary
from lipflow.train.trainer import Trainer

LIPSCHITZ = {"model": "lipschitz_gpt", "optimizer": "muon", "lr": 0.05, "weight_constraint": "spectral_soft_cap"}


def test_the_trainer_takes_the_documented_steps(char_shards, tiny_run_config, tmp_path):
    """Trainer steps are, bit for bit: seed, build, then per step lr ← base_lr·schedule, windows
    from the seeded generator, cross-entropy backward, constrained update, embedding projection."""
    cfg = {**tiny_run_config, **LIPSCHITZ, "schedule": "cosine", "warmup_steps": 1}
    trainer = Trainer("tiny-00000000", cfg, char_shards, tmp_path, progress=False)
    for _ in range(3):
        trainer.set_lr()
        trainer.train_step()
        trainer.step += 1

    mine, theirs = documented_training(char_shards, cfg).state_dict(), trainer.model.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def test_run_outputs_hold_exactly_the_declared_fields_and_columns(char_shards, tiny_run_config, tmp_path):
    cfg = {**tiny_run_config, "steps": 4, "checkpoint_every": 0}
    summary = Trainer("tiny-00000000", cfg, char_shards, tmp_path, progress=False).run()
    written = json.loads((tmp_path / "run.json").read_text())
    assert written == summary and set(written) == set(RUN_KEY_FIELDS) | set(RUN_SUMMARY_FIELDS)
    assert written["status"] == "completed" and written["steps_completed"] == 4
    table = pq.read_table(tmp_path / "train_metrics.parquet")
    assert table.schema.names == list(METRIC_COLUMNS)
    assert [str(t) for t in table.schema.types] == [
        {"float64": "double"}.get(alias, alias) for alias in METRIC_COLUMNS.values()]
    with pytest.raises(ValueError, match=r"missing \['vocab_size'\], undeclared \['vocab'\]"):
        run_summary(**{**{k: None for k in written if k != "vocab_size"}, "vocab": 1})


def test_a_failed_run_removes_the_parent_folders_it_made_and_no_others(char_shards, tiny_run_config, tmp_path,
                                                                       monkeypatch, capsys):
    """A run into a new --out-dir <existing>/a/b/c that fails at its first step (out of memory) leaves
    neither c nor the a/ and a/b/ it made; the existing folder stays, though empty."""
    from lipflow.train.__main__ import main

    def out_of_memory(self):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 34359738368 bytes")

    monkeypatch.setattr(Trainer, "train_step", out_of_memory)
    existing = tmp_path / "existing"
    existing.mkdir()
    code = main(["--run-id", "tiny-00000000", "--config-json", json.dumps(tiny_run_config),
                 "--data-dir", str(char_shards), "--out-dir", str(existing / "a" / "b" / "c"), "--no-progress"])
    assert code == 2 and "out of memory" in capsys.readouterr().err
    assert existing.is_dir() and list(existing.iterdir()) == []


BLOW_UPS = {  # (overrides, what crashed before the run could end as diverged)
    "scion_lr_10": {"optimizer": "scion", "lr": 10.0},  # msign's SVD of a non-finite momentum
    "uscg_lr_1e25": {"optimizer": "uscg", "lr": 1e25},
    "scion_largest_step": {"optimizer": "scion", "lr": 1e30,  # lr·ρ = 1e38: still an fp32 number
                           "lmo_radius": {"embed": 1e8, "hidden": 1e8, "head": 1e8, "vector": 1e8}},
    "stiefel_sigma_max_1e20": {"weight_constraint": "stiefel", "sigma_max": 1e20},
    "hard_cap_sigma_max_1e30": {"weight_constraint": "spectral_hard_cap", "sigma_max": 1e30, "lr": 1e30},
    "soft_cap_decay_beyond_fp32": {"weight_constraint": "spectral_soft_cap", "lr": 1e30, "weight_decay": 1e10},
}


@pytest.mark.parametrize("overrides", BLOW_UPS.values(), ids=BLOW_UPS)
def test_a_run_that_blows_up_ends_as_diverged(char_shards, tiny_run_config, tmp_path, overrides):
    """A config the schema accepts whose training overflows ends as diverged (non-finite gradients or
    weights), with its outputs written, instead of an SVD of a non-finite matrix or an fp32 overflow
    raising."""
    from lipflow.config import stage_run

    cfg = stage_run({**tiny_run_config, **overrides, "checkpoint_every": 0})
    summary = Trainer("tiny-00000000", cfg, char_shards, tmp_path, progress=False).run()
    assert summary["status"] == "diverged" and 1 <= summary["diverged_step"] <= cfg["steps"]
    assert (re.fullmatch(r"loss is \S+, gradient norm is (nan|inf)", summary["diverged_reason"])
            or summary["diverged_reason"] == "weights are non-finite"), summary["diverged_reason"]
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "diverged"


def test_a_non_finite_gradient_after_a_finite_loss_ends_the_run_at_its_step(char_shards, tiny_run_config, tmp_path):
    """Step 3's loss is finite but its gradient is not, so its update spoils the weights: the run ends
    as diverged at step 3, naming the gradient norm (not at step 4's non-finite loss), with 2 steps
    completed (not 3, nor step 4, where the losses were read)."""
    trainer = Trainer("tiny-00000000", {**tiny_run_config, "checkpoint_every": 0}, char_shards, tmp_path,
                      progress=False)
    matrix = next(p for p in trainer.model.parameters() if p.ndim == 2)
    matrix.register_hook(lambda grad: grad * math.inf if trainer.step == 2 else grad)
    summary = trainer.run()
    loss, grad_norm = re.fullmatch(r"loss is (\S+), gradient norm is (\S+)", summary["diverged_reason"]).groups()
    assert (summary["status"], summary["diverged_step"], summary["steps_completed"]) == ("diverged", 3, 2)
    assert math.isfinite(float(loss)) and not math.isfinite(float(grad_norm))


@pytest.mark.parametrize("overrides, expected", [
    ({"d_model": 10**26, "n_heads": 1},
     "config error: --config-json.d_model: 100000000000000000000000000 is greater than the maximum of 16777216"),
    ({"d_model": 1024, "n_heads": 4, "mlp_ratio": 2**48},  # each allowed, the MLP's 2^58 × 2^10 matrix is not
     "out of memory (a tensor's size overflows 64 bits): lower d_model, mlp_ratio"),
])
def test_the_train_stage_refuses_sizes_torch_cannot_hold_in_one_line(char_shards, tiny_run_config, tmp_path,
                                                                     capsys, overrides, expected):
    from lipflow.train.__main__ import main

    out = tmp_path / "run"
    code = main(["--run-id", "big-00000000", "--config-json", json.dumps({**tiny_run_config, **overrides}),
                 "--data-dir", str(char_shards), "--out-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"lipflow: error: {expected}"), err
    assert not out.exists()


def test_out_of_memory_names_every_size_torch_cannot_represent():
    """torch reports a size beyond 64 bits as a TypeError (one size) or a RuntimeError (their product)."""
    from lipflow.errors import out_of_memory

    for make in (lambda: torch.empty(2**64), lambda: torch.empty(2**40, 2**40)):
        with pytest.raises((TypeError, RuntimeError)) as err:
            make()
        assert str(out_of_memory(err.value)).startswith("out of memory (a tensor's size overflows 64 bits)")


@pytest.fixture
def trained_run(char_shards, tiny_run_config, tmp_path):
    out = tmp_path / "run"
    Trainer("tiny-00000000", {**tiny_run_config, **LIPSCHITZ, "steps": 2, "checkpoint_every": 0}, char_shards, out,
            progress=False).run()
    return out


def test_more_processes_than_gpus_is_refused_naming_nproc(char_shards, tiny_run_config, tmp_path, monkeypatch):
    """Each process trains on cuda:<local rank>: rank 1 on a one-GPU machine failed in torch.cuda.set_device."""
    import lipflow.train.build as build

    monkeypatch.setattr(build, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^nproc: 2 processes need a GPU each, and this machine has 1;"):
        build.checked_inputs("tiny-00000000", {**tiny_run_config, "nproc": 2}, char_shards, tmp_path / "run")
    assert build.checked_inputs("tiny-00000000", {**tiny_run_config, "nproc": 1}, char_shards, tmp_path / "run")[2].type == "cuda"
    monkeypatch.setattr(build, "resolve_device", lambda name: torch.device("cpu"))
    assert build.checked_inputs("tiny-00000000", {**tiny_run_config, "nproc": 2}, char_shards, tmp_path / "run")


def measured_windows(monkeypatch) -> list[int]:
    """The number of windows of every loss measurement (``evaluate_windows``, wherever a lipflow
    module imported it) made from now on, in order."""
    calls = []
    original = lipflow.metrics.evaluate_windows

    def counting(model, windows, batch_size, device):
        calls.append(windows.shape[0])
        return original(model, windows, batch_size, device)

    for module in [m for name, m in sys.modules.items() if name.startswith("lipflow")]:
        if getattr(module, "evaluate_windows", None) is original:
            monkeypatch.setattr(module, "evaluate_windows", counting)
    return calls


def test_the_robustness_job_measures_no_split_loss(trained_run, char_shards, tmp_path, monkeypatch):
    calls = measured_windows(monkeypatch)
    config = {"evaluations": {"robustness": {"n_sequences": 2, "epsilons": [0.5], "pgd_steps": 1, "k_values": [1],
                                             "random_trials": 1, "greedy_candidates": 2, "lipschitz_steps": 1}}}
    check_config(config)
    out = tmp_path / "robustness.parquet"
    assert evaluate("robustness", trained_run, char_shards, config["evaluations"]["robustness"], out, "cpu") == 0
    assert calls == []  # neither the whole val split nor the train windows were evaluated
    assert {r["metric"] for r in pq.read_table(out).to_pylist()} >= {"clean_accuracy", "robust_accuracy"}


def test_long_evaluations_report_each_phase_to_the_log_and_keep_their_rows(trained_run, char_shards, tmp_path,
                                                                          capsys):
    """The stage prints a line per phase of robustness (clean pass, each ε of PGD, each k of the
    substitutions), precision (each format and scaling), sharpness (the power iteration) and rank (the
    weight spectra, each attention layer), each with the seconds so far, then its summary; the rows are
    those of the evaluation run without a reporter."""
    from lipflow.evaluation import EVALUATIONS
    from lipflow.evaluation.__main__ import build_context

    config = {"evaluations": {
        "robustness": {"n_sequences": 2, "epsilons": [0.5, 0.25], "pgd_steps": 1, "k_values": [2, 1],
                       "random_trials": 1, "greedy_candidates": 2, "lipschitz_steps": 1},
        "precision": {"max_windows": 4, "formats": ["bf16", "fp8_e4m3"], "scalings": ["none", "per_tensor"],
                      "int8": False},
        "sharpness": {"batch_size": 2, "iters": 3}, "rank": {"bx_windows": 2}}}
    check_config(config)
    stored = json.loads((trained_run / "config.json").read_text())
    model = build_model(run_defaults(**stored["config"]), stored["vocab_size"])
    matrices = sum(p.ndim == 2 for p in model.parameters())  # rank's include_embeddings: true
    expected = {
        "robustness": [r"clean accuracy [\d.]+ on 2 sequences",  # the radii taken sorted, as the config takes them
                       r"PGD at ε = 0.25: robust accuracy [\d.]+ \(1 of 2\)",
                       r"PGD at ε = 0.5: robust accuracy [\d.]+ \(2 of 2\)",
                       r"random and greedy substitutions at k = 1 \(1 of 2\)",
                       r"random and greedy substitutions at k = 2 \(2 of 2\)"],
        "precision": [rf"{fmt}, scaling {scaling}: val loss [\d.]+ \(fp32 [\d.]+\)"
                      for fmt in ("bf16", "fp8_e4m3") for scaling in ("none", "per_tensor")],
        "sharpness": [r"top Hessian eigenvalue \S+ after [1-3] power iterations"],
        "rank": [rf"spectra of {matrices} weight matrices",  # tiny: one block of 2 heads
                 r"attention layer 1 of 1: W_QK and Ṽ spectra, B3 of 2 head\(s\)"]}
    for name, phases in expected.items():
        params = config["evaluations"][name]
        out = tmp_path / f"{name}.parquet"
        assert evaluate(name, trained_run, char_shards, dict(params), out, "cpu") == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == len(phases) + 1 and lines[-1].startswith(f"{name}: ")
        seconds = []
        for line, phase in zip(lines, phases):
            match = re.fullmatch(rf"{name}: {phase} \((\d+\.\d) s\)", line)
            assert match, (line, phase)
            seconds.append(float(match.group(1)))
        assert seconds == sorted(seconds)
        torch.manual_seed(0)  # as the stage seeds before an evaluation that draws
        ctx, _ = build_context(trained_run, char_shards, evaluation_params(name, **params), torch.device("cpu"))
        rows = [{"run_id": "tiny-00000000", "eval": name, **row} for row in EVALUATIONS.get(name)(ctx)]
        written = pq.read_table(out).to_pylist()

        def text(table):  # as text: NaN equals NaN; a null cell is a key the row left out
            return json.dumps([{k: v for k, v in r.items() if v is not None} for r in table], sort_keys=True)

        assert text(written) == text(rows)


def test_the_val_evaluation_reports_the_windows_scored_so_far(trained_run, char_shards, tmp_path, monkeypatch,
                                                              capsys):
    """A large val split took minutes without a line; with PROGRESS_SECONDS = 0 the stage says before
    each batch after the first how many windows are scored, up to the last batch's start."""
    import lipflow.errors

    monkeypatch.setattr(lipflow.errors, "PROGRESS_SECONDS", 0.0)
    config = {"evaluations": {"val": {"batch_size": 2}}}
    check_config(config)
    assert evaluate("val", trained_run, char_shards, dict(config["evaluations"]["val"]), tmp_path / "v.parquet",
                    "cpu") == 0
    lines = capsys.readouterr().out.splitlines()
    progress = [re.fullmatch(r"val: ([\d,]+) of ([\d,]+) windows scored \(\d+\.\d s\)", line) for line in lines[:-1]]
    assert all(progress) and len(progress) >= 2, lines
    total = int(progress[0][2].replace(",", ""))
    assert [int(m[1].replace(",", "")) for m in progress] == list(range(2, total, 2))


def test_the_rank_job_measures_both_losses_once_for_its_gap(trained_run, char_shards, tmp_path, monkeypatch):
    from lipflow.data.loader import TokenShards

    calls = measured_windows(monkeypatch)
    config = {"evaluations": {"rank": {"bx_windows": 2}}}
    check_config(config)
    out = tmp_path / "rank.parquet"
    assert evaluate("rank", trained_run, char_shards, config["evaluations"]["rank"], out, "cpu") == 0
    context = json.loads((trained_run / "config.json").read_text())["config"]["context"]
    val_windows = TokenShards(char_shards, "val").sequential_windows(context).shape[0]
    assert len(calls) == 2 and calls[0] == val_windows  # the whole val split, then the train windows
    gap = [r["value"] for r in pq.read_table(out).to_pylist() if r["metric"] == "generalization_gap"]
    assert len(gap) == 1 and gap[0] == gap[0]


# what bench/gpu_check's machine may lack (issue 18: it has torch, JAX with numpy and scipy, pyarrow,
# safetensors, tokenizers, pytest, and jsonschema from the carried wheels; nothing installs from a registry)
BARE_GPU_MACHINE_LACKS = ("pandas", "duckdb", "snakemake", "matplotlib", "sklearn")
# Prepended to a script: importing any of {names} (or a submodule) fails as for a package not installed. The
# spec has no origin so that torch._dynamo, which looks up where well-known libraries live, passes over it.
ABSENT_MODULES = """import importlib.machinery, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name.partition(".")[0] in {names!r} else None
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}}", name=spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Absent())
"""


def test_the_train_and_evaluation_stages_run_without_what_a_bare_gpu_machine_lacks(char_shards, tiny_run_config,
                                                                                   tmp_path):
    """bench/gpu_check's CUDA tests train and evaluate on a machine without pandas (the evaluation stage
    imported it through lipflow.api), DuckDB, Snakemake, matplotlib or scikit-learn: here, in one process
    where importing any of them fails, a run trains and each evaluation the CUDA tests run but rank
    (which needs scipy, there through JAX) evaluates it."""
    config = {**tiny_run_config, **LIPSCHITZ, "steps": 2, "checkpoint_every": 0}
    params = {"val": {}, "precision": {},
              "robustness": {"n_sequences": 1, "epsilons": [0.5], "pgd_steps": 1, "k_values": [1], "random_trials": 1,
                             "greedy_candidates": 2, "lipschitz_steps": 1},
              "sharpness": {"batch_size": 4, "iters": 2}}
    run, data = str(tmp_path / "run"), str(char_shards)
    script = (ABSENT_MODULES.format(names=BARE_GPU_MACHINE_LACKS) +
              "from pathlib import Path\nfrom lipflow.train.trainer import Trainer\n"
              "from lipflow.evaluation.__main__ import evaluate\n"
              f"Trainer('tiny-00000000', {config!r}, Path({data!r}), Path({run!r}), progress=False).run()\n"
              f"for name, params in {params!r}.items():\n"
              f"    assert evaluate(name, Path({run!r}), Path({data!r}), params, Path({run!r}) / f'{{name}}.parquet', "
              "'cpu') == 0, name\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in params:
        assert {r["eval"] for r in pq.read_table(tmp_path / "run" / f"{name}.parquet").to_pylist()} == {name}


@pytest.mark.parametrize("bound", [float("nan"), float("inf"), 11.0])
def test_a_nan_or_too_large_certified_bound_ends_the_run_as_diverged(bound):
    """divergence() ends the run at the eval step when the certified bound is not ≤ max_bound,
    which includes a NaN bound (NaN > max_bound is False, but NaN ≤ max_bound is False too)."""
    from lipflow.train.stop import divergence

    rows = [{"step": 3, "loss": 1.0, "grad_norm": 1.0}, {"step": 4, "loss": 1.0, "grad_norm": 1.0,
                                                           "lipschitz_bound": bound}]
    stopped = divergence(rows, None, 10.0)
    assert stopped is not None and stopped[0] == 4


def test_a_bound_within_max_bound_does_not_end_the_run():
    from lipflow.train.stop import divergence

    assert divergence([{"step": 4, "loss": 1.0, "grad_norm": 1.0, "lipschitz_bound": 10.0}], None, 10.0) is None
    assert divergence([{"step": 4, "loss": 1.0, "grad_norm": 1.0}], None, 10.0) is None


# ---- resume, gradient accumulation and the cadence of evals (mutation round 3)

def _rows_without_wall_clock(rows):
    from lipflow.train.summary import WALL_CLOCK_COLUMNS

    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_COLUMNS} for row in rows]


def test_a_run_resumed_from_its_middle_checkpoint_ends_bit_for_bit_as_the_uninterrupted_one(
        char_shards, tiny_run_config, tmp_path):
    """Run 6 steps (checkpoints at 3 and 6); a second run given only the step-3 checkpoint resumes
    there (model, Muon momentum, data generator and metric rows restored) and ends with the same
    weights and metric rows."""
    import shutil

    cfg = {**tiny_run_config, **LIPSCHITZ, "steps": 6, "eval_every": 3, "checkpoint_every": 3,
           "schedule": "cosine", "warmup_steps": 1}
    full = Trainer("tiny-00000000", cfg, char_shards, tmp_path / "full", progress=False)
    full.run()
    names = sorted(p.name for p in (tmp_path / "full" / "checkpoints").glob("step-*.safetensors"))
    assert names == ["step-000000003.safetensors", "step-000000006.safetensors"]
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    for name in (names[0], names[0] + ".sha256"):
        shutil.copy(tmp_path / "full" / "checkpoints" / name, tmp_path / "resumed" / "checkpoints" / name)
    resumed = Trainer("tiny-00000000", cfg, char_shards, tmp_path / "resumed", progress=False)
    summary = resumed.run()
    assert summary["resumed"] is True and summary["steps_completed"] == 6
    mine, theirs = full.model.state_dict(), resumed.model.state_dict()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    assert _rows_without_wall_clock(resumed.metrics) == _rows_without_wall_clock(full.metrics)
    assert [row["step"] for row in resumed.metrics] == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_averages_the_micro_batches(char_shards, tiny_run_config, tmp_path):
    """With grad_accum = 2 a step's loss is the mean of its two micro-batches' losses and its gradient
    the mean of their gradients (micro-batches drawn one after the other from the data generator)."""
    cfg = {**tiny_run_config, "grad_accum": 2, "checkpoint_every": 0}
    trainer = Trainer("tiny-00000000", cfg, char_shards, tmp_path, progress=False)
    model = trainer.model
    generator = torch.Generator()
    generator.set_state(trainer.generator.get_state())
    batches = [trainer.train_data.sample_windows(cfg["batch_size"], cfg["context"], generator) for _ in range(2)]
    losses, grads = [], []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        logits = model(x).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    captured = {}

    def capture(*args, **kwargs):
        captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return torch.zeros((), dtype=torch.int64)

    import lipflow.train.trainer as trainer_module
    original = trainer_module.constrained_update
    trainer_module.constrained_update = capture
    try:
        result = trainer.train_step()
    finally:
        trainer_module.constrained_update = original
    assert torch.allclose(result.loss, (losses[0] + losses[1]) / 2, rtol=1e-5)
    assert captured.keys() == grads[0].keys()
    for name in captured:
        assert torch.allclose(captured[name], (grads[0][name] + grads[1][name]) / 2, rtol=1e-4, atol=1e-7), name


def test_evals_come_every_eval_every_steps_and_at_the_last_step(char_shards, tiny_run_config, tmp_path):
    """steps 7, eval_every 3: val_loss on the rows of steps 3, 6 and 7 only; the summary's final
    val_loss is step 7's."""
    cfg = {**tiny_run_config, "steps": 7, "eval_every": 3, "checkpoint_every": 0}
    trainer = Trainer("tiny-00000000", cfg, char_shards, tmp_path, progress=False)
    summary = trainer.run()
    assert [row["step"] for row in trainer.metrics if row.get("val_loss") is not None] == [3, 6, 7]
    assert summary["final_val_loss"] == trainer.metrics[-1]["val_loss"]
    assert summary["final_val_loss"] != trainer.metrics[2]["val_loss"]


def test_each_param_group_starts_from_the_configured_lr_as_its_base_lr(char_shards, tiny_run_config):
    """build_learner records each group's lr from the config as base_lr (the schedule scales it)."""
    cfg = {**tiny_run_config, "lr": 0.0123}
    _, optimizer, _, _ = build_learner(cfg, 40, torch.device("cpu"))
    assert all(group["base_lr"] == group["lr"] for group in optimizer.param_groups)
    assert any(group["base_lr"] == 0.0123 for group in optimizer.param_groups)


def test_a_hard_cap_holds_every_hidden_and_head_matrix_after_a_large_step(char_shards, tiny_run_config, tmp_path):
    """spectral_hard_cap σ_max 0.5 after three steps of lr 2: each matrix of the hidden and head roles
    (the head included: the certificate's last factor) has ‖W‖_RMS→RMS ≤ σ_max, measured by SVD."""
    from lipflow.model.base import rms_operator_norm

    sigma_max = 0.5
    cfg = {**tiny_run_config, **LIPSCHITZ, "lr": 2.0, "weight_constraint": "spectral_hard_cap", "sigma_max": sigma_max}
    trainer = Trainer("tiny-00000000", cfg, char_shards, tmp_path, progress=False)
    for _ in range(3):
        trainer.set_lr()
        trainer.train_step()
        trainer.step += 1
    roles = trainer.model.param_roles()
    matrices = [(name, p) for name, p in roles["hidden"] + roles["head"] if p.ndim == 2]
    assert any(name.startswith("head") for name, _ in roles["head"]) and len(roles["head"]) >= 1
    for name, p in matrices:
        assert rms_operator_norm(p) <= sigma_max * (1 + 1e-4), name


def test_train_tokens_cuts_the_train_split_and_leaves_val_whole(char_shards, tiny_run_config):
    """train_tokens M keeps the train split's first M tokens (windows are drawn inside them); val is whole."""
    full_train, full_val = token_splits(char_shards, {**tiny_run_config, "train_tokens": None})
    train, val = token_splits(char_shards, {**tiny_run_config, "train_tokens": 100})
    assert train.num_tokens == 100 < full_train.num_tokens and val.num_tokens == full_val.num_tokens
    assert (train.tokens(0, 100) == full_train.tokens(0, 100)).all()


def test_train_tokens_above_the_train_split_warns_that_the_run_trains_on_all_of_it(char_shards, tiny_run_config,
                                                                                    capsys, tmp_path):
    """rank_vs_n's n131072 on a 50,060-token corpus trained on 50,060 tokens without a word in its log. The
    trainer's rank 0 warns (a launcher and each worker read the splits)."""
    from lipflow.train.build import warn_of_a_short_train_split

    full_train, _ = token_splits(char_shards, {**tiny_run_config, "train_tokens": None})
    for train_tokens in (None, full_train.num_tokens):
        warn_of_a_short_train_split({**tiny_run_config, "train_tokens": train_tokens}, full_train, char_shards)
    assert capsys.readouterr().err == ""
    cfg = {**tiny_run_config, "train_tokens": 10 * full_train.num_tokens}
    train, _ = token_splits(char_shards, cfg)
    assert train.num_tokens == full_train.num_tokens
    Trainer("tiny-00000000", cfg, char_shards, tmp_path, progress=False)  # one process: its rank 0 says it
    warned = capsys.readouterr().err
    warn_of_a_short_train_split(cfg, train, char_shards)
    assert capsys.readouterr().err == warned == (f"warning: train_tokens {10 * full_train.num_tokens:,} is more than the "
                                       f"{full_train.num_tokens:,} tokens of the train split in {char_shards}: the run "
                                       "trains on all of them\n")


def test_an_evaluation_out_holding_another_runs_or_evaluations_rows_is_refused(trained_run, char_shards, tmp_path):
    """--out naming another run's (or evaluation's) table would file this one's rows under its name
    and lose its rows: refused before any work, the file as it was; its own earlier table is replaced."""
    config = {"evaluations": {"val": {}, "rank": {"bx_windows": 2}}}
    check_config(config)
    out = tmp_path / "rank.parquet"
    assert evaluate("rank", trained_run, char_shards, config["evaluations"]["rank"], out, "cpu") == 0
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=r"holds the rank rows of run tiny-00000000; refusing to replace them "
                                              r"with the val rows of run tiny-00000000"):
        evaluate("val", trained_run, char_shards, config["evaluations"]["val"], out, "cpu")
    assert out.read_bytes() == before
    assert evaluate("rank", trained_run, char_shards, config["evaluations"]["rank"], out, "cpu") == 0


def test_evaluating_a_completed_run_with_non_finite_weights_is_one_line(trained_run, char_shards, tmp_path):
    """Training ends a run whose weights stop being finite as diverged; weights made otherwise (an older
    version, a hand edit) would give NaN rows or a traceback in the SVD of the rank evaluation."""
    import shutil

    from safetensors.torch import load_file

    from lipflow.train.checkpoint import load_weights, save_weights

    run_dir = tmp_path / "nan_run"
    shutil.copytree(trained_run, run_dir)
    weights = load_file(run_dir / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_weights(run_dir / "model.safetensors", weights, load_weights(trained_run / "model.safetensors")[1])
    config = {"evaluations": {"rank": {"bx_windows": 2}}}
    check_config(config)
    with pytest.raises(ValueError, match=rf"has non-finite weights \({re.escape(name)}\) but .*run.json says the "
                                         "run completed"):
        evaluate("rank", run_dir, char_shards, config["evaluations"]["rank"], tmp_path / "rank.parquet", "cpu")
    assert not (tmp_path / "rank.parquet").exists()


def test_a_context_longer_than_train_tokens_names_train_tokens(char_shards, tiny_run_config):
    from lipflow.data import DataError

    with pytest.raises(DataError, match=r"context 16 is longer than the train split \(10 tokens, cut to train_tokens "
                                        r"10\)"):
        token_splits(char_shards, {**tiny_run_config, "train_tokens": 10})


def test_a_worker_of_several_leaves_the_runs_messages_to_rank_0(char_shards, tiny_run_config, tmp_path, capsys,
                                                                 monkeypatch):
    """Every worker of an nproc-2 run printed "resumed from …", "run … diverged at step …" and "lipflow:
    SIGTERM at step …": each line twice. A worker of rank > 0 now prints none of them (rank 0 says each once)."""
    import dataclasses
    import os
    import signal

    import lipflow.train.trainer
    from lipflow.distributed import Topology
    from lipflow.train.__main__ import main
    from lipflow.train.stop import Preempted

    class NotMain(Topology):  # rank 0's data in one process (no collectives), but not the main rank
        is_main = False

    def rank_1(cfg: dict, out) -> Trainer:
        trainer = Trainer("w-00000000", cfg, char_shards, out, progress=False)
        trainer.topo = NotMain(**dataclasses.asdict(trainer.topo))
        return trainer

    Trainer("w-00000000", tiny_run_config, char_shards, tmp_path / "run", progress=False).run()
    capsys.readouterr()
    assert rank_1(tiny_run_config, tmp_path / "run").run() == {}  # resumes at the last step
    diverging = rank_1({**tiny_run_config, "lr": 1e29}, tmp_path / "diverged")
    assert diverging.run() == {} and math.isnan(diverging.metrics[-1]["loss"])
    stopping = rank_1({**tiny_run_config, "checkpoint_every": 0}, tmp_path / "stopped")
    train_step = stopping.train_step
    monkeypatch.setattr(stopping, "train_step", lambda: (os.kill(os.getpid(), signal.SIGTERM), train_step())[1])
    with pytest.raises(Preempted) as stop:
        stopping.run()
    assert stopping.step == 1 and math.isfinite(stopping.metrics[-1]["loss"])
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(lipflow.train.trainer, "Trainer", lambda *args, **kwargs: stopping)
    monkeypatch.setattr(stopping, "run", lambda: (_ for _ in ()).throw(stop.value))
    assert main(["--run-id", "w-00000000", "--config-json", json.dumps(tiny_run_config), "--data-dir",
                 str(char_shards), "--out-dir", str(tmp_path / "stopped"), "--no-progress"]) == 143
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", ["checkpoints/step-000000003.safetensors.sha256", "checkpoints/step-000000003.safetensors",
                                  "model.safetensors.sha256", "run.json", "config.json", ".train.lock"])
def test_a_folder_where_training_writes_a_file_is_refused_naming_its_path(name, tmp_path):
    """A folder in the place of a file of the run (a checkpoint, its sidecar, the outputs, the lock) is a
    FileExistsError naming its path, from the start-up check that the launcher and every worker run."""
    from lipflow.train.build import check_run_directory

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / name).mkdir()
    with pytest.raises(FileExistsError, match=rf"^--out-dir {tmp_path}: {tmp_path / name} is a folder where training "
                                              r"writes a file; refusing to train into it \(move it away\)$"):
        check_run_directory(tmp_path, "a-0000000a", {})
