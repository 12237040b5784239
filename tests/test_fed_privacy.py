"""What a federated client reveals and spends (issue 10): clipping, DP-FedAvg noise, distributed DP under
SecAgg+, the site's own budget, what crosses the wire, insecure mode, node binding, one-line failures.
Issue 22: user-level epsilon against the world and against the server, and fresh server noise, client
sample and noise shares (each test fails under a mutation of ``benchmarks/privacy_mutations.py``)."""

import json
import logging
import math

import numpy as np
import pytest
from conftest import make_sentiment
from test_federated import fed_flat

from post_fl.federated import client as fed_client
from post_fl import federated as F
from post_fl.federated import shipping
from post_fl.federated.aggregate import ClientUpdate
from post_fl.privacy.ledger import BudgetExhausted, PrivacyLedger, dataset_sha256, read_ledgers


def _apps(flat, after_round=None):
    from client_app.app import make_client_app
    from server_app.app import make_server_app

    return make_server_app(flat, after_round), make_client_app(flat)


def _server(flat):
    run_cfg, fed = F.build_configs(flat)
    server = F.FederatedServer(run_cfg, fed)
    server.prepare()
    return server, run_cfg, fed


def test_train_client_update_is_clipped(fed_root, tmp_path):
    """The update a client releases has L2 norm <= clip (it would be ~100x larger unclipped)."""
    server, run_cfg, fed = _server(fed_flat(fed_root, tmp_path, **{"tune.lr": 0.5}))
    data = F.client_partition(run_cfg, fed, 0)
    ledger = F.open_ledger(run_cfg, data, 0)
    free = F.train_client(server.student, server.prompt, data, run_cfg, fed, 1, 0, 0.0, ledger)
    norm_free = float(np.linalg.norm(free.delta))
    clip = norm_free / 100
    res = F.train_client(server.student, server.prompt, data, run_cfg, fed, 2, 0, clip, ledger)
    assert float(np.linalg.norm(res.delta)) <= clip * (1 + 1e-5)
    assert norm_free > 10 * clip
    assert set(res.metrics) == set(F.DP_REPLY_METRIC_KEYS)  # nothing else may leave a DP client


def test_dp_fedavg_clips_on_the_server_and_adds_noise_of_std_sigma_c_over_qn(fed_root, tmp_path):
    """complete_round on updates of norm 1e3 >> C releases (sum of clipped + N(0, (sigma C)^2)) / (q N):
    the residual has mean ~0 along the update direction (server-side clipping) and std sigma C / (q N)."""
    C, sigma, q, n = 0.5, 1.3, 0.5, 6
    flat = fed_flat(fed_root, tmp_path, **{"federated.user_dp": True, "federated.user_dp_clip": C,
                                           "federated.user_dp_noise_multiplier": sigma,
                                           "federated.fraction_train": q, "federated.rounds": 1000,
                                           "federated.eval_every": 1000})
    server, _, _ = _server(flat)
    shape = server.prompt.shape
    direction = np.random.default_rng(0).normal(size=shape)
    direction /= np.linalg.norm(direction)
    big = (1e3 * direction).astype(np.float32)
    residuals = []
    for rnd in range(1, 41):
        before = server.prompt.astype(np.float64).copy()
        ups = [ClientUpdate(c, big.copy(), None, {"round": rnd}) for c in range(3)]
        server.complete_round(rnd, [0, 1, 2], F.RoundReplies(updates=ups, metrics={c: {} for c in range(3)}))
        released = server.prompt.astype(np.float64) - before
        residuals.append(released * q * n - 3 * C * direction)  # minus the clipped sum
    r = np.stack(residuals)
    along = (r.reshape(len(r), -1) @ direction.ravel())
    assert abs(along.mean()) < 4 * sigma * C / math.sqrt(len(r))  # unclipped it would be ~3e3
    assert r.std() == pytest.approx(sigma * C, rel=0.08)  # noise removed: 0
    assert server.user_dp_rounds == 40


