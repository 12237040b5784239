import pytest
import torch

from post_fl.core.config import DistillConfig, TransferConfig, TuneConfig
from post_fl.core.data import DataError
from post_fl.method.distill import distill_student
from post_fl.method.student import make_student, select_layers, student_with_layers
from post_fl.method.student_cache import save_student
from post_fl.core.models import load_scoring_model
from post_fl.core.prompt import init_from_vocab
from post_fl.method.transfer import kl_at_temperature, post_transfer_loss, transfer_prompt
from post_fl.method.tuning import tune_prompt

from conftest import make_sentiment

LABELS = ["negative", "positive"]


def test_post_loss_is_zero_for_identical_models_and_mixes_with_alpha():
    torch.manual_seed(0)
    a, b = torch.randn(4, 10), torch.randn(4, 10)
    loss, parts = post_transfer_loss(a, b, a, b, alpha=0.5, temperature=2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    c, d = torch.randn(4, 10), torch.randn(4, 10)
    l0, p = post_transfer_loss(a, b, c, d, alpha=0.0, temperature=2.0)
    l1, _ = post_transfer_loss(a, b, c, d, alpha=1.0, temperature=2.0)
    assert l0.item() == pytest.approx(p["output_kl"]) and l1.item() == pytest.approx(p["change_kl"])
    assert l0.item() == pytest.approx(kl_at_temperature(a, c, 2.0).item())


@pytest.mark.parametrize("kind", ["causal", "masked", "embedding"])
def test_transfer_loss_decreases_on_public_data(tiny_dirs, kind):
    teacher = load_scoring_model(tiny_dirs[kind], LABELS)
    student, _ = distill_student(teacher, make_sentiment(40, seed=3), DistillConfig(num_layers=2, steps=5,
                                                                                    batch_size=8))
    prompt = init_from_vocab(student.word_embeddings, 3, torch.Generator().manual_seed(0))
    tune_prompt(student, prompt, make_sentiment(32, seed=4), TuneConfig(epochs=2, batch_size=8, dp=False, lr=0.2))
    result = transfer_prompt(student, prompt, teacher, make_sentiment(48, seed=5),
                             TransferConfig(steps=60, batch_size=48, lr=0.2, init="vocab"), seed=0)
    first = sum(result.losses[:3]) / 3
    last = sum(result.losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)


def test_transfer_refuses_empty_public_data(tiny_dirs):
    teacher = load_scoring_model(tiny_dirs["masked"], LABELS)
    prompt = init_from_vocab(teacher.word_embeddings, 2)
    with pytest.raises(DataError, match="public"):
        transfer_prompt(teacher, prompt, teacher, make_sentiment(4).subset([]), TransferConfig(steps=1))


def test_student_keeps_width_and_evenly_spaced_layers(tiny_dirs):
    assert select_layers(6, 2) == [0, 5] and select_layers(6, 3) == [0, 2, 5] and select_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        select_layers(4, 5)
    teacher = load_scoring_model(tiny_dirs["causal"], LABELS)
    student, kept = make_student(teacher.backbone, 2)
    assert kept == [0, 3] and student.config.num_hidden_layers == 2
    assert len(student.transformer.h) == 2 and len(teacher.backbone.transformer.h) == 4
    assert torch.equal(student.transformer.h[1].mlp.c_fc.weight, teacher.backbone.transformer.h[3].mlp.c_fc.weight)
    chosen = student_with_layers(teacher.backbone, [1, 2])  # any layer choice, e.g. by block influence
    assert chosen.config.num_hidden_layers == 2
    assert torch.equal(chosen.transformer.h[0].mlp.c_fc.weight, teacher.backbone.transformer.h[1].mlp.c_fc.weight)
    for bad in ([], [2, 1], [1, 1], [0, 4]):
        with pytest.raises(ValueError, match="distinct increasing indices in 0..3"):
            student_with_layers(teacher.backbone, bad)


@pytest.mark.parametrize("kind", ["causal", "masked", "embedding"])
def test_distillation_trains_saves_and_reloads(tiny_dirs, kind, tmp_path):
    teacher = load_scoring_model(tiny_dirs[kind], LABELS)
    emb_before = teacher.word_embeddings.detach().clone()
    student, report = distill_student(teacher, make_sentiment(64, seed=2),
                                      DistillConfig(num_layers=2, steps=25, batch_size=16, lr=2e-3))
    assert report.parameter_ratio < 0.75
    assert sum(report.losses[-5:]) < sum(report.losses[:5])
    assert torch.equal(student.word_embeddings, emb_before)  # prompts live in the same embedding space
    save_student(student, tmp_path / "s", report)
    again = load_scoring_model(str(tmp_path / "s"), LABELS, head=kind)
    assert again.backbone.config.num_hidden_layers == 2
    assert (tmp_path / "s" / "distill_report.json").is_file()
    batch = again.encode(["good movie"])
    assert torch.allclose(again(batch), student(batch), atol=1e-5)


@pytest.mark.parametrize("space", ["vocab", "classes"])
def test_transfer_space_chooses_the_outputs_the_loss_compares(tiny_dirs, space):
    teacher = load_scoring_model(tiny_dirs["causal"], LABELS)
    student, _ = distill_student(teacher, make_sentiment(24, seed=3), DistillConfig(num_layers=2, steps=2,
                                                                                    batch_size=8))
    prompt = init_from_vocab(student.word_embeddings, 3, torch.Generator().manual_seed(0))
    public = make_sentiment(12, seed=5)
    cfg = TransferConfig(steps=1, batch_size=len(public), lr=0.1, init="student", space=space, alpha=0.5,
                         heldout_fraction=0.0, center_change=False)  # every text in the one batch
    result = transfer_prompt(student, prompt, teacher, public, cfg, seed=0)
    s_b, t_b = student.encode(public.texts), teacher.encode(public.texts)
    with torch.no_grad():
        outs = {}
        for name, f in (("vocab", lambda m, b, p=None: m.answer_logits(b, p)),
                        ("classes", lambda m, b, p=None: m(b, p))):
            outs[name] = post_transfer_loss(f(teacher, t_b, prompt), f(teacher, t_b), f(student, s_b, prompt),
                                            f(student, s_b), 0.5, cfg.temperature)[0].item()
    other = "classes" if space == "vocab" else "vocab"
    assert result.losses[0] == pytest.approx(outs[space], rel=1e-4)
    assert abs(outs[space] - outs[other]) > 1e-3  # the two spaces give different losses here


def test_transfer_space_is_validated():
    from post_fl.core.config import ConfigError

    with pytest.raises(ConfigError, match="transfer.space"):
        TransferConfig(space="logits").validate()
