"""NLI sentence pairs for stage-1 text pre-training, in the SimCSE format that LamRA reads.

Columns ``sent0`` (anchor), ``sent1`` (positive) and an optional ``hard_neg``, as

- csv or tsv with a header line naming the columns (SimCSE's ``nli_for_simcse.csv``), or
- jsonl, one object per line with those keys.

Faults are reported as ``<file>:<1-based line>: <what is wrong>``.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("sent0", "sent1", "hard_neg")
_DELIMITERS = {".csv": ",", ".tsv": "\t"}


@dataclass(frozen=True)
class NliPair:
    anchor: str
    positive: str
    hard_negative: str | None = None
    origin: str = ""  # "<file>:<line>"


def _pair(values: dict, has_hard_negative: bool, where: str) -> NliPair:
    names = COLUMNS if has_hard_negative else COLUMNS[:2]
    for name in names:
        value = values.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {name} must be a non-empty string, got {value!r}")
    return NliPair(values["sent0"], values["sent1"], values["hard_neg"] if has_hard_negative else None, where)


def _load_jsonl(path: Path) -> list[NliPair]:
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            missing = [name for name in COLUMNS[:2] if name not in record]
            if missing:
                raise ValueError(f"{where}: missing required field(s) {', '.join(missing)}")
            pairs.append(_pair(record, "hard_neg" in record, where))
    return pairs


def _load_delimited(path: Path, delimiter: str) -> list[NliPair]:
    pairs = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}:1: empty file; expected a header with {', '.join(COLUMNS[:2])}[, hard_neg]")
        header = [name.strip() for name in header]
        missing = [name for name in COLUMNS[:2] if name not in header]
        if missing:
            raise ValueError(f"{path}:1: header lacks column(s) {', '.join(missing)}; got {header}")
        has_hard_negative = "hard_neg" in header
        for row in reader:
            # csv counts physical lines, so a quoted field spanning lines still gives the line the row ends on.
            where = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{where}: expected {len(header)} fields ({', '.join(header)}), got {len(row)}")
            pairs.append(_pair(dict(zip(header, row)), has_hard_negative, where))
    return pairs


def load_nli_pairs(path: str | Path) -> list[NliPair]:
    """Pairs from a .jsonl, .csv or .tsv file, in file order."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    if path.suffix in _DELIMITERS:
        return _load_delimited(path, _DELIMITERS[path.suffix])
    raise ValueError(f"{path}: unknown NLI pair format {path.suffix!r}; expected .jsonl, .csv or .tsv")


def write_nli_pairs(path: str | Path, pairs: Iterable[NliPair]) -> None:
    """Write pairs as tsv with a ``sent0, sent1[, hard_neg]`` header; all pairs must agree on having a hard negative."""
    pairs = list(pairs)
    has_hard_negative = bool(pairs) and pairs[0].hard_negative is not None
    if any((pair.hard_negative is not None) != has_hard_negative for pair in pairs):
        raise ValueError("write_nli_pairs: either every pair has a hard negative or none does")
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS if has_hard_negative else COLUMNS[:2])
        for pair in pairs:
            writer.writerow((pair.anchor, pair.positive, pair.hard_negative) if has_hard_negative else (pair.anchor, pair.positive))
