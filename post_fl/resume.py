"""Completion markers of single-site stages, so an interrupted run resumes after its last completed stage.

A stage writes ``<run>/stages/<stage>.done.json`` only after its artifacts and its result file are
saved. The marker holds a digest of the stage's inputs (config, data and model files, the results
of the stages it builds on) and a hash of its output file. A stage counts as complete when its
marker, output and artifact exist and the digest of its inputs now is the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .core.config import EMBEDDED_DEFAULT, RunConfig
from .core.jsonio import jsonable, read_json, write_json

UPSTREAM = {"distill": (), "tune": ("distill",), "transfer": ("distill", "tune"), "tune_teacher": (),
            "evaluate": ("distill", "tune", "transfer", "tune_teacher")}
ARTIFACT = {"distill": "student", "tune": "prompt_student", "transfer": "prompt_teacher",
            "tune_teacher": "prompt_teacher_tuned", "evaluate": "results.json"}


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(name: str) -> list:
    """(size, mtime) of a file, or of each file directly inside a directory; the name alone for an
    embedded model or a hub id (nothing local to watch)."""
    p = Path(name)
    if not name or name.startswith(EMBEDDED_DEFAULT) or not p.exists():
        return [name]
    if p.is_file():
        st = p.stat()
        return [name, st.st_size, st.st_mtime_ns]
    return [name] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.iterdir()) if f.is_file()]


def stage_inputs_digest(cfg: RunConfig, run: Path, stage: str) -> str:
    """SHA-256 over the config (without ``output_dir``), the data and model files and the result files
    of the stages ``stage`` builds on (:data:`UPSTREAM`)."""
    config = {k: v for k, v in jsonable(cfg.to_dict()).items() if k != "output_dir"}
    d, m = cfg.data, cfg.model
    files = [file_fingerprint(x) for x in (d.train, d.test, d.public, m.teacher, m.student)]
    upstream = {}
    for up in UPSTREAM[stage]:
        p = run / "stages" / f"{up}.json"
        upstream[up] = _sha(p) if p.is_file() else "absent"
    blob = json.dumps({"stage": stage, "config": config, "files": files, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def marker_path(run: Path, stage: str) -> Path:
    return run / "stages" / f"{stage}.done.json"


def write_marker(run: Path, stage: str, inputs: str, output: Path) -> Path:
    """Record that ``stage`` completed with inputs digest ``inputs`` and wrote ``output``."""
    return write_json({"stage": stage, "inputs": inputs, "output": output.name, "output_sha256": _sha(output)},
                      marker_path(run, stage))


def marker_matches(run: Path, stage: str, inputs: str) -> bool:
    """True when ``stage`` has a marker with these inputs, its output is unchanged and its artifact exists."""
    p = marker_path(run, stage)
    if not p.is_file():
        return False
    try:
        marker = read_json(p)
    except ValueError:
        return False
    output = (run / "stages" / f"{stage}.json") if stage != "evaluate" else run / "results.json"
    if marker.get("inputs") != inputs or not output.is_file() or marker.get("output_sha256") != _sha(output):
        return False
    artifact = run / ARTIFACT[stage]
    if stage == "distill" and read_json(output).get("skipped"):
        return True  # model.student given: nothing to make
    return artifact.exists()
