"""Experiments: named config blocks that expand into runs, and their DuckDB views.

**Expansion** (runs at Snakefile parse time, so nothing here imports torch). ``experiments: [name…]``
selects blocks of ``experiment_definitions`` (built-in defaults in
``workflow/schemas/experiments.schema.yaml``; a block in the config is merged over the built-in one
of the same name, mappings key by key, ``grid`` and lists replaced whole). ``experiment_preset``
(cpu | paper) picks one preset per block: ``base`` run settings and a ``grid``. A grid maps axis →
values; its runs are the cartesian product of the axes in order, and a list of grids is the union
of their products (scikit-learn's ParameterGrid semantics). An axis is either a list of values of
the run key it names (label ``<prefix><value>``, e.g. ``s2`` for sigma_max = 2, or the value itself
for strings) or a mapping label → overrides (a variant axis setting several keys at once). A run is
named ``<short>.<label>.<label>…`` and its overrides are base ← grid point ← ``experiment: <name>``;
``lipflow.config.expanded_runs`` merges them over ``defaults`` and validates them like any run.
A block's ``evaluations`` are its runs' checkpoint evaluations (instead of ``evaluations.enabled``);
its ``studies`` (``icl``, ``image_mlp``) switch on work outside the run grid.

**Views** (``create_views``, on the freshly built results database): one headline view per
experiment — ``pareto``, ``lr_transfer``, ``sharpness_spread``, ``icl_vs_pgd``, ``rank_bound``,
``robustness``, ``precision`` — plus the per-run views the figures read (``lr_transfer_runs``,
``sharpness_curves``). Each view filters its experiment by name (``runs.experiment``). A view whose
source tables or columns are absent (the experiment did not run, or the ICL study is off) is still
created, empty, with the same columns and types, and ``COMMENT ON VIEW`` records why:
``select view_name, comment from duckdb_views() where comment like 'empty%'``.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import yaml

from lipflow.config import ConfigError
from lipflow.registry import Registry

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "experiments.schema.yaml"
PRESETS = ("cpu", "paper")
RUN_NAME_MAX = 64  # run names match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ (config.schema.yaml $defs/name)

# Short label prefixes of scalar axes (sigma_max = 2 → "s2"); other keys use their own name.
LABEL_PREFIX = {"sigma_max": "s", "lr": "lr", "d_model": "w", "n_layers": "L", "n_heads": "h",
                "train_tokens": "n", "weight_decay": "wd", "steps": "T", "seed": "seed",
                "batch_size": "B", "context": "ctx"}


# --------------------------------------------------------------------------- definitions

@lru_cache(maxsize=1)
def builtin_definitions() -> dict[str, dict[str, Any]]:
    """name → block, the defaults of ``$defs/experiment_definitions`` in the experiments schema."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    props = schema["$defs"]["experiment_definitions"]["properties"]
    return {name: spec["default"] for name, spec in props.items()}


def _merge_block(builtin: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``builtin``: mappings merge key by key, except ``grid`` and lists (replaced)."""
    merged = copy.deepcopy(builtin)
    for key, value in override.items():
        if key != "grid" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_block(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def definitions(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every experiment block of ``config``: the built-in ones with the config's blocks merged over."""
    blocks = copy.deepcopy(builtin_definitions())
    for name, block in (config.get("experiment_definitions") or {}).items():
        blocks[name] = _merge_block(blocks.get(name, {}), block or {})
    return blocks


def selected_experiments(config: dict[str, Any]) -> list[str]:
    """The names in ``config['experiments']``; an unknown name raises a one-line ConfigError."""
    known = definitions(config)
    names = list(config.get("experiments") or [])
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config error: unknown experiment '{name}' in experiments{hint}; "
                              f"known: {', '.join(sorted(known))}")
    return names


def preset_name(config: dict[str, Any]) -> str:
    preset = config.get("experiment_preset") or "cpu"
    if preset not in PRESETS:
        raise ConfigError(f"config error: experiment_preset: {preset!r} is not one of {', '.join(PRESETS)}")
    return preset


# --------------------------------------------------------------------------- grid expansion

def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def axis_points(axis: str, values: Any) -> list[tuple[str, dict[str, Any]]]:
    """[(label, overrides)] of one axis: a variant mapping, or a list of values of the key ``axis``."""
    if isinstance(values, dict):
        return [(label, dict(overrides)) for label, overrides in values.items()]
    points = []
    for value in values:
        if isinstance(value, bool):
            label = axis if value else f"no_{axis}"
        elif isinstance(value, str):
            label = value
        else:
            label = f"{LABEL_PREFIX.get(axis, axis)}{_format_value(value)}"
        points.append((label, {axis: value}))
    labels = [label for label, _ in points]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"config error: grid axis '{axis}' has values with equal labels: {labels}")
    return points


def grid_points(grid: dict[str, Any] | list[dict[str, Any]] | None) -> Iterator[tuple[list[str], dict[str, Any]]]:
    """(labels, overrides) of every point of a grid or of a list of grids (union of products)."""
    grids = grid if isinstance(grid, list) else [grid or {}]
    for one in grids:
        if not one:
            continue
        axes = [axis_points(axis, values) for axis, values in one.items()]
        for combination in itertools.product(*axes):
            labels, overrides = [], {}
            for label, settings in combination:
                labels.append(label)
                overrides.update(settings)
            yield labels, overrides


