"""Reading the data files: JSON (optionally gzipped) with errors that name the file and position."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any


class DataFormatError(ValueError):
    """A data file that cannot be read as expected; the message names the file (and row)."""


def read_json(file: Path) -> Any:
    try:
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
        return json.loads(raw)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise DataFormatError(f"{file}: invalid JSON at {where}: {error.msg}") from None
