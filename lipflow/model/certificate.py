"""Certificates that compose (Modula's well-normed modules, Large et al. 2024; Newhouse et al. 2025, App. B).

A module certifies itself from a bound on its input: ``certify(bound, coordinates) -> Certificate``.
``bound`` is a norm bound on each input token (per-token RMS in the transformer, ℓ2 of the whole input
in the mlp). The models' modules take a float, one bound for every token (the global certificate); the
rules are elementwise arithmetic, so a local certificate can pass tensors of per-token bounds through
modules that accept them and get elementwise results. ``coordinates``, when known, bounds each input
coordinate (|x_j| ≤ coordinates_j); a Linear uses it for a sharper entry bound.

Every module's output bound is linear in its input bound, bound_out = gain·bound_in, and its Lipschitz
constant may depend on bound_in (attention's does, through a²). The rules, in one place:

- ``sequential``: f_n ∘ … ∘ f_1 — bounds flow through, constants and gains multiply;
- ``total`` (sum): f_1 + … + f_n on one input — gains and constants add;
- ``scaled``: c·f — gain and constant times |c|;
- ``residual``: κ·x + β·f(x) = total(scaled(κ, identity), scaled(β, f)): constant κ + β·L_f and
  gain κ + β·g_f (the convex residual κ = 1−α, β = α; the plain one κ = β = 1);
- ``record``: the identity, naming an entry bound of the stream between two parts (e.g. ``block0``).

Each rule multiplies and adds in a fixed order, so a model assembled from them reproduces the numbers
of the same product written out by hand bit for bit (tests/test_certificate_golden.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import torch

Bound = Union[float, torch.Tensor]


@dataclass(frozen=True)
class Certificate:
    """What a module guarantees for inputs within its input bound.

    ``bound``: norm bound on the output (gain·bound_in); ``lipschitz``: Lipschitz constant on those
    inputs; ``gain``: bound_out/bound_in; ``entries``: max |entry| bounds of named tensors inside the
    module (keys relative to it, e.g. ``q.output``); ``coordinates``: per-coordinate bound on the output
    when known; ``parts``: the certificates of a sequential composite's parts, in order.
    """

    bound: Bound
    lipschitz: Bound
    gain: Bound
    entries: dict[str, float] = field(default_factory=dict)
    coordinates: torch.Tensor | None = None
    parts: tuple[Certificate, ...] = ()

    @classmethod
    def leaf(cls, bound_in: Bound, gain: Bound, lipschitz: Bound, entries: dict[str, float] | None = None,
             coordinates: torch.Tensor | None = None) -> Certificate:
        """A module's own certificate: output bound bound_in·gain."""
        return cls(bound_in * gain, lipschitz, gain, entries or {}, coordinates)


Certify = Callable[[Bound, "torch.Tensor | None"], Certificate]


def identity(bound: Bound, coordinates: torch.Tensor | None = None) -> Certificate:
    """x ↦ x: gain and constant 1."""
    return Certificate(bound, 1.0, 1.0, {}, coordinates)


def sequential(parts: Sequence[tuple[str, Certify]], bound: Bound,
               coordinates: torch.Tensor | None = None) -> Certificate:
    """f_n ∘ … ∘ f_1 with part i named by its prefix: each part certifies on the previous part's output
    bound; L = Π L_i and g = Π g_i (left to right); entries keyed prefix + key."""
    lipschitz: Bound = 1.0
    gain: Bound = 1.0
    entries: dict[str, float] = {}
    steps = []
    for prefix, certify in parts:
        step = certify(bound, coordinates)
        lipschitz, gain = lipschitz * step.lipschitz, gain * step.gain
        entries.update({prefix + key: value for key, value in step.entries.items()})
        bound, coordinates = step.bound, step.coordinates
        steps.append(step)
    return Certificate(bound, lipschitz, gain, entries, coordinates, tuple(steps))


def scaled(c: float, certify: Certify) -> Certify:
    """x ↦ c·f(x): bound, gain and constant times |c| (entries inside f are f's own)."""
    def certify_scaled(bound: Bound, coordinates: torch.Tensor | None = None) -> Certificate:
        inner = certify(bound, coordinates)
        return Certificate(abs(c) * inner.bound, abs(c) * inner.lipschitz, abs(c) * inner.gain, inner.entries,
                           None if inner.coordinates is None else abs(c) * inner.coordinates)
    return certify_scaled


def total(*summands: Certify) -> Certify:
    """x ↦ Σ_i f_i(x): ‖Σ f_i(x)‖ ≤ Σ g_i·bound and the constants add (triangle inequality)."""
    def certify_total(bound: Bound, coordinates: torch.Tensor | None = None) -> Certificate:
        lipschitz: Bound = 0.0
        gain: Bound = 0.0
        entries: dict[str, float] = {}
        for certify in summands:
            term = certify(bound, coordinates)
            lipschitz, gain = lipschitz + term.lipschitz, gain + term.gain
            entries.update(term.entries)
        return Certificate(bound * gain, lipschitz, gain, entries)
    return certify_total


def residual(keep: float, weight: float, certify: Certify) -> Certify:
    """x ↦ κ·x + β·f(x) (κ = ``keep``, β = ``weight``): constant κ + β·L_f and gain κ + β·g_f
    (f's entries kept)."""
    return total(scaled(keep, identity), scaled(weight, certify))


def record(key: str, value: Callable[[Bound, "torch.Tensor | None"], float]) -> Certify:
    """The identity, recording the entry bound ``value(bound, coordinates)`` of the stream it sits on."""
    def certify_record(bound: Bound, coordinates: torch.Tensor | None = None) -> Certificate:
        return Certificate(bound, 1.0, 1.0, {key: value(bound, coordinates)}, coordinates)
    return certify_record