def expand_experiment(name: str, block: dict[str, Any], preset: str) -> dict[str, dict[str, Any]]:
    """run name → overrides of one experiment under one preset."""
    short = block.get("short", name)
    spec = block.get(preset) or {}
    runs: dict[str, dict[str, Any]] = {}
    for labels, point in grid_points(spec.get("grid")):
        run_name = ".".join([short, *labels])
        if len(run_name) > RUN_NAME_MAX:
            raise ConfigError(f"config error: experiment '{name}': run name '{run_name}' is longer than "
                              f"{RUN_NAME_MAX} characters; use shorter labels")
        overrides = {**(spec.get("base") or {}), **point, "experiment": name}
        if run_name in runs and runs[run_name] != overrides:
            raise ConfigError(f"config error: experiment '{name}': two grid points are both named "
                              f"'{run_name}' but differ in settings; give them different labels")
        runs[run_name] = overrides
    return runs


def expand_experiments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """run name → run overrides for every enabled experiment (``experiment`` set to its name)."""
    blocks, preset = definitions(config), preset_name(config)
    runs: dict[str, dict[str, Any]] = {}
    for name in selected_experiments(config):
        for run_name, overrides in expand_experiment(name, blocks[name], preset).items():
            if run_name in runs:
                raise ConfigError(f"config error: run '{run_name}' is produced by two experiments; "
                                  f"give them different `short` names")
            runs[run_name] = overrides
    clash = sorted(set(runs) & set(config.get("runs") or {}))
    if clash:
        raise ConfigError(f"config error: run name '{clash[0]}' is both in runs and in an experiment")
    return runs


def experiment_evaluations(config: dict[str, Any], run_config: dict[str, Any]) -> list[str] | None:
    """The evaluations of an experiment's run (its block's ``evaluations``, default [val]; they
    replace ``evaluations.enabled``), or None for a run of the ``runs`` block."""
    name = run_config.get("experiment")
    if not name:
        return None
    return list(definitions(config).get(name, {}).get("evaluations", ["val"]))


def study_enabled(config: dict[str, Any], study: str) -> bool:
    """Whether a study outside the run grid runs: switched on in its own block (``icl.enabled``) or
    included by a selected experiment (``experiments: [icl]``)."""
    own = config.get(study)
    return bool(isinstance(own, dict) and own.get("enabled")) or study in experiment_studies(config)


def experiment_studies(config: dict[str, Any]) -> list[str]:
    """Studies outside the run grid (``icl``, ``image_mlp``) that the enabled experiments include."""
    blocks = definitions(config)
    return sorted({s for name in selected_experiments(config) for s in blocks[name].get("studies", [])})


# --------------------------------------------------------------------------- views

@dataclass(frozen=True)
class Part:
    """One SELECT of a view and the (table → columns) it needs; a view unites its available parts."""

    sql: str
    requires: dict[str, tuple[str, ...]]
    absent_reason: str = ""


@dataclass(frozen=True)
class View:
    """A view: its declared output columns (name → DuckDB type), in order, and its parts."""

    columns: dict[str, str]
    parts: tuple[Part, ...]
    description: str = ""
    depends_on: tuple[str, ...] = field(default_factory=tuple)

    def select(self, part: Part) -> str:
        cols = ", ".join(f"CAST({c} AS {t}) AS {c}" for c, t in self.columns.items())
        return f"SELECT {cols} FROM ({part.sql.strip()})"

    def empty(self) -> str:
        cols = ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in self.columns.items())
        return f"SELECT {cols} WHERE false"


VIEWS: Registry[View] = Registry("view")

RUNS_NEED = ("run_id", "name", "status", "experiment")


# -- lipschitz_tradeoff ----------------------------------------------------------------------
VIEWS.register("pareto")(View(
    description="lipschitz_tradeoff: completed runs with a finite certified bound; on_front = no run of the "
                "same optimizer has a bound ≤ and a val accuracy ≥ (one strictly); local_radius = the ε where "
                "the local certificate's certified accuracy is half the clean accuracy (robustness "
                "evaluation's half_certified_epsilon; NULL unless that evaluation ran)",
    columns={"run_id": "VARCHAR", "name": "VARCHAR", "optimizer": "VARCHAR", "weight_constraint": "VARCHAR",
             "sigma_max": "DOUBLE", "lr": "DOUBLE", "lipschitz_bound": "DOUBLE", "val_accuracy": "DOUBLE",
             "val_loss": "DOUBLE", "max_activation": "DOUBLE", "local_radius": "DOUBLE", "on_front": "BOOLEAN"},
    parts=(Part(requires={"runs": RUNS_NEED + ("optimizer", "weight_constraint", "sigma_max", "lr",
                                               "lipschitz_bound", "max_activation", "val_accuracy",
                                               "final_val_accuracy", "val_loss", "final_val_loss"),
                          "evals": ("run_id", "eval", "metric", "value")},
                absent_reason="no lipschitz_tradeoff runs in the database",
                sql="""
        WITH r AS (
            SELECT run_id, name, optimizer, weight_constraint, sigma_max, lr, lipschitz_bound,
                   coalesce(val_accuracy, final_val_accuracy) AS val_accuracy,
                   coalesce(val_loss, final_val_loss) AS val_loss, max_activation,
                   (SELECT max(e.value) FROM evals AS e WHERE e.run_id = runs.run_id AND e.eval = 'robustness'
                      AND e.metric = 'half_certified_epsilon') AS local_radius
            FROM runs
            WHERE experiment = 'lipschitz_tradeoff' AND status = 'completed'
              AND lipschitz_bound IS NOT NULL AND isfinite(lipschitz_bound))
        SELECT r.*, NOT EXISTS (
            SELECT 1 FROM r AS o
            WHERE o.optimizer = r.optimizer AND o.lipschitz_bound <= r.lipschitz_bound
              AND o.val_accuracy >= r.val_accuracy
              AND (o.lipschitz_bound < r.lipschitz_bound OR o.val_accuracy > r.val_accuracy)) AS on_front
        FROM r"""),),
))

