"""A run's inputs read from its config: the task (private train / validation / test data and the public
text, from files or the embedded default) and the teacher and student as scoring models; and
:class:`PreflightError`, the one error that lists every problem with those inputs.

Every layer that needs a run's data goes through :func:`load_task` (the single-site pipeline, the
federated clients and server, the sweep), so the same config always reads the same examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .compute import resolve_compute
from .config import EMBEDDED_DEFAULT, RunConfig
from .data import (SENTENCE_WORDS, DataError, Task, TextDataset, dataset_from_scan, read_text_file, scan_text_file,
                   split_sentences, training_label_names)
from .models import ScoringModel, load_scoring_model


class PreflightError(ValueError):
    """Inputs of a run are unusable; ``problems`` lists each one (file, row, field, expected)."""

    def __init__(self, problems: Sequence[str], what: str = "run") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) found before any work started "
                         f"(nothing was written for this {what}):\n{lines}")



def load_task(cfg: RunConfig) -> Task:
    """Read the private train/validation/test data and the public text the config names (or the embedded default).

    The validation split comes with the built-in task, or is carved from the training file by a hash of
    each text (``data.validation_fraction``), so it never changes between runs."""
    d = cfg.data
    unit = d.resolved_public_unit()
    label_words = dict(cfg.model.label_words)
    if EMBEDDED_DEFAULT in (d.train, d.test, d.public):
        from .embedded import load_embedded_task

        emb = load_embedded_task(cfg.seed, d.embedded_task, whole_public_reviews=unit == "sentence")
    if d.train == EMBEDDED_DEFAULT:
        train, validation = emb.train, emb.validation
        label_words = {**emb.label_words, **label_words}
    else:
        from .embedded import carve_validation

        train, validation = carve_validation(read_train_file(cfg), d.validation_fraction)
    if d.test == EMBEDDED_DEFAULT:
        if d.train != EMBEDDED_DEFAULT:
            raise DataError("data.test = 'embedded' only goes with data.train = 'embedded'; "
                            "give a test file with the same labels as data.train")
        test = emb.test
    else:
        test = read_text_file(d.test, d.test_text_column or d.text_column, d.label_column,
                              label_names=train.label_names)
    if d.public == EMBEDDED_DEFAULT:
        public = emb.public
    else:
        public = read_text_file(d.public, d.public_text_column or d.text_column, None)
    distill_corpus = public.shuffled(cfg.seed)
    if unit == "sentence":
        where = "the embedded public text" if d.public == EMBEDDED_DEFAULT else d.public
        sentences = split_sentences(public.texts)
        if not sentences:
            raise DataError(f"{where}: data.public_unit = 'sentence' found no sentence of {SENTENCE_WORDS[0]}-"
                            f"{SENTENCE_WORDS[1]} words ending in . ! or ? in its {len(public)} texts; "
                            "use data.public_unit = 'text'")
        public = TextDataset(sentences, [], list(public.label_names))
    train = train.shuffled(cfg.seed).head(d.max_train_examples)
    test = test.head(d.max_test_examples)
    public = public.shuffled(cfg.seed).head(d.max_public_examples)
    if validation is not None:
        validation = validation.head(d.max_validation_examples)
    return Task(train, test, public, label_words, validation=validation, distill_corpus=distill_corpus)


def read_train_file(cfg: RunConfig):
    """The private training file with the label rule of :func:`post_fl.core.data.training_label_names`.

    The label set is the keys of ``model.label_words`` when given, otherwise the labels of the file;
    a label outside that set or seen in fewer than ``data.min_label_count`` rows is refused (unless
    ``data.allow_rare_labels``), naming the rows and the nearest known label.
    """
    d = cfg.data
    scanned = scan_text_file(d.train, d.text_column, d.label_column)
    if scanned.problems:
        raise DataError("\n".join(scanned.problems))
    names, problems = training_label_names(scanned, d.label_column, list(cfg.model.label_words) or None,
                                           d.min_label_count, d.allow_rare_labels)
    if problems:
        raise DataError("\n".join(problems))
    return dataset_from_scan(scanned, d.label_column, names)


def load_teacher(cfg: RunConfig, task: Task) -> ScoringModel:
    """The teacher (the provider's large LM) as a frozen scoring model, on the device and in the precision of
    ``cfg.compute`` (:func:`post_fl.core.compute.resolve_compute`)."""
    m = cfg.model
    return load_scoring_model(m.teacher, task.train.label_names, task.label_words, m.head, m.template, m.max_length,
                              compute=resolve_compute(cfg.compute))


def load_student(path: str | Path, cfg: RunConfig, task: Task, teacher: ScoringModel) -> ScoringModel:
    """A saved student, scored with the teacher's head, template and verbalizer, placed as ``cfg.compute`` says."""
    return load_scoring_model(str(path), task.train.label_names, teacher.label_words, teacher.head,
                              teacher.template, teacher.max_length, compute=resolve_compute(cfg.compute))

