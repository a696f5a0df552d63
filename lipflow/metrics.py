"""Next-token loss and accuracy over windows of tokens, shared by training and evaluation."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from lipflow.errors import ProgressClock, silent
from lipflow.model.base import LanguageModel


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing (fp32) on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; a CUDA device (``cuda``, ``cuda:0``) without a GPU, the
    ``meta`` device (tensors without values), or a name that is no torch device (``None`` too), is a
    ValueError naming ``device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # torch's own message names no argument (TypeError: not a str)
        raise ValueError(f"device: {name!r} is not a torch device (use 'auto', 'cpu' or 'cuda')") from None
    if device.type == "meta":  # a model moved there keeps no weights
        raise ValueError(f"device: {str(name)!r} holds no tensor values (use 'auto', 'cpu' or 'cuda')")
    if device.type == "cuda" and not torch.cuda.is_available():  # else .to() fails with a bare AssertionError
        raise ValueError(f"device: {str(name)!r} was requested but no CUDA device is available (use 'auto' or 'cpu')")
    return device


def loss_and_correct(model: LanguageModel, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (nats/token) and the number of correct argmax predictions."""
    logits = model(x).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    correct = (logits.argmax(-1) == y).sum()
    return loss, correct


@torch.no_grad()
def evaluate_windows(model: LanguageModel, windows: torch.Tensor, batch_size: int, device: torch.device,
                     report: Callable[[str], None] = silent) -> dict[str, float]:
    """Loss, accuracy and perplexity over every position of ``windows`` (N, context+1); ``report`` gets
    the windows scored so far when :class:`ProgressClock` says so (a large val split takes minutes)."""
    was_training = model.training
    model.eval()
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    clock = ProgressClock()
    for start in range(0, windows.shape[0], batch_size):
        if start and clock.due():
            report(f"{start:,} of {windows.shape[0]:,} windows scored")
        batch = windows[start:start + batch_size].to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast_for(device):
            loss, correct = loss_and_correct(model, x, y)
        total_loss += loss.item() * y.numel()
        total_correct += int(correct)
        total_tokens += y.numel()
    model.train(was_training)
    mean = total_loss / max(1, total_tokens)
    return {"loss": mean, "accuracy": total_correct / max(1, total_tokens),
            "perplexity": float(torch.tensor(mean).exp()), "tokens": float(total_tokens)}


@torch.no_grad()
def max_attention_logits(model: LanguageModel, idx: torch.Tensor) -> dict[str, float]:
    """Per attention layer (module name): max |score| over batch, heads and causal (query, key)
    pairs of the pre-softmax scores on token ids ``idx``, from each module's ``attention_scores``
    applied to the input its ``first_projection`` (the Linear that reads the attention's input) sees.
    This is the quantity that grows without bound in unconstrained transformers."""
    inputs: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}

    def hook(name: str, attention):
        def record(module, args):  # the input of the attention's first projection is the attention's input
            inputs[name] = (attention, args[0])
        return record

    handles = [m.first_projection.register_forward_pre_hook(hook(name, m)) for name, m in model.named_modules()
               if hasattr(m, "attention_scores")]
    was_training = model.training
    model.eval()
    try:
        with autocast_for(idx.device):
            model(idx)
            found = {name: attention.attention_scores(x).abs().max().item() for name, (attention, x) in inputs.items()}
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found