def test_repeated_calls_stop_before_the_budget_is_exceeded(fed_root, tmp_path):
    """A client's ledger persists across runs: with budget (= target) 2, calls stop before epsilon passes 2."""
    flat = fed_flat(fed_root, tmp_path, **{"tune.target_epsilon": 2.0, "federated.rounds": 2})
    server, run_cfg, fed = _server(flat)
    data = F.client_partition(run_cfg, fed, 1)
    done, spent = 0, []
    with pytest.raises(BudgetExhausted) as err:
        for rnd in range(1, 6):
            ledger = F.open_ledger(run_cfg, data, 1)  # opened afresh: a new run on the same data
            res = F.train_client(server.student, server.prompt, data, run_cfg, fed, rnd, 1, 0.0, ledger)
            spent.append(res.private["epsilon"])
            done += 1
    assert done == 2 and 0 < spent[0] < spent[1] <= 2.0 + 1e-6
    assert err.value.budget == 2.0 and err.value.after > 2.0 and err.value.spent == pytest.approx(spent[-1])
    assert "budget-exhausted" in str(err.value)
    ledger = F.open_ledger(run_cfg, data, 1)
    assert len(ledger.entries()) == 2 and ledger.epsilon(err.value.delta) <= 2.0 + 1e-6
    assert ledger.path.name == f"{dataset_sha256(data)}.json"


def test_ledger_refuses_a_damaged_file(tmp_path):
    led = PrivacyLedger.open(tmp_path, "ab" * 32, 3.0)
    led.record(1.0, 0.1, 10, 1e-5, "r", 1)
    led.path.write_text("{not json")
    with pytest.raises(ValueError, match="privacy ledger unreadable"):
        led.check(1.0, 0.1, 10, 1e-5)


def _train_replies(grid):
    return [m for m in grid.received if m.metadata.message_type == "train" and not m.has_error()]


def test_dp_replies_carry_only_the_noised_update(fed_root, tmp_path):
    """Under DP a train reply holds the update and the round number: no loss, no example count, no
    epsilon/delta/steps/sample rate (all reveal n). Plain Flower messages and SecAgg+ messages alike."""
    from simulation.inprocess import run_inprocess

    shipping._STUDENTS.clear()
    flat = fed_flat(fed_root, tmp_path, **{"federated.rounds": 1})
    grid = run_inprocess(*_apps(flat), 6)
    for m in grid.sent:
        if m.metadata.message_type == "train":
            assert set(m.content.config_records[F.TRAIN_CONFIG_RECORD]) == {"round", "model-hash", "clip"}
    replies = _train_replies(grid)
    assert len(replies) == 3
    for m in replies:
        c = m.content
        assert not c.config_records
        assert {k: set(v) for k, v in c.array_records.items()} == {F.REPLY_UPDATE_RECORD: {"delta"}}
        assert {k: dict(v) for k, v in c.metric_records.items()} == {F.REPLY_METRICS_RECORD: {"round": 1}}
    # SecAgg+ (+ distributed user DP): every client->server train message, all stages
    shipping._STUDENTS.clear()
    flat = fed_flat(fed_root, tmp_path / "s", **{"federated.rounds": 1, "federated.secagg": True,
                                                 "federated.user_dp": True, "federated.fraction_train": 1.0,
                                                 "federated.user_dp_noise_multiplier": 1.0})
    grid = run_inprocess(*_apps(flat), 6)
    replies = _train_replies(grid)
    assert replies
    forbidden = ("loss", "num-examples", "epsilon", "delta", "steps", "sample-rate", "noise-multiplier")
    for m in replies:
        c = m.content
        for rec in c.metric_records.values():  # the legacy FitRes layout adds num_examples: equal weights, 1
            assert set(rec) <= {"round", "num_examples"} and rec.get("num_examples", 1) == 1, dict(rec)
        for name, rec in c.config_records.items():
            assert not set(rec) & set(forbidden), (name, dict(rec))
        assert all(len(a) == 0 for a in c.array_records.values())  # the update travels masked only
    assert json.loads((tmp_path / "s" / "run" / "results.json").read_text())["rounds"][0]["valid"] == 6


