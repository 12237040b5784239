"""Deep prompts (prompt.form = "deep") in federated runs: FedAvg of L x P x D updates, the client-batched
engine against tune_prompt one client at a time, and a whole run on both transports."""

import json

import numpy as np
import pytest
import torch

from conftest import make_sentiment
from post_fl.core.config import PromptConfig, TuneConfig
from post_fl.core.deep_prompt import DEEP_PEFT_TYPE, DeepPrompt, load_any_prompt, new_prompt
from post_fl.core.models import load_scoring_model
from post_fl.federated.aggregate import ClientUpdate, aggregate_updates, filter_updates, sum_updates
from post_fl.federated.batched import train_clients_batched
from post_fl.method.tuning import tune_prompt

LABELS = ["negative", "positive"]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_fedavg_and_the_robust_means_work_on_deep_updates():
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=(4, 3, 8)).astype(np.float32) for _ in range(3)]
    ups = [ClientUpdate(c, d, n) for c, (d, n) in enumerate(zip(deltas, (10, 20, 30)))]
    weighted = sum(d.astype(np.float64) * n for d, n in zip(deltas, (10, 20, 30))) / 60
    np.testing.assert_allclose(aggregate_updates(ups, "fedavg"), weighted, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aggregate_updates(ups, "uniform"), np.mean(deltas, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aggregate_updates(ups, "median"), np.median(deltas, axis=0), rtol=1e-6)
    assert aggregate_updates(ups, "trimmed_mean", 0.0).shape == (4, 3, 8)
    np.testing.assert_allclose(sum_updates(ups), np.sum(deltas, axis=0), rtol=1e-5, atol=1e-6)
    valid, rejected = filter_updates(ups + [ClientUpdate(9, deltas[0][0], 5)], (4, 3, 8))
    assert len(valid) == 3 and "wrong shape (3, 8), expected (4, 3, 8)" in rejected[9]


@pytest.mark.parametrize("private,clip", [(True, 0.05), (True, "auto"), (False, "auto")], ids=["dp", "dp-auto-clip", "plain"])
def test_batched_deep_clients_equal_tune_prompt_one_at_a_time(tiny_dirs, private, clip):
    """Both engines tune a deep prompt alike; with ``max_grad_norm = "auto"`` both take the deep prompt's C
    (an engine that took the input prompt's C would add 4x the noise and differ)."""
    m = load_scoring_model(tiny_dirs["masked"], LABELS)
    start = new_prompt(m, PromptConfig(num_virtual_tokens=3, form="deep"), seed=0)
    with torch.no_grad():  # scales far from 1, so an engine that ignored them would differ
        start = DeepPrompt(start.weight / torch.tensor([0.5, 3.0, 7.0, 0.2])[:, None, None],
                           start.scales * torch.tensor([0.5, 3.0, 7.0, 0.2]))
    p0 = start.weight.detach().clone()
    data = {0: make_sentiment(10, seed=100), 3: make_sentiment(23, seed=103)}
    if private:
        cfg = TuneConfig(epochs=2, batch_size=8, target_epsilon=4.0, max_grad_norm=clip, lr=0.05)
        # (seeds where no noised gradient coordinate cancels to ~1e-8: there Adam's first step g / (|g| + 1e-8)
        # turns float rounding into ~1e-4 differences, in either engine)
        kw = {"insecure_seeds": {0: 1000, 3: 1004}, "noise_multipliers": {0: 0.9, 3: 1.3}}
        per = lambda c: {"insecure_seed": kw["insecure_seeds"][c], "noise_multiplier": kw["noise_multipliers"][c]}
    else:
        cfg = TuneConfig(epochs=2, batch_size=8, dp=False)
        kw = {"seeds": {0: 40, 3: 43}}
        per = lambda c: {"seed": kw["seeds"][c]}  # noqa: E731
    got = train_clients_batched(m, p0, data, cfg, micro_batch=7, scales=start.scales, **kw)
    for c, d in data.items():
        ref = tune_prompt(m, start.with_weight(p0), d, cfg, **per(c))
        assert (ref.prompt.weight.detach() - p0).abs().max() > 1e-2  # not vacuous
        assert got.clients[c].prompt.shape == (4, 3, m.embedding_dim)
        assert torch.allclose(got.clients[c].prompt, ref.prompt.weight.detach(), atol=1e-5), c
        assert got.clients[c].epsilon == pytest.approx(ref.epsilon, rel=1e-12)
    with pytest.raises(ValueError, match="one of scales per layer"):
        train_clients_batched(m, p0, data, cfg)


def _fed_run(root, tmp, transport_cls, **over):
    from post_fl import federated as F
    from test_federated import fed_flat

    # transfer.init = "vocab": the student-prompt start of a deep prompt (its layer-0 slice) is transfer.py's
    flat = fed_flat(root, tmp, **{"prompt.form": "deep", "insecure_reproducible": True, "transfer.init": "vocab",
                                  **over})
    run_cfg, fed = F.build_configs(flat)
    server = F.FederatedServer(run_cfg, fed)
    return F.run_federated(server, transport_cls(server, run_cfg, fed)), server


def test_a_deep_prompt_federated_run_on_both_transports(fed_root, tmp_path):
    """Rounds aggregate L x P x D prompts; the student prompt is saved in the deep format, the teacher gets the
    layer-0 slice (direct use) and an input prompt (transfer); the batched engine gives the same run."""
    from post_fl import federated as F
    from post_fl.federated.transports import BatchedTransport

    ref, ref_server = _fed_run(fed_root, tmp_path / "local", F.LocalTransport)
    layers = ref_server.student.backbone.config.num_hidden_layers
    assert ref_server.prompt.shape == (layers, 4, 32)
    assert np.abs(ref_server.prompt - ref_server._initial_prompt()).max() > 1e-3
    assert {"teacher_direct_prompt", "teacher_transferred_prompt"} <= set(ref["accuracy"])
    run = tmp_path / "local" / "run"
    student, cfg = load_any_prompt(run / "prompt_student", expected_dim=32, expected_layers=layers)
    assert isinstance(student, DeepPrompt) and cfg["peft_type"] == DEEP_PEFT_TYPE
    assert np.array_equal(student.weight.detach().numpy(), ref_server.prompt)
    assert json.loads((run / "prompt_teacher" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    got, got_server = _fed_run(fed_root, tmp_path / "batched", BatchedTransport)
    assert np.allclose(got_server.prompt, ref_server.prompt, atol=1e-5)
    assert got["accuracy"]["student_federated_prompt"] == pytest.approx(ref["accuracy"]["student_federated_prompt"])
