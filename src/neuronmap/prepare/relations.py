"""Loading relation files (the format of Hernandez et al. 2024, see data/relations/README.md)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import NeuronmapError

_LITERAL_UNICODE_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


@dataclass(frozen=True)
class Fact:
    subject: str
    objects: tuple[str, ...]  # first is the canonical answer; all count as correct


@dataclass(frozen=True)
class Relation:
    name: str
    path: Path
    templates: tuple[str, ...]
    facts: tuple[Fact, ...]


def find_relation_file(directory: str | Path, name: str) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise NeuronmapError(f"relations.dir: {directory} is not a directory")
    matches = sorted(directory.rglob(f"{name}.json"))
    if not matches:
        raise NeuronmapError(f"relations.names: no file {name}.json under {directory}")
    if len(matches) > 1:
        listed = ", ".join(str(m) for m in matches)
        raise NeuronmapError(f"relations.names: {name} is ambiguous, found {listed}")
    return matches[0]


def _clean(text: str) -> str:
    # Some upstream objects are double-escaped (the literal text "Bras\u00edlia").
    text = _LITERAL_UNICODE_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    return " ".join(text.split())


def load_relation(path: str | Path, name: str | None = None) -> Relation:
    """Parse and check one relation file; every problem names the file and the field."""
    path = Path(path)
    name = name or path.stem
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NeuronmapError(f"{path}: relation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NeuronmapError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise NeuronmapError(f"{path}: expected a JSON object with prompt_templates and samples")

    templates = data.get("prompt_templates")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise NeuronmapError(f"{path}: prompt_templates must be a non-empty list of strings")
    for i, template in enumerate(templates):
        if template.count("{}") != 1:
            raise NeuronmapError(
                f"{path}: prompt_templates[{i}] {template!r} must contain exactly one {{}} for the subject")

    samples = data.get("samples")
    if not isinstance(samples, list):
        raise NeuronmapError(f"{path}: samples must be a list of {{subject, object}} objects")
    objects_by_subject: dict[str, list[str]] = {}
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict) or not all(
                isinstance(sample.get(key), str) and sample[key].strip() for key in ("subject", "object")):
            raise NeuronmapError(f"{path}: samples[{i}] needs non-empty string fields subject and object")
        subject, obj = _clean(sample["subject"]), _clean(sample["object"])
        objects = objects_by_subject.setdefault(subject, [])
        if obj not in objects:  # duplicate facts collapse; a subject's other objects stay acceptable answers
            objects.append(obj)
    if not objects_by_subject:
        raise NeuronmapError(f"{path}: samples is empty, the relation has no facts")

    facts = tuple(Fact(subject, tuple(objs)) for subject, objs in objects_by_subject.items())
    return Relation(name=name, path=path, templates=tuple(templates), facts=facts)
