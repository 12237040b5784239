"""The client-batched engine (post_fl/federated/batched.py) against one-client-at-a-time tune_prompt."""

import math

import numpy as np
import pytest
import torch

from conftest import make_sentiment
from post_fl.federated.batched import (clip_per_example, gaussian_noise, per_example_prompt_grads, sum_by_client,
                                       train_clients_batched)
from post_fl.core.config import TuneConfig
from post_fl.core.data import DataError, TextDataset
from post_fl.core.models import load_scoring_model
from post_fl.core.prompt import SoftPrompt, init_from_vocab
from post_fl.method.tuning import PromptedClassifier, encode_dataset, tune_prompt
from post_fl.privacy.accounting import epsilon_from_history

LABELS = ["negative", "positive"]
# clients of different sizes: different steps, sample rates, expected batch sizes and noise multipliers
SIZES = {0: 10, 3: 23, 7: 40}


def _model(tiny_dirs, kind="masked"):
    return load_scoring_model(tiny_dirs[kind], LABELS)


def _prompt0(model, v=3):
    return init_from_vocab(model.word_embeddings, v, torch.Generator().manual_seed(0)).weight.detach().clone()


def _clients(sizes=SIZES):
    return {c: make_sentiment(n, seed=100 + c) for c, n in sizes.items()}


def _one_at_a_time(model, p0, data, cfg, **kw_per_client):
    """tune_prompt once per client from the global prompt (the reference semantics)."""
    out = {}
    for c, d in data.items():
        kw = {k: v[c] for k, v in kw_per_client.items()}
        out[c] = tune_prompt(model, SoftPrompt(p0), d, cfg, **kw)
    return out


@pytest.mark.parametrize("kind", ["causal", "masked", "embedding"])
def test_per_example_grads_of_a_mixed_batch_equal_a_loop(tiny_dirs, kind):
    """Row i of the gradient w.r.t. the gathered prompts is example i's gradient w.r.t. its own client's prompt."""
    m = _model(tiny_dirs, kind)
    prompts = torch.stack([_prompt0(m), _prompt0(m) + 0.3 * torch.randn(3, m.embedding_dim)])
    data = make_sentiment(6, seed=4)
    ids, mask, ans, y = encode_dataset(m, data).tensors
    owner = torch.tensor([0, 1, 1, 0, 1, 0])
    from post_fl.core.models import EncodedBatch

    grads, losses = per_example_prompt_grads(m, prompts[owner], EncodedBatch(ids, mask, ans), y)
    assert grads.shape == (6, 3, m.embedding_dim)
    for i in range(6):
        ref = SoftPrompt(prompts[owner[i]])
        loss = torch.nn.functional.cross_entropy(PromptedClassifier(m, ref)(ids[i:i + 1], mask[i:i + 1],
                                                                            ans[i:i + 1]), y[i:i + 1])
        loss.backward()
        assert torch.allclose(grads[i], ref.weight.grad, atol=1e-6), i
        assert losses[i].item() == pytest.approx(loss.item(), abs=1e-5)


@pytest.mark.parametrize("kind,optimizer,lr", [("masked", "adam", 0.05), ("causal", "adam", 0.05),
                                               ("causal", "sgd", 2.0)])
