"""Random linear-regression prompts (Ahn et al. 2023, §2; repo ``chengxiang/LinearTransformer``).

x_i ~ N(0, Σ) i.i.d. for i = 1..n+1 with Σ = U diag(λ) Uᵀ; w ~ N(0, I) or N(0, Σ⁻¹);
y_i = ⟨w, x_i⟩ + noise_std·ε_i. A prompt is the token matrix Z ∈ R^{(n+1)×(d+1)} (tokens are
rows, as in the paper's code): row i = (x_i, y_i) for i ≤ n, and the query row (x_{n+1}, 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lipflow.provenance import stream_seed
from lipflow.studies.icl.config import ICLConfig
from lipflow.registry import Registry

# sigma kind → (d, eigenvalues, seed) → (U, λ) with Σ = U diag(λ) Uᵀ
SigmaFactory = Callable[[int, tuple[float, ...], int], tuple[torch.Tensor, torch.Tensor]]
SIGMA_KINDS: Registry[SigmaFactory] = Registry("icl sigma kind")


@SIGMA_KINDS.register("identity")
def _identity(d: int, eigenvalues: tuple[float, ...], seed: int):
    """Σ = I (the eigenvalues are ignored)."""
    return torch.eye(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)


@SIGMA_KINDS.register("diagonal")
def _diagonal(d: int, eigenvalues: tuple[float, ...], seed: int):
    """Σ = diag(λ)."""
    return torch.eye(d, dtype=torch.float64), torch.tensor(eigenvalues, dtype=torch.float64)


@SIGMA_KINDS.register("rotated")
def _rotated(d: int, eigenvalues: tuple[float, ...], seed: int):
    """Σ = U diag(λ) Uᵀ with U Haar-random: QR of a Gaussian matrix, signs of diag(R) fixed."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)), torch.tensor(eigenvalues, dtype=torch.float64)


@dataclass(frozen=True)
class Covariance:
    """Σ = U diag(eigenvalues) Uᵀ in float64 on the CPU, with its square roots and inverse."""

    rotation: torch.Tensor
    eigenvalues: torch.Tensor

    @classmethod
    def from_config(cls, cfg: ICLConfig) -> "Covariance":
        sigma = cfg.sigma
        return cls(*SIGMA_KINDS.get(sigma.kind)(cfg.d, sigma.eigenvalues, sigma.seed))

    @property
    def d(self) -> int:
        return self.eigenvalues.numel()

    def power(self, p: float) -> torch.Tensor:
        """Σ^p = U diag(λ^p) Uᵀ."""
        return (self.rotation * self.eigenvalues**p) @ self.rotation.T

    @property
    def matrix(self) -> torch.Tensor:
        return self.power(1.0)

    @property
    def inverse(self) -> torch.Tensor:
        return self.power(-1.0)


# name → (Σ) → Cov(w)
W_PRIORS: Registry[Callable[[Covariance], torch.Tensor]] = Registry("icl w_prior")


@W_PRIORS.register("identity")
def _w_identity(sigma: Covariance) -> torch.Tensor:
    return torch.eye(sigma.d, dtype=torch.float64)


@W_PRIORS.register("sigma_inverse")
def _w_sigma_inverse(sigma: Covariance) -> torch.Tensor:
    return sigma.inverse


@dataclass(frozen=True)
class Prompts:
    """A batch of B prompts: x (B, n+1, d), labels y (B, n+1) incl. the query's true label."""

    x: torch.Tensor
    y: torch.Tensor

    @property
    def n(self) -> int:
        return self.x.shape[1] - 1

    @property
    def context_x(self) -> torch.Tensor:
        return self.x[:, :-1]

    @property
    def context_y(self) -> torch.Tensor:
        return self.y[:, :-1]

    @property
    def query_x(self) -> torch.Tensor:
        return self.x[:, -1]

    @property
    def query_y(self) -> torch.Tensor:
        return self.y[:, -1]

    def tokens(self) -> torch.Tensor:
        """Z (B, n+1, d+1): rows (x_i, y_i), the query's label slot set to 0."""
        labels = self.y.clone()
        labels[:, -1] = 0.0
        return torch.cat([self.x, labels.unsqueeze(-1)], dim=-1)

    def to(self, dtype: torch.dtype) -> "Prompts":
        return Prompts(self.x.to(dtype), self.y.to(dtype))


class PromptSampler:
    """Draws prompts for one (Σ, w prior, noise, n) setting from a seeded generator."""

    def __init__(self, cfg: ICLConfig, n: int, device: torch.device | str = "cpu"):
        self.sigma = Covariance.from_config(cfg)
        self.w_cov = W_PRIORS.get(cfg.w_prior)(self.sigma)
        self.noise_std = cfg.noise_std
        self.n = n
        self.device = torch.device(device)
        # x = z Σ^{1/2} and w = Cov(w)^{1/2} z' with z, z' ~ N(0, I)
        self._x_root = self.sigma.power(0.5).to(self.device)
        self._w_root = spd_power(self.w_cov, 0.5).to(self.device)

    def sample(
        self, batch: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> Prompts:
        d, dev = self.sigma.d, self.device
        z = torch.randn(batch, self.n + 1, d, generator=generator, device=dev, dtype=dtype)
        w = torch.randn(batch, d, generator=generator, device=dev, dtype=dtype)
        x = z @ self._x_root.to(dtype)
        w = w @ self._w_root.to(dtype)
        y = torch.einsum("bid,bd->bi", x, w)
        if self.noise_std > 0:
            noise = torch.randn(y.shape, generator=generator, device=dev, dtype=dtype)
            y = y + self.noise_std * noise
        return Prompts(x, y)

    def generator(self, *stream: object) -> torch.Generator:
        """A generator on this sampler's device for the named stream of ``seed``."""
        return torch.Generator(device=self.device).manual_seed(stream_seed(*stream))


def spd_power(matrix: torch.Tensor, p: float) -> torch.Tensor:
    """M^p of a symmetric positive definite M (by eigendecomposition)."""
    eig, vec = torch.linalg.eigh(matrix)
    return (vec * eig**p) @ vec.T
