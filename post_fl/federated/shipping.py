"""Student distribution by hash: pack the frozen student once on the server, identify it by the sha256
of its safetensors state, and install/load it from each client process's cache (asked for once if missing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.compute import Compute, resolve_compute
from ..core.models import ScoringModel, load_scoring_model
from .config import FederatedConfig
from .protocol import STUDENT_WEIGHTS_FILE, STUDENT_SPEC_FILE

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- student distribution by hash
def state_hash(tensors: dict[str, Any]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        arr = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(tuple(arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def read_student_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a student directory's ``model.safetensors``."""
    from safetensors.torch import load_file

    p = Path(directory) / STUDENT_WEIGHTS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{directory}: no {STUDENT_WEIGHTS_FILE}; the student must be saved as safetensors")
    return load_file(str(p))


@dataclass
class StudentPackage:
    """What a client needs to rebuild the student: weights, small files (config, tokenizer), task spec."""

    model_hash: str
    weights: dict[str, np.ndarray]
    files: dict[str, bytes]
    spec: dict


def pack_student(directory: str | Path, model: ScoringModel) -> StudentPackage:
    """Bundle a saved student and its verbalizer spec for sending to clients."""
    d = Path(directory)
    tensors = read_student_weights(d)
    files = {p.name: p.read_bytes() for p in sorted(d.iterdir())
             if p.is_file() and p.name != STUDENT_WEIGHTS_FILE and p.suffix in (".json", ".txt", ".model")}
    spec = {"label_names": model.label_names, "label_words": model.label_words, "head": model.head,
            "template": model.template, "max_length": model.max_length}
    return StudentPackage(state_hash(tensors), {k: v.numpy() for k, v in tensors.items()}, files, spec)


_STUDENTS: dict[str, ScoringModel] = {}  # process-wide: one student per worker process, by hash


def cache_root(fed_cfg: FederatedConfig) -> Path:
    return Path(fed_cfg.client_cache_dir or Path(tempfile.gettempdir()) / "post_fl_students")


_CACHE_KEY = secrets.token_hex(16)  # drawn once per process


def cache_key() -> str:
    """Identifies this process's student cache, so one copy serves its clients: a random id drawn once per
    process (never the host name or process id, which would tell the server about the site's machine)."""
    return _CACHE_KEY


def _load_cached_dir(d: Path, model_hash: str, compute: Compute | None = None) -> ScoringModel:
    spec = json.loads((d / STUDENT_SPEC_FILE).read_text())
    model = load_scoring_model(str(d), spec["label_names"], spec["label_words"], spec["head"], spec["template"],
                               spec["max_length"], compute=compute or resolve_compute())  # the client's device
    _STUDENTS[model_hash] = model
    log.info("student %s loaded in process %s", model_hash[:12], os.getpid())
    return model


def cached_student(model_hash: str, root: Path, compute: Compute | None = None) -> ScoringModel | None:
    """The student with this hash from the process cache, else from the disk cache (verified; loaded as ``compute``
    says, default ``auto``), else None."""
    if model_hash in _STUDENTS:
        return _STUDENTS[model_hash]
    d = root / model_hash
    if (d / STUDENT_SPEC_FILE).is_file() and (d / STUDENT_WEIGHTS_FILE).is_file():
        if state_hash(read_student_weights(d)) == model_hash:
            return _load_cached_dir(d, model_hash, compute)
    return None


def install_student(package: StudentPackage, root: Path, compute: Compute | None = None) -> ScoringModel:
    """Write a received student into the disk cache (atomically, after checking its hash) and load it once."""
    from safetensors.torch import save_file

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in package.weights.items()}
    got = state_hash(tensors)
    if got != package.model_hash:
        raise ValueError(f"received student weights hash to {got[:12]}, expected {package.model_hash[:12]}")
    if package.model_hash in _STUDENTS:
        return _STUDENTS[package.model_hash]
    final = root / package.model_hash
    if not (final / STUDENT_SPEC_FILE).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
        save_file(tensors, str(tmp / STUDENT_WEIGHTS_FILE), metadata={"format": "pt"})
        for name, data in package.files.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"refusing student file name {name!r}")
            (tmp / name).write_bytes(data)
        (tmp / STUDENT_SPEC_FILE).write_text(json.dumps(package.spec))
        try:
            tmp.rename(final)
        except OSError:  # another process installed it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return _load_cached_dir(final, package.model_hash, compute)

