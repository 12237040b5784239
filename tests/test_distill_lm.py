"""Language-model distillation (distill.objective = "lm"): packing, the teacher's outputs at every
position, POST's first/last layer choice, and a student that moves toward the teacher."""

import pytest
import torch

from post_fl.core.config import ConfigError, DistillConfig
from post_fl.core.data import DataError, TextDataset
from post_fl.core.models import load_scoring_model
from post_fl.method.distill import distill_student
from post_fl.method.student import select_end_layers
from post_fl.method.student_cache import cached_or_distilled_student
from post_fl.method.teacher_outputs import pack_sequences, teacher_lm_outputs

from conftest import make_sentiment

LABELS = ["negative", "positive"]
WORDS = {"negative": ["bad"], "positive": ["good"]}


@pytest.fixture(scope="module")
def teacher(tiny_dirs):
    return load_scoring_model(tiny_dirs["causal"], LABELS, WORDS)


def test_pack_sequences_concatenates_texts_with_end_tokens(teacher):
    tok = teacher.tokenizer
    texts = ["good film", "bad plot and bad acting", "fine"]
    ids, att = pack_sequences(tok, texts, 4, 1000)
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids.shape[1] == 4 and ids.shape[0] == (len(stream) + 3) // 4
    assert ids[att.bool()].tolist() == stream
    assert int(att.sum()) == len(stream)
    ids2, att2 = pack_sequences(tok, texts, 4, 5)  # the token budget cuts the stream
    assert int(att2.sum()) == 5 and ids2[att2.bool()].tolist() == stream[:5]


def test_teacher_lm_outputs_hold_every_position_and_are_cached(teacher, tmp_path):
    texts = make_sentiment(30, seed=1).texts
    cfg = DistillConfig(objective="lm", sequence_length=16, corpus_tokens=200)
    out, state = teacher_lm_outputs(teacher, texts, cfg, tmp_path)
    assert state == "miss"
    again, state = teacher_lm_outputs(teacher, texts, cfg, tmp_path)
    assert state == "hit" and torch.equal(out.hidden, again.hidden)
    assert int(out.attention_mask.sum()) == 200
    # the cached hidden states give the teacher's own logits at every position
    h, _, _ = teacher.hidden_states(out.input_ids[:2], out.attention_mask[:2])
    assert torch.allclose(out.hidden[:2].float(), h * out.attention_mask[:2, :, None], atol=2e-3)
    valid = out.attention_mask.bool()
    assert torch.equal(out.positions[valid], torch.arange(16).expand_as(out.positions)[valid])
    # next-token targets inside each row, nothing after the last real token
    assert torch.equal(out.lm_targets[:, :-1][valid[:, 1:]], out.input_ids[:, 1:][valid[:, 1:]])


def test_lm_objective_refuses_a_teacher_without_an_lm_head(tiny_dirs):
    enc = load_scoring_model(tiny_dirs["embedding"], LABELS, WORDS)
    with pytest.raises(DataError, match="causal LM"):
        teacher_lm_outputs(enc, ["some text"], DistillConfig(objective="lm"))


def test_end_layers_are_the_first_and_last_halves():
    assert select_end_layers(30, 10) == [0, 1, 2, 3, 4, 25, 26, 27, 28, 29]
    assert select_end_layers(30, 5) == [0, 1, 2, 28, 29]
    assert select_end_layers(4, 1) == [0]
    with pytest.raises(ValueError):
        select_end_layers(4, 5)


@pytest.mark.parametrize("field,value,expected", [("objective", "mlm", "template, lm"),
                                                  ("layer_selection", "odd", "even, ends"),
                                                  ("sequence_length", 2, ">= 8"),
                                                  ("corpus_tokens", 10, ">= distill.sequence_length")])
def test_bad_lm_settings_name_field_and_expected(field, value, expected):
    with pytest.raises(ConfigError, match=f"distill.{field}.*{expected}"):
        DistillConfig(**{field: value}).validate()


def test_lm_distillation_moves_the_student_toward_the_teacher(teacher, tmp_path):
    public = make_sentiment(60, seed=2)
    cfg = DistillConfig(objective="lm", layer_selection="ends", num_layers=2, steps=30, batch_size=4,
                        sequence_length=16, corpus_tokens=600, eval_every=30, lr=3e-3, time_budget_s=1e9,
                        target_agreement=1.1, keep_best=False)
    student, report = distill_student(teacher, public, cfg, corpus=public, cache_dir=tmp_path)
    assert report.teacher_layers == [0, 3] and report.steps == 30
    assert report.losses[-1] < report.losses[0]
    assert report.next_token_agreement_after > report.next_token_agreement_before


def test_student_cache_key_follows_the_lm_corpus(teacher, tmp_path):
    public = make_sentiment(40, seed=3)
    cfg = DistillConfig(objective="lm", num_layers=2, steps=2, batch_size=2, sequence_length=16,
                        corpus_tokens=100, eval_every=2)
    corpus = TextDataset(public.texts[:20], [], LABELS)
    d1, _, _, s1 = cached_or_distilled_student(teacher, public, cfg, 0, tmp_path, corpus=corpus)
    d2, _, _, s2 = cached_or_distilled_student(teacher, public, cfg, 0, tmp_path, corpus=corpus)
    other = TextDataset(list(reversed(public.texts[:20])), [], LABELS)
    d3, _, _, s3 = cached_or_distilled_student(teacher, public, cfg, 0, tmp_path, corpus=other)
    assert (s1, s2, s3) == ("miss", "hit", "miss") and d1 == d2 != d3
