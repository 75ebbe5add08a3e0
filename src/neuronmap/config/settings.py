"""What each command reads from the config, as one frozen dataclass.

A field is read from the config key of the same name, or from the key its metadata names
(`setting("split.seed")`); a field whose type is itself a Settings class is built from the same
config. No field has a default: the schema is the one place defaults live, and a rule hands its
command the settings it reads as one JSON value, so Snakemake reruns a job when one of them
changes and never when another key does.
"""

from __future__ import annotations

import dataclasses
import json
import typing


def setting(key: str):
    """A field read from `key` (dotted for nested keys) instead of the key of its own name."""
    return dataclasses.field(metadata={"key": key})


def config_key(field: dataclasses.Field) -> str:
    return field.metadata.get("key", field.name)


def lookup(config: dict, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


class Settings:
    """Base of the settings dataclasses: built from a validated config, or from JSON."""

    @classmethod
    def from_config(cls, config: dict):
        return cls._build(lambda field: lookup(config, config_key(field)),
                          lambda kind, field: kind.from_config(config))

    @classmethod
    def from_dict(cls, data: dict):
        return cls._build(lambda field: data[field.name], lambda kind, field: kind.from_dict(data[field.name]))

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    @classmethod
    def defaults(cls, **changes):
        """The settings an empty config gives, with `changes` (tests and benchmarks start here)."""
        from .schema import defaults
        return dataclasses.replace(cls.from_config(defaults()), **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def _build(cls, plain_value, nested_value):
        hints = typing.get_type_hints(cls)
        values = {}
        for field in dataclasses.fields(cls):
            kind = hints[field.name]
            if isinstance(kind, type) and issubclass(kind, Settings):
                values[field.name] = nested_value(kind, field)
            else:
                value = plain_value(field)
                values[field.name] = tuple(value) if typing.get_origin(kind) is tuple else value
        return cls(**values)


def settings_classes() -> list[type]:
    """Every settings dataclass of the package (for the tests that hold them to the schema)."""
    found, todo = [], list(Settings.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found
