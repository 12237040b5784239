"""The privacy mechanisms themselves, checked from the outside (issue 10, "Tests that must exist").

Each test fails under a named mutation of the code under test:

* DP-SGD step intercepted in Opacus' optimiser: the pre-noise sum of a batch of B examples has
  norm <= B * C (per-example clipping skipped -> fails), and the noise added has standard deviation
  sigma * C where sigma is the multiplier the accountant is charged with (noise zeroed or shrunk
  while the accountant is unchanged -> fails).
* DP-FedAvg (``clip_update`` + ``noised_mean``) on updates of norm >> C: the release is the clipped
  mean plus noise of std sigma * C / (q N), against a clipped sum computed here, independently.
* User-level epsilon recomputed by an RDP formula written here (sampled Gaussian at integer
  orders, Mironov, Talwar & Zhang 2019; conversion of Balle et al. 2020), so a q/10 slip fails.
* Distributed-DP noise shares: variance sigma^2 C^2 / m each, sigma^2 C^2 for m summed.
* Fresh randomness: equal calls give different noise; plain integer seeds are refused;
  ``--insecure-reproducible`` makes single-site DP tuning bit-exact and labels it not private.

``benchmarks/privacy_mutations.py`` applies these mutations (and those of issue 22) to a copy of the
repository and shows each caught; its output is in ``docs/privacy.md``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import gammaln, logsumexp

from post_fl.core.config import ConfigError, TuneConfig
from post_fl.core.models import load_scoring_model
from post_fl.core.prompt import init_from_vocab
from post_fl.privacy.randomness import NOT_PRIVATE_LABEL, dp_numpy_rng
from post_fl.method.tuning import tune_prompt
from post_fl.privacy.user_dp import (clip_update, effective_noise_multiplier, noise_share, noised_mean, poisson_sample,
                                     resolve_user_delta, user_level_epsilon)

LABELS = ["negative", "positive"]


# ---------------------------------------------------------------- DP-SGD, one step at a time
@pytest.fixture
def dp_steps(monkeypatch):
    """Wrap Opacus' DPOptimizer.add_noise: record (batch size, max per-example grad norm,
    pre-noise summed gradient, added noise) of every DP-SGD step."""
    from opacus.optimizers.optimizer import DPOptimizer

    original = DPOptimizer.add_noise
    steps: list[dict] = []

    def add_noise(self):
        (p,) = self.params  # the soft prompt is the only trainable parameter
        before = p.summed_grad.detach().clone()
        per_example = p.grad_sample.detach().reshape(len(p.grad_sample), p.numel())
        original(self)
        steps.append({"batch": len(per_example),
                      "max_example_norm": float(per_example.norm(dim=1).max()) if len(per_example) else 0.0,
                      "summed": before, "noise": (p.grad.detach() - before.view_as(p.grad)).clone(),
                      "C": self.max_grad_norm, "sigma": self.noise_multiplier})

    monkeypatch.setattr(DPOptimizer, "add_noise", add_noise)
    return steps


def test_dp_sgd_clips_each_example_and_adds_noise_of_std_sigma_c(tiny_dirs, sentiment, dp_steps):
    m = load_scoring_model(tiny_dirs["embedding"], LABELS)
    prompt = init_from_vocab(m.word_embeddings, 4, torch.Generator().manual_seed(0))
    C, sigma = 1e-3, 1.7  # C far below the raw per-example gradient norms, so clipping binds
    r = tune_prompt(m, prompt, sentiment, TuneConfig(epochs=4, batch_size=8, max_grad_norm=C, target_epsilon=8.0),
                    noise_multiplier=sigma)
    assert len(dp_steps) == r.steps == 32  # every step went through the (wrapped) noise addition
    assert r.noise_multiplier == sigma and r.accountant_history == [[sigma, r.sample_rate, r.steps]]
    batches = [s for s in dp_steps if s["batch"] > 0]
    assert batches and max(s["max_example_norm"] for s in batches) > 20 * C  # raw gradients exceed C
    for s in dp_steps:
        assert s["C"] == C
        assert float(s["summed"].norm()) <= s["batch"] * C * (1 + 1e-5), s["batch"]
    # the noise of the charged multiplier: std sigma * C per coordinate, over all steps together
    noise = torch.cat([s["noise"].reshape(-1) for s in dp_steps]).double()
    assert noise.numel() == 32 * 4 * m.embedding_dim
    assert float(noise.std()) == pytest.approx(sigma * C, rel=0.06)
    assert abs(float(noise.mean())) < 4 * sigma * C / math.sqrt(noise.numel())


# ---------------------------------------------------------------- DP-FedAvg
def _clip_reference(u: np.ndarray, c: float) -> np.ndarray:
    return u * min(1.0, c / float(np.linalg.norm(u)))


def test_dp_fedavg_on_large_updates_releases_clipped_mean_plus_noise_sigma_c_over_qn():
    rng = np.random.default_rng(0)
    dim, clients, C, sigma, q, N = 20_000, 12, 0.5, 1.3, 0.3, 40
    updates = [rng.normal(size=dim) * 100 / math.sqrt(dim) for _ in range(clients)]  # norms ~100 >> C
    clipped = [clip_update(u, C) for u in updates]
    for (cu, norm), u in zip(clipped, updates):
        assert norm == pytest.approx(np.linalg.norm(u)) and np.linalg.norm(cu) <= C * (1 + 1e-6)
    total = np.sum([cu for cu, _ in clipped], axis=0)
    reference = np.sum([_clip_reference(u, C) for u in updates], axis=0)  # clipped here, not by the code
    np.testing.assert_allclose(total, reference, rtol=1e-5, atol=1e-7)
    release = noised_mean(total, C, sigma, q * N, dp_numpy_rng())
    noise = release.astype(np.float64) - reference / (q * N)
    assert float(noise.std()) == pytest.approx(sigma * C / (q * N), rel=0.03)
    assert abs(float(noise.mean())) < 4 * sigma * C / (q * N) / math.sqrt(dim)
    # no noise: exactly the fixed-denominator mean of the clipped updates
    np.testing.assert_allclose(noised_mean(total, C, 0.0, q * N, dp_numpy_rng()), reference / (q * N),
                               rtol=1e-5, atol=1e-7)


def test_dp_fedavg_noise_is_fresh_and_seeds_are_refused():
    s = np.zeros(1000)
    a, b = noised_mean(s, 1.0, 1.0, 4.0, dp_numpy_rng()), noised_mean(s, 1.0, 1.0, 4.0, dp_numpy_rng())
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(noised_mean(s, 1.0, 1.0, 4.0, dp_numpy_rng(5, 1)),
                                  noised_mean(s, 1.0, 1.0, 4.0, dp_numpy_rng(5, 1)))  # insecure mode only
    for fn, args in ((noised_mean, (s, 1.0, 1.0, 4.0)), (poisson_sample, ([1, 2, 3], 0.5)),
                     (noise_share, ((3,), 1.0, 1.0, 2))):
        with pytest.raises(TypeError, match="dp_numpy_rng"):
            fn(*args, 7)
    with pytest.raises(ValueError, match="expected number"):
        noised_mean(s, 1.0, 1.0, 0.0, dp_numpy_rng())


def test_poisson_client_sampling_rate_and_order_independence():
    ids = list(range(20_000))
    picked = poisson_sample(ids, 0.1, dp_numpy_rng())
    assert abs(len(picked) - 2000) < 4 * math.sqrt(20_000 * 0.1 * 0.9)
    assert poisson_sample(ids, 0.1, dp_numpy_rng(1, 2)) == poisson_sample(ids[::-1], 0.1, dp_numpy_rng(1, 2))
    assert poisson_sample(ids, 0.1, dp_numpy_rng()) != poisson_sample(ids, 0.1, dp_numpy_rng())
    with pytest.raises(ValueError, match="sample rate"):
        poisson_sample(ids, 0.0, dp_numpy_rng())


# ---------------------------------------------------------------- user-level epsilon, recomputed here
def _log_a_sampled_gaussian(q: float, sigma: float, alpha: int) -> float:
    """log E[(p_1/p_0)^alpha] for the sampled Gaussian mechanism at integer alpha (Mironov et al. 2019, eq. 3)."""
    if q == 1.0:
        return alpha * (alpha - 1) / (2 * sigma ** 2)
    k = np.arange(alpha + 1)
    log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    terms = log_binom + (alpha - k) * np.log1p(-q) + k * np.log(q) + (k * k - k) / (2 * sigma ** 2)
    return float(logsumexp(terms))


def _epsilon_reference(sigma: float, q: float, rounds: int, delta: float) -> float:
    best = math.inf
    for alpha in range(2, 64):
        rdp = rounds * _log_a_sampled_gaussian(q, sigma, alpha) / (alpha - 1)
        eps = rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)
        best = min(best, eps)
    return best


@pytest.mark.parametrize("sigma,q,rounds,delta", [(1.0, 0.1, 3, 1e-5), (0.8, 0.5, 10, 1e-5), (2.0, 0.01, 100, 1e-6),
                                                  (1.2, 1.0, 3, 1e-5), (5.0, 0.3, 50, 1e-5), (0.9, 0.2, 5, 1e-4),
                                                  (0.7, 0.1, 3, 1e-5)])
def test_user_level_epsilon_matches_an_independent_rdp_computation(sigma, q, rounds, delta):
    ours = user_level_epsilon(sigma, q, rounds, delta)
    ref = _epsilon_reference(sigma, q, rounds, delta)
    # the code may use finer (fractional) orders, so it may be a little lower, never higher
    assert 0.93 * ref <= ours <= ref * (1 + 1e-9), (ours, ref)


def test_user_level_epsilon_edge_cases():
    assert user_level_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert user_level_epsilon(0.0, 0.1, 3, 1e-5) == math.inf


# ---------------------------------------------------------------- distributed DP shares
def test_noise_shares_have_variance_sigma2_c2_over_m_and_sum_to_sigma2_c2():
    C, sigma, m, dim = 0.7, 1.4, 5, 200_000
    shares = [noise_share((dim,), C, sigma, m, dp_numpy_rng()) for _ in range(m)]
    for s in shares:
        assert s.shape == (dim,) and s.dtype == np.float32
        assert float(np.var(s.astype(np.float64))) == pytest.approx(sigma ** 2 * C ** 2 / m, rel=0.02)
    total = np.sum(shares, axis=0, dtype=np.float64)
    assert float(np.var(total)) == pytest.approx(sigma ** 2 * C ** 2, rel=0.02)
    assert not np.array_equal(shares[0], shares[1])  # fresh per client
    with pytest.raises(ValueError, match="num_shares_min"):
        noise_share((3,), C, sigma, 0, dp_numpy_rng())


def test_effective_noise_multiplier_under_dropouts():
    assert effective_noise_multiplier(2.0, 7, 5) == 2.0  # more survivors than planned: not credited
    assert effective_noise_multiplier(2.0, 5, 5) == 2.0
    assert effective_noise_multiplier(2.0, 1, 4) == pytest.approx(1.0)  # a quarter of the variance
    assert effective_noise_multiplier(2.0, 0, 4) == 0.0


# ---------------------------------------------------------------- delta at user level
def test_user_delta_default_and_bound():
    assert resolve_user_delta(0.0, 10) == 1e-5
    assert resolve_user_delta(0.0, 1_000_000) == pytest.approx(1e-7)
    assert resolve_user_delta(0.01, 50) == 0.01
    with pytest.raises(ConfigError, match=r"federated.user_dp_delta = 0.1 is >= 1/N = 0.1 \(N = 10 clients"):
        resolve_user_delta(0.1, 10)
    with pytest.raises(ConfigError, match="num_clients"):
        resolve_user_delta(0.0, 0)


# ---------------------------------------------------------------- insecure mode through the CLI
def _tune_args(root, run, insecure: bool):
    sets = {"model.teacher": f'"{root / "teacher"}"', "model.student": f'"{root / "student"}"',
            "data.train": f'"{root / "train.csv"}"', "data.test": f'"{root / "test.csv"}"',
            "data.public": f'"{root / "public.jsonl"}"', "model.label_words": '{ positive = ["good"], negative = ["bad"] }',
            "tune.epochs": 1, "tune.batch_size": 16, "tune.target_epsilon": 4, "prompt.num_virtual_tokens": 2}
    out = ["tune", "--output-dir", str(run), "--quiet", "--seed", "3"]
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out + (["--insecure-reproducible"] if insecure else [])


def _stage_and_prompt(run):
    from safetensors.torch import load_file

    stage = json.loads((run / "stages" / "tune.json").read_text())
    tensors = load_file(str(next((run / "prompt_student").glob("*.safetensors"))))
    return stage, next(iter(tensors.values()))


def test_single_site_dp_tuning_is_fresh_unless_insecure_reproducible(fed_root, tmp_path):
    from post_fl.cli import main

    runs = {}
    for name, insecure in (("a", False), ("b", False), ("c", True), ("d", True)):
        assert main(_tune_args(fed_root, tmp_path / name, insecure)) == 0, name
        runs[name] = _stage_and_prompt(tmp_path / name)
    assert not torch.equal(runs["a"][1], runs["b"][1])
    assert torch.equal(runs["c"][1], runs["d"][1])
    assert "not_private" not in runs["a"][0]
    assert runs["c"][0]["not_private"] == NOT_PRIVATE_LABEL
    from post_fl.core.prompt import PROVENANCE

    assert json.loads((tmp_path / "c" / "prompt_student" / PROVENANCE).read_text())["not_private"] == NOT_PRIVATE_LABEL