# -- lr_transfer -----------------------------------------------------------------------------
VIEWS.register("lr_transfer_runs")(View(
    description="lr_transfer: one row per run; method = parametrization+optimizer, final_loss = val loss "
                "(whole val split when the val evaluation ran), NULL when the run diverged",
    columns={"run_id": "VARCHAR", "name": "VARCHAR", "method": "VARCHAR", "width": "BIGINT", "lr": "DOUBLE",
             "status": "VARCHAR", "final_loss": "DOUBLE"},
    parts=(Part(requires={"runs": RUNS_NEED + ("parametrization", "optimizer", "d_model", "lr",
                                               "val_loss", "final_val_loss")},
                absent_reason="no lr_transfer runs in the database",
                sql="""
        SELECT run_id, name, parametrization || '+' || optimizer AS method, d_model AS width, lr, status,
               CASE WHEN status = 'completed' AND isfinite(coalesce(val_loss, final_val_loss))
                    THEN coalesce(val_loss, final_val_loss) END AS final_loss
        FROM runs WHERE experiment = 'lr_transfer'"""),),
))

VIEWS.register("lr_transfer")(View(
    description="lr_transfer: per method and width the lr of lowest final loss (ties: smaller lr); "
                "drift = max/min of the optimal lr across widths (1 = the optimum transfers)",
    columns={"method": "VARCHAR", "width": "BIGINT", "optimal_lr": "DOUBLE", "best_loss": "DOUBLE",
             "n_lrs": "BIGINT", "at_grid_edge": "BOOLEAN", "n_widths": "BIGINT", "drift": "DOUBLE"},
    depends_on=("lr_transfer_runs",),
    parts=(Part(requires={"lr_transfer_runs": ("method", "width", "lr", "final_loss")},
                absent_reason="no lr_transfer runs in the database",
                sql="""
        WITH ok AS (SELECT * FROM lr_transfer_runs WHERE final_loss IS NOT NULL),
        ranked AS (
            SELECT method, width, lr, final_loss,
                   row_number() OVER (PARTITION BY method, width ORDER BY final_loss, lr) AS rank_in_width,
                   count(*) OVER (PARTITION BY method, width) AS n_lrs,
                   min(lr) OVER (PARTITION BY method, width) AS min_lr,
                   max(lr) OVER (PARTITION BY method, width) AS max_lr
            FROM ok),
        best AS (
            SELECT method, width, lr AS optimal_lr, final_loss AS best_loss, n_lrs,
                   n_lrs > 1 AND (lr = min_lr OR lr = max_lr) AS at_grid_edge
            FROM ranked WHERE rank_in_width = 1)
        SELECT *, count(*) OVER (PARTITION BY method) AS n_widths,
               max(optimal_lr) OVER (PARTITION BY method) / min(optimal_lr) OVER (PARTITION BY method) AS drift
        FROM best"""),),
))

# -- super_consistency -----------------------------------------------------------------------
VIEWS.register("sharpness_curves")(View(
    description="super_consistency: the top Hessian eigenvalue logged during training, per run and step; "
                "preconditioned_sharpness = λ_max(P⁻¹H) with Adam's preconditioner (NULL for other optimizers)",
    columns={"run_id": "VARCHAR", "name": "VARCHAR", "parametrization": "VARCHAR", "depth_mup": "BOOLEAN",
             "optimizer": "VARCHAR", "lr": "DOUBLE", "width": "BIGINT", "depth": "BIGINT", "step": "BIGINT",
             "sharpness": "DOUBLE", "preconditioned_sharpness": "DOUBLE", "loss": "DOUBLE"},
    parts=(Part(requires={"runs": RUNS_NEED + ("parametrization", "depth_mup", "optimizer", "lr", "d_model",
                                               "n_layers"),
                          "train_metrics": ("run_id", "step", "sharpness", "preconditioned_sharpness", "loss")},
                absent_reason="no super_consistency runs with sharpness in the database",
                sql="""
        SELECT r.run_id, r.name, r.parametrization, r.depth_mup, r.optimizer, r.lr, r.d_model AS width,
               r.n_layers AS depth, m.step, m.sharpness, m.preconditioned_sharpness, m.loss
        FROM train_metrics AS m JOIN runs AS r USING (run_id)
        WHERE r.experiment = 'super_consistency' AND m.sharpness IS NOT NULL"""),),
))

