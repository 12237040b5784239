"""The distilled student on disk: saved with its report, and kept in the student cache under a key of
(teacher weights, distillation settings, public corpus, seed), so a rerun copies it instead of
distilling again (the provider's one-time cost)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from ..core.config import DistillConfig, identifying_settings
from ..core.data import DataError, TextDataset
from ..core.models import ScoringModel
from .distill import DistillReport, distill_student
from .student import distill_objective, student_layers
from .teacher_outputs import CACHE_FORMAT, corpus_hash, task_settings, teacher_hash

log = logging.getLogger(__name__)

# bump when a distillation with the same settings makes another student (2: keep_best ranks "lm" checkpoints by
# next-token agreement, no longer by class agreement)
STUDENT_FORMAT = 2


def student_cache_key(teacher: ScoringModel, public: TextDataset, held_out: TextDataset | None,
                      cfg: DistillConfig, seed: int, corpus: TextDataset | None = None) -> str:
    """Name of a cached student: sha256 of (teacher weights hash, distillation settings, corpus hash, task settings)."""
    settings = identifying_settings({k: v for k, v in asdict(cfg).items() if k not in ("cache",)}, "distill")
    settings["num_layers"] = student_layers(teacher, cfg)  # the count, not 0 = "auto", whose rule may change
    key = {"format": CACHE_FORMAT, "student_format": STUDENT_FORMAT, "teacher": teacher_hash(teacher),
           "distill": settings, "seed": seed, "task": task_settings(teacher), "corpus": corpus_hash(public.texts),
           "held_out": corpus_hash(held_out.texts) if held_out is not None else ""}
    if distill_objective(teacher, cfg) == "lm" and corpus is not None:
        key["lm_corpus"] = corpus_hash(corpus.texts)
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_student_dir(root: str | Path, key: str) -> Path | None:
    """The cached student directory for ``key`` under ``root``, or None when there is none.

    A directory that exists but lacks its weights or report is an error naming it (it is never half-used).
    """
    d = Path(root) / key
    if not d.exists():
        return None
    need = [d / "config.json", d / "distill_report.json"]
    if not any(d.glob("*.safetensors")) or not all(p.is_file() for p in need):
        raise DataError(f"{d}: cached student is incomplete (needs config.json, weights and distill_report.json); "
                        "delete it to distil again")
    return d


def store_student(student: ScoringModel, report: DistillReport, root: str | Path, key: str) -> Path:
    """Save a distilled student under ``root/key`` atomically (written aside, then renamed)."""
    import shutil

    final = Path(root) / key
    tmp = Path(root) / f"{key}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_student(student, tmp, report)
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    return final


def save_student(student: ScoringModel, directory: str | Path, report: DistillReport | None = None) -> Path:
    """Save the student with ``save_pretrained`` (model + tokenizer) and its distillation report."""
    from ..core.jsonio import write_json

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    student.backbone.save_pretrained(d)
    student.tokenizer.save_pretrained(d)
    if report is not None:
        write_json(report.to_dict(), d / "distill_report.json")
    return d


def public_distillation_split(public: TextDataset, seed: int) -> tuple[TextDataset, TextDataset]:
    """(distillation texts, held-out texts) of the public set: a 90/10 split, or all of it twice when under 20."""
    return public.split(0.9, seed) if len(public) >= 20 else (public, public)


def cached_or_distilled_student(teacher: ScoringModel, public: TextDataset, cfg: DistillConfig, seed: int,
                                cache_root: Path | None, validation: TextDataset | None = None,
                                progress: bool = False, corpus: TextDataset | None = None,
                                ) -> tuple[Path | None, ScoringModel | None, dict, str]:
    """The student of (teacher, public corpus, distillation settings, seed): from the student cache under
    ``cache_root`` (``None`` = no cache), else distilled now (teacher outputs cached under
    ``cache_root/../teacher-outputs``) and stored there.

    ``corpus``: the whole public texts that ``distill.objective = "lm"`` packs (default ``public``).
    Returns (cached student directory or None, the student when distilled now or None, its report as a
    dict, "hit" | "miss" | "off").
    """
    train, held_out = public_distillation_split(public, seed)
    key = student_cache_key(teacher, train, held_out, cfg, seed, corpus) if cache_root is not None else ""
    hit = cached_student_dir(cache_root, key) if cache_root is not None else None
    if hit is not None:
        log.info("distill: cached student %s (delete it to distil again)", hit)
        from ..core.jsonio import read_json

        return hit, None, read_json(hit / "distill_report.json"), "hit"
    student, rep = distill_student(teacher, train, cfg, seed, held_out=held_out, progress=progress,
                                   cache_dir=cache_root.parent / "teacher-outputs" if cache_root is not None else None,
                                   validation=validation, corpus=corpus)
    stored = store_student(student, rep, cache_root, key) if cache_root is not None else None
    return stored, student, rep.to_dict(), "miss" if cache_root is not None else "off"
