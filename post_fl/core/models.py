"""Frozen language models that score classes through a verbalizer, with an optional soft prompt.

A :class:`ScoringModel` wraps any Hugging Face model and its tokenizer and defines a
classification task without a new trainable head:

* ``causal`` (GPT-2, LLaMA, ...): the input is ``template`` with the text filled in; the
  *answer position* is the last token, and a class's score is the LM's logit mass
  (log-sum-exp) on the first token of its label words there.
* ``masked`` (BERT, RoBERTa with an MLM head): the template holds ``{mask}``; the answer
  position is the mask and classes are scored as above on the MLM logits.
* ``embedding`` (an encoder without an LM head, e.g. a sentence encoder): the prompted input
  is mean-pooled over its text tokens and a class's score is ``EMBEDDING_SCALE`` times the
  cosine similarity to the (unprompted) pooled embedding of its label words, each put in the
  carrier sentence ``EMBEDDING_LABEL_TEMPLATE`` (the usual hypothesis trick of zero-shot
  classification with sentence encoders).

``answer_logits`` is the model's full output at the answer position (vocabulary logits for
LM heads, class logits for ``embedding``): the quantity that POST's transfer loss and KD
compare. The same task is defined identically on teacher and student, so prompts and
outputs can be compared across them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .compute import CPU, Compute, dtype_name, model_device
from .deep_prompt import deep_prompt_hooks

HEADS = ("causal", "masked", "embedding")
EMBEDDING_SCALE = 20.0  # inverse temperature of cosine-similarity class scores
EMBEDDING_LABEL_TEMPLATE = "This text is {word}."
DEFAULT_TEMPLATES = {
    # chosen on the embedded task's validation split (benchmarks/choose_verbalizer.py): SmolLM2 0.728 vs 0.540
    # with "{text} It was"
    "causal": "Review: {text}\nSentiment:",
    "masked": "{text} It was {mask}.",
    "embedding": "{text}",
}


class ModelError(ValueError):
    """A model directory, name or setting is unusable; the message says which and why."""


@dataclass
class EncodedBatch:
    """Token ids, attention mask and the answer position of each row (before any prompt)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_index: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "EncodedBatch":
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device),
                            self.answer_index.to(device))

    def rows(self, index: torch.Tensor | slice) -> "EncodedBatch":
        return EncodedBatch(self.input_ids[index], self.attention_mask[index], self.answer_index[index])


def resolve_model_path(name_or_dir: str) -> str:
    """Turn an embedded model name into its directory and check that a local directory has weights."""
    from .embedded import embedded_model_dir, is_embedded_model

    if is_embedded_model(name_or_dir):
        return str(embedded_model_dir(name_or_dir))
    p = Path(name_or_dir)
    if not p.exists() and looks_like_path(name_or_dir):
        raise ModelError(f"{name_or_dir}: no such directory (expected a model directory with config.json "
                         "and weights, an embedded model name or a Hugging Face hub id)")
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"{p}: expected a model directory, found a file")
        if not (p / "config.json").is_file():
            raise ModelError(f"{p}: model directory has no config.json")
        weights = [w for pat in ("*.safetensors", "*.bin", "*.safetensors.index.json") for w in p.glob(pat)]
        if not weights:
            raise ModelError(f"{p}: model directory has no weights "
                             "(expected model.safetensors or pytorch_model.bin)")
    return name_or_dir


def looks_like_path(name: str) -> bool:
    """True when ``name`` can only be a filesystem path, not a hub id (``name`` or ``org/name``).

    Absolute, ``./``/``../``/``~`` paths, more than one ``/``, characters a repo id cannot hold, or
    an ``org/name`` whose ``org`` is an existing local folder (e.g. ``runs/student``) count as paths.
    """
    import re

    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.endswith("/"):
        return True
    if not re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?", name):
        return True
    return "/" in name and Path(name).parent.is_dir()


