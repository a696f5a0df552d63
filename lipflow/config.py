"""Config resolution shared by the Snakefile and the CLI (imports no torch: parse time matters).

``check_config`` merges ``defaults`` into every run, validates the result against
``workflow/schemas/config.schema.yaml`` and turns the first violation into one line naming the
key path and what is allowed. ``resolve_runs`` gives each run its id: ``<name>-<hash>``, the hash
being a function of the resolved run config and the data it trains on.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import yaml
from referencing import Registry, Resource

from lipflow.data.atomic import sha256_file
from lipflow.provenance import config_hash

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config that does not satisfy the schema; str() is one line."""


YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~7× faster; every job parses
SCALARS = (str, int, float, bool, type(None))


class UniqueKeyLoader(YAML_LOADER):
    """A safe YAML loader on which a mapping that repeats a key is an error naming the key and
    its line (PyYAML keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges keys that the mapping's own keys may override
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, SCALARS):
                continue  # an unhashable key: the base class gives its own error
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """A fresh copy of a schema file (callers may add keys such as ``$id``)."""
    return copy.deepcopy(_read_schema(str(Path(path).resolve())))


@functools.lru_cache(maxsize=None)
def _read_schema(path: str) -> dict[str, Any]:
    return yaml.load(Path(path).read_text(), Loader=YAML_LOADER)


def _validator_class(base=jsonschema.Draft202012Validator, fill: bool = False):
    """A validator class; with ``fill`` it also writes each property's ``default`` into the data
    (what snakemake.utils.validate does).

    A scalar property value that already passed its subschema is not validated again: a sweep's
    runs share most of their values, so a 1,000-run config costs about one run's validation per
    distinct value instead of 1,000 full descents (Snakemake parses the config in every job).
    """
    passed: set[tuple[int, type, Any]] = set()

    def check_properties(validator, properties, instance, schema):
        if not validator.is_type(instance, "object"):
            return
        for prop, subschema in properties.items():
            if fill and "default" in subschema:
                instance.setdefault(prop, copy.deepcopy(subschema["default"]))
            if prop not in instance:
                continue
            value = instance[prop]
            key = (id(subschema), type(value), value) if isinstance(value, SCALARS) else None
            if key is not None and key in passed:
                continue
            errors = list(validator.descend(value, subschema, path=prop, schema_path=prop))
            if not errors and key is not None:
                passed.add(key)
            yield from errors

    def full_pattern(validator, pattern, instance, schema):
        """``pattern`` must match the whole string (Python's ``$`` also matches before a final newline,
        so ``^…$`` alone would pass a name that ends in one)."""
        if validator.is_type(instance, "string") and not re.fullmatch(pattern, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")

    base_type = base.VALIDATORS["type"]

    def finite_type(validator, types, instance, schema):
        """The type check, and a number must be finite (NaN and ±inf pass every comparison check)."""
        yield from base_type(validator, types, instance, schema)
        if isinstance(instance, float) and not math.isfinite(instance):
            yield jsonschema.ValidationError(f"{instance!r} is not a finite number")

    return jsonschema.validators.extend(base, {"properties": check_properties, "pattern": full_pattern,
                                               "type": finite_type})


def make_validator(schema_path: Path = SCHEMA_PATH, fill: bool = False):
    """A validator for the config schema; relative ``$ref``s (e.g. ``icl.schema.yaml``) resolve
    against the schema's folder, as in snakemake.utils.validate."""
    schema = load_schema(schema_path)
    schema["$id"] = Path(schema_path).resolve().as_uri()
    registry = Registry(retrieve=lambda uri: Resource.from_contents(load_schema(Path(urlparse(uri).path))))
    return _validator_class(fill=fill)(schema, registry=registry)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML config; malformed YAML or a repeated key is a one-line :class:`ConfigError`
    naming file and line."""
    try:
        config = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    return config if config is not None else {}


def merge_run_defaults(config: dict[str, Any]) -> None:
    """Give every run the keys of ``defaults`` that it does not override (in place)."""
    defaults, runs = config.get("defaults", {}), config.get("runs")
    if not isinstance(defaults, dict) or not isinstance(runs, dict):
        return
    for name, overrides in runs.items():
        if overrides is None:
            overrides = {}
        if isinstance(overrides, dict):
            runs[name] = {**defaults, **overrides}


def _describe(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        where = f"{path}." if error.absolute_path else ""
        key = extra[0] if extra else "?"
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key '{where}{key}'{hint}; allowed here: {', '.join(allowed)}"
    if error.validator == "enum":
        return f"{path}: {error.instance!r} is not one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "pattern":
        rule = error.schema.get("description", f"must match {error.validator_value}")
        return f"{path}: {error.instance!r} is not allowed: {rule}"
    return f"{path}: {error.message}"


def check_config(config: dict[str, Any]) -> None:
    """Merge run defaults and fill the schema's defaults into ``config`` (in place, as
    snakemake.utils.validate does), in the same pass raising :class:`ConfigError` on the first
    schema violation (one line naming the key path), then on the first broken cross-key rule
    (:func:`check_data_blocks`, :func:`check_run`)."""
    if not isinstance(config, dict):
        raise ConfigError("the config must be a mapping of keys to values")
    merge_run_defaults(config)
    validator = make_validator(fill=True)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(f"config error: {_describe(error)}")
    check_data_blocks(config)
    for name, run in config["runs"].items():
        check_run(f"runs.{name}", run)


def check_data_blocks(config: dict[str, Any]) -> None:
    """What the schema cannot say about ``corpus`` and ``tokenizer``: paths go with a file source
    and only with one; a ``file`` tokenizer needs its path."""
    corpus, tokenizer = config["corpus"], config["tokenizer"]
    if corpus["source"] == "embedded" and corpus["paths"]:
        raise ConfigError("config error: corpus.paths must be empty for corpus.source 'embedded' "
                          "(set source: files, jsonl or parquet to read them)")
    if corpus["source"] != "embedded" and not corpus["paths"]:
        raise ConfigError(f"config error: corpus.paths is empty; corpus.source '{corpus['source']}' needs a path "
                          "or glob")
    if tokenizer["kind"] == "file" and not tokenizer["path"]:
        raise ConfigError("config error: tokenizer.path is required when tokenizer.kind is 'file'")


# Newton–Schulz coefficient sets with their own step count (lipflow.optimizers.NS_COEFFICIENT_SETS;
# a test checks the two agree): ns_steps must equal it.
FIXED_NS_STEPS = {"you": 6}


def check_run(where: str, run: dict[str, Any]) -> None:
    """Cross-key rules of one resolved run: the runs train a language model on the text corpus
    (``mlp`` is the image study's classifier), ``n_heads`` divides ``d_model``, and a Newton–Schulz
    coefficient schedule gets its own number of steps."""
    if run["model"] == "mlp":
        raise ConfigError(f"config error: {where}.model: 'mlp' is the image classifier of the image_mlp study and "
                          "cannot train on the text corpus; use gpt or lipschitz_gpt")
    if run["d_model"] % run["n_heads"]:
        raise ConfigError(f"config error: {where}.n_heads: {run['n_heads']} does not divide d_model {run['d_model']}")
    fixed = FIXED_NS_STEPS.get(run["ns_coefficients"])
    if fixed is not None and run["ns_steps"] != fixed:
        raise ConfigError(f"config error: {where}.ns_steps: ns_coefficients '{run['ns_coefficients']}' has exactly "
                          f"{fixed} steps, got {run['ns_steps']}")


def data_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What a run's training data depends on: the corpus and tokenizer blocks, and a ``file``
    tokenizer's content. (The corpus files' content is not hashed here, at parse time: they are
    the corpus rule's inputs, and a checkpoint resumes only on the token shards it was made on.)"""
    identity = {"corpus": config["corpus"], "tokenizer": config["tokenizer"]}
    if config["tokenizer"]["kind"] == "file":
        identity["tokenizer_sha256"] = tokenizer_file_sha256(config["tokenizer"]["path"])
    return identity


@functools.lru_cache(maxsize=None)
def tokenizer_file_sha256(path: str) -> str:
    """The sha256 of a tokenizer file's bytes; a missing file is a ConfigError naming it."""
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


def expanded_runs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The enabled experiments' runs (name → full run config), each validated like a run."""
    from lipflow.experiments import expand_experiments

    validator = make_validator(fill=True)
    runs = {}
    for name, overrides in expand_experiments(config).items():
        wrapped = {"runs": {name: {**config["defaults"], **overrides}}}
        error = jsonschema.exceptions.best_match(validator.iter_errors(wrapped))
        if error is not None:
            raise ConfigError(f"config error in experiment run {_describe(error)}")
        check_run(f"experiment run {name}", wrapped["runs"][name])
        runs[name] = wrapped["runs"][name]
    return runs


def plain_runs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``runs`` block's runs that train: all of them, unless experiments are selected and
    ``runs_with_experiments`` is false (a selected experiment then runs on its own)."""
    if config.get("experiments") and not config.get("runs_with_experiments", False):
        return {}
    return config["runs"]


def resolve_runs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """run id → resolved run config, for a validated config (defaults filled): the ``runs``
    block's (see plain_runs) plus every run of the enabled experiments."""
    data = data_identity(config)
    resolved = {}
    for name, cfg in {**plain_runs(config), **expanded_runs(config)}.items():
        run_id = f"{name}-{config_hash({'run': cfg, 'data': data})[:8]}"
        resolved[run_id] = cfg
    return resolved


