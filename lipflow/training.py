"""Train stage: ``python -m lipflow.training --run-id ID --config-json JSON --data-dir D --out-dir O``.

One run = one resolved config. Every step: forward/backward (with gradient accumulation and bf16
autocast on CUDA), optimizer step, then the weight constraint on every matrix (decay → step →
project, Newhouse et al. 2025) and the embedding projection. Every ``eval_every`` steps: val loss
and accuracy on fixed batches, the certified Lipschitz bound, activation statistics and (optionally)
sharpness, of the Hessian and for Adam of P⁻¹H, are appended to the per-step metrics.

Reliability: checkpoints (safetensors, atomic, sha256 sidecar) hold model, optimizer, RNG and
data-loader state, so a killed run resumes bit for bit; SIGTERM saves a checkpoint and exits;
a NaN/inf loss or a bound above ``max_bound`` ends the run with status ``diverged``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from lipflow import distributed, provenance
from lipflow.checkpoint import (flatten_optimizer_state, latest_valid_checkpoint, prune_checkpoints,
                                save_weights, unflatten_optimizer_state)
from lipflow.data.atomic import sha256_file, write_json_atomic
from lipflow.data.loader import TokenShards
from lipflow.data.parquet import write_rows_parquet
from lipflow.metrics import autocast_for, evaluate_windows, loss_and_correct, max_attention_logits, resolve_device
from lipflow.model import build_model
from lipflow.model.base import rms_operator_norm
from lipflow.optimizers import build_optimizer
from lipflow.schedules import lr_factor
from lipflow.update import ConstraintSettings, check_coupling, constrained_update

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the job did not finish; rerunning resumes it
MAX_PENDING_STEPS = 1000  # steps whose loss may wait on the device before a flush reads them
ATTENTION_LOGIT_WINDOWS = 16  # val windows whose pre-softmax scores are checked at eval steps
STOP_CHECK_EVERY = 10  # under DDP, steps between agreeing on SIGTERM (a collective and a host sync)


class StepResult(NamedTuple):
    """What one training step leaves on the device (0-d tensors): mean loss, global gradient norm,
    and how many matrices' measured steps were clipped to keep the soft cap's guarantee."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    clipped_updates: torch.Tensor


