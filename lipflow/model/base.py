"""The interface every lipflow language model implements.

Training, constraints, optimizers and evaluations only talk to a model through this class:

- ``embed(idx)`` maps token ids (B, T) to the embedded input sequence (B, T, d);
- ``forward_embedded(x)`` maps an embedded sequence to logits (B, T, V), so attacks and
  certificates act on the embedding space (ℓ2 on the embedded sequence → logits);
- ``param_roles()`` sorts parameters into ``embed`` / ``hidden`` / ``head`` / ``vector``
  (vectors are biases and gains); optimizers and parametrizations key off these roles;
- ``lipschitz_bound()``, ``lipschitz_bound_l2()`` and ``activation_bounds()`` read the model's
  certificate, composed from its modules' by the rules of ``lipflow.model.certificate`` (None where
  the model certifies nothing, e.g. with LayerNorm);
- ``attention_layers()`` lists each attention layer (an ``AttentionSite``) with its block's MLP;
- ``activation_stats`` holds max |entry| and RMS per block from the last forward pass;
- ``project_embeddings()`` re-applies any constraint the embedding itself carries;
- ``modular_structure(masses)`` describes the model as a Modula expression for the ``modular``
  parametrization (``modular_masses`` None: the model has no such structure).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from lipflow.model.bound import Rounding

ROLES = ("embed", "hidden", "head", "vector")


class AttentionSite(NamedTuple):
    """One attention layer as evaluations see it. ``attention`` provides ``n_heads``, ``score_scale`` (the
    factor on q·k), ``output_scale`` (the constant after W_o), ``first_projection`` (the Linear that reads
    the attention input), ``projection_weights()`` → (W_q, W_k, W_v, W_o), each (fan_out, fan_in), and
    ``attention_scores(x)``; ``mlp`` is the block's (W_up, W_down), None without one."""

    name: str
    attention: nn.Module
    mlp: tuple[torch.Tensor, torch.Tensor] | None


def block_attention_sites(blocks: nn.ModuleList) -> list[AttentionSite]:
    """The sites of a stack of blocks that each hold ``attn`` and an ``mlp`` with ``up``/``down`` Linears."""
    return [AttentionSite(f"blocks.{i}.attn", block.attn, (block.mlp.up.weight, block.mlp.down.weight))
            for i, block in enumerate(blocks)]


