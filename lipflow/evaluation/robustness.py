"""Robustness: certified radii from the ℓ2 Lipschitz certificate, PGD and token-substitution attacks.

Which prediction: the next token after the last position of each validation window (the window's
final token is the label), i.e. the prediction that has seen the whole context. Certified, PGD and
discrete numbers all refer to that one prediction per sequence, so certified ≤ PGD-robust ≤ clean
accuracy holds per ε.

The certificate L bounds ‖F(x) − F(x')‖₂ ≤ L‖x − x'‖₂, where x is the whole embedded sequence
(T × d, from ``model.embed``) and F(x) all logits (T × V, ``model.forward_embedded``). Perturbation
norms ε are ℓ2 norms over the whole embedded sequence.

- certified radius: m / (√2·L), m = z_y − max_{j≠y} z_j; each z_y − z_j is √2·L-Lipschitz because
  ‖e_y − e_j‖₂ = √2, so no perturbation with ‖δ‖₂ < m/(√2 L) changes the prediction. Certified
  accuracy at ε: the fraction with radius > ε (a positive radius implies a correct prediction).
  ``certified_radius_median``: the median radius over the correct predictions.
- PGD ℓ2 (Madry et al. 2018): normalized-gradient ascent with step 2.5ε/steps, projection onto the
  ε-ball, restart 0 from δ = 0 and later restarts uniform in the ball, drawn from a stream of the
  radius's own (``provenance.stream_seed`` of the seed and ε, so a radius's attack does not depend on the other
  radii or their order; the config takes ``epsilons`` sorted); the objective (default the
  Carlini–Wagner margin max_{j≠y} z_j − z_y, or "ce") picks the worst δ seen; robust loss is the
  cross-entropy there.
- Token substitutions, k per sequence: "random" (best of ``random_trials`` draws of k positions and
  k different tokens) and "greedy" (k rounds, each taking the best of ``greedy_candidates`` random
  single substitutions at untouched positions, scored exactly; budget k reports the worst sequence
  seen within k rounds).
- Local certificate (``local_certificate``): per input, a sound bound on how far the margin can
  fall in the ε-ball, from the exact gradient and the curvature of the network at that input
  (models it covers: lipschitz_gpt and lipschitz_gpt_unscaled, mlp with GELU). Rows:
  ``certified_radius_local_median`` (as ``certified_radius_median``, over the correct predictions),
  ``certified_accuracy_local`` per ε, and per ε > 0
  ``tightness_global`` / ``tightness_local``, the median over inputs of (margin fall found by PGD) /
  (certified fall). At ``half_certified_epsilon``,
  the ε where local certified accuracy is half the clean accuracy, PGD runs once more (attack
  ``pgd_half_certified``) for both tightness rows and ``within_100x_local``, the fraction of inputs
  whose attack reaches at least 1/100 of the local bound.
- Empirical Lipschitz lower bound: max ‖F(x') − F(x)‖₂ / ‖x' − x‖₂ over every attack pair (PGD,
  substitutions' embeddings, and a ratio ascent on a sphere of radius ``lipschitz_radius``), F a
  float64 copy of the model (``float64_forward``). Any such ratio is a true lower bound, so one above
  the certificate is a bug; the evaluation raises.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F

from lipflow.evaluation import EVALUATIONS, EvalContext
from lipflow.evaluation.local_certificate import local_certificate
from lipflow.model.base import LanguageModel
from lipflow.provenance import stream_seed
from lipflow.registry import Registry

CERTIFICATE_SLACK = 1e-4  # relative fp32 round-off allowed between a measured ratio and the certificate

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OBJECTIVES: Registry[Objective] = Registry("attack objective")


@OBJECTIVES.register("margin")
def margin_objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max_{j≠y} z_j − z_y per sample (> 0 ⇔ misclassified); Carlini & Wagner 2017."""
    return -logit_margin(logits, labels)


@OBJECTIVES.register("ce")
def ce_objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """m = z_y − max_{j≠y} z_j for logits (N, V) and labels (N,)."""
    logits = logits.float()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.max(dim=1).values


def certified_radius(logits: torch.Tensor, labels: torch.Tensor, lipschitz_l2: float) -> torch.Tensor:
    """m / (√2·L): no ℓ2 perturbation of the input smaller than this flips the prediction."""
    return logit_margin(logits, labels) / (math.sqrt(2.0) * lipschitz_l2)


