"""What limits POST on a finished run, measured on the validation split only (not a test).

Loads a run folder of ``post-fl run`` (its config, student, teacher and DP student prompt) and prints
validation accuracy of: the teacher and student zero-shot; the student's DP prompt and that prompt
used directly on the teacher; new student prompts tuned with other settings (``--tune NAME``, without
or with DP); POST transfers from the DP prompt with other losses (``--transfer SPACE:ALPHA:STEPS``);
and, with ``--ceiling``, what any class-space transfer target could reach (:func:`class_space_ceilings`).

    POST_FL_CACHE=runs/bench/cache-full .venv/bin/python benchmarks/probe_student_ceiling.py \\
        --run runs/bench/full --tune nodp dp_b16 dp_b64_lr0.1_e3 --transfer classes:1.0:100

Test data is never read. Each transfer prints its accuracy every 50 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from post_fl.method.evaluate import class_scores  # noqa: E402
from post_fl.pipeline import PROMPT_STUDENT, Pipeline, initial_prompt  # noqa: E402
from post_fl.core.deep_prompt import as_input_prompt  # noqa: E402
from post_fl.core.prompt import SoftPrompt  # noqa: E402
from post_fl.method.transfer import post_transfer_loss  # noqa: E402
from post_fl.method.tuning import tune_prompt  # noqa: E402

TUNE_SETTINGS = {
    "nodp": dict(dp=False),
    "dp_b16": dict(),
    "dp_b64_lr0.1_e3": dict(batch_size=64, lr=0.1, epochs=3.0),
}


def class_space_ceilings(teacher: torch.Tensor, student: torch.Tensor, prompted: torch.Tensor,
                         labels: torch.Tensor, weights=(0.25, 0.5, 1.0, 2.0, 4.0)) -> dict:
    """Oracle accuracies of class-score combinations (no training), from N x C class log-probabilities of the
    unprompted teacher, the unprompted student and the prompted student.

    ``shift``: teacher + k (prompted − unprompted student), the change POST's alignment term copies;
    ``centred_shift``: the same change with its mean over texts removed (blind to the student's own class
    bias); ``ensemble``: calibrated teacher + w calibrated prompted student (a product of experts). Each is
    the best accuracy over ``weights`` with its weight: a ceiling, since the weight is chosen on the labels.
    A transfer whose target is built from these scores cannot beat the best of them.
    """
    def acc(scores):
        return float((scores.argmax(-1) == labels).float().mean())

    def centred(scores):
        return scores - scores.mean(0, keepdim=True)

    def best(make):
        return max((round(acc(make(w)), 4), w) for w in weights)

    change = prompted - student
    return {
        "teacher": acc(teacher), "teacher_calibrated": acc(centred(teacher)),
        "student_prompted": acc(prompted),
        "both_right": float(((teacher.argmax(-1) == labels) & (prompted.argmax(-1) == labels)).float().mean()),
        "only_prompted_student_right": float(((teacher.argmax(-1) != labels)
                                              & (prompted.argmax(-1) == labels)).float().mean()),
        "shift": best(lambda k: teacher + k * change),
        "centred_shift": best(lambda k: teacher + k * centred(change)),
        "ensemble": best(lambda w: centred(teacher) + w * centred(prompted)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run folder of a finished 'post-fl run'")
    ap.add_argument("--validation", type=int, default=300, help="validation sentences scored")
    ap.add_argument("--tune", nargs="*", default=[], choices=sorted(TUNE_SETTINGS))
    ap.add_argument("--transfer", nargs="*", default=[], help="SPACE:ALPHA:STEPS, e.g. classes:1.0:100")
    ap.add_argument("--ceiling", action="store_true", help="print class_space_ceilings of the run's DP prompt")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    p = Pipeline.from_run_dir(args.run)
    teacher, student, task = p.teacher, p.student, p.task
    val = task.validation
    texts, labels = val.texts[: args.validation], torch.tensor(val.labels[: args.validation])

    def log_probs(model, prompt=None) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(class_scores(model, texts, prompt, 32), -1)

    def hit_rate(scores: torch.Tensor) -> float:
        return float((scores.argmax(-1) == labels).float().mean())

    def acc(model, prompt=None) -> float:
        return hit_rate(log_probs(model, prompt))

    dp_prompt = p.prompt(PROMPT_STUDENT, student)
    dp_prompt.requires_grad_(False)
    direct = as_input_prompt(dp_prompt)  # what the teacher can read of it: the input prompt or a deep prompt's layer 0
    # each model's validation scores once: for the accuracies below and for the ceilings
    teacher_s, student_s, prompted_s = log_probs(teacher), log_probs(student), log_probs(student, dp_prompt)
    print(f"validation (n = {len(texts)}): teacher zero-shot {hit_rate(teacher_s):.3f}, student zero-shot "
          f"{hit_rate(student_s):.3f}, student + DP prompt {hit_rate(prompted_s):.3f}, teacher + that prompt "
          f"{acc(teacher, direct):.3f}", flush=True)
    if args.ceiling:
        print("class-space ceilings (validation, weights chosen on labels):",
              class_space_ceilings(teacher_s, student_s, prompted_s, labels), flush=True)
    for name in args.tune:
        cfg = dataclasses.replace(p.cfg.tune, **TUNE_SETTINGS[name])
        t0 = time.time()
        r = tune_prompt(student, initial_prompt(p.cfg, student, p.cfg.seed), task.train, cfg, p.cfg.seed)
        print(f"student prompt {name}: validation {acc(student, r.prompt):.3f}, epsilon {r.epsilon:.2f}, "
              f"{r.steps} steps, {time.time() - t0:.0f} s", flush=True)
    public = task.public.texts
    s_enc, t_enc = student.encode(public), teacher.encode(public)
    for spec in args.transfer:
        space, alpha, steps = spec.split(":")
        alpha, steps = float(alpha), int(steps)
        out = (lambda m, b, q=None: m(b, q)) if space == "classes" else (lambda m, b, q=None: m.answer_logits(b, q))
        gen = torch.Generator().manual_seed(p.cfg.seed)
        prompt = SoftPrompt(direct.weight.detach().clone())
        opt = torch.optim.Adam(prompt.parameters(), lr=p.cfg.transfer.lr)
        t0 = time.time()
        for step in range(1, steps + 1):
            idx = torch.randperm(len(public), generator=gen)[: p.cfg.transfer.batch_size]
            sb, tb = s_enc.rows(idx), t_enc.rows(idx)
            with torch.no_grad():
                s_p, s_0, t_0 = out(student, sb, dp_prompt), out(student, sb), out(teacher, tb)
            loss, _ = post_transfer_loss(out(teacher, tb, prompt), t_0, s_p, s_0, alpha, p.cfg.transfer.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps:
                print(f"transfer {spec}: step {step}, teacher validation {acc(teacher, prompt):.3f}, "
                      f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
