"""Teacher outputs computed once and cached; the distilled student cached; training stops at a target."""

import pytest
import torch

import post_fl.method.distill as distill
import post_fl.method.student_cache as student_cache
from post_fl.core.config import DistillConfig, load_config
from post_fl.core.data import DataError, TextDataset, write_text_file
from post_fl.method.distill import distill_student
from post_fl.method.student import student_layers
from post_fl.method.teacher_outputs import teacher_cache_key, teacher_outputs
from post_fl.core.models import load_scoring_model

from conftest import build_tiny_model, make_sentiment

LABELS = ["negative", "positive"]
WORDS = {"negative": ["bad"], "positive": ["good"]}


@pytest.fixture(scope="module")
def teacher(tiny_dirs):
    return load_scoring_model(tiny_dirs["causal"], LABELS, WORDS)


def test_teacher_outputs_are_cached_and_reused(teacher, tmp_path):
    texts = make_sentiment(20, seed=4).texts
    cfg = DistillConfig(positions_per_text=3)
    first, state = teacher_outputs(teacher, texts, cfg, 0, tmp_path)
    assert state == "miss" and len(list(tmp_path.glob("*.safetensors"))) == 1
    again, state = teacher_outputs(teacher, texts, cfg, 0, tmp_path)
    assert state == "hit"
    for name, t in first.tensors().items():
        assert torch.equal(t, again.tensors()[name]), name
    # column 0 is the answer position, and the cached hidden states give the teacher's own answer logits
    batch = teacher.encode(texts[:4])
    assert torch.equal(first.positions[:4, 0], batch.answer_index)
    logits = teacher._lm_head(first.hidden[:4, 0].float())
    assert torch.allclose(logits, teacher.answer_logits(batch), atol=0.05)
    _, state = teacher_outputs(teacher, texts, cfg, 0, None)
    assert state == "off"


def test_cache_key_changes_with_teacher_corpus_and_settings(teacher, tiny_dirs, tmp_path):
    texts = make_sentiment(12, seed=5).texts
    cfg = DistillConfig()
    key = teacher_cache_key(teacher, texts, cfg, 0)
    assert teacher_cache_key(teacher, texts, DistillConfig(), 0) == key
    assert teacher_cache_key(teacher, texts[:-1] + ["good"], cfg, 0) != key  # corpus
    assert teacher_cache_key(teacher, texts, DistillConfig(positions_per_text=2), 0) != key  # settings
    assert teacher_cache_key(teacher, texts, cfg, 1) != key
    other = load_scoring_model(build_tiny_model("causal", tmp_path / "other", seed=7), LABELS, WORDS)
    assert teacher_cache_key(other, texts, cfg, 0) != key  # teacher weights
    retemplated = load_scoring_model(tiny_dirs["causal"], LABELS, WORDS, template="{text} This text is")
    assert teacher_cache_key(retemplated, texts, cfg, 0) != key
    _, state = teacher_outputs(teacher, texts, cfg, 0, tmp_path / "c")
    _, state2 = teacher_outputs(other, texts, cfg, 0, tmp_path / "c")
    assert (state, state2) == ("miss", "miss")


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all"])
def test_a_bad_cache_file_is_an_error_naming_it(teacher, tmp_path, content):
    texts = make_sentiment(8, seed=6).texts
    cfg = DistillConfig()
    path = tmp_path / f"{teacher_cache_key(teacher, texts, cfg, 0)}.safetensors"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{path.name}.*unreadable.*delete it"):
        teacher_outputs(teacher, texts, cfg, 0, tmp_path)


def test_a_cache_file_of_another_key_is_refused(teacher, tmp_path):
    texts_a, texts_b = make_sentiment(8, seed=6).texts, make_sentiment(8, seed=7).texts
    cfg = DistillConfig()
    teacher_outputs(teacher, texts_a, cfg, 0, tmp_path)
    a = tmp_path / f"{teacher_cache_key(teacher, texts_a, cfg, 0)}.safetensors"
    b = tmp_path / f"{teacher_cache_key(teacher, texts_b, cfg, 0)}.safetensors"
    a.rename(b)
    with pytest.raises(DataError, match="another key"):
        teacher_outputs(teacher, texts_b, cfg, 0, tmp_path)


def test_training_stops_at_the_agreement_target(teacher, monkeypatch):
    """Scripted agreement values: below target at the start and at step 2, reached at step 4."""
    values = iter([(0.5, 0.1), (0.6, 0.2), (0.95, 0.3), (0.95, 0.3)])
    monkeypatch.setattr(distill, "agreement_with_outputs", lambda student, held, batch_size=32: next(values))
    cfg = DistillConfig(num_layers=2, steps=100, batch_size=4, eval_every=2, target_agreement=0.9)
    _, report = distill_student(teacher, make_sentiment(16, seed=8), cfg)
    assert report.steps == 4 and report.stopped_by == "target" and report.agreement_after == 0.95
    assert [c["step"] for c in report.curve] == [0, 2, 4]


