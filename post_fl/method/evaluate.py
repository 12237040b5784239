"""Accuracy of a (prompted) scoring model, its confidence interval, and the zero-shot baselines.

Baselines that a prompt must beat to show it learnt more than the class prior:

* the **majority class** (always the most frequent training label);
* **calibrated zero-shot**: the teacher's zero-shot class scores plus a per-class bias fitted on the
  *validation* split to maximise accuracy (for two classes, a decision threshold). It removes the
  label prior of the template and verbalizer using labelled data from the task itself, so a prompt
  that only shifts the prior gains nothing over it. It is the stronger of the two usual calibrations
  and is the headline baseline; contextual calibration (Zhao et al., 2021: divide the class
  probabilities by those of content-free inputs "N/A", "" and "[MASK]") needs no labels and is
  reported beside it.

Every accuracy comes with a 95% Wilson score interval (:func:`wilson_interval`).
"""

from __future__ import annotations

import math

import torch

from ..core.compute import pass_rows
from ..core.data import DataError, TextDataset
from ..core.models import ScoringModel
from ..core.prompt import SoftPrompt

CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")


@torch.no_grad()
def class_scores(model: ScoringModel, texts: list[str], prompt: SoftPrompt | None = None,
                 batch_size: int = 32) -> torch.Tensor:
    """Verbalizer class scores (N x C, float32, on the CPU) of each text, in input order.

    Texts are batched in order of length so that little padding is computed (same scores as any order), in
    batches of ``batch_size`` (on a GPU at least :data:`post_fl.core.compute.GPU_PASS_ROWS`: :func:`pass_rows`).
    """
    if not texts:
        return torch.empty((0, model.num_classes))
    batch_size = pass_rows(batch_size, model)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty((len(texts), model.num_classes))
    from ..core.progress import progress_bar

    with progress_bar(len(texts), desc="evaluate") as bar:  # silent for short loops and when quiet
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            out[idx] = model(model.encode([texts[j] for j in idx]), prompt).float().cpu()
            bar.update(len(idx))
    return out


def predict(model: ScoringModel, texts: list[str], prompt: SoftPrompt | None = None,
            batch_size: int = 32) -> torch.Tensor:
    """Predicted class index (argmax of verbalizer scores) for each text."""
    if not texts:
        return torch.empty(0, dtype=torch.long)
    return class_scores(model, texts, prompt, batch_size).argmax(-1)


def _check(model: ScoringModel, data: TextDataset) -> None:
    if not data.labelled or len(data) == 0:
        raise DataError("accuracy needs a non-empty labelled dataset")
    if list(data.label_names) != list(model.label_names):
        raise DataError(f"test labels {data.label_names} differ from the model's labels {model.label_names}")


def accuracy(model: ScoringModel, data: TextDataset, prompt: SoftPrompt | None = None, batch_size: int = 32) -> float:
    """Fraction of ``data`` whose verbalizer prediction equals its label."""
    _check(model, data)
    preds = predict(model, data.texts, prompt, batch_size)
    return float((preds == torch.tensor(data.labels)).float().mean())


