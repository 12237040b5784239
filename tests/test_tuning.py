import copy
import math

import pytest
import torch

from post_fl.core.config import ConfigError, TuneConfig
from post_fl.core.data import DataError
from post_fl.core.models import load_scoring_model
from post_fl.core.prompt import SoftPrompt, init_from_vocab
from post_fl.method.tuning import PromptedClassifier, encode_dataset, tune_prompt
from post_fl.privacy.accounting import calibrate_noise_multiplier, epsilon_from_history, resolve_delta

LABELS = ["negative", "positive"]


@pytest.mark.parametrize("kind", ["causal", "masked", "embedding"])
def test_per_example_prompt_grads_equal_a_brute_force_loop(tiny_dirs, kind, sentiment):
    from opacus import GradSampleModule

    m = load_scoring_model(tiny_dirs[kind], LABELS)
    prompt = init_from_vocab(m.word_embeddings, 3, torch.Generator().manual_seed(0))
    ds = encode_dataset(m, sentiment.head(6))
    ids, mask, ans, y = ds.tensors
    gsm = GradSampleModule(PromptedClassifier(m, prompt), loss_reduction="sum")
    loss = torch.nn.functional.cross_entropy(gsm(ids, mask, ans), y, reduction="sum")
    loss.backward()
    per_example = prompt.weight.grad_sample
    assert per_example.shape == (6, 3, m.embedding_dim)
    ref_prompt = SoftPrompt(prompt.weight.detach())
    net = PromptedClassifier(m, ref_prompt)
    for i in range(6):
        ref_prompt.weight.grad = None
        torch.nn.functional.cross_entropy(net(ids[i:i + 1], mask[i:i + 1], ans[i:i + 1]), y[i:i + 1]).backward()
        assert torch.allclose(per_example[i], ref_prompt.weight.grad, atol=1e-6), i


def test_frozen_model_is_untouched_by_dp_tuning(tiny_dirs, sentiment):
    m = load_scoring_model(tiny_dirs["masked"], LABELS)
    before = copy.deepcopy(m.backbone.state_dict())
    prompt = init_from_vocab(m.word_embeddings, 3, torch.Generator().manual_seed(0))
    start = prompt.weight.detach().clone()
    tune_prompt(m, prompt, sentiment, TuneConfig(epochs=1, batch_size=8, target_epsilon=4))
    after = m.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(start, prompt.weight)


def test_reported_epsilon_matches_the_accountant_and_target(tiny_dirs, sentiment):
    m = load_scoring_model(tiny_dirs["embedding"], LABELS)
    prompt = init_from_vocab(m.word_embeddings, 2, torch.Generator().manual_seed(0))
    cfg = TuneConfig(epochs=2, batch_size=8, target_epsilon=3.0)
    r = tune_prompt(m, prompt, sentiment, cfg)
    assert r.delta == pytest.approx(min(1e-5, 1 / (10 * len(sentiment))))
    assert r.epsilon == pytest.approx(epsilon_from_history(r.accountant_history, r.delta), rel=1e-9)
    assert r.epsilon <= 3.0 + 0.02 and r.epsilon > 2.5
    assert r.accountant_history == [[r.noise_multiplier, r.sample_rate, r.steps]]
    assert r.steps == math.ceil(2 * len(sentiment) / 8)


def test_epsilon_composes_across_calls_with_a_carried_history(tiny_dirs, sentiment):
    m = load_scoring_model(tiny_dirs["embedding"], LABELS)
    prompt = init_from_vocab(m.word_embeddings, 2, torch.Generator().manual_seed(0))
    cfg = TuneConfig(epochs=1, batch_size=8, target_epsilon=4.0)
    steps = math.ceil(len(sentiment) / 8)
    sigma = calibrate_noise_multiplier(cfg, len(sentiment), total_steps=3 * steps)
    history, eps = [], []
    for r_ in range(3):
        r = tune_prompt(m, prompt, sentiment, cfg, seed=r_, accountant_history=history, noise_multiplier=sigma)
        history = r.accountant_history
        eps.append(r.epsilon)
    assert eps[0] < eps[1] < eps[2] <= 4.0 + 0.02  # three rounds spend the whole budget, not three budgets
    assert eps[2] > 3.5


def test_prv_accountant_is_supported(tiny_dirs, sentiment):
    m = load_scoring_model(tiny_dirs["embedding"], LABELS)
    prompt = init_from_vocab(m.word_embeddings, 2, torch.Generator().manual_seed(0))
    r = tune_prompt(m, prompt, sentiment, TuneConfig(epochs=1, batch_size=8, target_epsilon=2.0, accountant="prv"))
    assert 1.5 < r.epsilon <= 2.05


def test_empty_poisson_batches_still_step(tiny_dirs, sentiment):
    # with batch_size 1 on 64 examples about a third of Poisson batches are empty
    m = load_scoring_model(tiny_dirs["embedding"], LABELS)
    prompt = init_from_vocab(m.word_embeddings, 2, torch.Generator().manual_seed(0))
    r = tune_prompt(m, prompt, sentiment.head(8), TuneConfig(epochs=3, batch_size=1, target_epsilon=8.0))
    assert r.steps == 24 and math.isfinite(r.epsilon)