def test_training_stops_at_the_time_budget_or_the_step_limit(teacher, monkeypatch):
    public = make_sentiment(16, seed=9)
    monkeypatch.setattr(distill, "agreement_with_outputs", lambda student, held, batch_size=32: (0.5, 0.1))
    cfg = DistillConfig(num_layers=2, steps=50, batch_size=4, eval_every=10, target_agreement=0.9,
                        time_budget_s=1e-9)
    _, report = distill_student(teacher, public, cfg)
    assert report.stopped_by == "time_budget" and report.steps == 1
    _, report = distill_student(teacher, public, DistillConfig(num_layers=2, steps=3, batch_size=4))
    assert report.stopped_by == "max_steps" and report.steps == 3 and len(report.losses) == 3
    monkeypatch.undo()
    _, report = distill_student(teacher, public, DistillConfig(num_layers=2, target_agreement=0.0, eval_every=2))
    assert report.stopped_by == "target" and report.steps == 2  # the first check follows eval_every steps


def _scripted_agreements(values, snapshots):
    """An agreement_with_outputs stand-in returning ``values`` in turn and keeping a copy of the weights it saw."""
    it = iter(values)

    def fake(student, held, batch_size=32):
        snapshots.append({k: v.detach().clone() for k, v in student.backbone.state_dict().items()})
        return next(it)
    return fake


@pytest.mark.parametrize("objective,keep_best,best_step", [("template", True, 2), ("lm", True, 4),
                                                         ("template", False, 6), ("lm", False, 6)])
def test_keep_best_ends_with_the_weights_of_the_best_check(teacher, monkeypatch, objective, keep_best, best_step):
    """Checks at steps 0, 2, 4, 6 score (class, next-token) agreement (0.5, 0.1), (0.8, 0.2), (0.6, 0.4),
    (0.6, 0.3): keep_best ends with the best check of what the objective trains (template: class, step 2;
    lm: next token, step 4), else with step 6's weights. Step 0 (the untrained copy) can win only on its merits."""
    snaps: list[dict] = []
    monkeypatch.setattr(distill, "agreement_with_outputs", _scripted_agreements(
        [(0.5, 0.1), (0.8, 0.2), (0.6, 0.4), (0.6, 0.3), (0.7, 0.3)], snaps))
    cfg = DistillConfig(num_layers=2, steps=6, batch_size=4, eval_every=2, target_agreement=0.95, lr=1e-2,
                        keep_best=keep_best, objective=objective)
    student, report = distill_student(teacher, make_sentiment(16, seed=8), cfg)
    final = student.backbone.state_dict()
    same_as = [all(torch.equal(final[k], snap[k]) for k in final) for snap in snaps[:4]]
    assert report.steps == 6 and report.best_step == best_step
    assert same_as == [step == best_step for step in (0, 2, 4, 6)]


def test_an_lm_distillation_never_falls_back_to_the_untrained_copy_on_class_agreement(teacher, monkeypatch):
    """The failure this rule fixes: the copy agrees more on classes (0.59) than any trained check (0.51) while
    every trained check predicts the teacher's next token better; the lm objective keeps the trained weights."""
    snaps: list[dict] = []
    monkeypatch.setattr(distill, "agreement_with_outputs", _scripted_agreements(
        [(0.59, 0.05), (0.5, 0.25), (0.51, 0.29), (0.51, 0.29)], snaps))
    cfg = DistillConfig(num_layers=2, steps=4, batch_size=4, eval_every=2, lr=1e-2, objective="lm")
    _, report = distill_student(teacher, make_sentiment(16, seed=8), cfg)
    assert report.best_step == 4 and report.next_token_agreement_after == 0.29


def test_linear_schedule_warms_up_and_decays_to_the_first_limit():
    cfg = DistillConfig(lr=1e-3, warmup_steps=10, steps=1000, time_budget_s=100.0)
    lr = distill.distill_learning_rate
    assert lr(cfg, 0, 0.0) == pytest.approx(1e-4)  # step 1 of 10 of the warm-up
    assert lr(cfg, 9, 0.0) == pytest.approx(1e-3 * (1 - 9 / 1000))
    assert lr(cfg, 100, 50.0) == pytest.approx(0.5e-3)  # half the time budget spent: half the peak
    assert lr(cfg, 500, 10.0) == pytest.approx(0.5e-3)  # half the steps done: the step limit leads
    assert lr(cfg, 999, 100.0) == pytest.approx(1e-5)  # the 1% floor at the end
    constant = DistillConfig(lr=1e-3, lr_schedule="constant")
    assert lr(constant, 0, 0.0) == lr(constant, 500, 99.0) == 1e-3
    for bad, msg in (({"lr_schedule": "cosine"}, "distill.lr_schedule"), ({"warmup_steps": -1}, "distill.warmup_steps"),
                     ({"lr": 0.0}, "distill.lr")):
        with pytest.raises(Exception, match=msg):
            DistillConfig(**bad).validate()


