"""What every benchmark shares: writing its figures."""

from __future__ import annotations

import json
import pathlib
from typing import Any


def write_json(result: dict[str, Any], out: str | pathlib.Path) -> pathlib.Path:
    """Write a benchmark's figures as indented JSON (making the directory) and say where."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out
