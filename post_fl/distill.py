"""Knowledge distillation of a small student from the teacher (DistilBERT-style, as in POST).

The student is a copy of the teacher that keeps its width, tokenizer and embeddings and
``num_layers`` evenly spaced transformer layers (e.g. layers 0 and 5 of 6). It is trained
on public text with

    alpha_kd  * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))      (KD on output logits)
  + alpha_lm  * LM loss (next-token CE for causal LMs, MLM CE for masked LMs)
  + alpha_cos * (1 - cos(h_s, h_t))                                 (hidden-state alignment)

at (at most ``kd_positions``) sampled non-padding positions, the masked ones for an MLM. The input and output embeddings stay frozen at the teacher's
values, so a soft prompt means the same thing in both models' embedding spaces. For an
encoder without an LM head, the KD logits are the hidden states projected on the frozen
word embeddings (a tied pseudo-LM head) and the LM term does not apply.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import DistillConfig
from .data import DataError, TextDataset
from .models import ScoringModel
from .transfer import kl_at_temperature

log = logging.getLogger(__name__)


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
    student = copy.deepcopy(teacher)
    parent, attr, layers = _layer_list(student)
    keep = select_layers(len(layers), num_layers)
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
    return student, keep


@dataclass
class DistillReport:
    """Facts about a distillation: sizes, agreement with the teacher, time."""

    teacher_layers: list[int]
    teacher_parameters: int
    student_parameters: int
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    agreement_before: float = 0.0  # top-1 agreement of answer logits with the teacher on held-out text
    agreement_after: float = 0.0
    lm_loss_applied: bool = True

    @property
    def parameter_ratio(self) -> float:
        return self.student_parameters / self.teacher_parameters

    def to_dict(self) -> dict:
        return {"teacher_layers_kept": self.teacher_layers, "teacher_parameters": self.teacher_parameters,
                "student_parameters": self.student_parameters, "parameter_ratio": self.parameter_ratio,
                "steps": self.steps, "seconds": self.seconds, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None,
                "agreement_before": self.agreement_before, "agreement_after": self.agreement_after,
                "lm_loss_applied": self.lm_loss_applied}


@torch.no_grad()
def answer_agreement(a: ScoringModel, b: ScoringModel, texts: list[str], batch_size: int = 32) -> float:
    """Fraction of texts where two models' answer-position outputs have the same argmax."""
    agree = 0
    for i in range(0, len(texts), batch_size):
        batch = a.encode(texts[i: i + batch_size])
        agree += int((a.answer_logits(batch).argmax(-1) == b.answer_logits(batch).argmax(-1)).sum())
    return agree / max(len(texts), 1)


def _token_batches(tokenizer, texts: list[str], max_length: int):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _vocab_logits(model: ScoringModel, hidden: torch.Tensor) -> torch.Tensor:
    if model.head == "embedding":
        return hidden @ model.word_embeddings.T
    return model._lm_head(hidden)