def _config_and_head(name_or_dir: str, head: str):
    """(model path, its HF config, the head to use): ``head`` or, for ``auto``, the one the config implies."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_dir)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{name_or_dir}: cannot read the model config ({exc})") from None
    chosen = detect_head(config) if head == "auto" else head
    if chosen not in HEADS:
        raise ModelError(f"head {head!r} unknown; expected auto or one of {HEADS}")
    return path, config, chosen


def check_scoring_setup(name_or_dir: str, label_names: Sequence[str], label_words: dict | None = None,
                        head: str = "auto", template: str = "", max_length: int = 64) -> str:
    """Check, without loading weights, that a model would load and score ``label_names``.

    Reads the model's config and tokenizer, builds its skeleton on the ``meta`` device (no memory,
    no weights read) and runs every verbalizer and template check of :class:`ScoringModel` on it.
    Returns the head that would be used; raises :class:`ModelError` naming the problem.
    """
    path, config, chosen = _config_and_head(name_or_dir, head)
    tokenizer = load_tokenizer(path)
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    cls = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "embedding": AutoModel}[chosen]
    try:
        with torch.device("meta"):
            skeleton = cls.from_config(config)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{name_or_dir}: cannot build a {chosen} model from its config ({exc})") from None
    ScoringModel(skeleton, tokenizer, chosen, label_names, label_words, template, max_length, source=name_or_dir)
    return chosen


def detect_head(config) -> str:
    """Decide how a model scores classes from its config: ``causal``, ``masked`` or ``embedding``."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHeadModel" in archs:
        return "causal"
    if "MaskedLM" in archs or "ForPreTraining" in archs:
        return "masked"
    if getattr(config, "is_decoder", False) or config.model_type in ("gpt2", "llama", "gpt_neo", "gpt_neox",
                                                                      "opt", "mistral", "qwen2", "phi"):
        return "causal"
    return "embedding"


def _load_backbone(path: str, head: str, compute: Compute = CPU):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    cls = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "embedding": AutoModel}[head]
    try:
        return cls.from_pretrained(path, dtype=compute.dtype).to(compute.device)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load as a {head} model ({exc})") from None


