"""A job's journal: one JSON line per finished unit, appended and synced as each unit is done, so
a killed job, run again, skips those units and never asks its text model about them again.

The first line holds what the records depend on (the settings, the job's units); a journal
written for anything else is discarded. A last line cut short by the kill is ignored."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("neuronmap")


def unit_key(site: str, layer: int, unit: int) -> str:
    return f"{site}/{layer}/{unit}"


class Journal:
    def __init__(self, path: str | os.PathLike, header: dict):
        self.path = Path(path)
        self.header = json.loads(json.dumps(header, sort_keys=True))
        self.done: dict[str, dict] = {}
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            if lines and self._parse(lines[0]) == {"header": self.header}:
                for line in lines[1:]:
                    record = self._parse(line)
                    if record is not None:
                        self.done[record["key"]] = record
                if len(self.done) < len(lines) - 1:  # a line cut short: appending after it would join the two
                    self._rewrite()
                log.info("%s: resuming, %d units already done", self.path, len(self.done))
            else:
                log.info("%s: written for other settings or units: starting afresh", self.path)
        if not self.done:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"header": self.header}, sort_keys=True) + "\n", encoding="utf-8")

    @staticmethod
    def _parse(line: str):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return None

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        lines = [{"header": self.header}, *self.done.values()]
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in lines), encoding="utf-8")
        os.replace(tmp, self.path)

    def add(self, key: str, record: dict) -> None:
        record = {"key": key, **record}
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.done[key] = record

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
