"""Deep prompts (post_fl/core/deep_prompt.py): equivalence at init, hooks, per-example gradients, DP-SGD,
the saved format, the config setting."""

import copy
import json

import pytest
import torch

from post_fl.core.config import ConfigError, PromptConfig, RunConfig, TuneConfig
from post_fl.core.deep_prompt import (DEEP_PEFT_TYPE, NEUTRAL_TEXT, DeepPrompt, as_input_prompt,
                                      deep_prompt_from_input, install_deep_prompt_hooks, load_any_prompt,
                                      load_deep_prompt, new_prompt, prompt_with_weight, remove_deep_prompt_hooks,
                                      save_any_prompt, save_deep_prompt)
from post_fl.core.models import load_scoring_model
from post_fl.core.prompt import PromptError, SoftPrompt, init_from_vocab, load_prompt
from post_fl.method.tuning import PromptedClassifier, encode_dataset, tune_prompt

LABELS = ["negative", "positive"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _deep(m, tokens=3, seed=0):
    soft = init_from_vocab(m.word_embeddings, tokens, torch.Generator().manual_seed(seed))
    return soft, deep_prompt_from_input(m, soft)


def _hooks(m):
    layers = install_deep_prompt_hooks(m.backbone)
    return sum(len(layer._forward_pre_hooks) for layer in layers)


@pytest.mark.parametrize("kind", ["causal", "masked", "embedding"])
def test_deep_prompt_at_init_is_its_input_prompt(tiny_dirs, kind, sentiment):
    """Made from the model's own states, the deep prompt gives the input prompt's class scores: on every text
    for a causal model (its prompt positions see only the prompt), on the neutral text for an encoder."""
    m = load_scoring_model(tiny_dirs[kind], LABELS)
    soft, deep = _deep(m)
    assert deep.weight.shape == (4, 3, m.embedding_dim) and deep.scales.shape == (4,)
    texts = sentiment.texts[:6] if kind == "causal" else [NEUTRAL_TEXT]
    batch = m.encode(texts)
    with torch.no_grad():
        assert torch.allclose(m(batch, deep), m(batch, soft), atol=1e-5)
        assert not torch.allclose(m(batch, deep), m(batch), atol=1e-3)  # and the prompt does something
    # the stored weight is in units of each layer's RMS; its layer-0 slice is the input prompt exactly
    assert torch.allclose(deep.vectors(), deep.weight * deep.scales[:, None, None])
    assert torch.allclose(as_input_prompt(deep).weight, soft.weight, atol=1e-6)
    assert as_input_prompt(soft) is soft
    rms = deep.weight[1:].pow(2).mean(dim=(1, 2)).sqrt()
    assert ((rms > 0.05) & (rms < 20)).all()  # order one in its own units, whatever the layer's scale


def test_deep_prompt_steers_every_layer_not_only_the_input(tiny_dirs, sentiment):
    m = load_scoring_model(tiny_dirs["causal"], LABELS)
    _, deep = _deep(m)
    batch = m.encode(sentiment.texts[:4])
    moved = deep.with_weight(deep.weight.detach().clone())
    with torch.no_grad():
        # change layer 2's vectors only (not by a constant: LayerNorm would remove it); layer 0 is untouched
        moved.weight[2] += torch.randn(moved.weight[2].shape, generator=torch.Generator().manual_seed(0))
        assert torch.equal(moved.input_prompt().weight, deep.input_prompt().weight)
        assert not torch.allclose(m(batch, moved), m(batch, deep), atol=1e-4)


def test_hooks_are_idempotent_inactive_without_a_deep_prompt_and_removable(tiny_dirs, sentiment):
    m = load_scoring_model(tiny_dirs["causal"], LABELS)
    batch = m.encode(sentiment.texts[:4])
    _, deep = _deep(m)
    with torch.no_grad():
        plain = m(batch)
        prompted = m(batch, deep)
        assert _hooks(m) == 4 and _hooks(m) == 4  # one per layer, however often installed
        assert torch.equal(m(batch), plain)  # installed hooks do nothing in an unprompted forward
        soft = SoftPrompt(torch.randn(3, m.embedding_dim))
        copy_of = copy.deepcopy(m)  # a deep copy (e.g. a student) carries working hooks
        assert torch.allclose(copy_of(batch, deep), prompted, atol=1e-6)
        assert torch.allclose(copy_of(batch, soft), m(batch, soft), atol=1e-6)
        assert remove_deep_prompt_hooks(m.backbone) == 4 and remove_deep_prompt_hooks(m.backbone) == 0
        assert sum(len(layer._forward_pre_hooks) for layer in m.backbone.transformer.h) == 0
        assert torch.equal(m(batch), plain)
        assert torch.allclose(m(batch, deep), prompted, atol=1e-6)  # a deep forward puts them back


def test_a_deep_prompt_for_another_model_is_refused(tiny_dirs):
    m = load_scoring_model(tiny_dirs["masked"], LABELS)
    batch = m.encode(["good film"])
    with pytest.raises(PromptError, match="3 layers but the model .* has 4 transformer layers"):
        m(batch, DeepPrompt(torch.randn(3, 2, m.embedding_dim), torch.ones(3)))
    with pytest.raises(PromptError, match="width 16"):
        m(batch, DeepPrompt(torch.randn(4, 2, 16), torch.ones(4)))
    with pytest.raises(PromptError, match="num_layers, num_virtual_tokens, dim"):
        DeepPrompt(torch.randn(2, 16), torch.ones(2))
    with pytest.raises(PromptError, match="one entry per layer"):
        DeepPrompt(torch.randn(4, 2, 16), torch.ones(3))


@pytest.mark.parametrize("kind", ["causal", "masked", "embedding"])
def test_grad_sampler_equals_per_example_gradients_one_by_one(tiny_dirs, kind, sentiment):
    from opacus import GradSampleModule

    m = load_scoring_model(tiny_dirs[kind], LABELS)
    _, deep = _deep(m)
    with torch.no_grad():  # scales far from 1, so a grad sampler that forgot them would fail
        deep = DeepPrompt(deep.weight / torch.tensor([0.5, 3.0, 7.0, 0.2])[:, None, None],
                          deep.scales * torch.tensor([0.5, 3.0, 7.0, 0.2]))
    ids, mask, ans, y = encode_dataset(m, sentiment.head(5)).tensors
    gsm = GradSampleModule(PromptedClassifier(m, deep), loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(ids, mask, ans), y, reduction="sum").backward()
    per_example = deep.weight.grad_sample
    assert per_example.shape == (5, 4, 3, m.embedding_dim)
    ref = deep.with_weight(deep.weight.detach())
    net = PromptedClassifier(m, ref)
    for i in range(5):
        ref.weight.grad = None
        torch.nn.functional.cross_entropy(net(ids[i:i + 1], mask[i:i + 1], ans[i:i + 1]), y[i:i + 1]).backward()
        assert ref.weight.grad.abs().max() > 0
        assert torch.allclose(per_example[i], ref.weight.grad, atol=1e-6, rtol=1e-4), i
    gsm._close()


@pytest.fixture
def dp_steps(monkeypatch):
    """Wrap Opacus' DPOptimizer.add_noise: record the raw per-example gradients, the pre-noise sum and the
    noise of every DP-SGD step (as tests/test_dp_mechanisms.py does)."""
    from opacus.optimizers.optimizer import DPOptimizer

    original = DPOptimizer.add_noise
    steps: list[dict] = []

    def add_noise(self):
        (p,) = self.params
        raw = p.grad_sample.detach().clone()
        before = p.summed_grad.detach().clone()
        original(self)
        steps.append({"raw": raw, "summed": before, "noise": (p.grad.detach() - before.view_as(p.grad)).clone(),
                      "C": self.max_grad_norm, "sigma": self.noise_multiplier})

    monkeypatch.setattr(DPOptimizer, "add_noise", add_noise)
    return steps


def test_dp_sgd_on_a_deep_prompt_clips_each_example(tiny_dirs, sentiment, dp_steps):
    m = load_scoring_model(tiny_dirs["causal"], LABELS)
    _, deep = _deep(m)
    C, sigma = 1e-3, 1.3
    r = tune_prompt(m, deep, sentiment, TuneConfig(epochs=2, batch_size=8, max_grad_norm=C, target_epsilon=8.0),
                    noise_multiplier=sigma)
    assert len(dp_steps) == r.steps == 16
    batches = [s for s in dp_steps if len(s["raw"])]
    assert batches and all(s["raw"].shape[1:] == (4, 3, m.embedding_dim) for s in batches)
    assert max(float(s["raw"].flatten(1).norm(dim=1).max()) for s in batches) > 20 * C  # clipping binds
    for s in batches:
        norms = s["raw"].flatten(1).norm(dim=1)
        clipped = s["raw"] * (C / (norms + 1e-6)).clamp(max=1.0)[:, None, None, None]
        assert float(clipped.flatten(1).norm(dim=1).max()) <= C * (1 + 1e-5)  # each example's norm <= C
        assert torch.allclose(s["summed"], clipped.sum(0), atol=1e-9, rtol=1e-4)  # the sum Opacus noises
        assert float(s["summed"].norm()) <= len(s["raw"]) * C * (1 + 1e-5)
    noise = torch.cat([s["noise"].reshape(-1) for s in dp_steps]).double()
    assert float(noise.std()) == pytest.approx(sigma * C, rel=0.06)


def test_auto_clip_bound_follows_the_prompt_form(tiny_dirs, sentiment, dp_steps):
    """tune.max_grad_norm = "auto" (the default) clips a deep prompt at 0.25 and an input prompt at 1.0, and
    the noise scales with that C."""
    assert TuneConfig().max_grad_norm == "auto"
    assert (TuneConfig().clip_bound("deep"), TuneConfig().clip_bound("input")) == (0.25, 1.0)
    assert TuneConfig(max_grad_norm=0.7).clip_bound("deep") == 0.7
    m = load_scoring_model(tiny_dirs["causal"], LABELS)
    soft, deep = _deep(m)
    sigma = 1.1
    for prompt, expected in ((deep, 0.25), (soft, 1.0)):
        dp_steps.clear()
        r = tune_prompt(m, prompt, sentiment, TuneConfig(epochs=2, batch_size=8, target_epsilon=8.0),
                        noise_multiplier=sigma)
        assert dp_steps and {s["C"] for s in dp_steps} == {expected} and r.max_grad_norm == expected
        noise = torch.cat([s["noise"].reshape(-1) for s in dp_steps]).double()
        assert float(noise.std()) == pytest.approx(sigma * expected, rel=0.08)


@pytest.mark.parametrize("bad", ["big", 0, -1.0, "AUTO"])
def test_a_bad_clip_bound_is_refused(bad):
    with pytest.raises(ConfigError, match="tune.max_grad_norm: expected a number > 0 or \"auto\""):
        TuneConfig(max_grad_norm=bad).validate()


def test_removing_the_noise_changes_the_deep_prompt(tiny_dirs, sentiment):
    """The same insecure-seeded DP-SGD run with and without noise: noise must move the released prompt."""
    m = load_scoring_model(tiny_dirs["masked"], LABELS)
    _, start = _deep(m)
    cfg = TuneConfig(epochs=1, batch_size=8, max_grad_norm=0.05, target_epsilon=4.0)

    def run(sigma):
        p = start.with_weight(start.weight.detach())
        tune_prompt(m, p, sentiment, cfg, noise_multiplier=sigma, insecure_seed=5)
        return p.weight.detach()

    quiet, quiet_again, noisy = run(0.0), run(0.0), run(1.5)
    assert torch.equal(quiet, quiet_again)
    assert (quiet - start.weight).abs().max() > 1e-3  # training moved it
    assert (noisy - quiet).abs().max() > 1e-2


def test_plain_tuning_trains_the_deep_prompt_and_leaves_the_model_frozen(tiny_dirs, sentiment):
    m = load_scoring_model(tiny_dirs["embedding"], LABELS)
    before = copy.deepcopy(m.backbone.state_dict())
    _, deep = _deep(m)
    start, scales = deep.weight.detach().clone(), deep.scales.clone()
    r = tune_prompt(m, deep, sentiment, TuneConfig(epochs=1, batch_size=8, dp=False))
    assert r.prompt is deep and not torch.equal(start, deep.weight) and torch.equal(scales, deep.scales)
    after = m.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_and_load_round_trip_and_dispatch(tmp_path, tiny_dirs):
    m = load_scoring_model(tiny_dirs["causal"], LABELS)
    soft, deep = _deep(m)
    save_any_prompt(deep, tmp_path / "deep", head="causal", base_model="x", metadata={"epsilon": 2.0})
    cfg = json.loads((tmp_path / "deep" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == DEEP_PEFT_TYPE and (cfg["num_layers"], cfg["num_virtual_tokens"],
                                                    cfg["token_dim"]) == (4, 3, 32)
    assert not list((tmp_path / "deep").glob("*.tmp"))
    got, meta = load_any_prompt(tmp_path / "deep", expected_dim=32, expected_layers=4)
    assert isinstance(got, DeepPrompt) and torch.equal(got.weight, deep.weight) and torch.equal(got.scales, deep.scales)
    assert meta["post_fl"]["epsilon"] == 2.0 and meta["post_fl"]["prompt_form"] == "deep"
    save_any_prompt(soft, tmp_path / "soft", head="causal")
    again, meta = load_any_prompt(tmp_path / "soft", expected_dim=32, expected_layers=4)
    assert isinstance(again, SoftPrompt) and meta["peft_type"] == "PROMPT_TUNING"
    with pytest.raises(PromptError, match="peft_type is 'POST_FL_DEEP_PROMPT', expected 'PROMPT_TUNING'"):
        load_prompt(tmp_path / "deep")  # PEFT's format only
    with pytest.raises(PromptError, match="has 4 layers, but the model has 6"):
        load_deep_prompt(tmp_path / "deep", expected_layers=6)
    with pytest.raises(PromptError, match="width 32, but the model expects 16"):
        load_any_prompt(tmp_path / "deep", expected_dim=16)


def test_broken_deep_prompt_files_name_the_file_and_field(tmp_path):
    d = tmp_path / "p"
    save_deep_prompt(DeepPrompt(torch.randn(2, 3, 8), torch.ones(2)), d, head="masked")
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "num_virtual_tokens": 5}))
    with pytest.raises(PromptError, match=r"adapter_model.safetensors: weight has shape \(2, 3, 8\) but "
                                          r"adapter_config.json says num_layers, num_virtual_tokens, token_dim"):
        load_any_prompt(d)
    cfg_path.write_text(json.dumps({**cfg, "format_version": 9}))
    with pytest.raises(PromptError, match="adapter_config.json: format_version is 9, expected 1"):
        load_any_prompt(d)
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(PromptError, match="adapter_config.json: peft_type is 'PREFIX_TUNING', expected "
                                          "'PROMPT_TUNING' .* or 'POST_FL_DEEP_PROMPT'"):
        load_any_prompt(d)
    with pytest.raises(PromptError, match="NaN or Inf"):
        save_deep_prompt(DeepPrompt(torch.full((2, 3, 8), float("nan")), torch.ones(2)), tmp_path / "q", head="masked")
    assert not (tmp_path / "q" / "adapter_model.safetensors").exists()