VIEWS.register("sharpness_spread")(View(
    description="super_consistency: per step, sharpness across the widths (axis 'width', depth fixed) or "
                "depths (axis 'depth', width fixed) of one parametrization; spread = (max − min)/|mean|, of "
                "the Hessian's λ_max and (preconditioned_spread) of Adam's P⁻¹H",
    columns={"axis": "VARCHAR", "parametrization": "VARCHAR", "depth_mup": "BOOLEAN", "lr": "DOUBLE",
             "fixed_size": "BIGINT", "step": "BIGINT", "n_models": "BIGINT", "min_sharpness": "DOUBLE",
             "max_sharpness": "DOUBLE", "mean_sharpness": "DOUBLE", "spread": "DOUBLE",
             "mean_preconditioned_sharpness": "DOUBLE", "preconditioned_spread": "DOUBLE"},
    depends_on=("sharpness_curves",),
    parts=(Part(requires={"sharpness_curves": ("parametrization", "width", "depth", "step", "sharpness")},
                absent_reason="no super_consistency runs with sharpness in the database",
                sql="""
        WITH groups AS (
            SELECT 'width' AS axis, parametrization, depth_mup, optimizer, lr, depth AS fixed_size, step,
                   count(DISTINCT width) AS n_models, min(sharpness) AS min_sharpness,
                   max(sharpness) AS max_sharpness, avg(sharpness) AS mean_sharpness,
                   min(preconditioned_sharpness) AS min_pre, max(preconditioned_sharpness) AS max_pre,
                   avg(preconditioned_sharpness) AS mean_preconditioned_sharpness
            FROM sharpness_curves GROUP BY parametrization, depth_mup, optimizer, lr, depth, step
            UNION ALL
            SELECT 'depth' AS axis, parametrization, depth_mup, optimizer, lr, width AS fixed_size, step,
                   count(DISTINCT depth), min(sharpness), max(sharpness), avg(sharpness),
                   min(preconditioned_sharpness), max(preconditioned_sharpness), avg(preconditioned_sharpness)
            FROM sharpness_curves GROUP BY parametrization, depth_mup, optimizer, lr, width, step)
        SELECT axis, parametrization, depth_mup, optimizer, lr, fixed_size, step, n_models, min_sharpness,
               max_sharpness, mean_sharpness, (max_sharpness - min_sharpness) / abs(mean_sharpness) AS spread,
               mean_preconditioned_sharpness,
               (max_pre - min_pre) / abs(mean_preconditioned_sharpness) AS preconditioned_spread
        FROM groups WHERE n_models >= 2"""),),
))

# -- icl -------------------------------------------------------------------------------------
VIEWS.register("icl_vs_pgd")(View(
    description="icl: test loss (squared error on the query) of the trained in-context transformer against "
                "optimal L-step preconditioned GD, tuned GD and least squares, per sweep (layers: L varies at "
                "the config's n; n: n varies at the largest L); ratio_to_pgd = model/pgd; agreement of the "
                "model's and PGD's predictions; largest relative error of the learned per-layer step sizes",
    columns={"sweep": "VARCHAR", "n_layers": "BIGINT", "n": "BIGINT", "model_loss": "DOUBLE", "pgd_loss": "DOUBLE",
             "gd_loss": "DOUBLE", "least_squares_loss": "DOUBLE", "ratio_to_pgd": "DOUBLE",
             "prediction_correlation": "DOUBLE", "relative_prediction_mse": "DOUBLE",
             "max_step_size_rel_error": "DOUBLE"},
    parts=(Part(requires={"icl_loss_by_layers": ("method", "n_layers", "n", "loss"),
                          "icl_loss_by_n": ("method", "n_layers", "n", "loss"),
                          "icl_agreement": ("n_layers", "n", "reference", "prediction_correlation",
                                            "relative_prediction_mse"),
                          "icl_step_sizes": ("n_layers", "n", "rel_error")},
                absent_reason="the ICL study did not run (experiments: [icl] or icl.enabled: true)",
                sql="""
        WITH losses AS (
            SELECT 'layers' AS sweep, method, n_layers, n, loss FROM icl_loss_by_layers
            UNION ALL
            SELECT 'n' AS sweep, method, n_layers, n, loss FROM icl_loss_by_n),
        p AS (
            SELECT sweep, n_layers, n,
                   avg(loss) FILTER (WHERE method = 'transformer') AS model_loss,
                   avg(loss) FILTER (WHERE method = 'pgd') AS pgd_loss,
                   avg(loss) FILTER (WHERE method = 'gd') AS gd_loss,
                   avg(loss) FILTER (WHERE method = 'least_squares') AS least_squares_loss
            FROM losses GROUP BY sweep, n_layers, n),
        a AS (SELECT n_layers, n, avg(prediction_correlation) AS prediction_correlation,
                     avg(relative_prediction_mse) AS relative_prediction_mse
              FROM icl_agreement WHERE reference = 'pgd' GROUP BY n_layers, n),
        s AS (SELECT n_layers, n, max(rel_error) AS max_step_size_rel_error FROM icl_step_sizes GROUP BY n_layers, n)
        SELECT p.*, p.model_loss / p.pgd_loss AS ratio_to_pgd, a.prediction_correlation, a.relative_prediction_mse,
               s.max_step_size_rel_error
        FROM p LEFT JOIN a USING (n_layers, n) LEFT JOIN s USING (n_layers, n)"""),),
))

