"""What training measures besides the loss, and how per-step numbers become metric rows.

Every step: loss, global gradient norm and clipped soft-cap steps stay on the device (``StepLog``
reads many steps in one host sync). Every ``eval_every`` steps (``EvalStepTelemetry``): loss and
accuracy on fixed val windows, activation statistics, the certified Lipschitz bound, the largest
pre-softmax attention score and per-matrix update norms (``LayerTelemetry``). Every
``sharpness_every`` steps, eval step or not (``EvalStepTelemetry.sharpness``): the top Hessian
eigenvalue (for Adam also that of P⁻¹H). Rows can be mirrored to TensorBoard.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from lipflow import distributed
from lipflow.data.loader import TokenShards
from lipflow.metrics import evaluate_windows, loss_and_correct, max_attention_logits
from lipflow.model.base import rms_operator_norm
from lipflow.train.update import constrained_matrices

ATTENTION_LOGIT_WINDOWS = 16  # val windows whose pre-softmax scores are checked at eval steps
TRAINING_SHARPNESS_TOL = 1e-3  # Lanczos's stopping tolerance for sharpness during training (no config key)


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


class StepLog:
    """Steps whose results are still on the device; ``flush`` reads them all in one host sync (and,
    over processes, one all-reduce) and times them as one stretch."""

    def __init__(self, cfg: dict[str, Any], topo: distributed.Topology):
        self.topo = topo
        self.tokens_per_step = cfg["batch_size"] * cfg["grad_accum"] * cfg["context"] * topo.world
        self.pending: list[PendingStep] = []
        self.stretch_started = time.perf_counter()

    def add(self, step: int, lr_factor: float, result: StepResult) -> None:
        self.pending.append(PendingStep(step, lr_factor, result))

    def restart_clock(self) -> None:
        self.stretch_started = time.perf_counter()

    def flush(self) -> tuple[list[dict[str, Any]], int | None]:
        """Metric rows of the pending steps up to the first with a non-finite loss or gradient norm (its
        update has made the weights non-finite), and that step (or None)."""
        pending, self.pending = self.pending, []
        if not pending:
            return [], None
        values = torch.stack([torch.stack([p.result.loss, p.result.grad_norm.float(), p.result.clipped_updates.float()])
                              for p in pending])
        values = distributed.mean_tensor_across_ranks(values, self.topo).tolist()
        step_time = (time.perf_counter() - self.stretch_started) / len(pending)
        rows, bad_step = [], None
        for p, (loss, grad_norm, clipped) in zip(pending, values):
            rows.append({"step": p.step, "loss": loss, "lr_factor": p.lr_factor,
                         "tokens": p.step * self.tokens_per_step, "grad_norm": grad_norm,
                         "clipped_updates": round(clipped), "step_time": step_time,
                         "tokens_per_s": self.tokens_per_step / step_time})
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bad_step = p.step
                break
        return rows, bad_step


class LayerTelemetry:
    """Per constrained matrix, at eval steps: the RMS→RMS norm of the optimizer's own update ΔW
    (exact SVD of W_after_step − W_before), the bound the optimizer recorded for it (None for
    AdamW), and ‖W‖_RMS→RMS after the constraint: what the soft cap's coupling assumes vs gets."""

    def __init__(self, model, optimizer: torch.optim.Optimizer):
        self.matrices, self.optimizer = constrained_matrices(model), optimizer

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


