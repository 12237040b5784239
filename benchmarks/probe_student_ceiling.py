"""What limits POST on a finished run, measured on the validation split only (not a test).

Loads a run folder of ``post-fl run`` (its config, student, teacher and DP student prompt) and prints
validation accuracy of: the teacher and student zero-shot; the student's DP prompt and that prompt
used directly on the teacher; new student prompts tuned with other settings (``--tune NAME``, without
or with DP); and POST transfers from the DP prompt with other losses (``--transfer SPACE:ALPHA:STEPS``).

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
from post_fl.core.prompt import SoftPrompt  # noqa: E402
from post_fl.method.transfer import post_transfer_loss  # noqa: E402
from post_fl.method.tuning import tune_prompt  # noqa: E402

TUNE_SETTINGS = {
    "nodp": dict(dp=False),
    "dp_b16": dict(),
    "dp_b64_lr0.1_e3": dict(batch_size=64, lr=0.1, epochs=3.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run folder of a finished 'post-fl run'")
    ap.add_argument("--validation", type=int, default=300, help="validation sentences scored")
    ap.add_argument("--tune", nargs="*", default=[], choices=sorted(TUNE_SETTINGS))
    ap.add_argument("--transfer", nargs="*", default=[], help="SPACE:ALPHA:STEPS, e.g. classes:1.0:100")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    p = Pipeline.from_run_dir(args.run)
    teacher, student, task = p.teacher, p.student, p.task
    val = task.validation
    texts, labels = val.texts[: args.validation], torch.tensor(val.labels[: args.validation])

    def acc(model, prompt=None) -> float:
        with torch.no_grad():
            return float((class_scores(model, texts, prompt, 32).argmax(-1) == labels).float().mean())

    dp_prompt = p.prompt(PROMPT_STUDENT, student)
    dp_prompt.requires_grad_(False)
    print(f"validation (n = {len(texts)}): teacher zero-shot {acc(teacher):.3f}, student zero-shot {acc(student):.3f}, "
          f"student + DP prompt {acc(student, dp_prompt):.3f}, teacher + that prompt {acc(teacher, dp_prompt):.3f}",
          flush=True)
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
        prompt = SoftPrompt(dp_prompt.weight.detach().clone())
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
