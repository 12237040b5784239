"""Accuracy of a (prompted) scoring model, and the results file of a run."""

from __future__ import annotations

import torch

from .data import DataError, TextDataset
from .models import ScoringModel
from .prompt import SoftPrompt


@torch.no_grad()
def predict(model: ScoringModel, texts: list[str], prompt: SoftPrompt | None = None,
            batch_size: int = 32) -> torch.Tensor:
    """Predicted class index (argmax of verbalizer scores) for each text."""
    preds = []
    for i in range(0, len(texts), batch_size):
        batch = model.encode(texts[i: i + batch_size])
        preds.append(model(batch, prompt).argmax(-1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: ScoringModel, data: TextDataset, prompt: SoftPrompt | None = None, batch_size: int = 32) -> float:
    """Fraction of ``data`` whose verbalizer prediction equals its label."""
    if not data.labelled or len(data) == 0:
        raise DataError("accuracy needs a non-empty labelled dataset")
    if list(data.label_names) != list(model.label_names):
        raise DataError(f"test labels {data.label_names} differ from the model's labels {model.label_names}")
    preds = predict(model, data.texts, prompt, batch_size)
    return float((preds == torch.tensor(data.labels)).float().mean())


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