def test_prompt_form_setting_is_checked_and_builds_the_form(tiny_dirs):
    with pytest.raises(ConfigError, match="prompt.form: expected one of auto, input, deep, got 'prefix'"):
        PromptConfig(form="prefix").validate()
    assert RunConfig().prompt.form == "auto"
    m = load_scoring_model(tiny_dirs["causal"], LABELS)
    # auto: deep on a causal LM (what the student frontier measured), input on the other heads
    assert isinstance(new_prompt(m, PromptConfig(num_virtual_tokens=2), seed=3), DeepPrompt)
    assert isinstance(new_prompt(load_scoring_model(tiny_dirs["masked"], LABELS), PromptConfig(num_virtual_tokens=2),
                                 seed=3), SoftPrompt)
    cfg = PromptConfig(num_virtual_tokens=2, form="deep")
    deep = new_prompt(m, cfg, seed=3)
    assert isinstance(deep, DeepPrompt) and deep.weight.shape == (4, 2, 32)
    assert isinstance(new_prompt(m, cfg, seed=3, form="input"), SoftPrompt)
    same = new_prompt(m, cfg, seed=3)
    assert torch.equal(same.weight, deep.weight) and torch.equal(same.scales, deep.scales)  # a function of the seed
    # rebuilt from a bare array (what crosses the wire) with the scales recomputed, not sent
    moved = deep.weight.detach().numpy() + 0.5
    rebuilt = prompt_with_weight(moved, m, cfg, seed=3)
    assert torch.equal(rebuilt.scales, deep.scales) and torch.allclose(rebuilt.weight, torch.from_numpy(moved))
    with pytest.raises(PromptError, match=r"prompt.form = 'deep' expects .* \(4, 2, 32\)"):
        prompt_with_weight(moved[0], m, cfg, seed=3)
    with pytest.raises(PromptError, match="prompt.form = 'input' expects"):
        prompt_with_weight(moved, m, PromptConfig(num_virtual_tokens=2, form="input"), seed=3)


