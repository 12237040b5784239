"""The teacher's own prompt: the non-private upper bound that POST's transferred prompt is compared with.

An input soft prompt tuned on the teacher itself, without DP, on ``eval.teacher_tune_examples`` training
examples for ``eval.teacher_tune_epochs`` epochs (Adam, ``eval.teacher_tune_lr``, batches of
``eval.teacher_tune_batch_size``). It is the costly route POST avoids (backpropagation through the large
model on private data) and is only ever a reference row of the results table.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from ..core.config import EvalConfig, PromptConfig, TuneConfig
from ..core.data import TextDataset
from ..core.models import ScoringModel
from ..core.prompt import SoftPrompt
from .teacher_outputs import corpus_hash, task_settings, teacher_hash
from .tuning import TuneResult, tune_prompt


def teacher_prompt_recipe(e: EvalConfig) -> TuneConfig:
    """The tuning settings of the teacher's own prompt (no DP)."""
    return TuneConfig(epochs=e.teacher_tune_epochs, batch_size=e.teacher_tune_batch_size, lr=e.teacher_tune_lr,
                      dp=False)


def teacher_prompt_key(teacher: ScoringModel, train: TextDataset, prompt: PromptConfig, e: EvalConfig,
                       seed: int) -> str:
    """Cache key of the teacher's own prompt: sha256 of (teacher weights, task settings, training texts and
    labels, the prompt's size and initialisation, the recipe, the seed)."""
    blob = json.dumps({"teacher": teacher_hash(teacher), "task": task_settings(teacher),
                       "texts": corpus_hash(train.texts), "labels": list(map(str, train.labels)),
                       "prompt": {k: v for k, v in asdict(prompt).items() if k != "form"},
                       "recipe": asdict(teacher_prompt_recipe(e)), "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def tune_teacher_prompt(teacher: ScoringModel, prompt: SoftPrompt, train: TextDataset, e: EvalConfig, seed: int,
                        progress: bool = False) -> TuneResult:
    """Tune ``prompt`` (an input prompt) on the teacher without DP, with the recipe of ``e``."""
    return tune_prompt(teacher, prompt, train, teacher_prompt_recipe(e), seed, progress=progress)


def cached_teacher_prompt(root: Path | None, out: Path, teacher: ScoringModel, train: TextDataset,
                          prompt: PromptConfig, e: EvalConfig, seed: int) -> tuple[dict | None, str]:
    """(the stage record, key) of the teacher's own prompt found in the cache under ``root`` and copied to
    ``out``; (None, key) when there is none (or no cache: ``root`` None)."""
    from ..core.jsonio import read_json

    key = teacher_prompt_key(teacher, train, prompt, e, seed)
    if root is None or not (root / key / "stage.json").is_file():
        return None, key
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(root / key / "prompt", out)
    return {**read_json(root / key / "stage.json"), "cache": "hit", "cache_dir": str(root / key)}, key


def store_teacher_prompt(root: Path | None, key: str, saved: Path, stage: dict) -> dict:
    """Keep the saved prompt folder ``saved`` and its stage record under ``root/key`` (written aside, then
    renamed); returns the stage record with ``cache`` = "miss" (or "off" without a cache)."""
    from ..core.jsonio import write_json

    if root is None:
        return {**stage, "cache": "off"}
    final, tmp = root / key, root / f"{key}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(saved, tmp / "prompt")
    write_json(stage, tmp / "stage.json")
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    return {**stage, "cache": "miss"}