def correct_of_scores(scores: torch.Tensor, labels, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per example, whether argmax(log_softmax(scores) + bias) is its label (bool, N)."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    if bias is not None:
        logp = logp + bias
    return logp.argmax(-1) == torch.as_tensor(list(labels))


def accuracy_of_scores(scores: torch.Tensor, labels, bias: torch.Tensor | None = None) -> float:
    """Accuracy of argmax(log_softmax(scores) + bias) against ``labels``."""
    return float(correct_of_scores(scores, labels, bias).float().mean())


def paired_difference(correct_a: torch.Tensor, correct_b: torch.Tensor) -> dict:
    """Accuracy difference A - B of two classifiers scored on the same examples, with its paired standard error.

    The per-example differences d_i = [A right] - [B right] give the difference mean(d) and the
    standard error sd(d) / sqrt(n) (sample sd, n - 1), the standard error of a paired comparison
    (McNemar's setting): examples both get right or both get wrong add no variance, so it is
    smaller than the independent-samples bound sqrt(se_A^2 + se_B^2) when the two agree often.
    Returns ``{"difference", "paired_stderr", "in_paired_standard_errors"}``.
    """
    a, b = torch.as_tensor(correct_a).double(), torch.as_tensor(correct_b).double()
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired_difference: needs two equal-length vectors of >= 2 examples, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    d = a - b
    diff, se = float(d.mean()), float(d.std(unbiased=True) / math.sqrt(len(d)))
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return {"difference": diff, "paired_stderr": se, "in_paired_standard_errors": z}


def wilson_interval(correct: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% (default ``z``) Wilson score interval for a proportion of ``correct`` successes in ``n`` trials.

    Chosen over the normal approximation because it stays inside [0, 1] and keeps its coverage near
    0 and 1 and for the few hundred test examples used here.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be positive, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"wilson_interval: correct must be in [0, {n}], got {correct}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def standard_error(acc: float, n: int) -> float:
    """Binomial standard error sqrt(p (1 - p) / n) of an accuracy measured on ``n`` examples."""
    if n <= 0:
        raise ValueError(f"standard_error: n must be positive, got {n}")
    return math.sqrt(max(acc * (1 - acc), 0.0) / n)


def accuracy_summary(acc: float, n: int) -> dict:
    """``{"accuracy", "n", "stderr", "ci95": [lo, hi]}`` for one accuracy on ``n`` examples (Wilson interval)."""
    lo, hi = wilson_interval(round(acc * n), n)
    return {"accuracy": acc, "n": n, "stderr": standard_error(acc, n), "ci95": [lo, hi]}


def fit_class_bias(scores: torch.Tensor, labels, passes: int = 3) -> torch.Tensor:
    """Per-class additive bias on log_softmax(scores) that maximises accuracy on (``scores``, ``labels``).

    Coordinate ascent over classes 1..C-1 (class 0 stays at 0): for each class every offset at which
    some example's argmax flips is a candidate, and the best one (smallest in size on ties) is kept.
    For two classes this is the accuracy-maximising decision threshold. Fit it on validation data only.
    """
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError("fit_class_bias: needs a non-empty N x C score matrix")
    y = torch.as_tensor(list(labels))
    if len(y) != scores.shape[0]:
        raise ValueError(f"fit_class_bias: {scores.shape[0]} score rows but {len(y)} labels")
    logp = torch.log_softmax(scores.float(), dim=-1).double()
    c = logp.shape[1]
    bias = torch.zeros(c, dtype=torch.float64)
    for _ in range(passes):
        changed = False
        for k in range(1, c):
            others = logp + bias
            others[:, k] = -math.inf
            flip = others.max(-1).values - logp[:, k]  # class k wins where bias_k > flip
            pts = torch.unique(flip)
            cands = torch.cat([(pts[:-1] + pts[1:]) / 2, pts[:1] - 1.0, pts[-1:] + 1.0, bias[k:k + 1]])
            wins = cands.unsqueeze(1) > flip.unsqueeze(0)  # n_cands x N: does class k win
            pred_other = others.argmax(-1)
            correct = torch.where(wins, (y == k).unsqueeze(0), (pred_other == y).unsqueeze(0)).sum(1)
            best = correct.max()
            tied = cands[correct == best]
            choice = tied[tied.abs().argmin()]
            if choice != bias[k]:
                bias[k] = choice
                changed = True
        if not changed:
            break
    return bias.float()


@torch.no_grad()
def contextual_calibration_bias(model: ScoringModel, prompt: SoftPrompt | None = None,
                                inputs: tuple[str, ...] = CONTENT_FREE_INPUTS) -> torch.Tensor:
    """Zhao et al. (2021) contextual calibration as a bias: -log of the mean class probability of content-free inputs.

    Adding it to log_softmax(scores) divides each class probability by its content-free probability.
    """
    probs = torch.softmax(model(model.encode(list(inputs)), prompt).float().cpu(), dim=-1).mean(0)
    return -torch.log(probs.clamp_min(1e-12))


def majority_class_accuracy(train_labels, test_labels) -> float:
    """Accuracy of the majority-class reference: always predict the most frequent training label.

    A classifier (or prompt) at this level has learnt only the class prior. Ties go to the
    smallest label id.
    """
    if len(train_labels) == 0 or len(test_labels) == 0:
        raise ValueError("majority_class_accuracy: empty train or test labels")
    counts = torch.bincount(torch.as_tensor(list(train_labels), dtype=torch.long))
    majority = int(torch.argmax(counts))  # first maximum: the smallest label id on ties
    return float((torch.as_tensor(list(test_labels)) == majority).float().mean())
