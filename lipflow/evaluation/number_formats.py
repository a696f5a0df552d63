"""Number formats and simulated casts (the precision evaluation's arithmetic): a format's range, the
scalings s (``none``: 1; ``per_tensor``: format_max / max|x|), the cast x ↦ (s·x).to(format).to(fp32)/s
with its overflow / saturation / underflow counts, and int8 per-channel weight rounding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

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
    bf16, whose max is fp32's, the ratio overflows fp32 whenever max|x| < 1. s is then lowered ulp by
    ulp (at most 4) until s·max|x| in fp32, the product the cast sees, is ≤ format_max: rounded to
    fp32 it could land one ulp above (448.00003 for e4m3), which counted as overflow and saturation."""
    finite = x[torch.isfinite(x)]
    amax = finite.abs().max() if finite.numel() else torch.zeros((), device=x.device)
    s = torch.where(amax > 0, fmt.max / amax.double(), torch.ones((), device=x.device, dtype=torch.float64))
    s = s.clamp(max=torch.finfo(torch.float32).max).float()
    for _ in range(4):
        s = torch.where(s * amax > fmt.max, torch.nextafter(s, torch.zeros_like(s)), s)
    return s


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
