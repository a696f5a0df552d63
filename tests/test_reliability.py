"""Faults lose nothing: atomic checkpoints, bit-exact resume after SIGKILL, SIGTERM, divergence,
determinism, and no pickle on any load path."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lipflow.train.checkpoint import CheckpointError, latest_valid_checkpoint, load_weights, save_weights
from lipflow.atomic import write_with_sidecar

from conftest import run_stage, train_here


def train(cfg: dict, data: Path, out: Path, run_id: str = "tiny-00000000") -> subprocess.CompletedProcess:
    return run_stage("lipflow.train", "--run-id", run_id, "--config-json", json.dumps(cfg),
                     "--data-dir", str(data), "--out-dir", str(out), "--no-progress")


def start_training(cfg: dict, data: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lipflow.train", "--run-id", "tiny-00000000",
                             "--config-json", json.dumps(cfg), "--data-dir", str(data), "--out-dir", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not list((out / "checkpoints").glob("step-*.safetensors.sha256")):
        assert proc.poll() is None, f"training ended before its first checkpoint: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def slow_cfg(tiny_run_config):
    """Long enough (in steps) that a kill lands mid-run."""
    return {**tiny_run_config, "steps": 200, "checkpoint_every": 5, "eval_every": 50,
            "model": "lipschitz_gpt", "optimizer": "muon", "lr": 0.05, "weight_constraint": "spectral_soft_cap"}


def test_sigkill_then_rerun_resumes_bit_exact(char_shards, slow_cfg, tmp_path):
    reference = tmp_path / "reference"
    reference_run = start_training(slow_cfg, char_shards, reference)  # trains beside the killed and resumed run
    try:
        killed = tmp_path / "killed"
        proc = start_training(slow_cfg, char_shards, killed)
        wait_for_checkpoint(killed, proc)
        time.sleep(float(torch.rand(1)) * 0.2)  # a random point after the first checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == 0 or (killed / "model.safetensors").exists():
            pytest.skip("the run reached its final outputs before the kill landed")
        assert not (killed / "model.safetensors").exists()
        resumed = train(slow_cfg, char_shards, killed)
        _, reference_err = reference_run.communicate(timeout=600)
    finally:  # a failed or skipped test leaves no training process behind
        if reference_run.poll() is None:
            reference_run.kill()
            reference_run.communicate()
    assert reference_run.returncode == 0, reference_err[-2000:]
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step-" in resumed.stderr
    assert_bitwise_equal(weights(reference), weights(killed))
    ref_metrics = json.loads((reference / "run.json").read_text())
    assert json.loads((killed / "run.json").read_text())["final_val_loss"] == ref_metrics["final_val_loss"]


def test_sigterm_saves_checkpoint_and_exits_cleanly(char_shards, slow_cfg, tmp_path):
    """A run far too long to finish first (100,000 steps) gets SIGTERM after its first checkpoint: it
    saves one more after the step in flight, exits 143 without final outputs, and a rerun of the same
    config resumes from that checkpoint."""
    cfg = {**slow_cfg, "steps": 100_000, "eval_every": 50_000}
    out = tmp_path / "run"
    proc = start_training(cfg, char_shards, out)
    wait_for_checkpoint(out, proc)  # the loop (and its SIGTERM handler) is running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "checkpoint saved" in err
    path, _, meta = latest_valid_checkpoint(out / "checkpoints")
    assert f"SIGTERM at step {meta['step']}" in err
    assert not (out / "model.safetensors").exists()
    log = tmp_path / "resumed.log"
    with open(log, "w") as stderr:  # the rerun would train on for 100,000 steps: stop it once it resumed
        resumed = subprocess.Popen([sys.executable, "-m", "lipflow.train", "--run-id", "tiny-00000000",
                                    "--config-json", json.dumps(cfg), "--data-dir", str(char_shards),
                                    "--out-dir", str(out), "--no-progress"], stderr=stderr)
    try:
        deadline = time.time() + 120
        while f"resumed from {path.name}" not in log.read_text():
            assert resumed.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
    finally:
        resumed.kill()
        resumed.wait()


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    save_weights(ckpts / "step-000000003.safetensors", {"w": torch.ones(3)}, {"step": 3})
    save_weights(ckpts / "step-000000006.safetensors", {"w": torch.full((3,), 2.0)}, {"step": 6})
    newest = ckpts / "step-000000006.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7])  # truncated by a crash mid-copy
    path, tensors, meta = latest_valid_checkpoint(ckpts)
    assert path.name == "step-000000003.safetensors" and meta["step"] == 3
    assert torch.equal(tensors["w"], torch.ones(3))
    [warning] = capsys.readouterr().err.splitlines()
    assert "corrupt" in warning and warning.endswith("; falling back to an earlier checkpoint")
    oldest = ckpts / "step-000000003.safetensors"
    oldest.write_bytes(oldest.read_bytes()[:-7])
    assert latest_valid_checkpoint(ckpts) is None  # the trainer starts over: the last warning says so
    assert capsys.readouterr().err.splitlines()[-1].endswith("; no earlier checkpoint: training starts over")


def test_checkpoints_are_ordered_by_step_past_nine_digits(tmp_path):
    """Step 10⁹'s name has ten digits and sorted before step-999999999 by name: resume took the older
    checkpoint and pruning deleted the newest. They are ordered by the step in the name."""
    from lipflow.train.checkpoint import prune_checkpoints

    ckpts = tmp_path / "checkpoints"
    for step in (999_999_998, 999_999_999, 1_000_000_000):
        save_weights(ckpts / f"step-{step:09d}.safetensors", {"w": torch.full((1,), float(step))}, {"step": step})
    assert latest_valid_checkpoint(ckpts)[2]["step"] == 1_000_000_000
    prune_checkpoints(ckpts, keep=2)
    assert sorted(p.name for p in ckpts.glob("*.safetensors")) == ["step-1000000000.safetensors",
                                                                   "step-999999999.safetensors"]


def test_a_checkpoint_name_is_exactly_what_save_checkpoint_writes(tmp_path):
    """Only step-{step:09d}.safetensors is a checkpoint: resume and pruning leave a user's step-1 or
    step-0000000001 alone (pruning deleted them), and the train stage refuses a folder holding them."""
    from lipflow.train.checkpoint import checkpoint_step, prune_checkpoints

    assert [checkpoint_step(n) for n in ("step-000000001.safetensors", "step-1000000000.safetensors",
                                         "step-1.safetensors", "step-0000000001.safetensors",
                                         "step-00000001a.safetensors", "step-000000001.safetensors.sha256")] == [
        1, 10**9, None, None, None, None]
    ckpts = tmp_path / "checkpoints"
    for name in ("step-1.safetensors", "step-0000000001.safetensors"):
        (ckpts / name).parent.mkdir(exist_ok=True)
        (ckpts / name).write_text("mine")
    save_weights(ckpts / "step-000000002.safetensors", {"w": torch.ones(1)}, {"step": 2})
    prune_checkpoints(ckpts, keep=0)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000000001.safetensors", "step-1.safetensors"]


def test_checkpoint_without_sidecar_is_not_trusted(tmp_path, capsys):
    """A checkpoint whose sidecar is missing (a crash between the two writes, or a deletion) is
    never loaded unverified: resume falls back to the previous one, a direct load names the file."""
    ckpts = tmp_path / "checkpoints"
    save_weights(ckpts / "step-000000003.safetensors", {"w": torch.ones(3)}, {"step": 3})
    newest = ckpts / "step-000000006.safetensors"
    save_weights(newest, {"w": torch.full((3,), 2.0)}, {"step": 6})
    (ckpts / "step-000000006.safetensors.sha256").unlink()
    path, _, meta = latest_valid_checkpoint(ckpts)
    assert path.name == "step-000000003.safetensors" and meta["step"] == 3
    warning = capsys.readouterr().err
    assert "step-000000006.safetensors has no checksum file" in warning
    assert "seal" not in warning  # sealing a half-written checkpoint would make resume trust it
    with pytest.raises(CheckpointError, match="step-000000006.safetensors has no checksum file"):
        load_weights(newest)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_folder_given_as_weights_is_named_a_folder_not_missing(tmp_path):
    """`icl collect --runs <folder>` (or a run's model.safetensors that is a folder) said the checkpoint
    "does not exist", sending its user to look for a path that is there."""
    (tmp_path / "weights.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=rf"^checkpoint {tmp_path}/weights\.safetensors is a folder, not a file$"):
        load_weights(tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match=rf"^checkpoint {tmp_path}/none\.safetensors does not exist$"):
        load_weights(tmp_path / "none.safetensors")


def test_pickle_bearing_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    crafted = tmp_path / "model.safetensors"
    write_with_sidecar(crafted, pickle.dumps({"w": _Exploit()}))  # whoever writes one can write both
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_weights(crafted)
    torch.save({"w": torch.ones(2)}, tmp_path / "torch.safetensors")  # a zip of pickles
    write_with_sidecar(tmp_path / "torch.safetensors", (tmp_path / "torch.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_weights(tmp_path / "torch.safetensors")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("part", [("metadata", "step"), ("metadata", "optimizer"), ("tensor", "rng.torch"),
                                  ("tensor", "rng.data"), ("tensor", "metrics")])
def test_a_sealed_checkpoint_without_a_part_the_trainer_writes_is_one_line_naming_it(char_shards, tiny_run_config,
                                                                                     tmp_path, capsys, part):
    """A checkpoint of this run (its config and data) sealed without one of the parts lipflow's trainer writes
    was resumed until the lookup failed: `lipflow: error: missing key 'optimizer'`, naming no file, a KeyError
    that read as a file's missing key (a plain KeyError is a bug now, with its traceback). It is one line
    naming the checkpoint and the part, before anything is loaded or said resumed."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert train_here(tiny_run_config, char_shards, full) == 0
    tensors, meta = load_weights(full / "checkpoints" / "step-000000012.safetensors")
    kind, name = part
    (meta if kind == "metadata" else tensors).pop(name)
    checkpoint = resumed / "checkpoints" / "step-000000009.safetensors"
    save_weights(checkpoint, tensors, meta)
    capsys.readouterr()
    assert train_here(tiny_run_config, char_shards, resumed) == 2
    assert capsys.readouterr().err == (f"lipflow: error: {checkpoint} has no {kind} {name!r}, which every checkpoint "
                                       "of lipflow's trainer holds (written otherwise, or damaged and resealed); "
                                       "move it away to resume from an earlier one\n")


@pytest.mark.parametrize("model, checkpoint_every", [("gpt", 3), ("gpt", 50), ("lipschitz_gpt", 50)])
def test_nan_loss_marks_run_diverged_with_step(char_shards, tiny_run_config, tmp_path, model, checkpoint_every):
    """An overflowing lr ends the run as diverged, whether the losses are read at a checkpoint step
    before the eval step or only at the eval step (the default cadence), where the weights may already
    be non-finite while the last loss was finite: no norm or certificate is taken of them."""
    cfg = {**tiny_run_config, "model": model, "lr": 1e30, "optimizer": "adamw", "steps": 30,
           "checkpoint_every": checkpoint_every}
    assert train_here(cfg, char_shards, tmp_path) == 0
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["status"] == "diverged"
    assert 1 <= summary["diverged_step"] <= 30
    assert "loss" in summary["diverged_reason"] or summary["diverged_reason"] == "weights are non-finite"


@pytest.mark.parametrize("model", ["gpt", "lipschitz_gpt"])
def test_weights_that_overflow_after_a_finite_loss_end_the_run_at_the_eval_step(char_shards, tiny_run_config,
                                                                              tmp_path, model):
    """The step that reaches an eval step leaves an infinite weight while its loss was finite: the run
    ends there as diverged, without taking norms or a certificate of the matrices (an SVD of a
    non-finite matrix fails), and writes its outputs."""
    from lipflow.train.trainer import Trainer

    cfg = {**tiny_run_config, "model": model, "optimizer": "muon", "lr": 0.01}
    trainer = Trainer("tiny-00000000", cfg, char_shards, tmp_path, progress=False)
    step = trainer.train_step

    def overflowing_step():
        result = step()
        if trainer.step + 1 == cfg["eval_every"]:  # the step being taken is the first eval step
            with torch.no_grad():
                next(p for p in trainer.model.parameters() if p.ndim == 2).view(-1)[0] = float("inf")
        return result

    trainer.train_step = overflowing_step
    summary = trainer.run()
    assert (summary["status"], summary["diverged_step"], summary["diverged_reason"]) == (
        "diverged", cfg["eval_every"], "weights are non-finite")
    assert summary["lipschitz_bound"] is None and (tmp_path / "model.safetensors").is_file()


def test_bound_above_ceiling_marks_run_diverged(char_shards, tiny_run_config, tmp_path):
    cfg = {**tiny_run_config, "model": "lipschitz_gpt", "optimizer": "muon", "lr": 0.05, "max_bound": 1e-6}
    assert train_here(cfg, char_shards, tmp_path) == 0
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_step"] == cfg["eval_every"]
    assert "max_bound" in summary["diverged_reason"]


def test_same_config_and_seed_give_identical_metrics(char_shards, tiny_run_config, tmp_path):
    for name in ("a", "b"):
        assert train(tiny_run_config, char_shards, tmp_path / name).returncode == 0
    import pyarrow.parquet as pq

    from lipflow.train.summary import WALL_CLOCK_COLUMNS

    ta, tb = ([{k: v for k, v in r.items() if k not in WALL_CLOCK_COLUMNS}
               for r in pq.read_table(tmp_path / n / "train_metrics.parquet").to_pylist()] for n in ("a", "b"))
    assert ta == tb and len(ta) == tiny_run_config["steps"]
    assert all(r["step_time"] > 0 for r in pq.read_table(tmp_path / "a" / "train_metrics.parquet").to_pylist())
    assert_bitwise_equal(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_tensorboard_mirrors_the_logged_metrics(char_shards, tiny_run_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train_here({**tiny_run_config, "tensorboard": True}, char_shards, tmp_path) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    import pyarrow.parquet as pq

    logged = pq.read_table(tmp_path / "train_metrics.parquet").column("loss").to_pylist()
    assert losses == pytest.approx(logged, rel=1e-6)
    assert len(events.Scalars("val_loss")) == tiny_run_config["steps"] // tiny_run_config["eval_every"]


def test_a_stop_signal_once_the_summary_is_written_leaves_the_exit_code_0(char_shards, tiny_run_config, tmp_path,
                                                                          monkeypatch, capsys):
    """SIGTERM to the train command after its run's summary is written (as it shuts down: about a
    second) changes nothing: the command returns 0 and the process ignores stop signals until it
    exits, never exiting 143 (SIGTERM's default) with the run complete. SIGTERM's default is a
    handler that raises here, so that pytest lives; the signal comes as the stage shuts its process
    group down (run.json written) and again after it returned."""
    from lipflow import distributed
    from lipflow.train.__main__ import main

    class Terminated(Exception):
        pass

    def terminated(signum, frame):
        raise Terminated

    shutdown = distributed.shutdown

    def shutdown_signalled(topo):
        os.kill(os.getpid(), signal.SIGTERM)
        shutdown(topo)

    monkeypatch.setattr(distributed, "shutdown", shutdown_signalled)
    out = tmp_path / "run"
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, terminated)
    try:
        code = main(["--run-id", "tiny-00000000", "--config-json", json.dumps(tiny_run_config), "--data-dir",
                     str(char_shards), "--out-dir", str(out), "--no-progress"], exits=True)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        ignored = [signal.getsignal(sig) for sig in handlers]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert code == 0 and ignored == [signal.SIG_IGN, signal.SIG_IGN]
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_a_stop_signal_while_the_finished_run_writes_its_outputs_lets_it_complete(char_shards, tiny_run_config,
                                                                                 tmp_path, monkeypatch, capsys):
    """SIGTERM after the last step, while the run writes its weights, metrics and run.json, lets it complete
    (exit 0, run.json completed): those seconds ended it at SIGTERM's default, with no checkpoint of the
    trained steps (every one of them, with checkpoint_every: 0) and exit 143. With nproc > 1 a rank waiting
    for rank 0's writes died so while rank 0 completed the run: exit 143 with run.json completed, and
    Snakemake deleted the finished run's outputs. SIGTERM's default is a handler that raises here, so
    that pytest lives."""
    from lipflow.train.__main__ import main
    from lipflow.train.trainer import Trainer

    class Terminated(Exception):
        pass

    def terminated(signum, frame):
        raise Terminated

    finish = Trainer.finish

    def finish_signalled(self, *args):
        os.kill(os.getpid(), signal.SIGTERM)
        return finish(self, *args)

    monkeypatch.setattr(Trainer, "finish", finish_signalled)
    out = tmp_path / "run"
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        cfg = {**tiny_run_config, "checkpoint_every": 0}
        code = main(["--run-id", "tiny-00000000", "--config-json", json.dumps(cfg), "--data-dir", str(char_shards),
                     "--out-dir", str(out), "--no-progress"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 0
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_a_run_with_tensorboard_that_fails_at_its_first_step_leaves_no_run_folder(char_shards, tiny_run_config,
                                                                                   tmp_path, monkeypatch, capsys):
    """A batch too large for memory fails at the first forward (one line, exit 2) and leaves no run folder;
    with tensorboard: true the mirror had already made tensorboard/ and its event file, so the folder stayed."""
    pytest.importorskip("tensorboard")
    from lipflow.train.__main__ import main
    from lipflow.train.trainer import Trainer

    def out_of_memory(self):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 34359738368 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(Trainer, "train_step", out_of_memory)
    out = tmp_path / "run"
    code = main(["--run-id", "tiny-00000000", "--config-json", json.dumps({**tiny_run_config, "tensorboard": True}),
                 "--data-dir", str(char_shards), "--out-dir", str(out), "--no-progress"])
    assert code == 2 and "out of memory" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("optimizer, preconditioned", [("adamw", True), ("muon", False)])
def test_sharpness_is_logged_every_sharpness_every_steps(char_shards, tiny_run_config, tmp_path,
                                                        optimizer, preconditioned):
    """sharpness_every logs λ_max(H) every that many steps, eval steps or not (6 and 12 with eval_every
    4; step 6 was skipped when only eval steps measured it); AdamW also λ_max(P⁻¹H), Muon (no Adam state
    on its matrices) leaves it NULL."""
    import pyarrow.parquet as pq

    cfg = {**tiny_run_config, "optimizer": optimizer, "lr": 0.01, "sharpness_every": 6, "sharpness_iters": 5}
    assert cfg["eval_every"] == 4 and cfg["steps"] == 12
    assert train_here(cfg, char_shards, tmp_path) == 0
    rows = pq.read_table(tmp_path / "train_metrics.parquet").to_pylist()
    logged = {r["step"]: (r["sharpness"], r["preconditioned_sharpness"]) for r in rows if r["sharpness"] is not None}
    assert sorted(logged) == [6, 12]
    for sharpness, pre in logged.values():
        assert sharpness != 0 and sharpness == sharpness
        assert (pre is not None and pre > 0) == preconditioned
    assert next(r for r in rows if r["step"] == 6)["val_loss"] is None  # not an eval step


def test_a_sharpness_that_missed_its_residual_test_is_warned_once_per_run(char_shards, tiny_run_config, tmp_path,
                                                                         capsys):
    """One Lanczos step (sharpness_iters 1) cannot meet the residual test: of the four measurements (λ_max of H
    and of P⁻¹H at steps 6 and 12) the first is named in one line, the others are not repeated, and the value
    is logged all the same."""
    import pyarrow.parquet as pq

    cfg = {**tiny_run_config, "optimizer": "adamw", "lr": 0.01, "sharpness_every": 6, "sharpness_iters": 1}
    capsys.readouterr()
    assert train_here(cfg, char_shards, tmp_path) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "sharpness" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: run tiny-00000000: sharpness at step 6 ended at sharpness_iters=1 "), warnings
    assert "raise sharpness_iters" in warnings[0]
    rows = pq.read_table(tmp_path / "train_metrics.parquet").to_pylist()
    assert sum(r["sharpness"] is not None for r in rows) == 2


def test_compiled_training_matches_eager(char_shards, tiny_run_config, tmp_path, monkeypatch):
    """compile: true (model, Muon's Newton–Schulz and the soft cap through torch.compile) trains the same model as
    eager mode. The graphs are captured by Dynamo and AOTAutograd as in any compile; the backend is
    aot_eager here (inductor's C++ build takes minutes on 2 cores; bench/gpu_check runs inductor on CUDA)."""
    import functools

    from lipflow.constraints import _compiled_soft_cap_polynomial
    from lipflow.train.trainer import Trainer

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    _compiled_soft_cap_polynomial.cache_clear()  # made once per process: made here with this backend
    cfg = {**tiny_run_config, "model": "lipschitz_gpt", "optimizer": "muon", "lr": 0.05,
           "weight_constraint": "spectral_soft_cap"}
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        trainer = Trainer("tiny-00000000", {**cfg, "compile": compiled}, char_shards, tmp_path / str(compiled),
                          progress=False)
        losses[compiled] = [float(trainer.train_step().loss) for _ in range(4)]
        if compiled:
            from lipflow.optimizers import newton_schulz

            assert isinstance(trainer.loss, torch._dynamo.eval_frame.OptimizedModule)
            assert trainer.optimizer._newton_schulz is not newton_schulz
            assert trainer.constraint.compile and _compiled_soft_cap_polynomial.cache_info().currsize == 1
            # the model (one graph: no break), Newton–Schulz and the soft cap, each once per matrix shape
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before >= 3
            weights_compiled = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        else:
            weights_eager = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _compiled_soft_cap_polynomial.cache_clear()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    for name in weights_eager:
        torch.testing.assert_close(weights_compiled[name], weights_eager[name], atol=1e-5, rtol=1e-4)


def test_a_killed_snakemake_leaves_a_lock_that_unlock_removes(tmp_path):
    """SIGKILL of Snakemake and its jobs (a lost login node): the next run refuses the locked
    directory; `snakemake --unlock` clears it and the rerun completes."""
    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "config.yaml").write_text("runs: {}\n")  # the database only
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(tmp_path),
           "--configfile", str(tmp_path / "config.yaml"), "-c1"]
    proc = subprocess.Popen([*cmd, "results/lipflow.duckdb"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list((tmp_path / ".snakemake" / "locks").glob("*")):
        assert proc.poll() is None and time.time() < deadline, "Snakemake ended before it took its lock"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    locked = subprocess.run([*cmd, "results/lipflow.duckdb"], capture_output=True, text=True, timeout=300)
    assert locked.returncode != 0 and "cannot be locked" in locked.stderr + locked.stdout
    assert subprocess.run([*cmd, "--unlock"], capture_output=True, timeout=300).returncode == 0
    done = subprocess.run([*cmd, "results/lipflow.duckdb"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "results" / "lipflow.duckdb").is_file()


def test_snakemake_sigtermed_with_its_train_job_waits_for_the_preemption_checkpoint(tmp_path):
    """SLURM preempts a job by sending SIGTERM to all of its processes, and ends the job once its script
    (Snakemake) exits, killing what is left. The train rule's shell died of that SIGTERM at once, so
    Snakemake, which waits for its running jobs, saw the job fail and exited while the trainer was
    still in its step: under SLURM the step in flight and the preemption checkpoint were lost. The
    shell now execs the stage, so Snakemake exits only after the checkpoint is saved."""
    from conftest import SNAKEMAKE_SINGLE_THREADED

    repo = Path(__file__).resolve().parent.parent
    # a step of 3000 micro-batches takes seconds (10 s on 2 busy cores): a SIGTERM lands inside one
    (tmp_path / "config.yaml").write_text(
        "defaults: {d_model: 32, n_layers: 1, n_heads: 2, context: 16, batch_size: 4, steps: 100000, "
        "eval_every: 100000, eval_batches: 1, checkpoint_every: 1, grad_accum: 3000, device: cpu}\n"
        "runs: {slow: {}}\nevaluations: {enabled: []}\n")
    run_id = subprocess.run([sys.executable, "-m", "lipflow.cli", "runs", "--configfile", "config.yaml"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120).stdout.split()[-1]
    run = tmp_path / "results" / "runs" / run_id
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", f"results/runs/{run_id}/run.json", "-s",
                             str(repo / "Snakefile"), "-d", str(tmp_path), "--configfile",
                             str(tmp_path / "config.yaml"), "-c2", *SNAKEMAKE_SINGLE_THREADED],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "step-000000001.safetensors.sha256").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no training step within 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # what SLURM does: every process of the job
        proc.wait(timeout=300)
        log = (tmp_path / "results" / "logs" / "train" / f"{run_id}.log").read_text()
        assert "checkpoint saved" in log, f"Snakemake exited before its train job had stopped: {log[-500:]}"
    finally:
        for pid in subprocess.run(["pgrep", "-f", run_id], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("writer", ["atomic_write", "atomic_dir"])
def test_what_a_killed_write_left_is_removed_by_the_next_write(tmp_path, writer):
    """A process SIGKILLed inside an atomic write leaves its temporary sibling (the rename never came);
    the next write of the same path removes it. A live process's temporary and other names stay."""
    final = tmp_path / "out"
    body = {"atomic_write": f"with atomic_write({str(final)!r}) as f:\n    f.write(b'half')\n",
            "atomic_dir": f"with atomic_dir({str(final)!r}, owned=()) as d:\n    (d / 'x').write_text('half')\n"}
    script = (f"import os, signal\nfrom lipflow.atomic import atomic_dir, atomic_write\n{body[writer]}"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    from lipflow.atomic import temp_prefix, atomic_dir, atomic_write

    ours = tmp_path / (temp_prefix(final) + "live")  # this (live) process's
    ours.write_text("in progress")
    (tmp_path / ".out.tmp-otherhost-1-x").write_text("another machine's")
    if writer == "atomic_write":
        with atomic_write(final) as f:
            f.write(b"whole")
    else:
        with atomic_dir(final, owned=("x",)) as d:
            (d / "x").write_text("whole")
    assert not left.exists()
    assert ours.exists() and (tmp_path / ".out.tmp-otherhost-1-x").exists()


def test_what_a_killed_database_build_left_is_removed_by_the_next(char_shards, tmp_path):
    """The build writes a temporary database (and its write-ahead log) beside the real one; after a
    SIGKILL they stay until the next build, which removes them."""
    from lipflow.atomic import HOST

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = [tmp_path / f".db.duckdb.tmp-{HOST}-{gone.stdout.strip()}-build{suffix}" for suffix in ("", ".wal")]
    for path in left:
        path.write_bytes(b"half a database")
    done = run_stage("lipflow.results", "build", "--out", str(tmp_path / "db.duckdb"), "--manifest",
                     str(char_shards / "manifest.json"))
    assert done.returncode == 0, done.stderr
    assert not any(path.exists() for path in left)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.duckdb"]


def test_checkpoints_are_kept_and_resumed_newest_by_step_across_a_digit_boundary(tmp_path):
    """save_checkpoint at steps 8, 9, 10, 11 keeps the two newest (10 and 11, not the lexically largest
    names), and resume loads step 11 into model and optimizer and restores the data generator; a
    checkpoint of another config is refused, one of other data is dropped."""
    from lipflow.train.checkpoint import TrainingState, resume, save_checkpoint

    ckpts = tmp_path / "checkpoints"
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    identity = {"config_hash": "c", "manifest_sha256": "m"}
    saved = {}
    for step in (8, 9, 10, 11):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        torch.rand(1, generator=generator)
        saved[step] = ({k: v.clone() for k, v in model.state_dict().items()},
                       optimizer.state_dict()["state"][0]["exp_avg"].clone(), generator.get_state())
        save_checkpoint(ckpts, TrainingState(step, [{"step": s} for s in range(1, step + 1)]), model, optimizer,
                        generator, identity)
        torch_rng = torch.get_rng_state()
    torch.rand(5)  # the global RNG moves on after the last checkpoint
    assert sorted(int(p.name[5:14]) for p in ckpts.glob("step-*.safetensors")) == [10, 11]
    assert len(list(ckpts.glob("step-*.safetensors.sha256"))) == 2

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    fresh_gen = torch.Generator().manual_seed(123)
    state = resume(ckpts, fresh, fresh_opt, fresh_gen, identity, tmp_path)
    assert state.step == 11 and [r["step"] for r in state.metrics] == list(range(1, 12))
    weights_11, exp_avg_11, gen_11 = saved[11]
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, weights_11[name]), name
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], exp_avg_11)
    assert torch.equal(fresh_gen.get_state(), gen_11)
    assert torch.equal(torch.get_rng_state(), torch_rng)

    with pytest.raises(CheckpointError, match="another run's checkpoint"):
        resume(ckpts, fresh, fresh_opt, fresh_gen, {**identity, "config_hash": "other"}, tmp_path)
    assert resume(ckpts, fresh, fresh_opt, fresh_gen, {**identity, "manifest_sha256": "other"}, tmp_path) is None
    assert not list(ckpts.glob("step-*"))


def test_a_long_runs_metric_rows_stay_out_of_the_checkpoint_header(tmp_path):
    """safetensors refuses a header above 100 MB, and a checkpoint's metric rows grow with the run
    (≈ 0.4 kB a step at 12 blocks: a 250k-step run failed at its next checkpoint with a traceback):
    they are a tensor, so the header does not grow with them, and resume
    returns them; a checkpoint written with the rows in its metadata still resumes."""
    from lipflow.train.checkpoint import TrainingState, resume, save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    identity = {"config_hash": "c", "manifest_sha256": "m"}
    headers = {}
    for rows in (1, 5000):
        metrics = [{"step": s, "loss": 1.5, "layers": "x" * 200} for s in range(1, rows + 1)]
        ckpts = tmp_path / str(rows)
        save_checkpoint(ckpts, TrainingState(rows, metrics), model, optimizer, torch.Generator(), identity)
        path = ckpts / f"step-{rows:09d}.safetensors"
        headers[rows] = int.from_bytes(path.read_bytes()[:8], "little")
        state = resume(ckpts, model, optimizer, torch.Generator(), identity, tmp_path)
        assert state.step == rows and state.metrics == metrics
    assert headers[5000] < headers[1] + 100  # the rows are 1.1 MB of JSON: only the tensor offsets grew

    old = tmp_path / "old"  # the format before: rows in the header's metadata, no metrics tensor
    tensors, meta = load_weights(tmp_path / "1" / "step-000000001.safetensors")
    del tensors["metrics"]
    save_weights(old / "step-000000001.safetensors", tensors, {**meta, "metrics": [{"step": 1, "loss": 2.5}]})
    state = resume(old, model, optimizer, torch.Generator(), identity, tmp_path)
    assert state.metrics == [{"step": 1, "loss": 2.5}]


def test_a_trainer_refused_a_held_run_folder_names_the_run_training_there(tmp_path):
    """A trainer of another run id into a folder held by a training run said "another process is training
    run <its own id> into it" and sent the user to `pgrep -af <its own id>`, which finds nothing: the
    holder now writes its run id into the lock file, and the refusal names that run."""
    from lipflow.train.build import exclusive_run_folder

    with exclusive_run_folder(tmp_path / "run", "held-0000abcd"):
        with pytest.raises(FileExistsError) as refused:
            with exclusive_run_folder(tmp_path / "run", "other-1234abcd"):
                pass
    assert "training run held-0000abcd into it" in str(refused.value), refused.value
    assert "pgrep -af held-0000abcd" in str(refused.value) and "other-1234abcd" not in str(refused.value)


def test_a_second_trainer_of_a_run_is_refused_while_the_first_trains(char_shards, tiny_run_config, tmp_path):
    """A rerun while the job of a killed Snakemake still trains the run (an orphan holding the run
    folder's flock) is one line and writes nothing; once the folder is free, training runs."""
    from lipflow.train.build import exclusive_run_folder

    out = tmp_path / "runs" / "tiny-00000000"
    args = ["--run-id", "tiny-00000000", "--config-json", json.dumps(tiny_run_config), "--data-dir", str(char_shards),
            "--out-dir", str(out), "--no-progress"]
    with exclusive_run_folder(out, "tiny-00000000"):
        done = run_stage("lipflow.train", *args)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "another process is training run tiny-00000000 into it" in lines[0], lines[0]
        assert [entry.name for entry in out.iterdir()] == [".train.lock"]  # nothing written
    done = run_stage("lipflow.train", *args)
    assert done.returncode == 0, done.stderr
    assert (out / "run.json").is_file()


def test_a_resumed_run_records_its_first_start_and_commit_and_warns_of_another(char_shards, tiny_run_config, tmp_path,
                                                                               monkeypatch, capsys):
    """run.json's start_time, git_commit and versions are the run's first start's, carried through its
    checkpoints: a rerun that only reloads the final checkpoint (``snakemake -R train`` after a code
    change) must not stamp the old weights with the new commit, and says how to train afresh."""
    from lipflow import provenance
    from lipflow.train.trainer import Trainer

    out = tmp_path / "run"
    monkeypatch.setattr(provenance, "git_commit", lambda cwd=None: "a" * 40)
    first = Trainer("tiny-00000000", tiny_run_config, char_shards, out, progress=False).run()
    weights = (out / "model.safetensors").read_bytes()
    for name in ("model.safetensors", "model.safetensors.sha256", "run.json", "config.json", "train_metrics.parquet",
                 "train_metrics.parquet.sha256"):
        (out / name).unlink()  # what --delete-all-output leaves: the checkpoints
    monkeypatch.setattr(provenance, "git_commit", lambda cwd=None: "b" * 40)
    versions = provenance.package_versions()
    monkeypatch.setattr(provenance, "package_versions", lambda: {**versions, "torch": "9.9.9"})
    capsys.readouterr()
    again = Trainer("tiny-00000000", tiny_run_config, char_shards, out, progress=False).run()
    err = capsys.readouterr().err
    assert again["resumed"] and (out / "model.safetensors").read_bytes() == weights
    assert again["git_commit"] == "a" * 40 and again["start_time"] == first["start_time"]
    assert again["versions"] == first["versions"] != {**versions, "torch": "9.9.9"}
    assert again["end_time"] > first["end_time"]
    assert (f"started under commit {'a' * 40}, torch {versions['torch']} and resumes under commit {'b' * 40}, "
            "torch 9.9.9") in err, err
    assert json.loads((out / "run.json").read_text())["git_commit"] == "a" * 40


def test_a_finished_run_is_not_retrained_by_hand_on_other_token_shards(char_shards, tiny_run_config, tmp_path):
    """The train stage pointed at a finished run's folder with other shards (another corpus split)
    refused nothing and replaced the weights, leaving the run's evaluations describing the old model;
    it is one line and the weights keep their bytes (the pipeline deletes the outputs first)."""
    other = tmp_path / "other"
    assert run_stage("lipflow.data.corpus", "--config-json", json.dumps({"name": "pydoc", "source": "embedded",
                                                                         "val_fraction": 0.3}),
                     "--out-dir", str(other / "corpus")).returncode == 0
    assert run_stage("lipflow.data.tokenize", "--corpus-dir", str(other / "corpus"), "--config-json",
                     json.dumps({"kind": "char"}), "--out-dir", str(other / "char")).returncode == 0
    from lipflow.train.__main__ import main

    out = tmp_path / "run"
    args = ["--run-id", "tiny-00000000", "--config-json", json.dumps(tiny_run_config), "--out-dir", str(out),
            "--no-progress"]
    assert main([*args, "--data-dir", str(char_shards)]) == 0  # the finished run (in this process: no imports)
    weights = (out / "model.safetensors").read_bytes()
    done = run_stage("lipflow.train", *args, "--data-dir", str(other / "char"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "holds run tiny-00000000 finished on other token shards" in lines[0], lines[0]
    assert (out / "model.safetensors").read_bytes() == weights
    assert run_stage("lipflow.train", *args, "--data-dir", str(char_shards)).returncode == 0  # a rerun: allowed


def test_a_run_folder_that_cannot_be_made_is_left_to_the_stages_own_check(char_shards, tiny_run_config, tmp_path,
                                                                          capsys):
    """Where the folder or its lock file cannot be created (here: its parent is a file; a read-only
    parent alike) the lock steps aside and the stage names the folder in its own words."""
    from lipflow.train.__main__ import main
    from lipflow.train.build import exclusive_run_folder

    (tmp_path / "notes").write_text("mine")
    with exclusive_run_folder(tmp_path / "notes" / "run", "tiny-00000000"):
        pass
    assert main(["--run-id", "tiny-00000000", "--config-json", json.dumps(tiny_run_config), "--data-dir",
                 str(char_shards), "--out-dir", str(tmp_path / "notes" / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create results directory" in err[0], err
    assert (tmp_path / "notes").read_text() == "mine"


def test_a_refused_out_dir_of_the_users_is_left_without_a_lock_file(char_shards, tiny_run_config, tmp_path):
    """The stage took the run folder's lock (creating .train.lock) before checking the folder, so a
    user's folder it then refused in one line was left holding a lock file: the folder is checked first."""
    out = tmp_path / "mine"
    (out / "keep").mkdir(parents=True)
    done = run_stage("lipflow.train", "--run-id", "tiny-00000000", "--config-json", json.dumps(tiny_run_config),
                     "--data-dir", str(char_shards), "--out-dir", str(out), "--no-progress")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "holds 'keep'" in lines[0], done.stderr
    assert sorted(entry.name for entry in out.iterdir()) == ["keep"]


def test_the_temporary_checkpoints_a_killed_trainer_left_are_removed_once_the_run_folder_is_held(tmp_path, capsys):
    """A killed trainer's temporary checkpoint files (its rename never came) stayed forever: only the next write
    of the same file removed them. Holding the run folder's lock, no other process writes checkpoints there, so
    the stage removes every temporary of a checkpoint name and says so; a user's other dot-file is kept."""
    from lipflow.train.build import exclusive_run_folder

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    left = [".step-000001168.safetensors.tmp-otherhost-4242-ab12cd34",
            ".step-000001168.safetensors.sha256.tmp-node-7-999999-zz_y0x9w"]
    kept = [".notes.tmp-me-1-abcdefgh", "step-000000100.safetensors", ".hidden"]
    for name in left + kept:
        (checkpoints / name).write_bytes(b"x")
    with exclusive_run_folder(tmp_path / "run", "tiny-00000000"):
        pass
    assert sorted(entry.name for entry in checkpoints.iterdir()) == sorted(kept)
    err = capsys.readouterr().err
    assert "removed 2 temporary file(s) a killed trainer left" in err and left[0] in err, err


def _write_then_kill(path: Path, data: bytes, after: str) -> None:
    """Run ``write_with_sidecar(path, data)`` in a process SIGKILLed (a power cut) right after its first
    atomic write of the sidecar (``after`` "sidecar") or of the file itself (``after`` "file")."""
    target = str(path) + (".sha256" if after == "sidecar" else "")
    script = ("import os, signal\nimport lipflow.atomic as atomic\nwrite = atomic.write_bytes_atomic\n"
              "def dying(path, data):\n    write(path, data)\n"
              f"    if str(path) == {target!r}:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
              "atomic.write_bytes_atomic = dying\n"
              f"atomic.write_with_sidecar({str(path)!r}, {data!r})\n")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr


@pytest.mark.parametrize("after", ["sidecar", "file"])
def test_a_crash_between_a_file_and_its_sidecar_leaves_a_file_its_sidecar_vouches_for(tmp_path, after):
    """A table or figure replaced by a process killed between writing the file and its sidecar left the new
    file beside the old digest: lipflow's own output then read as corrupt and was refused as a user's edit at
    the next plots job. The sidecar now lists the new digest and the old before the file is replaced: the
    file a crash leaves (old after the first step, new after the second) is verified, the next write replaces
    it and cuts the sidecar to one digest, and bytes of neither are still refused."""
    from lipflow.atomic import IntegrityError, is_checksum, is_sealed, read_verified, sidecar_path

    path = tmp_path / "lr_transfer.csv"
    write_with_sidecar(path, b"old\n")
    _write_then_kill(path, b"new\n", after)
    left = {"sidecar": b"old\n", "file": b"new\n"}[after]
    assert read_verified(path) == left
    assert is_checksum(sidecar_path(path)) and len(sidecar_path(path).read_text().split()) == 2
    path.write_bytes(b"edited\n")
    assert not is_sealed(path)
    with pytest.raises(IntegrityError, match="corrupt"):
        read_verified(path)
    path.write_bytes(left)
    write_with_sidecar(path, b"newer\n")
    assert read_verified(path) == b"newer\n"
    assert sidecar_path(path).read_bytes() == (hashlib.sha256(b"newer\n").hexdigest() + "\n").encode()


def test_crashes_in_a_row_keep_the_digest_of_the_file_that_is_there(tmp_path):
    """Two writes killed after their first step in a row: the file is still the first one, and the second
    write's sidecar lists the digest of that file (not of the first crashed write's data, which never
    landed), so the file stays verified; the sidecar never grows past two digests. With the file gone
    meanwhile (a user deleted the figure to have it redrawn), a write killed after its file is in place
    leaves that file verified too (the sidecar, which vouched for no file there, was cut to the new digest
    first)."""
    from lipflow.atomic import read_verified, sidecar_path

    path = tmp_path / "figure.svg"
    write_with_sidecar(path, b"first")
    _write_then_kill(path, b"second", "sidecar")
    _write_then_kill(path, b"third", "sidecar")
    assert read_verified(path) == b"first"
    assert sidecar_path(path).read_text().split() == [hashlib.sha256(b).hexdigest() for b in (b"third", b"first")]
    _write_then_kill(path, b"fourth", "file")
    assert read_verified(path) == b"fourth"
    _write_then_kill(path, b"fifth", "sidecar")
    path.unlink()
    _write_then_kill(path, b"sixth", "file")
    assert read_verified(path) == b"sixth"


def test_a_read_while_a_writer_replaces_the_file_is_no_corruption(tmp_path, monkeypatch):
    """read_verified read the file, then its sidecar: a writer replacing both in between (all three of
    write_with_sidecar's steps) left old bytes checked against a sidecar cut to the new digest, and a
    reader (the database build, an evaluation) called the file corrupt. The sidecar read before the file
    vouches for the old bytes now; bytes neither sidecar read vouches for are still corrupt."""
    from pathlib import Path

    from lipflow.atomic import IntegrityError, read_verified, write_with_sidecar

    table = tmp_path / "evals.parquet"
    write_with_sidecar(table, b"old")
    read_bytes = Path.read_bytes

    def read_then_replace(self, replacement):
        data = read_bytes(self)
        if self == table:
            monkeypatch.setattr(Path, "read_bytes", read_bytes)
            write_with_sidecar(table, replacement)
        return data

    monkeypatch.setattr(Path, "read_bytes", lambda self: read_then_replace(self, b"new"))
    assert read_verified(table) == b"old"
    assert read_verified(table) == b"new"

    # the other order: the whole write lands after the sidecar's first read (it listed "new" only) and before
    # the file's read: the new bytes, vouched for by the sidecar read after them
    sidecar_reads = []

    def replace_after_the_first_sidecar_read(self):
        data = read_bytes(self)
        if self == Path(f"{table}.sha256"):
            sidecar_reads.append(data)
            if len(sidecar_reads) == 1:
                monkeypatch.setattr(Path, "read_bytes", read_bytes)
                write_with_sidecar(table, b"newer")
        return data

    monkeypatch.setattr(Path, "read_bytes", replace_after_the_first_sidecar_read)
    assert read_verified(table) == b"newer"
    assert sidecar_reads == [(hashlib.sha256(b"new").hexdigest() + "\n").encode()]

    def read_then_corrupt(self):
        data = read_bytes(self)
        if self == table:
            monkeypatch.setattr(Path, "read_bytes", read_bytes)
            Path(f"{table}.sha256").write_text(hashlib.sha256(b"other").hexdigest() + "\n")
            return b"garbled"
        return data

    monkeypatch.setattr(Path, "read_bytes", read_then_corrupt)
    with pytest.raises(IntegrityError, match="is corrupt"):
        read_verified(table)


def test_a_failed_write_puts_the_sidecar_back_and_seal_cuts_one_a_crash_left(tmp_path, monkeypatch, capsys):
    """A write that fails while the file is replaced (disk full, Ctrl-C) left the sidecar vouching for bytes
    that never landed; it is put back as it was. A sidecar a crash left with two digests is cut to its
    file's by ``lipflow.results seal``, keeping its modification time."""
    import lipflow.atomic as atomic
    from lipflow.results.cli import main as results_main

    path = tmp_path / "evals.parquet"
    write_with_sidecar(path, b"old")
    before = atomic.sidecar_path(path).read_bytes()
    write = atomic.write_bytes_atomic

    def full_disk(target, data):
        if Path(target) == path:
            raise OSError(28, "No space left on device")
        write(target, data)

    monkeypatch.setattr(atomic, "write_bytes_atomic", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_with_sidecar(path, b"new")
    monkeypatch.setattr(atomic, "write_bytes_atomic", write)
    assert atomic.sidecar_path(path).read_bytes() == before and atomic.read_verified(path) == b"old"
    _write_then_kill(path, b"new", "file")
    sidecar = atomic.sidecar_path(path)
    os.utime(sidecar, ns=(10**18, 10**18))
    assert results_main(["seal", str(path)]) == 0
    assert sidecar.read_bytes() == (hashlib.sha256(b"new").hexdigest() + "\n").encode()
    assert sidecar.stat().st_mtime_ns == 10**18 and "cut to the file's digest" in capsys.readouterr().out


def test_a_write_interrupted_once_its_file_is_in_place_keeps_vouching_for_that_file(tmp_path, monkeypatch):
    """Ctrl-C landing after the file's rename (while its folder is synced) put the old sidecar back beside the
    new file, so lipflow's own file read as corrupt; a failed write puts the sidecar back only when the file
    there is not the new one."""
    import lipflow.atomic as atomic

    path = tmp_path / "lr_transfer.csv"
    write_with_sidecar(path, b"old")
    write = atomic.write_bytes_atomic

    def interrupted_after_rename(target, data):
        write(target, data)
        if Path(target) == path:
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "write_bytes_atomic", interrupted_after_rename)
    with pytest.raises(KeyboardInterrupt):
        write_with_sidecar(path, b"new")
    monkeypatch.setattr(atomic, "write_bytes_atomic", write)
    assert atomic.read_verified(path) == b"new" and atomic.is_sealed(path)


@pytest.mark.parametrize("written", [b"%s\r\n", b"%s", b"%s \n", b"  %s\n\n"])
def test_a_sidecar_with_other_whitespace_around_its_digest_still_vouches_for_its_file(tmp_path, written):
    """A sidecar checked out through git's autocrlf (CRLF), or saved without its last newline, was read as
    its digest (stripped) and must still be: it is no sign of a corrupt file."""
    from lipflow.atomic import is_sealed, read_verified, sidecar_path

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    sidecar_path(path).write_bytes(written % hashlib.sha256(b"weights").hexdigest().encode())
    assert read_verified(path) == b"weights" and is_sealed(path)


@pytest.mark.parametrize("there", ["folder", "named pipe", "notes"])
def test_a_sidecar_place_holding_no_checksum_is_named_not_its_file_called_corrupt(tmp_path, there):
    """A folder, a named pipe or a user's notes in a sidecar's place made its intact file read as "corrupt:
    sha256 does not match" (the database build named a run's evals.parquet so, and its user would delete
    it); the file cannot be verified, and the error says the checksum file holds no checksum."""
    from lipflow.atomic import IntegrityError, read_verified, sidecar_path

    path = tmp_path / "evals.parquet"
    path.write_bytes(b"table")
    {"folder": sidecar_path(path).mkdir, "named pipe": lambda: os.mkfifo(sidecar_path(path)),
     "notes": lambda: sidecar_path(path).write_text("my notes\n")}[there]()
    with pytest.raises(IntegrityError) as err:
        read_verified(path)
    assert str(err.value).startswith(f"{path} cannot be verified: its checksum file evals.parquet.sha256 holds no "
                                     "sha256 checksum") and "corrupt" not in str(err.value)


def test_a_named_pipe_in_a_sidecars_place_is_refused_without_waiting_for_a_writer(tmp_path):
    """A named pipe where a sidecar goes was opened to read its digest, and the read waited for a writer
    forever (a figures job hung); it is no checksum: the file beside it reads as unverified at once, and a
    write there is refused naming the checksum file."""
    script = ("import os, pathlib, sys\nfrom lipflow.atomic import is_sealed, write_with_sidecar\n"
              "path = pathlib.Path(sys.argv[1])\npath.write_bytes(b'table')\nos.mkfifo(str(path) + '.sha256')\n"
              "print(is_sealed(path))\n"
              "try:\n    write_with_sidecar(path, b'new')\nexcept FileExistsError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "lr_transfer.csv")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    verdict, refusal = done.stdout.splitlines()
    assert verdict == "False" and "checksum file" in refusal and "lr_transfer.csv.sha256" in refusal
    assert (tmp_path / "lr_transfer.csv").read_bytes() == b"table"