def test_insecure_mode_batched_equals_tune_prompt_per_client(tiny_dirs, kind, optimizer, lr):
    """Same per-client updates (1e-5), steps, histories and epsilon as tune_prompt one client at a time,
    with clipping active (C = 0.05) and noise on; carried histories compose the same way; Adam and SGD."""
    m = _model(tiny_dirs, kind)
    p0 = _prompt0(m)
    data = _clients()
    cfg = TuneConfig(epochs=2, batch_size=8, target_epsilon=4.0, max_grad_norm=0.05, lr=lr, optimizer=optimizer)
    seeds = {c: 1000 + c for c in data}
    hist = {0: [], 3: [[1.3, 1 / 3, 6]], 7: []}
    sig = {0: 0.9, 3: 1.3, 7: 1.1}  # fixed (calibration takes seconds; the fresh-noise test calibrates)
    ref = _one_at_a_time(m, p0, data, cfg, insecure_seed=seeds, accountant_history=hist, noise_multiplier=sig)
    got = train_clients_batched(m, p0, data, cfg, histories=hist, noise_multipliers=sig, insecure_seeds=seeds,
                                micro_batch=7)
    assert sorted(got.clients) == sorted(data)
    for c in data:
        r, g = ref[c], got.clients[c]
        moved = (r.prompt.weight.detach() - p0).abs().max().item()
        assert moved > 1e-2  # the comparison is not vacuous
        assert torch.allclose(g.prompt, r.prompt.weight.detach(), atol=1e-5, rtol=0), c
        assert np.allclose(g.update, r.prompt.weight.detach().numpy() - p0.numpy(), atol=1e-5)
        assert (g.steps, g.examples, g.sample_rate, g.noise_multiplier) == (r.steps, r.examples, r.sample_rate,
                                                                            r.noise_multiplier)
        assert g.accountant_history == r.accountant_history
        assert g.epsilon == pytest.approx(r.epsilon, rel=1e-12) and g.delta == r.delta
        assert g.mean_loss == pytest.approx(r.mean_loss, abs=1e-5)
    assert got.clients[3].accountant_history == [[1.3, 1 / 3, 6 + got.clients[3].steps]]


def test_the_optimizer_setting_is_used_by_both_implementations(tiny_dirs):
    m = _model(tiny_dirs)
    p0 = _prompt0(m)
    data = _clients()
    seeds = {c: 3 + c for c in data}
    sig = {c: 1.0 for c in data}
    out = {}
    for optimizer in ("adam", "sgd"):
        cfg = TuneConfig(epochs=1, batch_size=8, target_epsilon=4.0, max_grad_norm=0.05, lr=0.05, optimizer=optimizer)
        out[optimizer] = (train_clients_batched(m, p0, data, cfg, noise_multipliers=sig, insecure_seeds=seeds),
                          _one_at_a_time(m, p0, data, cfg, insecure_seed=seeds, noise_multiplier=sig))
    for c in data:  # the same seeds, noise and batches: only the optimizer differs
        assert not torch.allclose(out["adam"][0].clients[c].prompt, out["sgd"][0].clients[c].prompt, atol=1e-4)
        assert not torch.allclose(out["adam"][1][c].prompt.weight, out["sgd"][1][c].prompt.weight, atol=1e-4)


def test_micro_batch_size_does_not_change_the_result(tiny_dirs):
    m = _model(tiny_dirs)
    p0 = _prompt0(m)
    data = _clients()
    cfg = TuneConfig(epochs=1, batch_size=8, target_epsilon=4.0, max_grad_norm=0.05)
    seeds = {c: 7 + c for c in data}
    sig = {c: 1.0 for c in data}
    a = train_clients_batched(m, p0, data, cfg, noise_multipliers=sig, insecure_seeds=seeds, micro_batch=1)
    b = train_clients_batched(m, p0, data, cfg, noise_multipliers=sig, insecure_seeds=seeds, micro_batch=256)
    assert a.micro_batches > b.micro_batches and a.examples_processed == b.examples_processed
    for c in data:
        assert torch.allclose(a.clients[c].prompt, b.clients[c].prompt, atol=1e-5)
    # per-client state: prompt, two Adam moments, a gradient sum, all V x D float32
    assert a.client_state_bytes == 4 * len(data) * p0.numel() * 4


def test_non_private_batched_equals_tune_prompt(tiny_dirs):
    m = _model(tiny_dirs)
    p0 = _prompt0(m)
    data = _clients()
    cfg = TuneConfig(epochs=2, batch_size=8, dp=False)
    seeds = {c: 40 + c for c in data}
    ref = _one_at_a_time(m, p0, data, cfg, seed=seeds)
    got = train_clients_batched(m, p0, data, cfg, seeds=seeds)
    for c in data:
        assert torch.allclose(got.clients[c].prompt, ref[c].prompt.weight.detach(), atol=1e-5), c
        assert got.clients[c].epsilon == math.inf and got.clients[c].accountant_history == []


