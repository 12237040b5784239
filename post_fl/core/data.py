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
import re
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


SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
SENTENCE_WORDS = (4, 60)  # the words a public sentence may have (data.public_unit = "sentence")


def split_sentences(texts: Sequence[str], min_words: int = SENTENCE_WORDS[0],
                    max_words: int = SENTENCE_WORDS[1]) -> list[str]:
    """Every sentence of ``texts`` (split after . ! or ?) with ``min_words``..``max_words`` words, in order.

    A piece that does not end a sentence (e.g. a review cut mid-sentence) is dropped; so are very
    short fragments ("Wow.") and run-on pieces longer than ``max_words``.
    """
    out = []
    for text in texts:
        for piece in SENTENCE_END.split(text.strip()):
            piece = piece.strip()
            if piece and piece.rstrip("\"')]")[-1:] in (".", "!", "?") and min_words <= len(piece.split()) <= max_words:
                out.append(piece)
    return out


@dataclass
class Task:
    """The private train/test split and the public (unlabelled) text of one task, with its verbalizer.

    ``validation`` is carved from the training data and is the only labelled split used for any
    choice (calibration, hyper-parameters); ``None`` when a task has none."""

    train: TextDataset
    test: TextDataset
    public: TextDataset
    label_words: dict[str, list[str]]
    validation: TextDataset | None = None
    # the public text as whole texts, all of them, in a seeded order: what language-model distillation
    # (distill.objective = "lm") packs into sequences; None = use ``public``
    distill_corpus: TextDataset | None = None


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


MAX_LISTED_ROWS = 10  # rows named per problem in an error message (then "... and N more")


def natural_label_order(labels) -> list[str]:
    """Distinct labels sorted with integers in numeric order first (``1, 2, 10``), then strings."""
    def key(s: str):
        digit = s.lstrip("-").isdigit()
        return (not digit, int(s) if digit else 0, s)

    return sorted(set(labels), key=key)


def rows_text(rows: Sequence[int]) -> str:
    """``"row 3"`` / ``"rows 3, 9, 12"`` / ``"rows 3, 9, ... and 40 more"`` (1-based data rows)."""
    rows = list(rows)
    shown = ", ".join(str(r) for r in rows[:MAX_LISTED_ROWS])
    more = f" ... and {len(rows) - MAX_LISTED_ROWS} more" if len(rows) > MAX_LISTED_ROWS else ""
    return ("row " if len(rows) == 1 else "rows ") + shown + more


def nearest_label(value: str, known: Sequence[str]) -> str | None:
    """The known label closest in spelling to ``value`` (difflib ratio >= 0.6, case-insensitive), or None."""
    import difflib

    lowered = {k.lower(): k for k in known}
    match = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def _did_you_mean(value: str, known: Sequence[str]) -> str:
    near = nearest_label(value, known)
    return f" (did you mean {near!r}?)" if near else ""


@dataclass
class ScannedFile:
    """What :func:`scan_text_file` found: texts, raw label strings (1-based ``rows``) and every problem."""

    path: Path
    texts: list[str]
    raw_labels: list[str]
    problems: list[str]

    def label_rows(self) -> dict[str, list[int]]:
        """Each distinct raw label -> the 1-based data rows that carry it."""
        out: dict[str, list[int]] = {}
        for i, label in enumerate(self.raw_labels, start=1):
            out.setdefault(label, []).append(i)
        return out


