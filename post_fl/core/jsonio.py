"""Strict-JSON reading and atomic writing of result and state files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    """A copy of ``value`` that strict JSON can hold: infinities and NaN become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" / "nan": JSON has no infinity
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def from_jsonable(value: Any) -> Any:
    """Undo :func:`jsonable` for infinities/NaN read back from JSON."""
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


def write_json(data: dict, path: str | Path) -> Path:
    """Write ``data`` as indented JSON atomically (temp file + rename); infinities become strings."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n")
    tmp.replace(p)
    return p


def read_json(path: str | Path) -> dict:
    """Read a JSON file written by :func:`write_json`, with a clear error if it is missing or broken."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
