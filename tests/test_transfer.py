"""POST transfer: cached targets (exact at full vocabulary, top-k close), alpha = "auto", label-free
checkpoint selection on held-out public text, its settings, and the curve it writes."""

import logging
import math

import pytest
import torch

from post_fl.core.config import ConfigError, TransferConfig, config_from_dict, load_config
from post_fl.core.config_help import dumps_config
from post_fl.core.data import DataError, TextDataset
from post_fl.core.models import load_scoring_model
from post_fl.core.prompt import SoftPrompt, init_from_vocab
from post_fl.method.evaluate import predict
from post_fl.method.transfer_targets import compute_targets
from post_fl.method.transfer import (BestCheckpoint, auto_alpha, heldout_split, post_transfer_loss, transfer_prompt,
                                     write_curve_csv)

from conftest import build_tiny_model, make_sentiment

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny causal teacher, a smaller causal 'student' (same vocabulary) and a prompt on the student."""
    root = tmp_path_factory.mktemp("transfer")
    teacher = load_scoring_model(build_tiny_model("causal", root / "t"), LABELS)
    student = load_scoring_model(build_tiny_model("causal", root / "s", num_layers=2, seed=1), LABELS)
    prompt = init_from_vocab(student.word_embeddings, 3, torch.Generator().manual_seed(0))
    return student, teacher, prompt


def uncached_transfer(student, student_prompt, teacher, public, cfg, seed):
    """The transfer loop as it was before caching: every output of every batch recomputed at every step."""
    gen = torch.Generator().manual_seed(seed)
    prompt = SoftPrompt(student_prompt.weight.detach())
    optimizer = torch.optim.Adam(prompt.parameters(), lr=cfg.lr)
    s_enc, t_enc = student.encode(public.texts), teacher.encode(public.texts)
    losses = []
    for _ in range(cfg.steps):
        idx = torch.randperm(len(public), generator=gen)[:min(cfg.batch_size, len(public))]
        s_b, t_b = s_enc.rows(idx), t_enc.rows(idx)
        with torch.no_grad():
            s_p, s_0, t_0 = student.answer_logits(s_b, student_prompt), student.answer_logits(s_b), \
                teacher.answer_logits(t_b)
        loss, _ = post_transfer_loss(teacher.answer_logits(t_b, prompt), t_0, s_p, s_0, cfg.alpha, cfg.temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, prompt


def full_loss(student, student_prompt, teacher, prompt, texts, alpha, temperature):
    """POST's loss over ``texts`` at the whole vocabulary, computed directly (no cache)."""
    s_b, t_b = student.encode(texts), teacher.encode(texts)
    with torch.no_grad():
        return float(post_transfer_loss(teacher.answer_logits(t_b, prompt), teacher.answer_logits(t_b),
                                        student.answer_logits(s_b, student_prompt), student.answer_logits(s_b),
                                        alpha, temperature)[0])


# ------------------------------------------------------------------ cached targets
def test_cached_targets_at_full_vocabulary_give_the_uncached_losses_and_prompt(pair):
    student, teacher, prompt = pair
    public = make_sentiment(20, seed=5)
    cfg = TransferConfig(steps=6, batch_size=6, lr=0.3, target_top_k=0, heldout_fraction=0.0,
                         center_change=False)
    want_losses, want_prompt = uncached_transfer(student, prompt, teacher, public, cfg, seed=3)
    got = transfer_prompt(student, prompt, teacher, public, cfg, seed=3)
    assert got.losses == pytest.approx(want_losses, rel=1e-5, abs=1e-7)
    assert torch.allclose(got.prompt.weight, want_prompt.weight, atol=1e-5)
    assert got.best_step == cfg.steps and got.kept_mass == 1.0  # nothing held out: the last step's prompt


