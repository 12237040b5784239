"""Tests for post_fl.privacy.rapt: d_χ-privacy noise, token privatisation, reconstruction head."""

from __future__ import annotations

import math

import pytest
import torch

from post_fl.privacy.rapt import (ReconstructionHead, per_token_epsilon, privatize_token_ids, reconstruction_loss,
                                  sample_dchi_noise)


def _emb(v=60, d=8, seed=0):
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed))


def test_noise_magnitude_matches_gamma_formula_and_is_isotropic():
    n, dim, eps = 20000, 16, 2.0
    z = sample_dchi_noise(n, dim, eps, torch.Generator().manual_seed(0))
    assert z.shape == (n, dim)
    norms = z.double().norm(dim=1)
    # ‖z‖ ~ Gamma(dim, 1/eps): mean dim/eps, std sqrt(dim)/eps
    assert abs(norms.mean().item() - dim / eps) < 0.02 * dim / eps
    assert abs(norms.std().item() - math.sqrt(dim) / eps) < 0.05 * math.sqrt(dim) / eps
    u = z.double() / norms[:, None]
    assert u.mean(dim=0).abs().max().item() < 0.03  # no preferred direction
    cov = u.T @ u / n  # uniform on the sphere: E[u uᵀ] = I/dim
    assert (cov - torch.eye(dim, dtype=torch.float64) / dim).abs().max().item() < 0.01


