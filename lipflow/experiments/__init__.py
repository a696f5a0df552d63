"""Experiments: one Python file and one YAML file each, in this package.

An experiment ``<name>`` is ``lipflow/experiments/<name>.py`` and ``<name>.yaml`` beside it; every
module of the package with a YAML file of its name is one (found by :func:`discover`, so adding an
experiment edits no other file).

- ``<name>.yaml``: its block (checked against ``$defs/experiment`` of
  workflow/schemas/experiments.schema.yaml): ``short`` run-name prefix, ``description``, the
  ``evaluations`` of its runs (instead of ``evaluations.enabled``), the ``studies`` outside the run
  grid it includes (``icl``, ``image_mlp``), per preset (cpu | paper) ``base`` run settings and a
  ``grid`` (expanded by :mod:`lipflow.experiments.grid`), and for its views ``label_axis`` (the first
  grid axis, whose label they read from a run's name) and ``point_keys`` (:func:`check_view_points`),
  which only this file sets (:data:`VIEW_KEYS`).
- ``<name>.py``: ``VIEWS``, view name → :class:`lipflow.results.views.View` (DuckDB SQL over the
  results tables, headline view first; each is also written as results/tables/<view>.csv), and
  ``FIGURES``, figure name → :class:`lipflow.results.plotting.Figure` (a function of a DuckDB
  connection returning a matplotlib figure, saved as results/figures/<name>.png and .svg); each
  names its caption file in workflow/report for the Snakemake report.

``experiments: [name…]`` selects experiments; a block under ``experiment_definitions`` in the config
is merged over the built-in one of the same name (mappings key by key, ``grid`` and lists replaced
whole); ``experiment_preset`` picks the preset. ``lipflow.plan.resolve_runs`` merges each run's
overrides over ``defaults`` and validates it like any run. Nothing here imports torch or matplotlib:
it runs at Snakefile parse time.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import json
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator

import yaml

from lipflow.config import ConfigError
from lipflow.config.schema import EXPERIMENTS_SCHEMA, first_error, load_schema, make_validator
from lipflow.experiments.grid import axis_points, expand_experiment, merge_block
from lipflow.registry import Registry
from lipflow.results import views as _views
from lipflow.results.plotting import Figure
from lipflow.results.views import View

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when installed: parsed at every parse


@dataclass(frozen=True)
class Experiment:
    """One experiment: its YAML block, its views (headline first) and its figures."""

    name: str
    block: dict[str, Any]
    views: dict[str, View]
    figures: dict[str, Figure]


def discover(path: list[str], package: str) -> dict[str, Experiment]:
    """name → Experiment for every module of ``package`` (found on ``path``) with a YAML file of
    its name beside it, in name order; a malformed YAML file, or a module without ``VIEWS`` and
    ``FIGURES``, is a one-line ConfigError naming the file."""
    found = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda info: info.name):
        block_file = Path(info.module_finder.path) / f"{info.name}.yaml"
        if not block_file.is_file():
            continue
        try:
            block = yaml.load(block_file.read_text(encoding="utf-8"), Loader=YAML_LOADER)
        except yaml.YAMLError as err:
            raise ConfigError(f"{block_file}: malformed YAML: {str(err).splitlines()[0]}") from None
        module = importlib.import_module(f"{package}.{info.name}")
        lacking = [name for name in ("VIEWS", "FIGURES") if not hasattr(module, name)]
        if lacking or not isinstance(block, dict):
            what = f"defines no {' or '.join(lacking)}" if lacking else f"{block_file.name} is not a mapping"
            raise ConfigError(f"experiment {info.name} ({module.__file__}): {what}")
        found[info.name] = Experiment(info.name, block, module.VIEWS, module.FIGURES)
    return found


CATALOG: dict[str, Experiment] = discover(__path__, __name__)

VIEWS: Registry[View] = Registry("view")
for _experiment in CATALOG.values():
    for _name, _view in _experiment.views.items():
        VIEWS.register(_name)(_view)
_views.check_column_types({name: VIEWS.get(name) for name in VIEWS.names()})

# Which views are an experiment's (the first is its headline table), and the figures it draws.
EXPERIMENT_VIEWS: dict[str, tuple[str, ...]] = {name: tuple(e.views) for name, e in CATALOG.items()}
EXPERIMENT_FIGURES: dict[str, tuple[str, ...]] = {name: tuple(e.figures) for name, e in CATALOG.items()}


def builtin_definitions() -> dict[str, dict[str, Any]]:
    """name → block of every experiment's YAML file."""
    return {name: experiment.block for name, experiment in CATALOG.items()}


