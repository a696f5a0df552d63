"""The paper's robustness comparison on an image MLP (Newhouse et al. 2025, §3.3 and Fig. 2), on
scikit-learn's 8×8 digits (shipped with the package, no download).

Two bias-free ReLU MLPs (``mlp`` model: 64 → width → width → 10) are trained on the same batches:
Muon + spectral soft cap (every matrix's RMS→RMS norm ≤ sigma_max) and AdamW + decoupled weight
decay. They are compared at matched clean accuracy: every ``eval_every`` steps each run's val
accuracy is recorded with a weight snapshot; the target is the lower of the two best val
accuracies and each method is evaluated, on the held-out test split, at its earliest snapshot that
reaches it. The comparison is repeated for ``seeds`` seeds (``seed``, ``seed`` + 1, …), each with its
own split, init, batches, attacks and matched target: which snapshot first reaches the target moves
with rounding (torch's thread count, the BLAS path), and a method whose L grows with the step (AdamW)
is certified at that snapshot, so one seed's numbers are a sample, not the result. Per method: clean
accuracy, the ℓ2 certificate L = Π σ_max(Wᵢ) (ReLU is 1-Lipschitz), certified accuracy (radius
m/(√2 L) > ε), robust accuracy, mean true-class probability and loss under ℓ2 PGD per ε on the 64
pixels scaled to [0, 1] (each radius's random restarts drawn from a stream seeded by the seed and ε,
so a radius's numbers do not depend on the other radii), and the empirical Lipschitz lower bound over
the PGD pairs (checked against L). Each method trains with the LM trainer's constrained update
(``lipflow.train.update``: step → decay → project).

CLI: ``python -m lipflow.studies.image_mlp --config-json JSON --out FILE.parquet``, JSON being the
``image_mlp`` block of the config, checked against the config schema's ``image_mlp`` block
(workflow/schemas/config.schema.yaml; missing keys take its defaults). ``--out`` replaces only an
earlier table of this study (:data:`COLUMNS`, or :data:`EARLIER_LAYOUTS`, matching its ``.sha256``).
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable

import pyarrow as pa
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from lipflow.config import make_validator, run_defaults
from lipflow.config.runs import check_image_mlp_block
from lipflow.config.schema import first_error
from lipflow.data.parquet import write_table_parquet
from lipflow.errors import (ArgumentParser, ConfigError, StageError, json_object_argument, memory_errors_in_one_line,
                            phase_reporter, silent, summary_of)
from lipflow.evaluation.robustness import (certified_accuracy, certified_radius, check_lower_bound, float64_forward,
                                           pair_ratios, pgd_l2)
from lipflow.model import build_model
from lipflow.provenance import stream_seed
from lipflow.studies.digits_split import CLASSES, IMAGE_FEATURES, TEST_FRACTION_OF_REST, TRAIN_FRACTION
from lipflow.train.build import build_learner, check_learner
from lipflow.train.update import constrained_update

# The study's table: long form, one row per (method, metric[, epsilon])
SCHEMA = pa.schema([("metric", pa.string()), ("value", pa.float64()), ("method", pa.string()),
                    ("optimizer", pa.string()), ("weight_constraint", pa.string()), ("seed", pa.int64()),
                    ("epsilon", pa.float64())])
COLUMNS = tuple(SCHEMA.names)
# its columns before they named each method's optimizer and constraint, and before the seed column (one
# seed, the config's): such tables are this study's too
EARLIER_LAYOUTS = (("metric", "value", "method", "epsilon"),
                   ("metric", "value", "method", "optimizer", "weight_constraint", "epsilon"))

Split = tuple[torch.Tensor, torch.Tensor]


def digits_splits(seed: int) -> dict[str, Split]:
    """Stratified 60/20/20 train/val/test split of the 1,797 digits (``digits_split``), pixels scaled to
    [0, 1]."""
    data = load_digits()
    x, y = data.data / 16.0, data.target
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, train_size=TRAIN_FRACTION, stratify=y,
                                                        random_state=seed)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=TEST_FRACTION_OF_REST,
                                                    stratify=y_rest, random_state=seed)
    return {name: (torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.long))
            for name, a, b in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test))}


def _accuracy(model: torch.nn.Module, split: Split) -> float:
    with torch.no_grad():
        return float((model(split[0]).argmax(1) == split[1]).float().mean())


def mlp_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The model keys of the study's bias-free ReLU MLP."""
    return {"model": "mlp", "in_features": IMAGE_FEATURES, "d_model": cfg["width"], "n_layers": cfg["n_layers"],
            "activation": "relu"}