# -- rank_vs_n -------------------------------------------------------------------------------
VIEWS.register("rank_bound")(View(
    description="rank_vs_n: per run, n = training tokens / context (disjoint sequences); measured gap = "
                "val loss − mean training loss over the last 10% of steps (nats/token); b3_bound = the rank "
                "evaluation's B3 Rademacher term rescaled to n (it is exactly ∝ 1/√n); qk_rank = mean "
                "numerical rank (rtol 1e-2) of W_Q W_Kᵀ over layers and heads; gap_slope and bound_slope = "
                "least-squares slopes of ln(value) on ln(n) over the runs with the same n_heads",
    columns={"run_id": "VARCHAR", "name": "VARCHAR", "n_heads": "BIGINT", "d_head": "BIGINT",
             "n_tokens": "BIGINT", "n": "DOUBLE", "measured_gap": "DOUBLE", "eval_gap": "DOUBLE",
             "qk_rank": "DOUBLE", "qk_stable_rank": "DOUBLE", "b3_bound": "DOUBLE",
             "edelman_norm_proxy": "DOUBLE", "spectrum_adaptive_proxy": "DOUBLE",
             "gap_slope": "DOUBLE", "bound_slope": "DOUBLE"},
    parts=(Part(requires={"runs": RUNS_NEED + ("n_heads", "d_model", "context", "steps", "train_tokens",
                                               "val_loss", "final_val_loss"),
                          "train_metrics": ("run_id", "step", "loss"),
                          "shards": ("split", "tokens"),
                          "evals": ("run_id", "eval", "metric", "value", "matrix", "rtol", "n")},
                absent_reason="no rank_vs_n runs with the rank evaluation in the database",
                sql="""
        WITH r AS (
            SELECT run_id, name, n_heads, d_model // n_heads AS d_head, steps,
                   coalesce(val_loss, final_val_loss) AS val_loss,
                   coalesce(CAST(train_tokens AS BIGINT),
                            (SELECT CAST(sum(tokens) AS BIGINT) FROM shards WHERE split = 'train')) AS n_tokens,
                   context
            FROM runs WHERE experiment = 'rank_vs_n' AND status = 'completed'),
        train_end AS (
            SELECT m.run_id, avg(m.loss) AS train_loss
            FROM train_metrics AS m JOIN r USING (run_id)
            WHERE m.step > 0.9 * r.steps GROUP BY m.run_id),
        e AS (
            SELECT run_id,
                   max(value) FILTER (WHERE metric = 'generalization_gap') AS eval_gap,
                   max(value) FILTER (WHERE metric = 'b3_rademacher_sum') AS b3_eval,
                   max(n) FILTER (WHERE metric = 'b3_rademacher_sum') AS n_eval,
                   max(value) FILTER (WHERE metric = 'edelman_norm_proxy') AS edelman_norm_proxy,
                   max(value) FILTER (WHERE metric = 'spectrum_adaptive_proxy') AS spectrum_adaptive_proxy,
                   avg(value) FILTER (WHERE metric = 'numerical_rank' AND matrix = 'qk'
                                      AND abs(rtol - 0.01) < 1e-12) AS qk_rank,
                   avg(value) FILTER (WHERE metric = 'stable_rank' AND matrix = 'qk') AS qk_stable_rank
            FROM evals WHERE eval = 'rank' GROUP BY run_id),
        j AS (
            SELECT r.run_id, r.name, r.n_heads, r.d_head, r.n_tokens, r.n_tokens / r.context AS n,
                   r.val_loss - t.train_loss AS measured_gap, e.eval_gap, e.qk_rank, e.qk_stable_rank,
                   e.b3_eval * sqrt(e.n_eval / (r.n_tokens / r.context)) AS b3_bound,
                   e.edelman_norm_proxy, e.spectrum_adaptive_proxy
            FROM r JOIN train_end AS t USING (run_id) JOIN e USING (run_id)),
        slopes AS (
            SELECT n_heads,
                   regr_slope(ln(measured_gap), ln(n)) FILTER (WHERE measured_gap > 0) AS gap_slope,
                   regr_slope(ln(b3_bound), ln(n)) FILTER (WHERE b3_bound > 0) AS bound_slope
            FROM j GROUP BY n_heads)
        SELECT j.*, slopes.gap_slope, slopes.bound_slope FROM j JOIN slopes USING (n_heads)"""),),
))

# -- robustness ------------------------------------------------------------------------------
_ROBUST_METRICS = "('clean_accuracy', 'certified_accuracy', 'robust_accuracy', 'robust_loss', " \
                  "'robust_true_class_probability', 'lipschitz_lower_bound', 'certified_accuracy_local', " \
                  "'certified_radius_local_median', 'half_certified_epsilon', 'tightness_global', " \
                  "'tightness_local', 'within_100x_local')"