class EvalStepTelemetry:
    """The measurements of an eval step, on the same ``eval_batches`` × ``batch_size`` val windows
    each time (seed + 1) and, for sharpness, the same train batch (seed + 2)."""

    def __init__(self, cfg: dict[str, Any], model, optimizer: torch.optim.Optimizer, train_data: TokenShards,
                 val_data: TokenShards, device: torch.device, warn: Callable[[str], None]):
        self.cfg, self.model, self.optimizer, self.train_data, self.device = cfg, model, optimizer, train_data, device
        self.warn, self.warned_unconverged = warn, False
        gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        x, y = val_data.sample_windows(cfg["eval_batches"] * cfg["batch_size"], cfg["context"], gen)
        self.val_windows = torch.cat([x, y[:, -1:]], dim=1).to(device)
        self.layers = LayerTelemetry(model, optimizer)

    def measure(self, row: dict[str, Any], layers: dict[str, Any] | None) -> None:
        """Add the eval-step columns to ``row`` (``layers``: this step's LayerTelemetry, if recorded)."""
        model, cfg = self.model, self.cfg
        model.record_activations = True
        row.update({f"val_{k}": v for k, v in evaluate_windows(
            model, self.val_windows, cfg["batch_size"], self.device).items() if k != "tokens"})
        model.record_activations = False
        stats = dict(model.activation_stats)
        block_max = [v for k, v in stats.items() if k.startswith("block") and k.endswith(".max_abs")]
        row["max_activation"] = max(block_max) if block_max else None
        row["activations"] = json.dumps(stats, sort_keys=True)
        row["lipschitz_bound"] = model.lipschitz_bound()
        logits = max_attention_logits(model, self.val_windows[:ATTENTION_LOGIT_WINDOWS, :-1])
        row["max_attention_logit"] = max(logits.values()) if logits else None
        row["attention_logits"] = json.dumps(logits, sort_keys=True)
        row["layers"] = json.dumps(layers, sort_keys=True) if layers else None

    def sharpness(self, step: int) -> dict[str, float | None]:
        """λ_max, the largest eigenvalue of the train loss's Hessian on a fixed batch, and for Adam also that
        of P⁻¹H (Adam's preconditioner from the optimizer state), by Lanczos (``largest_eigenvalue`` in
        lipflow.evaluation.sharpness). Each starts from the same seeded vector, not from the previous
        measurement's, which no checkpoint holds: a resumed run logs what the uninterrupted one logs. The
        first measurement of a run that ends at ``sharpness_iters`` without meeting the residual test is
        warned about (bench/sharpness.py: at 10 steps half the start vectors ended low on a slowly
        converging top)."""
        from lipflow.evaluation.sharpness import adam_preconditioner, largest_eigenvalue

        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg["seed"] + 2)
        x, y = self.train_data.sample_windows(cfg["batch_size"], cfg["context"], gen)
        x, y = x.to(self.device), y.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]

        def eigenvalue(precondition: torch.Tensor | None) -> float:
            top = largest_eigenvalue(lambda: loss_and_correct(self.model, x, y)[0], params,
                                     iters=cfg["sharpness_iters"], tol=TRAINING_SHARPNESS_TOL,
                                     precondition=precondition, generator=torch.Generator().manual_seed(cfg["seed"] + 3))
            if not top.converged and not self.warned_unconverged:
                self.warned_unconverged = True
                name = "sharpness" if precondition is None else "preconditioned_sharpness"
                self.warn(f"{name} at step {step} ended at sharpness_iters={top.steps} Lanczos steps with the top Ritz "
                          f"value's residual {top.residual:.3g} above {TRAINING_SHARPNESS_TOL:g}·|θ| "
                          f"(θ = {top.value:.6g}): it may lie below λ_max; raise sharpness_iters (warned once per run)")
            return top.value

        precondition = adam_preconditioner(self.optimizer, params)
        return {"sharpness": eigenvalue(None),
                "preconditioned_sharpness": None if precondition is None else eigenvalue(precondition)}


class TensorBoardMirror:
    """Writes every numeric column of each metric row as a TensorBoard scalar at its step. The event
    file (and its folder) is made with the first row, so a run that fails before its first logged step
    (a batch that does not fit in memory) leaves no run folder behind, as without TensorBoard."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("tensorboard: true needs the tensorboard package (pip install 'lipflow[tensorboard]')") from None
        self.log_dir, self.summary_writer, self.writer = log_dir, SummaryWriter, None

    def write(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            self.writer = self.summary_writer(log_dir=str(self.log_dir))
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
