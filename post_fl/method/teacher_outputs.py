"""The teacher's outputs on the public text, computed once and cached, so distillation costs only the student.

:func:`teacher_outputs` runs the teacher over the public text a single time and keeps, for each text,
the token ids, the chosen positions and the teacher's last-layer hidden states there (float16); the
teacher's logits are recovered exactly by its frozen LM head (:func:`vocab_logits`). With a cache
directory the outputs are stored in a safetensors file named by :func:`teacher_cache_key` (sha256 of
the teacher's weights, the corpus texts and every setting that changes them), so any change recomputes
them; an unreadable or inconsistent file is an error naming it.

Two corpora shapes: :func:`teacher_outputs` fills each public text into the task template and keeps the
answer position and a few sampled positions (``distill.objective = "template"``);
:func:`teacher_lm_outputs` packs raw public text into sequences of ``distill.sequence_length`` tokens
and keeps every position (``"lm"``, general language-model distillation as in POST and DistilBERT).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..core.compute import pass_rows
from ..core.config import DistillConfig
from ..core.data import DataError
from ..core.keyed_cache import read_keyed_tensors, write_keyed_tensors
from ..core.models import EncodedBatch, ScoringModel

# bump when the cached teacher tensors or their meaning change (3: num_layers = 0 was a third, when this format
# also keyed the students); a change in the student a distillation setting makes bumps student_cache.STUDENT_FORMAT
CACHE_FORMAT = 3


def vocab_logits(model: ScoringModel, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits (float32) of ``hidden``: the model's LM head, or for an encoder the projection on its word
    embeddings; ``hidden`` is cast to the model's dtype first (float32 cached states on a bfloat16 teacher)."""
    weights = model.word_embeddings
    if model.head == "embedding":
        return (hidden.to(weights.dtype) @ weights.T).float()
    return model._lm_head(hidden.to(weights.dtype)).float()


