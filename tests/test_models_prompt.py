import json

import pytest
import torch

from post_fl.core.models import ModelError, load_scoring_model
from post_fl.core.prompt import PromptError, SoftPrompt, init_from_text, init_from_vocab, load_prompt, save_prompt

LABELS = ["negative", "positive"]


@pytest.mark.parametrize("kind", ["causal", "masked", "embedding"])
def test_scores_have_one_column_per_class_with_and_without_prompt(tiny_dirs, kind, sentiment):
    m = load_scoring_model(tiny_dirs[kind], LABELS)
    assert m.head == kind
    batch = m.encode(sentiment.texts[:5])
    prompt = init_from_vocab(m.word_embeddings, 3, torch.Generator().manual_seed(0))
    assert m(batch).shape == (5, 2)
    assert m(batch, prompt).shape == (5, 2)
    assert not torch.allclose(m(batch), m(batch, prompt))


def test_answer_position_is_the_mask_for_masked_lms(tiny_dirs):
    m = load_scoring_model(tiny_dirs["masked"], LABELS)
    b = m.encode(["good movie", "bad film and the plot"])
    for row, pos in zip(b.input_ids, b.answer_index):
        assert row[pos] == m.tokenizer.mask_token_id


def test_long_text_is_truncated_but_template_kept(tiny_dirs):
    m = load_scoring_model(tiny_dirs["masked"], LABELS, max_length=12)
    b = m.encode(["good " * 50])
    assert b.input_ids.shape[1] == 12 and b.input_ids[0, b.answer_index[0]] == m.tokenizer.mask_token_id


def test_causal_answer_is_last_real_token_with_padding(tiny_dirs):
    m = load_scoring_model(tiny_dirs["causal"], LABELS)
    texts = ["good", "bad film and the plot was very"]
    batch = m.encode(texts)
    single = m.encode(texts[:1])
    # padding must not change the short row's scores
    assert torch.allclose(m(batch)[0], m(single)[0], atol=1e-5)


def test_backbone_is_frozen(tiny_dirs):
    m = load_scoring_model(tiny_dirs["causal"], LABELS)
    assert not any(p.requires_grad for p in m.backbone.parameters())
    m.train()
    assert not m.backbone.training  # no dropout on the frozen model


def test_model_errors_name_the_problem(tmp_path, tiny_dirs):
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="no weights"):
        load_scoring_model(str(empty), LABELS)
    with pytest.raises(ModelError, match="no config.json"):
        load_scoring_model(str(tmp_path), LABELS)
    with pytest.raises(ModelError, match="label '0' has no label words"):
        load_scoring_model(tiny_dirs["masked"], ["0", "1"])
    with pytest.raises(ModelError, match="must contain"):
        load_scoring_model(tiny_dirs["masked"], LABELS, template="{text} no mask here")


def test_prompt_round_trip_and_metadata(tmp_path):
    p = SoftPrompt(torch.randn(4, 32))
    save_prompt(p, tmp_path / "p", head="causal", base_model="x", metadata={"epsilon": 3.0})
    q, cfg = load_prompt(tmp_path / "p", expected_dim=32)
    assert torch.equal(p.weight, q.weight)
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["post_fl"]["epsilon"] == 3.0


def test_prompt_of_wrong_size_is_refused(tmp_path, tiny_dirs):
    save_prompt(SoftPrompt(torch.randn(4, 16)), tmp_path / "p", head="causal")
    with pytest.raises(PromptError, match="embedding size 16.*expects 32"):
        load_prompt(tmp_path / "p", expected_dim=32)
    m = load_scoring_model(tiny_dirs["causal"], LABELS)
    with pytest.raises(PromptError, match="embedding size"):
        m(m.encode(["good"]), SoftPrompt(torch.randn(2, 16)))


def test_broken_prompt_files(tmp_path):
    with pytest.raises(PromptError, match="no adapter_config.json"):
        load_prompt(tmp_path)
    save_prompt(SoftPrompt(torch.randn(2, 8)), tmp_path / "p", head="masked")
    (tmp_path / "p" / "adapter_config.json").write_text("{broken")
    with pytest.raises(PromptError, match="not valid JSON"):
        load_prompt(tmp_path / "p")
    with pytest.raises(PromptError, match="NaN"):
        save_prompt(torch.full((2, 8), float("nan")), tmp_path / "q", head="masked")
    assert not (tmp_path / "q" / "adapter_model.safetensors").exists()


def test_text_init_uses_token_embeddings(tiny_dirs):
    m = load_scoring_model(tiny_dirs["causal"], LABELS)
    ids = m._ids("good movie")
    p = init_from_text(m.word_embeddings, ids, 5)
    assert torch.equal(p.weight[0], m.word_embeddings[ids[0]]) and p.num_virtual_tokens == 5


def test_saved_prompt_loads_in_peft(tmp_path, tiny_dirs):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    m = load_scoring_model(tiny_dirs["causal"], LABELS)
    p = init_from_vocab(m.word_embeddings, 4, torch.Generator().manual_seed(1))
    cfg = m.backbone.config
    save_prompt(p, tmp_path / "adapter", head="causal", base_model=tiny_dirs["causal"],
                num_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads)
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["causal"])
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    loaded = model.get_prompt_embedding_to_save("default")
    assert torch.allclose(loaded, p.weight)
    # and PEFT's prompted forward runs on it
    ids = m.tokenizer("good movie", return_tensors="pt")
    assert model(**ids).logits.shape[1] == ids["input_ids"].shape[1] + 4


def test_classes_sharing_a_label_token_are_refused(tiny_dirs):
    with pytest.raises(ModelError, match="share the label token"):
        load_scoring_model(tiny_dirs["causal"], LABELS, label_words={"negative": ["bad"], "positive": ["bad"]})


def test_embedding_classes_that_tokenize_identically_are_refused(tiny_dirs):
    with pytest.raises(ModelError, match="tokenize identically"):
        load_scoring_model(tiny_dirs["embedding"], LABELS,
                           label_words={"negative": ["bad"], "positive": ["bad"]})


@pytest.mark.parametrize("kind", ["causal", "masked", "embedding"])
def test_label_word_unknown_to_the_tokenizer_is_refused(tiny_dirs, kind):
    with pytest.raises(ModelError, match="'zzzunknown' is unknown to the tokenizer"):
        load_scoring_model(tiny_dirs[kind], LABELS,
                           label_words={"negative": ["bad"], "positive": ["zzzunknown"]})
