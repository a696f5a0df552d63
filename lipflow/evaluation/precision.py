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

Safety is a statement about every input, not the observed ones: overflow of an unscaled cast is
impossible if every weight fits (checked exactly) and the analytic activation bounds of the cast model
fit (``fp8_safe_proven``, per format, bf16 and fp16 included): ``model.activation_bounds(rounding)`` of
the model with its weights cast, with each Linear's input and output cast (``bound.Rounding``: up to
2^−(mantissa bits + 1) relative, plus half a subnormal step, per cast) and the fp32 arithmetic in between
(``bound.Arithmetic``: each dot product's γ_n, RoPE, the softmax average, GELU, the residual sums; TF32's or
bf16's operand rounding where torch's float32 matmul precision allows it; inf, so no proof, where a step
could pass fp32's range), with attention on SDPA's math backend (``loss_and_accuracy``), so the bound covers
the values the simulation casts, not only those of the fp32 model (a bound of 441 for the fp32 model's head output
was proven safe in e4m3 while the cast run saturated there at 452; fp32 SDPA puts an attention output
above the largest |value| it averages in a quarter of the outputs). The bounds — a float, or a dict of
floats keyed like the observed tensors — bound |entry| of every matmul operand and result for any token
sequence; a model without them gets "no analytic bound". Per tensor the fp32 model's bound is reported
next to the observed max (their ratio ≥ 1).

Real kernel (``real_fp8``: auto = on CUDA of capability ≥ 8.9; true forces it, e.g. torch's CPU
kernel; false): every Linear also runs through ``torch._scaled_mm`` in e4m3 (``real_fp8_accuracy``),
next to the same arithmetic simulated (e4m3 operands, fp32 accumulation, bf16 result); rows
``real_fp8_*`` / ``simulated_fp8_*`` per scaling.
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
from torch.nn.attention import SDPBackend, sdpa_kernel

from lipflow.evaluation import EVALUATIONS, EvalContext
from lipflow.evaluation.number_formats import (FORMATS, SCALINGS, NumberFormat, RangeCounts, cast_with_counts,
                                               quantize_int8_per_channel, simulate_cast)
from lipflow.model.base import LanguageModel
from lipflow.model.bound import Rounding, matmul_precision


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
@sdpa_kernel([SDPBackend.MATH])
def loss_and_accuracy(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                      block_max: dict[str, float] | None = None) -> tuple[float, float]:
    """fp32 next-token loss and accuracy over every position; optionally the running max of
    ``model.activation_stats`` '*.max_abs' entries into ``block_max``. Attention runs on SDPA's math backend,
    the arithmetic the fp8 proof bounds (``Arithmetic.average``; CUDA's fused fp32 kernels multiply in
    3×TF32)."""
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


def analytic_activation_bounds(model: LanguageModel, rounding: Rounding | None = None) -> dict[str, float] | None:
    """``model.activation_bounds(rounding)`` as a dict (a float becomes {"all": value}), or None without one."""
    bounds = model.activation_bounds(rounding=rounding)
    if bounds is None:
        return None
    return {k: float(v) for k, v in bounds.items()} if isinstance(bounds, dict) else {"all": float(bounds)}


def analytic_activation_bound(model: nn.Module) -> float | None:
    """max over ``model.activation_bounds()`` (a float or a dict of floats), or None without one."""
    bounds = analytic_activation_bounds(model)
    return None if bounds is None else max(bounds.values())


def cast_activation_bound(model: nn.Module, fmt: NumberFormat) -> float | None:
    """The largest analytic activation bound of the unscaled simulation in ``fmt``: ``model`` with its
    weights cast, every Linear's input and output cast and fp32 arithmetic in between
    (``activation_bounds(rounding)``); NaN where a bound is NaN (none proven); None without bounds."""
    cast_model = copy.deepcopy(model)
    _cast_parameters(cast_model, lambda p: simulate_cast(p, fmt).to(p.dtype))
    bounds = analytic_activation_bounds(cast_model, Rounding.of(fmt.dtype))
    if bounds is None:
        return None
    return math.nan if any(math.isnan(v) for v in bounds.values()) else max(bounds.values())


def proven_safe(model: nn.Module, fmt: NumberFormat) -> tuple[float, str]:
    """(1.0, why) when no weight and no bound of the cast model (``cast_activation_bound``) exceeds
    ``fmt.max``, so an unscaled cast to ``fmt`` cannot overflow for any input; (0.0, why) when one does,
    a weight is not finite or no bound is finite; (NaN, "no analytic bound") without bounds."""
    weights = [p.detach() for p in model.parameters() if p.is_floating_point()]
    if not all(bool(torch.isfinite(w).all()) for w in weights):
        return 0.0, "weights not finite"
    weight_max = max(w.abs().max().item() for w in weights)
    if weight_max > fmt.max:
        return 0.0, f"weights reach {weight_max:.4g} > {fmt.max:g}"
    bound = cast_activation_bound(model, fmt)
    if bound is None:
        return math.nan, "no analytic bound"
    if not math.isfinite(bound):
        return 0.0, (f"no finite analytic bound: a bound passes fp32's range, or roundings compound past one "
                     f"(torch's float32 matmul precision: '{matmul_precision()}')")
    if bound <= fmt.max:
        return 1.0, f"activations ≤ {bound:.4g} ≤ {fmt.max:g} for any input, the casts' rounding included"
    return 0.0, f"analytic bound {bound:.4g} > {fmt.max:g} (the casts' rounding included)"


def fp8_safety_rows(model: nn.Module, formats: list[NumberFormat]) -> list[dict]:
    """'fp8_safe_proven' per format (every format, despite the name: bf16 and fp16 too): 1 when every
    weight and every analytic activation bound of the cast model fit the format's range (``proven_safe``),
    0 when one does not, NaN without bounds; and the fp32 model's analytic bound (the max over all
    bounded tensors)."""
    bound = analytic_activation_bound(model)
    rows = [] if bound is None else [{"metric": "analytic_activation_bound", "value": bound}]
    for fmt in formats:
        value, status = proven_safe(model, fmt)
        rows.append({"metric": "fp8_safe_proven", "value": value, "format": fmt.name, "status": status})
    return rows


def bound_rows(bounds: dict[str, float] | None, observed: dict[str, float]) -> list[dict]:
    """Proven vs observed max |entry|. Always the largest observed value ('observed_max_activation', over
    the residual stream after each block, every Linear input and output and the logits). With bounds:
    per tensor the bound ('activation_bound') and, where observed, bound / observed
    ('bound_over_observed'); the largest bound over the observed tensors ('proven_max_activation': the
    scores are bounded but not observed, so they are left out here, not in the safety verdicts) and
    its ratio to the observed max ('proven_over_observed', ≥ 1 for a sound bound)."""
    seen = max(observed.values(), default=0.0)
    rows = [{"metric": "observed_max_activation", "value": seen}]
    if bounds is None:
        return rows
    rows += [{"metric": "activation_bound", "value": v, "tensor": k} for k, v in bounds.items()]
    common = [k for k in bounds if k in observed]
    rows += [{"metric": "bound_over_observed", "value": bounds[k] / observed[k] if observed[k] else math.inf,
              "tensor": k} for k in common]
    if common:
        proven = max(bounds[k] for k in common)
        rows += [{"metric": "proven_max_activation", "value": proven},
                 {"metric": "proven_over_observed", "value": proven / seen if seen else math.inf}]
    return rows


# -- the real fp8 kernel --------------------------------------------------------------------------

E4M3 = FORMATS.get("fp8_e4m3")


def fp8_kernel_available(device: torch.device | str) -> bool:
    """True on a CUDA device of compute capability ≥ 8.9 (Ada, Hopper and later: fp8 tensor cores)."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 9))


def _pad16(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero-pad dimension ``dim`` of ``t`` up to a multiple of 16 (``torch._scaled_mm``'s alignment)."""
    extra = -t.shape[dim] % 16
    if not extra:
        return t
    pad = [0, 0] * (t.ndim - 1 - dim) + [0, extra]
    return F.pad(t, pad)


class Fp8Linear:
    """One ``nn.Linear`` as an e4m3 matmul: y = (A·B)·(1/s_x)(1/s_w) with A = (s_x·x)₈, B = (s_w·W)₈ᵀ,
    the product accumulated in fp32 and returned in ``out_dtype``; (·)₈ is the cast to e4m3 (round to
    nearest) and s the ``scaling`` (1, or 448/max|·| per tensor: the weight's once, the input's per call).

    ``real`` runs ``torch._scaled_mm`` (A row-major, B = the contiguous e4m3 weight transposed, i.e.
    column-major; scale_a, scale_b = the dequantization factors 1/s as fp32 scalars; both operands
    zero-padded to multiples of 16, which changes neither max|·| nor the product). Otherwise the same
    arithmetic runs in fp32: the e4m3 values upcast, multiplied, the product times the same fp32 scale
    factors and rounded to ``out_dtype`` — so the two differ only in the kernel's summation order.
    """

    def __init__(self, module: nn.Linear, scaling: str, real: bool, out_dtype: torch.dtype):
        if module.bias is not None:
            raise ValueError("Fp8Linear: Linears with a bias are not supported")
        self.scaling, self.real, self.out_dtype = scaling, real, out_dtype
        w = module.weight.detach().float()
        self.out_features = w.shape[0]
        w_scale = SCALINGS.get(scaling)(w, E4M3)
        self.w_dequant = (1.0 / w_scale).float()
        self.w8 = _pad16(_pad16((w * w_scale).to(E4M3.dtype), 0), 1).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        x_scale = SCALINGS.get(self.scaling)(x, E4M3)
        x8 = _pad16(_pad16((x * x_scale).to(E4M3.dtype), 0), 1)
        x_dequant = (1.0 / x_scale).float()
        if self.real:
            y = torch._scaled_mm(x8, self.w8.t(), scale_a=x_dequant, scale_b=self.w_dequant, out_dtype=self.out_dtype)
        else:
            y = ((x8.float() @ self.w8.float().t()) * (x_dequant * self.w_dequant)).to(self.out_dtype)
        return y[: x.shape[0], : self.out_features].float().reshape(*shape[:-1], self.out_features)


@contextlib.contextmanager
def fp8_linears(model: nn.Module, scaling: str, real: bool, out_dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """Run every ``nn.Linear`` of ``model`` as an ``Fp8Linear`` (real kernel or simulated) inside the block."""
    patched = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for module in patched:
        module.forward = Fp8Linear(module, scaling, real, out_dtype)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


@torch.no_grad()
def real_fp8_accuracy(model: nn.Module, windows: torch.Tensor, batch_size: int = 32, scaling: str | None = None,
                      out_dtype: torch.dtype = torch.bfloat16) -> dict[str, float | str]:
    """Next-token loss and accuracy with every Linear run through ``torch._scaled_mm`` in e4m3 ("real"),
    against the same arithmetic simulated in fp32 ("simulated") and the fp32 model, on ``windows``
    (token ids, shape (N, T + 1)), on the model's device (CUDA of capability ≥ 8.9 for the hardware
    kernel; torch's CPU kernel also runs it on a CPU).

    ``scaling`` None picks "none" (scale 1) when ``proven_safe`` shows e4m3 cannot overflow and
    "per_tensor" otherwise. Returns fp32_/simulated_/real_ loss and accuracy, the largest
    |real − simulated| logit (``max_logit_difference``), the scaling used and ``proven_safe`` (1/0/NaN).
    """
    device = next(model.parameters()).device
    safe, _ = proven_safe(model, E4M3)
    scaling = scaling or ("none" if safe == 1.0 else "per_tensor")
    SCALINGS.get(scaling)  # an unknown name fails here, before any work
    totals = {kind: [0.0, 0] for kind in ("fp32", "simulated", "real")}
    tokens, max_diff = 0, 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = {"fp32": model(x).float()}
        for kind in ("simulated", "real"):
            with fp8_linears(model, scaling, real=kind == "real", out_dtype=out_dtype):
                logits[kind] = model(x).float()
        for kind, z in logits.items():
            totals[kind][0] += F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="sum").item()
            totals[kind][1] += int((z.argmax(-1) == y).sum())
        max_diff = max(max_diff, (logits["real"] - logits["simulated"]).abs().max().item())
        tokens += y.numel()
    result: dict[str, float | str] = {"scaling": scaling, "proven_safe": safe, "max_logit_difference": max_diff}
    for kind, (loss, correct) in totals.items():
        result[f"{kind}_loss"], result[f"{kind}_accuracy"] = loss / tokens, correct / tokens
    return result


@EVALUATIONS.register("precision")
def evaluate(ctx: EvalContext) -> list[dict]:
    """Loss/accuracy deltas vs fp32 per format and scaling, int8 weights, activation ranges, fp8 safety."""
    cfg = ctx.cfg
    windows = ctx.val_windows[: cfg["max_windows"]]
    batch_size = cfg["batch_size"]
    formats = [FORMATS.get(name) for name in cfg["formats"]]
    scalings = cfg["scalings"]
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
            ctx.report(f"{fmt.name}, scaling {scaling}: val loss {loss:.4f} (fp32 {base_loss:.4f})")
    if cfg["int8"]:
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
    rows += [{"metric": "fp8_safe_observed", "value": float(ok), "format": name} for name, ok in observed_clean.items()]
    rows += bound_rows(analytic_activation_bounds(model), {**block_max, **reference.max_abs})
    real = cfg["real_fp8"]
    if real is True or (real == "auto" and fp8_kernel_available(ctx.device)):
        for scaling in scalings:
            result = real_fp8_accuracy(model, windows, batch_size, scaling)
            columns = {"format": "fp8_e4m3", "scaling": scaling}
            rows += [{"metric": f"{kind}_fp8_{what}", "value": result[f"{kind}_{what}"], **columns}
                     for kind in ("simulated", "real") for what in ("loss", "accuracy")]
            rows.append({"metric": "real_fp8_max_logit_difference", "value": result["max_logit_difference"],
                         **columns})
    return rows
