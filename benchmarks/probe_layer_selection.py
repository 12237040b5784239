"""Class agreement of UNtrained students with their teacher for several layer selections (validation labels unused).

Run from the repository root on a finished ``post-fl run`` folder (its teacher and task):

    POST_FL_CACHE=runs/bench/cache-full .venv/bin/python benchmarks/probe_layer_selection.py 6 10 12 18

For each student size k it copies k teacher layers chosen four ways -- evenly spaced (post-fl's
``select_layers``), the first k-1 plus the last, the first k-2 plus the last two, and the k with the
highest block influence 1 - cos(h_in, h_out) on 64 public texts (ShortGPT) -- and prints the share of
300 validation sentences and 200 public texts on which the student's class prediction equals the
teacher's. It trains nothing: it shows how much of the teacher a layer choice keeps before distillation.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from post_fl.method.student import select_layers, student_with_layers  # noqa: E402
from post_fl.method.evaluate import predict  # noqa: E402
from post_fl.core.models import ScoringModel  # noqa: E402
from post_fl.pipeline import Pipeline  # noqa: E402


def block_influence(teacher: ScoringModel, texts: list[str]) -> list[float]:
    """ShortGPT's block influence of each layer: 1 - mean cosine of its input and output hidden states."""
    enc = teacher.encode(texts)
    with torch.no_grad():
        hs = teacher.backbone.base_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                         output_hidden_states=True).hidden_states
    m = enc.attention_mask.bool()
    return [float(1 - torch.nn.functional.cosine_similarity(hs[i][m], hs[i + 1][m], dim=-1).mean())
            for i in range(len(hs) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="+", type=int, help="student sizes (layers kept)")
    ap.add_argument("--run", default="runs/bench/full", help="run folder of a finished 'post-fl run'")
    args = ap.parse_args()
    torch.set_num_threads(2)
    p = Pipeline.from_run_dir(args.run)
    teacher, task = p.teacher, p.task  # public: data.public_unit of that config ("auto" = sentences now)
    val, pub = task.validation.texts[:300], task.public.texts[-200:]
    t0 = time.time()
    tv, tp = predict(teacher, val), predict(teacher, pub)
    print("teacher preds", time.time() - t0, flush=True)
    bi = block_influence(teacher, task.public.texts[:64])
    print("BI", [round(b, 3) for b in bi], flush=True)
    n = len(bi)

    def run(name: str, keep: list[int]) -> None:
        s = ScoringModel(student_with_layers(teacher.backbone, keep), teacher.tokenizer, teacher.head,
                         teacher.label_names, teacher.label_words, teacher.template, teacher.max_length)
        a_v = float((predict(s, val) == tv).float().mean())
        a_p = float((predict(s, pub) == tp).float().mean())
        print(f"{name:12s} {keep} val_agree {a_v:.3f} pub_agree {a_p:.3f}", flush=True)

    for k in args.sizes:
        run(f"even{k}", select_layers(n, k))
        run(f"prefix{k}", list(range(k - 1)) + [n - 1])
        run(f"prefix2_{k}", list(range(k - 2)) + [n - 2, n - 1])
        run(f"bi{k}", sorted(sorted(range(n), key=lambda i: -bi[i])[:k]))


if __name__ == "__main__":
    main()
