"""Grid expansion: one experiment block and a preset → run name → run overrides.

A preset gives ``base`` run settings and a ``grid``. A grid maps axis → values; its runs are the
cartesian product of the axes in order, and a list of grids is the union of their products
(scikit-learn's ParameterGrid semantics). An axis is either a list of values of the run key it names
(label ``<prefix><value>``, e.g. ``s2`` for sigma_max = 2, the value itself for strings, and the
axis name or ``no_<axis>`` for booleans) or a
mapping label → overrides (a variant axis setting several keys at once). A run is named
``<short>.<label>.<label>…`` and its overrides are base ← grid point ← ``experiment: <name>``.
Nothing here imports torch: it runs at Snakefile parse time.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Iterator

from lipflow.config import ConfigError

RUN_NAME_MAX = 64  # run names match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ (config.schema.yaml $defs/name)

# Short label prefixes of scalar axes (sigma_max = 2 → "s2"); other keys use their own name.
LABEL_PREFIX = {"sigma_max": "s", "lr": "lr", "d_model": "w", "n_layers": "L", "n_heads": "h",
                "train_tokens": "n", "weight_decay": "wd", "steps": "T", "seed": "seed",
                "batch_size": "B", "context": "ctx"}


def merge_block(builtin: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``builtin``: mappings merge key by key, except ``grid`` and lists (replaced)."""
    merged = copy.deepcopy(builtin)
    for key, value in override.items():
        if key != "grid" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_block(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


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


def check_disjoint_axes(names: list[str], axes: list[list[tuple[str, dict[str, Any]]]], where: str = "grid") -> None:
    """Each run key is set by one axis of a grid at most: the product meets every point of one axis with
    every point of another, so two axes setting the same key would make the later one win silently and
    the run's name (which carries both labels, e.g. ``lr0.01``) would misstate what it trains."""
    owner: dict[str, str] = {}
    for name, points in zip(names, axes):
        keys = {key for _, overrides in points for key in overrides}
        for key in sorted(keys):
            if key in owner:
                raise ConfigError(f"config error: {where}: axes '{owner[key]}' and '{name}' both set run key '{key}'; "
                                  "set each key in one axis of a grid (or in `base`)")
        owner.update(dict.fromkeys(keys, name))


def grid_points(grid: dict[str, Any] | list[dict[str, Any]],
                where: str = "grid") -> Iterator[tuple[list[str], dict[str, Any]]]:
    """(labels, overrides) of every point of a grid or of a list of grids (union of products)."""
    grids = grid if isinstance(grid, list) else [grid]
    for one in grids:
        if not one:
            continue
        axes = [axis_points(axis, values) for axis, values in one.items()]
        check_disjoint_axes(list(one), axes, where)
        for combination in itertools.product(*axes):
            labels, overrides = [], {}
            for label, settings in combination:
                labels.append(label)
                overrides.update(settings)
            yield labels, overrides


def check_label_axis(name: str, preset: str, label_axis: str | None, grid: dict[str, Any] | list[dict[str, Any]]) -> None:
    """An experiment whose views read a run's label on ``label_axis`` from its name (``<short>.<label>.…``)
    needs that axis first in every grid: another axis first would put its labels there, and the views
    would group the runs by them without a word."""
    for index, one in enumerate(grid if isinstance(grid, list) else [grid]):
        if label_axis is not None and one and next(iter(one)) != label_axis:
            where = f"grid[{index}]" if isinstance(grid, list) else "grid"
            raise ConfigError(f"config error: experiment_definitions.{name}.{preset}.{where}: its first axis is "
                              f"'{next(iter(one))}', but this experiment's views read the '{label_axis}' label from "
                              f"the run names: put '{label_axis}' first")


def expand_experiment(name: str, block: dict[str, Any], preset: str) -> dict[str, dict[str, Any]]:
    """run name → overrides of one experiment under one preset (a block filled by
    :func:`lipflow.experiments.definitions`)."""
    short, spec = block["short"], block[preset]
    if "experiment" in spec["base"]:
        raise ConfigError(f"config error: experiment_definitions.{name}.{preset}.base.experiment: set by experiment "
                          "expansion (each run gets its experiment's name), not in a block")
    check_label_axis(name, preset, block.get("label_axis"), spec["grid"])
    runs: dict[str, dict[str, Any]] = {}
    for labels, point in grid_points(spec["grid"], f"experiment_definitions.{name}.{preset}.grid"):
        run_name = ".".join([short, *labels])
        if len(run_name) > RUN_NAME_MAX:
            raise ConfigError(f"config error: experiment '{name}': run name '{run_name}' is longer than "
                              f"{RUN_NAME_MAX} characters; use shorter labels")
        if "experiment" in point:
            raise ConfigError(f"config error: experiment_definitions.{name}.{preset}.grid: run '{run_name}' sets "
                              "experiment, which experiment expansion sets (each run gets its experiment's name)")
        overrides = {**spec["base"], **point, "experiment": name}
        if run_name in runs and runs[run_name] != overrides:
            raise ConfigError(f"config error: experiment '{name}': two grid points are both named "
                              f"'{run_name}' but differ in settings; give them different labels")
        runs[run_name] = overrides
    return runs