def test_secagg_with_user_dp_aggregate_carries_the_clients_noise(fed_root, tmp_path):
    """Distributed DP: the clients' shares are in the securely aggregated sum (the server adds nothing when
    >= min_clients shares arrive). Each clipped update has norm <= C, so without the shares the released
    sum could not exceed k C; with them its norm is ~ sigma C sqrt(k d / m)."""
    from simulation.inprocess import run_inprocess

    shipping._STUDENTS.clear()
    C, sigma, k, m = 0.5, 10.0, 6, 2
    flat = fed_flat(fed_root, tmp_path, **{"federated.rounds": 1, "federated.secagg": True,
                                           "federated.user_dp": True, "federated.fraction_train": 1.0,
                                           "federated.user_dp_clip": C, "federated.user_dp_noise_multiplier": sigma,
                                           "federated.min_clients": m, "eval.batch_size": 64})
    run_inprocess(*_apps(flat), 6)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    row, user = res["rounds"][0], res["privacy"]["user_level"]
    assert row["valid"] == k and user["noise"] == "distributed"
    assert user["rounds_with_fewer_than_min_clients_shares"] == 0
    from post_fl.privacy.user_dp import user_level_epsilon

    # k >= m shares: against the server the round is charged at sigma, without amplification (rate 1)
    assert user["epsilon_against_server"] == pytest.approx(user_level_epsilon(sigma, 1.0, 1, user["delta"]))
    d = 4 * 32  # prompt entries
    released_sum = row["update_norm"] * 1.0 * k  # q N = 6
    expected = sigma * C * math.sqrt(k * d / m)
    assert released_sum > 10 * k * C  # shares zeroed: at most k C
    assert released_sum == pytest.approx(expected, rel=0.25)


def test_secagg_server_noise_is_opt_in_and_labelled(fed_root, tmp_path):
    from simulation.inprocess import run_inprocess

    shipping._STUDENTS.clear()
    flat = fed_flat(fed_root, tmp_path, **{"federated.rounds": 1, "federated.secagg": True,
                                           "federated.user_dp": True, "federated.user_dp_noise": "server",
                                           "federated.fraction_train": 1.0,
                                           "federated.user_dp_noise_multiplier": 3.0})
    run_inprocess(*_apps(flat), 6)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    user = res["privacy"]["user_level"]
    assert user["noise"] == "server" and user["trusts_server"] and user["epsilon_against_server"] == "inf"
    assert math.isfinite(user["epsilon_against_world"]) and user["against_server"].startswith("none")
    assert "trusts the server" in user["unit"]
    assert res["rounds"][0]["update_norm"] * 6 > 3 * 6 * 1.0  # k C = 6 at most without noise; ~34 with it


def _sites(grid, tmp_path, sizes, budget=None, ledger=True):
    from post_fl.core.data import write_text_file

    for i, ctx in enumerate(grid.contexts.values()):
        path = tmp_path / f"site{i}.csv"
        if not path.exists():
            write_text_file(make_sentiment(sizes[i], seed=40 + i), path)
        ctx.node_config.update({"data-path": str(path), "dataset-name": f"site{i}", "labels": "negative,positive"})
        if budget is not None:
            ctx.node_config["privacy-budget-epsilon"] = budget
        if ledger:
            ctx.node_config["privacy-ledger"] = str(tmp_path / f"ledger{i}")


def _serve(server_app, grid):
    from flwr.app import Context, RecordDict

    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))


def test_sites_refuse_beyond_their_budget_and_the_server_records_it(fed_root, tmp_path):
    """A second run on the same site files continues their ledgers: every site refuses with the fixed code
    ``refused: budget`` (and nothing else: spent/budget/delta stay on the site), the server records it per
    client, the user-DP run still ends."""
    from simulation.inprocess import InProcessGrid

    over = {"federated.rounds": 2, "federated.num_clients": 3, "federated.fraction_train": 1.0,
            "federated.user_dp": True, "federated.user_dp_noise_multiplier": 1.0, "tune.target_epsilon": 3.0,
            "transfer.steps": 1}
    for run in ("first", "second"):
        shipping._STUDENTS.clear()
        flat = fed_flat(fed_root, tmp_path / run, **over)
        server_app, client_app = _apps(flat)
        grid = InProcessGrid(client_app, 3)
        _sites(grid, tmp_path, [12, 16, 20], budget=3.0)
        _serve(server_app, grid)
    first = json.loads((tmp_path / "first" / "run" / "results.json").read_text())
    second = json.loads((tmp_path / "second" / "run" / "results.json").read_text())
    assert all(r["valid"] == 3 for r in first["rounds"])
    # the server of a deployment cannot read the sites' ledgers: it does not claim their epsilon
    assert first["privacy"]["sample_level"]["epsilon_per_client"] == {}
    assert "site" in first["privacy"]["sample_level"]["source"]
    refused = second["privacy"]["sample_level"]["refused"]
    assert sorted(refused) == ["0", "1", "2"]
    for info in refused.values():
        assert info == {"round": 2, "status": F.BUDGET_EXHAUSTED}  # its last refusal: the code, nothing else
    assert all(r["valid"] == 0 and len(r["refused"]) == 3 for r in second["rounds"])
    for i in range(3):  # each site's own ledger: both rounds of the first run, nothing of the second
        (led,) = read_ledgers(tmp_path / f"ledger{i}").values()
        assert led["rounds"] == 2 and led["epsilon"] <= 3.0 + 1e-6