VIEWS.register("robustness")(View(
    description="robustness: long form, one row per model, metric, attack and ε (ℓ2 radius in the input "
                "space: token embeddings for the LM, [0,1] pixels for the digits MLP) or k (substituted "
                "tokens); domain = lm | image_mlp; label = the model's variant; certificate_l2 = its ℓ2 bound; "
                "the local certificate's rows (certified_accuracy_local, tightness_global/local = median "
                "PGD margin fall / certified fall, attack pgd or pgd_half_certified) where the model has one",
    columns={"domain": "VARCHAR", "label": "VARCHAR", "run_id": "VARCHAR", "model": "VARCHAR",
             "optimizer": "VARCHAR", "weight_constraint": "VARCHAR", "certificate_l2": "DOUBLE",
             "metric": "VARCHAR", "attack": "VARCHAR", "epsilon": "DOUBLE", "k": "BIGINT", "value": "DOUBLE"},
    parts=(
        Part(requires={"runs": RUNS_NEED + ("model", "optimizer", "weight_constraint"),
                       "evals": ("run_id", "eval", "metric", "value", "epsilon", "attack", "k")},
             absent_reason="no robustness runs with the robustness evaluation in the database",
             sql=f"""
        SELECT 'lm' AS domain, substr(r.name, strpos(r.name, '.') + 1) AS label, r.run_id, r.model,
               r.optimizer, r.weight_constraint, c.certificate_l2, e.metric,
               CASE WHEN e.metric IN ('robust_accuracy', 'robust_loss', 'tightness_global', 'tightness_local',
                                      'within_100x_local') THEN e.attack END AS attack,
               e.epsilon, e.k, e.value
        FROM evals AS e JOIN runs AS r USING (run_id)
        LEFT JOIN (SELECT run_id, max(value) AS certificate_l2 FROM evals
                   WHERE eval = 'robustness' AND metric = 'certificate_l2' GROUP BY run_id) AS c USING (run_id)
        WHERE e.eval = 'robustness' AND r.experiment = 'robustness'
          AND e.metric IN {_ROBUST_METRICS} AND (e.metric <> 'lipschitz_lower_bound' OR e.attack = 'all')"""),
        Part(requires={"image_mlp_robustness": ("method", "metric", "value", "epsilon")},
             absent_reason="table image_mlp_robustness is absent (results/image_mlp/robustness.parquet "
                           "was not made)",
             sql=f"""
        SELECT 'image_mlp' AS domain, i.method AS label, NULL AS run_id, 'mlp' AS model,
               split_part(i.method, '_', 1) AS optimizer, NULL AS weight_constraint, c.certificate_l2, i.metric,
               CASE WHEN i.metric LIKE 'robust%' THEN 'pgd' END AS attack, i.epsilon, NULL AS k, i.value
        FROM image_mlp_robustness AS i
        LEFT JOIN (SELECT method, max(value) AS certificate_l2 FROM image_mlp_robustness
                   WHERE metric = 'certificate_l2' GROUP BY method) AS c USING (method)
        WHERE i.metric IN {_ROBUST_METRICS}"""),
    ),
))

# -- precision -------------------------------------------------------------------------------
# The precision experiment's precision-evaluation rows, the first CTE of its two views.
PRECISION_EVALS = """
        WITH e AS (
            SELECT e.* FROM evals AS e JOIN runs AS r USING (run_id)
            WHERE e.eval = 'precision' AND r.experiment = 'precision'),"""

