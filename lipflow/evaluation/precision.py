"""Low precision: a checkpoint evaluated with simulated bf16 / fp16 / fp8 casts and int8 weights.

A simulated cast is x ↦ (s·x).to(format).to(fp32) / s: s = 1 ("none") or s = format_max / max|x|
("per_tensor", current-tensor scaling computed on the fly). Casts apply to every floating parameter
(once, each tensor its own scale) and, through forward hooks on every ``nn.Linear``, to each matmul's
input and output, so the evaluation works for any LanguageModel (attention's internal q·kᵀ, softmax
and normalisations stay fp32). ``int8`` rounds every 2-D weight per output row (channel c):
W ≈ scale_c·round(W/scale_c) with scale_c = max|W_c,:|/127, so |error| ≤ scale_c/2; activations fp32.

Counts over finite fp32 values x (already non-finite inputs are not counted again):
- saturated: |s·x| > format_max (not representable; a saturating cast clips it);
- overflow: the cast is inf/nan, or |s·x| > format_max for fp8 e4m3fn, which has no inf (torch's
  cast, and so the simulation, clips to ±448; hardware in non-saturating mode gives NaN);
- underflow: s·x ≠ 0 but the cast is 0.

fp8 safety is a statement about every input, not the observed ones: overflow is impossible iff
every weight fits (checked exactly) and the model's analytic activation bounds fit. The bound comes
from ``model.activation_bounds()`` — a float, or a dict of floats — bounding |entry| of every
matmul operand and result for any token sequence; a model without it gets "no analytic bound".
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lipflow.evaluation import EVALUATIONS, EvalContext
from lipflow.registry import Registry


@dataclass(frozen=True)
class NumberFormat:
    name: str
    dtype: torch.dtype

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def has_inf(self) -> bool:
        return self.dtype != torch.float8_e4m3fn  # "fn": finite values and NaN only

    @property
    def is_fp8(self) -> bool:
        return self.dtype.itemsize == 1


FORMATS: Registry[NumberFormat] = Registry("number format")
for _name, _dtype in [("bf16", torch.bfloat16), ("fp16", torch.float16),
                      ("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)]:
    FORMATS.register(_name)(NumberFormat(_name, _dtype))

SCALINGS: Registry[Callable[[torch.Tensor, NumberFormat], torch.Tensor]] = Registry("scaling")


@SCALINGS.register("none")
def _unscaled(x: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    return torch.ones((), device=x.device)


@SCALINGS.register("per_tensor")
def _per_tensor(x: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """s = format_max / max|x| over finite entries (1 for an all-zero tensor), at most fp32's max: for
    bf16, whose max is fp32's, the ratio overflows fp32 whenever max|x| < 1."""
    finite = x[torch.isfinite(x)]
    amax = finite.abs().max().double() if finite.numel() else torch.zeros((), device=x.device, dtype=torch.float64)
    s = torch.where(amax > 0, fmt.max / amax, torch.ones_like(amax))
    return s.clamp(max=torch.finfo(torch.float32).max).float()


@dataclass
class RangeCounts:
    elements: int = 0
    overflow: int = 0
    saturated: int = 0
    underflow: int = 0

    def add(self, other: "RangeCounts") -> None:
        self.elements += other.elements
        self.overflow += other.overflow
        self.saturated += other.saturated
        self.underflow += other.underflow


def cast_with_counts(x: torch.Tensor, fmt: NumberFormat, scaling: str = "none") -> tuple[torch.Tensor, RangeCounts]:
    """The simulated cast (s·x).to(format).to(fp32)/s of ``x`` and its overflow/saturation/underflow counts."""
    x = x.float()
    s = SCALINGS.get(scaling)(x, fmt)
    scaled = x * s
    finite = torch.isfinite(x)
    cast = torch.where(finite, scaled.to(fmt.dtype).float(), x)  # inf/nan inputs stay as they are
    saturated = finite & (scaled.abs() > fmt.max)
    overflow = finite & ~torch.isfinite(cast)
    if not fmt.has_inf:
        overflow |= saturated
    underflow = finite & (scaled != 0) & (cast == 0)
    counts = RangeCounts(int(finite.sum()), int(overflow.sum()), int(saturated.sum()), int(underflow.sum()))
    return cast / s, counts