class PendingStep(NamedTuple):
    step: int
    lr_factor: float
    result: StepResult


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written."""


def _matrices(model) -> list[tuple[str, torch.nn.Parameter]]:
    roles = model.param_roles()
    return roles["hidden"] + roles["head"]


class LayerTelemetry:
    """Per constrained matrix, at eval steps: the RMS→RMS norm of the optimizer's own update ΔW
    (exact SVD of W_after_step − W_before), the bound the optimizer recorded for it (None for
    AdamW), and ‖W‖_RMS→RMS after the constraint: what the soft cap's coupling assumes vs gets."""

    def __init__(self, model, optimizer: torch.optim.Optimizer):
        self.matrices, self.optimizer = _matrices(model), optimizer

    def before_step(self) -> dict[str, torch.Tensor]:
        """Copies of the matrices before the optimizer's step."""
        return {name: p.detach().clone() for name, p in self.matrices}

    def after_step(self, before: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """Per matrix, the step's measured RMS→RMS norm and the optimizer's bound for it."""
        layers = {}
        for name, p in self.matrices:
            bound = self.optimizer.state.get(p, {}).get("update_norm")
            layers[name] = {"update_norm": rms_operator_norm(p.detach() - before[name]),
                            "update_bound": None if bound is None else float(bound)}
        return layers

    def after_constraint(self, layers: dict[str, Any]) -> None:
        for name, p in self.matrices:
            layers[name]["sigma_max"] = rms_operator_norm(p)


def ensure_writable(directory: Path) -> None:
    """Fail before training, not after it, when results cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create results directory {directory}: {err.strerror}") from None
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"results directory {directory} is not writable")


def rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state(), "rng.data": generator.get_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.data"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


class Trainer:
    """Holds one run's model, optimizer, data and metrics; ``run()`` trains to the end."""

    def __init__(self, run_id: str, cfg: dict[str, Any], data_dir: Path, out_dir: Path, progress: bool = True):
        self.run_id, self.cfg, self.out_dir, self.progress = run_id, cfg, Path(out_dir), progress
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.data_dir = Path(data_dir)
        ensure_writable(self.out_dir)
        self.topo, self.device = distributed.init_from_env(resolve_device(cfg["device"]))
        torch.manual_seed(cfg["seed"])
        self.train_data = TokenShards(data_dir, "train", max_tokens=cfg["train_tokens"])
        self.val_data = TokenShards(data_dir, "val")
        for split in (self.train_data, self.val_data):
            split.check_context(cfg["context"])
        self.train_windows = self.train_data.resident(self.device)
        self.model = build_model(cfg, self.train_data.vocab_size).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.matrices = [p for _, p in _matrices(self.model)]
        self.constraint = ConstraintSettings.from_config(cfg)
        check_coupling(self.optimizer, self.matrices, self.constraint)
        for group in self.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.generator = torch.Generator().manual_seed(cfg["seed"])
        self.step = 0
        self.metrics: list[dict[str, Any]] = []
        self.forward = torch.compile(self.model) if cfg["compile"] else self.model
        if torch.distributed.is_initialized():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = torch.nn.parallel.DistributedDataParallel(self.forward, device_ids=device_ids)
        self.val_windows = self._fixed_val_windows().to(self.device)
        self._stop_requested = False
        self._pending: list[PendingStep] = []
        self._stretch_started = time.perf_counter()
        self.layer_telemetry = LayerTelemetry(self.model, self.optimizer)
        self._record_layers, self._layers = False, None
        self.tensorboard = self._tensorboard_writer() if cfg["tensorboard"] and self.topo.is_main else None

    def _tensorboard_writer(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("tensorboard: true needs the tensorboard package (pip install 'lipflow[tensorboard]')") from None
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def _log(self, row: dict[str, Any]) -> None:
        """Keep a metrics row (and mirror its numbers to TensorBoard when enabled)."""
        self.metrics.append(row)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tensorboard.add_scalar(key, value, row["step"])

    # --- evaluation during training -------------------------------------------------------
    def _fixed_val_windows(self) -> torch.Tensor:
        """The same ``eval_batches`` × ``batch_size`` val windows at every eval step."""
        gen = torch.Generator().manual_seed(self.cfg["seed"] + 1)
        n = self.cfg["eval_batches"] * self.cfg["batch_size"]
        x, y = self.val_data.sample_windows(n, self.cfg["context"], gen)
        return torch.cat([x, y[:, -1:]], dim=1)

    def _sharpness(self) -> dict[str, float | None]:
        """Top Hessian eigenvalue of the train loss on a fixed batch, and for Adam also that of P⁻¹H
        (Adam's preconditioner from the optimizer state; see lipflow.evaluation.sharpness)."""
        from lipflow.evaluation.sharpness import adam_preconditioner, top_eigenvalue

        gen = torch.Generator().manual_seed(self.cfg["seed"] + 2)
        x, y = self.train_data.sample_windows(self.cfg["batch_size"], self.cfg["context"], gen)
        x, y = x.to(self.device), y.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]

        def eigenvalue(precondition: torch.Tensor | None) -> float:
            return top_eigenvalue(lambda: loss_and_correct(self.model, x, y)[0], params,
                                  iters=self.cfg["sharpness_iters"], tol=1e-3, precondition=precondition,
                                  generator=torch.Generator().manual_seed(self.cfg["seed"] + 3))

        precondition = adam_preconditioner(self.optimizer, params)
        return {"sharpness": eigenvalue(None),
                "preconditioned_sharpness": None if precondition is None else eigenvalue(precondition)}

    def evaluate(self, row: dict[str, Any]) -> None:
        self.model.record_activations = True
        row.update({f"val_{k}": v for k, v in evaluate_windows(
            self.model, self.val_windows, self.cfg["batch_size"], self.device).items() if k != "tokens"})
        self.model.record_activations = False
        stats = dict(self.model.activation_stats)
        block_max = [v for k, v in stats.items() if k.startswith("block") and k.endswith(".max_abs")]
        row["max_activation"] = max(block_max) if block_max else None
        row["activations"] = json.dumps(stats, sort_keys=True)
        row["lipschitz_bound"] = self.model.lipschitz_bound()
        logits = max_attention_logits(self.model, self.val_windows[:ATTENTION_LOGIT_WINDOWS, :-1])
        row["max_attention_logit"] = max(logits.values()) if logits else None
        row["attention_logits"] = json.dumps(logits, sort_keys=True)
        row["layers"] = json.dumps(self._layers, sort_keys=True) if self._layers else None
        every = self.cfg["sharpness_every"]
        if every and self.step % every == 0:
            row.update(self._sharpness())

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Rank 0 writes; every rank waits until the file is complete."""
        if self.topo.is_main:
            self._write_checkpoint()
        distributed.barrier(self.topo)

    def _write_checkpoint(self) -> None:
        optim_tensors, optim_meta = flatten_optimizer_state(self.optimizer.state_dict())
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update(optim_tensors)
        tensors.update(rng_tensors(self.generator))
        meta = {"step": self.step, "optimizer": optim_meta, "metrics": self.metrics,
                "config_hash": provenance.config_hash(self.cfg),
                "manifest_sha256": sha256_file(self.data_dir / "manifest.json")}
        save_weights(self.ckpt_dir / f"step-{self.step:09d}.safetensors", tensors, meta)
        prune_checkpoints(self.ckpt_dir, keep=2)

    def try_resume(self) -> bool:
        found = latest_valid_checkpoint(self.ckpt_dir)
        if found is None:
            return False
        path, tensors, meta = found
        if meta.get("config_hash") != provenance.config_hash(self.cfg):
            print(f"warning: ignoring {path}: it was written for a different config", file=sys.stderr)
            return False
        if meta.get("manifest_sha256") != sha256_file(self.data_dir / "manifest.json"):
            # other token shards (an edited corpus or tokenizer): start afresh, and drop those checkpoints
            # so that pruning keeps the new ones
            print(f"warning: ignoring {path}: it was written for other data than {self.data_dir}; "
                  "training from scratch", file=sys.stderr)
            prune_checkpoints(self.ckpt_dir, keep=0)
            return False
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
        restore_rng(tensors, self.generator)
        self.step, self.metrics = meta["step"], meta["metrics"]
        print(f"resumed from {path.name} at step {self.step}", file=sys.stderr)
        return True

    # --- the loop ------------------------------------------------------------------------------
    def _set_lr(self) -> float:
        factor = lr_factor(self.cfg["schedule"], self.step, self.cfg["steps"], self.cfg["warmup_steps"])
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return factor

    def train_step(self) -> StepResult:
        """One optimizer step: micro-batches forward/backward, optimizer, weight constraint.

        Nothing here waits for the device: the windows are gathered on it, the loss and the global
        gradient norm stay there as 0-d tensors (read in one go by ``_flush``), and the optimizer
        steps whatever the loss (a non-finite loss is caught at the next flush, see ``run``).
        """
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        rank, world = self.topo.rank, self.topo.world
        for _ in range(cfg["grad_accum"]):
            # the same global batch on every rank (same generator state); each keeps its slice
            x, y = self.train_windows.sample_windows(cfg["batch_size"] * world, cfg["context"], self.generator)
            part = slice(rank * cfg["batch_size"], (rank + 1) * cfg["batch_size"])
            x, y = x[part], y[part]
            with autocast_for(self.device):
                logits = self.forward(x).float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            (loss / cfg["grad_accum"]).backward()
            total = total + loss.detach() / cfg["grad_accum"]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        before = self.layer_telemetry.before_step() if self._record_layers else None
        layers: dict[str, dict[str, Any]] = {}
        clipped = constrained_update(self.optimizer, self.matrices, self.constraint,
                                     after_step=None if before is None else
                                     lambda: layers.update(self.layer_telemetry.after_step(before)))
        self.model.project_embeddings()
        if before is not None:
            self.layer_telemetry.after_constraint(layers)
            self._layers = layers
        return StepResult(total, grad_norm, clipped)

    def _flush(self) -> tuple[list[dict[str, Any]], int | None]:
        """Read every pending step's loss and gradient norm (one host sync, one all-reduce) into
        metric rows; returns the rows up to the first non-finite loss and that step (or None)."""
        pending, self._pending = self._pending, []
        if not pending:
            return [], None
        values = torch.stack([torch.stack([p.result.loss, p.result.grad_norm.float(), p.result.clipped_updates.float()])
                              for p in pending])
        values = distributed.mean_tensor_across_ranks(values, self.topo).tolist()
        elapsed = time.perf_counter() - self._stretch_started
        step_time = elapsed / len(pending)
        cfg = self.cfg
        tokens_per_step = cfg["batch_size"] * cfg["grad_accum"] * cfg["context"] * self.topo.world
        rows, bad_step = [], None
        for p, (loss, grad_norm, clipped) in zip(pending, values):
            rows.append({"step": p.step, "loss": loss, "lr_factor": p.lr_factor,
                         "tokens": p.step * tokens_per_step // self.topo.world, "grad_norm": grad_norm,
                         "clipped_updates": round(clipped), "step_time": step_time,
                         "tokens_per_s": tokens_per_step / step_time})
            if not math.isfinite(loss):
                bad_step = p.step
                break
        return rows, bad_step

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True

    def _should_stop(self, force_check: bool) -> bool:
        """Whether SIGTERM arrived on any rank (under DDP agreed only every ``STOP_CHECK_EVERY``
        steps and at flushes, since agreeing is a collective and a host sync)."""
        if self.topo.world == 1:
            return self._stop_requested
        if force_check or self.step % STOP_CHECK_EVERY == 0:
            return distributed.any_rank(self._stop_requested, self.topo, self.device)
        return False

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.time()
        resumed = self.try_resume()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        status, diverged_step, reason = "completed", None, None
        bar = tqdm(total=cfg["steps"], initial=self.step, desc=self.run_id,
                   disable=not (self.progress and self.topo.is_main),
                   file=sys.stderr, mininterval=2.0)
        self._stretch_started = time.perf_counter()
        try:
            while self.step < cfg["steps"]:
                factor = self._set_lr()
                self._record_layers = self._is_eval_step(self.step + 1)
                result = self.train_step()
                self.step += 1
                self._pending.append(PendingStep(self.step, factor, result))
                bar.update(1)
                eval_now = self._is_eval_step(self.step)
                checkpoint_now = bool(cfg["checkpoint_every"]) and self.step % cfg["checkpoint_every"] == 0
                stop_now = self._should_stop(force_check=eval_now or checkpoint_now)
                if not (eval_now or checkpoint_now or stop_now or len(self._pending) >= MAX_PENDING_STEPS):
                    continue
                rows, bad_step = self._flush()
                if bad_step is not None:
                    status, diverged_step = "diverged", bad_step
                    reason = f"loss is {rows[-1]['loss']}"
                elif eval_now:
                    self.evaluate(rows[-1])
                    bound = rows[-1]["lipschitz_bound"]
                    if bound is not None and not bound <= cfg["max_bound"]:
                        status, diverged_step = "diverged", self.step
                        reason = f"Lipschitz bound {bound:.4g} exceeds max_bound {cfg['max_bound']:.4g}"
                    bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", val=f"{rows[-1]['val_loss']:.3f}")
                for row in rows:
                    self._log(row)
                if status == "diverged":
                    print(f"run {self.run_id} diverged at step {diverged_step}: {reason}", file=sys.stderr)
                    break
                if stop_now:
                    self.save_checkpoint()
                    raise Preempted(f"SIGTERM at step {self.step}: checkpoint saved; rerun to resume")
                if checkpoint_now:
                    self.save_checkpoint()
                self._stretch_started = time.perf_counter()
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous)
            if self.tensorboard is not None:
                self.tensorboard.close()
        summary = self.finish(status, diverged_step, reason, started, resumed) if self.topo.is_main else {}
        distributed.barrier(self.topo)
        distributed.shutdown(self.topo)
        return summary

    def _is_eval_step(self, step: int) -> bool:
        return step % self.cfg["eval_every"] == 0 or step == self.cfg["steps"]

    @torch.no_grad()
    def _weights_finite(self) -> bool:
        """False after a diverged stretch left non-finite weights (they have no certificate)."""
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def finish(self, status: str, diverged_step: int | None, reason: str | None,
               started: float, resumed: bool) -> dict[str, Any]:
        """Write model, config, metrics and the run summary (each atomically)."""
        out = self.out_dir
        last_eval = next((r for r in reversed(self.metrics) if "val_loss" in r), {})
        summary = {
            "run_id": self.run_id, "status": status, "diverged_step": diverged_step,
            "diverged_reason": reason, "steps_completed": self.step, "resumed": resumed,
            "device": str(self.device), "processes": self.topo.world,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "start_time": started, "end_time": time.time(),
            "lipschitz_bound": self.model.lipschitz_bound() if self._weights_finite() else None,
            "final_val_loss": last_eval.get("val_loss"), "final_val_accuracy": last_eval.get("val_accuracy"),
            "max_activation": last_eval.get("max_activation"),
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "vocab_size": self.train_data.vocab_size, **provenance.describe(self.cfg),
        }
        save_weights(out / "model.safetensors", self.model.state_dict(),
                     {"run_id": self.run_id, "config": self.cfg, "vocab_size": self.train_data.vocab_size})
        write_json_atomic(out / "config.json", {"run_id": self.run_id, "vocab_size": self.train_data.vocab_size,
                                                "data_dir": str(self.data_dir), "config": self.cfg})
        write_rows_parquet(out / "train_metrics.parquet",
                             [{"run_id": self.run_id, **row} for row in self.metrics], METRIC_COLUMNS)
        write_json_atomic(out / "run.json", summary)
        return summary


WALL_CLOCK_COLUMNS = ("step_time", "tokens_per_s")  # measured time: differs between identical runs
METRIC_COLUMNS = {
    "run_id": "string", "step": "int64", "loss": "float64", "lr_factor": "float64", "tokens": "int64",
    "grad_norm": "float64", "clipped_updates": "int64", "step_time": "float64", "tokens_per_s": "float64",
    "max_attention_logit": "float64", "attention_logits": "string", "layers": "string",
    "val_loss": "float64", "val_accuracy": "float64", "val_perplexity": "float64",
    "max_activation": "float64", "activations": "string", "lipschitz_bound": "float64", "sharpness": "float64",
    "preconditioned_sharpness": "float64",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lipflow.training", description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--config-json", required=True, help="the run's resolved config as JSON")
    parser.add_argument("--data-dir", required=True, type=Path, help="tokenized shards (with manifest.json)")
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from lipflow.errors import run_guarded

    def go() -> int:
        cfg = json.loads(args.config_json)
        trainer = Trainer(args.run_id, cfg, args.data_dir, args.out_dir, progress=not args.no_progress)
        try:
            summary = trainer.run()
        except Preempted as stop:
            print(f"lipflow: {stop}", file=sys.stderr)
            return EXIT_PREEMPTED
        if summary:
            print(json.dumps({k: summary[k] for k in ("run_id", "status", "steps_completed", "final_val_loss",
                                                      "lipschitz_bound")}))
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
