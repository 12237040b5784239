"""Per-example prompt-gradient norms at the initial prompt: where DP-SGD's clipping bound C belongs.

    .venv/bin/python benchmarks/gradient_norms.py --run RUN [--texts 48] [--split public]

For each prompt form (input, deep) of the student of run folder RUN (after ``post-fl distill``, or any run
whose config sets ``model.student``), the norm of each example's gradient of the
tuning loss (cross-entropy on the class scores) with respect to the initial prompt, on ``--texts`` texts of
``--split``. ``public`` (the default) uses the public texts with labels drawn uniformly at random (seeded):
no private byte is read, so a C chosen from it costs no privacy. ``train`` reads the private training split
and its labels: a developer's check only, never a setting a site should choose from.
Prints one JSON with the median, 10th and 90th percentiles per form and ``tune.max_grad_norm = "auto"``'s
bound (``post_fl.core.config.AUTO_CLIP_BOUNDS``) beside them. Clipping far above the median never binds and adds
noise that carries nothing; docs/method.md#clipping records what it gave.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder with a student (post-fl distill) or model.student set")
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--split", choices=("public", "train"), default="public")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    from post_fl.core.config import AUTO_CLIP_BOUNDS
    from post_fl.core.data import TextDataset
    from post_fl.core.deep_prompt import new_prompt
    from post_fl.method.tuning import PromptedClassifier, encode_dataset
    from post_fl.pipeline import Pipeline

    pipe = Pipeline.from_run_dir(args.run)
    cfg, task, student = pipe.cfg, pipe.task, pipe.student
    gen = torch.Generator().manual_seed(args.seed)
    names = task.train.label_names
    if args.split == "public":
        texts = task.public.texts[: args.texts]
        data = TextDataset(texts, torch.randint(0, len(names), (len(texts),), generator=gen).tolist(), names)
    else:
        data = task.train.head(args.texts)
    ids, mask, answer, labels = encode_dataset(student, data).tensors
    out = {"run": args.run, "split": args.split, "texts": len(data), "forms": {}}
    for form in ("input", "deep"):
        prompt = new_prompt(student, cfg.prompt, args.seed, form=form)
        net = PromptedClassifier(student, prompt)
        norms = []
        for i in range(len(data)):
            loss = torch.nn.functional.cross_entropy(net(ids[i:i + 1], mask[i:i + 1], answer[i:i + 1]), labels[i:i + 1])
            (grad,) = torch.autograd.grad(loss, prompt.weight)
            norms.append(float(grad.norm()))
        t = torch.tensor(norms)
        out["forms"][form] = {"parameters": prompt.weight.numel(), "median": float(t.median()),
                              "q10": float(t.quantile(0.1)), "q90": float(t.quantile(0.9)),
                              "auto_clip_bound": AUTO_CLIP_BOUNDS[form]}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