def test_deployed_site_needs_a_budget_and_refuses_insecure_runs(fed_root, tmp_path):
    from simulation.inprocess import InProcessGrid

    from post_fl.core.config import RunConfig

    with pytest.raises(F.SiteInputInvalid, match="privacy-budget-epsilon"):
        F.site_budget(RunConfig(), {"data-path": "x.csv"})
    assert F.site_budget(RunConfig(), {}) == RunConfig().tune.target_epsilon  # simulation default
    insecure = RunConfig(insecure_reproducible=True)
    with pytest.raises(F.ClientRefusal, match="allow-insecure-reproducible"):
        F.check_site_allows(insecure, {"data-path": "x.csv"})
    F.check_site_allows(insecure, {"data-path": "x.csv", "allow-insecure-reproducible": "true"})
    F.check_site_allows(insecure, {})  # simulation: the operator's own virtual clients
    shipping._STUDENTS.clear()
    flat = fed_flat(fed_root, tmp_path, **{"federated.rounds": 1, "federated.num_clients": 3,
                                           "federated.fraction_train": 1.0, "federated.min_clients": 1,
                                           "insecure_reproducible": True, "transfer.steps": 1})
    server_app, client_app = _apps(flat)
    grid = InProcessGrid(client_app, 3)
    _sites(grid, tmp_path, [12, 16, 20], budget=8.0)
    list(grid.contexts.values())[2].node_config["allow-insecure-reproducible"] = "true"
    _serve(server_app, grid)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    row = res["rounds"][0]
    assert row["valid"] == 1 and row["refused"] == {"0": F.REFUSED_INSECURE, "1": F.REFUSED_INSECURE}
    assert "NOT PRIVATE" in res["not_private"]


def _one_round_grid(fed_root, tmp_path, nodes: int):
    """A 1-round, all-clients federation (6 partitions) as (ServerApp, in-process grid of ``nodes`` nodes)."""
    from simulation.inprocess import InProcessGrid

    shipping._STUDENTS.clear()
    flat = fed_flat(fed_root, tmp_path, **{"federated.rounds": 1, "federated.fraction_train": 1.0,
                                           "transfer.steps": 1})
    server_app, client_app = _apps(flat)
    return server_app, InProcessGrid(client_app, nodes)


def test_duplicate_client_id_from_a_second_node_is_refused(fed_root, tmp_path, caplog):
    server_app, grid = _one_round_grid(fed_root, tmp_path, 7)
    contexts = list(grid.contexts.values())
    contexts[6].node_config.update({"partition-id": 2, "num-partitions": 6})  # an impostor claims client 2
    for ctx in contexts[:6]:
        ctx.node_config["num-partitions"] = 6
    with caplog.at_level(logging.WARNING):
        _serve(server_app, grid)
    assert "claims client id 2, already bound to node" in caplog.text
    row = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"][0]
    assert row["sampled"] == 6 and row["valid"] == 6
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert contexts[6].node_id not in {m.metadata.dst_node_id for m in trains}


def test_failure_reasons_are_one_line():
    ray = ("\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=123, ip=10.0.0.1)\nTraceback (most recent call last):\n"
           '  File "/x/app.py", line 3, in train\n    raise ValueError("boom")\n    ^^^^^^^^^^^^\n'
           "\x1b[31mValueError: round 1: this client's partition is empty\x1b[0m\n\n")
    assert F.one_line_reason(ray) == "ValueError: round 1: this client's partition is empty"
    assert F.one_line_reason("") == "unknown error (empty reason)"
    assert len(F.one_line_reason("x" * 1000)) == 300
    assert "\n" not in F.one_line_reason("a\nb\nc") and F.one_line_reason("a\nb\nc") == "c"