def scan_text_file(path: str | Path, text_column: str = "text", label_column: str | None = "label") -> ScannedFile:
    """Read a CSV/TSV/JSONL file and collect *every* problem (missing file or column, empty text or label).

    Nothing is raised for bad content: the problems are returned, each naming file, row and column,
    so a caller (see :mod:`post_fl.preflight`) can report all of them at once.
    """
    p = Path(path)
    if not p.is_file():
        return ScannedFile(p, [], [], [f"{p}: data file does not exist"])
    try:
        rows = _read_rows(p)
    except DataError as exc:
        return ScannedFile(p, [], [], [str(exc)])
    except (UnicodeDecodeError, csv.Error) as exc:
        return ScannedFile(p, [], [], [f"{p}: cannot be read as UTF-8 {p.suffix.lstrip('.').upper()} ({exc})"])
    if not rows:
        return ScannedFile(p, [], [], [f"{p}: file is empty (no data rows)"])
    text_cols = [c.strip() for c in text_column.split("+")]
    columns = set(rows[0].keys())
    missing = [c for c in text_cols + ([label_column] if label_column else []) if c not in columns]
    if missing:
        found = sorted(c for c in columns if c)
        return ScannedFile(p, [], [], [f"{p}: missing column {c!r}; found columns {found}" for c in missing])
    texts, raw_labels, empty_text, empty_label = [], [], [], []
    for i, row in enumerate(rows, start=1):
        text = " ".join((row.get(c) or "").strip() for c in text_cols).strip()
        if not text:
            empty_text.append(i)
        texts.append(text)
        if label_column:
            label = (row.get(label_column) or "").strip()
            if not label:
                empty_label.append(i)
            raw_labels.append(label)
    problems = []
    if empty_text:
        problems.append(f"{p}: {rows_text(empty_text)}: empty {text_column!r} (expected text)")
    if empty_label:
        problems.append(f"{p}: {rows_text(empty_label)}: empty {label_column!r} (expected a label)")
    return ScannedFile(p, texts, raw_labels, problems)


def label_problems(scanned: ScannedFile, label_column: str, known: Sequence[str], what: str) -> list[str]:
    """Problems for labels of ``scanned`` outside ``known``: rows, value and the nearest known label."""
    out = []
    known_set = set(known)
    for label, rows in scanned.label_rows().items():
        if label and label not in known_set:
            out.append(f"{scanned.path}: {rows_text(rows)}: unknown label {label!r} in column {label_column!r}; "
                       f"expected {what} {list(known)}{_did_you_mean(label, known)}")
    return out


def training_label_names(scanned: ScannedFile, label_column: str, declared: Sequence[str] | None = None,
                         min_label_count: int = 1, allow_rare: bool = False) -> tuple[list[str], list[str]]:
    """The task's label set and the problems with the training labels of ``scanned``.

    With ``declared`` labels (the keys of ``model.label_words``) the label set is exactly those,
    and any other value in the file is a problem. Without, the label set is the file's distinct
    labels, and a label seen in fewer than ``min_label_count`` rows (a typo such as ``postive``
    among ``positive`` rows looks exactly like that) is a problem unless ``allow_rare`` accepts
    rare classes. Problems name the rows and the nearest known label. Returns (label names in
    natural order, problems).
    """
    if declared:
        names = natural_label_order(declared)
        return names, label_problems(scanned, label_column, names, "a declared label (model.label_words)")
    rows = scanned.label_rows()
    counts = {label: len(r) for label, r in rows.items() if label}
    names = natural_label_order(counts)
    if allow_rare:
        return names, []
    frequent = [label for label in names if counts[label] >= min_label_count]
    problems = []
    for label in names:
        if counts[label] < min_label_count:
            problems.append(f"{scanned.path}: {rows_text(rows[label])}: label {label!r} in column {label_column!r} "
                            f"occurs in only {counts[label]} row(s), fewer than data.min_label_count = "
                            f"{min_label_count}{_did_you_mean(label, frequent)}; if it is a real class, set "
                            "data.allow_rare_labels = true (or declare the labels in model.label_words)")
    return names, problems


