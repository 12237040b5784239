"""Accuracy of a (prompted) scoring model, and the results file of a run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .data import DataError, TextDataset
from .models import ScoringModel
from .prompt import SoftPrompt


@torch.no_grad()
def predict(model: ScoringModel, texts: list[str], prompt: SoftPrompt | None = None,
            batch_size: int = 32) -> torch.Tensor:
    """Predicted class index (argmax of verbalizer scores) for each text."""
    preds = []
    for i in range(0, len(texts), batch_size):
        batch = model.encode(texts[i: i + batch_size])
        preds.append(model(batch, prompt).argmax(-1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: ScoringModel, data: TextDataset, prompt: SoftPrompt | None = None, batch_size: int = 32) -> float:
    """Fraction of ``data`` whose verbalizer prediction equals its label."""
    if not data.labelled or len(data) == 0:
        raise DataError("accuracy needs a non-empty labelled dataset")
    if list(data.label_names) != list(model.label_names):
        raise DataError(f"test labels {data.label_names} differ from the model's labels {model.label_names}")
    preds = predict(model, data.texts, prompt, batch_size)
    return float((preds == torch.tensor(data.labels)).float().mean())


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" / "nan": JSON has no infinity
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(data: dict, path: str | Path) -> Path:
    """Write ``data`` as indented JSON atomically (temp file + rename); infinities become strings."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")
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
