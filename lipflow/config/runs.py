"""The run config: ``check_config`` merges ``defaults`` into every run, validates the result against
``workflow/schemas/config.schema.yaml`` (filling its defaults) and applies the cross-key rules the
schema cannot state. A run's id is ``<name>-<hash>``, the hash being a function of the resolved run
config and the data it trains on (:func:`run_id`)."""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import PurePosixPath
from typing import Any

from lipflow.config.schema import SCHEMA_PATH, first_error, load_schema, make_validator, validate
from lipflow.atomic import sha256_file
from lipflow.errors import ConfigError
from lipflow.provenance import config_hash


def merge_run_defaults(config: dict[str, Any]) -> dict[str, set[str]]:
    """Give every run the keys of ``defaults`` that it does not override (in place); returns, per run,
    the keys it took from ``defaults``. A config without ``runs`` gets the schema's default runs first, so
    that they inherit ``defaults`` too."""
    if "runs" not in config:
        config["runs"] = copy.deepcopy(load_schema(SCHEMA_PATH)["properties"]["runs"]["default"])
    defaults, runs = config.get("defaults", {}), config.get("runs")  # before validation: either may be absent
    if not isinstance(defaults, dict) or not isinstance(runs, dict):
        return {}
    inherited = {}
    for name, overrides in runs.items():
        if overrides is None:
            overrides = {}
        if isinstance(overrides, dict):
            runs[name] = {**defaults, **overrides}
            inherited[name] = set(defaults) - set(overrides)
    return inherited


def named_where_written(message: str, inherited: dict[str, set[str]]) -> str:
    """``message`` with its path runs.<run>.<key> named as the user wrote it when the run took that key
    from ``defaults``: ``defaults.<key> (given to runs.<run>)``."""
    for name, keys in inherited.items():
        for key in keys:
            # a YAML key need not be a string (`1:`, `yes:`): matched by its text, as the message names it
            path = re.compile(rf"runs\.{re.escape(str(name))}\.{re.escape(str(key))}(?![\w])")
            if path.search(message):
                return path.sub(f"defaults.{key} (given to runs.{name})", message, count=1)
    return message


def check_config(config: dict[str, Any]) -> None:
    """Merge run defaults and fill the schema's defaults into ``config`` (in place, as
    snakemake.utils.validate does), in the same pass raising :class:`ConfigError` on the first
    schema violation (one line naming the key path), then on the first broken cross-key rule
    (:func:`check_data_blocks`, :func:`check_run`)."""
    if not isinstance(config, dict):
        raise ConfigError("the config must be a mapping of keys to values")
    inherited = merge_run_defaults(config)
    methods_set = image_mlp_method_keys(config)
    message = first_error(make_validator(fill=True), config)
    if message is not None:
        raise ConfigError(f"config error: {named_where_written(message, inherited)}")
    check_data_blocks(config)
    for name in DATA_BLOCKS:
        config[name] = data_block_as_used(name, config[name])
    check_image_mlp_block(config["image_mlp"], methods_set)
    config["image_mlp"] = canonical_image_mlp(config["image_mlp"])
    for name, params in config["evaluations"].items():
        if isinstance(params, dict):  # the blocks of evaluations (not its `enabled` list)
            check_evaluation(name, params)
            config["evaluations"][name] = canonical_evaluation(name, params)
    for name, run in config["runs"].items():
        config["runs"][name] = run = canonical_run(run)
        try:
            if run["experiment"] is not None:
                raise ConfigError(f"config error: runs.{name}.experiment: set by experiment expansion, not in "
                                  "`runs` (select an experiment with `experiments: [...]`)")
            check_run(f"runs.{name}", run)
        except ConfigError as err:
            raise ConfigError(named_where_written(str(err), inherited)) from None


# What a method of the image_mlp study may set: its optimizer and weight constraint (the schema's
# description). The study sets the model, its shape, the steps, batches and seed itself, and applies no
# schedule, so any other run key would be ignored without a word.
IMAGE_MLP_METHOD_KEYS = ("optimizer", "lr", "adam_lr", "momentum", "nesterov", "beta1", "beta2", "weight_decay",
                         "ns_coefficients", "ns_steps", "update_scale", "lmo_norms", "lmo_radius",
                         "weight_constraint", "sigma_max", "spectral_wd")


