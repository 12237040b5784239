"""Speed ratios of the core pipeline, measured in one run on the same data (not a test).

Prints, for the same batch:
  * DP-SGD step time / non-DP step time (Opacus with post-fl's prompt grad sampler), and
    the cost of the generic alternative (one backward pass per example) for comparison;
and, for the same data:
  * student tuning-epoch time / teacher tuning-epoch time.

    python benchmarks/bench_core.py [--teacher embedded] [--data ../shared/datasets/sst2/dev.tsv]
                                    [--batch-size 16] [--repeats 5] [--json out.json]

Timings are noisy on shared machines: read the ratios, which are taken back to back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from post_fl.core.config import TuneConfig  # noqa: E402
from post_fl.core.data import read_text_file  # noqa: E402
from post_fl.method.student import make_student  # noqa: E402
from post_fl.core.embedded import SST2_LABEL_WORDS, load_embedded_task  # noqa: E402
from post_fl.core.models import ScoringModel, load_scoring_model  # noqa: E402
from post_fl.core.prompt import SoftPrompt, init_from_vocab  # noqa: E402
from post_fl.method.tuning import PromptedClassifier, tune_prompt  # noqa: E402


def _interleaved_times(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, timed round-robin so that load changes hit all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def step_times(model: ScoringModel, texts, labels, batch_size: int, repeats: int) -> dict:
    """Median seconds of one non-DP step, one DP-SGD step and one per-example-loop step on one batch."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    batch = model.encode(texts[:batch_size])
    y = torch.tensor(labels[:batch_size])
    loss_fn = torch.nn.CrossEntropyLoss()

    prompt = init_from_vocab(model.word_embeddings, 10, torch.Generator().manual_seed(0))
    net = PromptedClassifier(model, prompt)
    opt = torch.optim.Adam(prompt.parameters(), lr=0.01)

    def plain_step():
        opt.zero_grad()
        loss_fn(net(batch.input_ids, batch.attention_mask, batch.answer_index), y).backward()
        opt.step()

    dp_prompt = SoftPrompt(prompt.weight.detach())
    loader = DataLoader(TensorDataset(batch.input_ids, y), batch_size=batch_size)
    dp_net, dp_opt, _ = PrivacyEngine().make_private(
        module=PromptedClassifier(model, dp_prompt), optimizer=torch.optim.Adam(dp_prompt.parameters(), lr=0.01),
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)

    def dp_step():
        dp_opt.zero_grad()
        loss_fn(dp_net(batch.input_ids, batch.attention_mask, batch.answer_index), y).backward()
        dp_opt.step()

    def loop_step():  # the generic alternative: one backward pass per example
        grads = []
        for i in range(len(y)):
            prompt.weight.grad = None
            loss_fn(net(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1], batch.answer_index[i:i + 1]),
                    y[i:i + 1]).backward()
            grads.append(prompt.weight.grad.clone())
        return torch.stack(grads)

    t = _interleaved_times({"plain": plain_step, "dp": dp_step, "loop": loop_step}, repeats)
    plain, dp, loop = t["plain"], t["dp"], t["loop"]
    return {"non_dp_step_s": plain, "dp_step_s": dp, "per_example_loop_step_s": loop,
            "dp_over_non_dp": dp / plain, "loop_over_dp": loop / dp}


def epoch_times(teacher: ScoringModel, student: ScoringModel, data, batch_size: int) -> dict:
    """Seconds of one non-private tuning epoch on the student and on the teacher, same data and settings."""
    cfg = TuneConfig(epochs=1, batch_size=batch_size, dp=False)
    out = {}
    for name, model in (("student", student), ("teacher", teacher)):
        prompt = init_from_vocab(model.word_embeddings, 10, torch.Generator().manual_seed(0))
        out[f"{name}_epoch_s"] = tune_prompt(model, prompt, data, cfg).seconds
    out["student_over_teacher"] = out["student_epoch_s"] / out["teacher_epoch_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="embedded", help="teacher model dir/name (default: embedded)")
    ap.add_argument("--student-layers", type=int, default=2, help="layers kept by the (untrained) student")
    ap.add_argument("--data", default="", help="labelled TSV/CSV/JSONL (default: the embedded dataset)")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--examples", type=int, default=256, help="examples in the epoch-time comparison")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data:
        data = read_text_file(args.data, text_column=args.text_column)
        words = SST2_LABEL_WORDS if data.label_names == ["0", "1"] else {}
    else:
        task = load_embedded_task(0)
        data, words = task.train, task.label_words
    data = data.shuffled(0).head(args.examples)
    teacher = load_scoring_model(args.teacher, data.label_names, words)
    backbone, kept = make_student(teacher.backbone, args.student_layers)
    student = ScoringModel(backbone, teacher.tokenizer, teacher.head, teacher.label_names, teacher.label_words,
                           teacher.template, teacher.max_length, source=f"layers {kept} of {args.teacher}")
    results = {"teacher": teacher.describe()["source"], "head": teacher.head, "threads": torch.get_num_threads(),
               "batch_size": args.batch_size, "examples": len(data)}
    results.update({f"student_{k}": v for k, v in step_times(student, data.texts, data.labels,
                                                             args.batch_size, args.repeats).items()})
    results.update({f"teacher_{k}": v for k, v in step_times(teacher, data.texts, data.labels,
                                                             args.batch_size, args.repeats).items()})
    results.update(epoch_times(teacher, student, data, args.batch_size))
    for k, v in results.items():
        print(f"{k:40s} {v:.4f}" if isinstance(v, float) else f"{k:40s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
