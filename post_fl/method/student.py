"""The student: a copy of the teacher that keeps its width, tokenizer and embeddings and ``num_layers``
evenly spaced transformer layers (e.g. 6 of SmolLM2's 30), always the first and the last."""

from __future__ import annotations

import copy

from torch import nn

from ..core.config import DistillConfig
from ..core.models import ScoringModel


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
