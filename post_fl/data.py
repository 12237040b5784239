"""Labelled and public text: reading, validation, splitting and partitioning.

A :class:`TextDataset` is a list of texts with integer labels and the label names they
index. Files are CSV, TSV or JSONL with a header / keys; every problem (missing file,
missing column, empty text, unknown label) raises :class:`DataError` naming the file,
the row and the field.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


class DataError(ValueError):
    """A data file or dataset is unusable; the message names file, row and field."""


@dataclass
class TextDataset:
    """Texts with integer labels ``0..len(label_names)-1`` (labels may be empty for public text)."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if self.labels and len(self.labels) != len(self.texts):
            raise DataError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        n = len(self.label_names)
        for i, y in enumerate(self.labels):
            if not 0 <= y < n:
                raise DataError(f"row {i}: label index {y} outside 0..{n - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def labelled(self) -> bool:
        """True when every text has a label."""
        return bool(self.labels)

    def subset(self, indices: Sequence[int]) -> "TextDataset":
        """The examples at ``indices``, same label names."""
        return TextDataset([self.texts[i] for i in indices],
                           [self.labels[i] for i in indices] if self.labels else [],
                           list(self.label_names))

    def head(self, n: int) -> "TextDataset":
        """The first ``n`` examples (all when ``n`` is 0 or larger than the set)."""
        return self if n <= 0 or n >= len(self) else self.subset(range(n))

    def shuffled(self, seed: int) -> "TextDataset":
        """A copy in a seeded random order."""
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        return self.subset(order)

    def split(self, fraction: float, seed: int) -> tuple["TextDataset", "TextDataset"]:
        """Seeded random split into (first ``fraction``, rest)."""
        if not 0 < fraction < 1:
            raise DataError(f"split fraction must be in (0, 1), got {fraction}")
        s = self.shuffled(seed)
        cut = max(1, min(len(s) - 1, round(fraction * len(s))))
        return s.subset(range(cut)), s.subset(range(cut, len(s)))

    def label_counts(self) -> dict[str, int]:
        """How many examples carry each label name."""
        counts = {name: 0 for name in self.label_names}
        for y in self.labels:
            counts[self.label_names[y]] += 1
        return counts


@dataclass
class Task:
    """The private train/test split and the public (unlabelled) text of one task, with its verbalizer."""

    train: TextDataset
    test: TextDataset
    public: TextDataset
    label_words: dict[str, list[str]]


def _read_rows(path: Path) -> list[dict[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: line {lineno} must be a JSON object, got {type(obj).__name__}")
                rows.append({k: "" if v is None else str(v) for k, v in obj.items()})
        return rows
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as fh:
            delimiter = "\t" if suffix == ".tsv" else ","
            quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
            reader = csv.DictReader(fh, delimiter=delimiter, quoting=quoting)
            if reader.fieldnames is None:
                return []
            return [dict(r) for r in reader]
    raise DataError(f"{path}: unsupported file type {suffix!r}; expected .csv, .tsv or .jsonl")


def read_text_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str | None = "label",
    label_names: Sequence[str] | None = None,
) -> TextDataset:
    """Read a CSV/TSV/JSONL file of ``text_column`` (``a+b`` joins columns) and ``label_column``.

    With ``label_names`` given, every label must be one of them (error otherwise); without,
    the label names are the sorted distinct labels found. ``label_column=None`` reads
    unlabelled public text.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file does not exist")
    rows = _read_rows(p)
    if not rows:
        raise DataError(f"{p}: file is empty (no data rows)")
    text_cols = [c.strip() for c in text_column.split("+")]
    columns = set(rows[0].keys())
    for col in text_cols + ([label_column] if label_column else []):
        if col not in columns:
            raise DataError(f"{p}: missing column {col!r}; found columns {sorted(c for c in columns if c)}")
    texts, raw_labels = [], []
    for i, row in enumerate(rows, start=1):
        text = " ".join((row.get(c) or "").strip() for c in text_cols).strip()
        if not text:
            raise DataError(f"{p}: row {i}: empty {text_column!r}")
        texts.append(text)
        if label_column:
            label = (row.get(label_column) or "").strip()
            if not label:
                raise DataError(f"{p}: row {i}: empty {label_column!r}")
            raw_labels.append(label)
    if not label_column:
        return TextDataset(texts, [], list(label_names or []))
    if label_names is None:
        distinct = sorted(set(raw_labels), key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
        names = list(distinct)
    else:
        names = list(label_names)
    index = {name: k for k, name in enumerate(names)}
    labels = []
    for i, label in enumerate(raw_labels, start=1):
        if label not in index:
            raise DataError(f"{p}: row {i}: unknown label {label!r} in column {label_column!r}; "
                            f"expected one of {names}")
        labels.append(index[label])
    return TextDataset(texts, labels, names)


def write_text_file(dataset: TextDataset, path: str | Path) -> Path:
    """Write a dataset as CSV (``text,label`` with label names) or JSONL, by suffix."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() == ".jsonl":
        with p.open("w", encoding="utf-8") as fh:
            for i, text in enumerate(dataset.texts):
                row = {"text": text}
                if dataset.labels:
                    row["label"] = dataset.label_names[dataset.labels[i]]
                fh.write(json.dumps(row) + "\n")
    else:
        with p.open("w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"] if dataset.labels else ["text"])
            for i, text in enumerate(dataset.texts):
                w.writerow([text, dataset.label_names[dataset.labels[i]]] if dataset.labels else [text])
    return p


PARTITION_SCHEMES = ("iid", "dirichlet", "pathological")


def partition(
    dataset: TextDataset,
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    classes_per_partition: int = 1,
    seed: int = 0,
) -> list[TextDataset]:
    """Split a labelled dataset among ``num_partitions`` clients with flwr-datasets partitioners.

    ``iid``: uniform random shards. ``dirichlet``: per-class client shares drawn from
    Dir(``alpha``) (smaller alpha, more label skew). ``pathological``: each client holds
    only ``classes_per_partition`` labels.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if num_partitions < 1:
        raise DataError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > len(dataset):
        raise DataError(f"cannot split {len(dataset)} examples among {num_partitions} clients")
    if scheme not in PARTITION_SCHEMES:
        raise DataError(f"partitioning {scheme!r} unknown; expected one of {PARTITION_SCHEMES}")
    if scheme != "iid" and not dataset.labelled:
        raise DataError(f"partitioning {scheme!r} needs labels")
    hf = Dataset.from_dict({"idx": list(range(len(dataset))),
                            "label": dataset.labels or [0] * len(dataset)})
    if scheme == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                    min_partition_size=0, self_balancing=True, seed=seed)
    else:
        part = PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                       num_classes_per_partition=classes_per_partition,
                                       class_assignment_mode="deterministic", seed=seed)
    if scheme == "iid":
        hf = hf.shuffle(seed=seed)
    part.dataset = hf
    return [dataset.subset(part.load_partition(i)["idx"]) for i in range(num_partitions)]