@dataclass
class TeacherOutputs:
    """The teacher's outputs on one corpus: everything distillation needs, so the teacher never runs again.

    ``positions`` (N x P, -1 = unused) are the distilled positions of each text; column 0 is the answer
    position. ``hidden`` (N x P x H, float16) is the teacher's last-layer hidden state there.
    ``class_pred`` (N) is the teacher's class prediction; ``top1`` (N x T, -1 = padding) its top-1
    vocabulary token at every position.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_index: torch.Tensor
    lm_targets: torch.Tensor  # N x T token to predict (-100 = none): next token (causal) or masked token (MLM)
    positions: torch.Tensor
    hidden: torch.Tensor
    class_logp: torch.Tensor  # N x C teacher log-probabilities of the classes (answer position)
    top1: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in asdict(self).items()}

    def to(self, device: torch.device | str) -> "TeacherOutputs":
        """The same outputs on ``device`` (distillation keeps them where the student trains)."""
        return TeacherOutputs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def teacher_hash(model: ScoringModel) -> str:
    """sha256 over the teacher's parameter names, shapes and values (cached on the model object)."""
    cached = getattr(model, "_post_fl_weights_hash", None)
    if cached:
        return cached
    object.__setattr__(model, "_post_fl_weights_hash", state_sha256(model.backbone.state_dict()))
    return model._post_fl_weights_hash


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's parameter names, shapes, dtypes and bytes, sorted by name."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def corpus_hash(texts: list[str]) -> str:
    """sha256 of the texts in order (NUL-separated)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def task_settings(model: ScoringModel) -> dict:
    """The task settings of a scoring model that shape its outputs (head, template, length, labels, words)."""
    return {"head": model.head, "template": model.template, "max_length": model.max_length,
            "label_names": model.label_names, "label_words": model.label_words}


def teacher_cache_key(teacher: ScoringModel, texts: list[str], cfg: DistillConfig, seed: int) -> str:
    """Name of the teacher-output cache: sha256 of (teacher weights hash, corpus texts, every setting that shapes it)."""
    settings = {"format": CACHE_FORMAT, "task": task_settings(teacher), "positions_per_text": cfg.positions_per_text,
                "mlm_probability": cfg.mlm_probability, "seed": seed}
    blob = json.dumps({"teacher": teacher_hash(teacher), "corpus": corpus_hash(texts), "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def pack_sequences(tokenizer, texts: list[str], length: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, attention mask), each N x ``length``: ``texts`` tokenized, each followed by the end-of-text
    token, concatenated and cut into rows of ``length`` tokens, until ``max_tokens`` tokens (the last row padded)."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    if not stream:
        raise DataError("language-model distillation found no tokens in the public text")
    rows = (len(stream) + length - 1) // length
    ids = torch.full((rows, length), tokenizer.pad_token_id, dtype=torch.long)
    att = torch.zeros((rows, length), dtype=torch.long)
    flat = torch.tensor(stream, dtype=torch.long)
    for r in range(rows):
        chunk = flat[r * length: (r + 1) * length]
        ids[r, : len(chunk)] = chunk
        att[r, : len(chunk)] = 1
    return ids, att


def teacher_lm_cache_key(teacher: ScoringModel, texts: list[str], cfg: DistillConfig) -> str:
    """Name of the language-model teacher-output cache: sha256 of (teacher weights, corpus, packing settings)."""
    settings = {"format": CACHE_FORMAT, "objective": "lm", "sequence_length": cfg.sequence_length,
                "corpus_tokens": cfg.corpus_tokens, "head": teacher.head}
    blob = json.dumps({"teacher": teacher_hash(teacher), "corpus": corpus_hash(texts), "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@torch.no_grad()
def teacher_lm_outputs(teacher: ScoringModel, texts: list[str], cfg: DistillConfig,
                       cache_dir: str | Path | None = None, progress: bool = False) -> tuple[TeacherOutputs, str]:
    """The teacher's outputs at every position of raw public text packed into sequences (see
    :func:`pack_sequences`), from the cache when present; returns (outputs, "hit"|"miss"|"off").

    Only causal LMs: the next token is the LM target at every position. ``answer_index`` is the last
    real position of each row and ``class_logp`` the teacher's classes there (not a task answer: the
    text is not templated; the fields are kept so one format serves both objectives).
    """
    if teacher.head != "causal":
        raise DataError(f"distill.objective = 'lm' needs a causal LM teacher; {teacher.source} has head "
                        f"{teacher.head!r} (use distill.objective = 'template')")
    if not texts:
        raise DataError("distillation needs a non-empty public dataset")
    path = None
    if cache_dir is not None:
        key = teacher_lm_cache_key(teacher, texts, cfg)
        path = Path(cache_dir) / f"{key}.safetensors"
        if path.exists():
            out = _read_cache(path, key, None)
            return out, "hit"
    ids, att = pack_sequences(teacher.tokenizer, texts, cfg.sequence_length, cfg.corpus_tokens)
    out = _compute_lm_outputs(teacher, ids, att, cfg, progress)
    if path is None:
        return out, "off"
    write_keyed_tensors(path, out.tensors(), key, CACHE_FORMAT, texts=str(len(texts)))
    return out, "miss"


def _compute_lm_outputs(teacher: ScoringModel, ids: torch.Tensor, att: torch.Tensor, cfg: DistillConfig,
                        progress: bool) -> TeacherOutputs:
    n, width = ids.shape
    nxt = att.roll(-1, dims=1).clone()
    nxt[:, -1] = 0
    targets = torch.where((att * nxt).bool(), ids.roll(-1, dims=1), torch.full_like(ids, -100))
    positions = torch.where(att.bool(), torch.arange(width).expand(n, -1), torch.full_like(ids, -1))
    answer = att.sum(1) - 1
    hidden = torch.zeros((n, width, teacher.embedding_dim), dtype=torch.float16)
    class_logp = torch.zeros((n, teacher.num_classes))
    top1 = torch.full((n, width), -1, dtype=torch.long)
    bs = max(1, pass_rows(cfg.teacher_batch_size, teacher) // 4)  # rows are longer than templated texts
    bar = None
    if progress:
        from ..core.progress import progress_bar

        bar = progress_bar(n, desc="teacher outputs (once)")
    for s in range(0, n, bs):
        sl = slice(s, s + bs)
        h, _, _ = teacher.hidden_states(ids[sl], att[sl])
        a = att[sl].to(h.device)  # computed where the teacher is, kept on the CPU (and in the cache file)
        hidden[sl] = (h * a.unsqueeze(-1)).to(torch.float16).cpu()
        logits = vocab_logits(teacher, h)
        top1[sl] = torch.where(a.bool(), logits.argmax(-1), torch.full_like(a, -1)).cpu()
        class_logp[sl] = torch.log_softmax(
            teacher.class_scores(teacher.answer_logits_from_hidden(h, a, 0, answer[sl])), -1).cpu()
        if bar is not None:
            bar.update(min(bs, n - s))
    if bar is not None:
        bar.close()
    return TeacherOutputs(ids, att, answer, targets, positions, hidden, class_logp, top1)


@torch.no_grad()
def teacher_outputs(teacher: ScoringModel, texts: list[str], cfg: DistillConfig, seed: int = 0,
                    cache_dir: str | Path | None = None, progress: bool = False) -> tuple[TeacherOutputs, str]:
    """The teacher's outputs on ``texts`` (templated), from the cache file when it exists; returns (outputs, "hit"|"miss"|"off").

    Without ``cache_dir`` they are computed in memory only. A cache file that cannot be read, or whose
    contents do not match the key it is named by, raises :class:`DataError` naming the file.
    """
    if not texts:
        raise DataError("distillation needs a non-empty public dataset")
    path = None
    if cache_dir is not None:
        key = teacher_cache_key(teacher, texts, cfg, seed)
        path = Path(cache_dir) / f"{key}.safetensors"
        if path.exists():
            return _read_cache(path, key, len(texts)), "hit"
    out = _compute_teacher_outputs(teacher, texts, cfg, seed, progress)
    if path is None:
        return out, "off"
    write_keyed_tensors(path, out.tensors(), key, CACHE_FORMAT, texts=str(len(texts)))
    return out, "miss"


def _read_cache(path: Path, key: str, n_texts: int | None) -> TeacherOutputs:
    fix = "delete it to recompute the teacher's outputs"
    tensors = read_keyed_tensors(path, key, CACHE_FORMAT, "teacher-output cache file", fix)
    names = {f.name for f in TeacherOutputs.__dataclass_fields__.values()}
    missing = sorted(names - set(tensors))
    if missing:
        raise DataError(f"{path}: the teacher-output cache file lacks {missing}; {fix}")
    out = TeacherOutputs(**{k: tensors[k] for k in names})
    if n_texts is None:
        n_texts = len(out)
    if any(t.shape[0] != n_texts for t in out.tensors().values()):
        raise DataError(f"{path}: the teacher-output cache file holds a different number of texts than {n_texts}; "
                        f"{fix}")
    return out


def _lm_targets_and_inputs(teacher: ScoringModel, batch: EncodedBatch, cfg: DistillConfig,
                           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(model inputs, LM targets): MLM masking for masked LMs, next tokens for causal LMs, none for encoders."""
    ids, att = batch.input_ids, batch.attention_mask
    targets = torch.full_like(ids, -100)
    inputs = ids.clone()
    if teacher.head == "masked":
        tok = teacher.tokenizer
        special = torch.isin(ids, torch.tensor(sorted(set(tok.all_special_ids) | {tok.pad_token_id})))
        chosen = (torch.rand(ids.shape, generator=gen) < cfg.mlm_probability) & ~special & att.bool()
        inputs[chosen] = tok.mask_token_id
        targets[chosen] = ids[chosen]
    elif teacher.head == "causal":
        nxt = att.roll(-1, dims=1).clone()
        nxt[:, -1] = 0
        targets = torch.where((att * nxt).bool(), ids.roll(-1, dims=1), targets)
        rows = torch.arange(len(ids))
        targets[rows, batch.answer_index] = -100  # what follows the template is what we classify
    return inputs, targets