def test_failed_client_reason_in_results_is_one_line(fed_root, tmp_path, monkeypatch):
    """A client error with a multi-line, coloured reason is stored as its last meaningful line."""
    server_app, grid = _one_round_grid(fed_root, tmp_path, 6)
    real = grid.client_app

    def flaky(msg, ctx):
        if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 0:
            raise RuntimeError("\x1b[31mTraceback (most recent call last):\n  File \"x\"\nKeyError: 'gone'\x1b[0m")
        return real(msg, ctx)

    grid.client_app = flaky
    _serve(server_app, grid)
    failed = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"][0]["failed"]
    assert list(failed) == ["0"]
    assert "\n" not in failed["0"] and "\x1b" not in failed["0"] and failed["0"].endswith("KeyError: 'gone'")


def test_budget_refusals_are_recorded_under_secagg(fed_root, tmp_path):
    """Under SecAgg+ a refusing client drops out of the protocol; the server still records its
    fixed code ``refused: budget`` per client, and the user-DP round still releases (noise only)."""
    from simulation.inprocess import InProcessGrid

    over = {"federated.rounds": 1, "federated.num_clients": 3, "federated.fraction_train": 1.0,
            "federated.secagg": True, "federated.user_dp": True, "federated.user_dp_noise_multiplier": 1.0,
            "tune.target_epsilon": 3.0, "transfer.steps": 1}
    for run in ("first", "second"):
        shipping._STUDENTS.clear()
        server_app, client_app = _apps(fed_flat(fed_root, tmp_path / run, **over))
        grid = InProcessGrid(client_app, 3)
        for i, ctx in enumerate(grid.contexts.values()):  # the same virtual sites, ledgers kept across runs
            ctx.node_config.update({"privacy-ledger": str(tmp_path / f"ledger{i}"), "privacy-budget-epsilon": 3.0})
        _serve(server_app, grid)
    first = json.loads((tmp_path / "first" / "run" / "results.json").read_text())
    second = json.loads((tmp_path / "second" / "run" / "results.json").read_text())
    assert first["rounds"][0]["valid"] == 3
    row = second["rounds"][0]
    assert row["valid"] == 0 and sorted(row["refused"]) == ["0", "1", "2"]
    assert all(why == F.BUDGET_EXHAUSTED for why in row["refused"].values())
    user = second["privacy"]["user_level"]
    assert user["rounds"] == 1 and user["rounds_with_fewer_than_min_clients_shares"] == 1  # topped up by the server
    assert user["epsilon_against_server"] == 0.0  # nobody's update was in that release


def test_a_round_lost_by_the_server_still_counts_in_the_clients_ledgers(fed_root, tmp_path, monkeypatch):
    """Write-ahead accounting: the server dies after the clients trained round 2 but before it checkpointed.
    On resume round 2 is run again with fresh noise; the first, lost release stays charged in the ledgers.
    With the simulation's default budget (= the target, all spent by rounds 1 and 2) the clients then refuse
    the repeat; with a larger site budget the repeat runs and the ledgers hold three rounds."""
    from post_fl.federated.aggregate import RoundFailedError
    from test_federated import run_local

    class Crash(Exception):
        pass

    real = F.FederatedServer.complete_round

    def crash_in_round_2(self, rnd, sampled, replies):
        if rnd == 2:
            raise Crash
        return real(self, rnd, sampled, replies)

    def crashed_run(flat):
        monkeypatch.setattr(F.FederatedServer, "complete_round", crash_in_round_2)
        with pytest.raises(Crash):
            run_local(flat)
        monkeypatch.setattr(F.FederatedServer, "complete_round", real)

    over = {"federated.rounds": 2, "federated.fraction_train": 1.0, "transfer.steps": 1}
    flat = fed_flat(fed_root, tmp_path / "default", **over)
    crashed_run(flat)
    with pytest.raises(RoundFailedError, match="round 2 failed.*6 refused"):
        run_local(flat)  # the lost round 2 was charged: repeating it would exceed the budget
    monkeypatch.setattr(fed_client, "site_budget", lambda run_cfg, node_config=None: 100.0)  # open_ledger's
    flat = fed_flat(fed_root, tmp_path / "roomy", **over)
    crashed_run(flat)
    results, server, _ = run_local(flat)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    ledgers = read_ledgers(tmp_path / "roomy" / "run" / F.LEDGER_DIR_NAME)
    assert len(ledgers) == 6 and all(v["rounds"] == 3 for v in ledgers.values())  # 1, 2 (lost), 2 again
    assert all(server.clients[c]["rounds"] == [1, 2] for c in range(6))
    eps = results["privacy"]["sample_level"]["epsilon_per_client"]
    assert all(eps[str(c)] == pytest.approx(ledgers[c]["epsilon"]) for c in range(6))
    assert all(e > 8.0 for e in eps.values())  # three rounds' worth of a noise calibrated for two


