"""Choose the teacher's template and label words on the validation split only (not a test).

For each candidate template the teacher's answer-position logits on the validation texts are
computed once; every candidate label-word set is scored from them. Printed per candidate:
raw zero-shot accuracy, contextual calibration (content-free inputs), and bias-calibrated
accuracy with the bias fitted on one half of validation and measured on the other (both ways,
averaged), so the calibrated figure is not fitted on the texts it is measured on.

    .venv/bin/python benchmarks/choose_verbalizer.py [--teacher embedded-smollm2] [--n 500]
                                                     [--json runs/bench/verbalizer.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from post_fl.core.config import load_config  # noqa: E402
from post_fl.method.evaluate import CONTENT_FREE_INPUTS, accuracy_of_scores, fit_class_bias  # noqa: E402
from post_fl.core.models import load_scoring_model  # noqa: E402
from post_fl.core.tasks import load_task  # noqa: E402

TEMPLATES = [
    "{text} It was",
    "Review: {text}\nSentiment:",
    "{text} All in all, the movie was",
    "Movie review: {text}\nIs this review positive or negative? Answer:",
]
WORD_SETS = {
    "negative/positive": {"negative": ["negative"], "positive": ["positive"]},
    "bad/good": {"negative": ["bad"], "positive": ["good"]},
    "negative,bad,terrible/positive,good,great": {"negative": ["negative", "bad", "terrible"],
                                                  "positive": ["positive", "good", "great"]},
    "terrible,awful/great,wonderful": {"negative": ["terrible", "awful"], "positive": ["great", "wonderful"]},
}


def _scores(logits: torch.Tensor, ids_per_class: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.logsumexp(logits[:, ids], -1) for ids in ids_per_class], -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="embedded-smollm2")
    ap.add_argument("--n", type=int, default=500, help="validation texts used")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cfg = load_config(None, {"model.teacher": args.teacher})
    task = load_task(cfg)
    val = task.validation.head(args.n)
    y = torch.tensor(val.labels)
    half = len(val) // 2
    rows = []
    for template in TEMPLATES:
        model = load_scoring_model(args.teacher, val.label_names, WORD_SETS["negative/positive"], "auto", template,
                                   cfg.model.max_length)
        t0 = time.perf_counter()
        with torch.no_grad():
            order = sorted(range(len(val)), key=lambda i: len(val.texts[i]))
            logits = torch.empty((len(val), model.backbone.config.vocab_size))
            for i in range(0, len(order), 32):
                idx = order[i: i + 32]
                logits[idx] = model.answer_logits(model.encode([val.texts[j] for j in idx]))
            cf_logits = model.answer_logits(model.encode(list(CONTENT_FREE_INPUTS)))
        seconds = time.perf_counter() - t0
        for name, words in WORD_SETS.items():
            ids = [model._word_ids(words[c]) for c in val.label_names]
            s = _scores(logits, ids)
            cf = torch.softmax(_scores(cf_logits, ids), -1).mean(0)
            b1, b2 = fit_class_bias(s[:half], y[:half]), fit_class_bias(s[half:], y[half:])
            cross = (accuracy_of_scores(s[half:], y[half:], b1) * (len(val) - half)
                     + accuracy_of_scores(s[:half], y[:half], b2) * half) / len(val)
            row = {"template": template, "label_words": name, "raw": accuracy_of_scores(s, y),
                   "contextual": accuracy_of_scores(s, y, -torch.log(cf)), "bias_cross_fitted": cross,
                   "predicted_positive_raw": float((s.argmax(-1) == 1).float().mean()),
                   "seconds_for_validation": seconds, "n": len(val)}
            rows.append(row)
            print(f"{template!r:70} {name:44} raw {row['raw']:.3f}  contextual {row['contextual']:.3f}  "
                  f"bias(cross-fit) {cross:.3f}  P(pos) {row['predicted_positive_raw']:.2f}", flush=True)
    best = max(rows, key=lambda r: r["raw"])
    print("best by raw validation accuracy:", best["template"], best["label_words"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "best_raw": best}, indent=2))


if __name__ == "__main__":
    main()
