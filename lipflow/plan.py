"""The Plan: everything the workflow derives from one validated config, computed once at parse time
(imports no torch). ``common.smk`` builds one Plan; the rules read it.

A Plan holds the run configs by run id (read-only: :class:`FrozenDict`), each run's checkpoint
evaluations, the selected experiments, the studies outside the run grid that are on, the ICL study's
config and the targets and params strings the rules use. It joins :mod:`lipflow.config` (which knows
nothing of experiments) with :mod:`lipflow.experiments` (grid expansion).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Mapping

from lipflow.config import (DATA_KEYS_OF_KINDS, ConfigError, check_config, data_block_as_used, data_identity,
                            experiment_run, plain_runs, run_id, run_validator, tokenizer_id)
from lipflow.data.corpus import expand_paths
from lipflow.errors import parse_json
from lipflow.experiments import (CATALOG, EXPERIMENT_FIGURES, EXPERIMENT_VIEWS, PRESETS, check_view_points,
                                 definitions, expand_experiments, experiment_evaluations, experiment_studies,
                                 selected_experiments)
from lipflow.experiments.grid import expand_experiment
from lipflow.results import views as result_views
from lipflow.studies.icl.config import (ICLConfig, baselines_config, caption_terms, check_regression_prompts,
                                        load_config, training_config, training_jobs)

IMAGE_MLP = "results/image_mlp/robustness.parquet"  # table image_mlp_robustness (lipflow.results.database)
IMAGE_MLP_RECEIPT = "results/image_mlp/robustness.written"  # its job's receipt (lipflow.atomic.write_receipt)


class FrozenDict(dict):
    """A dict that refuses every change (json.dumps writes it as a dict; a copy is a plain dict)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a Plan's configs are read-only; copy one (dict(cfg)) to change it")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __reduce__(self):
        return dict, (dict(self),)

    def __deepcopy__(self, memo):
        return {key: copy.deepcopy(value, memo) for key, value in self.items()}


def snakemake_input(key: str, path: str) -> str:
    """``path``, a file of the config's ``key`` that a rule takes as an input, when it holds no brace: Snakemake
    reads one as a wildcard in any input name (doubling it does not escape it there), and stopped with a
    WildcardError naming the rule and the wildcard only; else a ConfigError naming the key and the file."""
    if "{" in path or "}" in path:
        raise ConfigError(f"config error: {key}: {path} holds a brace, which Snakemake reads as a wildcard in an "
                          "input file: rename the file or its folder")
    return path


