"""Tiny models built from configs and small generated data, so tests need no download."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# distillation caches (teacher outputs, students) go to a throw-away directory, never ~/.cache/post-fl
os.environ.setdefault("POST_FL_CACHE", __import__("tempfile").mkdtemp(prefix="post-fl-test-cache-"))

import pytest
import torch

from post_fl.core.data import TextDataset

POSITIVE = ["good", "great", "fine", "nice", "happy", "love"]
NEGATIVE = ["bad", "awful", "poor", "sad", "hate", "worst"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "actor", "story", "it", "this", "and", "very"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIALS + ["positive", "negative", "It", "was", ".", "<eos>", "This", "text", "is"] + POSITIVE + NEGATIVE + FILLER


def make_tokenizer():
    """A WordLevel tokenizer (split on spaces and punctuation) over VOCAB, with BERT-style special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # splits on spaces and punctuation
    return tok, vocab


def make_fast_tokenizer(with_cls: bool):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok, vocab = make_tokenizer()
    if with_cls:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>")


def build_tiny_model(kind: str, directory, num_layers: int = 4, hidden: int = 32, seed: int = 0):
    """Save a tiny random model of ``kind`` (causal | masked | embedding) with its tokenizer."""
    from transformers import BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if kind == "causal":
        cfg = GPT2Config(vocab_size=len(VOCAB), n_positions=128, n_embd=hidden, n_layer=num_layers, n_head=2,
                         initializer_range=0.2)
        model = GPT2LMHeadModel(cfg)
        tok = make_fast_tokenizer(with_cls=False)
    else:
        cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=num_layers,
                         num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                         initializer_range=0.2)
        model = BertForMaskedLM(cfg) if kind == "masked" else BertModel(cfg)
        tok = make_fast_tokenizer(with_cls=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def make_sentiment(n: int, seed: int = 0, label_names=("negative", "positive")) -> TextDataset:
    """Generated two-class 'reviews': filler words plus one or two sentiment words."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        y = rng.randint(0, 1)
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if y else NEGATIVE, 2)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(y)
    return TextDataset(texts, labels, list(label_names))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Directories of tiny teacher models of each head kind."""
    root = tmp_path_factory.mktemp("models")
    return {kind: build_tiny_model(kind, root / kind) for kind in ("causal", "masked", "embedding")}


@pytest.fixture
def files(tmp_path):
    """(train.csv, test.jsonl, public.csv): 48 / 24 / 40 generated sentiment rows (seeds 1, 2, 3)."""
    from post_fl.core.data import write_text_file

    train = write_text_file(make_sentiment(48, seed=1), tmp_path / "train.csv")
    test = write_text_file(make_sentiment(24, seed=2), tmp_path / "test.jsonl")
    public = write_text_file(make_sentiment(40, seed=3), tmp_path / "public.csv")
    return train, test, public


@pytest.fixture
def sentiment():
    return make_sentiment(64, seed=1)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a shared machine's other jobs);
    a test module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_tiny_task(root, n_train: int, seed: int, with_student: bool = True):
    """A federated task under ``root``: a tiny masked-LM ``teacher``, ``train.csv`` (``n_train`` rows),
    ``test.csv`` and unlabelled ``public.jsonl`` (32 rows each; seeds ``seed``, ``seed+1``, ``seed+2``)
    and, with ``with_student``, a 2-layer ``student`` distilled on the public text. Returns ``root``."""
    from post_fl.core.config import DistillConfig
    from post_fl.core.data import write_text_file
    from post_fl.method.distill import distill_student
    from post_fl.method.student_cache import save_student
    from post_fl.core.models import load_scoring_model

    build_tiny_model("masked", root / "teacher")
    write_text_file(make_sentiment(n_train, seed=seed), root / "train.csv")
    write_text_file(make_sentiment(32, seed=seed + 1), root / "test.csv")
    public = make_sentiment(32, seed=seed + 2)
    write_text_file(TextDataset(public.texts, [], []), root / "public.jsonl")
    if with_student:
        teacher = load_scoring_model(str(root / "teacher"), ["negative", "positive"],
                                     {"positive": ["good"], "negative": ["bad"]})
        student, report = distill_student(teacher, public, DistillConfig(num_layers=2, steps=3, batch_size=8))
        save_student(student, root / "student", report)
    return root


@pytest.fixture(scope="session")
def fed_root(tmp_path_factory):
    """Tiny masked-LM teacher, a distilled 2-layer student and generated task files (shared by the
    federated and Flower test modules)."""
    return write_tiny_task(tmp_path_factory.mktemp("fed"), 96, seed=11)