VIEWS.register("precision")(View(
    description="precision: per model, number format and scaling, val loss and next-token accuracy and their "
                "deltas vs fp32, overflowed/saturated activation counts, and the fp8 safety verdicts "
                "(proven from the Lipschitz analysis, and observed on the val windows)",
    columns={"domain": "VARCHAR", "label": "VARCHAR", "run_id": "VARCHAR", "model": "VARCHAR",
             "optimizer": "VARCHAR", "weight_constraint": "VARCHAR", "max_activation": "DOUBLE",
             "format": "VARCHAR", "scaling": "VARCHAR", "val_loss": "DOUBLE", "accuracy": "DOUBLE",
             "val_loss_delta": "DOUBLE", "accuracy_delta": "DOUBLE", "activation_overflow": "DOUBLE",
             "activation_saturated": "DOUBLE", "weight_saturated": "DOUBLE", "fp8_safe_proven": "DOUBLE",
             "fp8_safe_observed": "DOUBLE", "real_fp8_accuracy": "DOUBLE", "simulated_fp8_accuracy": "DOUBLE"},
    parts=(Part(requires={"runs": RUNS_NEED + ("model", "optimizer", "weight_constraint", "max_activation"),
                          "evals": ("run_id", "eval", "metric", "value", "format", "scaling")},
                absent_reason="no precision runs with the precision evaluation in the database",
                sql=PRECISION_EVALS + """
        cells AS (
            SELECT run_id, format, scaling,
                   max(value) FILTER (WHERE metric = 'val_loss') AS val_loss,
                   max(value) FILTER (WHERE metric = 'accuracy') AS accuracy,
                   max(value) FILTER (WHERE metric = 'val_loss_delta') AS val_loss_delta,
                   max(value) FILTER (WHERE metric = 'accuracy_delta') AS accuracy_delta,
                   max(value) FILTER (WHERE metric = 'activation_overflow') AS activation_overflow,
                   max(value) FILTER (WHERE metric = 'activation_saturated') AS activation_saturated,
                   max(value) FILTER (WHERE metric = 'weight_saturated') AS weight_saturated,
                   max(value) FILTER (WHERE metric = 'real_fp8_accuracy') AS real_fp8_accuracy,
                   max(value) FILTER (WHERE metric = 'simulated_fp8_accuracy') AS simulated_fp8_accuracy
            FROM e WHERE metric IN ('val_loss', 'accuracy', 'val_loss_delta', 'accuracy_delta',
                                    'activation_overflow', 'activation_saturated', 'weight_saturated',
                                    'real_fp8_accuracy', 'simulated_fp8_accuracy')
            GROUP BY run_id, format, scaling),
        safety AS (
            SELECT run_id, format,
                   max(value) FILTER (WHERE metric = 'fp8_safe_proven') AS fp8_safe_proven,
                   max(value) FILTER (WHERE metric = 'fp8_safe_observed') AS fp8_safe_observed
            FROM e WHERE metric IN ('fp8_safe_proven', 'fp8_safe_observed') GROUP BY run_id, format)
        SELECT 'lm' AS domain, substr(r.name, strpos(r.name, '.') + 1) AS label, r.run_id, r.model, r.optimizer,
               r.weight_constraint, r.max_activation, c.format, c.scaling, c.val_loss, c.accuracy,
               c.val_loss_delta, c.accuracy_delta, c.activation_overflow, c.activation_saturated,
               c.weight_saturated, s.fp8_safe_proven, s.fp8_safe_observed, c.real_fp8_accuracy,
               c.simulated_fp8_accuracy
        FROM cells AS c JOIN runs AS r USING (run_id) LEFT JOIN safety AS s USING (run_id, format)"""),),
))

VIEWS.register("precision_bounds")(View(
    description="precision: per run, fp32 accuracy, the proven max |activation| (analytic bound over the observed "
                "tensors), the observed max on the val windows and their ratio, the unscaled-format safety "
                "verdicts (1 proven, 0 not, NaN: no analytic bound); each lipschitz_gpt run is matched with the "
                "lipschitz_gpt run of the other kind (weight-constrained or not) of the closest accuracy",
    columns={"label": "VARCHAR", "run_id": "VARCHAR", "model": "VARCHAR", "optimizer": "VARCHAR",
             "weight_constraint": "VARCHAR", "steps": "BIGINT", "accuracy": "DOUBLE",
             "proven_max_activation": "DOUBLE", "observed_max_activation": "DOUBLE",
             "proven_over_observed": "DOUBLE", "analytic_activation_bound": "DOUBLE",
             "e4m3_proven_safe": "DOUBLE", "e4m3_observed_safe": "DOUBLE", "e5m2_proven_safe": "DOUBLE",
             "fp16_proven_safe": "DOUBLE", "matched_label": "VARCHAR", "matched_accuracy": "DOUBLE",
             "matched_proven_max_activation": "DOUBLE", "matched_observed_max_activation": "DOUBLE",
             "matched_proven_over_observed": "DOUBLE"},
    parts=(Part(requires={"runs": RUNS_NEED + ("model", "optimizer", "weight_constraint", "steps"),
                          "evals": ("run_id", "eval", "metric", "value", "format")},
                absent_reason="no precision runs with the precision evaluation in the database",
                sql=PRECISION_EVALS + """
        per_run AS (
            SELECT run_id,
                   max(value) FILTER (WHERE metric = 'accuracy' AND format = 'fp32') AS accuracy,
                   max(value) FILTER (WHERE metric = 'proven_max_activation') AS proven_max_activation,
                   max(value) FILTER (WHERE metric = 'observed_max_activation') AS observed_max_activation,
                   max(value) FILTER (WHERE metric = 'proven_over_observed') AS proven_over_observed,
                   max(value) FILTER (WHERE metric = 'analytic_activation_bound') AS analytic_activation_bound,
                   max(value) FILTER (WHERE metric = 'fp8_safe_proven' AND format = 'fp8_e4m3') AS e4m3_proven_safe,
                   max(value) FILTER (WHERE metric = 'fp8_safe_observed' AND format = 'fp8_e4m3')
                       AS e4m3_observed_safe,
                   max(value) FILTER (WHERE metric = 'fp8_safe_proven' AND format = 'fp8_e5m2') AS e5m2_proven_safe,
                   max(value) FILTER (WHERE metric = 'fp8_safe_proven' AND format = 'fp16') AS fp16_proven_safe
            FROM e GROUP BY run_id),
        runs_ AS (
            SELECT p.*, substr(r.name, strpos(r.name, '.') + 1) AS label, r.model, r.optimizer,
                   r.weight_constraint, r.steps, r.weight_constraint <> 'none' AS constrained
            FROM per_run AS p JOIN runs AS r USING (run_id)),
        matches AS (
            SELECT a.run_id, b.label AS matched_label, b.accuracy AS matched_accuracy,
                   b.proven_max_activation AS matched_proven_max_activation,
                   b.observed_max_activation AS matched_observed_max_activation,
                   b.proven_over_observed AS matched_proven_over_observed,
                   row_number() OVER (PARTITION BY a.run_id ORDER BY abs(a.accuracy - b.accuracy), b.label) AS rank
            FROM runs_ AS a JOIN runs_ AS b ON a.model = 'lipschitz_gpt' AND b.model = 'lipschitz_gpt'
                                             AND a.constrained <> b.constrained)
        SELECT r.label, r.run_id, r.model, r.optimizer, r.weight_constraint, r.steps, r.accuracy,
               r.proven_max_activation, r.observed_max_activation, r.proven_over_observed,
               r.analytic_activation_bound, r.e4m3_proven_safe, r.e4m3_observed_safe, r.e5m2_proven_safe,
               r.fp16_proven_safe, m.matched_label, m.matched_accuracy, m.matched_proven_max_activation,
               m.matched_observed_max_activation, m.matched_proven_over_observed
        FROM runs_ AS r LEFT JOIN matches AS m ON m.run_id = r.run_id AND m.rank = 1"""),),
))