# ---------------------------------------------------------------- issue 22: user-level epsilon, and against whom
def _rdp_epsilon_reference(history, delta):
    """Epsilon of a history of (sigma, q, rounds) sampled Gaussians, by the RDP formula written in
    test_dp_mechanisms (integer orders; Mironov et al. 2019 and the conversion of Balle et al. 2020)."""
    from test_dp_mechanisms import _log_a_sampled_gaussian

    best = math.inf
    for alpha in range(2, 64):
        rdp = sum(n * _log_a_sampled_gaussian(q, s, alpha) for s, q, n in history) / (alpha - 1)
        best = min(best, rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha))
    return best


def test_user_level_epsilon_is_reported_against_the_world_and_against_the_server(fed_root, tmp_path):
    """Distributed DP-FedAvg over 7 rounds whose SecAgg+ sums held 6, 4, 3, 2, 0, 1 and 5 clients' updates
    (m = min_clients = 3): against the world the accountant credits the server's Poisson sampling (rate q,
    every round at sigma); against the server it cannot (rate 1), and rounds with k < m shares count at
    sigma sqrt(k/m), the round with nobody in it not at all. Both recomputed here from the RDP formula."""
    sigma, q, m = 1.5, 0.5, 3
    flat = fed_flat(fed_root, tmp_path, **{"federated.user_dp": True, "federated.secagg": True,
                                           "federated.user_dp_noise_multiplier": sigma, "federated.min_clients": m,
                                           "federated.fraction_train": q, "federated.rounds": 1000,
                                           "federated.eval_every": 1000})
    server, _, fed = _server(flat)
    shape = server.prompt.shape
    counts = [6, 4, 3, 2, 0, 1, 5]
    for rnd, k in enumerate(counts, start=1):
        replies = F.RoundReplies(metrics={c: {"round": rnd} for c in range(k)},
                                 secure_mean=np.zeros(shape, np.float32) if k else None, secure_count=k)
        server.complete_round(rnd, list(range(k)), replies)
    user = server.privacy_report()["user_level"]
    delta = fed.resolved_user_delta
    world = _rdp_epsilon_reference([(sigma, q, len(counts))], delta)
    against_server = _rdp_epsilon_reference([(sigma, 1.0, 4), (sigma * math.sqrt(2 / 3), 1.0, 1),
                                             (sigma * math.sqrt(1 / 3), 1.0, 1)], delta)
    # Opacus may use finer (fractional) orders than the reference: a little lower, never higher
    assert 0.93 * world <= user["epsilon_against_world"] <= world * (1 + 1e-9)
    assert 0.93 * against_server <= user["epsilon_against_server"] <= against_server * (1 + 1e-9)
    assert user["epsilon_against_server"] > 1.5 * user["epsilon_against_world"]
    assert user["target_judged_against"] == "server" and user["rounds_with_fewer_than_min_clients_shares"] == 3
    assert "amplified" in user["against_world"] and "no amplification" in user["against_server"]
    assert server.metrics[-1]["user_epsilon_against_server"] == user["epsilon_against_server"]