def test_the_pipeline_tunes_a_deep_student_prompt_and_gives_the_teacher_input_prompts(tmp_path, tiny_dirs):
    """prompt.form = "deep": the student's prompt is deep (saved in its own format); the teacher's prompts
    (direct use = the layer-0 slice, transferred, the tuned baseline) are input prompts."""
    from conftest import make_sentiment
    from post_fl.cli import main
    from post_fl.core.data import write_text_file

    files = {name: write_text_file(make_sentiment(n, seed=s), tmp_path / f"{name}.csv")
             for name, n, s in (("train", 48, 1), ("test", 24, 2), ("public", 40, 3))}
    sets = {"model.teacher": f'"{tiny_dirs["causal"]}"', "data.train": f'"{files["train"]}"',
            "data.test": f'"{files["test"]}"', "data.public": f'"{files["public"]}"', "distill.steps": 3,
            "distill.batch_size": 8, "tune.epochs": 1, "tune.batch_size": 8, "tune.target_epsilon": 4,
            "transfer.steps": 3, "prompt.num_virtual_tokens": 2, "prompt.form": '"deep"',
            "transfer.init": '"vocab"'}  # the student-prompt start (layer-0 slice) is transfer.py's to take
    run = tmp_path / "run"
    args = ["--output-dir", str(run), "--quiet"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert main(["run"] + args) == 0
    student_layers = json.loads((run / "student" / "config.json").read_text())["n_layer"]
    prompt, cfg = load_any_prompt(run / "prompt_student", expected_dim=32, expected_layers=student_layers)
    assert isinstance(prompt, DeepPrompt) and prompt.weight.shape == (student_layers, 2, 32)
    for name in ("prompt_teacher", "prompt_teacher_tuned"):
        assert json.loads((run / name / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    results = json.loads((run / "results.json").read_text())
    assert {"student_private_prompt", "teacher_direct_prompt", "teacher_transferred_prompt",
            "teacher_tuned_prompt_nonprivate"} <= set(results["accuracy"])
    assert 0 < results["privacy"]["epsilon"] <= 4.02