def test_non_private_tuning_learns_and_is_seeded(tiny_dirs, sentiment):
    m = load_scoring_model(tiny_dirs["masked"], LABELS)
    cfg = TuneConfig(epochs=4, batch_size=8, dp=False, lr=0.1)
    runs = []
    for _ in range(2):
        prompt = init_from_vocab(m.word_embeddings, 4, torch.Generator().manual_seed(0))
        r = tune_prompt(m, prompt, sentiment, cfg, seed=5)
        runs.append(prompt.weight.detach().clone())
        assert math.isinf(r.epsilon) and r.noise_multiplier == 0
    assert torch.equal(runs[0], runs[1])


def test_bad_inputs(tiny_dirs, sentiment):
    m = load_scoring_model(tiny_dirs["masked"], LABELS)
    with pytest.raises(ValueError, match="embedding size 8"):
        tune_prompt(m, SoftPrompt(torch.zeros(2, 8)), sentiment, TuneConfig())
    with pytest.raises(DataError, match="empty"):
        tune_prompt(m, init_from_vocab(m.word_embeddings, 2), sentiment.subset([]), TuneConfig())
    other = sentiment.subset(range(4))
    other.label_names = ["neg", "pos"]
    with pytest.raises(DataError, match="differ"):
        tune_prompt(m, init_from_vocab(m.word_embeddings, 2), other, TuneConfig())


def _dp_prompt(m, data, cfg, **kw):
    prompt = init_from_vocab(m.word_embeddings, 2, torch.Generator().manual_seed(0))
    tune_prompt(m, prompt, data, cfg, **kw)
    return prompt.weight.detach().clone()


def test_dp_randomness_is_fresh_unless_insecure_seed_is_given(tiny_dirs, sentiment):
    # same seed, same data, same config: a DP release must not be predictable from the seed
    m = load_scoring_model(tiny_dirs["embedding"], LABELS)
    cfg = TuneConfig(epochs=1, batch_size=8, target_epsilon=4.0)
    a, b = _dp_prompt(m, sentiment, cfg, seed=3), _dp_prompt(m, sentiment, cfg, seed=3)
    assert not torch.equal(a, b)
    # insecure (reproducible, NOT private) mode: bit-exact reruns, and the seed matters
    c, d = _dp_prompt(m, sentiment, cfg, seed=3, insecure_seed=7), _dp_prompt(m, sentiment, cfg, seed=3, insecure_seed=7)
    assert torch.equal(c, d)
    assert not torch.equal(c, _dp_prompt(m, sentiment, cfg, seed=3, insecure_seed=8))
    with pytest.raises(TypeError, match="insecure_seed"):
        _dp_prompt(m, sentiment, cfg, insecure_seed="7")


def test_dp_tuning_emits_no_misleading_secure_rng_warning(tiny_dirs, sentiment, recwarn):
    m = load_scoring_model(tiny_dirs["embedding"], LABELS)
    _dp_prompt(m, sentiment.head(8), TuneConfig(epochs=1, batch_size=4, target_epsilon=4.0))
    assert not [w for w in recwarn if "Secure RNG" in str(w.message)]


def test_delta_default_and_bound():
    cfg = TuneConfig()
    assert resolve_delta(cfg, 64) == 1e-5
    assert resolve_delta(cfg, 1_000_000) == pytest.approx(1e-7)
    for n in (1, 2, 3):  # tiny clients never report delta = 1/N (issue 14)
        assert resolve_delta(cfg, n) == 1e-5
    assert resolve_delta(TuneConfig(delta=1e-3), 999) == 1e-3
    with pytest.raises(ConfigError, match=r"tune.delta = 0.001 is >= 1/N = 0.001 \(N = 1000"):
        resolve_delta(TuneConfig(delta=1e-3), 1000)
    with pytest.raises(ConfigError, match="tune.delta"):
        resolve_delta(TuneConfig(delta=0.5), 3)


def test_clients_with_one_to_three_examples_report_a_small_delta(tiny_dirs, sentiment):
    m = load_scoring_model(tiny_dirs["embedding"], LABELS)
    for n in (1, 2, 3):
        prompt = init_from_vocab(m.word_embeddings, 2, torch.Generator().manual_seed(0))
        r = tune_prompt(m, prompt, sentiment.head(n), TuneConfig(epochs=1, batch_size=4, target_epsilon=8.0))
        assert r.delta == 1e-5 and math.isfinite(r.epsilon) and r.epsilon <= 8.0 + 0.02
    with pytest.raises(ConfigError, match="tune.delta"):
        tune_prompt(m, init_from_vocab(m.word_embeddings, 2), sentiment.head(3),
                    TuneConfig(epochs=1, batch_size=4, delta=0.4))


def test_epsilon_from_history_merges_equal_mechanisms_exactly():
    """Entries with the same (sigma, q) compose like one entry with their steps added, in any order;
    the memoised result equals Opacus' accountant on the raw history."""
    from opacus.accountants import RDPAccountant

    from post_fl.privacy.accounting import epsilon_from_history

    hist = [(1.1, 0.02, 30), (0.9, 0.05, 10), (1.1, 0.02, 70)]
    acc = RDPAccountant()
    acc.history = list(hist)
    direct = acc.get_epsilon(delta=1e-5)
    assert epsilon_from_history(hist, 1e-5) == pytest.approx(direct, rel=1e-9)
    assert epsilon_from_history([(1.1, 0.02, 100), (0.9, 0.05, 10)], 1e-5) == pytest.approx(direct, rel=1e-9)
    assert epsilon_from_history(list(reversed(hist)), 1e-5) == pytest.approx(direct, rel=1e-9)
    assert epsilon_from_history([(1.1, 0.02, 30)], 1e-5) < direct
