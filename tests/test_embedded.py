"""The embedded default really loads offline from installed packages and works better than chance."""

import pytest
import torch

from post_fl.embedded import EMBEDDED_LABELS, embedded_model_dir, load_embedded_task
from post_fl.models import load_scoring_model


@pytest.fixture(scope="module")
def task():
    return load_embedded_task(0)


def test_embedded_splits_are_disjoint_labelled_and_stable(task):
    assert task.train.label_names == EMBEDDED_LABELS
    assert len(task.train) > 20000 and len(task.test) > 2000 and len(task.public) > 2000
    assert not task.public.labelled
    train, test, public = set(task.train.texts), set(task.test.texts), set(task.public.texts)
    assert not (train & test) and not (train & public) and not (test & public)
    again = load_embedded_task(1)  # another seed shuffles train but never moves a text between splits
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
