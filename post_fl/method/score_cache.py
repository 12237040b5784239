"""Class scores of a frozen model on a fixed text set, unprompted or with a fixed prompt, kept on disk for reruns.

A model's zero-shot verbalizer scores depend only on its weights, its task settings (template,
label words, head, maximum length) and the texts, never on private training data or on a prompt.
A rerun of the main job on the same test and validation texts (another epsilon, another seed)
therefore reads them from ``<post-fl cache>/zero-shot-scores/<sha256>.safetensors`` instead of
running the teacher over the texts again. The same holds for a prompt that is itself read from the
cache (the teacher's own reference prompt, ``eval.cache_teacher_prompt``): its scores are keyed by
the prompt's bytes as well, so a changed prompt is a miss. A damaged file, or one written for another
key, is an error naming the file; it is never half-used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..core.compute import pass_rows
from ..core.data import DataError
from ..core.keyed_cache import read_keyed_tensors, write_keyed_tensors
from ..core.models import ScoringModel
from .evaluate import class_scores
from .teacher_outputs import corpus_hash, state_sha256, teacher_hash

SCORE_CACHE_FORMAT = 1  # bump when the stored scores change meaning
SCORE_CACHE_DIR = "zero-shot-scores"


def class_score_cache_key(model: ScoringModel, texts: list[str], batch_size: int, prompt: nn.Module | None = None) -> str:
    """sha256 of (model weights hash, task settings, texts, batch size, and the prompt's bytes when one is
    given): what the class scores depend on. Without a prompt the key is the unprompted (zero-shot) one."""
    settings = {"format": SCORE_CACHE_FORMAT, "head": model.head, "template": model.template,
                "max_length": model.max_length, "label_names": model.label_names,
                "label_words": model.label_words, "batch_size": pass_rows(batch_size, model)}  # the rows scored at once
    key = {"model": teacher_hash(model), "texts": corpus_hash(texts), "settings": settings}
    if prompt is not None:
        key["prompt"] = state_sha256(prompt.state_dict())
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_class_scores(model: ScoringModel, texts: list[str], batch_size: int, cache_dir: str | Path | None,
                        prompt: nn.Module | None = None) -> tuple[torch.Tensor, str]:
    """The model's class scores (N x C) on ``texts``, unprompted or with the fixed ``prompt``; returns
    (scores, "hit" | "miss" | "off").

    With ``cache_dir`` None they are computed and not kept. Otherwise a file under ``cache_dir`` named
    by :func:`class_score_cache_key` is read when it exists and written (atomically) when it does not.
    Pass a prompt only when it is already kept in the same cache (its scores reveal nothing it does not).
    """
    if cache_dir is None:
        return class_scores(model, texts, prompt, batch_size), "off"
    key = class_score_cache_key(model, texts, batch_size, prompt)
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.exists():
        return _read_scores(path, key, len(texts), model.num_classes), "hit"
    scores = class_scores(model, texts, prompt, batch_size)
    write_keyed_tensors(path, {"scores": scores.contiguous()}, key, SCORE_CACHE_FORMAT)
    return scores, "miss"


def _read_scores(path: Path, key: str, n_texts: int, n_classes: int) -> torch.Tensor:
    fix = "delete it to score the texts again"
    scores = read_keyed_tensors(path, key, SCORE_CACHE_FORMAT, "zero-shot score cache file", fix).get("scores")
    if scores is None or tuple(scores.shape) != (n_texts, n_classes):
        shape = None if scores is None else tuple(scores.shape)
        raise DataError(f"{path}: the zero-shot score cache file holds scores of shape {shape}; expected "
                        f"({n_texts}, {n_classes}); {fix}")
    return scores
