"""Knowledge distillation of a small student from the teacher (DistilBERT-style, as in POST), on cached teacher outputs.

The student is a copy of the teacher that keeps its width, tokenizer and embeddings and
``num_layers`` evenly spaced transformer layers (e.g. 6 of SmolLM2's 30). It is trained on public
text, filled into the task's template, so that the answer position (where the verbalizer reads the
class) is among the distilled positions:

    alpha_kd    * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))   (KD on vocabulary logits)
  + alpha_class * KL(p_t(class) || p_s(class))                     (KD on the verbalizer's classes, answer position)
  + alpha_lm    * LM loss (next-token CE for causal LMs, MLM CE for masked LMs)
  + alpha_cos   * (1 - cos(h_s, h_t))                              (last-layer hidden-state alignment)

at the answer position and ``positions_per_text`` other sampled positions of each text (the masked
ones for an MLM). The input and output embeddings stay frozen at the teacher's values, so a soft
prompt means the same thing in both models' embedding spaces. For an encoder without an LM head,
the KD logits are the hidden states projected on the frozen word embeddings (a tied pseudo-LM head),
and the LM and class terms do not apply.

**Teacher outputs are computed once.** :func:`teacher_outputs` runs the teacher over the public text
a single time and keeps, for each text, the token ids, the chosen positions and the teacher's
last-layer hidden states there (float16); the teacher's logits are recovered exactly by its frozen
LM head, so later epochs cost only the student. With a cache directory the outputs are stored in a
safetensors file named by :func:`teacher_cache_key` (sha256 of the teacher's weights, the corpus
texts and every setting that changes them), so any change recomputes them; an unreadable or
inconsistent file is an error naming it.

**Training stops at a target, not a step count**: every ``eval_every`` steps the student's class
predictions on held-out public text are compared with the teacher's; training ends when their
agreement reaches ``target_agreement``, when ``time_budget_s`` has passed, or after ``steps`` steps,
whichever comes first (``steps = 0`` keeps the layer-copied student untrained). The report gives both agreement measures (next-token top-1 on held-out public
text; class predictions on held-out public text and, when given, on the task's validation split).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .core.config import DistillConfig, identifying_settings
from .core.data import DataError, TextDataset
from .core.keyed_cache import read_keyed_tensors, write_keyed_tensors
from .core.models import EncodedBatch, ScoringModel
from .transfer import kl_at_temperature

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cached tensors change meaning


def _layer_list(backbone: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The (parent, attribute, ModuleList) holding the transformer layers."""
    n = backbone.config.num_hidden_layers
    for name, module in backbone.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n and n > 0:
                return module, attr, child
    raise ValueError(f"cannot find the {n} transformer layers of {type(backbone).__name__}")


