"""The results file of an evaluation: a header with the run's settings, then one JSON record per answer.

A re-run with the same settings resumes (answers already recorded are kept; errored ones are asked again);
a re-run with other settings refuses, naming what differs, unless told to start afresh. A last line cut
short by a crash is removed before anything is appended, so it cannot swallow the next record.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

FORMAT = "phi4-eval/1"


@dataclass(frozen=True)
class RunSettings:
    """Everything that changes an answer or its score; a resume must match all of it."""

    benchmark: str
    model: str
    temperature: float
    max_tokens: int
    repeats: int
    limit: int | None
    seed: int | None
    extraction: str
    timeout_seconds: float
    data_sha256: str

    def header(self) -> dict[str, Any]:
        return {"type": "header", "format": FORMAT, **asdict(self)}


class ResumeMismatch(ValueError):
    pass


class ResultsFile:
    """Open with `ResultsFile.open(path, settings, fresh)`; `done` maps (id, repeat) to its record."""

    def __init__(self, path: Path, handle: IO[str], done: dict[tuple[str, int], dict[str, Any]]) -> None:
        self.path = path
        self._handle = handle
        self.done = done

    @classmethod
    def open(cls, path: Path, settings: RunSettings, fresh: bool = False) -> ResultsFile:
        done: dict[tuple[str, int], dict[str, Any]] = {}
        if fresh or not path.exists() or path.stat().st_size == 0:
            handle = path.open("w", encoding="utf-8")
            handle.write(json.dumps(settings.header()) + "\n")
            handle.flush()
            return cls(path, handle, done)
        _repair_torn_tail(path)
        lines = path.read_text(encoding="utf-8").splitlines()
        header = _parse(lines[0]) if lines else None
        if not header or header.get("type") != "header" or header.get("format") != FORMAT:
            raise ResumeMismatch(f"{path} has no phi4 eval settings header (made by another tool or an older "
                                 "phi4): use another --output, or --fresh to overwrite it")
        differing = [f"{key} {header.get(key)!r} there, {value!r} now" for key, value in asdict(settings).items()
                     if header.get(key) != value]
        if differing:
            raise ResumeMismatch(f"{path} was made with other settings ({'; '.join(differing)}): resuming would mix "
                                 "answers; use the same settings, another --output, or --fresh to start over")
        for line in lines[1:]:
            record = _parse(line)
            if record is not None and "id" in record and "repeat" in record:
                key = (record["id"], record["repeat"])
                if "error" in record:
                    done.pop(key, None)  # asked again on this run
                else:
                    done[key] = record
        return cls(path, path.open("a", encoding="utf-8"), done)

    def append(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _repair_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline (the write a crash interrupted) off the file."""
    with path.open("rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)