def _pick_positions(batch: EncodedBatch, targets: torch.Tensor, head: str, per_text: int,
                    gen: torch.Generator) -> torch.Tensor:
    """N x (1 + per_text) positions: the answer position, then sampled others (masked ones first for an MLM)."""
    n = len(batch)
    out = torch.full((n, 1 + per_text), -1, dtype=torch.long)
    out[:, 0] = batch.answer_index
    for i in range(n):
        valid = batch.attention_mask[i].nonzero().flatten()
        valid = valid[valid != batch.answer_index[i]]
        if head == "masked":
            masked = (targets[i] != -100).nonzero().flatten()
            rest = valid[~torch.isin(valid, masked)]
            order = torch.cat([masked[torch.randperm(len(masked), generator=gen)],
                               rest[torch.randperm(len(rest), generator=gen)]])
        else:
            order = valid[torch.randperm(len(valid), generator=gen)]
        k = min(per_text, len(order))
        out[i, 1: 1 + k] = order[:k]
    return out


def _compute_teacher_outputs(teacher: ScoringModel, texts: list[str], cfg: DistillConfig, seed: int,
                             progress: bool) -> TeacherOutputs:
    gen = torch.Generator().manual_seed(seed)
    full = teacher.encode(texts)
    inputs, targets = _lm_targets_and_inputs(teacher, full, cfg, gen)
    positions = _pick_positions(full, targets, teacher.head, cfg.positions_per_text, gen)
    n, width, p = len(texts), full.input_ids.shape[1], positions.shape[1]
    hidden = torch.zeros((n, p, teacher.embedding_dim), dtype=torch.float16)
    class_logp = torch.zeros((n, teacher.num_classes))
    top1 = torch.full((n, width), -1, dtype=torch.long)
    order = sorted(range(n), key=lambda i: int(full.attention_mask[i].sum()))
    bs = max(1, pass_rows(cfg.teacher_batch_size, teacher))
    bar = None
    if progress:
        from ..core.progress import progress_bar

        bar = progress_bar(n, desc="teacher outputs (once)")
    for s in range(0, n, bs):
        idx = torch.tensor(order[s: s + bs])
        w = int(full.attention_mask[idx].sum(1).max())
        ids, att = inputs[idx, :w], full.attention_mask[idx, :w]
        h, _, _ = teacher.hidden_states(ids, att)
        att, pos = att.to(h.device), positions[idx].to(h.device)  # computed on the teacher's device, kept on the CPU
        rows = torch.arange(len(idx), device=h.device).unsqueeze(1)
        hidden[idx] = (h[rows, pos.clamp(min=0)].to(torch.float16) * (pos >= 0).unsqueeze(-1)).cpu()
        logits = vocab_logits(teacher, h)
        top1[idx, :w] = torch.where(att.bool(), logits.argmax(-1), torch.full_like(att, -1)).cpu()
        class_logp[idx] = torch.log_softmax(
            teacher.class_scores(teacher.answer_logits_from_hidden(h, att, 0, full.answer_index[idx])), -1).cpu()
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return TeacherOutputs(inputs, full.attention_mask, full.answer_index, targets, positions, hidden, class_logp, top1)