def image_mlp_roles(n_layers: int) -> tuple[str, ...]:
    """The parameter roles of the study's MLP of ``n_layers`` Linear layers (lipflow.model.mlp: every layer but
    the last hidden, the last head): a per-role entry (lmo_norms, lmo_radius) for another would be ignored."""
    return ("hidden", "head") if n_layers > 1 else ("head",)


def image_mlp_method_keys(config: dict[str, Any]) -> dict[str, set[str]]:
    """The keys each image_mlp method sets in ``config`` itself (before the schema fills the rest)."""
    block = config.get("image_mlp")
    methods = block.get("methods") if isinstance(block, dict) else None
    if not isinstance(methods, dict):
        return {}
    return {name: set(method) for name, method in methods.items() if isinstance(method, dict)}


def check_image_mlp_block(block: dict[str, Any], keys_set: dict[str, set[str]]) -> None:
    """The (filled) image_mlp ``block``'s last seed (seed + seeds − 1) is a seed (scikit-learn's split takes
    below 2^32), and each method sets only :data:`IMAGE_MLP_METHOD_KEYS` (``keys_set``: the keys it was
    given), per-role tables only for :func:`image_mlp_roles`, and keeps the Newton–Schulz rule of
    :func:`check_run`; all fail before any job starts instead of being ignored or failing inside the study's job."""
    last, largest = block["seed"] + block["seeds"] - 1, load_schema()["$defs"]["seed"]["maximum"]
    if last > largest:
        raise ConfigError(f"config error: image_mlp.seeds: seeds {block['seed']} … {last} pass the largest seed, "
                          f"{largest}; lower image_mlp.seed or image_mlp.seeds")
    roles = image_mlp_roles(block["n_layers"])
    for name, method in block["methods"].items():
        others = sorted(keys_set.get(name, set()) - set(IMAGE_MLP_METHOD_KEYS))
        if others:
            raise ConfigError(f"config error: image_mlp.methods.{name}.{others[0]}: a method sets only its optimizer "
                              f"and weight constraint ({', '.join(IMAGE_MLP_METHOD_KEYS)}); the study sets the "
                              "model, its shape, steps, batches and seed (image_mlp's own keys)")
        for key in ("lmo_norms", "lmo_radius"):
            absent = sorted(set(method[key]) - set(roles))
            if absent:
                raise ConfigError(f"config error: image_mlp.methods.{name}.{key}.{absent[0]}: the study's MLP "
                                  f"(image_mlp.n_layers = {block['n_layers']}) has no {absent[0]} parameters; its "
                                  f"roles are {', '.join(roles)}")
        check_newton_schulz_steps(f"image_mlp.methods.{name}", method)


def canonical_image_mlp(block: dict[str, Any]) -> dict[str, Any]:
    """The ``image_mlp`` block (validated) in one spelling of what trains alike, so that it gives one params
    string (a changed one reruns the study): its radii as floats, sorted (each radius's PGD restarts are
    seeded by the radius, so their order changes nothing computed), and each method spelled as a run is
    (:func:`canonical_run`: ``sigma_max: 3`` as ``3.0``), as the schema's defaults write them."""
    return {**block, "epsilons": sorted(int_as_float(eps) for eps in block["epsilons"]),
            "methods": {name: canonical_run(method) for name, method in block["methods"].items()}}


DATA_BLOCKS = ("corpus", "tokenizer")


def check_data_blocks(config: dict[str, Any]) -> None:
    """The cross-key rules of the config's ``corpus`` and ``tokenizer`` blocks (:func:`data_block_problem`)."""
    for name in DATA_BLOCKS:
        problem = data_block_problem(name, config[name])
        if problem is not None:
            raise ConfigError(f"config error: {problem}")


