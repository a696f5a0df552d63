"""``mlp``: a bias-free Lipschitz MLP classifier (the CIFAR model of Newhouse et al. 2025, App. D).

Built from cfg keys: the run keys ``d_model`` (the width), ``n_layers`` (the number of Linear
layers, ≥ 1), ``activation`` (gelu = GELU/1.128904, its largest slope | relu) and the mlp's own keys
(``$defs/mlp_model`` of workflow/schemas/config.schema.yaml, defaults filled there):
``in_features`` (input size; images are flattened), ``n_classes`` (null: the second argument of
``build_model``) and ``input_norm``, a bound on ‖x‖₂ of the flattened input (e.g. 8 for 64 pixels
in [0, 1]) that ``activation_bounds`` starts from (null: none known). Layers:
in_features → width → … → width → n_classes, each a Linear without bias, φ between them.
Init: orthogonal·√(fan_out/fan_in) except the last layer, which starts at zero.

It follows the LanguageModel interface where that makes sense for a classifier: ``embed``
flattens (B, …) inputs to (B, in_features), ``forward_embedded`` returns (B, n_classes) logits,
so attacks act on the flattened input. Roles: every layer but the last is ``hidden`` (so weight
constraints and orthogonalized optimizers reach the input layer too, as in the paper), the last
is ``head``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lipflow.config import mlp_model_keys
from lipflow.model.base import LanguageModel, spectral_norm
from lipflow.model.bound import ACTIVATIONS, Rounding, linear_output_bounds
from lipflow.model.certificate import Bound, Certificate, Certify, record, sequential
from lipflow.model.lipschitz_gpt import orthogonal_init_
from lipflow.model.registry import MODELS
from lipflow.parametrization import Module, atom, bond, seq, tare


@MODELS.register("mlp")
class LipschitzMLP(LanguageModel):
    """x ↦ output_mult·W_n φ(… φ(W_1 x)); ℓ2→ℓ2 Lipschitz constant ≤ |output_mult|·Π_i σ_max(W_i)."""

    def __init__(self, cfg: dict[str, Any], n_classes: int | None = None):
        super().__init__()
        own = mlp_model_keys(cfg)  # in_features, n_classes, input_norm: $defs/mlp_model of the schema
        cfg_classes = own["n_classes"]
        if n_classes is None and cfg_classes is None:
            raise ValueError("n_classes: the mlp model needs n_classes in the config or as an argument")
        if n_classes is not None and cfg_classes is not None and n_classes != cfg_classes:
            raise ValueError(f"n_classes: config says {cfg_classes} but the data has {n_classes}")
        if cfg["n_layers"] < 1:
            raise ValueError(f"n_layers={cfg['n_layers']}: the mlp needs at least one layer")
        if cfg["depth_mup"]:
            raise ValueError("depth_mup: the mlp model has no residual branches to scale; set depth_mup: false")
        self.n_classes = n_classes if n_classes is not None else cfg_classes
        self.in_features = own["in_features"]
        dims = [self.in_features] + [cfg["d_model"]] * (cfg["n_layers"] - 1) + [self.n_classes]
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in zip(dims, dims[1:]))
        self.act = ACTIVATIONS.get(cfg["activation"])
        self.output_mult = 1.0  # µP readout multiplier, set by the parametrization
        self.input_norm: float | None = own["input_norm"]  # ‖x‖₂ bound of the inputs, if known
        # Modula's MLP: every Linear has mass 1 (no tare)
        self.modular_masses = {"blocks": float(cfg["n_layers"] - 1), "head": 1.0}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer in self.layers[:-1]:
            orthogonal_init_(layer.weight)
        self.layers[-1].weight.zero_()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def modular_structure(self, masses: dict[str, float]) -> Module:
        """W_n ∘ φ ∘ … ∘ φ ∘ W_1 (φ sensitivity 1): the hidden layers tared to masses['blocks'],
        the last to masses['head']."""
        head = tare(atom(f"layers.{len(self.layers) - 1}.weight"), masses["head"])
        if len(self.layers) == 1:
            return head
        hidden = seq(*(m for i in range(len(self.layers) - 1) for m in (atom(f"layers.{i}.weight"), bond(1.0))))
        return seq(tare(hidden, masses["blocks"]), head)

    def forward_embedded(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers[:-1]):
            x = self.act.fn(layer(x))
            self._record(f"block{i}", x)
        logits = self.layers[-1](x) * self.output_mult
        self._record("logits", logits)
        return logits

    def param_roles(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        named = list(self.named_parameters())
        return {"embed": [], "hidden": named[:-1], "head": named[-1:], "vector": []}

    def layer_certifier(self, i: int, rounding: Rounding | None = None) -> Certify:
        """Layer i (then φ, except after the last) on inputs with ‖x‖₂ ≤ n and |x_j| ≤ e_j: its output has
        |(W_i x)_j| ≤ b_j = min(‖W_i[j,:]‖₂·n, (|W_i|·e)_j) (``linear_output_bounds``: Cauchy–Schwarz and the
        triangle inequality); φ has φ(0) = 0, is 1-Lipschitz and |φ(h)| ≤ gain·|h|, so after it the
        coordinates are within gain·b and the ℓ2 norm within gain·σ(W_i)·n. Constant σ(W_i) (ℓ2 → ℓ2).
        With ``rounding`` the layer casts its input and output and computes in fp32 between
        (``rounding.arithmetic``): b is the fp32 dot product's bound (``Arithmetic.dot``) from the cast input
        (RN-norm(n), RN(e)), and φ reads RN(b) and a vector of norm ≤ RN-norm(fl-matmul-norm(σ(W_i)·RN-norm(n)));
        φ = scale·base in fp32 adds ``Activation.computed_bound`` (its ``fp32_excess``, inf past its kernel's
        ``fp32_input_max``) and two roundings (scale to fp32, then the product)."""
        layer, last = self.layers[i], i == len(self.layers) - 1

        def certify(norm: Bound, entry: torch.Tensor | None = None) -> Certificate:
            sigma = spectral_norm(layer.weight)
            gain = 1.0 if last else self.act.gain
            if rounding is None:
                out = linear_output_bounds(layer.weight, norm, entry)
                entries = {"input": float(entry.max()), "output": float(out.max())}
                return Certificate.leaf(norm, gain * sigma, sigma, entries, gain * out)
            arithmetic, fan_in, fan_out = rounding.arithmetic, layer.in_features, layer.out_features
            cast_norm = rounding.norm(norm, fan_in)
            out = arithmetic.dot(linear_output_bounds(layer.weight, cast_norm, rounding.entry(entry)), fan_in)
            entries = {"input": float(entry.max()), "output": float(out.max())}
            out_norm = rounding.norm(arithmetic.matmul_norm(layer.weight, sigma, cast_norm), fan_out)
            if last:
                return Certificate(out_norm, sigma, out_norm / norm, entries, rounding.entry(out))
            act = self.act.computed_bound
            bound = arithmetic.ops(gain * act(out_norm), 2, fan_out)
            return Certificate(bound, sigma, bound / norm, entries, arithmetic.ops(gain * act(rounding.entry(out)), 2))
        return certify

    def output_certifier(self, rounding: Rounding | None = None) -> Certify:
        """The readout multiplier s = |output_mult|: constant s, logits within s·(last layer's bound); with
        ``rounding`` the product in fp32 (s rounded to fp32, then the product: two roundings)."""
        scale = abs(self.output_mult)

        def certify(norm: Bound, entry: torch.Tensor | None = None) -> Certificate:
            logits = scale * entry if rounding is None else rounding.arithmetic.ops(scale * entry, 2)
            return Certificate.leaf(norm, scale, scale, {"logits": float(logits.max())}, logits)
        return certify

    @torch.no_grad()
    def certificate(self, input_norm: float, rounding: Rounding | None = None) -> Certificate:
        """Every layer in sequence, then the multiplier, on inputs with ‖x‖₂ ≤ ``input_norm`` (so every
        |x_j| ≤ input_norm); entries ``layers.{i}.input``/``.output``, φ after layer i (``block{i}``) and
        ``logits`` (with ``rounding``: of the model whose Linears cast their inputs and outputs). Its
        constant, |output_mult|·Π σ_max(W_i), holds on all inputs."""
        parts: list[tuple[str, Certify]] = []
        for i in range(len(self.layers)):
            parts.append((f"layers.{i}.", self.layer_certifier(i, rounding)))
            if i < len(self.layers) - 1:
                parts.append(("", record(f"block{i}", lambda _, entry: float(entry.max()))))
        parts.append(("", self.output_certifier(rounding)))
        entry = torch.full((self.in_features,), input_norm, dtype=torch.float64, device=self.layers[0].weight.device)
        return sequential(parts, input_norm, entry)

    def lipschitz_bound(self) -> float:
        """Certified ℓ2→ℓ2 constant on the flattened input: |output_mult|·Π σ_max(W_i) (φ is 1-Lipschitz)."""
        return self.certificate(1.0).lipschitz  # the constant does not depend on the input bound

    def lipschitz_bound_l2(self) -> float:
        """The same certificate (the MLP's bound is already ℓ2→ℓ2, on all of R^in_features)."""
        return self.lipschitz_bound()

    def activation_bounds(self, input_norm: float | None = None,
                          rounding: Rounding | None = None) -> dict[str, float] | None:
        """Bounds on max |entry| of every layer's input and output, of φ after each layer and of the logits
        (``certificate``, with ``rounding`` if given), over all inputs with ‖x‖₂ ≤ ``input_norm`` (default:
        the cfg's ``input_norm``; None without one, as no input domain is known)."""
        norm = self.input_norm if input_norm is None else input_norm
        return None if norm is None else self.certificate(float(norm), rounding).entries
