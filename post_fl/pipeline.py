"""The single-site POST pipeline as stages that read and write one run folder.

Run folder layout (every stage can run alone from what the stage before it wrote)::

    <run>/config.json            the RunConfig used
    <run>/student/               distilled student (save_pretrained) + distill_report.json
    <run>/prompt_student/        DP prompt tuned on the student (PEFT prompt-tuning adapter; prompt.form = "deep":
                                 post-fl's deep-prompt format, post_fl/core/deep_prompt.py)
    <run>/prompt_teacher/        prompt transferred to the teacher with POST (PEFT adapter)
    <run>/transfer_curve.csv     transfer loss per check (training, held-out public text) + .png plot
    <run>/prompt_teacher_tuned/  non-private prompt tuned on the teacher itself (upper bound)
    <run>/stages/<stage>.json    what each stage measured (time, epsilon, losses)
    <run>/results.json           every accuracy, epsilon/delta and costs, for people and plots
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from .core.config import RunConfig, config_from_dict
from .core.data import Task
from .core.jsonio import read_json, write_json
from .core.models import ScoringModel
from .core.deep_prompt import (DeepPrompt, as_input_prompt, load_any_prompt, new_prompt, num_model_layers,
                               save_any_prompt)
from .core.prompt import SoftPrompt
from .core.tasks import load_student, load_task, load_teacher
from .method.evaluate import majority_class_accuracy
from .privacy.randomness import NOT_PRIVATE_LABEL

log = logging.getLogger(__name__)

STUDENT_DIR, PROMPT_STUDENT, PROMPT_TEACHER, PROMPT_TEACHER_TUNED = (
    "student", "prompt_student", "prompt_teacher", "prompt_teacher_tuned")
TRANSFER_CURVE_CSV, TRANSFER_CURVE_PNG = "transfer_curve.csv", "transfer_curve.png"


def initial_prompt(cfg: RunConfig, model: ScoringModel, seed: int,
                   form: str | None = None) -> SoftPrompt | DeepPrompt:
    """The starting prompt from ``cfg.prompt``: random vocabulary embeddings or a text's embeddings, of form
    ``form`` (default ``cfg.prompt.form``: an input prompt, or the deep prompt made from it)."""
    return new_prompt(model, cfg.prompt, seed, form)


def _save(prompt: SoftPrompt | DeepPrompt, run: Path, name: str, model: ScoringModel, **meta) -> Path:
    cfg = model.backbone.config
    return save_any_prompt(prompt, run / name, head=model.head, base_model=model.source,
                       num_layers=getattr(cfg, "num_hidden_layers", None),
                       num_attention_heads=getattr(cfg, "num_attention_heads", None),
                       metadata={"label_words": model.label_words, "template": model.template, **meta})


def outside_dp_note(validation) -> str:
    """What of the private data a single-site run uses outside the DP guarantee (results.json ``privacy.outside_dp``)."""
    if validation is None or not len(validation):
        return "nothing: no validation split was used"
    return (f"the validation split ({len(validation)} labelled examples of the private task, carved from the "
            "training data) is used without DP: to fit the calibrated zero-shot class bias "
            "(accuracy.teacher_zero_shot_calibrated) and to measure student/teacher class agreement "
            "(distill.validation_agreement_*); those figures are not covered by epsilon, and neither is "
            "anything chosen by looking at them")


class Pipeline:
    """Runs POST stages for one config into one run folder, loading each artifact at most once."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, progress: bool = False) -> None:
        self.cfg = cfg
        self.run = Path(run_dir or cfg.output_dir)
        self.progress = progress
        self._task: Task | None = None
        self._teacher: ScoringModel | None = None
        self._student: ScoringModel | None = None

    # ------------------------------------------------------------ artifacts
    @classmethod
    def from_run_dir(cls, run_dir: str | Path, progress: bool = False) -> "Pipeline":
        """Re-open a run folder with the config saved in it."""
        data = read_json(Path(run_dir) / "config.json")
        return cls(config_from_dict(data), run_dir, progress)

    def preflight(self, stages=None) -> None:
        """Check every input ``stages`` (default: all) will read, before anything is written
        (:func:`post_fl.preflight.check_run`); raises :class:`post_fl.preflight.PreflightError`."""
        from .preflight import STAGES, check_run

        check_run(self.cfg, stages or STAGES, self.run)

    def save_config(self) -> None:
        """Write ``config.json``; refused (naming the differing keys) if the folder holds artifacts made
        with another config. A config that nothing was made with yet (e.g. bad data) may change."""
        from .preflight import run_folder_problems

        problems = run_folder_problems(self.cfg, self.run)
        if problems:
            raise ValueError(problems[0])
        self.run.mkdir(parents=True, exist_ok=True)
        write_json(self.cfg.to_dict(), self.run / "config.json")

    @property
    def task(self) -> Task:
        if self._task is None:
            self._task = load_task(self.cfg)
        return self._task

    @property
    def teacher(self) -> ScoringModel:
        if self._teacher is None:
            self._teacher = load_teacher(self.cfg, self.task)
        return self._teacher

    @property
    def student(self) -> ScoringModel:
        if self._student is None:
            path = self.cfg.model.student or self.run / STUDENT_DIR
            if not Path(path).exists():
                raise FileNotFoundError(f"{path}: no student model; run 'post-fl distill' first "
                                        "or set model.student")
            self._student = load_student(path, self.cfg, self.task, self.teacher)
        return self._student

    def prompt(self, name: str, model: ScoringModel) -> SoftPrompt | DeepPrompt:
        """The prompt saved as ``name`` (input or deep, by its file), checked against ``model``."""
        path = self.run / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; run the stage that writes it first")
        prompt = load_any_prompt(path, expected_dim=model.embedding_dim, expected_layers=num_model_layers(model))[0]
        return prompt.to(model.device)  # where the model computes (post_fl.core.compute)

    def _stage(self, name: str, data: dict) -> dict:
        write_json(data, self.run / "stages" / f"{name}.json")
        self._mark_complete(name, self.run / "stages" / f"{name}.json")
        return data

    # ------------------------------------------------------------ resume
    def stage_inputs(self, name: str) -> str:
        """A digest of what stage ``name`` read: the config, the data and model files (size, mtime) and
        the results of the stages it builds on. A completed stage whose digest is unchanged is skipped."""
        from .resume import stage_inputs_digest

        return stage_inputs_digest(self.cfg, self.run, name)

    def _mark_complete(self, name: str, output: Path) -> None:
        """Write ``stages/<name>.done.json`` only after the stage's artifacts and result are saved."""
        from .resume import write_marker

        write_marker(self.run, name, self.stage_inputs(name), output)

    def is_complete(self, name: str) -> bool:
        """True when stage ``name`` finished in this folder and its inputs are unchanged since."""
        from .resume import marker_matches

        inputs = self.stage_inputs(name)
        done = marker_matches(self.run, name, inputs)
        log.debug("stage %s: inputs digest %s, %s", name, inputs[:16],
                  "completed with these inputs" if done else "no completion marker for these inputs")
        return done

    def stage_result(self, name: str) -> dict:
        p = self.run / "stages" / f"{name}.json"
        return read_json(p) if p.exists() else {}

    # ------------------------------------------------------------ stages
    def distill(self) -> dict:
        """Stage 1: derive the student from the teacher by KD on public text (skipped if model.student set).

        With ``distill.cache`` the distilled student is kept under the post-fl cache directory, keyed by
        the teacher's weights, the distillation settings and the public corpus: a rerun copies it instead
        of distilling again (the provider's one-time cost).
        """
        import shutil

        from .core.embedded import cache_dir
        from .method.student_cache import cached_or_distilled_student, save_student

        if self.cfg.model.student:
            return self._stage("distill", {"skipped": f"model.student = {self.cfg.model.student}"})
        task, dcfg = self.task, self.cfg.distill
        out = self.run / STUDENT_DIR
        root = cache_dir() / "students" if dcfg.cache else None
        cached, student, report, status = cached_or_distilled_student(
            self.teacher, task.public, dcfg, self.cfg.seed, root, validation=task.validation, progress=self.progress,
            corpus=task.distill_corpus)
        if out.exists():
            shutil.rmtree(out)
        if cached is not None:
            shutil.copytree(cached, out)
        else:
            save_student(student, out)
            write_json(report, out / "distill_report.json")
        report.update(student_cache=status, student_cache_dir=str(cached) if cached is not None else None,
                      seconds_this_run=0.0 if status == "hit" else report["seconds"])
        self._student = None
        return self._stage("distill", report)

    def tune(self) -> dict:
        """Stage 2: DP prompt tuning of the student on the private training set."""
        from .method.tuning import tune_prompt

        student = self.student
        prompt = initial_prompt(self.cfg, student, self.cfg.seed)
        insecure = self.cfg.insecure_reproducible
        result = tune_prompt(student, prompt, self.task.train, self.cfg.tune, self.cfg.seed, progress=self.progress,
                             insecure_seed=self.cfg.seed if insecure else None)
        label = {"not_private": NOT_PRIVATE_LABEL} if insecure else {}
        _save(result.prompt, self.run, PROMPT_STUDENT, student, stage="dp-tune", epsilon=result.epsilon,
              delta=result.delta, noise_multiplier=result.noise_multiplier, max_grad_norm=result.max_grad_norm,
              **label)
        return self._stage("tune", {**label, "epsilon": result.epsilon, "delta": result.delta,
                                    "noise_multiplier": result.noise_multiplier, "max_grad_norm": result.max_grad_norm,
                                    "sample_rate": result.sample_rate, "steps": result.steps,
                                    "examples": result.examples, "mean_loss": result.mean_loss, "seconds": result.seconds,
                                    "seconds_per_epoch": result.seconds / max(self.cfg.tune.epochs, 1e-9),
                                    "seconds_per_example": result.seconds / max(self.cfg.tune.epochs * result.examples,
                                                                                 1e-9)})

    def transfer(self) -> dict:
        """Stage 3: POST transfer of the student prompt to the teacher on public data only."""
        from .method.transfer import transfer_prompt

        student_prompt = self.prompt(PROMPT_STUDENT, self.student)
        result = transfer_prompt(self.student, student_prompt, self.teacher, self.task.public, self.cfg.transfer,
                                 self.cfg.seed, progress=self.progress)
        tuned = self.stage_result("tune")
        _save(result.prompt, self.run, PROMPT_TEACHER, self.teacher, stage="post-transfer",
              epsilon=tuned.get("epsilon"), delta=tuned.get("delta"), alpha=result.alpha_used,
              best_step=result.best_step)
        self._write_transfer_curve(result)
        return self._stage("transfer", result.summary())

    def _write_transfer_curve(self, result) -> None:
        """``transfer_curve.csv`` and ``transfer_curve.png``: the loss per check and the selected step."""
        from .experiments.plots import plot_transfer_curve
        from .method.transfer import write_curve_csv

        write_curve_csv(result.curve, self.run / TRANSFER_CURVE_CSV)
        if result.curve:
            plot_transfer_curve(result.curve, self.run / TRANSFER_CURVE_PNG, result.best_step,
                                f"POST transfer (alpha = {result.alpha_used:.2f}; selected step {result.best_step})")

    def tune_teacher(self) -> dict:
        """Baseline: a non-private prompt tuned on the teacher itself (the costly upper bound POST avoids).

        Its recipe is ``eval.teacher_tune_*`` (an input prompt: the transferred prompt it bounds is one).
        With ``eval.cache_teacher_prompt`` it is kept in the post-fl cache under a key of (teacher weights,
        the training texts and labels it sees, the recipe, the seed), so reruns at other epsilons copy it.
        """
        from .core.embedded import cache_dir
        from .method.reference_prompt import cached_teacher_prompt, store_teacher_prompt, tune_teacher_prompt

        e, out = self.cfg.eval, self.run / PROMPT_TEACHER_TUNED
        train = self.task.train.head(e.teacher_tune_examples) if e.teacher_tune_examples else self.task.train
        root = cache_dir() / "teacher-prompts" if e.cache_teacher_prompt else None
        cached, key = cached_teacher_prompt(root, out, self.teacher, train, self.cfg.prompt, e, self.cfg.seed)
        if cached is not None:
            return self._stage("tune_teacher", cached)
        prompt = initial_prompt(self.cfg, self.teacher, self.cfg.seed, form="input")
        result = tune_teacher_prompt(self.teacher, prompt, train, e, self.cfg.seed, progress=self.progress)
        _save(result.prompt, self.run, PROMPT_TEACHER_TUNED, self.teacher, stage="teacher-tune-nonprivate")
        stage = {"steps": result.steps, "examples": result.examples, "mean_loss": result.mean_loss,
                 "seconds": result.seconds, "seconds_per_epoch": result.seconds / e.teacher_tune_epochs,
                 "seconds_per_example": result.seconds / (e.teacher_tune_epochs * result.examples)}
        return self._stage("tune_teacher", store_teacher_prompt(root, key, out, stage))

    def evaluate(self) -> dict:
        """Stage 4: test accuracy of every baseline, epsilon spent and costs, into results.json."""
        from .method.evaluate import (accuracy_summary, class_scores, contextual_calibration_bias, correct_of_scores,
                                      fit_class_bias, paired_difference)

        test, bs = self.task.test, self.cfg.eval.batch_size
        teacher, student = self.teacher, self.student
        student_prompt = self.prompt(PROMPT_STUDENT, student)
        y = test.labels

        from .core.embedded import cache_dir
        from .method.score_cache import SCORE_CACHE_DIR, cached_class_scores

        score_cache = cache_dir() / SCORE_CACHE_DIR if self.cfg.eval.cache_zero_shot else None
        cache_states: dict[str, str] = {}

        def scored(name: str, model: ScoringModel, prompt=None, data=test, cached: bool = False) -> torch.Tensor:
            t0 = time.perf_counter()
            # unprompted scores depend on no private data, and a prompt read from the cache (``cached``) adds
            # nothing to what the cache holds: reruns read both from the cache
            if prompt is None or cached:
                out, cache_states[name] = cached_class_scores(model, data.texts, bs, score_cache, prompt)
            else:
                out = class_scores(model, data.texts, prompt, bs)
            log.info("evaluate %s on %d texts: %.1fs%s", name, len(data), time.perf_counter() - t0,
                     f" (score cache {cache_states[name]})" if name in cache_states else "")
            return out

        zero = scored("teacher zero-shot", teacher)
        correct = {"teacher_zero_shot": correct_of_scores(zero, y)}  # per test example, for paired comparisons
        validation = self.task.validation
        if validation is not None and len(validation):
            # calibrated zero-shot: a per-class bias fitted on the validation split (never on test)
            bias = fit_class_bias(scored("teacher zero-shot (validation)", teacher, None, validation),
                                  validation.labels)
            correct["teacher_zero_shot_calibrated"] = correct_of_scores(zero, y, bias)
        correct["teacher_zero_shot_contextual"] = correct_of_scores(zero, y, contextual_calibration_bias(teacher))
        correct["student_zero_shot"] = correct_of_scores(scored("student zero-shot", student), y)
        correct["student_private_prompt"] = correct_of_scores(scored("student + DP prompt", student, student_prompt), y)
        if student_prompt.dim == teacher.embedding_dim:  # a deep prompt's layer-0 slice
            correct["teacher_direct_prompt"] = correct_of_scores(scored("teacher + direct prompt", teacher,
                                                                        as_input_prompt(student_prompt)), y)
        if (self.run / PROMPT_TEACHER).exists():
            correct["teacher_transferred_prompt"] = correct_of_scores(
                scored("teacher + transferred prompt", teacher, self.prompt(PROMPT_TEACHER, teacher)), y)
        if (self.run / PROMPT_TEACHER_TUNED).exists():
            correct["teacher_tuned_prompt_nonprivate"] = correct_of_scores(
                scored("teacher + own prompt", teacher, self.prompt(PROMPT_TEACHER_TUNED, teacher),
                       cached=self.cfg.eval.cache_teacher_prompt), y)
        acc = {"majority_class": majority_class_accuracy(self.task.train.labels, y),
               **{k: float(v.float().mean()) for k, v in correct.items()}}
        intervals = {k: accuracy_summary(v, len(test)) for k, v in acc.items()}
        comparison = {}
        if "teacher_transferred_prompt" in acc:
            tr = acc["teacher_transferred_prompt"]
            for base in ("teacher_zero_shot", "teacher_zero_shot_calibrated", "teacher_zero_shot_contextual",
                         "teacher_direct_prompt"):
                if base in acc:  # in standard errors: independent-samples bound, and paired (same test examples)
                    se = math.hypot(intervals[base]["stderr"], intervals["teacher_transferred_prompt"]["stderr"])
                    paired = paired_difference(correct["teacher_transferred_prompt"], correct[base])
                    comparison[f"transferred_minus_{base}"] = {
                        **paired, "in_standard_errors": paired["difference"] / se if se > 0 else math.inf}
            own = acc.get("teacher_tuned_prompt_nonprivate")
            if own is not None and own != acc["teacher_zero_shot"]:
                comparison["recovery_ratio"] = (tr - acc["teacher_zero_shot"]) / (own - acc["teacher_zero_shot"])
        tune, tune_t = self.stage_result("tune"), self.stage_result("tune_teacher")
        cost = {"student_parameters": student.describe()["parameters"],
                "teacher_parameters": teacher.describe()["parameters"]}
        if tune.get("seconds_per_epoch") and tune_t:  # a federated job's tune record has no epoch time
            cost["student_tune_seconds_per_epoch"] = tune["seconds_per_epoch"]
            cost["teacher_tune_seconds_per_epoch"] = tune_t["seconds_per_epoch"]
            cost["tune_time_ratio_teacher_over_student"] = tune_t["seconds_per_epoch"] / tune["seconds_per_epoch"]
        if tune.get("seconds_per_example") and tune_t.get("seconds_per_example"):
            # per example: the two prompts may see different numbers of examples (eval.teacher_tune_*)
            cost["tune_time_ratio_per_example_teacher_over_student"] = (tune_t["seconds_per_example"]
                                                                        / tune["seconds_per_example"])
        results = {
            "accuracy": acc,
            "accuracy_intervals": intervals,  # per accuracy: n, stderr, 95% Wilson interval
            "comparison": comparison,
            "privacy": {"epsilon": tune.get("epsilon", math.inf), "delta": tune.get("delta"),
                        "noise_multiplier": tune.get("noise_multiplier"), "dp": self.cfg.tune.private,
                        "target_epsilon": self.cfg.tune.target_epsilon, "unit": "example-level (one site)",
                        "outside_dp": outside_dp_note(validation),
                        **({"not_private": tune["not_private"]} if "not_private" in tune else {})},
            "data": {"train": len(self.task.train), "test": len(test), "public": len(self.task.public),
                     "public_unit": self.cfg.data.resolved_public_unit(),
                     "validation": len(validation) if validation is not None else 0,
                     "labels": self.task.train.label_names},
            "models": {"teacher": teacher.describe(), "student": student.describe()},
            "distill": self.stage_result("distill"),
            "transfer": {k: v for k, v in self.stage_result("transfer").items() if k not in ("losses", "curve")},
            "cost": cost,
            "zero_shot_score_cache": cache_states,  # per unprompted pass: "hit" | "miss" | "off"
            "seed": self.cfg.seed,
        }
        write_json(results, self.run / "results.json")
        return results

    def run_all(self, resume: bool = True) -> dict:
        """Every stage in order: distill, tune (DP), transfer, teacher baseline, evaluate.

        Inputs are checked first (:meth:`preflight`). With ``resume`` (the default) a stage that
        completed in this folder with unchanged inputs is skipped, so a killed run continues from the
        last completed stage.
        """
        stages = [("distill", self.distill), ("tune", self.tune), ("transfer", self.transfer)]
        if self.cfg.eval.teacher_prompt_tuning:
            stages.append(("tune_teacher", self.tune_teacher))
        self.preflight([n for n, _ in stages] + ["evaluate"])
        self.save_config()
        for name, fn in stages:
            if resume and self.is_complete(name):
                log.info("stage %s: completed earlier in %s with the same inputs; skipped", name, self.run)
                continue
            t0 = time.perf_counter()
            log.info("stage %s ...", name)
            fn()
            log.info("stage %s done in %.1fs", name, time.perf_counter() - t0)
        if resume and self.is_complete("evaluate") and (self.run / "results.json").is_file():
            log.info("stage evaluate: completed earlier with the same inputs; results from %s",
                     self.run / "results.json")
            return read_json(self.run / "results.json")
        t0 = time.perf_counter()
        log.info("stage evaluate ...")
        results = self.evaluate()
        self._mark_complete("evaluate", self.run / "results.json")
        log.info("stage evaluate done in %.1fs", time.perf_counter() - t0)
        return results