def data_block_problem(name: str, block: dict[str, Any]) -> str | None:
    """What the schema cannot say about a filled ``corpus`` or ``tokenizer`` block, as one line, or
    None: paths go with a file source and only with one; a ``file`` tokenizer needs its path."""
    if name == "corpus":
        if block["source"] == "embedded" and block["paths"]:
            return ("corpus.paths must be empty for corpus.source 'embedded' "
                    "(set source: files, jsonl or parquet to read them)")
        if block["source"] != "embedded" and not block["paths"]:
            return f"corpus.paths is empty; corpus.source '{block['source']}' needs a path or glob"
    elif block["kind"] == "file" and not block["path"]:
        return "tokenizer.path is required when tokenizer.kind is 'file'"
    return None


# data block → (the key naming its kind, {key: the kinds that read it}): under another kind such a key is
# set to the schema's default, so an inapplicable value (tokenizer.vocab_size under kind char,
# corpus.text_column under source files) neither changes the run ids nor makes the data folder look
# built from another block
DATA_KEYS_OF_KINDS = {"corpus": ("source", {"text_column": ("jsonl", "parquet")}),
                      "tokenizer": ("kind", {"vocab_size": ("bpe",), "path": ("file",)})}


def data_block_as_used(name: str, block: dict[str, Any]) -> dict[str, Any]:
    """A filled ``corpus`` or ``tokenizer`` block with each key of :data:`DATA_KEYS_OF_KINDS` that its
    kind does not read at the schema's default (the block as its stage uses it), and its paths spelled
    plainly (:func:`plain_path`), so ``./a.txt`` and ``a.txt`` are one corpus and one set of run ids."""
    kind_key, readers = DATA_KEYS_OF_KINDS[name]
    defaults, kind = load_schema(SCHEMA_PATH)["properties"][name]["properties"], block.get(kind_key)
    used = {key: (defaults[key]["default"] if kind not in readers.get(key, (kind,)) else value)
            for key, value in block.items()}
    if isinstance(used.get("paths"), list):
        used["paths"] = [plain_path(path) for path in used["paths"]]
    if isinstance(used.get("path"), str):
        used["path"] = plain_path(used["path"])
    return used


def plain_path(path: str) -> str:
    """``path`` (or glob) without its ``.`` components, repeated and trailing slashes: the same file for
    any spelling of them. A ``..`` stays, since ``a/../b`` is not ``b`` when ``a`` is a link."""
    return str(PurePosixPath(path)) if path else path


