"""What each setting of :class:`post_fl.core.config.RunConfig` means, for ``post-fl show-config``, and the config
as TOML text (:func:`dumps_config`, :func:`dumps_config_with_help`).

``FIELD_HELP`` is keyed ``"section.key"`` (``"seed"`` for top-level keys); a test checks that
every field of :class:`RunConfig` has an entry, so a new setting cannot ship unexplained.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .config import ConfigError, RunConfig

FIELD_HELP: dict[str, str] = {
    "seed": "the one seed of every non-private random choice (initialisation, splits, batches); DP noise never uses it",
    "output_dir": "run folder for every artifact (config.json, student/, prompts, stages/, results.json)",
    "insecure_reproducible": "true = seed DP noise and sampling from `seed` (bit-exact reruns); outputs are "
                             "NOT private and labelled so (tests/debugging only)",
    # model
    "model.teacher": "the provider's large LM: a model directory, an embedded model name ('embedded-smollm2', "
                     "'embedded' = MiniLM) or a Hugging Face hub id",
    "model.student": "a student directory written by 'post-fl distill'; \"\" = distil one into <run>/student",
    "model.head": "how classes are scored: auto (from the architecture) | causal | masked | embedding",
    "model.max_length": "tokens per input including the template (the text is truncated, never the template)",
    "model.template": "prompt template with {text} (and {mask} for a masked LM); \"\" = the head's default",
    "model.label_words": "label -> verbalizer words; when given, these labels ARE the task's label set "
                         "(any other label in the data is an error)",
    # data
    "data.train": "private training file (CSV/TSV/JSONL with text and label columns) or 'embedded'",
    "data.test": "labelled test file with the training labels, or 'embedded' (only with data.train = 'embedded')",
    "data.public": "unlabelled public text for distillation and prompt transfer (file or 'embedded')",
    "data.text_column": "text column; 'a+b' joins several columns",
    "data.label_column": "label column of the train and test files",
    "data.test_text_column": "text column of the test file; \"\" = data.text_column",
    "data.public_text_column": "text column of the public file (e.g. 'title+description'); \"\" = data.text_column",
    "data.max_train_examples": "at most this many training examples (seeded shuffle first); 0 = all",
    "data.max_test_examples": "at most this many test examples (the first ones); 0 = all",
    "data.max_public_examples": "at most this many public texts (seeded shuffle first); 0 = all",
    "data.public_unit": "one public example is a 'text' (row / review cut to 600 chars) or each 'sentence' of it; "
                        "'auto' = sentences of the embedded IMDB reviews, texts otherwise",
    "data.embedded_task": "which built-in task 'embedded' means: movie-reviews | tweets",
    "data.validation_fraction": "share of a training file carved off (by a hash of each text) as the validation "
                                "split, the only labelled data used for choices",
    "data.max_validation_examples": "at most this many validation examples; 0 = all",
    "data.min_label_count": "a training label seen in fewer rows is refused as a likely typo (the error names "
                            "the rows and the nearest label); not applied when model.label_words declares the labels",
    "data.allow_rare_labels": "true = accept training labels seen in fewer than data.min_label_count rows as classes",
    # prompt
    "prompt.num_virtual_tokens": "length of the soft prompt (virtual tokens prepended to the input)",
    "prompt.init": "how the prompt starts: vocab (random vocabulary embeddings) | text (embeddings of init_text)",
    "prompt.init_text": "the text whose token embeddings start the prompt when prompt.init = 'text'",
    "prompt.form": "auto = deep for a causal LM, input otherwise | input = virtual tokens before the input (PEFT "
                   "prompt tuning) | deep = a prompt at every layer "
                   "of the student (steers a few-layer student more); the teacher gets its layer-0 slice",
    # tune
    "tune.epochs": "passes over the private training set (fractions allowed); per round when federated",
    "tune.batch_size": "expected batch size (Poisson sampling rate = batch_size / N under DP)",
    "tune.lr": "learning rate of the prompt (of tune.optimizer)",
    "tune.dp": "false = plain (non-private) prompt tuning",
    "tune.target_epsilon": "the epsilon the noise multiplier is calibrated to; inf = no DP",
    "tune.delta": "the DP delta; 0.0 = derived default min(1e-5, 1/(10 N)) with N the protected examples "
                  "(per client when federated); delta >= 1/N is refused",
    "tune.max_grad_norm": "per-example gradient clipping bound C of DP-SGD: a number, or auto (1.0 for an input prompt, 0.25 for a deep prompt)",
    "tune.accountant": "privacy accountant: rdp | prv",
    "tune.optimizer": "adam | sgd (plain SGD: the federated default, where each user takes a few local steps a round)",
    # distill
    "distill.objective": "\"lm\" = language-model KD on raw public text at every position (as POST); "
                         "\"template\" = KD on public text in the task template (answer + sampled positions)",
    "distill.layer_selection": "\"even\" = evenly spaced teacher layers; \"ends\" = the first half and the last half",
    "distill.sequence_length": "objective lm: tokens per packed sequence of public text",
    "distill.corpus_tokens": "objective lm: at most this many tokens of public text (whole public texts, packed)",
    "distill.num_layers": "teacher layers the student keeps (see distill.layer_selection); 0 = 40 % of the teacher's (12 of SmolLM2's 30), at least 1",
    "distill.steps": "at most this many distillation steps (target agreement or time budget usually stop it first)",
    "distill.batch_size": "public texts per distillation step",
    "distill.lr": "peak learning rate of the student (AdamW)",
    "distill.lr_schedule": "\"linear\" = warm up, then decay to 0 at the time budget or step limit; \"constant\"",
    "distill.warmup_steps": "steps of linear learning-rate warm-up (linear schedule)",
    "distill.keep_best": "true = end with the weights of the best held-out check (objective lm: next-token agreement; template: class agreement), not the last step",
    "distill.temperature": "KD temperature T (losses are scaled by T^2)",
    "distill.alpha_kd": "weight of the KL loss on vocabulary logits",
    "distill.alpha_lm": "weight of the language-model loss (ignored for an encoder without LM head)",
    "distill.alpha_cos": "weight of the cosine loss on hidden states",
    "distill.alpha_class": "weight of the KL loss on the verbalizer's classes at the answer position",
    "distill.mlm_probability": "share of tokens masked for a masked LM's distillation",
    "distill.positions_per_text": "distilled positions per text besides the answer position",
    "distill.target_agreement": "class agreement with the teacher on held-out public text that ends training",
    "distill.time_budget_s": "seconds of student training that end distillation",
    "distill.eval_every": "steps between agreement checks",
    "distill.teacher_batch_size": "texts per batch of the teacher's one pass over the public text",
    "distill.cache": "true = keep teacher outputs and the distilled student in the post-fl cache for reruns",
    # transfer
    "transfer.steps": "optimisation steps of POST's transfer on public text",
    "transfer.batch_size": "public texts per transfer step",
    "transfer.lr": "learning rate of the teacher prompt (Adam)",
    "transfer.alpha": "weight of the loss on the prompt-induced change of outputs (1 - alpha: on the prompted "
                      "outputs); a number in [0, 1] (default 1; the paper's code: 0.5) or \"auto\" = 1 - (a - 1/C)/(1 - 1/C) "
                      "clipped to [0, 1], a = unprompted student/teacher class agreement on the public text",
    "transfer.temperature": "temperature of the transfer KL losses",
    "transfer.init": "where the teacher prompt starts: student (the student's prompt) | vocab",
    "transfer.space": "outputs the transfer loss compares: vocab (all answer-position logits, POST) | classes (verbalizer scores)",
    "transfer.target_top_k": "vocab space: tokens per public text kept of the cached student/teacher targets (the "
                             "KL is taken on them, renormalised); 0 = the whole vocabulary (exact, n x V x 3 floats)",
    "transfer.eval_every": "steps between checks of the loss on the held-out public texts",
    "transfer.heldout_fraction": "share of the public texts held out of training; the prompt of the lowest loss on them "
                                 "is returned (no labels, no epsilon); 0 = the last step's prompt",
    "transfer.center_change": "subtract the student prompt's mean change over the public texts from each text's "
                              "change target, so the teacher is not taught the correction of the student's own "
                              "class bias",
    # eval
    "eval.batch_size": "texts per batch when scoring test examples",
    "eval.teacher_tune_examples": "teacher's own prompt: training examples it sees (0 = all)",
    "eval.teacher_tune_epochs": "teacher's own prompt: epochs",
    "eval.teacher_tune_lr": "teacher's own prompt: learning rate (Adam; an input prompt)",
    "eval.teacher_tune_batch_size": "teacher's own prompt: batch size",
    "eval.cache_teacher_prompt": "true = keep the teacher's own prompt in the post-fl cache (keyed by teacher, data, recipe)",
    "eval.teacher_prompt_tuning": "true = also tune a non-private prompt on the teacher (the costly upper bound)",
    "eval.cache_zero_shot": "true = keep the unprompted (zero-shot) class scores of teacher and student on the test and validation texts in the post-fl cache, so reruns skip those passes",
    # compute
    "compute.device": "where every stage computes: auto (a CUDA GPU, else Apple MPS, else the CPU) | cpu | cuda | "
                      "cuda:N | mps; a device that is not there is refused before any stage runs",
    "compute.dtype": "precision of the frozen teacher and student: auto (bfloat16 on a CUDA GPU that supports it, "
                     "float32 on a CPU or MPS) | float32 | bfloat16 (also on a CPU with AMX / avx512_bf16: faster, "
                     "scores differ slightly); prompts, optimiser state, losses and DP noise stay float32",
    "compute.batch_size": "rows per forward pass where a batch bounds only memory (evaluation, transfer targets, the "
                          "teacher's pass for distillation, client-batched micro-batches); 0 = auto: the stages' own "
                          "settings on a CPU, at least 256 on a GPU",
}


def field_keys(cfg: RunConfig | None = None) -> list[str]:
    """Every setting of a RunConfig as ``section.key`` (top-level keys bare), in declaration order."""
    cfg = cfg or RunConfig()
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
        else:
            keys.append(f.name)
    return keys


def dumps_config_with_help(cfg: RunConfig) -> str:
    """The config as TOML, each key preceded by a ``#`` line saying what it means (from FIELD_HELP)."""
    lines: list[str] = []

    def add(key: str, name: str, value) -> None:
        text = FIELD_HELP.get(key)
        if text:
            lines.append(f"# {text}")
        lines.append(f"{name} = {toml_value(value)}")

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(value):
            add(f.name, f.name, value)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            doc = (type(value).__doc__ or "").strip().splitlines()[0]
            lines += ["", f"# [{f.name}]: {doc}", f"[{f.name}]"]
            for g in dataclasses.fields(value):
                add(f"{f.name}.{g.name}", g.name, getattr(value, g.name))
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + " }"
    raise ConfigError(f"cannot write {value!r} as TOML")


def dumps_config(cfg: RunConfig) -> str:
    """The config as TOML text, each section with the first line of its docstring as a comment."""
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(value):
            lines.append(f"{f.name} = {toml_value(value)}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            doc = (type(value).__doc__ or "").strip().splitlines()[0]
            lines += ["", f"# {doc}", f"[{f.name}]"]
            lines += [f"{k.name} = {toml_value(getattr(value, k.name))}" for k in dataclasses.fields(value)]
    return "\n".join(lines) + "\n"
