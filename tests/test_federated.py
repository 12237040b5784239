"""Federated rounds without Flower: config, rounds, rejection, min-clients failure, resume, user-level DP."""

import json
import math

import numpy as np
import pytest

from post_fl import federated as F
from post_fl.federated import shipping
from post_fl.federated import transports as local_transport
from post_fl.federated.aggregate import RoundFailedError
from post_fl.core.config import ConfigError, TransferConfig
from post_fl.core.data import TextDataset
from post_fl.core.prompt import load_prompt


def fed_flat(root, tmp, **over):
    """A small flat run-config (as Flower passes it) over files written under ``root``."""
    flat = {"model.teacher": str(root / "teacher"), "model.student": str(root / "student"),
            "model.label_words.positive": "good", "model.label_words.negative": "bad",
            "data.train": str(root / "train.csv"), "data.test": str(root / "test.csv"),
            "data.public": str(root / "public.jsonl"), "seed": 3,
            "tune.epochs": 2.0, "tune.batch_size": 16, "tune.target_epsilon": 8.0, "prompt.num_virtual_tokens": 4,
            "transfer.steps": 4, "transfer.batch_size": 8, "output_dir": str(tmp / "run"),
            "federated.rounds": 2, "federated.num_clients": 6, "federated.fraction_train": 0.5,
            "federated.min_clients": 2, "federated.client_cache_dir": str(tmp / "cache")}
    flat.update(over)
    return flat


def run_local(flat, tamper=None, after_round=None):
    run_cfg, fed = F.build_configs(flat)
    server = F.FederatedServer(run_cfg, fed)
    transport = F.LocalTransport(server, run_cfg, fed, tamper)
    return F.run_federated(server, transport, after_round), server, transport


def test_build_configs_from_flat_run_config(fed_root, tmp_path):
    run_cfg, fed = F.build_configs(fed_flat(fed_root, tmp_path, **{"federated.aggregation": "uniform"}))
    assert fed.rounds == 2 and fed.aggregation == "uniform" and run_cfg.tune.batch_size == 16
    assert run_cfg.model.label_words == {"positive": ["good"], "negative": ["bad"]}
    assert fed.clients_per_round == 3
    with pytest.raises(ConfigError, match="federated.*roundz"):
        F.build_configs({"federated.roundz": 2})
    with pytest.raises(ConfigError, match="min_clients"):
        F.build_configs({"federated.min_clients": 20, "federated.num_clients": 10})
    with pytest.raises(ConfigError, match="secagg"):
        F.build_configs({"federated.secagg": True, "federated.max_update_norm": math.inf})
    with pytest.raises(ConfigError, match="fedavg: DP clients do not reveal"):
        F.build_configs({"federated.aggregation": "fedavg"})  # DP-SGD is on by default
    assert F.resolve_aggregation(fed, run_cfg) == "uniform"
    _, plain = F.build_configs({"federated.aggregation": "fedavg", "tune.dp": False})
    assert plain.aggregation == "fedavg"
    with pytest.raises(ConfigError, match="distributed needs federated.secagg"):
        F.build_configs({"federated.user_dp": True, "federated.user_dp_noise": "distributed"})
    with pytest.raises(ConfigError, match="user-level DP.*uniform"):
        F.build_configs({"federated.user_dp": True, "federated.aggregation": "median"})
    with pytest.raises(ConfigError, match="user_dp_delta"):
        F.build_configs({"federated.user_dp": True, "federated.user_dp_delta": 0.2})[1].resolved_user_delta
    _, sec = F.build_configs({"federated.secagg": True, "federated.user_dp": True})
    assert sec.user_noise_mode == "distributed"  # the default under SecAgg+: the server never sees the sum
    again = F.build_configs(F.flatten_configs(run_cfg, fed))
    assert again == (run_cfg, fed)


def test_rounds_results_and_privacy(fed_root, tmp_path):
    shipping._STUDENTS.clear()
    results, server, transport = run_local(fed_flat(fed_root, tmp_path))
    run = tmp_path / "run"
    assert transport.model_sends == 1  # one process, one copy of the student
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["sampled"] == 3 and r["valid"] == 3 for r in results["rounds"])
    assert all(0 <= r["test_accuracy"] <= 1 for r in results["rounds"])
    acc = results["accuracy"]
    assert set(acc) == {"student_zero_shot", "student_federated_prompt", "teacher_zero_shot",
                        "teacher_direct_prompt", "teacher_transferred_prompt"}
    eps = results["privacy"]["sample_level"]["epsilon_per_client"]
    assert eps and all(0 < e <= 8.0 + 1e-6 for e in eps.values())
    assert "ledger" in results["privacy"]["sample_level"]["source"]
    assert set(eps) == {str(c) for c in server.clients}  # every client that trained, from its own ledger
    assert results["privacy"]["user_level"] is None
    assert "not_private" not in results and "examples" not in results["rounds"][0]  # DP: sizes stay local
    assert results["privacy"]["aggregation"] == "uniform" and results["privacy"]["max_update_norm"] > 0
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["rounds"][-1]["round"] == 2
    prompt, cfg = load_prompt(run / "prompt_teacher", expected_dim=32)
    assert cfg["peft_type"] == "PROMPT_TUNING" and prompt.num_virtual_tokens == 4
    assert (run / "checkpoint" / F.CHECKPOINT_FILE).is_file()
    assert (run / "transfer_curve.csv").is_file() and results["transfer"]["alpha_used"] == TransferConfig().alpha == 1.0
    assert 0 <= results["transfer"]["best_step"] <= results["transfer"]["steps"]