def freeze(value: Any) -> Any:
    """``value`` with every mapping a :class:`FrozenDict` and every list a tuple (JSON unchanged)."""
    if isinstance(value, dict):
        return FrozenDict({key: freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(freeze(item) for item in value)
    return value


def recorded_block(path: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The config block a data stage recorded in its JSON output ``path`` under ``keys``; {} when the
    file is missing or unreadable (the stage itself reports a damaged one)."""
    try:
        with open(path, encoding="utf-8") as f:
            block = parse_json(f.read())
        for key in keys:
            block = block[key]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return block if isinstance(block, dict) else {}


def check_written_definitions(config: dict[str, Any], blocks: dict[str, dict[str, Any]]) -> None:
    """Validate, run by run, each block the config writes under ``experiment_definitions``, under the
    config's preset and under each other preset the block writes, whether or not it is selected, so
    that its mistakes are named now and not on the day it is selected or its preset is switched (the
    selected ones under the config's preset are validated by :func:`resolve_runs`)."""
    validator = run_validator()
    preset_now = config["experiment_preset"]
    for name, written in sorted(config["experiment_definitions"].items()):
        for preset in sorted({preset_now} | (set(written) & set(PRESETS))):
            if preset == preset_now and name in config["experiments"]:
                continue
            runs = {run_name: experiment_run(validator, run_name, overrides, config["defaults"], preset)
                    for run_name, overrides in expand_experiment(name, blocks[name], preset).items()}
            check_view_points(blocks, runs)


def check_selected_experiments_do_something(config: dict[str, Any], blocks: dict[str, dict[str, Any]],
                                            runs: dict[str, dict[str, Any]]) -> None:
    """A selected experiment that has none of the resolved ``runs`` (its preset expands to none: an empty
    grid, ``grid: {}``, ``grid: [{}]``, or a block of the config's own that names none) and includes no
    study would train nothing and draw its figures from empty views: refused in one line naming its grid."""
    preset, trained = config["experiment_preset"], {cfg["experiment"] for cfg in runs.values()}
    for name in selected_experiments(config, blocks):
        if not blocks[name]["studies"] and name not in trained:
            raise ConfigError(f"config error: experiment_definitions.{name}.{preset}.grid: experiment '{name}' is "
                              f"selected in experiments but has no runs under preset '{preset}' (an empty grid) and "
                              "no studies; give it a grid or leave it out of experiments")


def check_evaluation_blocks(config: dict[str, Any], evaluations: Mapping[str, tuple[str, ...]]) -> None:
    """Every evaluation a run names has its parameter block ``evaluations.<name>`` (the schema fills one for
    each block it declares): an evaluation added to the ``$defs/evaluation_name`` enum without one passed the
    config check and failed inside the evaluate rule with a bare KeyError."""
    missing = sorted({name for names in evaluations.values() for name in names} - set(config["evaluations"]))
    if missing:
        raise ConfigError(f"config error: evaluation '{missing[0]}' has no parameter block: add evaluations.properties."
                          f"{missing[0]} to workflow/schemas/config.schema.yaml (one without parameters: "
                          "{type: object, additionalProperties: false, default: {}, properties: {}})")


def check_caption_files(experiments: list[str]) -> None:
    """Each selected experiment's views and figures name caption files of workflow/report (a view's is its
    DuckDB comment, both are the report's captions): a missing one was found only by the database build,
    after every run had trained."""
    for name in experiments:
        if name not in CATALOG:  # a block of the config's own, without a module: no views, no figures
            continue
        experiment = CATALOG[name]
        captions = [view.caption for view in experiment.views.values()]
        for caption in captions + [figure.caption for figure in experiment.figures.values()]:
            if not (result_views.REPORT_DIR / caption).is_file():
                raise ConfigError(f"experiment {name}: caption file {result_views.REPORT_DIR / caption} does not exist "
                                  f"(named by a view or figure of lipflow/experiments/{name}.py)")


def resolve_runs(config: dict[str, Any], blocks: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """run id → resolved run config, for a validated config (defaults filled): the ``runs``
    block's (see :func:`lipflow.config.plain_runs`) plus every run of the selected experiments
    (``blocks``: the config's experiment definitions, when the caller has them)."""
    data = data_identity(config)
    validator = run_validator()
    blocks = definitions(config) if blocks is None else blocks
    experiment_runs = {name: experiment_run(validator, name, overrides, config["defaults"], config["experiment_preset"])
                       for name, overrides in expand_experiments(config, blocks).items()}
    check_view_points(blocks, experiment_runs)
    return {run_id(name, cfg, data): cfg for name, cfg in {**plain_runs(config), **experiment_runs}.items()}


def figure_receipt(job: str) -> str:
    """The receipt a figures job (an experiment's, or ``training_curves``) writes last: a plain output,
    deleted by Snakemake before the job, so a failed job (whose update() figures Snakemake restores,
    newer than their inputs) is rerun instead of its old figures passing as current."""
    return f"results/figures/{job}.drawn"


@dataclass(frozen=True)
class Plan:
    """What one validated config asks the workflow to do (see the module docstring)."""

    config: Mapping[str, Any]
    runs: Mapping[str, Mapping[str, Any]]  # run id → resolved run config
    evaluations: Mapping[str, tuple[str, ...]]  # run id → its checkpoint evaluations
    enabled_evaluations: tuple[str, ...]  # evaluations.enabled (the runs block's evaluations)
    experiments: tuple[str, ...]
    studies: frozenset[str]  # studies outside the run grid that run (icl, image_mlp)
    icl: ICLConfig
    trains_runs_block: bool  # False when selected experiments replace the runs block

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Plan":
        """Validate ``config`` in place (filling the schema's defaults, as Snakemake's own config must
        be) and plan it; a bad config is a one-line ConfigError."""
        check_config(config)
        blocks = definitions(config)  # once: every experiment helper below reads these
        runs = resolve_runs(config, blocks)
        check_selected_experiments_do_something(config, blocks, runs)
        check_written_definitions(config, blocks)
        experiments = selected_experiments(config, blocks)
        check_caption_files(experiments)
        enabled = tuple(config["evaluations"]["enabled"])
        by_experiment = {name: tuple(experiment_evaluations(config, {"experiment": name}, blocks))
                         for name in experiments}
        evaluations = {run: by_experiment[cfg["experiment"]] if cfg["experiment"] else enabled
                       for run, cfg in runs.items()}
        check_evaluation_blocks(config, evaluations)
        studies = frozenset(experiment_studies(config, blocks))
        try:  # the icl block's cross-key rules: their errors are prefixed as every other config error
            icl = load_config(config["icl"])  # the icl block's own schema fills its defaults
            studies |= {"icl"} if icl.enabled else set()
            if "icl" in studies:  # before any job starts, not in the baselines job after the training jobs
                check_regression_prompts(icl)
        except ConfigError as err:
            raise ConfigError(f"config error: {err}") from None
        return cls(config=freeze(config), runs=freeze(runs), evaluations=FrozenDict(evaluations),
                   enabled_evaluations=enabled, experiments=tuple(experiments), studies=studies, icl=icl,
                   trains_runs_block=bool(plain_runs(config)))

    @property
    def all_evaluations(self) -> list[str]:
        """Every evaluation some run (or evaluations.enabled) names, sorted."""
        return sorted({name for names in self.evaluations.values() for name in names} | set(self.enabled_evaluations))

    @property
    def data_dir(self) -> str:
        return f"results/data/{self.config['corpus']['name']}"

    @property
    def tokens_dir(self) -> str:
        return f"{self.data_dir}/{tokenizer_id(self.config['tokenizer'])}"

    def check_data_folders(self) -> None:
        """A ConfigError when the corpus or token folder this config names was made from another
        ``corpus`` or ``tokenizer`` block (as recorded in its corpus.json or manifest.json): building
        this config's data there would replace the data that other runs were trained on."""
        folders = {"corpus": (self.data_dir, "corpus/corpus.json", ("config",)),
                   "tokenizer": (self.tokens_dir, "manifest.json", ("tokenizer", "config"))}
        for block, (folder, record, keys) in folders.items():
            recorded = recorded_block(f"{folder}/{record}", keys)
            if DATA_KEYS_OF_KINDS[block][0] in recorded:  # recorded by hand or before data_block_as_used
                recorded = data_block_as_used(block, recorded)
            current = json.loads(json.dumps(self.config[block]))
            differs = sorted(key for key in recorded if current.get(key) != recorded[key])
            if differs:
                key = differs[0]
                other = "give this corpus its own corpus.name, or " if block == "corpus" else ""
                if (block, key) == ("tokenizer", "shard_tokens"):  # the loader reads the shards as one stream
                    other = f"the same tokens in other files: set it back to {recorded[key]!r} to keep them, or "
                raise ConfigError(f"{folder} holds data made from another {block} block ({block}.{key} was "
                                  f"{recorded[key]!r}, is {current.get(key)!r}), which runs were trained on: "
                                  f"{other}move {folder} away to rebuild it")

    def corpus_files(self) -> list[str]:
        """The files the corpus reads (globs expanded; each checked to be a readable regular file, and
        to be a name Snakemake can take as an input: :func:`snakemake_input`)."""
        corpus = self.config["corpus"]
        return [] if corpus["source"] == "embedded" else [snakemake_input("corpus.paths", path)
                                                          for path in expand_paths(corpus["paths"], corpus["source"])]

    def tokenizer_files(self) -> list[str]:
        """The ``file`` tokenizer's path (a Snakemake input name, :func:`snakemake_input`); none for another kind."""
        tokenizer = self.config["tokenizer"]
        return [snakemake_input("tokenizer.path", tokenizer["path"])] if tokenizer["kind"] == "file" else []

    # ------------------------------------------------------------------ params strings (a change reruns jobs)

    def run_config(self, run: str) -> Mapping[str, Any]:
        """The resolved config of run id ``run``. An id this config does not train (a target named on the
        command line: a run of an experiment that is not selected, or of an edited config) is a one-line
        ConfigError, where the rules' input functions raised a bare KeyError."""
        if run not in self.runs:
            raise ConfigError(f"config error: run {run} is not a run of this config (a run of an experiment needs "
                              "--config experiments=[<experiment>]); `lipflow runs` lists its run ids")
        return self.runs[run]

    def run_evaluations(self, run: str) -> tuple[str, ...]:
        """The checkpoint evaluations of run id ``run`` (an id of another config: :meth:`run_config`'s error)."""
        self.run_config(run)
        return self.evaluations[run]

    def run_config_json(self, run: str) -> str:
        """The resolved config of one run, passed to the training job as JSON."""
        return json.dumps(self.run_config(run), sort_keys=True)

    def database_run_dirs(self) -> str:
        """The run folders the database job reads, sorted: the order of ``runs:`` or ``experiments:`` in a
        config is not a change, so reordering them neither rebuilds the database nor redraws its figures."""
        return " ".join(f"results/runs/{run}" for run in sorted(self.runs))

    def config_block_json(self, block: str) -> str:
        """A top-level config block as JSON (a change to it reruns the rule through params)."""
        return json.dumps(self.config[block], sort_keys=True)

    def evaluation_params_json(self, evaluation: str) -> str:
        """One evaluation's parameters (schema defaults filled) as JSON."""
        return json.dumps(self.config["evaluations"][evaluation], sort_keys=True)

    def icl_params(self) -> str:
        """The whole icl block as JSON (without `enabled`, which changes no result)."""
        return json.dumps({k: v for k, v in self.icl.to_dict().items() if k != "enabled"})

    def icl_train_params(self) -> str:
        """Only the keys that change what an ICL training job learns, so n_grid edits keep models."""
        return json.dumps(training_config(self.icl))

    def icl_baselines_params(self) -> str:
        """Only the keys that change the ICL baselines, so an edit of how models train keeps them."""
        return json.dumps(baselines_config(self.icl))

    def icl_caption(self) -> dict[str, str]:
        """What the ICL figures' report captions say of the config (:func:`caption_terms`)."""
        return caption_terms(self.icl)

    # ------------------------------------------------------------------ targets

    def icl_runs(self) -> list[str]:
        """The ICL study's model checkpoints, one per (layers, n) training job."""
        return [f"results/icl/runs/L{layers}_n{n}.safetensors" for layers, n in training_jobs(self.icl)]

    def experiment_outputs(self, name: str) -> list[str]:
        """The figures (PNG and SVG) and tables (CSV) of one experiment."""
        figures = [f"results/figures/{fig}.{ext}" for fig in EXPERIMENT_FIGURES.get(name, ()) for ext in ("png", "svg")]
        return figures + [f"results/tables/{view}.csv" for view in EXPERIMENT_VIEWS.get(name, ())]

    def study_inputs(self) -> list[str]:
        """Files outside the runs that the database loads when their study is on: the digits-MLP
        robustness table (loaded by lipflow.results.database as image_mlp_robustness)."""
        return [IMAGE_MLP] if "image_mlp" in self.studies else []

    def training_curve_targets(self) -> list[str]:
        """The runs block's training-curve figure (PNG and SVG) and its receipt when that block trains runs."""
        if not self.trains_runs_block:
            return []
        return [f"results/figures/training_curves.{ext}" for ext in ("png", "svg")] + [figure_receipt("training_curves")]

    def figure_receipts(self) -> list[str]:
        """The receipt of each selected experiment's figures job (:func:`figure_receipt`). A block that a
        config adds under ``experiment_definitions`` without a module in lipflow/experiments has runs but
        no views, figures or figures job (the rules are made from the catalog), so it has no receipt."""
        return [figure_receipt(name) for name in self.experiments if name in EXPERIMENT_FIGURES]

    def study_receipts(self) -> list[str]:
        """The digits-MLP table job's receipt when that study is on, for `rule all`: Snakemake does not look
        below an up-to-date table for a missing receipt (the ICL study's receipts are icl targets)."""
        return [IMAGE_MLP_RECEIPT] if "image_mlp" in self.studies else []

    def experiment_targets(self) -> list[str]:
        """Everything the selected experiments produce (the ICL study's outputs are icl targets)."""
        return [path for name in self.experiments for path in self.experiment_outputs(name)] + self.study_inputs()