def data_block(name: str, block: dict[str, Any], error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A data stage's ``corpus`` or ``tokenizer`` block (its ``--config-json``) checked as the config
    checks its own: a copy filled with the schema's defaults, the first schema violation or broken
    cross-key rule (:func:`data_block_problem`) raised as ``error``, one line naming the key."""
    filled = {name: copy.deepcopy(block)}
    problem = first_error(make_validator(fill=True), filled) or data_block_problem(name, filled[name])
    if problem is not None:
        raise error(problem)
    return filled[name]


# The weight constraints that read sigma_max: they project each matrix onto it (lipflow.constraints; a test
# checks the two agree). Under the others the key changes no weight, and views that show it show NULL.
SIGMA_MAX_CONSTRAINTS = ("spectral_normalize", "spectral_hammer", "spectral_soft_cap", "spectral_hard_cap", "stiefel")


# Newton–Schulz coefficient sets with their own step count (lipflow.optimizers.NS_COEFFICIENT_SETS;
# a test checks the two agree): ns_steps must equal it.
FIXED_NS_STEPS = {"you": 6}


# The models a run of `runs` or of an experiment trains on the text corpus: the schema's, less the image
# study's classifier. The ones with a Lipschitz structure are all of them but the LayerNorm baseline.
RUN_KEYS = frozenset(load_schema(SCHEMA_PATH)["$defs"]["run"]["properties"])  # every key a run may set
LANGUAGE_MODELS = tuple(m for m in load_schema(SCHEMA_PATH)["$defs"]["run"]["properties"]["model"]["enum"]
                        if m != "mlp")
LIPSCHITZ_LANGUAGE_MODELS = tuple(m for m in LANGUAGE_MODELS if m != "gpt")


def check_run(where: str, run: dict[str, Any]) -> None:
    """Cross-key rules of one resolved run, the ones each model's constructor and the parametrization
    enforce, checked here before any job starts (tests/test_config.py checks that the two agree): the
    runs train a language model on the text corpus (``mlp`` is the image study's classifier),
    ``n_heads`` divides ``d_model``, the Lipschitz models rotate pairs of head dimensions (RoPE) and fix
    their own residual scaling, ``modular`` needs a Lipschitz structure, the baseline's MLP is GELU, and
    a Newton–Schulz coefficient schedule gets its own number of steps, and the warmup ends within the run."""
    model = run["model"]
    if model not in LANGUAGE_MODELS:
        raise ConfigError(f"config error: {where}.model: '{model}' is the image classifier of the image_mlp study "
                          f"and cannot train on the text corpus; use {', '.join(LANGUAGE_MODELS)}")
    if run["d_model"] % run["n_heads"]:
        raise ConfigError(f"config error: {where}.n_heads: {run['n_heads']} does not divide d_model {run['d_model']}")
    if model in LIPSCHITZ_LANGUAGE_MODELS:
        if (run["d_model"] // run["n_heads"]) % 2:
            raise ConfigError(f"config error: {where}.n_heads: {model} needs an even head width (RoPE rotates "
                              f"pairs), d_model {run['d_model']} / n_heads {run['n_heads']} is odd")
        if run["depth_mup"]:
            raise ConfigError(f"config error: {where}.depth_mup: {model}'s residuals fix their own branch scaling "
                              "(the certificate depends on it); set depth_mup: false")
    elif run["parametrization"] == "modular":
        raise ConfigError(f"config error: {where}.parametrization: 'modular' needs a model with a Lipschitz "
                          f"structure ({', '.join(LIPSCHITZ_LANGUAGE_MODELS)}); {model}'s LayerNorm has none")
    elif run["activation"] != "gelu":
        raise ConfigError(f"config error: {where}.activation: {model}'s MLP is nanoGPT's GELU; '{run['activation']}' "
                          f"applies to {', '.join(LIPSCHITZ_LANGUAGE_MODELS)} (leave activation out for {model})")
    check_newton_schulz_steps(where, run)
    check_warmup_steps(where, run)


def check_warmup_steps(where: str, run: dict[str, Any]) -> None:
    """The warmup reaches the peak lr within the run: step i (0 … steps − 1) takes (i + 1)/warmup_steps,
    so warmup_steps = steps peaks at the last step, and a longer warmup never reaches the run's ``lr``."""
    if run["warmup_steps"] > run["steps"]:
        raise ConfigError(f"config error: {where}.warmup_steps: {run['warmup_steps']} is more than the run's "
                          f"{run['steps']} steps, so its lr would never reach lr (it peaks at "
                          f"{run['steps'] / run['warmup_steps']:.3g}·lr); set warmup_steps ≤ steps")


def check_newton_schulz_steps(where: str, run: dict[str, Any]) -> None:
    """A Newton–Schulz coefficient schedule with its own step count (:data:`FIXED_NS_STEPS`) gets
    exactly that many ``ns_steps``."""
    fixed = FIXED_NS_STEPS.get(run["ns_coefficients"])
    if fixed is not None and run["ns_steps"] != fixed:
        raise ConfigError(f"config error: {where}.ns_steps: ns_coefficients '{run['ns_coefficients']}' has exactly "
                          f"{fixed} steps, got {run['ns_steps']}")


def run_validator():
    """A filling validator for :func:`experiment_run` (build it once per config: it caches values that passed)."""
    return make_validator(fill=True)


def stage_run(cfg: dict[str, Any], where: str = "--config-json") -> dict[str, Any]:
    """The train stage's run config (its ``--config-json``, the resolved run the pipeline writes)
    checked as a run of ``runs``: a copy with the schema's run defaults filled, spelled as the pipeline
    writes it (:func:`canonical_run`), the first schema violation or broken cross-key rule a one-line
    ConfigError naming ``where`` and the key."""
    filled = copy.deepcopy(cfg)
    message = first_error(_run_validator(), filled, prefix=where)
    if message is not None:
        raise ConfigError(f"config error: {message}")
    check_run(where, filled)
    return canonical_run(filled)


@functools.lru_cache(maxsize=1)
def _run_validator():
    return make_validator(SCHEMA_PATH, fill=True, definition="run")


def experiment_run(validator, name: str, overrides: dict[str, Any], defaults: dict[str, Any],
                   preset: str) -> dict[str, Any]:
    """An experiment's run: ``defaults`` ← ``overrides``, validated and filled like a run of ``runs``;
    an error (of the schema, or of a cross-key rule of :func:`check_run`) names the run, its experiment and
    ``preset`` (where its keys come from) and the key."""
    wrapped = {"runs": {name: {**defaults, **overrides}}}
    message = first_error(validator, wrapped)
    if message is not None:
        raise ConfigError(f"config error in experiment run {name} ({overrides.get('experiment')}'s {preset} preset "
                          f"or the config's defaults): {message.replace(f'runs.{name}.', '')}")
    try:
        check_run(f"experiment run {name}", wrapped["runs"][name])
    except ConfigError as err:  # a cross-key rule: its keys may come from the built-in preset, which the user never wrote
        raise ConfigError(f"{err} (its keys come from {overrides.get('experiment')}'s {preset} preset and the "
                          f"config's defaults)") from None
    return canonical_run(wrapped["runs"][name])


def canonical_run(run: dict[str, Any]) -> dict[str, Any]:
    """``run`` (validated) in the one spelling of what trains alike, so that it gives one run config and
    one run id (:func:`run_id`): each integer written for a ``number`` key (``sigma_max: 1``) as a float,
    and ``masses: {}`` (no part given: each takes the model's mass) as ``masses: null``."""
    run = _as_floats(run, _float_keys())
    return {**run, "masses": None} if run.get("masses") == {} else run


def int_as_float(value: Any) -> Any:
    """An integer written for a ``number`` as the float it is used as, where a float holds it; any other value
    as it is (one spelling of a number: a run's, the image-MLP and ICL blocks')."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2 ** 1000:  # a float holds it
        return float(value)
    return value


def _as_floats(value: Any, keys: Any) -> Any:
    if keys is True:
        return int_as_float(value)
    if isinstance(value, dict):
        return {key: _as_floats(item, keys[key]) if key in keys else item for key, item in value.items()}
    return value


def _types_and_properties(schema: dict[str, Any], subschema: dict[str, Any]) -> tuple[set[str], dict[str, Any]]:
    """A subschema's JSON types and properties, its ``$ref``s' and ``allOf``'s included (the run schema
    refers only to its own ``$defs``)."""
    types, properties, parts = set(), {}, [subschema]
    while parts:
        part = parts.pop()
        if "$ref" in part:
            parts.append(schema["$defs"][part["$ref"].rsplit("/", 1)[1]])
        parts.extend(part.get("allOf", ()))
        kind = part.get("type", ())
        types.update([kind] if isinstance(kind, str) else kind)
        properties.update(part.get("properties", {}))
    return types, properties


@functools.lru_cache(maxsize=1)
def _float_keys() -> dict[str, Any]:
    """The run schema's keys whose type is ``number`` and not ``integer`` (True), and its mappings of
    such keys (``masses``, ``lmo_radius``: key → their own keys)."""
    schema = load_schema(SCHEMA_PATH)

    def keys(subschema: dict[str, Any]) -> Any:
        types, properties = _types_and_properties(schema, subschema)
        if "number" in types and "integer" not in types:
            return True
        found = {key: keys(sub) for key, sub in properties.items()}
        return {key: value for key, value in found.items() if value} or None

    return keys(schema["$defs"]["run"])


@functools.lru_cache(maxsize=1)
def run_key_types() -> dict[str, frozenset[str]]:
    """Each run key's JSON types in the schema (``null`` where it may be unset), sorted by key: the
    ``runs`` table types its columns by them, not by the values its runs happen to hold."""
    schema = load_schema(SCHEMA_PATH)
    return {key: frozenset(_types_and_properties(schema, subschema)[0])
            for key, subschema in sorted(schema["$defs"]["run"]["properties"].items())}


def run_defaults(**overrides: Any) -> dict[str, Any]:
    """A full run config: the schema's run defaults with ``overrides`` on top, for code and tests that
    build a model or an optimizer outside the pipeline. The overrides are not validated (the registry
    or the model names a bad value; the image-MLP study adds keys of its own, e.g. ``in_features``)."""
    return {**copy.deepcopy(_schema_run_defaults()), **overrides}


@functools.lru_cache(maxsize=1)
def _schema_run_defaults() -> dict[str, Any]:
    return validate({"runs": {"run": {}}}, SCHEMA_PATH)["runs"]["run"]


def mlp_model_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """The image classifier's own keys of ``cfg`` (``$defs/mlp_model``: in_features, n_classes,
    input_norm) with the schema's defaults filled; a bad or missing one is a ConfigError naming it."""
    keys = {key: cfg[key] for key in _MLP_KEYS if key in cfg}
    message = first_error(_mlp_model_validator(), keys, prefix="mlp")
    if message is not None:
        raise ConfigError(f"config error: {message}")
    return keys


