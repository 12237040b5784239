"""The POST method (Wang et al., ICML 2025): distil a student, tune a soft prompt on it (plain or
DP-SGD), transfer the prompt to the teacher on public data, evaluate against the baselines.

* ``student`` -- the student: the teacher with a few evenly spaced layers kept;
* ``teacher_outputs`` -- the teacher's outputs on the public text, computed once and cached;
* ``distill`` -- the distillation loop (losses, stopping at a target agreement, report);
* ``student_cache`` -- the distilled student saved and cached by (teacher, settings, corpus);
* ``tuning`` -- soft-prompt tuning, plain or DP-SGD (Opacus);
* ``transfer`` -- POST's transfer loss and loop, public data only, label-free checkpoint selection;
* ``transfer_targets`` -- the transfer's fixed student/teacher targets, computed once (top-k of the vocabulary);
* ``evaluate`` -- accuracy, intervals, paired differences, calibrated and contextual zero-shot;
* ``score_cache`` -- unprompted class scores kept for reruns.

Uses :mod:`post_fl.core` and :mod:`post_fl.privacy`. Names are imported on first use.
"""

from ..core.exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "student": ("make_student", "student_with_layers", "select_layers"),
    "teacher_outputs": ("TeacherOutputs", "teacher_cache_key", "teacher_hash", "corpus_hash"),
    "distill": ("DistillReport", "distill_student"),
    "student_cache": ("cached_or_distilled_student", "save_student", "public_distillation_split"),
    "tuning": ("TuneResult", "PromptedClassifier", "tune_prompt"),
    "transfer": ("TransferResult", "transfer_prompt", "post_transfer_loss", "auto_alpha", "heldout_split",
                 "write_curve_csv", "BestCheckpoint"),
    "transfer_targets": ("TransferTargets", "compute_targets"),
    "evaluate": ("accuracy", "class_scores", "predict", "accuracy_summary", "fit_class_bias",
                 "contextual_calibration_bias", "majority_class_accuracy", "paired_difference"),
    "score_cache": ("cached_class_scores",),
})