def distill_student(teacher: ScoringModel, public: TextDataset, cfg: DistillConfig, seed: int = 0,
                    held_out: TextDataset | None = None, progress: bool = False) -> tuple[ScoringModel, DistillReport]:
    """Derive and train a student from ``teacher`` on public text; returns (student, report)."""
    if len(public) == 0:
        raise DataError("distillation needs a non-empty public dataset")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    backbone, kept = make_student(teacher.backbone, cfg.num_layers)
    student = ScoringModel(backbone, teacher.tokenizer, teacher.head, teacher.label_names, teacher.label_words,
                           teacher.template, teacher.max_length, source=f"distilled from {teacher.source}")
    for p in backbone.parameters():  # ScoringModel froze everything; train all but the embeddings
        p.requires_grad_(True)
    for emb in (backbone.get_input_embeddings(), backbone.get_output_embeddings()):
        if emb is not None:
            for p in emb.parameters():
                p.requires_grad_(False)
    held = (held_out.texts if held_out is not None else public.texts[-min(200, len(public)):])
    report = DistillReport(teacher_layers=kept,
                           teacher_parameters=sum(p.numel() for p in teacher.backbone.parameters()),
                           student_parameters=sum(p.numel() for p in backbone.parameters()),
                           steps=cfg.steps, seconds=0.0, agreement_before=answer_agreement(teacher, student, held),
                           lm_loss_applied=teacher.head != "embedding")
    if teacher.head == "embedding" and cfg.alpha_lm > 0:
        log.warning("distill.alpha_lm=%s ignored: an encoder without an LM head has no LM loss", cfg.alpha_lm)
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)
    tok = teacher.tokenizer
    special_ids = torch.tensor(sorted(set(tok.all_special_ids) | {tok.pad_token_id}))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="distill", leave=False)
    backbone.train()
    for step in range(cfg.steps):
        idx = torch.randperm(len(public), generator=gen)[: cfg.batch_size].tolist()
        input_ids, attention = _token_batches(tok, [public.texts[i] for i in idx], teacher.max_length)
        inputs = input_ids.clone()
        lm_targets = None
        if teacher.head == "masked":
            special = torch.isin(input_ids, special_ids)
            chosen = (torch.rand(input_ids.shape, generator=gen) < cfg.mlm_probability) & ~special
            inputs[chosen] = tok.mask_token_id
            lm_targets = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        with torch.no_grad():
            t_hidden, _, _ = teacher.hidden_states(inputs, attention)
        s_hidden, _, _ = student.hidden_states(inputs, attention)
        # KD and LM terms on vocabulary logits at a bounded sample of positions: the masked ones for an
        # MLM (as DistilBERT), otherwise up to cfg.kd_positions random non-padding positions.
        if lm_targets is not None and bool((lm_targets != -100).any()):
            rows, cols = (lm_targets != -100).nonzero(as_tuple=True)
        else:
            valid = attention.clone()
            if teacher.head == "causal":
                valid[:, -1] = 0  # the last position has no next token
                valid = valid * attention.roll(-1, dims=1)
            rows, cols = valid.nonzero(as_tuple=True)
        if len(rows) > cfg.kd_positions:
            pick = torch.randperm(len(rows), generator=gen)[: cfg.kd_positions]
            rows, cols = rows[pick], cols[pick]
        s_logits = _vocab_logits(student, s_hidden[rows, cols])
        with torch.no_grad():
            t_logits = _vocab_logits(teacher, t_hidden[rows, cols])
        loss = cfg.alpha_kd * kl_at_temperature(s_logits, t_logits, cfg.temperature)
        if cfg.alpha_lm > 0 and teacher.head == "causal":
            loss = loss + cfg.alpha_lm * nn.functional.cross_entropy(s_logits, input_ids[rows, cols + 1])
        elif cfg.alpha_lm > 0 and teacher.head == "masked":
            loss = loss + cfg.alpha_lm * nn.functional.cross_entropy(s_logits, input_ids[rows, cols])
        if cfg.alpha_cos > 0:
            mask = attention.bool()
            cos = nn.functional.cosine_similarity(s_hidden[mask], t_hidden[mask], dim=-1)
            loss = loss + cfg.alpha_cos * (1 - cos).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report.losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{report.losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.eval()
    student.reset_label_cache()  # label embeddings were computed with the untrained student
    report.agreement_after = answer_agreement(teacher, student, held)
    report.seconds = time.perf_counter() - start
    return student, report


def save_student(student: ScoringModel, directory: str | Path, report: DistillReport | None = None) -> Path:
    """Save the student with ``save_pretrained`` (model + tokenizer) and its distillation report."""
    from .jsonio import write_json

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    student.backbone.save_pretrained(d)
    student.tokenizer.save_pretrained(d)
    if report is not None:
        write_json(report.to_dict(), d / "distill_report.json")
    return d