def test_the_student_runs_only_to_compute_the_targets_once(pair, monkeypatch):
    student, teacher, prompt = pair
    calls = {"student": 0, "teacher": 0}
    for name, model in (("student", student), ("teacher", teacher)):
        real = model.answer_logits

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(model, "answer_logits", counted)
    cfg = TransferConfig(steps=10, batch_size=4, heldout_fraction=0.0, eval_every=100)
    result = transfer_prompt(student, prompt, teacher, make_sentiment(24, seed=5), cfg, seed=0)
    target_batches = math.ceil(result.target_examples / cfg.batch_size)
    assert calls["student"] == 2 * target_batches  # prompted + plain, once per text, never per step
    assert calls["teacher"] == target_batches + cfg.steps  # plain once; one prompted pass per step
    assert result.seconds_targets > 0 and result.seconds_training > 0


def test_top_k_targets_approximate_the_full_loss_and_are_exact_at_the_vocabulary(pair):
    student, teacher, prompt = pair
    public = make_sentiment(16, seed=6)
    vocab = teacher.word_embeddings.shape[0]

    def first_loss(k):
        cfg = TransferConfig(steps=1, batch_size=len(public), target_top_k=k, heldout_fraction=0.0, alpha=0.5,
                             center_change=False)
        return transfer_prompt(student, prompt, teacher, public, cfg, seed=0)

    full = first_loss(0)
    assert full.losses[0] == pytest.approx(full_loss(student, prompt, teacher, prompt, public.texts, 0.5, 2.0),
                                           rel=1e-5)
    assert first_loss(vocab).losses == full.losses  # k >= V keeps every column: the same computation
    close, coarse = first_loss(vocab - 8), first_loss(8)
    assert 0.8 < close.kept_mass < 1.0 and coarse.kept_mass < close.kept_mass
    assert close.losses[0] == pytest.approx(full.losses[0], rel=0.03)  # most mass kept: within 3%
    assert close.losses[0] != full.losses[0]  # ... but truly cut
    assert abs(close.losses[0] - full.losses[0]) < abs(coarse.losses[0] - full.losses[0])


@pytest.mark.parametrize("space, top_k", [("vocab", 0), ("vocab", 16), ("classes", 0)])
def test_centred_change_removes_what_the_prompt_does_to_every_text_and_keeps_the_rest(pair, monkeypatch, space,
                                                                                       top_k):
    student, teacher, prompt = pair
    texts = make_sentiment(12, seed=7).texts
    s_enc, t_enc = student.encode(texts), teacher.encode(texts)
    real = student.answer_logits
    bias = torch.randn(teacher.word_embeddings.shape[0], generator=torch.Generator().manual_seed(1))
    per_text = torch.randn(len(texts), bias.shape[0], generator=torch.Generator().manual_seed(2))

    def run(center, with_text_part):  # a 'prompt' adding one bias to every text's logits (+ a part per batch row)
        def prompted(batch, p=None):
            out = real(batch, None)
            if p is None:
                return out
            return out + 3 * bias + (per_text[: len(out)] if with_text_part else 0)
        monkeypatch.setattr(student, "answer_logits", prompted)
        return compute_targets(student, prompt, teacher, s_enc, t_enc, space, top_k, 2.0, 64, center)

    def spread(tg):  # how far each text's target change is from a constant (which softmax ignores)
        return float((tg.student_prompted - tg.student_plain).std(-1).max())

    assert spread(run(False, False)) > 0.5   # uncentred: the bias is the whole change
    assert spread(run(True, False)) < 1e-4   # centred: a change every text shares is no change at all
    plain, centred = run(False, True), run(True, True)
    # one batch holds every text: the centred change differs from the uncentred one by one vector for all texts
    gap = (centred.student_prompted - centred.student_plain) - (plain.student_prompted - plain.student_plain)
    gap = gap - gap.mean(-1, keepdim=True)  # up to a constant per text
    if top_k == 0:
        assert torch.allclose(gap, gap[:1].expand_as(gap), atol=1e-4)
    assert spread(centred) > 0.1  # the part that differs between texts survives