def median(values: torch.Tensor) -> float:
    """The median of a non-empty tensor, the mean of the two middle values for an even count
    (``Tensor.median`` returns the lower of the two); NaN when a value is NaN, as ``Tensor.median``
    (sorting puts NaNs last, where the middle of the sorted values would skip them)."""
    ordered = values.double().flatten().sort().values
    if bool(ordered.isnan().any()):
        return math.nan
    n = ordered.numel()
    return float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2)


def median_radius_of_correct(radius: torch.Tensor, margin: torch.Tensor) -> float:
    """The median certified radius over the inputs predicted correctly (margin > 0); NaN when none is.
    (Over all inputs, the wrong ones at radius 0, it was 0 for any model below 50 % clean accuracy.)"""
    correct = margin > 0
    return median(radius[correct]) if bool(correct.any()) else math.nan


def certified_accuracy(radius: torch.Tensor, epsilon: float) -> float:
    return float((radius > epsilon).float().mean())


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def _random_in_ball(shape: torch.Size, radius: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform in the ℓ2 ball: a Gaussian direction times radius·u^{1/D}."""
    direction = torch.randn(shape, generator=generator)
    direction /= _per_sample_norm(direction)
    dim = math.prod(shape[1:])
    u = torch.rand(shape[0], generator=generator) ** (1.0 / dim)
    return (direction * u.view(-1, *([1] * (len(shape) - 1)))).to(radius.device) * radius


def pgd_l2(score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
           epsilon: float | torch.Tensor, steps: int = 20, restarts: int = 1,
           generator: torch.Generator | None = None, objective: str = "margin") -> torch.Tensor:
    """The worst δ (‖δ‖₂ ≤ ε per sample) found by ℓ2 PGD on ``objective(score(x + δ), labels)``."""
    objective_fn = OBJECTIVES.get(objective)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    eps = torch.as_tensor(epsilon, dtype=torch.float32, device=x.device).expand(x.shape[0])
    eps = eps.reshape(-1, *([1] * (x.ndim - 1)))
    best = torch.zeros_like(x)
    if not bool((eps > 0).any()):
        return best
    step = 2.5 * eps / steps
    with torch.no_grad():
        best_value = objective_fn(score(x), labels)
    for restart in range(restarts):
        delta = torch.zeros_like(x) if restart == 0 else _random_in_ball(x.shape, eps, generator)
        for _ in range(steps + 1):
            delta.requires_grad_(True)
            value = objective_fn(score(x + delta), labels)
            grad, = torch.autograd.grad(value.sum(), delta)
            with torch.no_grad():
                better = value > best_value
                best[better] = delta[better]
                best_value = torch.where(better, value, best_value)
                norm = _per_sample_norm(grad)
                delta = delta + step * grad / torch.where(norm > 0, norm, torch.ones_like(norm))
                delta = delta * torch.clamp(eps / _per_sample_norm(delta).clamp_min(1e-30), max=1.0)
    return best.detach()


def random_substitution(score_tokens: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor,
                        labels: torch.Tensor, k: int, trials: int, vocab_size: int,
                        generator: torch.Generator, objective: str = "margin") -> torch.Tensor:
    """The worst of ``trials`` sequences with k random positions set to random different tokens."""
    objective_fn = OBJECTIVES.get(objective)
    best, best_value = idx.clone(), objective_fn(score_tokens(idx), labels)
    B, T = idx.shape
    k = min(k, T)
    for _ in range(trials):
        positions = torch.rand(B, T, generator=generator).argsort(dim=1)[:, :k].to(idx.device)
        shift = torch.randint(1, vocab_size, (B, k), generator=generator).to(idx.device)
        candidate = idx.scatter(1, positions, (idx.gather(1, positions) + shift) % vocab_size)
        value = objective_fn(score_tokens(candidate), labels)
        better = value > best_value
        best[better], best_value = candidate[better], torch.where(better, value, best_value)
    return best


def greedy_substitution(score_tokens: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor,
                        labels: torch.Tensor, k: int, candidates: int, vocab_size: int,
                        generator: torch.Generator, objective: str = "margin") -> list[torch.Tensor]:
    """Worst sequences within budgets 1..k: k greedy rounds of the best of ``candidates`` single swaps."""
    objective_fn = OBJECTIVES.get(objective)
    B, T = idx.shape
    current, touched = idx.clone(), torch.zeros(B, T, dtype=torch.bool)
    worst, worst_value = idx.clone(), objective_fn(score_tokens(idx), labels)
    per_budget = []
    for _ in range(min(k, T)):
        positions = torch.multinomial((~touched).float(), candidates, replacement=True, generator=generator)
        shift = torch.randint(1, vocab_size, (B, candidates), generator=generator)
        positions, shift = positions.to(idx.device), shift.to(idx.device)
        tokens = (current.gather(1, positions) + shift) % vocab_size
        trial = current.repeat_interleave(candidates, 0)
        rows = torch.arange(B * candidates, device=idx.device)
        trial[rows, positions.reshape(-1)] = tokens.reshape(-1)
        values = objective_fn(score_tokens(trial), labels.repeat_interleave(candidates)).view(B, candidates)
        choice = values.argmax(dim=1)
        current = trial.view(B, candidates, T)[torch.arange(B, device=idx.device), choice]
        touched[torch.arange(B), positions.gather(1, choice[:, None]).squeeze(1).cpu()] = True
        value = values.max(dim=1).values
        better = value > worst_value
        worst[better], worst_value = current[better], torch.where(better, value, worst_value)
        per_budget.append(worst.clone())
    return per_budget


def pair_ratios(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, x_other: torch.Tensor,
                batch_size: int | None = None) -> torch.Tensor:
    """‖F(x') − F(x)‖₂ / ‖x' − x‖₂ per sample (float64), over pairs that differ (whole sequences,
    all logits), ``batch_size`` pairs at a time."""
    step = batch_size or x.shape[0]
    ratios = []
    with torch.no_grad():
        for i in range(0, x.shape[0], step):
            a, b = x[i:i + step], x_other[i:i + step]
            dx = (b - a).flatten(1).double().norm(dim=1)
            keep = dx > 0
            if keep.any():
                df = (forward(b[keep]).double() - forward(a[keep]).double()).flatten(1).norm(dim=1)
                ratios.append((df / dx[keep]).cpu())
    return torch.cat(ratios) if ratios else torch.zeros(0, dtype=torch.float64)


def float64_forward(model: LanguageModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward_embedded`` of a float64 copy of ``model``, for ``pair_ratios``: a ratio is a lower
    bound on L only in exact arithmetic, and float32 logits' round-off over a small ‖x' − x‖ is not
    (a ratio ascent of radius 10⁻⁷ measured 1.2 on a model certified at 0.61)."""
    exact = copy.deepcopy(model).double()
    return lambda t: exact.forward_embedded(t.double())


def lipschitz_ascent(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, radius: float,
                     steps: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample ratios after maximizing ‖F(x+δ) − F(x)‖² on the sphere ‖δ‖₂ = radius
    (δ ← radius·∇/‖∇‖; for small δ a power iteration on JᵀJ)."""
    with torch.no_grad():
        base = forward(x)
    direction = torch.randn(x.shape, generator=generator).to(x.device)
    delta = radius * direction / _per_sample_norm(direction)
    for _ in range(steps):
        delta.requires_grad_(True)
        gain = (forward(x + delta) - base).pow(2).flatten(1).sum(dim=1)
        grad, = torch.autograd.grad(gain.sum(), delta)
        with torch.no_grad():
            norm = _per_sample_norm(grad)
            delta = torch.where(norm > 0, radius * grad / norm.clamp_min(1e-30), delta)
    return pair_ratios(forward, x, x + delta.detach())


def certificate_l2(model: LanguageModel, fallback: float | None) -> float | None:
    """``model.lipschitz_bound_l2`` (method or attribute) when the model has one, else ``fallback``."""
    attr = getattr(model, "lipschitz_bound_l2", None)
    value = attr() if callable(attr) else attr
    return float(value) if value is not None else fallback


def check_lower_bound(lower: float, certificate: float | None) -> None:
    """A measured ratio above the certificate means the certificate or the attack code is wrong."""
    if certificate is not None and lower > certificate * (1 + CERTIFICATE_SLACK):
        raise RuntimeError(f"lower bound {lower:.6g} exceeds certificate {certificate:.6g}: this is a bug")


def tightness(attack_drop: torch.Tensor, bound_drop: torch.Tensor) -> torch.Tensor:
    """Per input (margin fall found by an attack) / (certified bound on it); inputs with a zero bound
    (ε = 0) are left out."""
    keep = bound_drop > 0
    return attack_drop[keep].double() / bound_drop[keep].double()


def half_certified_epsilon(radius: torch.Tensor, clean_accuracy: float) -> float:
    """The ε where certified accuracy (the fraction with radius > ε) falls to half the clean accuracy:
    the k-th largest radius, k = ⌊c/2⌋ for the c = N·accuracy correct predictions (rounded: a float32
    accuracy such as 14/20 = 0.69999999 gave ⌊6.99…⌋ = 6, an ε certifying 30 %, not 35 %)."""
    k = round(len(radius) * clean_accuracy) // 2
    return float(radius.sort(descending=True).values[min(k, len(radius) - 1)])


def tightness_rows(attack_drop: torch.Tensor, epsilon: float, local_drop: torch.Tensor | None,
                   certificate: float | None, attack: str) -> list[dict]:
    """Median tightness of the global (√2·L·ε) and local certificates at one ε."""
    rows = []
    bounds = {"tightness_global": None if certificate is None else
              torch.full_like(attack_drop, math.sqrt(2.0) * certificate * epsilon),
              "tightness_local": local_drop}
    for metric, bound in bounds.items():
        ratios = tightness(attack_drop, bound) if bound is not None else torch.zeros(0)
        if ratios.numel():
            rows.append({"metric": metric, "value": median(ratios), "attack": attack, "epsilon": epsilon})
    return rows


def _batched(fn: Callable[..., torch.Tensor], batch_size: int, *tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(*(t[i:i + batch_size] for t in tensors)) for i in range(0, tensors[0].shape[0], batch_size)])


@EVALUATIONS.register("robustness")
def evaluate(ctx: EvalContext) -> list[dict]:
    """Certified accuracy, PGD and substitution robustness, and the empirical Lipschitz lower bound."""
    cfg = ctx.cfg
    model = ctx.model.to(ctx.device).eval()
    batch_size, objective = cfg["batch_size"], cfg["objective"]
    OBJECTIVES.get(objective)  # fail on an unknown name before any work
    generator = torch.Generator().manual_seed(cfg["seed"])
    windows = ctx.val_windows[: cfg["n_sequences"]].to(ctx.device)
    idx, labels = windows[:, :-1], windows[:, -1]
    with torch.no_grad():
        x = model.embed(idx).float()

    def last(x_: torch.Tensor) -> torch.Tensor:
        return model.forward_embedded(x_)[:, -1, :].float()

    def last_tokens(idx_: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _batched(lambda t: model(t)[:, -1, :].float(), batch_size, idx_)

    exact = float64_forward(model)

    def ratios_to(x_other: torch.Tensor) -> torch.Tensor:
        return pair_ratios(exact, x, x_other, batch_size)

    def accuracy_and_loss(logits: torch.Tensor) -> tuple[float, float]:
        return (float((logits.argmax(1) == labels).float().mean()),
                float(F.cross_entropy(logits, labels)))

    with torch.no_grad():
        clean = _batched(last, batch_size, x)
    clean_acc, loss = accuracy_and_loss(clean)
    ctx.report(f"clean accuracy {clean_acc:.4f} on {windows.shape[0]} sequences")
    rows = [{"metric": "sequences", "value": float(windows.shape[0])},  # n_sequences, or fewer where val is short
            {"metric": "clean_accuracy", "value": clean_acc}, {"metric": "clean_loss", "value": loss}]
    epsilons = [float(e) for e in cfg["epsilons"]]
    clean_margin = logit_margin(clean, labels)
    certificate = certificate_l2(model, ctx.certificate)
    if certificate is not None:
        radius = certified_radius(clean, labels, certificate)
        rows.append({"metric": "certificate_l2", "value": certificate})
        rows.append({"metric": "certified_radius_median", "value": median_radius_of_correct(radius, clean_margin)})
        rows += [{"metric": "certified_accuracy", "value": certified_accuracy(radius, e), "epsilon": e}
                 for e in epsilons]
    local = [local_certificate(model, x[i:i + batch_size], labels[i:i + batch_size], certificate)
             for i in range(0, x.shape[0], batch_size)]
    local = None if local[0] is None else local

    def local_drop(e: float) -> torch.Tensor | None:
        return None if local is None else torch.cat([c.margin_drop(torch.full((len(c.margin),), e)) for c in local])

    if local is not None:
        radius_local = torch.cat([c.radius() for c in local])
        rows.append({"metric": "certified_radius_local_median",
                     "value": median_radius_of_correct(radius_local, clean_margin.to(radius_local.device))})
        rows += [{"metric": "certified_accuracy_local", "value": certified_accuracy(radius_local, e), "epsilon": e}
                 for e in epsilons]

    def pgd_at(e: float) -> torch.Tensor:
        restarts = torch.Generator().manual_seed(stream_seed(cfg["seed"], float(e)))
        return _batched(lambda xb, yb: pgd_l2(last, xb, yb, e, cfg["pgd_steps"], cfg["pgd_restarts"], restarts,
                                              objective), batch_size, x, labels)

    ratios: dict[str, list[torch.Tensor]] = {"pgd": [], "random": [], "greedy": []}
    for number, e in enumerate(epsilons, 1):
        delta = pgd_at(e)
        with torch.no_grad():
            attacked = _batched(last, batch_size, x + delta)
        acc, loss = accuracy_and_loss(attacked)
        rows += [{"metric": "robust_accuracy", "value": acc, "attack": "pgd", "epsilon": e},
                 {"metric": "robust_loss", "value": loss, "attack": "pgd", "epsilon": e}]
        rows += tightness_rows(clean_margin - logit_margin(attacked, labels), e, local_drop(e), certificate, "pgd")
        ratios["pgd"].append(ratios_to(x + delta))
        ctx.report(f"PGD at ε = {e:g}: robust accuracy {acc:.4f} ({number} of {len(epsilons)})")
    if local is not None:
        e = half_certified_epsilon(radius_local, clean_acc)
        delta = pgd_at(e)
        with torch.no_grad():
            drop = clean_margin - logit_margin(_batched(last, batch_size, x + delta), labels)
        bound = local_drop(e)
        rows.append({"metric": "half_certified_epsilon", "value": e})
        rows += tightness_rows(drop, e, bound, certificate, "pgd_half_certified")
        within = tightness(drop, bound)
        if within.numel():
            rows.append({"metric": "within_100x_local", "value": float((within >= 0.01).double().mean()),
                         "attack": "pgd_half_certified", "epsilon": e})

    k_values = sorted(int(k) for k in cfg["k_values"])
    vocab = model.vocab_size
    greedy = greedy_substitution(last_tokens, idx, labels, max(k_values), cfg["greedy_candidates"],
                                 vocab, generator, objective) if k_values else []
    for number, k in enumerate(k_values, 1):
        attacked = {"random": random_substitution(last_tokens, idx, labels, k, cfg["random_trials"],
                                                  vocab, generator, objective),
                    "greedy": greedy[min(k, len(greedy)) - 1]}
        for name, tokens in attacked.items():
            acc, loss = accuracy_and_loss(last_tokens(tokens))
            rows += [{"metric": "robust_accuracy", "value": acc, "attack": name, "k": k},
                     {"metric": "robust_loss", "value": loss, "attack": name, "k": k}]
            with torch.no_grad():
                ratios[name].append(ratios_to(model.embed(tokens).float()))
        ctx.report(f"random and greedy substitutions at k = {k} ({number} of {len(k_values)})")

    ratios["lipschitz_ascent"] = [torch.cat([
        lipschitz_ascent(exact, x[i:i + batch_size].double(), cfg["lipschitz_radius"], cfg["lipschitz_steps"],
                         generator)
        for i in range(0, x.shape[0], batch_size)])]
    lower = 0.0
    for source, found in ratios.items():
        values = torch.cat(found) if found else torch.zeros(0)
        if values.numel():
            best = float(values.max())
            lower = max(lower, best)
            rows.append({"metric": "lipschitz_lower_bound", "value": best, "attack": source})
    rows.append({"metric": "lipschitz_lower_bound", "value": lower, "attack": "all"})
    check_lower_bound(lower, certificate)
    return rows