class ScoringModel(nn.Module):
    """A frozen HF model + tokenizer + verbalizer that maps (prompted) texts to class scores."""

    compute: Compute | None = None  # where load_scoring_model put it (post_fl.core.compute); None = built directly

    def __init__(self, backbone: nn.Module, tokenizer, head: str, label_names: Sequence[str],
                 label_words: dict[str, list[str]] | None = None, template: str = "",
                 max_length: int = 64, source: str = "") -> None:
        super().__init__()
        if head not in HEADS:
            raise ModelError(f"head {head!r} unknown; expected one of {HEADS}")
        if not label_names:
            raise ModelError("a scoring model needs at least one label name")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.head = head
        self.source = source
        self.label_names = list(label_names)
        self.template = template or DEFAULT_TEMPLATES[head]
        self.max_length = max_length
        if "{text}" not in self.template:
            raise ModelError(f"template {self.template!r} must contain {{text}}")
        if head == "masked":
            if tokenizer.mask_token is None:
                raise ModelError(f"{source}: tokenizer has no mask token, so head 'masked' cannot be used")
            if "{mask}" not in self.template:
                raise ModelError(f"template {self.template!r} for a masked LM must contain {{mask}}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        words = dict(label_words or {})
        missing = [n for n in self.label_names if n not in words]
        for name in missing:
            if name.lstrip("-").isdigit():
                raise ModelError(f"label {name!r} has no label words; set model.label_words, "
                                 f"e.g. {{ \"{name}\" = [\"word\"] }}")
            words[name] = [name]
        self.label_words = {n: list(words[n]) for n in self.label_names}
        prefix, _, suffix = self.template.partition("{text}")
        mask = tokenizer.mask_token or ""
        self._prefix_ids = self._ids(prefix.replace("{mask}", mask))
        self._suffix_ids = self._ids(suffix.replace("{mask}", mask))
        self._special_head, self._special_tail = self._special_tokens()
        n_special = len(self._special_head) + len(self._special_tail)
        self._text_budget = max_length - len(self._prefix_ids) - len(self._suffix_ids) - n_special
        if self._text_budget < 1:
            raise ModelError(f"max_length {max_length} leaves no room for text after the template")
        self._label_word_ids = [self._word_ids(self.label_words[n]) for n in self.label_names]
        if head != "embedding":
            for i, a in enumerate(self.label_names):
                for b in self.label_names[i + 1:]:
                    shared = set(self._label_word_ids[i]) & set(self._label_word_ids[self.label_names.index(b)])
                    if shared:
                        raise ModelError(f"labels {a!r} and {b!r} share the label token(s) "
                                         f"{self.tokenizer.convert_ids_to_tokens(sorted(shared))}: the verbalizer "
                                         "scores a class by the first token of each label word; choose other words")
        else:
            carriers = {n: tuple(tuple(self._ids(EMBEDDING_LABEL_TEMPLATE.format(word=w)))
                                 for w in self.label_words[n]) for n in self.label_names}
            for i, a in enumerate(self.label_names):
                for b in self.label_names[i + 1:]:
                    if carriers[a] == carriers[b]:
                        raise ModelError(
                            f"labels {a!r} and {b!r} tokenize identically in the carrier sentence "
                            f"{EMBEDDING_LABEL_TEMPLATE!r} ({self.tokenizer.convert_ids_to_tokens(list(carriers[a][0]))}),"
                            " so the embedding head cannot tell them apart; choose other label words")
        self._label_embeddings: torch.Tensor | None = None
        # not registered as a submodule: it already belongs to the backbone
        object.__setattr__(self, "_lm_head", self._find_lm_head() if head != "embedding" else None)

    def _find_lm_head(self) -> nn.Module:
        """The module mapping last hidden states to vocabulary logits (LM or MLM head)."""
        if self.head == "causal":
            head = self.backbone.get_output_embeddings()
            if head is not None:
                return head
        for name in ("cls", "lm_head", "predictions", "generator_lm_head"):
            module = getattr(self.backbone, name, None)
            if isinstance(module, nn.Module):
                if name == "predictions" and hasattr(self.backbone, "vocab_transform"):
                    break
                return module
        raise ModelError(f"{self.source}: cannot find the LM head of {type(self.backbone).__name__}; "
                         "use head = 'embedding'")

    # ---------------------------------------------------------------- tokens
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer adds before and after a sequence (e.g. [CLS] and [SEP])."""
        probe = "hello"
        plain = self._ids(probe)
        full = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i: i + len(plain)] == plain:
                return full[:i], full[i + len(plain):]
        return [], []

    def _word_ids(self, words: list[str]) -> list[int]:
        ids = []
        for w in words:
            spaced = f" {w}" if self.head == "causal" else w
            toks = self._ids(spaced)
            if not toks:
                raise ModelError(f"label word {w!r} tokenizes to nothing")
            if self.tokenizer.unk_token_id is not None and toks[0] == self.tokenizer.unk_token_id:
                raise ModelError(f"label word {w!r} is unknown to the tokenizer of {self.source or 'the model'} "
                                 f"(it maps to {self.tokenizer.unk_token!r}); choose words in its vocabulary")
            ids.append(toks[0])
        return sorted(set(ids))

    def encode(self, texts: Sequence[str]) -> EncodedBatch:
        """Tokenize ``texts`` into the template, truncating the text (never the template)."""
        rows, answers = [], []
        mask_id = self.tokenizer.mask_token_id
        for text in texts:
            body = self._ids(text)[: self._text_budget]
            ids = self._special_head + self._prefix_ids + body + self._suffix_ids + self._special_tail
            if self.head == "masked":
                answers.append(ids.index(mask_id))
            else:
                answers.append(len(ids) - 1 if self.head == "causal" else 0)
            rows.append(ids)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, : len(r)] = 1
        return EncodedBatch(input_ids, attention, torch.tensor(answers, dtype=torch.long))

    # ---------------------------------------------------------------- embeddings
    @property
    def embedding_dim(self) -> int:
        """Width of the input embeddings (the size of one virtual token)."""
        return self.backbone.get_input_embeddings().weight.shape[1]

    @property
    def word_embeddings(self) -> torch.Tensor:
        """The (frozen) input embedding matrix, vocabulary x width."""
        return self.backbone.get_input_embeddings().weight

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def device(self) -> torch.device:
        """Where the backbone's weights are: every input is moved there (:mod:`post_fl.core.compute`)."""
        return model_device(self.backbone)

    def train(self, mode: bool = True) -> "ScoringModel":
        """Keep the frozen backbone in eval mode (no dropout) whatever the caller asks."""
        super().train(mode)
        self.backbone.eval()
        return self

    # ---------------------------------------------------------------- forward
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt: nn.Module | None = None):
        """Run the backbone's body with the prompt. ``prompt(input embeddings B x T x D)`` gives either the
        prompted embeddings B x (P + T) x D (an input prompt, :class:`post_fl.core.prompt.SoftPrompt`) or
        per-layer vectors B x L x P x D (a deep prompt, :class:`post_fl.core.deep_prompt.DeepPrompt`:
        prepended at layer 0, put at the prompt positions of every later layer).

        Returns (last hidden states, attention mask with the prompt, number of virtual tokens).
        """
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        embeds = self.backbone.get_input_embeddings()(input_ids)
        n_prompt, deep = 0, contextlib.nullcontext()
        if prompt is not None:
            out = prompt(embeds)
            if out.dim() == 4:  # B x L x P x D: the tensor Opacus takes per-example gradients against
                deep = deep_prompt_hooks(self.backbone, out)
                out = torch.cat([out[:, 0].to(embeds.dtype), embeds], dim=1)
            embeds = out
            n_prompt = embeds.shape[1] - input_ids.shape[1]
            attention_mask = torch.cat(
                [attention_mask.new_ones((attention_mask.shape[0], n_prompt)), attention_mask], dim=1)
        kwargs = dict(inputs_embeds=embeds, attention_mask=attention_mask)
        if self.head == "causal":
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with deep:
            out = self.backbone.base_model(**kwargs)
        return out.last_hidden_state, attention_mask, n_prompt

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int) -> torch.Tensor:
        mask = attention_mask[:, n_prompt:].unsqueeze(-1).to(hidden.device, torch.float32)
        pooled = (hidden[:, n_prompt:].float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def reset_label_cache(self) -> None:
        """Forget cached label embeddings (call after changing the backbone's weights)."""
        self._label_embeddings = None

    def label_embeddings(self) -> torch.Tensor:
        """Pooled, unprompted embeddings of each class's label words (``embedding`` head only)."""
        if self._label_embeddings is None:
            with torch.no_grad():
                vecs = []
                for name in self.label_names:
                    b = self.encode([EMBEDDING_LABEL_TEMPLATE.format(word=w) for w in self.label_words[name]])
                    h, m, n = self.hidden_states(b.input_ids, b.attention_mask)
                    vecs.append(nn.functional.normalize(self._pool(h, m, n).mean(0), dim=-1))
                self._label_embeddings = torch.stack(vecs)
        return self._label_embeddings

    def answer_logits(self, batch: EncodedBatch, prompt: nn.Module | None = None) -> torch.Tensor:
        """The model's output at the answer position: vocabulary logits (LM heads) or class logits."""
        hidden, mask, n_prompt = self.hidden_states(batch.input_ids, batch.attention_mask, prompt)
        return self.answer_logits_from_hidden(hidden, mask, n_prompt, batch.answer_index)

    def answer_logits_from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int,
                                  answer_index: torch.Tensor) -> torch.Tensor:
        """:meth:`answer_logits` from the outputs of :meth:`hidden_states` (for callers that also need
        the hidden states, e.g. RAPT's reconstruction head). Float32 whatever the model's dtype."""
        if self.head == "embedding":
            return EMBEDDING_SCALE * self._pool(hidden, attention_mask, n_prompt) @ self.label_embeddings().T
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self._lm_head(hidden[rows, answer_index.to(hidden.device) + n_prompt]).float()

    def text_positions(self, batch: EncodedBatch) -> torch.Tensor:
        """A 0/1 mask (B x T) of the positions holding the text's own tokens: not the special tokens,
        not the template's prefix or suffix, not padding."""
        head = len(self._special_head) + len(self._prefix_ids)
        tail = len(self._suffix_ids) + len(self._special_tail)
        lengths = batch.attention_mask.sum(1)
        pos = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device).unsqueeze(0)
        return ((pos >= head) & (pos < (lengths - tail).unsqueeze(1))).long()

    def class_scores(self, answer_logits: torch.Tensor) -> torch.Tensor:
        """Verbalizer: class scores (B x C) from answer logits (log-sum-exp over each class's label words)."""
        if self.head == "embedding":
            return answer_logits
        return torch.stack([torch.logsumexp(answer_logits[:, ids], dim=-1) for ids in self._label_word_ids], dim=-1)

    def forward(self, batch: EncodedBatch, prompt: nn.Module | None = None) -> torch.Tensor:
        """Class scores (B x C) of a batch, optionally with a soft prompt."""
        return self.class_scores(self.answer_logits(batch, prompt))

    def describe(self) -> dict:
        """Facts about the model for result files: source, head, layers, parameters."""
        cfg = self.backbone.config
        return {"source": self.source, "head": self.head, "model_type": cfg.model_type,
                "num_layers": getattr(cfg, "num_hidden_layers", None), "hidden_size": self.embedding_dim,
                "parameters": sum(p.numel() for p in self.backbone.parameters()),
                "device": str(self.device), "dtype": dtype_name(self.word_embeddings.dtype),
                "label_words": self.label_words, "template": self.template}


def load_tokenizer(path: str):
    """Load the tokenizer that belongs to a model directory or name."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load a tokenizer ({exc})") from None


def load_scoring_model(name_or_dir: str, label_names: Sequence[str], label_words: dict | None = None,
                       head: str = "auto", template: str = "", max_length: int = 64,
                       compute: Compute | None = None) -> ScoringModel:
    """Load any HF model directory or name (or ``"embedded"``) as a frozen :class:`ScoringModel`, on ``compute``'s
    device in its dtype (default: float32 on the CPU); the model keeps ``compute`` as ``model.compute``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path, config, chosen = _config_and_head(name_or_dir, head)
    backbone = _load_backbone(path, chosen, compute or CPU)
    model = ScoringModel(backbone, load_tokenizer(path), chosen, label_names, label_words, template, max_length,
                         source=name_or_dir)
    model.compute = compute or CPU
    return model