def test_centred_transfer_loss_is_posts_loss_on_the_centred_student_outputs(pair):
    student, teacher, prompt = pair
    public = make_sentiment(10, seed=8)
    cfg = TransferConfig(steps=1, batch_size=len(public), target_top_k=0, heldout_fraction=0.0, alpha=0.5)
    assert cfg.center_change  # the default
    got = transfer_prompt(student, prompt, teacher, public, cfg, seed=0).losses[0]
    s_b, t_b = student.encode(public.texts), teacher.encode(public.texts)
    with torch.no_grad():
        s_p, s_0, t_0 = student.answer_logits(s_b, prompt), student.answer_logits(s_b), teacher.answer_logits(t_b)
        change = 2.0 * (torch.log_softmax(s_p / 2.0, -1) - torch.log_softmax(s_0 / 2.0, -1))
        centred = s_0 + change - change.mean(0, keepdim=True)
        want = post_transfer_loss(teacher.answer_logits(t_b, prompt), t_0, centred, s_0, 0.5, 2.0)[0].item()
        uncentred = post_transfer_loss(teacher.answer_logits(t_b, prompt), t_0, s_p, s_0, 0.5, 2.0)[0].item()
    assert got == pytest.approx(want, rel=1e-4)
    assert abs(got - uncentred) > 1e-3


# ------------------------------------------------------------------ alpha = "auto"
def test_auto_alpha_formula_and_bounds():
    assert auto_alpha(1.0, 2) == 0.0 and auto_alpha(0.5, 2) == 1.0 and auto_alpha(0.75, 2) == pytest.approx(0.5)
    assert auto_alpha(0.625, 4) == pytest.approx(0.5)  # chance is 1/4: (0.625 - 0.25) / 0.75 = 0.5
    assert auto_alpha(0.1, 2) == 1.0 and auto_alpha(0.1, 4) == 1.0  # below chance: clipped at 1
    for c in (2, 3, 5):
        values = [auto_alpha(a / 20, c) for a in range(21)]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert values == sorted(values, reverse=True)  # more agreement, less weight on the change
    with pytest.raises(ValueError, match="2 classes"):
        auto_alpha(0.5, 1)


def test_auto_alpha_uses_the_unprompted_agreement_and_is_recorded(pair):
    student, teacher, prompt = pair
    public = make_sentiment(20, seed=8)
    cfg = TransferConfig(steps=1, batch_size=len(public), alpha="auto", heldout_fraction=0.0)
    result = transfer_prompt(student, prompt, teacher, public, cfg, seed=0)
    agreement = float((predict(student, public.texts) == predict(teacher, public.texts)).float().mean())
    assert result.alpha_used == pytest.approx(auto_alpha(agreement, 2))
    fixed = transfer_prompt(student, prompt, teacher, public, TransferConfig(steps=1, alpha=0.3), seed=0)
    assert fixed.alpha_used == 0.3


# ------------------------------------------------------------------ selection on held-out public text
def test_best_checkpoint_keeps_the_lowest_score_and_the_earliest_tie():
    prompt = SoftPrompt(torch.zeros(2, 3))
    best = BestCheckpoint(prompt)
    for step, score in ((0, 3.0), (1, 1.0), (2, 2.0), (3, 1.0)):
        with torch.no_grad():
            prompt.weight.fill_(step)
        best.offer(step, score)
    best.restore()
    assert best.step == 1 and torch.equal(prompt.weight, torch.ones(2, 3))


def test_heldout_split_is_disjoint_seeded_and_refuses_to_hold_out_everything():
    train, held = heldout_split(40, 0.25, seed=0)
    assert len(held) == 10 and set(train.tolist()).isdisjoint(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(40))
    assert torch.equal(heldout_split(40, 0.25, seed=0)[1], held) and not torch.equal(heldout_split(40, 0.25, 1)[1], held)
    assert len(heldout_split(40, 0.0, 0)[1]) == 0 and len(heldout_split(3, 0.01, 0)[1]) == 1
    with pytest.raises(DataError, match="transfer.heldout_fraction"):
        heldout_split(1, 0.5, 0)