# Which views are an experiment's (the first is its headline table), for figures and the report.
EXPERIMENT_VIEWS: dict[str, tuple[str, ...]] = {
    "lipschitz_tradeoff": ("pareto",),
    "lr_transfer": ("lr_transfer", "lr_transfer_runs"),
    "super_consistency": ("sharpness_spread", "sharpness_curves"),
    "icl": ("icl_vs_pgd",),
    "rank_vs_n": ("rank_bound",),
    "robustness": ("robustness",),
    "precision": ("precision", "precision_bounds"),
}

# The figures lipflow.plots draws for each experiment (results/figures/<name>.png and .svg); the ICL
# study draws its own (results/figures/icl_loss_vs_layers, icl_loss_vs_n: workflow/rules/icl.smk).
EXPERIMENT_FIGURES: dict[str, tuple[str, ...]] = {
    "lipschitz_tradeoff": ("tradeoff_accuracy", "tradeoff_activation"),
    "lr_transfer": ("lr_transfer",),
    "super_consistency": ("sharpness",),
    "icl": (),
    "rank_vs_n": ("rank_vs_n",),
    "robustness": ("robustness",),
    "precision": ("precision",),
}

# Parquet files of studies outside the run grid, loaded as tables when present: name → path under results/.
EXTRA_TABLES = {"image_mlp_robustness": Path("image_mlp") / "robustness.parquet"}


def _columns(con) -> dict[str, set[str]]:
    rows = con.execute("SELECT table_name, column_name FROM information_schema.columns").fetchall()
    found: dict[str, set[str]] = {}
    for table, column in rows:
        found.setdefault(table, set()).add(column)
    return found


def missing_requirement(con, part: Part) -> str | None:
    """Why ``part`` cannot be built on ``con`` (a missing table or column), or None."""
    present = _columns(con)
    for table, needed in part.requires.items():
        if table not in present:
            return f"table {table} is absent"
        lacking = [c for c in needed if c not in present[table]]
        if lacking:
            return f"{table} has no column {', '.join(lacking)}"
    return None


def load_extra_tables(con, results: Path = Path("results")) -> list[str]:
    """Create a table per present EXTRA_TABLES parquet file, checked against its sidecar; returns
    the tables made."""
    from lipflow.metrics import read_table_parquet

    made = []
    for table, relative in EXTRA_TABLES.items():
        path = Path(results) / relative
        if path.is_file():
            con.register("_lipflow_extra", read_table_parquet(path))
            con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM _lipflow_extra")
            con.unregister("_lipflow_extra")
            made.append(table)
    return made


def create_views(con, results: Path = Path("results"), log=sys.stderr) -> dict[str, str]:
    """Create every view of VIEWS on ``con``; returns view → '' (built) or the reason it is empty.

    A view unites those of its parts whose tables and columns exist and that select at least one
    row; with none, it is created empty (same columns) and commented 'empty: <reason>'.
    """
    load_extra_tables(con, results)
    status = {}
    for name in view_order():
        view = VIEWS.get(name)
        selects, reasons = [], []
        for part in view.parts:
            missing = missing_requirement(con, part)
            if missing is None:
                sql = view.select(part)
                if con.execute(f"SELECT count(*) FROM ({sql})").fetchall()[0][0]:
                    selects.append(sql)
                    continue
            detail = f" ({missing})" if missing and missing not in part.absent_reason else ""
            reasons.append(part.absent_reason + detail)
        body = " UNION ALL ".join(selects) if selects else view.empty()
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
        comment = view.description if selects else f"empty: {'; '.join(reasons)}"
        con.execute(f"COMMENT ON VIEW {name} IS '{_sql_string(comment)}'")
        status[name] = "" if selects else comment
        print(f"view {name}: {'built' if selects else comment}", file=log)
    return status


def view_order() -> list[str]:
    """View names with every view after the views it reads (``depends_on``)."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name not in ordered:
            for dependency in VIEWS.get(name).depends_on:
                visit(dependency)
            ordered.append(name)

    for name in VIEWS.names():
        visit(name)
    return ordered


def _sql_string(text: str) -> str:
    return text.replace("'", "''")