def test_bad_updates_are_rejected_and_round_continues(fed_root, tmp_path, caplog):
    def tamper(u):
        if u.client_id == min(sampled_first):
            u.delta = u.delta.copy()
            u.delta[0, 0] = np.nan
        return u

    run_cfg, fed = F.build_configs(fed_flat(fed_root, tmp_path, **{"federated.rounds": 1}))
    server = F.FederatedServer(run_cfg, fed)
    server.prepare()
    sampled_first = server.sample(1, list(range(6)))
    results, _, _ = run_local(fed_flat(fed_root, tmp_path, **{"federated.rounds": 1}), tamper)
    row = results["rounds"][0]
    bad = str(min(sampled_first))
    assert row["valid"] == 2 and list(row["rejected"]) == [bad]
    assert "non-finite" in row["rejected"][bad]
    assert "rejected update of client" in caplog.text
    # the rejected client trained on its data: it still counts in the privacy report (finding 9)
    priv = results["privacy"]["sample_level"]
    assert 0 < priv["epsilon_per_client"][bad] <= 8.0 + 1e-6
    assert priv["rejected_rounds_per_client"] == {bad: [1]}
    assert set(priv["epsilon_per_client"]) == {str(c) for c in sampled_first}


def test_norm_bound_and_min_clients_failure(fed_root, tmp_path):
    def blow_up(u):
        u.delta = u.delta * 0 + 1e3
        return u

    flat = fed_flat(fed_root, tmp_path, **{"federated.max_update_norm": 10.0, "federated.rounds": 1})
    with pytest.raises(RoundFailedError, match=r"round 1 failed: 0 valid update\(s\) from 3 sampled client\(s\) "
                                               r"\(3 rejected, 0 failed or missing\), but at least 2"):
        run_local(flat, blow_up)


class Killed(Exception):
    pass


def _kill_after_first(rnd):
    if rnd == 1:
        raise Killed


def test_resume_after_kill_is_bit_exact_in_insecure_mode(fed_root, tmp_path):
    """insecure_reproducible seeds every mechanism: a resumed run repeats an uninterrupted one bit for bit,
    and its results carry the NOT PRIVATE label."""
    from post_fl.privacy.randomness import NOT_PRIVATE_LABEL

    over = {"federated.rounds": 3, "insecure_reproducible": True}
    full, server_a, _ = run_local(fed_flat(fed_root, tmp_path / "a", **over))
    flat_b = fed_flat(fed_root, tmp_path / "b", **over)
    with pytest.raises(Killed):
        run_local(flat_b, after_round=_kill_after_first)
    resumed, server_b, _ = run_local(flat_b)  # a new server and fresh clients: checkpoint + ledgers only
    assert np.array_equal(server_a.prompt, server_b.prompt)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(full["rounds"]) == strip(resumed["rounds"])
    assert full["privacy"]["sample_level"]["epsilon_per_client"] == \
        resumed["privacy"]["sample_level"]["epsilon_per_client"]
    assert full["accuracy"] == resumed["accuracy"]
    assert resumed["not_private"] == NOT_PRIVATE_LABEL == resumed["privacy"]["not_private"]
    on_disk = json.loads((tmp_path / "b" / "run" / "results.json").read_text())
    assert on_disk["not_private"] == NOT_PRIVATE_LABEL
    meta = json.loads((tmp_path / "b" / "run" / "prompt_teacher" / "post_fl.json").read_text())
    assert NOT_PRIVATE_LABEL in json.dumps(meta)
    # a checkpoint from other settings is refused, not silently mixed in
    with pytest.raises(ValueError, match="different settings"):
        run_local({**flat_b, "tune.lr": 0.5})