def test_fresh_noise_gives_the_same_epsilon_as_tune_prompt_and_differs_between_calls(tiny_dirs):
    m = _model(tiny_dirs)
    p0 = _prompt0(m)
    data = _clients({0: 16, 5: 40})
    cfg = TuneConfig(epochs=2, batch_size=8, target_epsilon=3.0)
    ref = _one_at_a_time(m, p0, data, cfg)
    a = train_clients_batched(m, p0, data, cfg)
    b = train_clients_batched(m, p0, data, cfg)
    for c in data:
        assert a.clients[c].epsilon == pytest.approx(ref[c].epsilon, rel=1e-12)
        assert a.clients[c].accountant_history == ref[c].accountant_history
        assert a.clients[c].epsilon == pytest.approx(
            epsilon_from_history(a.clients[c].accountant_history, a.clients[c].delta), rel=1e-12)
        assert 2.5 < a.clients[c].epsilon <= 3.0 + 0.02
        assert not torch.allclose(a.clients[c].prompt, b.clients[c].prompt, atol=1e-4)  # OS-entropy noise


def test_every_client_gets_its_own_noise(tiny_dirs):
    """Two clients with identical data and prompt: fresh noise per client makes their updates differ;
    with one shared noise draw (or none) they would be equal."""
    m = _model(tiny_dirs)
    p0 = _prompt0(m)
    d = make_sentiment(20, seed=5)
    cfg = TuneConfig(epochs=1, batch_size=8, target_epsilon=2.0)
    sig = {0: 1.0, 1: 1.0}
    r = train_clients_batched(m, p0, {0: d, 1: d}, cfg, noise_multipliers=sig)
    assert not np.allclose(r.clients[0].update, r.clients[1].update, atol=1e-4)
    same = train_clients_batched(m, p0, {0: d, 1: d}, cfg, noise_multipliers=sig, insecure_seeds={0: 9, 1: 9})
    assert np.allclose(same.clients[0].update, same.clients[1].update, atol=1e-6)


def test_noise_has_standard_deviation_sigma_times_clip():
    g = torch.Generator().manual_seed(0)
    x = gaussian_noise(2.5 * 0.4, (200, 50), g)
    assert x.std().item() == pytest.approx(1.0, rel=0.03) and abs(x.mean().item()) < 0.01
    assert torch.equal(gaussian_noise(0.0, (3, 4), g), torch.zeros(3, 4))


def test_noise_is_added_removing_it_changes_the_update(tiny_dirs):
    """The same seeded run with sigma = 0 and with the calibrated sigma: noise must move the update."""
    m = _model(tiny_dirs)
    p0 = _prompt0(m)
    data = _clients()
    cfg = TuneConfig(epochs=1, batch_size=8, target_epsilon=1.0, max_grad_norm=0.05)
    seeds = {c: 3 for c in data}
    noisy = train_clients_batched(m, p0, data, cfg, insecure_seeds=seeds, noise_multipliers={c: 2.0 for c in data})
    quiet = train_clients_batched(m, p0, data, cfg, insecure_seeds=seeds, noise_multipliers={c: 0.0 for c in data})
    ref = _one_at_a_time(m, p0, data, cfg, insecure_seed=seeds, noise_multiplier={c: 0.0 for c in data})
    for c in data:
        assert noisy.clients[c].noise_multiplier == 2.0
        assert np.abs(noisy.clients[c].update - quiet.clients[c].update).max() > 1e-2
        assert torch.allclose(quiet.clients[c].prompt, ref[c].prompt.weight.detach(), atol=1e-5)


def test_clipping_is_per_example():
    grads = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]).view(3, 1, 2)  # norms 5, 0.5, 0
    clipped = clip_per_example(grads, 1.0)
    norms = clipped.reshape(3, -1).norm(dim=1)
    assert norms[0].item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(clipped[1:], grads[1:])
    sums = sum_by_client(clipped, torch.tensor([1, 1, 0]), 3)
    assert torch.allclose(sums[1], clipped[0] + clipped[1]) and torch.equal(sums[2], torch.zeros(1, 2))