def simulate_cast(x: torch.Tensor, fmt: NumberFormat, scaling: str = "none") -> torch.Tensor:
    return cast_with_counts(x, fmt, scaling)[0]


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (scale·round(W/scale) clamped to ±127, scale), scale = max|W_c,:|/127."""
    scale = w.detach().float().abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w.float() / scale).clamp(-127, 127)
    return (q * scale).to(w.dtype), scale


@dataclass
class LinearHookState:
    """Per-Linear max |input| / |output| (fp32 values) and, when casting, the accumulated counts."""

    max_abs: dict[str, float] = field(default_factory=dict)
    counts: RangeCounts = field(default_factory=RangeCounts)


@contextlib.contextmanager
def linear_hooks(model: nn.Module, fmt: NumberFormat | None, scaling: str = "none") -> Iterator[LinearHookState]:
    """Record max |x| of every nn.Linear input and output; with a format, also cast both (and count)."""
    state = LinearHookState()

    def process(key: str, x: torch.Tensor) -> torch.Tensor:
        finite = x.detach()[torch.isfinite(x.detach())]
        if finite.numel():
            state.max_abs[key] = max(state.max_abs.get(key, 0.0), finite.abs().max().item())
        if fmt is None:
            return x
        y, counts = cast_with_counts(x, fmt, scaling)
        state.counts.add(counts)
        return y.to(x.dtype)

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, key=f"{name}.input": (process(key, args[0]), *args[1:])))
            handles.append(module.register_forward_hook(
                lambda _m, _args, out, key=f"{name}.output": process(key, out)))
    try:
        yield state
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                      block_max: dict[str, float] | None = None) -> tuple[float, float]:
    """fp32 next-token loss and accuracy over every position; optionally the running max of
    ``model.activation_stats`` '*.max_abs' entries into ``block_max``."""
    total_loss, correct, tokens = 0.0, 0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x).float()
        total_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
        tokens += y.numel()
        if block_max is not None:
            for key, value in model.activation_stats.items():
                if key.endswith(".max_abs"):
                    name = key[: -len(".max_abs")]
                    block_max[name] = max(block_max.get(name, 0.0), value)
    return total_loss / tokens, correct / tokens


@torch.no_grad()
def _cast_parameters(model: nn.Module, cast: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for p in model.parameters():
        if p.is_floating_point():
            p.copy_(cast(p))


def analytic_activation_bound(model: nn.Module) -> float | None:
    """max over ``model.activation_bounds()`` (a float or a dict of floats), or None without one."""
    bounds_fn = getattr(model, "activation_bounds", None)
    if bounds_fn is None:
        return None
    bounds = bounds_fn()
    if bounds is None:
        return None
    return float(max(bounds.values()) if isinstance(bounds, dict) else bounds)


def fp8_safety_rows(model: nn.Module, formats: list[NumberFormat]) -> list[dict]:
    """'fp8_safe_proven' per fp8 format: 1 when every weight and the analytic activation bound fit."""
    weight_max = max(p.detach().abs().max().item() for p in model.parameters() if p.is_floating_point())
    bound = analytic_activation_bound(model)
    rows = []
    if bound is not None:
        rows.append({"metric": "analytic_activation_bound", "value": bound})
    for fmt in formats:
        if not fmt.is_fp8:
            continue
        if weight_max > fmt.max:
            value, status = 0.0, f"weights reach {weight_max:.4g} > {fmt.max:g}"
        elif bound is None:
            value, status = math.nan, "no analytic bound"
        elif bound <= fmt.max:
            value, status = 1.0, f"activations ≤ {bound:.4g} ≤ {fmt.max:g} for any input"
        else:
            value, status = 0.0, f"analytic bound {bound:.4g} > {fmt.max:g}"
        rows.append({"metric": "fp8_safe_proven", "value": value, "format": fmt.name, "status": status})
    return rows


@EVALUATIONS.register("precision")
def evaluate(ctx: EvalContext) -> list[dict]:
    """Loss/accuracy deltas vs fp32 per format and scaling, int8 weights, activation ranges, fp8 safety."""
    cfg = ctx.cfg
    windows = ctx.val_windows[: cfg.get("max_windows", 256)]
    batch_size = cfg.get("batch_size", 32)
    formats = [FORMATS.get(name) for name in cfg.get("formats", FORMATS.names())]
    scalings = cfg.get("scalings", ["none", "per_tensor"])
    for scaling in scalings:
        SCALINGS.get(scaling)  # fail on an unknown name before any work
    model = ctx.model.to(ctx.device).eval()

    block_max: dict[str, float] = {}
    model.record_activations = True
    try:
        with linear_hooks(model, None) as reference:
            base_loss, base_acc = loss_and_accuracy(model, windows, batch_size, ctx.device, block_max)
    finally:
        model.record_activations = False
    rows = [{"metric": "val_loss", "value": base_loss, "format": "fp32"},
            {"metric": "accuracy", "value": base_acc, "format": "fp32"}]
    activation_max = {**block_max, "matmul_operands": max(reference.max_abs.values(), default=0.0)}
    rows += [{"metric": "max_abs_activation", "value": v, "tensor": k} for k, v in block_max.items()]
    rows += [{"metric": "max_abs_activation", "value": v, "tensor": k} for k, v in reference.max_abs.items()]
    for fmt in formats:
        rows += [{"metric": "max_abs_over_format_max", "value": v / fmt.max, "format": fmt.name, "tensor": k}
                 for k, v in activation_max.items()]

    def result_rows(loss: float, acc: float, **columns) -> list[dict]:
        return [{"metric": "val_loss", "value": loss, **columns},
                {"metric": "accuracy", "value": acc, **columns},
                {"metric": "val_loss_delta", "value": loss - base_loss, **columns},
                {"metric": "accuracy_delta", "value": acc - base_acc, **columns}]

    observed_clean = {}
    for fmt in formats:
        for scaling in scalings:
            cast_model = copy.deepcopy(model)
            weight_counts = RangeCounts()

            def cast_weight(p: torch.Tensor) -> torch.Tensor:
                y, counts = cast_with_counts(p, fmt, scaling)
                weight_counts.add(counts)
                return y.to(p.dtype)

            _cast_parameters(cast_model, cast_weight)
            with linear_hooks(cast_model, fmt, scaling) as state:
                loss, acc = loss_and_accuracy(cast_model, windows, batch_size, ctx.device)
            columns = {"format": fmt.name, "scaling": scaling}
            rows += result_rows(loss, acc, **columns)
            for kind, counts in (("activation", state.counts), ("weight", weight_counts)):
                rows += [{"metric": f"{kind}_{what}", "value": float(getattr(counts, what)), **columns}
                         for what in ("elements", "overflow", "saturated", "underflow")]
            if scaling == "none":
                observed_clean[fmt.name] = all(c.overflow == 0 and c.saturated == 0
                                               for c in (state.counts, weight_counts))
    if cfg.get("int8", True):
        int8_model = copy.deepcopy(model)
        max_error = 0.0
        with torch.no_grad():
            for p in int8_model.parameters():
                if p.ndim == 2:
                    q, _ = quantize_int8_per_channel(p)
                    max_error = max(max_error, (q - p).abs().max().item())
                    p.copy_(q)
        loss, acc = loss_and_accuracy(int8_model, windows, batch_size, ctx.device)
        rows += result_rows(loss, acc, format="int8", scaling="per_channel")
        rows.append({"metric": "weight_max_abs_error", "value": max_error, "format": "int8", "scaling": "per_channel"})
    rows += fp8_safety_rows(model, formats)
    rows += [{"metric": "fp8_safe_observed", "value": float(ok), "format": name}
             for name, ok in observed_clean.items() if FORMATS.get(name).is_fp8]
    return rows
