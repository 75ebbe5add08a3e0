"""docs/config.md, generated from the config schema: every key (nested keys dotted), its type, its
default and its description, so that no default is written anywhere but in the schema.

Regenerate after changing the schema:

    python -m neuronmap.config.reference > docs/config.md

(`make docs` does the same); tests/test_docs.py fails while docs/config.md is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .schema import SCHEMA_PATH, load_schema

COMMAND = "python -m neuronmap.config.reference > docs/config.md"


def reference(schema: dict | None = None, schema_path: str | Path = SCHEMA_PATH) -> str:
    """The markdown text of docs/config.md."""
    schema = load_schema(schema_path) if schema is None else schema
    properties = schema["properties"]
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from {_shown_path(schema_path)} by `{COMMAND}`; do not edit by hand. -->",
        "",
        "Every key a run's config may set, with its type, its default and what it does. The schema",
        f"(`{_shown_path(schema_path)}`) is the one place defaults live: it validates the config and",
        "fills in every key the config leaves out. `config.yaml` sets only what differs from these",
        "defaults or what a user changes first; `--configfile my.yaml` (or `make run CONFIG=my.yaml`)",
        "is merged over `config.yaml` key by key, nested keys included.",
        "",
    ]
    top = {name: spec for name, spec in properties.items() if not _is_section(spec)}
    lines += _table(top, prefix="")
    _sections(properties, "", lines)
    return "\n".join(lines) + "\n"


def _sections(properties: dict, prefix: str, lines: list[str]) -> None:
    """A section per group of keys, its nested groups (explain.explainer) after it."""
    for name, spec in properties.items():
        if _is_section(spec):
            lines += ["", f"## `{prefix}{name}`", ""]
            if spec.get("description"):
                lines += [_text(spec["description"]), ""]
            lines += _table({n: s for n, s in spec["properties"].items() if not _is_section(s)},
                            prefix=f"{prefix}{name}.")
            _sections(spec["properties"], f"{prefix}{name}.", lines)


def _is_section(spec: dict) -> bool:
    return spec.get("type") == "object" and "properties" in spec


def _table(properties: dict, prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, spec in properties.items():
        default = f"`{_value(spec['default'])}`" if "default" in spec else "(required)"
        cells = [f"`{prefix}{name}`", _type(spec), default, _text(spec.get("description", ""))]
        # GitHub's tables split cells at every unescaped |, inside code spans too.
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return rows


def _type(spec: dict) -> str:
    if "oneOf" in spec:
        return " or ".join(_type(choice) for choice in spec["oneOf"])
    if "enum" in spec:
        choices = [f"`{_value(choice)}`" for choice in spec["enum"]]
        return choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)
    kind = spec.get("type")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array":
        item = spec.get("items", {})
        if "enum" in item:
            items = "from " + ", ".join(f"`{_value(choice)}`" for choice in item["enum"])
        else:
            items = f"({_type(item)})"
        return ("non-empty list " if spec.get("minItems") else "list ") + items
    if kind == "object":
        keys = spec.get("propertyNames", {}).get("pattern")
        values = spec.get("additionalProperties")
        if isinstance(values, dict):
            return f"map: key `{keys}` to {_type(values)}" if keys else f"map to {_type(values)}"
        return "object"
    text = kind or "any"
    if "pattern" in spec:
        text += f" `{spec['pattern']}`"
    return text + _bounds(spec)


def _bounds(spec: dict) -> str:
    low = [f"≥ {spec['minimum']}"] if "minimum" in spec else []
    low += [f"> {spec['exclusiveMinimum']}"] if "exclusiveMinimum" in spec else []
    high = [f"≤ {spec['maximum']}"] if "maximum" in spec else []
    high += [f"< {spec['exclusiveMaximum']}"] if "exclusiveMaximum" in spec else []
    if "minLength" in spec:
        low.append("not empty")
    return " " + ", ".join(low + high) if low or high else ""


def _value(value) -> str:
    """A default as a user writes it in YAML (flow style)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_value(item)}" for key, item in value.items()) + "}"
    return json.dumps(value)  # true, false, null and numbers as YAML reads them


def _text(text: str) -> str:
    # One line; `<run>` would read as an HTML tag and vanish.
    return " ".join(str(text).split()).replace("<", "&lt;")


def _shown_path(path: str | Path) -> str:
    """The schema's path from the checkout's root (from site-packages when installed)."""
    path = Path(path).resolve()
    package = Path(__file__).resolve().parents[1]
    for root in (package.parents[1], package.parent):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.name


def main() -> None:
    sys.stdout.write(reference())


if __name__ == "__main__":
    main()
