"""Knowledge distillation of a small student from the teacher (DistilBERT-style, as in POST), on cached teacher outputs.

Two objectives (``distill.objective``). ``"lm"`` is general language-model distillation as in the POST
paper: raw public text packed into sequences, the losses below at *every* position, no task template and
no class term. ``"template"`` fits the student where the task reads it: each public text in the task's
template, at the answer position and a few sampled others, with a class term. What each does to how
well a prompt steers the student is measured in ``docs/benchmarks.md`` (the student frontier).

The student (:mod:`post_fl.method.student`: the teacher with ``num_layers`` evenly spaced layers kept)
is trained on public text, filled into the task's template, so that the answer position (where the
verbalizer reads the class) is among the distilled positions:

    alpha_kd    * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))   (KD on vocabulary logits)
  + alpha_class * KL(p_t(class) || p_s(class))                     (KD on the verbalizer's classes, answer position)
  + alpha_lm    * LM loss (next-token CE for causal LMs, MLM CE for masked LMs)
  + alpha_cos   * (1 - cos(h_s, h_t))                              (last-layer hidden-state alignment)

at the answer position and ``positions_per_text`` other sampled positions of each text (the masked
ones for an MLM). The input and output embeddings stay frozen at the teacher's values, so a soft
prompt means the same thing in both models' embedding spaces. For an encoder without an LM head,
the KD logits are the hidden states projected on the frozen word embeddings (a tied pseudo-LM head),
and the LM and class terms do not apply. The teacher runs once over the public text
(:mod:`post_fl.method.teacher_outputs`); every step here costs only the student.

**Training runs for ``steps`` steps** (reproducible from the seed); every ``eval_every`` steps the
student's class predictions on held-out public text are compared with the teacher's, and training may
end early when their agreement reaches ``target_agreement`` (default 1.0: never) or when the optional
wall-clock cap ``time_budget_s`` (default inf: off) has passed (``steps = 0`` keeps the layer-copied student untrained). The report gives both
agreement measures (next-token top-1 on held-out public text; class predictions on held-out public
text and, when given, on the task's validation split). The distilled student is saved and cached by
:mod:`post_fl.method.student_cache`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..core.compute import pass_rows
from ..core.config import DistillConfig
from ..core.data import DataError, TextDataset
from ..core.models import ScoringModel
from .student import distill_objective, make_student, student_layers
from .teacher_outputs import TeacherOutputs, teacher_lm_outputs, teacher_outputs, vocab_logits
from .transfer import kl_at_temperature

log = logging.getLogger(__name__)


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
    objective: str = ""  # "lm" | "template": the objective used (distill.objective resolved)

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


# ------------------------------------------------------------------ agreement on held-out text
@torch.no_grad()
def agreement_with_outputs(student: ScoringModel, held: TeacherOutputs, batch_size: int = 32) -> tuple[float, float]:
    """(class-prediction agreement, next-token top-1 agreement) of ``student`` with the teacher's cached outputs."""
    same_class, same_tok, n_tok = 0, 0, 0
    batch_size = pass_rows(batch_size, student)
    for s in range(0, len(held), batch_size):
        sl = slice(s, s + batch_size)
        att = held.attention_mask[sl]
        w = int(att.sum(1).max())
        ids, att = held.input_ids[sl, :w], att[:, :w]
        h, _, _ = student.hidden_states(ids, att)
        scores = student.class_scores(student.answer_logits_from_hidden(h, att, 0, held.answer_index[sl]))
        same_class += int((scores.argmax(-1) == held.class_logp[sl].argmax(-1)).sum())
        top = vocab_logits(student, h).argmax(-1)
        t_top = held.top1[sl, :w]
        valid = t_top >= 0
        same_tok += int(((top == t_top) & valid).sum())
        n_tok += int(valid.sum())
    return same_class / max(len(held), 1), same_tok / max(n_tok, 1)


