"""bfloat16 frozen weights on a CPU against float32: speed of a prompted teacher step, and how far scores move.

    .venv/bin/python benchmarks/probe_bf16_cpu.py [--teacher embedded-smollm2] [--batch 16] [--texts 64] [--repeats 3]

Loads the teacher twice (``compute.dtype`` float32 and bfloat16, both on the CPU), then for each: the median
time of ``--repeats`` forward + backward passes of a batch of validation sentences with a 10-token input prompt
(what a transfer or tuning step costs), and the class scores of ``--texts`` validation sentences unprompted.
Prints one JSON: seconds per step for each dtype, the speed-up, the share of equal predictions and the largest
class-score difference. bfloat16 is fast on CPUs with AMX or avx512_bf16 (``lscpu`` flags); elsewhere it may be
slower than float32. docs/benchmarks.md#gpu records what it gave.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="embedded-smollm2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    from post_fl.core.compute import Compute, dtype_name
    from post_fl.core.embedded import load_embedded_task
    from post_fl.core.models import load_scoring_model
    from post_fl.core.prompt import init_from_vocab
    from post_fl.method.evaluate import class_scores

    task = load_embedded_task(0)
    texts = task.validation.texts[: max(args.texts, args.batch)]
    out, scores = {"teacher": args.teacher, "batch": args.batch, "threads": torch.get_num_threads(),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability()}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_scoring_model(args.teacher, task.train.label_names, task.label_words,
                                   compute=Compute(torch.device("cpu"), dtype))
        prompt = init_from_vocab(model.word_embeddings, 10, torch.Generator().manual_seed(0))
        batch = model.encode(texts[: args.batch])
        times = []
        for _ in range(args.repeats + 1):  # the first pass warms up
            t0 = time.perf_counter()
            model(batch, prompt).logsumexp(-1).sum().backward()
            times.append(time.perf_counter() - t0)
        scores[dtype] = class_scores(model, texts[: args.texts])
        out[f"seconds_per_step_{dtype_name(dtype)}"] = statistics.median(times[1:])
    out["speed_up_bfloat16"] = out["seconds_per_step_float32"] / out["seconds_per_step_bfloat16"]
    a, b = scores[torch.float32], scores[torch.bfloat16]
    out["equal_predictions"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    out["max_class_score_difference"] = float((a - b).abs().max())
    out["texts"] = len(a)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