def select_layers(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Evenly spaced teacher layer indices for the student, always keeping the first and last."""
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise ValueError(f"student layers must be in 1..{num_teacher_layers}, got {num_student_layers}")
    if num_student_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return sorted({round(i * step) for i in range(num_student_layers)})


def make_student(teacher: nn.Module, num_layers: int) -> tuple[nn.Module, list[int]]:
    """Copy ``teacher`` keeping ``num_layers`` evenly spaced layers; returns (student, teacher layer ids)."""
    keep = select_layers(len(_layer_list(teacher)[2]), num_layers)
    return student_with_layers(teacher, keep), keep


def student_with_layers(teacher: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of ``teacher`` that keeps only its layers ``keep`` (distinct teacher layer indices, in order)."""
    student = copy.deepcopy(teacher)
    parent, attr, layers = _layer_list(student)
    if not keep or list(keep) != sorted(set(keep)) or not 0 <= keep[0] <= keep[-1] < len(layers):
        raise ValueError(f"student layers must be distinct increasing indices in 0..{len(layers) - 1}, got {keep}")
    new_layers = nn.ModuleList([layers[i] for i in keep])
    for i, layer in enumerate(new_layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    setattr(parent, attr, new_layers)
    student.config.num_hidden_layers = len(keep)
    layer_types = getattr(student.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        student.config.layer_types = [layer_types[i] for i in keep]
    return student


def student_layers(teacher: ScoringModel, cfg: DistillConfig) -> int:
    """How many layers the student keeps: ``cfg.num_layers``, or a fifth of the teacher's (at least 1) when 0."""
    return cfg.num_layers or max(1, round(teacher.backbone.config.num_hidden_layers / 5))


@dataclass
class DistillReport:
    """Facts about a distillation: sizes, agreement with the teacher, why it stopped, time."""

    teacher_layers: list[int]
    teacher_parameters: int
    student_parameters: int
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    # class-prediction agreement (verbalizer argmax) with the teacher on held-out public text
    agreement_before: float = 0.0
    agreement_after: float = 0.0
    # next-token (vocabulary) top-1 agreement at every position of held-out public text
    next_token_agreement_before: float = 0.0
    next_token_agreement_after: float = 0.0
    # class-prediction agreement on the task's validation split (None when not measured)
    validation_agreement_before: float | None = None
    validation_agreement_after: float | None = None
    stopped_by: str = ""  # "target" | "time_budget" | "max_steps"
    target_agreement: float = 0.0
    teacher_output_seconds: float = 0.0  # running the teacher once over the public text (0 on a cache hit)
    teacher_output_cache: str = ""  # "hit" | "miss" | "off"
    curve: list[dict] = field(default_factory=list)  # {"step", "seconds", "agreement"} at each check
    best_step: int = 0  # the step whose weights the student ends with (keep_best: its best held-out check)
    lm_loss_applied: bool = True

    @property
    def parameter_ratio(self) -> float:
        return self.student_parameters / self.teacher_parameters

    def to_dict(self) -> dict:
        d = asdict(self)
        losses = d.pop("losses")
        d.update(teacher_layers_kept=d.pop("teacher_layers"), parameter_ratio=self.parameter_ratio,
                 first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
        return d


@torch.no_grad()
def answer_agreement(a: ScoringModel, b: ScoringModel, texts: list[str], batch_size: int = 32) -> float:
    """Fraction of texts where two models' answer-position outputs have the same argmax."""
    agree = 0
    for i in range(0, len(texts), batch_size):
        batch = a.encode(texts[i: i + batch_size])
        agree += int((a.answer_logits(batch).argmax(-1) == b.answer_logits(batch).argmax(-1)).sum())
    return agree / max(len(texts), 1)


def class_agreement(a: ScoringModel, b: ScoringModel, texts: list[str], batch_size: int = 32) -> float:
    """Fraction of texts on which two models predict the same class (verbalizer argmax, no prompt)."""
    from .evaluate import predict

    if not texts:
        raise DataError("class agreement needs at least one text")
    return float((predict(a, texts, None, batch_size) == predict(b, texts, None, batch_size)).float().mean())


def _vocab_logits(model: ScoringModel, hidden: torch.Tensor) -> torch.Tensor:
    if model.head == "embedding":
        return hidden @ model.word_embeddings.T
    return model._lm_head(hidden)


# ------------------------------------------------------------------ teacher outputs (computed once)
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


def teacher_hash(model: ScoringModel) -> str:
    """sha256 over the teacher's parameter names, shapes and values (cached on the model object)."""
    cached = getattr(model, "_post_fl_weights_hash", None)
    if cached:
        return cached
    h = hashlib.sha256()
    for name, tensor in sorted(model.backbone.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    object.__setattr__(model, "_post_fl_weights_hash", h.hexdigest())
    return model._post_fl_weights_hash


def corpus_hash(texts: list[str]) -> str:
    """sha256 of the texts in order (NUL-separated)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _task_settings(model: ScoringModel) -> dict:
    return {"head": model.head, "template": model.template, "max_length": model.max_length,
            "label_names": model.label_names, "label_words": model.label_words}


def teacher_cache_key(teacher: ScoringModel, texts: list[str], cfg: DistillConfig, seed: int) -> str:
    """Name of the teacher-output cache: sha256 of (teacher weights hash, corpus texts, every setting that shapes it)."""
    settings = {"format": CACHE_FORMAT, "task": _task_settings(teacher), "positions_per_text": cfg.positions_per_text,
                "mlm_probability": cfg.mlm_probability, "seed": seed}
    blob = json.dumps({"teacher": teacher_hash(teacher), "corpus": corpus_hash(texts), "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


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


def _read_cache(path: Path, key: str, n_texts: int) -> TeacherOutputs:
    fix = "delete it to recompute the teacher's outputs"
    tensors = read_keyed_tensors(path, key, CACHE_FORMAT, "teacher-output cache file", fix)
    names = {f.name for f in TeacherOutputs.__dataclass_fields__.values()}
    missing = sorted(names - set(tensors))
    if missing:
        raise DataError(f"{path}: the teacher-output cache file lacks {missing}; {fix}")
    out = TeacherOutputs(**{k: tensors[k] for k in names})
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
    bs = max(1, cfg.teacher_batch_size)
    bar = None
    if progress:
        from .core.progress import progress_bar

        bar = progress_bar(n, desc="teacher outputs (once)")
    for s in range(0, n, bs):
        idx = torch.tensor(order[s: s + bs])
        w = int(full.attention_mask[idx].sum(1).max())
        ids, att = inputs[idx, :w], full.attention_mask[idx, :w]
        h, _, _ = teacher.hidden_states(ids, att)
        pos = positions[idx].clamp(min=0)
        rows = torch.arange(len(idx)).unsqueeze(1)
        hidden[idx] = h[rows, pos].to(torch.float16) * (positions[idx] >= 0).unsqueeze(-1)
        logits = _vocab_logits(teacher, h)
        top1[idx, :w] = torch.where(att.bool(), logits.argmax(-1), torch.full_like(att, -1))
        class_logp[idx] = torch.log_softmax(
            teacher.class_scores(teacher.answer_logits_from_hidden(h, att, 0, full.answer_index[idx])), -1)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return TeacherOutputs(inputs, full.attention_mask, full.answer_index, targets, positions, hidden, class_logp, top1)


# ------------------------------------------------------------------ agreement on held-out text
@torch.no_grad()
def agreement_with_outputs(student: ScoringModel, held: TeacherOutputs, batch_size: int = 32) -> tuple[float, float]:
    """(class-prediction agreement, next-token top-1 agreement) of ``student`` with the teacher's cached outputs."""
    same_class, same_tok, n_tok = 0, 0, 0
    for s in range(0, len(held), batch_size):
        sl = slice(s, s + batch_size)
        att = held.attention_mask[sl]
        w = int(att.sum(1).max())
        ids, att = held.input_ids[sl, :w], att[:, :w]
        h, _, _ = student.hidden_states(ids, att)
        scores = student.class_scores(student.answer_logits_from_hidden(h, att, 0, held.answer_index[sl]))
        same_class += int((scores.argmax(-1) == held.class_logp[sl].argmax(-1)).sum())
        top = _vocab_logits(student, h).argmax(-1)
        t_top = held.top1[sl, :w]
        valid = t_top >= 0
        same_tok += int(((top == t_top) & valid).sum())
        n_tok += int(valid.sum())
    return same_class / max(len(held), 1), same_tok / max(n_tok, 1)


# ------------------------------------------------------------------ training
def distill_student(teacher: ScoringModel, public: TextDataset, cfg: DistillConfig, seed: int = 0,
                    held_out: TextDataset | None = None, progress: bool = False,
                    cache_dir: str | Path | None = None,
                    validation: TextDataset | None = None) -> tuple[ScoringModel, DistillReport]:
    """Derive a student from ``teacher`` and train it on public text until it agrees with the teacher; returns (student, report).

    The teacher's outputs on ``public`` and ``held_out`` (default: the last 200 public texts) are
    computed once (and kept in ``cache_dir`` when given). Training stops at ``cfg.target_agreement``
    class agreement on ``held_out``, at ``cfg.time_budget_s`` or after ``cfg.steps`` steps. With
    ``validation`` (labels unused) the report also gives class agreement on it.
    """
    if len(public) == 0:
        raise DataError("distillation needs a non-empty public dataset")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    held_texts = held_out.texts if held_out is not None and len(held_out) else public.texts[-min(200, len(public)):]
    train_out, train_cache = teacher_outputs(teacher, public.texts, cfg, seed, cache_dir, progress)
    held_out_out, _ = teacher_outputs(teacher, held_texts, cfg, seed + 1, cache_dir, progress)
    teacher_seconds = time.perf_counter() - start
    backbone, kept = make_student(teacher.backbone, student_layers(teacher, cfg))
    student = ScoringModel(backbone, teacher.tokenizer, teacher.head, teacher.label_names, teacher.label_words,
                           teacher.template, teacher.max_length, source=f"distilled from {teacher.source}")
    val_teacher = None
    if validation is not None and len(validation):
        from .evaluate import predict

        val_teacher = predict(teacher, validation.texts)
        val_before = float((predict(student, validation.texts) == val_teacher).float().mean())
    agree0, tok0 = agreement_with_outputs(student, held_out_out)
    report = DistillReport(teacher_layers=kept,
                           teacher_parameters=sum(p.numel() for p in teacher.backbone.parameters()),
                           student_parameters=sum(p.numel() for p in backbone.parameters()),
                           steps=0, seconds=0.0, agreement_before=agree0, next_token_agreement_before=tok0,
                           validation_agreement_before=val_before if val_teacher is not None else None,
                           target_agreement=cfg.target_agreement, teacher_output_seconds=teacher_seconds,
                           teacher_output_cache=train_cache, lm_loss_applied=teacher.head != "embedding")
    report.curve.append({"step": 0, "seconds": 0.0, "agreement": agree0, "next_token_agreement": tok0})
    if teacher.head == "embedding" and (cfg.alpha_lm > 0 or cfg.alpha_class > 0):
        log.warning("distill.alpha_lm / alpha_class ignored: an encoder without an LM head has no LM or "
                    "answer-token loss")
    for p in backbone.parameters():  # ScoringModel froze everything; train all but the embeddings
        p.requires_grad_(True)
    for emb in (backbone.get_input_embeddings(), backbone.get_output_embeddings()):
        if emb is not None:
            for p in emb.parameters():
                p.requires_grad_(False)
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=distill_learning_rate(cfg, 0, 0.0))
    train_start = time.perf_counter()
    agree = agree0
    best = (agree0, 0, _trainable_state(backbone) if cfg.keep_best else None)
    stopped = ""  # the first check comes after eval_every steps: a distillation always trains
    bar = None
    if progress:
        from .core.progress import progress_bar

        bar = progress_bar(cfg.steps, desc="distill")
    backbone.train()
    n = len(train_out)
    step = 0
    while not stopped:
        if step >= cfg.steps:
            stopped = "max_steps"
            break
        idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
        loss = _distill_loss(student, teacher, train_out, idx, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = distill_learning_rate(cfg, step, time.perf_counter() - train_start)
        optimizer.step()
        step += 1
        report.losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{report.losses[-1]:.3f}", agree=f"{agree:.3f}")
        elapsed = time.perf_counter() - train_start
        if step % cfg.eval_every == 0 or step >= cfg.steps or elapsed >= cfg.time_budget_s:
            backbone.eval()
            agree, tok = agreement_with_outputs(student, held_out_out)
            backbone.train()
            report.curve.append({"step": step, "seconds": round(elapsed, 2), "agreement": agree,
                                 "next_token_agreement": tok})
            log.info("distill step %d: held-out class agreement %.3f, next-token %.3f", step, agree, tok)
            if cfg.keep_best and agree > best[0]:
                best = (agree, step, _trainable_state(backbone))
            if agree >= cfg.target_agreement:
                stopped = "target"
            elif elapsed >= cfg.time_budget_s:
                stopped = "time_budget"
    if bar is not None:
        bar.close()
    report.best_step = step
    if cfg.keep_best and best[1] != step and best[0] > agree:
        log.info("distill: keeping the weights of step %d (held-out class agreement %.3f; last check %.3f)",
                 best[1], best[0], agree)
        backbone.load_state_dict(best[2], strict=False)
        report.best_step = best[1]
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.eval()
    student.reset_label_cache()  # label embeddings were computed with the untrained student
    report.steps, report.stopped_by = step, stopped
    report.agreement_after, report.next_token_agreement_after = agreement_with_outputs(student, held_out_out)
    if val_teacher is not None:
        from .evaluate import predict

        report.validation_agreement_after = float((predict(student, validation.texts) == val_teacher).float().mean())
    report.seconds = time.perf_counter() - start
    return student, report


def distill_learning_rate(cfg: DistillConfig, step: int, elapsed_s: float) -> float:
    """The student's learning rate before optimiser step ``step`` (0-based), ``elapsed_s`` seconds into training.

    ``constant``: ``cfg.lr``. ``linear``: ``cfg.lr`` times a linear warm-up over ``cfg.warmup_steps``
    steps, times (1 - progress), where progress is the larger of the step fraction ``step / cfg.steps``
    and the time fraction ``elapsed_s / cfg.time_budget_s`` (whichever limit ends training first); a
    floor of 1% of ``cfg.lr`` keeps the last steps from being no-ops.
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    progress = max(step / cfg.steps if cfg.steps else 1.0, elapsed_s / cfg.time_budget_s)
    return cfg.lr * warm * max(0.01, 1.0 - progress)


def _trainable_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the backbone's trained (non-embedding) weights, to restore the best checkpoint."""
    return {name: p.detach().clone() for name, p in backbone.named_parameters() if p.requires_grad}


def _distill_loss(student: ScoringModel, teacher: ScoringModel, out: TeacherOutputs, idx: torch.Tensor,
                  cfg: DistillConfig) -> torch.Tensor:
    """The distillation loss of one batch of cached teacher outputs (see the module docstring)."""
    att = out.attention_mask[idx]
    w = int(att.sum(1).max())
    ids, att, targets = out.input_ids[idx, :w], att[:, :w], out.lm_targets[idx, :w]
    pos = out.positions[idx]
    used = pos >= 0
    s_hidden, _, _ = student.hidden_states(ids, att)
    rows = torch.arange(len(idx)).unsqueeze(1).expand_as(pos)
    r, c = rows[used], pos[used]
    s_h = s_hidden[r, c]
    t_h = out.hidden[idx][used].float()
    s_logits = _vocab_logits(student, s_h)
    with torch.no_grad():
        t_logits = _vocab_logits(teacher, t_h)
    loss = cfg.alpha_kd * kl_at_temperature(s_logits, t_logits, cfg.temperature)
    if cfg.alpha_lm > 0 and teacher.head != "embedding":
        tgt = targets[r, c]
        if bool((tgt != -100).any()):
            loss = loss + cfg.alpha_lm * nn.functional.cross_entropy(s_logits, tgt, ignore_index=-100)
    if cfg.alpha_class > 0 and teacher.head != "embedding":
        answer = pos[:, 0]
        b = torch.arange(len(idx))
        s_class = torch.log_softmax(student.class_scores(_vocab_logits(student, s_hidden[b, answer])), -1)
        loss = loss + cfg.alpha_class * nn.functional.kl_div(s_class, out.class_logp[idx], log_target=True,
                                                              reduction="batchmean")
    if cfg.alpha_cos > 0:
        loss = loss + cfg.alpha_cos * (1 - nn.functional.cosine_similarity(s_h, t_h, dim=-1)).mean()
    return loss


# ------------------------------------------------------------------ the distilled student, cached
def student_cache_key(teacher: ScoringModel, public: TextDataset, held_out: TextDataset | None,
                      cfg: DistillConfig, seed: int) -> str:
    """Name of a cached student: sha256 of (teacher weights hash, distillation settings, corpus hash, task settings)."""
    settings = identifying_settings({k: v for k, v in asdict(cfg).items() if k not in ("cache",)}, "distill")
    blob = json.dumps({"format": CACHE_FORMAT, "teacher": teacher_hash(teacher), "distill": settings, "seed": seed,
                       "task": _task_settings(teacher), "corpus": corpus_hash(public.texts),
                       "held_out": corpus_hash(held_out.texts) if held_out is not None else ""}, sort_keys=True)
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
    from .core.jsonio import write_json

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
                                progress: bool = False) -> tuple[Path | None, ScoringModel | None, dict, str]:
    """The student of (teacher, public corpus, distillation settings, seed): from the student cache under
    ``cache_root`` (``None`` = no cache), else distilled now (teacher outputs cached under
    ``cache_root/../teacher-outputs``) and stored there.

    Returns (cached student directory or None, the student when distilled now or None, its report as a
    dict, "hit" | "miss" | "off").
    """
    train, held_out = public_distillation_split(public, seed)
    key = student_cache_key(teacher, train, held_out, cfg, seed) if cache_root is not None else ""
    hit = cached_student_dir(cache_root, key) if cache_root is not None else None
    if hit is not None:
        log.info("distill: cached student %s (delete it to distil again)", hit)
        from .core.jsonio import read_json

        return hit, None, read_json(hit / "distill_report.json"), "hit"
    student, rep = distill_student(teacher, train, cfg, seed, held_out=held_out, progress=progress,
                                   cache_dir=cache_root.parent / "teacher-outputs" if cache_root is not None else None,
                                   validation=validation)
    stored = store_student(student, rep, cache_root, key) if cache_root is not None else None
    return stored, student, rep.to_dict(), "miss" if cache_root is not None else "off"