_MLP_KEYS = tuple(load_schema(SCHEMA_PATH)["$defs"]["mlp_model"]["properties"])


@functools.lru_cache(maxsize=1)
def _mlp_model_validator():
    return make_validator(SCHEMA_PATH, fill=True, definition="mlp_model")


def evaluation_params(name: str, **params: Any) -> dict[str, Any]:
    """One checkpoint evaluation's parameters (``evaluations.<name>``) with the schema's defaults
    filled; an unknown key, a bad value or a broken cross-key rule is a ConfigError naming it."""
    filled = validate({"evaluations": {name: params}}, SCHEMA_PATH)["evaluations"][name]
    check_evaluation(name, filled)
    return canonical_evaluation(name, filled)


# Evaluation lists whose order changes nothing the evaluation computes, only the order of its rows: taken
# sorted, as their defaults are (robustness seeds each radius's PGD restarts by the radius,
# ``provenance.stream_seed``, and sorts its k values; precision casts a fresh copy per format and scaling;
# rank counts each tolerance on its own)
UNORDERED_EVALUATION_LISTS = {"robustness": ("epsilons", "k_values"), "precision": ("formats", "scalings"),
                              "rank": ("rtols",)}
# those of them sorted in descending order, as their defaults are written (`rtols: [0.01, 0.001]`), so that
# the defaults keep the params string a results tree recorded
DESCENDING_EVALUATION_LISTS = {"rank": ("rtols",)}