def test_clipping_changes_the_update_and_matches_tune_prompt(tiny_dirs):
    """Without noise, a small clip bound (active) gives tune_prompt's update and differs from a huge bound:
    an engine that skipped per-example clipping would match the huge bound instead."""
    m = _model(tiny_dirs)
    p0 = _prompt0(m)
    data = _clients({0: 30, 1: 12})
    zero = {c: 0.0 for c in data}
    seeds = {c: 21 + c for c in data}
    small = TuneConfig(epochs=2, batch_size=8, target_epsilon=4.0, max_grad_norm=0.01)
    big = TuneConfig(epochs=2, batch_size=8, target_epsilon=4.0, max_grad_norm=1e6)
    a = train_clients_batched(m, p0, data, small, noise_multipliers=zero, insecure_seeds=seeds)
    b = train_clients_batched(m, p0, data, big, noise_multipliers=zero, insecure_seeds=seeds)
    ref = _one_at_a_time(m, p0, data, small, insecure_seed=seeds, noise_multiplier=zero)
    for c in data:
        assert torch.allclose(a.clients[c].prompt, ref[c].prompt.weight.detach(), atol=1e-5)
        assert np.abs(a.clients[c].update - b.clients[c].update).max() > 1e-3


def test_bad_inputs_are_refused(tiny_dirs):
    m = _model(tiny_dirs)
    p0 = _prompt0(m)
    cfg = TuneConfig(epochs=1, batch_size=8, target_epsilon=4.0)
    data = _clients({0: 10, 1: 10})
    with pytest.raises(DataError, match="client 1: .*empty"):
        train_clients_batched(m, p0, {0: data[0], 1: TextDataset([], [], LABELS)}, cfg)
    with pytest.raises(ValueError, match="insecure_seeds: .*missing \\[1\\]"):
        train_clients_batched(m, p0, data, cfg, insecure_seeds={0: 1})
    with pytest.raises(TypeError, match="insecure_seeds\\[0\\]"):
        train_clients_batched(m, p0, data, cfg, insecure_seeds={0: "1", 1: 2})
    with pytest.raises(ValueError, match="embedding size 5"):
        train_clients_batched(m, torch.zeros(3, 5), data, cfg)
    with pytest.raises(ValueError, match="micro_batch"):
        train_clients_batched(m, p0, data, cfg, micro_batch=0)
    with pytest.raises(ValueError, match="at least one client"):
        train_clients_batched(m, p0, {}, cfg)


def _fed_run(root, tmp, transport_cls, **over):
    from post_fl import federated as F
    from test_federated import fed_flat

    run_cfg, fed = F.build_configs(fed_flat(root, tmp, **over))
    server = F.FederatedServer(run_cfg, fed)
    transport = transport_cls(server, run_cfg, fed)
    return F.run_federated(server, transport), server, transport


@pytest.mark.parametrize("over", [{"insecure_reproducible": True},
                                  {"insecure_reproducible": True, "federated.user_dp": True,
                                   "federated.fraction_train": 0.6},
                                  {"tune.dp": False}], ids=["sample-dp", "user-dp", "no-dp"])
def test_batched_transport_gives_the_local_transport_run(fed_root, tmp_path, over):
    """The same federated run (round logic, ledgers, clipping, aggregation, results) with the clients of each
    round trained in shared passes: same global prompt (1e-5) and the same per-client privacy records."""
    from post_fl import federated as F
    from post_fl.federated.transports import BatchedTransport

    ref, ref_server, _ = _fed_run(fed_root, tmp_path / "local", F.LocalTransport, **over)
    got, got_server, transport = _fed_run(fed_root, tmp_path / "batched", BatchedTransport, **over)
    assert transport.last_round is not None and len(transport.last_round.clients) >= 2
    moved = np.abs(ref_server.prompt - ref_server._initial_prompt()).max()
    assert moved > 1e-3
    assert np.allclose(got_server.prompt, ref_server.prompt, atol=1e-5)
    assert [r["valid"] for r in got["rounds"]] == [r["valid"] for r in ref["rounds"]]
    for key in ("student_federated_prompt", "teacher_transferred_prompt"):
        assert got["accuracy"][key] == pytest.approx(ref["accuracy"][key], abs=1e-9)
    assert got["privacy"]["sample_level"] == ref["privacy"]["sample_level"]


def test_batched_transport_refuses_secagg(fed_root, tmp_path):
    from post_fl import federated as F
    from post_fl.federated.transports import BatchedTransport
    from post_fl.core.config import ConfigError
    from test_federated import fed_flat

    run_cfg, fed = F.build_configs(fed_flat(fed_root, tmp_path, **{"federated.secagg": True,
                                                                  "federated.max_update_norm": 1.0}))
    with pytest.raises(ConfigError, match="federated.secagg"):
        BatchedTransport(F.FederatedServer(run_cfg, fed), run_cfg, fed)
