"""Reading rows from JSONL, JSON, CSV, parquet and ``save_to_disk`` datasets.

``read_rows`` returns a :class:`Rows` iterable of ``(line_number, dict)``. Malformed rows raise
:class:`DataError` naming the file and line; with ``skip_bad_rows=True`` they are logged,
counted in ``Rows.skipped`` and kept in ``Rows.errors`` so a caller can print
"skipped N bad rows" after iterating.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .._extras import missing_extra

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".pq")


class DataError(ValueError):
    """A data file or row is unusable; the message names file, line/row and field."""

    def __init__(self, message: str, path=None, line: int | None = None,
                 field: str | None = None, unit: str = "line"):
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        where = self.path or "<data>"
        if line is not None:
            where += f":{line}" if unit == "line" else f" {unit} {line}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {message}")


@dataclass
class Rows:
    """Iterable of ``(line_number, row dict)`` with skip bookkeeping.

    ``line_number`` is the 1-based line in the file for JSONL and CSV (the CSV header is line 1),
    and the 1-based row/item index for JSON lists, parquet and saved datasets (``unit`` says
    which). ``skipped``/``errors`` are filled while iterating.
    """

    path: Path
    skip_bad_rows: bool = False
    split: str | None = None
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return "line" if _kind(self.path) in ("jsonl", "csv") else "row"

    def bad_row(self, err: DataError) -> None:
        """Raise ``err``, or record and skip it when ``skip_bad_rows`` is set."""
        if not self.skip_bad_rows:
            raise err
        self.skipped += 1
        self.errors.append(str(err))
        logger.warning("skipping bad row: %s", err)

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        self.skipped = 0
        self.errors = []
        kind = _kind(self.path)
        reader = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv,
                  "parquet": _iter_parquet, "hf": _iter_hf}[kind]
        n = 0
        for item in reader(self):
            n += 1
            yield item
        if n == 0 and self.skipped == 0:
            raise DataError("no rows found (the file is empty)", self.path)
        if n == 0:
            raise DataError(f"no usable rows: all {self.skipped} rows were bad "
                            f"(first error: {self.errors[0]})", self.path)


def read_rows(path: str | os.PathLike, skip_bad_rows: bool = False,
              split: str | None = None) -> Rows:
    """Rows of a data file: ``.jsonl``/``.ndjson``, ``.json`` (a list of objects, or an object
    holding one such list), ``.csv``, ``.parquet``, or a directory saved with
    ``datasets.Dataset(Dict).save_to_disk``.

    For a saved ``DatasetDict``, ``split`` picks one split; without it all splits are read and
    each row gets a ``"split"`` field (unless it has one).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError("file not found", p)
    _kind(p)  # validate the suffix now rather than at first iteration
    if p.is_file() and p.stat().st_size == 0:
        raise DataError("the file is empty", p)
    return Rows(p, skip_bad_rows=skip_bad_rows, split=split)


def _kind(p: Path) -> str:
    if p.is_dir():
        return "hf"
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DataError(f"unsupported file type {suffix!r}; supported: "
                    f"{', '.join(SUPPORTED_SUFFIXES)} or a save_to_disk dataset folder", p)


def _iter_jsonl(rows: Rows):
    # Parsed line by line (not through datasets/pandas) so errors carry the true line number.
    with open(rows.path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                rows.bad_row(DataError(_not_utf8(err, column=True), rows.path, lineno))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                rows.bad_row(DataError(f"invalid JSON ({err.msg} at column {err.colno})",
                                       rows.path, lineno))
                continue
            if not isinstance(obj, dict):
                rows.bad_row(DataError(f"expected a JSON object, got {type(obj).__name__}",
                                       rows.path, lineno))
                continue
            yield lineno, obj


def _iter_json(rows: Rows):
    raw = rows.path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(_not_utf8(err), rows.path, line) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON ({err.msg})", rows.path, err.lineno) from err
    if isinstance(data, dict):
        # Accept {"data": [...]} / {"examples": [...]}: exactly one list-of-objects value.
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("expected a JSON list of objects, or an object with exactly one "
                            f"list value; found list keys {lists}", rows.path)
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of objects, got {type(data).__name__}", rows.path)
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            rows.bad_row(DataError(f"expected a JSON object, got {type(obj).__name__}",
                                   rows.path, i, unit="row"))
            continue
        yield i, obj


def _not_utf8(err: UnicodeDecodeError, column: bool = False) -> str:
    """The message for bytes that are not UTF-8: which byte, where, and what to do."""
    byte = err.object[err.start:err.start + 1].hex()
    where = f" at column {err.start + 1}" if column else ""
    return (f"not UTF-8 text: byte 0x{byte}{where} ({err.reason}); save the file as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)")


def _check_utf8(path: Path) -> None:
    """Raise DataError naming the line of the first byte that is not UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(_not_utf8(err, column=True), path, lineno) from None


def _clean_record(rec: dict) -> dict:
    # pandas/arrow give NaN/None for empty cells and numpy scalars/arrays: make plain Python.
    out = {}
    for k, v in rec.items():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if hasattr(v, "tolist"):
            v = v.tolist()
        out[str(k)] = v
    return out


def _iter_csv(rows: Rows):
    try:
        import pandas as pd
    except ImportError as err:
        raise missing_extra(err.name, "Reading CSV data") from err

    _check_utf8(rows.path)
    try:
        # dtype=str and no NA parsing: "None"/"NA" answers stay strings; empty cells -> "".
        df = pd.read_csv(rows.path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as err:
        raise DataError("the CSV file has no header or rows", rows.path) from err
    except pd.errors.ParserError as err:
        raise DataError(f"malformed CSV: {err}", rows.path) from err
    for i, rec in enumerate(df.to_dict("records")):
        rec = {k: v for k, v in rec.items() if v != ""}
        for k in ("choices",):  # a list column in CSV is written as JSON text
            if isinstance(rec.get(k), str) and rec[k].lstrip().startswith("["):
                try:
                    rec[k] = json.loads(rec[k])
                except json.JSONDecodeError:
                    rows.bad_row(DataError("not a valid JSON list", rows.path, i + 2, field=k))
                    break
        else:
            yield i + 2, rec  # +1 for 1-based, +1 for the header line


def _iter_parquet(rows: Rows):
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise missing_extra(err.name, "Reading parquet data") from err

    try:
        table = pq.read_table(rows.path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"cannot read parquet: {err}", rows.path) from err
    for i, rec in enumerate(table.to_pylist(), start=1):
        yield i, _clean_record(rec)


def _iter_hf(rows: Rows):
    try:
        import datasets
    except ImportError as err:
        raise missing_extra(err.name, "Reading a saved datasets folder") from err

    try:
        ds = datasets.load_from_disk(str(rows.path))
    except FileNotFoundError as err:
        raise DataError("directory is not a dataset saved with save_to_disk "
                        "(no dataset_info.json / state.json)", rows.path) from err
    if isinstance(ds, datasets.DatasetDict):
        names = [rows.split] if rows.split else list(ds.keys())
        for name in names:
            if name not in ds:
                raise DataError(f"split {name!r} not found; available: {list(ds.keys())}",
                                rows.path)
        parts = [(n, ds[n]) for n in names]
    else:
        parts = [(None, ds)]
    i = 0
    for name, part in parts:
        for rec in part:
            i += 1
            rec = _clean_record(rec)
            if name is not None and len(parts) > 1:
                rec.setdefault("split", name)
            yield i, rec
