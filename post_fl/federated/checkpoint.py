"""A federated run's checkpoint file: the global prompt and the server's state (round, per-client privacy
records, metrics, user-level DP counters) in one safetensors file, written aside, fsynced and renamed, so
a killed run resumes from its last complete round."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..core.jsonio import jsonable


def write_checkpoint(path: Path, prompt: np.ndarray, state: dict) -> Path:
    """Write ``prompt`` and ``state`` (JSON-able; infinities become strings) to ``path`` atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"prompt": torch.from_numpy(prompt.copy())}, str(tmp), metadata={"state": json.dumps(jsonable(state))})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def read_checkpoint(path: Path) -> tuple[dict, np.ndarray]:
    """(state, prompt) of the checkpoint file ``path``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        state = json.loads(fh.metadata()["state"])
        prompt = fh.get_tensor("prompt").numpy().copy()
    return state, prompt
