"""The schema validator's cache of passed scalar values (a 1,000-run sweep validates each distinct value
once) never lets a wrong value through: its key holds the subschema's identity, so the subschema must
live as long as the key (a freed one's id is reused by the next schema copy: ``depth_mup: 1`` then
passed as the boolean it is not: 1,811 of 2,000 times here)."""

from __future__ import annotations


import lipflow.config.schema as schema
from lipflow.config.schema import first_error, make_validator


def test_a_value_of_the_wrong_type_is_refused_after_any_number_of_checks():
    validator = make_validator(definition="run")
    misses = []
    for attempt in range(2000):
        assert first_error(validator, {"n_layers": 1, "d_model": 8, "steps": 1, "seed": 1}) is None
        _ = [{} for _ in range(100)]  # new objects take the freed ids
        if first_error(validator, {"depth_mup": 1}) is None:
            misses.append(attempt)
    assert misses == []


def test_each_schema_file_is_read_once_per_validator(monkeypatch):
    """The schema files a validator's ``$ref``s name are read (and deep-copied) once, not on each check."""
    reads = []
    original = schema.load_schema
    monkeypatch.setattr(schema, "load_schema", lambda path=schema.SCHEMA_PATH: reads.append(path) or original(path))
    validator = make_validator(definition="run")
    for seed in range(20):
        assert first_error(validator, {"seed": seed, "model": "lipschitz_gpt"}) is None
    assert len(reads) == len(set(reads)) > 0