def train_snapshots(method: dict[str, Any], cfg: dict[str, Any], data: dict[str, Split],
                    seed: int) -> list[tuple[int, float, dict[str, torch.Tensor]]]:
    """Train one method from ``seed``; (step, val accuracy, weights) every ``eval_every`` steps and at the end."""
    torch.manual_seed(seed)
    model, optimizer, matrices, constraint = build_learner(run_defaults(**{**method, **mlp_config(cfg)}), CLASSES,
                                                           torch.device("cpu"))
    batches = torch.Generator().manual_seed(seed)
    x_train, y_train = data["train"]
    snapshots = []
    for step in range(1, cfg["steps"] + 1):
        pick = torch.randint(0, x_train.shape[0], (cfg["batch_size"],), generator=batches)
        loss = F.cross_entropy(model(x_train[pick]), y_train[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        constrained_update(optimizer, matrices, constraint)  # step → decay → project
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            snapshots.append((step, _accuracy(model, data["val"]), copy.deepcopy(model.state_dict())))
    return snapshots


def robustness_rows(model: torch.nn.Module, split: Split, cfg: dict[str, Any], seed: int,
                    **columns: Any) -> list[dict]:
    """Clean, certified and PGD numbers of one trained MLP on ``split``, its attacks seeded by ``seed``;
    every row holds ``seed`` and ``columns``."""
    columns = {**columns, "seed": seed}
    x, y = split
    model.eval()
    with torch.no_grad():
        logits = model(x)
    certificate = model.lipschitz_bound_l2()
    radius = certified_radius(logits, y, certificate)
    rows = [{"metric": "clean_accuracy", "value": float((logits.argmax(1) == y).float().mean()), **columns},
            {"metric": "certificate_l2", "value": certificate, **columns}]
    lower, exact = 0.0, float64_forward(model)
    for eps in cfg["epsilons"]:
        restarts = torch.Generator().manual_seed(stream_seed(seed, float(eps)))  # not shared by the radii
        delta = pgd_l2(model.forward_embedded, x, y, eps, cfg["pgd_steps"], cfg["pgd_restarts"], restarts)
        with torch.no_grad():
            adv = model.forward_embedded(x + delta)
        true_prob = adv.softmax(1).gather(1, y[:, None]).mean()
        ratios = pair_ratios(exact, x, x + delta)
        lower = max([lower, *ratios.tolist()])
        rows += [{"metric": "certified_accuracy", "value": certified_accuracy(radius, eps), "epsilon": eps, **columns},
                 {"metric": "robust_accuracy", "value": float((adv.argmax(1) == y).float().mean()),
                  "epsilon": eps, **columns},
                 {"metric": "robust_true_class_probability", "value": float(true_prob), "epsilon": eps, **columns},
                 {"metric": "robust_loss", "value": float(F.cross_entropy(adv, y)), "epsilon": eps, **columns}]
    check_lower_bound(lower, certificate)
    rows.append({"metric": "lipschitz_lower_bound", "value": lower, **columns})
    return rows


def run_image_mlp_study(cfg: dict[str, Any], report: Callable[[str], None] = silent) -> list[dict]:
    """Train every method at every seed, match clean val accuracy within each seed, and return long-form
    rows (columns ``method``, its ``optimizer`` and ``weight_constraint``, and ``seed``);
    ``report(message)`` hears of each method trained."""
    seeds = range(cfg["seed"], cfg["seed"] + cfg["seeds"])
    total, done = len(seeds) * len(cfg["methods"]), 0
    rows: list[dict] = []
    for seed in seeds:
        data = digits_splits(seed)
        runs = {}
        for name, method in cfg["methods"].items():
            runs[name] = train_snapshots(method, cfg, data, seed)
            check_finite_snapshots(runs[name], name, seed)
            done += 1
            report(f"{name} trained at seed {seed}, best val accuracy {best_val_accuracy(runs[name]):.4f} "
                   f"({done} of {total})")
        rows += matched_rows(runs, cfg, data, seed)
    return rows


def check_finite_snapshots(snapshots: list[tuple[int, float, dict[str, torch.Tensor]]], name: str, seed: int) -> None:
    """A one-line StageError naming the method's lr when a snapshot's weights hold a NaN or ±inf: a diverged
    model's argmax still 'reaches' about 10 % accuracy, which would set every method's matched target."""
    for step, _, weights in snapshots:
        broken = next((key for key, tensor in weights.items() if not bool(torch.isfinite(tensor).all())), None)
        if broken is not None:
            raise StageError(f"image_mlp.methods.{name}.lr: the method diverged at seed {seed} (non-finite weights "
                             f"{broken} at step {step}); lower its lr (or change its optimizer or constraint)")


def best_val_accuracy(snapshots: list[tuple[int, float, dict[str, torch.Tensor]]]) -> float:
    """The highest val accuracy of a method's snapshots."""
    return max(acc for _, acc, _ in snapshots)


def matched_rows(runs: dict[str, list], cfg: dict[str, Any], data: dict[str, Split], seed: int) -> list[dict]:
    """Each method's rows at its earliest snapshot reaching the lower of the methods' best val accuracies."""
    target = min(best_val_accuracy(snaps) for snaps in runs.values())
    rows: list[dict] = []
    for name, snaps in runs.items():
        step, val_acc, weights = next(s for s in snaps if s[1] >= target)
        model = build_model(run_defaults(**mlp_config(cfg)), CLASSES)
        model.load_state_dict(weights)
        method = {"method": name, "optimizer": cfg["methods"][name]["optimizer"],
                  "weight_constraint": cfg["methods"][name]["weight_constraint"]}
        rows += [{"metric": metric, "value": value, "seed": seed, **method}
                 for metric, value in (("matched_step", float(step)), ("val_accuracy", val_acc),
                                       ("final_val_accuracy", snaps[-1][1]))]
        rows += robustness_rows(model, data["test"], cfg, seed, **method)
    return rows


def study_config(block: dict[str, Any]) -> dict[str, Any]:
    """The ``--config-json`` block checked as the config checks its ``image_mlp`` block (the one schema,
    workflow/schemas/config.schema.yaml): a copy with the schema's defaults filled; the first violation
    is a one-line ConfigError naming the key."""
    filled = {"image_mlp": copy.deepcopy(block)}
    message = first_error(make_validator(fill=True), filled)
    if message is not None:
        raise ConfigError(f"--config-json: {message}")
    # the pipeline passes the block as the config filled it (every run key of a method at its default):
    # a key counts as set where its value is not that default
    defaults = run_defaults()  # a method is a run block ($defs/run)
    methods_set = {name: {key for key, value in method.items() if key not in defaults or value != defaults[key]}
                   for name, method in filled["image_mlp"]["methods"].items()}
    try:
        check_image_mlp_block(filled["image_mlp"], methods_set)
    except ConfigError as err:
        raise ConfigError(f"--config-json: {str(err).removeprefix('config error: ')}") from None
    check_methods_build(filled["image_mlp"])
    return filled["image_mlp"]


def check_methods_build(cfg: dict[str, Any]) -> None:
    """Every method's learner checked as training builds it (``check_learner``, on the meta device: e.g. a soft
    cap that cannot absorb the method's steps at its lr), so that a bad later method is refused before the
    first one trains (minutes), as a ConfigError naming the method and, where the message does, its key."""
    for name, method in cfg["methods"].items():
        try:
            check_learner(run_defaults(**{**method, **mlp_config(cfg)}), CLASSES)
        except ValueError as err:
            key, named, reason = str(err).partition(": ")
            where = f"{name}.{key}: {reason}" if named and key in method else f"{name}: {err}"
            raise ConfigError(f"--config-json: image_mlp.methods.{where}") from None


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m lipflow.studies.image_mlp", description=summary_of(__doc__))
    parser.add_argument("--config-json", required=True, help="the config's image_mlp block (missing keys: "
                                                             "the schema's defaults)")
    parser.add_argument("--out", required=True, help="Parquet file to write (atomically)")
    parser.add_argument("--receipt", default=None,
                        help="written last: the table written, as JSON (the pipeline's record that the job finished)")
    args = parser.parse_args(argv)
    from lipflow.atomic import check_folder_exists, refuse_to_replace_receipt, refuse_to_replace_unsealed, write_receipt
    from lipflow.errors import run_guarded
    from lipflow.studies.outputs import RECEIPT_KEY, parquet_with_columns

    def go() -> int:
        refuse_to_replace_unsealed(args.out, "--out", "an image-MLP study table",
                                   lambda p: any(parquet_with_columns(columns)(p)
                                                 for columns in (COLUMNS, *EARLIER_LAYOUTS)))
        check_folder_exists(args.out, "--out")  # before the minutes of training, not after them
        if args.receipt is not None:
            refuse_to_replace_receipt(args.receipt, RECEIPT_KEY, "lipflow.studies.image_mlp")
            check_folder_exists(args.receipt, "--receipt")
        cfg = study_config(json_object_argument(args.config_json, "--config-json"))
        with memory_errors_in_one_line():
            rows = run_image_mlp_study(cfg, phase_reporter("image_mlp"))
        write_table_parquet(args.out, pa.Table.from_pylist(rows, schema=SCHEMA))  # a key a row lacks: null
        if args.receipt is not None:
            write_receipt(args.receipt, RECEIPT_KEY, [args.out])
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
