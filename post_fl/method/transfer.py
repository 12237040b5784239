"""POST prompt transfer: move a prompt tuned on the student to the teacher, on public data only.

For public inputs x the teacher's prompt P_t is trained so that, at the answer position,

    L = alpha * T^2 * KL( softmax(Δ_s(x) / T) || softmax(Δ_t(x) / T) )
      + (1 - alpha) * T^2 * KL( softmax(s(x; P_s) / T) || softmax(t(x; P_t) / T) )

where s, t are the student's and teacher's answer logits (``space = "vocab"``, as in the paper's
code) or their verbalizer class scores (``space = "classes"``), Δ_s = s(x; P_s) - s(x) and
Δ_t = t(x; P_t) - t(x) the changes the prompts cause (Wang et al., ICML 2025, ``mix_transfer``).
The first term aligns the *direction* in which each prompt moves its model's output away
from the unprompted output; the second matches the prompted outputs themselves. With
``transfer.center_change`` (the default; post-fl's, not the paper's) Δ_s(x) is replaced by Δ_s(x) − m, m its
mean over the public texts used, in both terms (:mod:`post_fl.method.transfer_targets`): the teacher is
taught how the student's prompt moves each text relative to the others, not the shift it gives them all.

s(x; P_s), s(x) and t(x) never change during transfer: they are computed once, before the loop, for
the texts the loop will use (:mod:`post_fl.method.transfer_targets`, which also says what
``transfer.target_top_k`` keeps exactly and what it approximates), so a step costs one teacher
forward/backward with P_t.

``alpha`` is fixed (the paper's code: 0.5) or ``"auto"``, a label-free rule of post-fl's (not the
paper's): alpha = 1 - (a - 1/C) / (1 - 1/C) clipped to [0, 1], with a the share of public texts on
which the unprompted student and teacher predict the same class and C the number of classes. The
less the student agrees with the teacher, the more the loss relies on the prompt's *change* rather
than on the raw outputs.

Checkpoint selection is label-free: ``transfer.heldout_fraction`` of the public texts are held out of
training, the loss above is measured on them at step 0, every ``transfer.eval_every`` steps and at
the last step, and the prompt of the lowest held-out loss is returned. Nothing here sees private
data: the student's prompt is the only private-derived input, and it is already differentially
private; a labelled ``validation`` set, when given, is only *reported* along the curve.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.compute import pass_rows
from ..core.config import TransferConfig
from ..core.data import DataError, TextDataset
from ..core.models import ScoringModel
from ..core.prompt import SoftPrompt, init_from_vocab
from .transfer_targets import compute_targets, model_outputs, trimmed

CURVE_COLUMNS = ("step", "train_loss", "heldout_loss", "validation_accuracy")

log = logging.getLogger(__name__)
# a transferred prompt that moves a class share on held-out public text by more than this gets a warning; between
# the 0.04 of a transfer that kept zero-shot accuracy and the 0.31 of one that lost 0.16 (docs/benchmarks.md)
CLASS_SHARE_SHIFT_WARNING = 0.2


def kl_at_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(target / T) || softmax(pred / T)), batch mean; ``teacher_logits`` are the target."""
    log_p = nn.functional.log_softmax(student_logits / temperature, dim=-1)
    q = nn.functional.softmax(teacher_logits / temperature, dim=-1)
    return nn.functional.kl_div(log_p, q, reduction="batchmean") * temperature ** 2


def post_transfer_loss(target_prompted: torch.Tensor, target_plain: torch.Tensor, source_prompted: torch.Tensor,
                       source_plain: torch.Tensor, alpha: float, temperature: float) -> tuple[torch.Tensor, dict]:
    """POST's loss for the target (teacher) given the source (student) outputs; returns (loss, parts)."""
    change = kl_at_temperature(target_prompted - target_plain, source_prompted - source_plain, temperature)
    output = kl_at_temperature(target_prompted, source_prompted, temperature)
    loss = alpha * change + (1 - alpha) * output
    return loss, {"change_kl": float(change.detach()), "output_kl": float(output.detach())}


