"""Data files checked before training, so that a bad file is one line naming the file and row.

:func:`check_file` reads a local file as text before ``datasets`` does: an empty file, bytes
that are not UTF-8, a CSV with only its header, a JSON-lines row that is not JSON. The data
modules then check their columns and rows on what ``datasets`` loaded
(:func:`require_columns`, :func:`non_empty`, :func:`check_labels`), naming the row as a user
finds it in the file (CSV: its line, counting the header as line 1; JSON lines: its line).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets

from framework.errors import FieldError

#: where row ``i`` of a loaded file is, in the user's terms
Locate = Callable[[int], str]


def locator(path: str) -> Locate:
    if Path(path).suffix in (".csv", ".tsv"):
        return lambda i: f"row {i + 2}"  # the header is row 1
    if Path(path).suffix == ".jsonl":
        return lambda i: f"line {i + 1}"
    return lambda i: f"record {i + 1}"


class _Lines:
    """A binary file's lines decoded as UTF-8 and counted, one at a time."""

    def __init__(self, file: Any, where: str) -> None:
        self.file = file
        self.where = where
        self.count = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = next(self.file)
        self.count += 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise FieldError(
                f"{self.where}: not UTF-8 (byte 0x{raw[err.start]:02x} on line {self.count}); save the file as UTF-8"
            ) from err


def check_file(path: str, field: str) -> list[str] | None:
    """The file can be read as what its suffix says, and has at least one row; returns its
    columns (None for parquet, which ``datasets`` reads itself). One streaming pass: the file
    is not held in memory (``datasets`` reads it next), but a whole-document JSON file."""
    file = Path(path)
    if file.suffix == ".parquet":
        return None
    where = f"{field}: {path}"
    with file.open("rb") as f:
        lines = _Lines(f, where)
        if file.suffix in (".csv", ".tsv"):
            columns = _csv_columns(lines, "\t" if file.suffix == ".tsv" else ",", where)
        else:
            columns = _json_columns(lines, where)
        for _ in lines:  # the rest must decode too
            pass
    return columns


def _csv_columns(lines: _Lines, delimiter: str, where: str) -> list[str]:
    rows = csv.reader(lines, delimiter=delimiter)
    header = next(rows, None)
    if not header or not any(cell.strip() for cell in header):
        raise FieldError(f"{where}: the file is empty")
    if not any(any(cell.strip() for cell in row) for row in rows):
        raise FieldError(f"{where}: no rows (only the header {header})")
    return header


def _json_columns(lines: _Lines, where: str) -> list[str]:
    """JSON lines (one object per line, checked line by line), or one JSON document holding a
    list of objects."""
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise FieldError(f"{where}: the file is empty")
    number = lines.count
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict):
        for line in lines:
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise FieldError(f"{where}: line {lines.count} is not valid JSON ({err.msg})") from err
        return sorted(record)
    text = first + "".join(lines)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise FieldError(f"{where}: line {number + err.lineno - 1} is not valid JSON ({err.msg})") from err
    if not isinstance(records, list) or not records or not isinstance(records[0], dict):
        raise FieldError(f"{where}: expected JSON records (one object per line, or a list of objects)")
    return sorted(records[0])


def same_columns(columns: dict[str, list[str] | None], files: dict[str, str]) -> None:
    """Every split's file has the same columns (``datasets`` loads them as one table)."""
    known = {split: tuple(sorted(cols)) for split, cols in columns.items() if cols is not None}
    kinds = list(known.values())
    if len(set(kinds)) > 1:
        usual = max(set(kinds), key=kinds.count)  # the odd file out is the one to fix
        odd = next(s for s, cols in known.items() if cols != usual)
        other = next(s for s, cols in known.items() if cols == usual)
        raise FieldError(
            f"data.data_files.{odd}: {files[odd]} has columns {list(known[odd])} but data.data_files.{other} has "
            f"{list(usual)}; every split needs the same columns"
        )


def require_columns(data: datasets.Dataset, columns: Sequence[str | None], where: str, fields: str) -> None:
    for column in columns:
        if column is not None and column not in data.column_names:
            raise FieldError(
                f"{where} has no column '{column}'; its columns are {data.column_names} (set {fields})"
            )


def non_empty(data: datasets.Dataset, column: str, what: str, where: str, locate: Locate) -> None:
    for i, value in enumerate(data[column]):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise FieldError(f"{where}: {locate(i)}: the {what} is empty")


def _number(value: Any) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    try:
        int(str(value).strip())
        return True
    except ValueError:
        return False


def check_labels(data: datasets.Dataset, column: str, where: str, locate: Locate) -> None:
    """No empty label; integer ids are not negative; numbers and names are not mixed."""
    values = data[column]
    non_empty(data, column, "label", where, locate)
    numeric = [_number(v) for v in values]
    if any(numeric) and not all(numeric):
        i = numeric.index(False)
        raise FieldError(f"{where}: {locate(i)}: label {values[i]!r} is not a number, unlike the others")
    if all(numeric):
        for i, value in enumerate(values):
            if int(str(value).strip()) < 0:
                raise FieldError(f"{where}: {locate(i)}: label {value} is negative; labels are ids 0..num_labels-1")