def test_user_dp_target_is_met_against_the_server_by_default():
    """With distributed noise, sigma is calibrated so that the target holds against the server (rate 1 over all
    rounds), not only against the world; server noise can only be judged against the world."""
    from post_fl.core.config import ConfigError
    from post_fl.privacy.user_dp import user_level_epsilon

    fed = F.FederatedConfig(user_dp=True, secagg=True, rounds=10, num_clients=20, fraction_train=0.2,
                            user_dp_target_epsilon=4.0)
    fed.validate()
    sigma = F.user_noise_multiplier(fed)
    delta = fed.resolved_user_delta
    assert fed.user_epsilon_against == "server"
    assert 3.5 < user_level_epsilon(sigma, 1.0, 10, delta) <= 4.0 + 1e-6
    world = F.FederatedConfig(**{**fed.__dict__, "user_dp_epsilon_against": "world"})
    sigma_world = F.user_noise_multiplier(world)
    assert sigma_world < sigma / 2 and user_level_epsilon(sigma_world, 0.2, 10, delta) <= 4.0 + 1e-6
    assert user_level_epsilon(sigma_world, 1.0, 10, delta) > 3 * 4.0  # what a world-calibrated sigma gives the server
    central = F.FederatedConfig(user_dp=True, rounds=10, num_clients=20, fraction_train=0.2)
    assert central.user_epsilon_against == "world"
    with pytest.raises(ConfigError, match="user_dp_epsilon_against = server"):
        F.FederatedConfig(user_dp=True, user_dp_epsilon_against="server").validate()


# ---------------------------------------------------------------- issue 22: fresh noise on both sides
def test_dp_fedavg_server_noise_is_fresh_outside_insecure_mode(fed_root, tmp_path):
    """Two servers with the same config (same seed) release different noise on the same updates; only
    insecure_reproducible repeats it. A server seeding DP-FedAvg noise from the config seed fails here."""
    def released(name, insecure):
        flat = fed_flat(fed_root, tmp_path / name, **{"federated.user_dp": True, "federated.fraction_train": 0.5,
                                                      "federated.user_dp_noise_multiplier": 1.0,
                                                      "federated.rounds": 10, "federated.eval_every": 10,
                                                      "insecure_reproducible": insecure})
        server, _, _ = _server(flat)
        before = server.prompt.copy()
        ups = [ClientUpdate(c, np.zeros_like(before), None, {"round": 1}) for c in range(3)]
        server.complete_round(1, [0, 1, 2], F.RoundReplies(updates=ups, metrics={c: {} for c in range(3)}))
        return server.prompt - before

    a, b = released("a", False), released("b", False)
    assert np.abs(a).max() > 0 and not np.allclose(a, b)
    np.testing.assert_array_equal(released("c", True), released("d", True))


def test_server_poisson_client_sample_is_fresh_outside_insecure_mode(fed_root, tmp_path):
    """The user-DP client sample of two equal servers differs (fresh OS entropy); insecure mode repeats it."""
    def samples(insecure):
        run_cfg, fed = F.build_configs(fed_flat(fed_root, tmp_path, **{
            "federated.user_dp": True, "federated.num_clients": 40, "federated.fraction_train": 0.5,
            "federated.min_clients": 1, "insecure_reproducible": insecure}))
        server = F.FederatedServer(run_cfg, fed)
        return [server.sample(r, list(range(40))) for r in range(1, 6)]

    assert samples(False) != samples(False)
    assert samples(True) == samples(True)


def test_distributed_noise_shares_are_fresh_per_client_call(fed_root, tmp_path, monkeypatch):
    """A client's distributed-DP noise share comes from fresh OS entropy: two equal calls draw different
    shares (a share seeded from the config seed would repeat, and the server could subtract it);
    insecure_reproducible repeats it. The share is what the update carries on top of the clipped update."""
    import post_fl.privacy.user_dp as U

    shares = []
    real = U.noise_share

    def spy(*args, **kwargs):
        shares.append(real(*args, **kwargs))
        return shares[-1]

    monkeypatch.setattr(U, "noise_share", spy)

    def share_of(name, insecure):
        flat = fed_flat(fed_root, tmp_path / name, **{
            "federated.user_dp": True, "federated.secagg": True, "federated.user_dp_noise_multiplier": 1.0,
            "tune.dp": False, "insecure_reproducible": insecure})
        server, run_cfg, fed = _server(flat)
        data = F.client_partition(run_cfg, fed, 0)
        res = F.train_client(server.student, server.prompt, data, run_cfg, fed, 1, 0, 0.0, None)
        assert float(np.linalg.norm(res.delta - shares[-1])) <= fed.user_dp_clip * (1 + 1e-4)  # clipped + share
        return shares[-1]

    a, b = share_of("a", False), share_of("b", False)
    assert np.abs(a).max() > 0 and not np.array_equal(a, b)
    np.testing.assert_array_equal(share_of("c", True), share_of("d", True))