def canonical_evaluation(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's validated ``params`` in one spelling of what evaluates alike, so that they give one
    params string (a changed one reruns the evaluation for every run): each whole float written for a
    ``number`` key or its list items (``epsilons: [0.0, 0.5, 1.0]``) as the integer that the schema's
    defaults write (``epsilons: [0, 0.1, 0.25, 0.5, 1, 2]``), which the evaluations read as the same number,
    and each list of :data:`UNORDERED_EVALUATION_LISTS` sorted (descending for
    :data:`DESCENDING_EVALUATION_LISTS`)."""
    keys, unordered = _evaluation_number_keys(name), UNORDERED_EVALUATION_LISTS.get(name, ())
    descending = DESCENDING_EVALUATION_LISTS.get(name, ())
    canonical = {key: _whole_as_int(value) if key in keys else value for key, value in params.items()}
    return {key: sorted(value, reverse=key in descending) if key in unordered else value
            for key, value in canonical.items()}


def _whole_as_int(value: Any) -> Any:
    if isinstance(value, list):
        return [_whole_as_int(item) for item in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:  # the int holds it exactly
        return int(value)
    return value


@functools.lru_cache(maxsize=None)
def _evaluation_number_keys(name: str) -> frozenset[str]:
    """The keys of ``evaluations.<name>`` whose values, or list items, are of type ``number`` (not ``integer``)."""
    schema = load_schema(SCHEMA_PATH)

    def is_number(subschema: dict[str, Any]) -> bool:
        subschema = subschema.get("items", subschema)
        if "$ref" in subschema:  # the evaluation blocks refer only to the schema's own $defs
            subschema = {**schema["$defs"][subschema["$ref"].rsplit("/", 1)[1]], **subschema}
        kind = subschema.get("type", ())
        types = {kind} if isinstance(kind, str) else set(kind)
        return "number" in types and "integer" not in types

    properties = schema["properties"]["evaluations"]["properties"][name]["properties"]
    return frozenset(key for key, subschema in properties.items() if is_number(subschema))


def check_evaluation(name: str, params: dict[str, Any]) -> None:
    """What the schema cannot say about an evaluation's filled parameters: Hutchinson's estimate needs
    two samples for its spread, and Lanczos returns at most as many eigenvalues as it takes steps."""
    if name != "sharpness":
        return
    if params["hutchinson_samples"] == 1:
        raise ConfigError("config error: evaluations.sharpness.hutchinson_samples: 1 sample gives no standard "
                          "error; use 0 (off) or at least 2")
    if params["lanczos_k"] > params["lanczos_iters"]:
        raise ConfigError(f"config error: evaluations.sharpness.lanczos_k: {params['lanczos_k']} eigenvalues need "
                          f"at least as many Lanczos steps, lanczos_iters is {params['lanczos_iters']}")


def plain_runs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``runs`` block's runs that train: all of them, unless experiments are selected and
    ``runs_with_experiments`` is false (a selected experiment then runs on its own)."""
    if config["experiments"] and not config["runs_with_experiments"]:
        return {}
    return config["runs"]


def data_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What a run's training data depends on: the corpus and tokenizer blocks, and a ``file``
    tokenizer's content. (The corpus files' content is not hashed here, at parse time: they are
    the corpus rule's inputs, and a checkpoint resumes only on the token shards it was made on.)"""
    identity = {"corpus": config["corpus"], "tokenizer": config["tokenizer"]}
    if config["tokenizer"]["kind"] == "file":
        identity["tokenizer_sha256"] = tokenizer_file_sha256(config["tokenizer"]["path"])
    return identity


def run_id(name: str, run: dict[str, Any], data: dict[str, Any]) -> str:
    """``<name>-<first 8 hex digits of the hash of the run config and its data identity>``."""
    return f"{name}-{config_hash({'run': run, 'data': data})[:8]}"


# What run_id() makes of a run name the schema allows ($defs/name): the Snakemake wildcard's constraint
# and what the stages take as --run-id (never a path: no '/', never '..').
RUN_ID_PATTERN = load_schema(SCHEMA_PATH)["$defs"]["name"]["pattern"].strip("^$") + "-[0-9a-f]{8}"


def check_run_id(text: str, where: str) -> str:
    """``text`` when it is a run id (:data:`RUN_ID_PATTERN`), else a one-line ConfigError naming ``where``
    (also for a value that is no string, e.g. a ``Path``: re's TypeError names nothing)."""
    if not isinstance(text, str) or not re.fullmatch(RUN_ID_PATTERN, text):
        raise ConfigError(f"{where}: {text!r} is not a run id (<run name>-<8 hex digits>, the name of letters, "
                          "digits, '_', '.', '-')")
    return text


@functools.lru_cache(maxsize=None)
def tokenizer_file_sha256(path: str) -> str:
    """The sha256 of a tokenizer file's bytes; a missing file (or a folder, a device) is a ConfigError naming it."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ConfigError(f"config error: tokenizer.path: {path} is not a regular file")
    try:
        return sha256_file(path)
    except OSError as err:
        raise ConfigError(f"config error: tokenizer.path: cannot read {path} ({err.strerror})") from None


def tokenizer_id(tok: dict[str, Any]) -> str:
    """Short folder name for a tokenizer config: ``char``, ``bpe512`` or ``file-<hash of its content>``."""
    if tok["kind"] == "char":
        return "char"
    if tok["kind"] == "bpe":
        return f"bpe{tok['vocab_size']}"
    return f"file-{tokenizer_file_sha256(tok['path'])[:8]}"