def dataset_from_scan(scanned: ScannedFile, label_column: str | None, label_names: Sequence[str] | None,
                      what: str = "one of the labels") -> TextDataset:
    """A :class:`TextDataset` from a scan; raises :class:`DataError` listing every problem found."""
    problems = list(scanned.problems)
    if label_column and not problems:
        names = list(label_names) if label_names is not None else natural_label_order(scanned.raw_labels)
        problems += label_problems(scanned, label_column, names, what)
    if problems:
        raise DataError("\n".join(problems))
    if not label_column:
        return TextDataset(scanned.texts, [], list(label_names or []))
    index = {name: k for k, name in enumerate(names)}
    return TextDataset(scanned.texts, [index[label] for label in scanned.raw_labels], names)


def read_text_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str | None = "label",
    label_names: Sequence[str] | None = None,
) -> TextDataset:
    """Read a CSV/TSV/JSONL file of ``text_column`` (``a+b`` joins columns) and ``label_column``.

    With ``label_names`` given, every label must be one of them (error naming the rows and the
    nearest known label otherwise); without, the label names are the distinct labels found, in
    natural order. ``label_column=None`` reads unlabelled public text. Every problem of the file
    is reported in one :class:`DataError`.
    """
    return dataset_from_scan(scan_text_file(path, text_column, label_column), label_column, label_names)


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
    min_partition_size: int = 1,
) -> list[TextDataset]:
    """Split a labelled dataset among ``num_partitions`` clients with flwr-datasets partitioners.

    ``iid``: uniform random shards. ``dirichlet``: per-class client shares drawn from
    Dir(``alpha``) (smaller alpha, more label skew). ``pathological``: each client holds
    only ``classes_per_partition`` labels.

    Every client gets at least ``min_partition_size`` examples. Settings that cannot give that
    (fewer than ``num_partitions * min_partition_size`` examples) are refused before any split.
    A Dirichlet draw with small alpha leaves some clients (nearly) empty; those clients are then
    topped up to the minimum with examples moved, at random (seeded), from the largest partitions,
    which keeps the label skew of the draw elsewhere. A pathological split whose classes are too
    small for the clients that share them is refused with the client and the class counts.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if num_partitions < 1:
        raise DataError(f"num_partitions must be >= 1, got {num_partitions}")
    if min_partition_size < 1:
        raise DataError(f"min_partition_size must be >= 1 (every client needs data), got {min_partition_size}")
    if num_partitions * min_partition_size > len(dataset):
        raise DataError(f"cannot split {len(dataset)} examples among {num_partitions} clients with at least "
                        f"{min_partition_size} example(s) each (needs {num_partitions * min_partition_size}); "
                        "use fewer clients, more training data (data.max_train_examples) or a smaller "
                        "minimum partition size")
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
    parts = [list(part.load_partition(i)["idx"]) for i in range(num_partitions)]
    if scheme == "dirichlet":
        parts = top_up_partitions(parts, min_partition_size, seed)
    small = [i for i, p in enumerate(parts) if len(p) < min_partition_size]
    if small:
        counts = dataset.label_counts()
        raise DataError(f"{scheme} partitioning gives client(s) {small[:10]} fewer than {min_partition_size} "
                        f"example(s) (sizes {[len(parts[i]) for i in small[:10]]}; class counts {counts}, "
                        f"{classes_per_partition} class(es) per client among {num_partitions} clients); "
                        "use fewer clients, more classes per client, more data or iid/dirichlet partitioning")
    return [dataset.subset(p) for p in parts]


def top_up_partitions(parts: list[list[int]], minimum: int, seed: int) -> list[list[int]]:
    """Move examples (seeded random picks) from the largest partitions into those below ``minimum``.

    Needs ``sum(len) >= len(parts) * minimum``; a donor never drops below ``minimum``.
    """
    rng = random.Random(seed)
    parts = [list(p) for p in parts]
    for small in range(len(parts)):
        while len(parts[small]) < minimum:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            if len(parts[donor]) <= minimum:
                raise DataError(f"cannot give every one of {len(parts)} partitions {minimum} examples")
            parts[small].append(parts[donor].pop(rng.randrange(len(parts[donor]))))
    return parts