def test_selection_returns_the_prompt_of_the_lowest_heldout_loss_not_the_last(pair):
    _, teacher, _ = pair
    # the teacher as its own student, starting from the student's prompt: step 0's loss is ~0 and every
    # update (Adam normalises even rounding-sized gradients) moves away, so the best check is step 0
    prompt = init_from_vocab(teacher.word_embeddings, 3, torch.Generator().manual_seed(0))
    public = make_sentiment(16, seed=5)
    cfg = TransferConfig(steps=6, batch_size=4, lr=1.0, eval_every=1, heldout_fraction=0.25, target_top_k=0,
                         center_change=False)
    result = transfer_prompt(teacher, prompt, teacher, public, cfg, seed=0)
    held = [c["heldout_loss"] for c in result.curve]
    assert [c["step"] for c in result.curve] == list(range(7))
    assert held[-1] > held[0] + 1e-3  # the constructed case: training moved away from the best
    assert result.best_step == 0 and torch.equal(result.prompt.weight, prompt.weight)


def test_selected_prompt_has_the_lowest_heldout_loss_of_the_curve(pair):
    student, teacher, prompt = pair
    public = make_sentiment(24, seed=9)
    cfg = TransferConfig(steps=8, batch_size=6, lr=0.5, eval_every=3, heldout_fraction=0.25, target_top_k=0, alpha=0.5,
                         center_change=False)
    result = transfer_prompt(student, prompt, teacher, public, cfg, seed=2)
    assert [c["step"] for c in result.curve] == [0, 3, 6, 8]  # step 0, every eval_every, the last
    held = [c["heldout_loss"] for c in result.curve]
    assert result.best_step == result.curve[held.index(min(held))]["step"]
    _, held_rows = heldout_split(len(public), cfg.heldout_fraction, seed=2)
    texts = [public.texts[i] for i in held_rows.tolist()]
    assert result.heldout_examples == len(texts) == 6
    assert full_loss(student, prompt, teacher, result.prompt, texts, 0.5, 2.0) == pytest.approx(min(held), rel=1e-4)
    assert result.curve[0]["train_loss"] is None and result.curve[1]["train_loss"] == pytest.approx(
        sum(result.losses[:3]) / 3)


def test_heldout_check_reports_the_transferred_teachers_predictions_against_its_zero_shot(pair, caplog):
    """The label-free check: class shares and agreement are those of the returned prompt on the held-out texts
    (a prompt that shifted every prediction to one class shows as shares far from zero-shot's); the transfer
    logs it, whoever calls it."""
    student, teacher, prompt = pair
    public = make_sentiment(24, seed=9)
    cfg = TransferConfig(steps=6, batch_size=6, lr=0.5, eval_every=3, heldout_fraction=0.25, target_top_k=0)
    with caplog.at_level(logging.INFO, logger="post_fl.method.transfer"):
        result = transfer_prompt(student, prompt, teacher, public, cfg, seed=2)
    assert "transfer check on 6 held-out public texts" in caplog.text
    _, held_rows = heldout_split(len(public), cfg.heldout_fraction, seed=2)
    texts = [public.texts[i] for i in sorted(held_rows.tolist())]
    plain, prompted = predict(teacher, texts), predict(teacher, texts, result.prompt)
    check = result.heldout_check
    assert check["texts"] == len(texts) == 6
    assert bool((plain != prompted).any())  # the prompt changes some prediction: the check can tell the two apart
    assert check["agreement_with_zero_shot"] == pytest.approx(float((plain == prompted).float().mean()))
    assert check["class_shares_transferred"] == pytest.approx([float((prompted == c).float().mean()) for c in (0, 1)])
    assert check["class_shares_zero_shot"] == pytest.approx([float((plain == c).float().mean()) for c in (0, 1)])
    assert result.summary()["heldout_check"] == check
    no_heldout = transfer_prompt(student, prompt, teacher, public, TransferConfig(steps=2, heldout_fraction=0.0),
                                 seed=2)
    assert no_heldout.heldout_check is None