def create_views(con, log=None) -> dict[str, str]:
    """Create every experiment's views on ``con`` (:func:`lipflow.results.views.create_views`);
    returns view → '' (built) or the reason it is empty."""
    return _views.create_views(con, {name: VIEWS.get(name) for name in VIEWS.names()}, log)


# --------------------------------------------------------------------------- the config's experiments

def definitions(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every experiment block of a validated ``config``: the built-in ones with the config's blocks
    merged over, each then filled with the defaults of ``$defs/merged_experiment``
    (workflow/schemas/experiments.schema.yaml: a block that names no ``evaluations`` runs [val])."""
    blocks = copy.deepcopy(builtin_definitions())
    for name, block in config["experiment_definitions"].items():
        for key in VIEW_KEYS:
            if key in block and name not in blocks:  # a block of the config's own: no module, no views
                raise ConfigError(f"config error: experiment_definitions.{name}.{key}: describes how an experiment's "
                                  f"views group its runs, and '{name}' has none (no lipflow/experiments/{name}.py); "
                                  f"leave {key} out")
            if key in block and as_set(block[key]) != as_set(blocks.get(name, {}).get(key)):  # point_keys: a set
                raise ConfigError(f"config error: experiment_definitions.{name}.{key}: set by the experiment's own "
                                  f"YAML file, for its views, which group the runs by it; a config's block cannot "
                                  f"change it")
        blocks[name] = merge_block(blocks.get(name, {}), block)
    return {name: fill_block(name, block) for name, block in blocks.items()}


# keys of an experiment block that describe how its views group the runs: only its own YAML file sets them
VIEW_KEYS = ("label_axis", "point_keys")


def as_set(value: Any) -> Any:
    """A list as the set of its items (``point_keys`` restated in another order is the same), else itself."""
    return frozenset(value) if isinstance(value, list) else value


def grouped_runs(blocks: Blocks, runs: dict[str, dict[str, Any]]
                 ) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], str]]:
    """(name, config, block, label) of each of ``runs`` whose experiment's views group runs (its block has
    ``point_keys``), by name; the label is the run's on the block's ``label_axis`` (its name's second part),
    or '' where the views read none."""
    for name, cfg in sorted(runs.items()):
        block = blocks.get(cfg.get("experiment") or "", {})
        if "point_keys" in block:
            yield name, cfg, block, name.split(".")[1] if block.get("label_axis") else ""


def key_values(cfg: dict[str, Any], keys: Iterable[str]) -> tuple[str, ...]:
    """The values of ``keys`` in ``cfg`` as comparable text (a mapping's or a list's too)."""
    return tuple(json.dumps(cfg.get(key), sort_keys=True) for key in keys)


def differing_keys(a: dict[str, Any], b: dict[str, Any], ignored: Collection[str] = ()) -> list[str]:
    """The keys, sorted, whose values differ between run configs ``a`` and ``b``, but for ``ignored``."""
    return sorted(key for key in a.keys() | b.keys() if key not in ignored and a.get(key) != b.get(key))


def check_view_points(blocks: Blocks, runs: dict[str, dict[str, Any]]) -> None:
    """Two runs of one experiment that its views take for one point (one label on ``label_axis`` and equal
    ``point_keys``) but that differ in another key would be averaged (lr_transfer's mean over seeds) or pooled
    (rank_vs_n's one slope per n_heads) as if they were seeds: refused in one line naming both runs and the
    keys they differ in; so are two of equal settings (one run under two names, from grids of a list that
    overlap), which would train twice and weigh the point twice (rank_vs_n's slope). ``runs``: run name →
    resolved run config (schema defaults filled)."""
    points: dict[tuple[str, ...], str] = {}
    for name, cfg, block, label in grouped_runs(blocks, runs):
        first = points.setdefault((cfg["experiment"], label, *key_values(cfg, block["point_keys"])), name)
        differing = differing_keys(cfg, runs[first])
        if first != name and differing:
            by = ", ".join(([block["label_axis"]] if label else []) + list(block["point_keys"]))
            fix = (f"give each value of {differing[0]} a label of its own on the '{block['label_axis']}' axis, or "
                   f"set it in base" if label else f"set {differing[0]} in base, one value per experiment")
            raise ConfigError(f"config error: experiment '{cfg['experiment']}': runs '{first}' and '{name}' differ "
                              f"in {', '.join(differing)}, but its views group runs by {by} alone and would "
                              f"average or pool the two; {fix}")
        if first != name:  # one run under two names (grids of a list that overlap, their axes in another order)
            raise ConfigError(f"config error: experiment '{cfg['experiment']}': runs '{first}' and '{name}' have equal "
                              f"settings, one run under two names (grids of the list that overlap): it would train "
                              f"twice and its views would count the point twice; give it one grid point")
    check_one_setting_per_label(blocks, runs)


# the point key whose runs every experiment's views average or pool (lr_transfer's and super_consistency's mean
# over seeds, rank_vs_n's one slope over them): its runs are one setting, so no key goes with it
POOLED_KEY = "seed"


def tied_keys(block: dict[str, Any]) -> dict[str, set[str]]:
    """Run key → the point keys it goes with: the keys an axis of the experiment's grids (any preset; the label
    axis aside, whose variants are the settings themselves) sets together with point keys (``n_heads`` beside
    ``d_model`` in a width axis), which vary with those, one value per value of them; not with ``seed``
    (:data:`POOLED_KEY`), whose runs the views average as one setting."""
    tied: dict[str, set[str]] = {}
    for preset in PRESETS:
        grid = block[preset]["grid"]  # a block of definitions(): each preset filled, with a grid
        for one in grid if isinstance(grid, list) else [grid]:
            for axis, values in one.items():
                axis_keys = {key for _, overrides in axis_points(axis, values) for key in overrides}
                with_point = axis_keys & (set(block["point_keys"]) - {POOLED_KEY})
                if axis != block.get("label_axis") and with_point:
                    for key in axis_keys - set(block["point_keys"]):
                        tied.setdefault(key, set()).update(with_point)
    return tied


def check_one_setting_per_label(blocks: Blocks, runs: dict[str, dict[str, Any]]) -> None:
    """The runs of one label (lr_transfer's method, super_consistency's setting; rank_vs_n's runs, which have
    none, are one) are one line, slope or spread of the views across their points: two of them that differ in a
    key no axis of those points sets (a label defined twice in a list of grids, AdamW at one width and Muon at
    another; a beta2 or lr axis written with one value per grid), or in a key tied to a point key at one value
    of it (n_heads 2 and 4 at d_model 32), would be drawn and compared as one setting: refused in one line
    naming both runs and the key."""
    labels: dict[tuple[str, str], str] = {}
    tied_points: dict[tuple[str, ...], str] = {}
    tied_of: dict[str, dict[str, set[str]]] = {}
    for name, cfg, block, label in grouped_runs(blocks, runs):
        of = f"of label '{label}' on the '{block['label_axis']}' axis " if label else ""
        first = labels.setdefault((cfg["experiment"], label), name)
        tied = tied_of.setdefault(cfg["experiment"], tied_keys(block))
        differing = differing_keys(cfg, runs[first], ignored=set(block["point_keys"]) | set(tied))
        if differing:
            tie = "or set it in one variant axis together with the point key it goes with"
            fix = (f"give each value of {differing[0]} a label of its own on the '{block['label_axis']}' axis, {tie}"
                   if label else f"set {differing[0]} in base, one value per experiment, {tie}")
            raise ConfigError(f"config error: experiment '{cfg['experiment']}': runs '{first}' and '{name}' {of}differ "
                              f"in {', '.join(differing)}, which no axis of its views' points "
                              f"({', '.join(k for k in block['point_keys'] if k != POOLED_KEY)}; not {POOLED_KEY}, "
                              f"whose runs they average) sets: its views would take them for one setting; {fix}")
        for key, with_point in sorted(tied.items()):
            point = sorted(with_point)
            other = tied_points.setdefault((cfg["experiment"], label, key, *key_values(cfg, point)), name)
            if cfg.get(key) != runs[other].get(key):
                at = ", ".join(f"{k} {cfg.get(k)}" for k in point)
                raise ConfigError(f"config error: experiment '{cfg['experiment']}': runs '{other}' and '{name}' {of}"
                                  f"have {at} but {key} {runs[other].get(key)} and {cfg.get(key)}: its views would "
                                  f"take them for one setting; give {key} one value per value of "
                                  f"{', '.join(point)}, or a label of its own")


def fill_block(name: str, block: dict[str, Any]) -> dict[str, Any]:
    """``block`` with the schema's defaults of a merged experiment block filled in (in place)."""
    message = first_error(_merged_block_validator(), block, prefix=f"experiment_definitions.{name}")
    if message is not None:
        raise ConfigError(f"config error: {message}")
    return block


@functools.lru_cache(maxsize=1)
def _merged_block_validator():
    return make_validator(EXPERIMENTS_SCHEMA, fill=True, definition="merged_experiment")


PRESETS = tuple(load_schema(EXPERIMENTS_SCHEMA)["$defs"]["experiment_preset"]["enum"])  # cpu, paper
Blocks = dict[str, dict[str, Any]]  # definitions(config), passed on by a caller that has them (lipflow.plan)


def selected_experiments(config: dict[str, Any], blocks: Blocks | None = None) -> list[str]:
    """The names in ``config['experiments']``; an unknown name raises a one-line ConfigError."""
    known = definitions(config) if blocks is None else blocks
    names = list(config["experiments"])
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config error: unknown experiment '{name}' in experiments{hint}; "
                              f"known: {', '.join(sorted(known))}")
    return names


def expand_experiments(config: dict[str, Any], blocks: Blocks | None = None) -> dict[str, dict[str, Any]]:
    """run name → run overrides for every enabled experiment (``experiment`` set to its name)."""
    blocks, preset = definitions(config) if blocks is None else blocks, config["experiment_preset"]
    runs: dict[str, dict[str, Any]] = {}
    for name in selected_experiments(config, blocks):
        for run_name, overrides in expand_experiment(name, blocks[name], preset).items():
            if run_name in runs:
                raise ConfigError(f"config error: run '{run_name}' is produced by two experiments; "
                                  f"give them different `short` names")
            runs[run_name] = overrides
    clash = sorted(set(runs) & set(config["runs"]))
    if clash:
        raise ConfigError(f"config error: run name '{clash[0]}' is both in runs and in an experiment")
    return runs


def experiment_evaluations(config: dict[str, Any], run_config: dict[str, Any],
                           blocks: Blocks | None = None) -> list[str] | None:
    """The evaluations of an experiment's run (its block's ``evaluations``; they replace
    ``evaluations.enabled``), or None for a run of the ``runs`` block."""
    name = run_config["experiment"]
    if name is None:
        return None
    blocks = definitions(config) if blocks is None else blocks
    return list(blocks[name]["evaluations"])


def experiment_studies(config: dict[str, Any], blocks: Blocks | None = None) -> list[str]:
    """Studies outside the run grid (``icl``, ``image_mlp``) that the enabled experiments include."""
    blocks = definitions(config) if blocks is None else blocks
    return sorted({s for name in selected_experiments(config, blocks) for s in blocks[name]["studies"]})
