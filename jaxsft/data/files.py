"""Reading the data files: JSON (optionally gzipped) and parquet, with errors that name the file and
position (row, line, column)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from jaxsft.errors import UserError


class DataFormatError(UserError):
    """A data file that cannot be read as expected; the message names the file (and row)."""


def decode_utf8(raw: bytes, file: Path | str) -> str:
    """`raw` as UTF-8 text; otherwise a `DataFormatError` naming the file, line and byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataFormatError(f"{file}: not UTF-8 text: byte {raw[error.start]:#04x} at line {line} (offset "
                              f"{error.start}); save the file as UTF-8") from None


def read_json(file: Path) -> Any:
    try:
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    except (gzip.BadGzipFile, EOFError) as error:
        raise DataFormatError(f"{file}: not a gzip file ({error})") from None
    try:
        return json.loads(decode_utf8(raw, file))
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise DataFormatError(f"{file}: invalid JSON at {where}: {error.msg}") from None


def check_schema(table: pa.Table, expected: pa.Schema, path: str | os.PathLike) -> pa.Table:
    """`table` (read from `path`) with the columns of `expected`, in its order; raise `DataFormatError`
    naming the file and the first missing column or column of another type. Extra columns are dropped."""
    missing = [f.name for f in expected if f.name not in table.schema.names]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {missing} (has {table.schema.names}); "
                              "the file was not written by this version of jaxsft: score again into a new workdir")
    for field in expected:
        found = table.schema.field(field.name).type
        if found != field.type and not (pa.types.is_null(found) and table.num_rows == 0):
            raise DataFormatError(f"{path}: column {field.name!r} is {found}, expected {field.type}; "
                                  "score again into a new workdir")
    return table.select(expected.names)


def check_unique(table: pa.Table, column: str, path: str | os.PathLike) -> None:
    """Raise `DataFormatError` naming the first value of `column` that appears twice, with its rows."""
    seen: dict[Any, int] = {}
    for row, value in enumerate(table.column(column).to_pylist()):
        if value in seen:
            raise DataFormatError(f"{path}: {column} {value!r} appears twice (rows {seen[value]} and {row}); "
                                  f"each {column} must be unique")
        seen[value] = row
