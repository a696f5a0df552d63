"""The one schema validator: YAML loading, JSON-schema (draft 2020-12) validation that fills each
property's ``default`` in the same pass (what snakemake.utils.validate does), and one-line errors
naming the key path. The run config (``workflow/schemas/config.schema.yaml``) and the ICL block
(``lipflow/studies/icl/config_schema.yaml``) are both validated here.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import jsonschema
import yaml
from referencing import Registry, Resource

from lipflow.errors import ConfigError, unique_keys

SCHEMA_PATH = Path(__file__).resolve().parent.parent.parent / "workflow" / "schemas" / "config.schema.yaml"
EXPERIMENTS_SCHEMA = SCHEMA_PATH.with_name("experiments.schema.yaml")

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~7× faster; every job parses
SCALARS = (str, int, float, bool, type(None))


class UniqueKeyLoader(YAML_LOADER):
    """A safe YAML loader on which a mapping that repeats a key is an error naming the key and
    its line (PyYAML keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges keys the mapping's own override
                if "<<" in seen:  # PyYAML would keep the last: merge several as `<<: [*a, *b]`
                    raise yaml.constructor.ConstructorError(None, None, "duplicate key '<<' (merge several "
                                                            "mappings with one `<<: [*a, *b]`)", key_node.start_mark)
                seen.add("<<")
                continue
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
    passed: dict[tuple[int, type, Any], Any] = {}  # key → its subschema, held so that its id is never reused

    def fill_default(validator, instance, prop, subschema):
        """The property's ``default``, or that of the schema its ``$ref`` names (so a block defined in
        another schema file keeps its default in that file)."""
        if "default" not in subschema and "$ref" in subschema:
            subschema = validator._resolver.lookup(subschema["$ref"]).contents
        if "default" in subschema:
            instance[prop] = copy.deepcopy(subschema["default"])

    def check_properties(validator, properties, instance, schema):
        if not validator.is_type(instance, "object"):
            return
        for prop, subschema in properties.items():
            if fill and prop not in instance:
                fill_default(validator, instance, prop, subschema)
            if prop not in instance:
                continue
            value = instance[prop]
            key = (id(subschema), type(value), value) if isinstance(value, SCALARS) else None
            if key is not None and key in passed:
                continue
            errors = list(validator.descend(value, subschema, path=prop, schema_path=prop))
            if not errors and key is not None:
                passed[key] = subschema
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

    # an integer is an int: JSON Schema also counts 2048.0, which the code then fails on (range, shapes)
    integers = base.TYPE_CHECKER.redefine(
        "integer", lambda checker, instance: isinstance(instance, int) and not isinstance(instance, bool))
    return jsonschema.validators.extend(base, {"properties": check_properties, "pattern": full_pattern,
                                               "type": finite_type}, type_checker=integers)


def make_validator(schema_path: Path = SCHEMA_PATH, fill: bool = False, definition: str | None = None):
    """A validator for a schema file, or for its ``$defs/<definition>``; relative ``$ref``s (e.g.
    ``icl.schema.yaml``) resolve against the schema's folder, as in snakemake.utils.validate."""
    uri = Path(schema_path).resolve().as_uri()
    retrieved: dict[str, Resource] = {}  # one copy per schema file: the same subschema objects on every check

    def retrieve(uri: str) -> Resource:
        if uri not in retrieved:
            # as_uri percent-encodes a space, non-ASCII or '%' in the checkout's path: decode it back
            retrieved[uri] = Resource.from_contents(load_schema(Path(unquote(urlparse(uri).path))))
        return retrieved[uri]

    registry = Registry(retrieve=retrieve)
    if definition is not None:
        return _validator_class(fill=fill)({"$ref": f"{uri}#/$defs/{definition}"}, registry=registry)
    schema = load_schema(schema_path)
    schema["$id"] = uri
    return _validator_class(fill=fill)(schema, registry=registry)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML config, or a JSON one as JSON first (as Snakemake reads a config file: YAML reads JSON's
    ``1e-05`` as a string); an empty file is ``{}``. Malformed YAML, a repeated key or a top level that
    is not a mapping of keys is a one-line :class:`ConfigError` naming the file (and line)."""
    try:
        with open(path, "rb") as f:  # never more than a config can be: /dev/zero or a data file would fill memory
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES:,} bytes, more than any config (not a config "
                              "file?)")
        text = data.decode("utf-8")
        try:
            config = json.loads(text, object_pairs_hook=unique_keys)
        except ValueError:  # not JSON (a repeated key, RepeatedKey, is a ValueError too: YAML then names its line)
            config = yaml.load(text, Loader=UniqueKeyLoader)
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read (an anchor that refers to itself?)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except ValueError as err:  # a value YAML cannot build: an integer past 4,300 digits, a date of month 13
        raise ConfigError(f"{path}: a value that cannot be read ({str(err).split(';')[0]})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config file holds a mapping of keys at its top level, not a "
                          f"{type(config).__name__}")
    if nesting_depth(config) > MAX_NESTING:
        raise ConfigError(f"{path}: nested deeper than {MAX_NESTING} levels (an anchor that refers to itself?)")
    return config


MAX_NESTING = 64  # far beyond any config block; a YAML anchor inside itself makes an endless one
MAX_CONFIG_BYTES = 16 * 2**20  # the most of a config file read (lipflow's own config.yaml: some 2 kB)


def nesting_depth(value: Any, limit: int = MAX_NESTING, _open: set[int] | None = None,
                  _known: dict[int, int] | None = None) -> int:
    """How deeply mappings and lists nest in ``value``, counted up to ``limit`` + 1; a mapping or
    list inside itself (a YAML anchor used within its own node) counts as deeper than ``limit``.
    Each node is measured once, however many aliases share it."""
    if not isinstance(value, (dict, list)):
        return 0
    _open, _known = (set(), {}) if _open is None else (_open, _known)
    node = id(value)
    if node in _open or len(_open) > limit:
        return limit + 1
    if node not in _known:
        _open.add(node)
        children = value.values() if isinstance(value, dict) else value
        _known[node] = 1 + max((nesting_depth(child, limit, _open, _known) for child in children), default=0)
        _open.discard(node)
    return _known[node]


def describe(error: jsonschema.ValidationError, prefix: str = "") -> str:
    """One line naming the key path (below ``prefix``, the block the instance is) and what is allowed."""
    path = ".".join([prefix, *map(str, error.absolute_path)] if prefix else map(str, error.absolute_path))
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        # a YAML key need not be a string (`1:`, `yes:`, `null:`): named by its text, as a path names it
        extra = sorted(map(str, set(error.instance) - set(allowed))) if isinstance(error.instance, dict) else []
        where = f"{path}." if path else ""
        key = extra[0] if extra else "?"
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key '{where}{key}'{hint}; allowed here: {', '.join(allowed)}"
    path = path or "<top level>"
    if error.validator == "enum":
        names = [str(value) for value in error.validator_value]
        close = difflib.get_close_matches(str(error.instance), names, n=1) if isinstance(error.instance, str) else []
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{path}: {error.instance!r} is not one of {', '.join(names)}{hint}"
    if error.validator == "pattern":
        rule = error.schema.get("description", f"must match {error.validator_value}")
        return f"{path}: {error.instance!r} is not allowed: {rule}"
    # YAML's null as a value (`defaults:` with every key commented out), not as a key (`null:`, a property name)
    if error.validator == "type" and error.instance is None and "propertyNames" not in error.schema_path:
        expected = error.validator_value
        if not isinstance(expected, str):
            expected = " or ".join(expected)
        return f"{path}: empty (null), not of type '{expected}': give it a value or leave the key out"
    if error.validator == "type" and isinstance(error.instance, str):
        return f"{path}: {error.message}{read_as_text(error.instance, error.validator_value)}"
    return f"{path}: {error.message}"


BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off"}


def read_as_text(value: str, types: str | list[str]) -> str:
    """Why a number or boolean arrived as the text ``value``, and how to write it: YAML 1.1 reads 3e-4
    (no dot, or no exponent sign) as text, and ``snakemake --config`` reads only True and False as
    booleans and every value inside {…} or […] as text. '' when ``value`` is no number or boolean word."""
    types = {types} if isinstance(types, str) else set(types)
    if types & {"number", "integer"}:
        try:
            if not math.isfinite(float(value)):
                return ""
        except ValueError:
            return ""
        exponent = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]*)[eE]([-+]?)([0-9]+)\s*", value)
        if exponent and ("." not in exponent[1] or not exponent[2]):
            mantissa, sign, digits = exponent.groups()
            mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
            return f" (YAML reads {value} as text: write {mantissa}e{sign or '+'}{digits}, with a dot and a signed exponent)"
        return (" (a number read as text: unquote it in a config file; snakemake --config reads a value inside "
                "{…} or […] as text, so set that one in a --configfile overlay)")
    if "boolean" in types and value.lower() in BOOLEAN_WORDS:
        return (" (a boolean read as text: write true or false in a config file; snakemake --config reads only "
                "True and False as booleans, and a value inside {…} or […] as text)")
    return ""


def first_error(validator, instance: Any, prefix: str = "") -> str | None:
    """Validate ``instance`` (filling defaults when the validator fills) and describe the most
    relevant violation, or None when it is valid."""
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    return None if error is None else describe(error, prefix)


def validate(instance: dict[str, Any], schema_path: Path, prefix: str = "") -> dict[str, Any]:
    """A copy of ``instance`` with the schema's defaults filled; the first violation is a
    :class:`ConfigError` naming the key path below ``prefix``."""
    filled = copy.deepcopy(instance)
    message = first_error(make_validator(schema_path, fill=True), filled, prefix)
    if message is not None:
        raise ConfigError(message)
    return filled
