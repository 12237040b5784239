"""Class scores kept on disk (unprompted, or with a cached fixed prompt): reused on reruns, keyed by model, task
settings, texts and the prompt's bytes."""

import json

import pytest
import torch

from post_fl.cli import main
from post_fl.core.data import DataError
from post_fl.method.evaluate import class_scores
from post_fl.core.models import load_scoring_model
from post_fl.method.score_cache import cached_class_scores, class_score_cache_key

from conftest import make_sentiment
from test_distill_cache import LABELS, WORDS, teacher  # noqa: F401 - the fixture is used by name
from test_pipeline_cli import _args


def test_scores_are_computed_once_then_read_back(teacher, tmp_path):
    texts = make_sentiment(12, seed=1).texts
    first, state = cached_class_scores(teacher, texts, 4, tmp_path)
    assert state == "miss" and len(list(tmp_path.glob("*.safetensors"))) == 1
    assert torch.equal(first, class_scores(teacher, texts, None, 4))
    again, state = cached_class_scores(teacher, texts, 4, tmp_path)
    assert state == "hit" and torch.equal(first, again)
    off, state = cached_class_scores(teacher, texts, 4, None)
    assert state == "off" and torch.equal(off, first)


def test_key_follows_weights_settings_texts_and_batch_size(teacher, tiny_dirs):
    texts = make_sentiment(12, seed=1).texts
    key = class_score_cache_key(teacher, texts, 4)
    other_words = load_scoring_model(tiny_dirs["causal"], LABELS, {"negative": ["awful"], "positive": ["good"]})
    other_weights = load_scoring_model(tiny_dirs["masked"], LABELS, WORDS)
    assert len({key, class_score_cache_key(teacher, texts[:-1], 4), class_score_cache_key(teacher, texts, 8),
                class_score_cache_key(other_words, texts, 4), class_score_cache_key(other_weights, texts, 4)}) == 5


def test_prompted_scores_are_keyed_by_the_prompt_bytes(teacher, tmp_path):
    from post_fl.core.prompt import SoftPrompt

    texts = make_sentiment(12, seed=1).texts
    prompt = SoftPrompt(torch.randn(4, teacher.embedding_dim, generator=torch.Generator().manual_seed(0)))
    first, state = cached_class_scores(teacher, texts, 4, tmp_path, prompt)
    assert state == "miss" and torch.equal(first, class_scores(teacher, texts, prompt, 4))
    assert not torch.equal(first, class_scores(teacher, texts, None, 4))  # the prompt changes the scores
    assert cached_class_scores(teacher, texts, 4, tmp_path, prompt)[1] == "hit"
    unprompted = class_score_cache_key(teacher, texts, 4)
    with torch.no_grad():
        prompt.weight[0, 0] += 1.0  # one number changed: another key, scored again
    assert class_score_cache_key(teacher, texts, 4, prompt) != unprompted
    again, state = cached_class_scores(teacher, texts, 4, tmp_path, prompt)
    assert state == "miss" and torch.equal(again, class_scores(teacher, texts, prompt, 4))


@pytest.mark.parametrize("content", [b"", b"not a safetensors file"])
def test_a_damaged_cache_file_is_an_error_naming_it(teacher, tmp_path, content):
    texts = make_sentiment(6, seed=2).texts
    path = tmp_path / f"{class_score_cache_key(teacher, texts, 4)}.safetensors"
    path.write_bytes(content)
    with pytest.raises(DataError, match=str(path)):
        cached_class_scores(teacher, texts, 4, tmp_path)


def test_a_cache_file_of_other_texts_is_refused(teacher, tmp_path):
    a, b = make_sentiment(6, seed=2).texts, make_sentiment(6, seed=3).texts
    cached_class_scores(teacher, a, 4, tmp_path)
    (tmp_path / f"{class_score_cache_key(teacher, a, 4)}.safetensors").rename(
        tmp_path / f"{class_score_cache_key(teacher, b, 4)}.safetensors")
    with pytest.raises(DataError, match="another key"):
        cached_class_scores(teacher, b, 4, tmp_path)


def test_a_rerun_reads_the_unprompted_passes_and_recomputes_the_prompted_ones(tmp_path, tiny_dirs, files, monkeypatch):
    monkeypatch.setenv("POST_FL_CACHE", str(tmp_path / "cache"))
    runs = [tmp_path / "a", tmp_path / "b"]
    assert main(["run"] + _args(tiny_dirs, files, runs[0])) == 0
    assert main(["run"] + _args(tiny_dirs, files, runs[1]) + ["--set", "tune.target_epsilon=8"]) == 0
    first, second = (json.loads((r / "results.json").read_text()) for r in runs)
    assert set(first["zero_shot_score_cache"].values()) == {"miss"}
    assert set(second["zero_shot_score_cache"].values()) == {"hit"}
    assert {"teacher zero-shot", "student zero-shot"} <= set(second["zero_shot_score_cache"])
    for name in ("teacher_zero_shot", "teacher_zero_shot_calibrated", "student_zero_shot"):
        assert first["accuracy"][name] == second["accuracy"][name], name
    off = tmp_path / "c"
    assert main(["run"] + _args(tiny_dirs, files, off) + ["--set", "eval.cache_zero_shot=false"]) == 0
    assert set(json.loads((off / "results.json").read_text())["zero_shot_score_cache"].values()) == {"off"}
