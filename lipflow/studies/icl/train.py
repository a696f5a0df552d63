"""Training of the in-context transformer on fresh prompts (recipe of Ahn et al.'s code).

Adam with (β1, β2) = (0.99, 0.9) by default, the learning rate halved every ``lr_halve_every``
steps, each layer's P and Q gradient clipped to Frobenius norm ``grad_clip``, a fresh batch
of prompts every step, loss = mean over prompts of (prediction − y_query)² (not divided by d).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lipflow.errors import ConfigError
from lipflow.studies.icl.config import ICLConfig
from lipflow.provenance import stream_seed
from lipflow.studies.icl.data import PromptSampler
from lipflow.studies.icl.model import InContextTransformer


def resolve_device(name: str) -> torch.device:
    """auto → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("icl.device: 'cuda' requested but torch sees no CUDA device")
    return torch.device(name)


@dataclass
class TrainResult:
    model: InContextTransformer  # on the CPU
    steps: list[int]
    losses: list[float]  # training-batch loss at ``steps``
    lrs: list[float]
    seconds: list[float]  # wall-clock time since the start at ``steps``


def clip_per_layer(parameter: torch.Tensor, max_norm: float) -> None:
    """Scale each layer's gradient block (L, d, d) to Frobenius norm ≤ max_norm, in place; a parameter
    without a gradient (P of a one-layer full model: the x-rows it updates reach no prediction) is left."""
    if parameter.grad is None:
        return
    norms = parameter.grad.flatten(1).norm(dim=1).clamp_min(1e-30)
    parameter.grad.mul_((max_norm / norms).clamp(max=1.0)[:, None, None])


def train_model(
    cfg: ICLConfig, n_layers: int, n: int, log_every: int = 10, progress: bool = True
) -> TrainResult:
    """Train an ``n_layers``-layer model at context length ``n``; deterministic per cfg.seed."""
    device = resolve_device(cfg.device)
    sampler = PromptSampler(cfg, n, device)
    init_gen = torch.Generator().manual_seed(stream_seed(cfg.seed, "init", n_layers, n))
    model = InContextTransformer(
        cfg.d, n_layers, cfg.parametrization, cfg.attention, cfg.init_std, init_gen
    ).to(device)
    params = [p for p in (model.q, model.p) if p is not None]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas))
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_halve_every, gamma=0.5)
    data_gen = sampler.generator(cfg.seed, "train", n_layers, n)
    result = TrainResult(model, [], [], [], [])
    start = time.perf_counter()
    bar = tqdm(
        range(cfg.train_steps),
        desc=f"icl L={n_layers} n={n}",
        disable=not progress,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,  # sparse updates in log files
    )
    for step in bar:
        batch = sampler.sample(cfg.batch_size, data_gen)
        loss = (model(batch.tokens()) - batch.query_y).square().mean()
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        for p in params:
            clip_per_layer(p, cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == cfg.train_steps - 1:
            result.steps.append(step)
            result.losses.append(loss.item())
            result.lrs.append(lr)
            result.seconds.append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", refresh=False)
    result.model = model.cpu()
    return result