def test_report_gives_both_agreements_and_validation(teacher):
    val = make_sentiment(10, seed=10)
    _, report = distill_student(teacher, make_sentiment(16, seed=11), DistillConfig(num_layers=2, steps=2,
                                                                                    batch_size=4),
                                validation=val)
    d = report.to_dict()
    for key in ("agreement_after", "next_token_agreement_after", "validation_agreement_after", "stopped_by"):
        assert d[key] is not None, key
    assert 0 <= d["validation_agreement_after"] <= 1 and 0 <= d["next_token_agreement_after"] <= 1


def _pipeline(tmp_path, tiny_dirs, **over):
    from post_fl.pipeline import Pipeline

    write_text_file(make_sentiment(40, seed=1), tmp_path / "train.csv")
    write_text_file(make_sentiment(16, seed=2), tmp_path / "test.csv")
    write_text_file(TextDataset(make_sentiment(30, seed=3).texts, [], []), tmp_path / "public.jsonl")
    sets = {"model.teacher": tiny_dirs["causal"], "model.label_words": WORDS, "data.train": str(tmp_path / "train.csv"),
            "data.test": str(tmp_path / "test.csv"), "data.public": str(tmp_path / "public.jsonl"),
            "distill.steps": 2, "distill.batch_size": 4, **over}
    return Pipeline(load_config(None, sets), tmp_path / over.get("_run", "run"))


def test_pipeline_reuses_the_cached_student_and_redistils_when_settings_change(tmp_path, tiny_dirs, monkeypatch):
    monkeypatch.setenv("POST_FL_CACHE", str(tmp_path / "cache"))
    first = _pipeline(tmp_path, tiny_dirs).distill()
    assert first["student_cache"] == "miss" and first["teacher_output_cache"] == "miss"
    second = _pipeline(tmp_path, tiny_dirs).distill()
    assert second["student_cache"] == "hit" and second["student_cache_dir"] == first["student_cache_dir"]
    assert (tmp_path / "run" / "student" / "config.json").is_file()
    changed = _pipeline(tmp_path, tiny_dirs, **{"distill.lr": 1e-3}).distill()
    assert changed["student_cache"] == "miss" and changed["student_cache_dir"] != first["student_cache_dir"]
    assert changed["teacher_output_cache"] == "hit"  # lr does not change the teacher's outputs
    off = _pipeline(tmp_path, tiny_dirs, **{"distill.cache": False}).distill()
    assert off["student_cache"] == "off"


def test_an_incomplete_cached_student_is_an_error(tmp_path, tiny_dirs, monkeypatch):
    monkeypatch.setenv("POST_FL_CACHE", str(tmp_path / "cache"))
    first = _pipeline(tmp_path, tiny_dirs).distill()
    from pathlib import Path

    (Path(first["student_cache_dir"]) / "distill_report.json").unlink()
    with pytest.raises(DataError, match="cached student is incomplete"):
        _pipeline(tmp_path, tiny_dirs).distill()


def test_cached_or_distilled_student_distils_once_and_is_shared(teacher, tmp_path, monkeypatch):
    from post_fl.method.student_cache import cached_or_distilled_student

    public = make_sentiment(30, seed=6)
    cfg = DistillConfig(num_layers=2, steps=2, batch_size=8, positions_per_text=2)
    root = tmp_path / "students"
    d1, student, rep, state = cached_or_distilled_student(teacher, public, cfg, 0, root)
    assert state == "miss" and student is not None and d1.parent == root and (d1 / "distill_report.json").is_file()
    assert rep["steps"] == 2
    calls = []
    monkeypatch.setattr(student_cache, "distill_student", lambda *a, **k: calls.append(1))
    d2, student2, rep2, state2 = cached_or_distilled_student(teacher, public, cfg, 0, root)
    assert (state2, d2, student2, calls) == ("hit", d1, None, []) and rep2["steps"] == 2
    # other settings are another student
    monkeypatch.undo()
    d3, _, _, state3 = cached_or_distilled_student(teacher, public, DistillConfig(num_layers=2, steps=3, batch_size=8,
                                                                                  positions_per_text=2), 0, root)
    assert state3 == "miss" and d3 != d1
    # the schedule is part of the student's identity, legacy values included
    keys = {student_cache.student_cache_key(teacher, public, None, DistillConfig(lr_schedule=sch, warmup_steps=w), 0)
            for sch, w in (("linear", 20), ("constant", 20), ("constant", 0), ("linear", 0))}
    assert len(keys) == 4
    _, s4, _, state4 = cached_or_distilled_student(teacher, public, cfg, 0, None)
    assert state4 == "off" and s4 is not None


def test_the_student_cache_key_names_the_layer_count_not_the_auto_rule(teacher):
    """distill.num_layers = 0 ("auto") and the count that rule gives are one student; another count is another,
    so a change of the auto rule can never hand out a cached student of the old depth."""
    public = make_sentiment(12, seed=8)
    auto = student_layers(teacher, DistillConfig())
    assert auto == max(1, round(teacher.backbone.config.num_hidden_layers * 0.4))

    def key(n):
        return student_cache.student_cache_key(teacher, public, None, DistillConfig(num_layers=n), 0)

    assert key(0) == key(auto)
    assert key(auto + 1) != key(0)