def test_noise_scales_inversely_with_eta_and_is_reproducible():
    a = sample_dchi_noise(5000, 8, 1.0, torch.Generator().manual_seed(3))
    b = sample_dchi_noise(5000, 8, 1.0, torch.Generator().manual_seed(3))
    c = sample_dchi_noise(5000, 8, 10.0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    ratio = a.norm(dim=1).mean() / c.norm(dim=1).mean()
    assert 9.0 < ratio.item() < 11.0


def test_eta_inf_returns_input_unchanged_without_sampling():
    emb = _emb()
    ids = torch.randint(0, 60, (4, 10), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(7)
    state = g.get_state().clone()
    out = privatize_token_ids(ids, emb, math.inf, generator=g)
    assert torch.equal(out, ids) and out.dtype == torch.long
    assert torch.equal(g.get_state(), state)  # no noise drawn


def test_large_eta_keeps_tokens_small_eta_changes_most():
    emb = _emb(v=100, d=8)
    ids = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(0)
    kept = (privatize_token_ids(ids, emb, 1e5, generator=g) == ids).float().mean().item()
    assert kept >= 0.99
    changed = (privatize_token_ids(ids, emb, 0.05, generator=g) != ids).float().mean().item()
    assert changed >= 0.8


def test_special_tokens_and_padding_never_change_and_output_in_vocab():
    v = 50
    emb = _emb(v=v, d=6)
    special = (0, 1, 2)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, v, (6, 20), generator=g)
    ids[:, 0] = 1  # CLS-like
    ids[:, -1] = 2  # SEP-like
    mask = torch.ones_like(ids)
    mask[:, 15:] = 0
    ids[:, 15:-1] = 0  # PAD
    ids[0, 16] = 7  # a non-special id at a padded position must stay too
    out = privatize_token_ids(ids, emb, 0.1, generator=g, special_ids=special, attention_mask=mask)
    assert out.shape == ids.shape and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < v
    keep = torch.isin(ids, torch.tensor(special)) | (mask == 0)
    assert torch.equal(out[keep], ids[keep])
    # privatized content tokens are never mapped onto special tokens
    assert not torch.isin(out[~keep], torch.tensor(special)).any()
    assert (out[~keep] != ids[~keep]).float().mean() > 0.5


def test_chunked_nearest_neighbour_matches_bruteforce():
    emb = _emb(v=300, d=5, seed=9)
    ids = torch.randint(0, 300, (3, 7), generator=torch.Generator().manual_seed(1))
    out = privatize_token_ids(ids, emb, 3.0, generator=torch.Generator().manual_seed(11))
    noise = sample_dchi_noise(ids.numel(), 5, 3.0, torch.Generator().manual_seed(11))
    expected = torch.cdist(emb[ids.reshape(-1)] + noise, emb).argmin(dim=1).reshape(ids.shape)
    assert torch.equal(out, expected)


def test_per_token_epsilon():
    emb = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    assert per_token_epsilon(2.0, emb, "exact") == pytest.approx(10.0, rel=1e-6)
    assert per_token_epsilon(2.0, emb, "auto") == pytest.approx(10.0, rel=1e-6)
    big = _emb(v=200, d=16)
    exact = per_token_epsilon(1.0, big, "exact")
    assert per_token_epsilon(1.0, big, "bound") >= exact > 0
    assert per_token_epsilon(math.inf, emb) == math.inf


def test_bad_inputs_raise_value_error():
    emb = _emb()
    ids = torch.zeros(2, 3, dtype=torch.long)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eta"):
            privatize_token_ids(ids, emb, bad)
        with pytest.raises(ValueError, match="eta"):
            sample_dchi_noise(3, 4, bad)
    with pytest.raises(ValueError, match="2-D"):
        privatize_token_ids(ids, torch.randn(10), 1.0)
    with pytest.raises(ValueError, match="vocabulary"):
        privatize_token_ids(torch.full((2, 3), 60), emb, 1.0)
    with pytest.raises(ValueError, match="attention_mask"):
        privatize_token_ids(ids, emb, 1.0, attention_mask=torch.ones(2, 4))
    head = ReconstructionHead(hidden_size=12, embedding_matrix=emb)
    with pytest.raises(ValueError, match="hidden_size"):
        head(torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match="original_ids"):
        reconstruction_loss(head, torch.randn(2, 4, 12), ids)
    with pytest.raises(ValueError, match="eta"):
        per_token_epsilon(0.0, emb)


@pytest.fixture
def single_thread():
    # tiny ops + a busy 2-core box: the intra-op thread pool makes each op ~100x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_reconstruction_head_learns_toy_problem_and_ignores_padding(single_thread):
    torch.manual_seed(0)
    v, d, h = 40, 8, 16
    emb = _emb(v=v, d=d, seed=2)
    frozen = torch.nn.Linear(d, h)  # stands in for the frozen LLM
    for p in frozen.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    orig = torch.randint(0, v, (16, 12), generator=g)
    priv = privatize_token_ids(orig, emb, 3.0, generator=g)
    mask = torch.ones_like(orig)
    mask[:, 9:] = 0
    hidden = torch.tanh(frozen(emb[priv]))
    head = ReconstructionHead(h, emb)
    assert all(p.requires_grad for p in head.parameters())
    assert "embedding_matrix" not in head.state_dict()  # fixed, not communicated
    params = list(head.parameters())
    first = reconstruction_loss(head, hidden, orig, mask)
    # padded targets do not matter
    orig2 = orig.clone()
    orig2[:, 9:] = (orig2[:, 9:] + 1) % v
    assert reconstruction_loss(head, hidden, orig2, mask).item() == pytest.approx(first.item())
    for _ in range(100):  # plain gradient descent (torch.optim would import torch._dynamo: ~5 s)
        loss = reconstruction_loss(head, hidden, orig, mask)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p -= 0.5 * gr
    assert loss.item() < 0.6 * first.item()
    assert loss.dim() == 0
    zero = reconstruction_loss(head, hidden, orig, torch.zeros_like(mask))
    assert zero.item() == 0.0


# ---------------------------------------------------------------- randomised response on labels
def test_randomized_response_keeps_with_the_ldp_probability_and_flips_uniformly():
    from post_fl.privacy.rapt import randomized_response, randomized_response_keep_probability

    eps, k, n = 1.0, 3, 200_000
    keep = math.exp(eps) / (math.exp(eps) + k - 1)
    assert randomized_response_keep_probability(eps, k) == pytest.approx(keep)
    y = torch.zeros(n, dtype=torch.long)
    freq = torch.bincount(randomized_response(y, k, eps, torch.Generator().manual_seed(0)), minlength=k) / n
    assert float(freq[0]) == pytest.approx(keep, abs=0.005)
    assert float(freq[1]) == pytest.approx((1 - keep) / 2, abs=0.005) and float(freq[2]) == pytest.approx(
        (1 - keep) / 2, abs=0.005)
    # the LDP ratio: P[M(0) = 0] / P[M(1) = 0] = e^eps
    z1 = randomized_response(torch.ones(n, dtype=torch.long), k, eps, torch.Generator().manual_seed(1))
    assert float(freq[0]) / float((z1 == 0).float().mean()) == pytest.approx(math.exp(eps), rel=0.05)
    # no privacy asked, or nothing to hide: unchanged
    labels = torch.tensor([0, 1, 2, 1])
    assert torch.equal(randomized_response(labels, 3, math.inf), labels)
    assert torch.equal(randomized_response(torch.zeros(5, dtype=torch.long), 1, 0.1), torch.zeros(5, dtype=torch.long))
    # fresh generators give different outputs
    a = randomized_response(y[:1000], k, 0.5, torch.Generator().manual_seed(2))
    assert not torch.equal(a, randomized_response(y[:1000], k, 0.5, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="labels must lie"):
        randomized_response(torch.tensor([0, 3]), 3, 1.0)
    with pytest.raises(ValueError, match="label epsilon"):
        randomized_response(labels, 3, 0.0)
