"""Validating a run's config against config.schema.yaml (beside this module, shipped as package
data), which also fills every default."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

from ..errors import NeuronmapError

# Beside the module, so that an installed package finds it as a checkout does.
SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _filling_defaults(validator_class):
    check_properties = validator_class.VALIDATORS["properties"]

    def properties(validator, declared, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in declared.items():
                if "default" in subschema:
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from check_properties(validator, declared, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": properties})


def validated(config: dict, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """A copy of `config` checked against the schema, with every default filled in and keys in
    one order (Snakemake compares params by their text, so key order must not count as a change).
    A problem is one line naming the key."""
    schema = load_schema(schema_path)
    filled = copy.deepcopy(config)
    validator = _filling_defaults(jsonschema.validators.validator_for(schema))(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(filled))
    if error is not None:
        key = ".".join(str(part) for part in error.absolute_path)
        raise NeuronmapError(f"config: {key + ': ' if key else ''}{error.message}")
    return _sorted_keys(filled)


def defaults(schema_path: str | Path = SCHEMA_PATH) -> dict:
    """The config an empty config file gets."""
    return validated({}, schema_path)


def _sorted_keys(value):
    if isinstance(value, dict):  # keys as text: YAML reads max_memory's `0:` as a number, JSON writes "0"
        return {str(key): _sorted_keys(value[key]) for key in sorted(value, key=str)}
    return value
