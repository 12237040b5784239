"""POST prompt transfer: move a prompt tuned on the student to the teacher, on public data only.

For public inputs x the teacher's prompt P_t is trained so that, at the answer position,

    L = alpha * T^2 * KL( softmax(Δ_s(x) / T) || softmax(Δ_t(x) / T) )
      + (1 - alpha) * T^2 * KL( softmax(s(x; P_s) / T) || softmax(t(x; P_t) / T) )

where s, t are the student's and teacher's answer logits (``space = "vocab"``, as in the paper's
code) or their verbalizer class scores (``space = "classes"``), Δ_s = s(x; P_s) - s(x) and
Δ_t = t(x; P_t) - t(x) the changes the prompts cause (Wang et al., ICML 2025, ``mix_transfer``).
The first term aligns the *direction* in which each prompt moves its model's output away
from the unprompted output; the second matches the prompted outputs themselves.
Nothing here sees private data: the student's prompt is the only private-derived input,
and it is already differentially private.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.config import TransferConfig
from ..core.data import DataError, TextDataset
from ..core.models import ScoringModel
from ..core.prompt import SoftPrompt, init_from_vocab


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


@dataclass
class TransferResult:
    """The transferred teacher prompt and the loss curve that produced it."""

    prompt: SoftPrompt
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    public_examples: int = 0

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan


def transfer_prompt(student: ScoringModel, student_prompt: SoftPrompt, teacher: ScoringModel, public: TextDataset,
                    cfg: TransferConfig, seed: int = 0, progress: bool = False) -> TransferResult:
    """Train a teacher prompt with POST's transfer loss on ``public`` texts (labels, if any, unused)."""
    if len(public) == 0:
        raise DataError("prompt transfer needs a non-empty public dataset")
    if student.head != teacher.head:
        raise ValueError(f"student head {student.head!r} differs from teacher head {teacher.head!r}")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    if cfg.init == "student":
        if student_prompt.dim != teacher.embedding_dim:
            raise ValueError(f"transfer.init = 'student' needs equal widths; student prompt has "
                             f"{student_prompt.dim}, teacher embeddings {teacher.embedding_dim}: use init = 'vocab'")
        prompt = SoftPrompt(student_prompt.weight.detach())
    else:
        prompt = init_from_vocab(teacher.word_embeddings, student_prompt.num_virtual_tokens, gen)
    optimizer = torch.optim.Adam(prompt.parameters(), lr=cfg.lr)
    encoded = student.encode(public.texts)  # same tokenizer family; re-encode for the teacher below
    teacher_encoded = teacher.encode(public.texts) if teacher.tokenizer is not student.tokenizer else encoded
    n = len(public)
    batch = min(cfg.batch_size, n)
    losses: list[float] = []
    bar = None
    if progress:
        from ..core.progress import progress_bar

        bar = progress_bar(cfg.steps, desc="transfer")
    if cfg.space == "classes":
        def outputs(model: ScoringModel, batch, p=None) -> torch.Tensor:
            return model.class_scores(model.answer_logits(batch, p))
    else:
        def outputs(model: ScoringModel, batch, p=None) -> torch.Tensor:
            return model.answer_logits(batch, p)
    student_prompt.requires_grad_(False)
    try:
        for step in range(cfg.steps):
            idx = torch.randperm(n, generator=gen)[:batch]
            s_batch, t_batch = encoded.rows(idx), teacher_encoded.rows(idx)
            with torch.no_grad():
                s_prompted = outputs(student, s_batch, student_prompt)
                s_plain = outputs(student, s_batch)
                t_plain = outputs(teacher, t_batch)
            t_prompted = outputs(teacher, t_batch, prompt)
            loss, _ = post_transfer_loss(t_prompted, t_plain, s_prompted, s_plain, cfg.alpha, cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        student_prompt.requires_grad_(True)
        if bar is not None:
            bar.close()
    prompt.weight.grad = None
    return TransferResult(prompt=prompt, losses=losses, seconds=time.perf_counter() - start, public_examples=n)
