"""Readers for JSONL and CSV files in mogrpo's schemas.

Strict by design: a malformed row raises `DataError` naming the file and line; rows
skipped on purpose (e.g. a labelled row with no label for any requested aspect) are
counted in a `LoadReport`, never dropped silently.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mogrpo.data.schema import (
    DataError,
    LabelledResponse,
    PromptRecord,
    labelled_from_dict,
    prompt_from_dict,
)


@dataclass
class LoadReport:
    """What a load read and what it skipped on purpose, and why."""

    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def merge(self, other: "LoadReport") -> None:
        self.read += other.read
        self.kept += other.kept
        self.skipped.update(other.skipped)

    def summary(self) -> str:
        parts = [f"read {self.read}, kept {self.kept}"]
        parts += [f"skipped {n} ({reason})" for reason, n in sorted(self.skipped.items())]
        return "; ".join(parts)


def _check_readable(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a .jsonl or .csv file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: cannot be read (permission denied)")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                        f"{exc.start + 1}); "
                        f"save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield (where, object) for every non-blank line; `where` is 'file:line'. A file with
    no row at all is an error (an empty file is a mistake, never a data set)."""
    path = Path(path)
    _check_readable(path)
    n = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column "
                                f"{exc.colno})") from None
            n += 1
            yield where, row
    if n == 0:
        raise DataError(f"{path}: the file is empty (no JSON lines)")



def iter_csv(path: str | os.PathLike, *,
             comment_prefix: str = "#") -> Iterator[tuple[str, dict[str, str]]]:
    """Yield (where, row) for a CSV with a header; leading lines starting with `#` are skipped.

    `where` is 'file:line' with the physical line on which the record starts (records may
    span lines inside quoted fields).
    """
    import io

    path = Path(path)
    _check_readable(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # raises the message of the line the bad byte is on
        line_start, lineno = raw.rfind(b"\n", 0, exc.start) + 1, raw.count(b"\n", 0, exc.start) + 1
        _decode(raw[line_start:exc.end], f"{path}:{lineno}")
        raise
    with io.StringIO(text, newline="") as fh:
        header_offset = 0
        pos = fh.tell()
        line = fh.readline()
        while line and line.startswith(comment_prefix):
            header_offset += 1
            pos = fh.tell()
            line = fh.readline()
        fh.seek(pos)
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty CSV (no header row)") from None
        header = [h.strip() for h in header]
        start = header_offset + reader.line_num + 1
        for row in reader:
            where = f"{path}:{start}"
            start = header_offset + reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{where}: expected {len(header)} columns ({', '.join(header)}), "
                                f"found {len(row)}; check the quoting of that row")
            yield where, dict(zip(header, row))


def _iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    _check_readable(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return iter_jsonl(path)
    if suffix == ".csv":
        return iter_csv(path)
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .csv")


def _unique_prompts(rows, source: str) -> list[PromptRecord]:
    """Prompt records of `rows` ((where, row, default id) each), ids unique: a repeated id
    names both places."""
    out: list[PromptRecord] = []
    seen: dict[str, str] = {}
    for where, row, default_id in rows:
        rec = prompt_from_dict(row, where, default_source=source, default_id=default_id)
        if rec.id in seen:
            raise DataError(f"{where}: duplicate prompt id {rec.id!r} (first at {seen[rec.id]})")
        seen[rec.id] = where
        out.append(rec)
    return out


def load_prompts(path: str | os.PathLike, *,
                 report: LoadReport | None = None) -> list[PromptRecord]:
    """Prompt records from JSONL/CSV. Ids must be unique within the file; a row without one
    gets FILE-N (its row number)."""
    path = Path(path)
    report = report if report is not None else LoadReport()

    def rows():
        for where, row in _iter_rows(path):
            report.read += 1
            if isinstance(row, dict) and isinstance(row.get("messages"), str):
                try:
                    row = {**row, "messages": json.loads(row["messages"])}
                except json.JSONDecodeError:
                    raise DataError(f"{where}: 'messages' is not a JSON list") from None
            yield where, row, f"{path.stem}-{report.read}"

    out = _unique_prompts(rows(), path.stem)
    report.kept += len(out)
    return out


def prompts_from_rows(rows, *, name: str = "dataset",
                      column_mapping: dict[str, str] | None = None) -> list[PromptRecord]:
    """Prompt records from in-memory rows: a `datasets.Dataset` or a list of dicts, each with
    'prompt' (a string, or a conversation as a list of {"role", "content"} messages), 'text'
    or 'messages'; `column_mapping` renames the rows' columns first ({"question": "prompt"}).
    Other columns are kept (`PromptRecord.columns`) for Python reward functions."""
    mapping = dict(column_mapping or {})

    def renamed():
        for i, row in enumerate(rows):
            where = f"{name} row {i}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a dict with 'prompt', got "
                                f"{type(row).__name__}")
            missing = sorted(set(mapping) - set(row))
            if missing:
                raise DataError(f"{where}: column_mapping names {missing}, which the row does "
                                f"not have (its columns: {sorted(row)})")
            yield where, {mapping.get(k, k): v for k, v in row.items()}, f"{name}-{i}"

    out = _unique_prompts(renamed(), name)
    if not out:
        raise DataError(f"{name}: no prompts (an empty dataset)")
    return out


def load_labelled(path: str | os.PathLike, aspects: tuple[str, ...] | list[str],
                  *, report: LoadReport | None = None) -> list[LabelledResponse]:
    """Labelled responses from JSONL/CSV; rows that label none of `aspects` are skipped and
    counted."""
    path = Path(path)
    report = report if report is not None else LoadReport()
    out: list[LabelledResponse] = []
    for where, row in _iter_rows(path):
        report.read += 1
        rec = labelled_from_dict(row, aspects, where, default_source=path.stem)
        if rec.n_labels() == 0:
            report.skip(f"no label for any of {', '.join(aspects)}")
            continue
        out.append(rec)
    report.kept += len(out)
    return out


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically (temp file + rename)."""
    from mogrpo.config import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