# ------------------------------------------------------------------ training
def distill_student(teacher: ScoringModel, public: TextDataset, cfg: DistillConfig, seed: int = 0,
                    held_out: TextDataset | None = None, progress: bool = False,
                    cache_dir: str | Path | None = None,
                    validation: TextDataset | None = None,
                    corpus: TextDataset | None = None) -> tuple[ScoringModel, DistillReport]:
    """Derive a student from ``teacher`` and train it on public text until it agrees with the teacher; returns (student, report).

    The teacher's outputs on ``public`` and ``held_out`` (default: the last 200 public texts) are
    computed once (and kept in ``cache_dir`` when given). Training stops at ``cfg.target_agreement``
    class agreement on ``held_out``, at ``cfg.time_budget_s`` or after ``cfg.steps`` steps. With
    ``validation`` (labels unused) the report also gives class agreement on it. With
    ``cfg.objective = "lm"`` the student learns from the teacher's outputs at every position of raw
    public text (``corpus``, default ``public``, packed into sequences); held-out agreement is still
    measured on the templated ``held_out`` texts.
    """
    if len(public) == 0:
        raise DataError("distillation needs a non-empty public dataset")
    cfg = replace(cfg, objective=distill_objective(teacher, cfg))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    held_texts = held_out.texts if held_out is not None and len(held_out) else public.texts[-min(200, len(public)):]
    if cfg.objective == "lm":
        lm_texts = (corpus if corpus is not None and len(corpus) else public).texts
        train_out, train_cache = teacher_lm_outputs(teacher, lm_texts, cfg, cache_dir, progress)
    else:
        train_out, train_cache = teacher_outputs(teacher, public.texts, cfg, seed, cache_dir, progress)
    held_out_out, _ = teacher_outputs(teacher, held_texts, cfg, seed + 1, cache_dir, progress)
    device = teacher.device  # the student trains where the teacher is, on the cached outputs moved there once
    train_out, held_out_out = train_out.to(device), held_out_out.to(device)
    teacher_seconds = time.perf_counter() - start
    backbone, kept = make_student(teacher.backbone, student_layers(teacher, cfg), cfg.layer_selection)
    backbone.float()  # trained in float32 whatever the teacher's precision (post_fl.core.compute)
    student = ScoringModel(backbone, teacher.tokenizer, teacher.head, teacher.label_names, teacher.label_words,
                           teacher.template, teacher.max_length, source=f"distilled from {teacher.source}")
    student.compute = teacher.compute
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
                           teacher_output_cache=train_cache, lm_loss_applied=teacher.head != "embedding",
                           objective=cfg.objective)
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
    score = checkpoint_score(cfg.objective, agree0, tok0)  # of the latest check, what keep_best ranks
    best = (score, 0, _trainable_state(backbone) if cfg.keep_best else None)
    stopped = ""  # the first check comes after eval_every steps: a distillation always trains
    bar = None
    if progress:
        from ..core.progress import progress_bar

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
            score = checkpoint_score(cfg.objective, agree, tok)
            if cfg.keep_best and score > best[0]:
                best = (score, step, _trainable_state(backbone))
            if agree >= cfg.target_agreement:
                stopped = "target"
            elif elapsed >= cfg.time_budget_s:
                stopped = "time_budget"
    if bar is not None:
        bar.close()
    report.best_step = step
    if cfg.keep_best and best[1] != step and best[0] > score:
        log.info("distill: keeping the weights of step %d (held-out %s agreement %.3f; last check %.3f)",
                 best[1], "next-token" if cfg.objective == "lm" else "class", best[0], score)
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


def checkpoint_score(objective: str, class_agreement: float, next_token_agreement: float) -> float:
    """The held-out check ``keep_best`` ranks a distillation checkpoint by: what ``objective`` trains. For
    "lm", agreement with the teacher's next token (raw text has no class; an undistilled copy of the teacher's
    layers can agree on classes more by chance); for "template", agreement on the task's class."""
    return next_token_agreement if objective == "lm" else class_agreement


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
    idx = idx.to(out.input_ids.device)
    att = out.attention_mask[idx]
    w = int(att.sum(1).max())
    ids, att, targets = out.input_ids[idx, :w], att[:, :w], out.lm_targets[idx, :w]
    pos = out.positions[idx]
    used = pos >= 0
    s_hidden, _, _ = student.hidden_states(ids, att)
    rows = torch.arange(len(idx), device=idx.device).unsqueeze(1).expand_as(pos)
    r, c = rows[used], pos[used]
    s_h = s_hidden[r, c]
    t_h = out.hidden[idx][used].float()
    s_logits = vocab_logits(student, s_h)
    with torch.no_grad():
        t_logits = vocab_logits(teacher, t_h)
    loss = cfg.alpha_kd * kl_at_temperature(s_logits, t_logits, cfg.temperature)
    if cfg.alpha_lm > 0 and teacher.head != "embedding":
        tgt = targets[r, c]
        if bool((tgt != -100).any()):
            loss = loss + cfg.alpha_lm * nn.functional.cross_entropy(s_logits, tgt, ignore_index=-100)
    if cfg.alpha_class > 0 and teacher.head != "embedding" and cfg.objective == "template":
        answer = pos[:, 0]
        b = torch.arange(len(idx), device=idx.device)
        s_class = torch.log_softmax(student.class_scores(vocab_logits(student, s_hidden[b, answer])), -1)
        loss = loss + cfg.alpha_class * nn.functional.kl_div(s_class, out.class_logp[idx], log_target=True,
                                                              reduction="batchmean")
    if cfg.alpha_cos > 0:
        loss = loss + cfg.alpha_cos * (1 - nn.functional.cosine_similarity(s_h, t_h, dim=-1)).mean()
    return loss