class LanguageModel(nn.Module):
    vocab_size: int
    context: int
    embedding_prefixes: tuple[str, ...] = ("tok.",)  # parameter-name prefixes of the role "embed"
    head_prefixes: tuple[str, ...] = ("head.",)  # ... and of the role "head"
    modular_masses: dict[str, float] | None = None  # default mass per part (None: no modular structure)

    def __init__(self) -> None:
        super().__init__()
        self.activation_stats: dict[str, float] = {}
        self.record_activations = False

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_length(self, idx: torch.Tensor) -> None:
        """A ValueError when the token sequences ``idx`` (B, T) are longer than the context, whose positions
        (learned, or rotary tables) end there: torch's IndexError or shape mismatch named neither (as nanoGPT
        asserts)."""
        if idx.shape[-1] > self.context:
            raise ValueError(f"a sequence of {idx.shape[-1]} tokens is longer than the model's context "
                             f"{self.context}: keep its last {self.context} (idx[:, -{self.context}:])")

    def check_token_ids(self, idx: torch.Tensor) -> None:
        """A ValueError naming the vocabulary size and an id of ``idx`` outside 0…vocab_size−1 (torch's
        IndexError "index out of range in self" names neither; on CUDA a device-side assert). Checked in
        eval mode only (``load_run``'s model, evaluations, sampling: ids from outside): reading the ids'
        range is a host sync on CUDA and a graph break under torch.compile, which the training step must
        not have, and its ids come from token shards each checked against the vocabulary when opened."""
        if self.training or idx.numel() == 0:
            return
        low, high = torch.stack(torch.aminmax(idx)).tolist()
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} is outside the model's vocabulary of "
                             f"{self.vocab_size} (ids 0 to {self.vocab_size - 1})")

    def forward_embedded(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(self.embed(idx))

    def param_roles(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by role: embeddings and head by name prefix, other matrices ``hidden``,
        everything else (biases, gains) ``vector``."""
        roles: dict[str, list[tuple[str, nn.Parameter]]] = {r: [] for r in ROLES}
        for name, p in self.named_parameters():
            if name.startswith(self.embedding_prefixes):
                roles["embed"].append((name, p))
            elif name.startswith(self.head_prefixes):
                roles["head"].append((name, p))
            else:
                roles["hidden" if p.ndim == 2 else "vector"].append((name, p))
        return roles

    def lipschitz_bound(self) -> float | None:
        """Certified Lipschitz constant in the model's own norm (None: no certificate)."""
        return None

    def lipschitz_bound_l2(self, seq_len: int | None = None) -> float | None:
        """Certified ℓ2 → ℓ2 constant from the embedded sequence (``seq_len`` tokens, default the
        context) to all logits (None: no certificate, e.g. LayerNorm is not globally Lipschitz)."""
        return None

    def activation_bounds(self, rounding: Rounding | None = None) -> dict[str, float] | None:
        """Bounds on max |entry| of named tensors over every input, with ``rounding``: of the model whose
        Linears cast their inputs and outputs (None: no certificate)."""
        return None

    def attention_layers(self) -> list[AttentionSite]:
        """Every attention layer in order (none by default)."""
        return []

    def modular_structure(self, masses: dict[str, float]):
        """The model as a ``lipflow.parametrization.Module`` tree, parts tared to ``masses``."""
        raise NotImplementedError

    def project_embeddings(self) -> None:
        """Re-apply the embedding's own constraint (a no-op for unconstrained models)."""

    def _record(self, name: str, x: torch.Tensor) -> None:
        """Store max |entry| and RMS of activation ``x`` when recording is on."""
        if self.record_activations:
            x = x.detach().float()
            self.activation_stats[f"{name}.max_abs"] = x.abs().max().item()
            self.activation_stats[f"{name}.rms"] = x.pow(2).mean().sqrt().item()

    @torch.no_grad()
    def sample_tokens(self, idx: torch.Tensor, temperature: float = 1.0,
                      generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield sampled next tokens, shape (batch, 1), one at a time and without end (nanoGPT's loop:
        softmax(logits / T) over the last ``context`` tokens; T = 0 is taken as 1e-6, i.e. greedy). Only
        the last ``context`` tokens are kept, so memory stays flat however many are drawn."""
        while True:
            idx = idx[:, -self.context:]
            logits = self(idx)[:, -1, :] / max(temperature, 1e-6)
            nxt = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            yield nxt

    def generate(self, idx: torch.Tensor, new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``idx`` followed by ``new_tokens`` sampled tokens (nanoGPT's ``generate``)."""
        drawn = itertools.islice(self.sample_tokens(idx, temperature, generator), new_tokens)
        return torch.cat([idx, *drawn], dim=1)


@torch.no_grad()
def non_finite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or ±inf (a diverged run's), or None; read from
    the device once, not once per parameter."""
    names, params = zip(*model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for p in params]).tolist()
    return next((name for name, ok in zip(names, finite) if not ok), None)


def spectral_norm(w: torch.Tensor) -> float:
    """Largest singular value σ_max(W), by an SVD in float64 (the certificates bound from above with it:
    a float32 SVD fell below the float64 σ_max of the same float32 matrix by up to 3e-7 relative in half
    of the cases); NaN for a matrix with a non-finite entry (a diverged run's), where the SVD would fail."""
    w = w.detach().double()
    if not bool(torch.isfinite(w).all()):
        return math.nan
    return torch.linalg.matrix_norm(w, ord=2).item()


def rms_operator_norm(w: torch.Tensor) -> float:
    """‖W‖_RMS→RMS = σ_max(W) / √(fan_out/fan_in) for W of shape (fan_out, fan_in)."""
    fan_out, fan_in = w.shape
    return spectral_norm(w) / (fan_out / fan_in) ** 0.5


def causal_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·q·kᵀ per head (…, T, T), entries above the diagonal (masked keys) set to 0."""
    scores = scale * (q.float() @ k.float().transpose(-2, -1))
    t = scores.shape[-1]
    return scores.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=scores.device).tril(), 0.0)