def test_resume_with_fresh_noise_keeps_rounds_and_accounting(fed_root, tmp_path):
    """With fresh DP noise a resumed run is not bit-identical, but it runs the same rounds, samples the
    same clients and every client's ledger holds the same epsilon as in an uninterrupted run."""
    full, server_a, _ = run_local(fed_flat(fed_root, tmp_path / "a", **{"federated.rounds": 3}))
    flat_b = fed_flat(fed_root, tmp_path / "b", **{"federated.rounds": 3})
    with pytest.raises(Killed):
        run_local(flat_b, after_round=_kill_after_first)
    resumed, server_b, _ = run_local(flat_b)
    assert not np.array_equal(server_a.prompt, server_b.prompt)  # fresh noise: no bit-exact repeat
    key = lambda rows: [(r["round"], r["sampled"], r["valid"]) for r in rows]  # noqa: E731
    assert key(full["rounds"]) == key(resumed["rounds"]) == [(1, 3, 3), (2, 3, 3), (3, 3, 3)]
    pa, pb = full["privacy"]["sample_level"], resumed["privacy"]["sample_level"]
    assert pa["rounds_per_client"] == pb["rounds_per_client"]
    assert pa["epsilon_per_client"].keys() == pb["epsilon_per_client"].keys()
    for c, e in pa["epsilon_per_client"].items():
        assert math.isclose(e, pb["epsilon_per_client"][c], rel_tol=1e-9)
    assert "not_private" not in resumed


def test_two_runs_with_the_same_seed_give_different_dp_outputs(fed_root, tmp_path):
    """Fresh OS entropy: the same seed, data and settings give different released prompts (they would be
    equal if the DP-SGD noise or batches were seeded from the config)."""
    over = {"federated.rounds": 1, "transfer.steps": 1}
    _, a, _ = run_local(fed_flat(fed_root, tmp_path / "a", **over))
    _, b, _ = run_local(fed_flat(fed_root, tmp_path / "b", **over))
    assert not np.allclose(a.prompt, b.prompt)
    over["insecure_reproducible"] = True
    _, c, _ = run_local(fed_flat(fed_root, tmp_path / "c", **over))
    _, d, _ = run_local(fed_flat(fed_root, tmp_path / "d", **over))
    assert np.array_equal(c.prompt, d.prompt)


def test_user_level_dp(fed_root, tmp_path):
    flat = fed_flat(fed_root, tmp_path, **{"federated.user_dp": True, "federated.user_dp_clip": 0.5,
                                           "federated.user_dp_target_epsilon": 20.0,
                                           "federated.fraction_train": 0.6, "federated.min_clients": 1})
    results, server, _ = run_local(flat)
    user = results["privacy"]["user_level"]
    assert 0 < user["epsilon_against_world"] <= 20.0 + 1e-6 and user["rounds"] == 2
    assert user["noise_multiplier"] > 0 and user["delta"] == min(1e-5, 1 / 60)
    assert user["noise"] == "server" and user["trusts_server"] and user["epsilon_against_server"] == math.inf
    assert user["target_judged_against"] == "world"  # server noise: nothing can be met against the server
    assert all(not math.isnan(r["update_norm"]) for r in results["rounds"])


