"""The trace CSV format, shared by ``synth`` (writes it) and ``replay`` (reads it).

One row per request::

    id,arrival_s,width,height,steps,controlnets,loras
    0,0.000,1024,1024,30,canny:1.0,style-003:0.80;style-017:0.65
    1,0.412,832,1216,30,,style-001:1.00

``arrival_s`` is seconds from the start of the trace; ``controlnets`` and
``loras`` are ``;``-separated ``NAME[:SCALE]`` lists (empty: none). Extra
columns are ignored. Malformed rows are reported with their line number.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

COLUMNS = ("id", "arrival_s", "width", "height", "steps", "controlnets", "loras")


class TraceError(ValueError):
    """A trace that cannot be used (missing columns, or bad rows with ``strict``)."""


@dataclass
class TraceRow:
    id: int
    arrival_s: float
    width: int
    height: int
    steps: int
    controlnets: list[tuple[str, float]] = field(default_factory=list)
    loras: list[tuple[str, float]] = field(default_factory=list)
    line: int = 0

    def to_csv(self) -> dict:
        return {
            "id": self.id,
            "arrival_s": f"{self.arrival_s:.6f}",
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "controlnets": format_pairs(self.controlnets),
            "loras": format_pairs(self.loras),
        }


def format_pairs(pairs: list[tuple[str, float]]) -> str:
    return ";".join(f"{n}:{s:.2f}" for n, s in pairs)


def parse_pairs(text: str, column: str) -> list[tuple[str, float]]:
    out = []
    for item in (text or "").split(";"):
        item = item.strip()
        if not item:
            continue
        name, sep, scale = item.rpartition(":")
        if not sep:
            name, scale = item, "1.0"
        if not name or any(c in name for c in ",/\\ "):
            raise ValueError(f"{column}: bad name {name!r}")
        try:
            value = float(scale)
        except ValueError:
            raise ValueError(f"{column}: scale {scale!r} of {name!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{column}: scale of {name!r} is not finite")
        out.append((name, value))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{column}: a name repeats")
    return out


def _int(row: dict, column: str, low: int) -> int:
    text = (row.get(column) or "").strip()
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{column}: {text!r} is not an integer") from None
    if value < low:
        raise ValueError(f"{column}: {value} is below {low}")
    return value


def parse_row(row: dict, line: int) -> TraceRow:
    if None in row:  # more fields than the header has
        raise ValueError(f"{len(row) - 1 + len(row[None])} fields, the header has {len(row) - 1}")
    missing = [c for c in COLUMNS if row.get(c) is None]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    text = row["arrival_s"].strip()
    try:
        arrival = float(text)
    except ValueError:
        raise ValueError(f"arrival_s: {text!r} is not a number") from None
    if not math.isfinite(arrival) or arrival < 0:
        raise ValueError(f"arrival_s: {text!r} is not a time >= 0")
    return TraceRow(
        id=_int(row, "id", 0),
        arrival_s=arrival,
        width=_int(row, "width", 8),
        height=_int(row, "height", 8),
        steps=_int(row, "steps", 1),
        controlnets=parse_pairs(row["controlnets"], "controlnets"),
        loras=parse_pairs(row["loras"], "loras"),
        line=line,
    )


def read_trace(path: Path, strict: bool = False) -> tuple[list[TraceRow], list[tuple[int, str]]]:
    """Rows sorted by arrival, and ``(line, message)`` for each malformed row (skipped).

    With ``strict``, any malformed row raises :class:`TraceError` listing them all.
    """
    rows, errors = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise TraceError(f"{path}: empty file, expected a header {','.join(COLUMNS)}")
        absent = [c for c in COLUMNS if c not in reader.fieldnames]
        if absent:
            raise TraceError(f"{path}:1: header lacks column(s) {', '.join(absent)}")
        seen: set[int] = set()
        for raw in reader:
            line = reader.line_num
            try:
                row = parse_row(raw, line)
                if row.id in seen:
                    raise ValueError(f"id: {row.id} repeats")
            except ValueError as exc:
                errors.append((line, str(exc)))
                continue
            seen.add(row.id)
            rows.append(row)
    if strict and errors:
        listing = "\n".join(f"{path}:{line}: {msg}" for line, msg in errors)
        raise TraceError(f"{len(errors)} malformed row(s):\n{listing}")
    rows.sort(key=lambda r: (r.arrival_s, r.id))
    return rows, errors


def write_trace(path: Path, rows: list[TraceRow]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow(r.to_csv())