def test_selection_never_looks_at_validation_labels(pair):
    student, teacher, prompt = pair
    public, validation = make_sentiment(20, seed=5), make_sentiment(24, seed=7)
    flipped = TextDataset(validation.texts, [1 - y for y in validation.labels], validation.label_names)
    cfg = TransferConfig(steps=12, batch_size=4, lr=3.0, eval_every=2, heldout_fraction=0.25)
    runs = [transfer_prompt(student, prompt, teacher, public, cfg, seed=0, validation=v)
            for v in (validation, flipped, None)]
    accs = [[c["validation_accuracy"] for c in r.curve] for r in runs[:2]]
    assert len(set(accs[0])) > 1  # the reported accuracy varies along the curve ...
    assert accs[1] == pytest.approx([1 - a for a in accs[0]])  # ... and the labels were read to report it
    assert runs[2].curve[0]["validation_accuracy"] is None
    # yet the returned prompt is the same whatever the labels say, or without them
    assert runs[0].best_step == runs[1].best_step == runs[2].best_step
    assert torch.equal(runs[0].prompt.weight, runs[1].prompt.weight)
    assert torch.equal(runs[0].prompt.weight, runs[2].prompt.weight)


def test_zero_steps_compute_nothing(pair):
    student, teacher, prompt = pair
    result = transfer_prompt(student, prompt, teacher, make_sentiment(8), TransferConfig(steps=0, alpha="auto"))
    assert result.curve == [] and result.losses == [] and result.alpha_used is None and result.target_examples == 0
    assert torch.equal(result.prompt.weight, prompt.weight)


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("field, value", [
    ("steps", -1), ("batch_size", 0), ("lr", 0.0), ("alpha", 1.5), ("alpha", -0.1), ("alpha", "sometimes"),
    ("temperature", 0.0), ("init", "zeros"), ("space", "logits"), ("target_top_k", -1), ("eval_every", 0),
    ("heldout_fraction", 1.0), ("heldout_fraction", -0.1)])
def test_transfer_settings_are_validated_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"transfer.{field}: expected"):
        TransferConfig(**{field: value}).validate()


def test_alpha_reads_as_a_number_or_auto_from_toml_and_overrides(tmp_path):
    assert config_from_dict({"transfer": {"alpha": "auto"}}).transfer.alpha == "auto"
    assert config_from_dict({"transfer": {"alpha": 1}}).transfer.alpha == 1.0
    assert isinstance(config_from_dict({"transfer": {"alpha": 0.25}}).transfer.alpha, float)
    assert load_config(None, {"transfer.alpha": "0.75"}).transfer.alpha == 0.75
    with pytest.raises(ConfigError, match="transfer.alpha"):
        config_from_dict({"transfer": {"alpha": True}})
    with pytest.raises(ConfigError, match="transfer.alpha"):
        config_from_dict({"transfer": {"alpha": "often"}})
    cfg = config_from_dict({"transfer": {"alpha": "auto", "target_top_k": 64, "heldout_fraction": 0.1}})
    path = tmp_path / "c.toml"
    path.write_text(dumps_config(cfg))
    again = load_config(path).transfer
    assert (again.alpha, again.target_top_k, again.heldout_fraction) == ("auto", 64, 0.1)


# ------------------------------------------------------------------ the curve's files
def test_curve_csv_and_png_are_written(tmp_path):
    from post_fl.experiments.plots import plot_transfer_curve

    curve = [{"step": 0, "train_loss": None, "heldout_loss": 0.9, "validation_accuracy": 0.5},
             {"step": 5, "train_loss": 0.7, "heldout_loss": 0.6, "validation_accuracy": 0.6},
             {"step": 10, "train_loss": 0.5, "heldout_loss": 0.65, "validation_accuracy": None}]
    lines = write_curve_csv(curve, tmp_path / "c.csv").read_text().splitlines()
    assert lines == ["step,train_loss,heldout_loss,validation_accuracy", "0,,0.9,0.5", "5,0.7,0.6,0.6", "10,0.5,0.65,"]
    png = plot_transfer_curve(curve, tmp_path / "c.png", best_step=5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