def test_user_dp_round_with_a_tiny_poisson_sample_never_fails(fed_root, tmp_path):
    """Finding 10: a Poisson sample below min_clients (even empty) still releases the noised sum / (q N)
    and counts in the accountant; the run does not fail."""
    flat = fed_flat(fed_root, tmp_path, **{"federated.user_dp": True, "federated.fraction_train": 0.05,
                                           "federated.min_clients": 3, "federated.rounds": 4,
                                           "federated.user_dp_noise_multiplier": 1.0, "transfer.steps": 1})
    results, server, _ = run_local(flat)
    rows = results["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert any(r["sampled"] < 3 for r in rows)
    assert results["privacy"]["user_level"]["rounds"] == 4  # every released round is accounted
    assert all(r["update_norm"] > 0 for r in rows)  # noise is released even when nobody was sampled


def test_securely_aggregated_mean_is_used_as_is(fed_root, tmp_path):
    """With secure aggregation the server only sees the mean (and per-client metrics): it applies it unchanged."""
    from post_fl.federated.aggregate import aggregate_updates

    class SecureLocal(F.LocalTransport):
        def train_round(self, server_round, prompt, instructions):
            plain = super().train_round(server_round, prompt, instructions)
            assert all(ins["clip"] == 5.0 for ins in instructions.values())  # clients clip before masking
            assert all(set(ins) == {"round", "model-hash", "clip"} for ins in instructions.values())  # no seed
            self.mean = aggregate_updates(plain.updates, "uniform")
            return F.RoundReplies(metrics=plain.metrics, secure_mean=self.mean, secure_count=len(plain.updates))

    flat = fed_flat(fed_root, tmp_path, **{"federated.rounds": 1, "federated.secagg": True,
                                           "federated.max_update_norm": 5.0})
    run_cfg, fed = F.build_configs(flat)
    server = F.FederatedServer(run_cfg, fed)
    server.prepare()
    start = server.prompt.copy()
    transport = SecureLocal(server, run_cfg, fed)
    sampled = server.sample(1, transport.client_ids())
    row = server.complete_round(1, sampled, transport.train_round(1, server.prompt,
                                                                  server.instructions(1, sampled)))
    np.testing.assert_allclose(server.prompt, start + transport.mean, rtol=1e-6)
    assert row["valid"] == 3 and row["rejected"] == {}


def test_client_with_empty_partition_fails_alone_in_local_runs(fed_root, tmp_path, monkeypatch):
    """A client whose partition is empty (e.g. under strong Dirichlet skew) is reported as failed;
    the round goes on with the others, as it does under Flower."""
    real = F.client_partition

    def partition(cfg, fed, cid):
        data = real(cfg, fed, cid)
        return TextDataset([], [], data.label_names) if cid == 0 else data

    monkeypatch.setattr(local_transport, "client_partition", partition)  # where LocalTransport looks it up
    flat = fed_flat(fed_root, tmp_path, **{"federated.rounds": 1, "federated.fraction_train": 1.0})
    results, _, _ = run_local(flat)
    row = results["rounds"][0]
    assert row["valid"] == 5 and "partition is empty" in row["failed"]["0"]


def test_default_norm_bound_rejects_a_poisoned_update(fed_root, tmp_path):
    """max_update_norm = 0 derives the bound 5 x |P_0|: honest (client-clipped) updates pass, an update
    100 x |P_0| long is rejected, and the round goes on."""
    def poison(u):
        if u.client_id == 0:
            u.delta = u.delta / max(np.linalg.norm(u.delta), 1e-12) * 100 * p0
        return u

    run_cfg, fed = F.build_configs(fed_flat(fed_root, tmp_path, **{"federated.rounds": 1}))
    probe = F.FederatedServer(run_cfg, fed)
    probe.prepare()
    p0 = float(np.linalg.norm(probe.prompt))
    assert probe.max_norm == pytest.approx(5 * p0)
    flat = fed_flat(fed_root, tmp_path, **{"federated.rounds": 1, "federated.fraction_train": 1.0,
                                           "transfer.steps": 1})
    results, server, _ = run_local(flat, poison)
    row = results["rounds"][0]
    assert list(row["rejected"]) == ["0"] and "above the bound" in row["rejected"]["0"]
    assert row["valid"] == 5 and row["update_norm"] <= server.max_norm


def test_every_client_gets_the_configured_minimum_or_the_split_is_refused(fed_root, tmp_path):
    """federated.min_partition_size reaches the partitioner: a strongly skewed Dirichlet split still gives
    each client that many examples, and a minimum the data cannot meet is refused with the numbers."""
    from post_fl.core.data import DataError

    flat = fed_flat(fed_root, tmp_path, **{"federated.partitioning": "dirichlet", "federated.dirichlet_alpha": 0.05,
                                           "federated.min_partition_size": 3})
    run_cfg, fed = F.build_configs(flat)
    sizes = [len(F.client_partition(run_cfg, fed, c)) for c in range(fed.num_clients)]
    assert min(sizes) >= 3, sizes
    run_cfg, fed = F.build_configs({**flat, "federated.min_partition_size": 1000})
    with pytest.raises(DataError, match="1000"):
        F.client_partition(run_cfg, fed, 0)


def test_finish_uses_given_teacher_zero_shot_scores_and_checks_their_shape(fed_root, tmp_path):
    import torch

    run_cfg, fed = F.build_configs(fed_flat(fed_root, tmp_path, **{"federated.rounds": 1}))
    server = F.FederatedServer(run_cfg, fed)
    server.prepare()
    n = len(server.test)
    labels = torch.tensor(server.test.labels)
    # scores that put every example on its true class except the first: accuracy (n - 1) / n exactly
    scores = torch.nn.functional.one_hot(labels, server.teacher.num_classes).float()
    scores[0] = scores[0].flip(0)
    server.teacher_zero_shot_scores = scores
    assert server._teacher_zero_shot_accuracy(8) == pytest.approx((n - 1) / n)
    server.teacher_zero_shot_scores = scores[:-1]
    with pytest.raises(ValueError, match="teacher_zero_shot_scores has shape"):
        server._teacher_zero_shot_accuracy(8)
    server.teacher_zero_shot_scores = None
    from post_fl.method.evaluate import accuracy

    assert server._teacher_zero_shot_accuracy(8) == pytest.approx(accuracy(server.teacher, server.test, None, 8))
