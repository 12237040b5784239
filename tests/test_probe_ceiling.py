"""benchmarks/probe_student_ceiling.py: the class-space ceilings of a student prompt's transfer."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_probe():
    spec = importlib.util.spec_from_file_location("probe_student_ceiling",
                                                  ROOT / "benchmarks" / "probe_student_ceiling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def scores_knowing(labels: torch.Tensor, known: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Two-class scores: a margin of 2 for the true class where ``known``, small noise elsewhere."""
    out = 0.1 * torch.randn(len(labels), 2, generator=gen)
    out[known, labels[known]] += 2.0
    return out


def test_ceilings_separate_shared_knowledge_from_bias():
    gen = torch.Generator().manual_seed(0)
    n = 400
    labels = torch.randint(0, 2, (n,), generator=gen)
    first = torch.arange(n) < n // 2
    teacher = scores_knowing(labels, first, gen)          # knows the first half
    student = torch.tensor([3.0, 0.0]).expand(n, 2)       # an unprompted student biased to class 0
    # its prompt teaches it the second half and also corrects its bias (+3 to class 1)
    prompted = student + scores_knowing(labels, ~first, gen) + torch.tensor([0.0, 3.0])
    c = load_probe().class_space_ceilings(teacher, student, prompted, labels)
    assert 0.65 < c["teacher"] < 0.85
    assert 0.65 < c["student_prompted"] < 0.85
    assert c["ensemble"][0] > 0.95           # complementary knowledge: the product of experts gets both halves
    assert c["centred_shift"][0] > 0.95      # the change minus its mean carries the second half
    assert c["shift"][0] < c["centred_shift"][0] - 0.1  # the raw change also carries the +3 bias correction
    # the teacher guesses the second half: it is wrong on about a quarter of the texts, where the student is right
    assert 0.15 < c["only_prompted_student_right"] < 0.35 and 0.35 < c["both_right"] < 0.65