def auto_alpha(agreement: float, num_classes: int) -> float:
    """``transfer.alpha = "auto"``: 1 - (a - 1/C) / (1 - 1/C) clipped to [0, 1] (a = ``agreement``, C =
    ``num_classes``): 0 when student and teacher always agree, 1 at chance agreement or below."""
    if num_classes < 2:
        raise ValueError(f"transfer.alpha = 'auto' needs at least 2 classes, got {num_classes}")
    chance = 1.0 / num_classes
    return min(1.0, max(0.0, 1.0 - (agreement - chance) / (1.0 - chance)))


def heldout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows) of ``n`` public texts, each sorted: round(fraction n) held out (at
    least 1 when fraction > 0), chosen by ``seed`` on a generator of their own (the batches' is untouched)."""
    held = 0 if fraction <= 0 else max(1, round(fraction * n))
    if held >= n:
        raise DataError(f"transfer.heldout_fraction = {fraction} holds out {held} of the {n} public texts and "
                        "leaves none to train on: lower it (0 = no selection) or use more public text")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[held:].sort().values, perm[:held].sort().values


@dataclass
class TransferResult:
    """The transferred teacher prompt, the loss curve that produced it and how it was selected.

    ``losses`` has one training-batch loss per step. ``curve`` has one row per check (step 0, every
    ``eval_every`` steps, the last step): ``step``, ``train_loss`` (mean batch loss since the previous
    check; None at step 0), ``heldout_loss`` (None without held-out texts) and ``validation_accuracy``
    (None unless a validation set was given; reported only, never used to select). ``best_step`` is
    the step whose prompt is returned (the last one without held-out texts).
    """

    prompt: SoftPrompt
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    public_examples: int = 0
    curve: list[dict] = field(default_factory=list)
    best_step: int = 0
    alpha_used: float | None = None  # None only when no step ran with alpha = "auto"
    seconds_targets: float = 0.0  # the one pass computing the fixed targets
    seconds_training: float = 0.0  # the steps and the checks
    heldout_examples: int = 0
    target_examples: int = 0  # public texts whose targets were computed (those the steps drew + held out)
    kept_mass: float = 1.0  # vocab top-k: mean share of the student's prompted distribution kept
    # label-free check on the held-out public texts (None without them): heldout_prediction_check()
    heldout_check: dict | None = None

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan

    def summary(self) -> dict:
        """Everything but the prompt, for a stage's or a run's JSON results."""
        return {"first_loss": self.first_loss, "last_loss": self.last_loss, "losses": self.losses,
                "steps": len(self.losses), "best_step": self.best_step, "alpha_used": self.alpha_used,
                "public_examples": self.public_examples, "heldout_examples": self.heldout_examples,
                "target_examples": self.target_examples, "kept_mass": self.kept_mass,
                "heldout_check": self.heldout_check, "curve": self.curve,
                "seconds": self.seconds, "seconds_targets": self.seconds_targets,
                "seconds_training": self.seconds_training}


def write_curve_csv(curve: list[dict], path: str | Path) -> Path:
    """The transfer curve as CSV (:data:`CURVE_COLUMNS`; an empty cell for None)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CURVE_COLUMNS)
        for row in curve:
            w.writerow(["" if row.get(c) is None else row[c] for c in CURVE_COLUMNS])
    return path


def _initial_prompt(student_prompt: nn.Module, teacher: ScoringModel, init: str, gen: torch.Generator) -> SoftPrompt:
    """The teacher's starting input prompt; a student prompt with ``input_prompt()`` (a deep prompt) gives its
    layer-0 slice, while the targets still come from the student run with the whole student prompt."""
    start = student_prompt.input_prompt() if hasattr(student_prompt, "input_prompt") else student_prompt
    if init == "student":
        if start.dim != teacher.embedding_dim:
            raise ValueError(f"transfer.init = 'student' needs equal widths; student prompt has "
                             f"{start.dim}, teacher embeddings {teacher.embedding_dim}: use init = 'vocab'")
        return SoftPrompt(start.weight.detach())
    return init_from_vocab(teacher.word_embeddings, start.num_virtual_tokens, gen)


def transfer_prompt(student: ScoringModel, student_prompt: SoftPrompt, teacher: ScoringModel, public: TextDataset,
                    cfg: TransferConfig, seed: int = 0, progress: bool = False,
                    validation: TextDataset | None = None) -> TransferResult:
    """Train a teacher prompt with POST's transfer loss on ``public`` texts (labels, if any, unused).

    Returns the prompt of the lowest loss on the held-out public texts (module docstring). A labelled
    ``validation`` set is optional and used ONLY to report the teacher's accuracy with the prompt at
    each check (``curve[i]["validation_accuracy"]``): it is never used to select the returned prompt.
    """
    if len(public) == 0:
        raise DataError("prompt transfer needs a non-empty public dataset")
    if student.head != teacher.head:
        raise ValueError(f"student head {student.head!r} differs from teacher head {teacher.head!r}")
    device = teacher.device  # the fixed targets, the encoded texts and the prompt all live there
    if student.device != device or next(student_prompt.parameters()).device != device:
        raise ValueError(f"transfer needs student ({student.device}), its prompt "
                         f"({next(student_prompt.parameters()).device}) and teacher ({device}) on one device")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    prompt = _initial_prompt(student_prompt, teacher, cfg.init, gen)
    alpha = None if cfg.alpha == "auto" else float(cfg.alpha)
    n = len(public)
    if cfg.steps == 0:
        return TransferResult(prompt=prompt, seconds=time.perf_counter() - start, public_examples=n, alpha_used=alpha)
    train_rows, held_rows = heldout_split(n, cfg.heldout_fraction, seed)
    batch = min(cfg.batch_size, len(train_rows))
    draws = [train_rows[torch.randperm(len(train_rows), generator=gen)[:batch]] for _ in range(cfg.steps)]
    used = torch.unique(torch.cat([*draws, held_rows]))  # sorted: the texts whose targets the loop needs
    texts = [public.texts[i] for i in used.tolist()]
    s_enc = student.encode(texts).to(device)
    t_enc = teacher.encode(texts).to(device) if teacher.tokenizer is not student.tokenizer else s_enc
    rows_per_pass = pass_rows(cfg.batch_size, teacher)  # memory-bound passes: larger on a GPU
    targets = compute_targets(student, student_prompt, teacher, s_enc, t_enc, cfg.space, cfg.target_top_k,
                              cfg.temperature, rows_per_pass, cfg.center_change)
    if alpha is None:
        alpha = auto_alpha(targets.agreement(), teacher.num_classes)
    seconds_targets = time.perf_counter() - start

    def loss_on(rows: torch.Tensor) -> torch.Tensor:  # rows of ``used``
        tg = targets.rows(rows)
        t_prompted = tg.select(model_outputs(teacher, trimmed(t_enc.rows(rows)), prompt, cfg.space))
        return post_transfer_loss(t_prompted, tg.teacher_plain, tg.student_prompted, tg.student_plain, alpha,
                                  cfg.temperature)[0]

    held = torch.searchsorted(used, held_rows)
    selection = BestCheckpoint(prompt)
    optimizer = torch.optim.Adam(prompt.parameters(), lr=cfg.lr)
    losses: list[float] = []
    curve: list[dict] = []

    def check(step: int) -> None:
        since = losses[curve[-1]["step"]:] if curve else []
        held_loss = _mean_loss(loss_on, held, rows_per_pass) if len(held) else None
        acc = None
        if validation is not None:  # reported only: never looked at by the selection below
            from .evaluate import accuracy

            acc = accuracy(teacher, validation, prompt, cfg.batch_size)
        curve.append({"step": step, "train_loss": sum(since) / len(since) if since else None,
                      "heldout_loss": held_loss, "validation_accuracy": acc})
        # the lowest held-out loss; without held-out texts a falling score, so the last step is kept
        selection.offer(step, held_loss if held_loss is not None else -float(step))

    bar = None
    if progress:
        from ..core.progress import progress_bar

        bar = progress_bar(cfg.steps, desc="transfer")
    try:
        check(0)
        for step, rows in enumerate(draws, start=1):
            loss = loss_on(torch.searchsorted(used, rows))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                check(step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
    selection.restore()
    prompt.weight.grad = None
    check_rows = [texts[i] for i in held.tolist()]  # the unprompted teacher's predictions are among the targets
    heldout_check = heldout_prediction_check(teacher, prompt, check_rows, cfg.batch_size,
                                             plain=targets.teacher_class[held].cpu()) if check_rows else None
    log_heldout_check(heldout_check, teacher.label_names)  # every caller (single site, federated server) logs it
    end = time.perf_counter()
    return TransferResult(prompt=prompt, losses=losses, seconds=end - start, public_examples=n, curve=curve,
                          best_step=selection.step, alpha_used=alpha, seconds_targets=seconds_targets,
                          seconds_training=end - start - seconds_targets, heldout_examples=len(held),
                          target_examples=len(used), kept_mass=targets.kept_mass, heldout_check=heldout_check)


def heldout_prediction_check(teacher: ScoringModel, prompt: SoftPrompt, texts: list[str], batch_size: int = 32,
                             plain: torch.Tensor | None = None) -> dict:
    """A label-free sanity check of a transferred prompt on public texts: how often the prompted teacher
    predicts the same class as the unprompted teacher (``agreement_with_zero_shot``), and the share of
    texts predicted as each class with and without the prompt (``class_shares_*``, in label order).

    A transferred prompt that carried the student prompt's correction of the *student's* class bias shows
    here as a class share far from the teacher's own (docs/method.md#transfer). Public text only: no label
    and nothing private is read, so it costs no privacy. ``plain``: the unprompted teacher's predictions on
    ``texts`` when the caller has them already (the transfer's targets do), else they are computed."""
    from .evaluate import predict

    if plain is None:
        plain = predict(teacher, texts, None, batch_size)
    prompted = predict(teacher, texts, prompt, batch_size)
    shares = lambda pred: [float((pred == c).float().mean()) for c in range(teacher.num_classes)]  # noqa: E731
    return {"texts": len(texts), "agreement_with_zero_shot": float((plain == prompted).float().mean()),
            "class_shares_zero_shot": shares(plain), "class_shares_transferred": shares(prompted)}


def _mean_loss(loss_on, rows: torch.Tensor, batch_size: int) -> float:
    """The loss over ``rows`` (mean per text), in batches, without gradients."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            total += float(loss_on(part)) * len(part)
    return total / len(rows)


class BestCheckpoint:
    """Keeps a copy of ``prompt``'s parameters at the lowest score offered (the earliest on ties);
    :meth:`restore` puts them back into ``prompt``."""

    def __init__(self, prompt: nn.Module) -> None:
        self.prompt, self.step, self.score, self.state = prompt, 0, math.inf, None

    def offer(self, step: int, score: float) -> None:
        if self.state is None or score < self.score:
            self.step, self.score = step, score
            self.state = {k: v.detach().clone() for k, v in self.prompt.state_dict().items()}

    def restore(self) -> None:
        if self.state is not None:
            self.prompt.load_state_dict(self.state)


def log_heldout_check(check: dict | None, label_names: list[str]) -> None:
    """Log the held-out check (:func:`heldout_prediction_check`) in one line; warn when a predicted class share
    moves by more than ``CLASS_SHARE_SHIFT_WARNING``."""
    if not check:
        return
    shares = ", ".join(f"{name} {a:.2f} -> {b:.2f}" for name, a, b in
                       zip(label_names, check["class_shares_zero_shot"], check["class_shares_transferred"]))
    log.info("transfer check on %d held-out public texts (no labels): agreement with zero-shot %.2f; "
             "predicted class shares, zero-shot -> transferred: %s", check["texts"], check["agreement_with_zero_shot"],
             shares)
    shift = max(abs(a - b) for a, b in zip(check["class_shares_zero_shot"], check["class_shares_transferred"]))
    if shift > CLASS_SHARE_SHIFT_WARNING:
        log.warning("the transferred prompt moves the teacher's predicted class shares on public text by %.2f "
                    "(> %.2f): it may carry the student's own class bias rather than the task; compare it with "
                    "zero-shot before use (docs/method.md#transfer)", shift, CLASS_SHARE_SHIFT_WARNING)
