"""The training loop of one run (one resolved config); ``python -m lipflow.train`` runs it.

Every step: forward/backward over ``grad_accum`` micro-batches (bf16 autocast on CUDA), then the
constrained update (optimizer step, decay → project every matrix; Newhouse et al. 2025) and the
embedding projection. Every ``eval_every`` steps the telemetry measures the model (val loss, the
certified Lipschitz bound, activations, …); every ``checkpoint_every`` steps a checkpoint is saved.
A killed run resumes from its last checkpoint bit for bit; SIGTERM saves one and exits; a
non-finite loss or gradient, or a bound above ``max_bound``, ends the run as ``diverged``. At the
end: weights, config, per-step metrics and ``run.json``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from lipflow import distributed, provenance
from lipflow.atomic import write_json_atomic
from lipflow.data.parquet import write_rows_parquet
from lipflow.metrics import autocast_for
from lipflow.model.base import non_finite_parameter
from lipflow.schedules import lr_factor
from lipflow.train import checkpoint
from lipflow.train.build import (build_learner, checked_inputs, ensure_writable, training_loss,
                                  warn_of_a_short_train_split)
from lipflow.train.stop import SigtermWatch, divergence
from lipflow.train.summary import METRIC_COLUMNS, run_summary
from lipflow.train.telemetry import EvalStepTelemetry, StepLog, StepResult, TensorBoardMirror
from lipflow.train.update import constrained_update

MAX_PENDING_STEPS = 1000  # steps whose loss may wait on the device before a flush reads them


class Trainer:
    """Holds one run's model, optimizer, data and metrics; ``run()`` trains to the end."""

    def __init__(self, run_id: str, cfg: dict[str, Any], data_dir: Path, out_dir: Path, progress: bool = True,
                 on_complete: Callable[[], None] = lambda: None):
        self.run_id, self.cfg, self.progress, self.on_complete = run_id, cfg, progress, on_complete
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.origin: dict[str, Any] | None = None  # the run's first start (time, git commit): set by run()
        self.train_data, self.val_data, device = checked_inputs(run_id, cfg, self.data_dir, self.out_dir)
        ensure_writable(self.out_dir)
        self.topo, self.device = distributed.init_from_env(device)
        if self.topo.is_main:
            warn_of_a_short_train_split(cfg, self.train_data, self.data_dir)
        torch.manual_seed(cfg["seed"])
        self.train_windows = self.train_data.resident(self.device)
        self.model, self.optimizer, self.matrices, self.constraint = build_learner(
            cfg, self.train_data.vocab_size, self.device)
        self.loss = training_loss(self.model, cfg)
        self.generator = torch.Generator().manual_seed(cfg["seed"])  # the data order
        self.step, self.metrics = 0, []
        self.steps = StepLog(cfg, self.topo)
        self.telemetry = EvalStepTelemetry(cfg, self.model, self.optimizer, self.train_data, self.val_data,
                                           self.device, self.warn)
        self.record_layers, self.layers = False, None
        mirror = cfg["tensorboard"] and self.topo.is_main
        self.tensorboard = TensorBoardMirror(self.out_dir / "tensorboard") if mirror else None

    def train_step(self) -> StepResult:
        """One optimizer step. Nothing here waits for the device: the windows are gathered on it, the
        loss and gradient norm stay there as 0-d tensors (read by ``StepLog.flush``), and the
        optimizer steps whatever the loss (a non-finite loss or gradient ends the run at the next flush)."""
        cfg, rank, world = self.cfg, self.topo.rank, self.topo.world
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        with torch.profiler.record_function("forward_backward"):  # a phase of a step in a profile
            for _ in range(cfg["grad_accum"]):
                # the same global batch on every rank (same generator state); each keeps its slice
                x, y = self.train_windows.sample_windows(cfg["batch_size"] * world, cfg["context"], self.generator)
                part = slice(rank * cfg["batch_size"], (rank + 1) * cfg["batch_size"])
                x, y = x[part], y[part]
                with autocast_for(self.device):
                    loss = self.loss(x, y)
                (loss / cfg["grad_accum"]).backward()
                total = total + loss.detach() / cfg["grad_accum"]
            distributed.average_gradients(self.model.parameters(), self.topo)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        layer_telemetry = self.telemetry.layers
        before = layer_telemetry.before_step() if self.record_layers else None
        layers: dict[str, dict[str, Any]] = {}
        clipped = constrained_update(self.optimizer, self.matrices, self.constraint,
                                     after_step=None if before is None else
                                     lambda: layers.update(layer_telemetry.after_step(before)))
        self.model.project_embeddings()
        if before is not None:
            layer_telemetry.after_constraint(layers)
            self.layers = layers
        return StepResult(total, grad_norm, clipped)

    def run(self) -> dict[str, Any]:
        """Train (resuming from a checkpoint if one fits) to ``steps`` or an early stop; returns the
        run summary on rank 0 ({} elsewhere). A stop signal after the last step only waits until the run's
        outputs are written; ``on_complete`` is called on every rank once rank 0 has written its summary."""
        cfg = self.cfg
        self.origin = {"start_time": time.time(), "git_commit": provenance.git_commit(),
                       "versions": provenance.package_versions()}
        resumed = self.resume()
        status, diverged = "completed", None
        bar = tqdm(total=cfg["steps"], initial=self.step, desc=self.run_id, file=sys.stderr, mininterval=2.0,
                   disable=not (self.progress and self.topo.is_main))
        self.steps.restart_clock()
        with SigtermWatch(self.topo) as sigterm:
            try:
                while self.step < cfg["steps"]:
                    factor = self.set_lr()
                    self.record_layers = self.is_eval_step(self.step + 1)
                    result = self.train_step()
                    self.step += 1
                    self.steps.add(self.step, factor, result)
                    bar.update(1)
                    eval_now = self.is_eval_step(self.step)
                    sharpness_now = bool(cfg["sharpness_every"]) and self.step % cfg["sharpness_every"] == 0
                    checkpoint_now = bool(cfg["checkpoint_every"]) and self.step % cfg["checkpoint_every"] == 0
                    stop_now = sigterm.requested()
                    if not (eval_now or sharpness_now or checkpoint_now or stop_now
                            or len(self.steps.pending) >= MAX_PENDING_STEPS):
                        continue
                    rows, bad_step = self.steps.flush()
                    diverged = None
                    if bad_step is None and (eval_now or sharpness_now):
                        # a finite loss can precede non-finite weights (the step after it overflowed
                        # them), which the eval step's norms and certificate cannot measure
                        if non_finite_parameter(self.model) is not None:
                            diverged = (self.step, "weights are non-finite")
                        if diverged is None and eval_now:
                            self.telemetry.measure(rows[-1], self.layers)
                            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", val=f"{rows[-1]['val_loss']:.3f}")
                        if diverged is None and sharpness_now:
                            rows[-1].update(self.telemetry.sharpness(self.step))
                    diverged = diverged or divergence(rows, bad_step, cfg["max_bound"])
                    for row in rows:
                        self.log(row)
                    if diverged is not None:
                        status = "diverged"
                        if self.topo.is_main:  # every rank saw the same flushed rows: one line
                            print(f"run {self.run_id} diverged at step {diverged[0]}: {diverged[1]}",
                                  file=sys.stderr)
                        break
                    if stop_now:
                        self.save_checkpoint()
                        raise sigterm.stop(self.step)
                    if checkpoint_now:
                        self.save_checkpoint()
                    self.steps.restart_clock()
            finally:
                bar.close()
                if self.tensorboard is not None:
                    self.tensorboard.close()
            # the steps are done: a stop signal from here on is only recorded, so that the run completes
            # (its outputs take seconds to write) instead of ending with its trained steps unsaved, or, with
            # nproc > 1, a rank waiting for rank 0's writes ending the job as preempted although it completes
            summary = self.finish(status, diverged, resumed) if self.topo.is_main else {}
            distributed.barrier(self.topo)  # rank 0's summary is written
            self.on_complete()  # inside the watch: no moment of the default handlers in between
        distributed.shutdown(self.topo)
        return summary

    def set_lr(self) -> float:
        factor = lr_factor(self.cfg["schedule"], self.step, self.cfg["steps"], self.cfg["warmup_steps"])
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return factor

    def is_eval_step(self, step: int) -> bool:
        return step % self.cfg["eval_every"] == 0 or step == self.cfg["steps"]

    def warn(self, message: str) -> None:
        """One line on stderr from rank 0, naming the run."""
        if self.topo.is_main:
            print(f"warning: run {self.run_id}: {message}", file=sys.stderr)

    def log(self, row: dict[str, Any]) -> None:
        """Keep a metrics row (and mirror its numbers to TensorBoard when enabled)."""
        self.metrics.append(row)
        if self.tensorboard is not None:
            self.tensorboard.write(row)

    def save_checkpoint(self) -> None:
        """Rank 0 writes; every rank waits until the file is complete."""
        if self.topo.is_main:
            checkpoint.save_checkpoint(self.out_dir / "checkpoints",
                                       checkpoint.TrainingState(self.step, self.metrics, self.origin),
                                       self.model, self.optimizer, self.generator,
                                       checkpoint.run_identity(self.cfg, self.data_dir))
        distributed.barrier(self.topo)

    def resume(self) -> bool:
        # every rank reads the same checkpoints: rank 0 alone says which (and warns of those it skips)
        with contextlib.nullcontext() if self.topo.is_main else contextlib.redirect_stderr(io.StringIO()):
            state = checkpoint.resume(self.out_dir / "checkpoints", self.model, self.optimizer, self.generator,
                                      checkpoint.run_identity(self.cfg, self.data_dir), self.data_dir)
        if state is None:
            return False
        self.step, self.metrics = state.step, state.metrics
        if state.origin is not None:
            first = {**self.origin, **state.origin}  # a checkpoint of an earlier lipflow kept no versions
            changed = provenance.changed_provenance(first, self.origin)
            if changed:
                self.warn(f"started under {changed[0]} and resumes under {changed[1]}; run.json records the first "
                          f"(delete {self.out_dir / 'checkpoints'} to train it afresh under this code)")
            self.origin = first
        return True

    def finish(self, status: str, diverged: tuple[int, str] | None, resumed: bool) -> dict[str, Any]:
        """Write model, config, metrics and the run summary (each atomically); its start time, git
        commit and package versions are the run's first start's, through every resume (``origin``);
        host, device, processes and end time are those of the process that finished it. A diverged
        run's ``steps_completed`` are the steps before its diverged step (the optimizer's steps from
        there to the read that found it do not count)."""
        out, vocab_size = self.out_dir, self.train_data.vocab_size
        last_eval = next((r for r in reversed(self.metrics) if "val_loss" in r), {})
        finite = non_finite_parameter(self.model) is None  # diverged weights may be non-finite: they have no certificate
        diverged_step, diverged_reason = diverged or (None, None)
        steps_completed = self.step if diverged is None else diverged_step - 1
        summary = run_summary(
            run_id=self.run_id, status=status, diverged_step=diverged_step,
            diverged_reason=diverged_reason, steps_completed=steps_completed, resumed=resumed,
            device=str(self.device), processes=self.topo.world, slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), start_time=self.origin["start_time"],
            end_time=time.time(),
            lipschitz_bound=self.model.lipschitz_bound() if finite else None,
            final_val_loss=last_eval.get("val_loss"), final_val_accuracy=last_eval.get("val_accuracy"),
            max_activation=last_eval.get("max_activation"), n_params=sum(p.numel() for p in self.model.parameters()),
            vocab_size=vocab_size, **{**provenance.describe(self.cfg), "git_commit": self.origin["git_commit"],
                                      "versions": self.origin["versions"]})
        manifest_sha256 = checkpoint.run_identity(self.cfg, self.data_dir)["manifest_sha256"]
        checkpoint.save_weights(out / "model.safetensors", self.model.state_dict(),
                                {"run_id": self.run_id, "config": self.cfg, "vocab_size": vocab_size,
                                 "manifest_sha256": manifest_sha256})
        write_json_atomic(out / "config.json", {"run_id": self.run_id, "vocab_size": vocab_size,
                                                "data_dir": str(self.data_dir), "manifest_sha256": manifest_sha256,
                                                "config": self.cfg})
        write_rows_parquet(out / "train_metrics.parquet",
                           [{"run_id": self.run_id, **row} for row in self.metrics], METRIC_COLUMNS)
        write_json_atomic(out / "run.json", summary)
        return summary
