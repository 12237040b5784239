"""The Flower glue: real ServerApp/ClientApp over an in-process Grid, and (slow) Flower's simulation runtime."""

import json

import numpy as np
import pytest
from conftest import make_sentiment
from test_federated import fed_flat

from post_fl import federated as F
from post_fl.federated import shipping

ALLOWED_TRAIN_REPLY = {F.REPLY_UPDATE_RECORD: {"delta"}, F.REPLY_METRICS_RECORD: set(F.DP_REPLY_METRIC_KEYS)}


def _apps(flat, after_round=None):
    from client_app.app import make_client_app
    from server_app.app import make_server_app

    return make_server_app(flat, after_round), make_client_app(flat)


def test_inprocess_run_and_reply_contents(fed_root, tmp_path):  # noqa: F811
    from simulation.inprocess import run_inprocess

    shipping._STUDENTS.clear()
    flat = fed_flat(fed_root, tmp_path, **{"federated.num_clients": 6, "federated.fraction_train": 0.5})
    server_app, client_app = _apps(flat)
    grid = run_inprocess(server_app, client_app, 6)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["valid"] for r in results["rounds"]] == [3, 3]
    types = [m.metadata.message_type for m in grid.sent]
    # the student crosses the wire once (one client process here), by hash afterwards
    assert types.count("query.model") == 1 and types.count("query.hello") == 6
    prompt_shape = None
    for m in grid.sent:
        if m.metadata.message_type == "train":
            prompt_shape = m.content.array_records[F.TRAIN_PROMPT_RECORD]["prompt"].numpy().shape
            assert set(m.content.config_records[F.TRAIN_CONFIG_RECORD]) == {"round", "model-hash", "clip"}
    train_replies = [m for m in grid.received if m.metadata.message_type == "train"]
    assert len(train_replies) == 6
    for m in train_replies:
        assert not m.has_error()
        c = m.content
        assert not c.config_records  # no free-form strings: no text, no token ids
        assert {k: set(v) for k, v in c.array_records.items()} == {F.REPLY_UPDATE_RECORD: {"delta"}}
        assert {k: set(v) for k, v in c.metric_records.items()} == {F.REPLY_METRICS_RECORD: set(F.DP_REPLY_METRIC_KEYS)}
        delta = c.array_records[F.REPLY_UPDATE_RECORD]["delta"].numpy()
        assert delta.dtype == np.float32 and delta.shape == prompt_shape
        assert all(isinstance(v, (int, float)) for v in c.metric_records[F.REPLY_METRICS_RECORD].values())
    hello = [m for m in grid.received if m.metadata.message_type == "query.hello"]
    assert all(set(m.content.config_records[F.HELLO_RECORD]) == {"client-id", "has-model", "cache-key"}
               for m in hello)
    # each client's privacy record is its own ledger (simulation: under <output_dir>/client-ledgers)
    from post_fl.privacy.ledger import read_ledgers

    ledgers = read_ledgers(tmp_path / "run" / F.LEDGER_DIR_NAME)
    assert len(ledgers) >= 3 and all(0 < v["epsilon"] <= 8.0 + 1e-6 for v in ledgers.values())
    assert results["privacy"]["sample_level"]["epsilon_per_client"] == \
        {str(c): v["epsilon"] for c, v in sorted(ledgers.items())}


def test_need_model_is_answered_with_the_weights(fed_root, tmp_path):  # noqa: F811
    """A client that lost its cached student replies need-model; the server resends it and the round completes."""
    import shutil

    from simulation.inprocess import run_inprocess

    shipping._STUDENTS.clear()
    flat = fed_flat(fed_root, tmp_path)

    def forget(rnd):
        shipping._STUDENTS.clear()
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)

    server_app, client_app = _apps(flat, after_round=forget)
    grid = run_inprocess(server_app, client_app, 6)
    types = [m.metadata.message_type for m in grid.sent]
    assert types.count("query.model") == 2
    statuses = [m.content.config_records[F.REPLY_STATUS_RECORD]["status"] for m in grid.received
                if m.metadata.message_type == "train" and F.REPLY_STATUS_RECORD in m.content.config_records]
    assert statuses == [F.NEED_MODEL] * 3  # round 2's sampled clients, once each
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["valid"] for r in results["rounds"]] == [3, 3]


def test_client_failure_is_counted_not_fatal(fed_root, tmp_path):  # noqa: F811
    from simulation.inprocess import InProcessGrid

    from flwr.app import Context, RecordDict

    shipping._STUDENTS.clear()
    flat = fed_flat(fed_root, tmp_path, **{"federated.rounds": 1})
    server_app, client_app = _apps(flat)
    grid = InProcessGrid(client_app, 6)
    first = next(iter(grid.contexts))
    grid.contexts[first].node_config["num-partitions"] = 7  # this client is misconfigured: its train call fails
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    row = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"][0]
    assert row["valid"] + len(row["failed"]) == row["sampled"]


@pytest.mark.slow
def test_flower_simulation_with_ray(fed_root, tmp_path):  # noqa: F811
    """Flower's simulation runtime (Ray backend, 2 worker processes): 4 virtual clients, 2 rounds."""
    from simulation.run import simulate

    flat = fed_flat(fed_root, tmp_path, **{"federated.num_clients": 4, "tune.batch_size": 24})
    simulate(flat, num_supernodes=4, num_cpus=2)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["valid"] for r in results["rounds"]] == [2, 2]
    assert "teacher_transferred_prompt" in results["accuracy"]
    # the Ray workers' clients wrote their ledgers; the harness read them (same machine)
    eps = results["privacy"]["sample_level"]["epsilon_per_client"]
    assert len(eps) >= 2 and all(0 < e <= 8.0 + 1e-6 for e in eps.values())


def test_secagg_plus_inprocess(fed_root, tmp_path):  # noqa: F811
    """SecAgg+ with client-side clipping: the server gets the (uniform) mean only, and applies it."""
    from simulation.inprocess import run_inprocess

    shipping._STUDENTS.clear()
    flat = fed_flat(fed_root, tmp_path, **{"federated.secagg": True, "federated.max_update_norm": 5.0,
                                           "federated.rounds": 1, "federated.fraction_train": 0.67})
    server_app, client_app = _apps(flat)
    grid = run_inprocess(server_app, client_app, 6)
    row = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"][0]
    assert row["sampled"] == 5 and row["valid"] == 5 and row["failed"] == {}
    assert 0 < row["update_norm"] <= 5.0 + 1e-3
    masked = [m for m in grid.received if m.metadata.message_type == "train" and not m.has_error()
              and any(len(a) for a in m.content.array_records.values())]
    assert masked == []  # no client sent its update in the clear


def test_site_data_path_is_used_and_bad_site_fails_alone(fed_root, tmp_path):  # noqa: F811
    """Deployment: node config data-path gives each site its own file (and its own ledger, keyed by its
    dataset-name); a malformed file leaves only that site out."""
    from simulation.inprocess import InProcessGrid

    from flwr.app import Context, RecordDict
    from post_fl.core.data import write_text_file

    shipping._STUDENTS.clear()
    flat = fed_flat(fed_root, tmp_path, **{"federated.rounds": 1, "federated.num_clients": 3,
                                           "federated.fraction_train": 1.0})
    server_app, client_app = _apps(flat)
    grid = InProcessGrid(client_app, 3)
    for i, ctx in enumerate(grid.contexts.values()):
        path = tmp_path / f"site{i}.csv"
        write_text_file(make_sentiment(10 + 4 * i, seed=20 + i), path)
        ctx.node_config.update({"data-path": str(path), "privacy-budget-epsilon": 8.0, "dataset-name": f"site-{i}",
                                "labels": "negative,positive", "privacy-ledger": str(tmp_path / f"ledger{i}")})
    (tmp_path / "site2.csv").write_text("text,stars\nhello,5\n")
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    row = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"][0]
    # the malformed site fails its data check at hello (post_fl.preflight) and is left out of the run
    assert row["sampled"] == 2 and row["valid"] == 2 and "examples" not in row  # DP sites hide their sizes
    # each good site accounted its own file (sizes 10 and 14) in its own ledger
    from post_fl.privacy.ledger import read_ledgers

    for i in (0, 1):
        (led,) = read_ledgers(tmp_path / f"ledger{i}").values()
        assert led["dataset"] == f"site-{i}" and led["rounds"] == 1
    assert not (tmp_path / "ledger2").exists()


def test_missing_site_data_file_is_named(tmp_path):
    """A deployed site whose data-path does not exist fails with the file named (no fallback data)."""
    from post_fl.core.config import RunConfig
    from post_fl.core.data import DataError

    missing = tmp_path / "absent" / "site.csv"
    site = F.SiteSettings(str(missing), "site", ("negative", "positive"))
    with pytest.raises(DataError, match=f"{missing}: data file does not exist"):
        F.site_dataset(site, RunConfig(), ["negative", "positive"])


@pytest.mark.slow
def test_flwr_run_on_a_simulation_superlink(fed_root, tmp_path):  # noqa: F811
    """The real Flower CLI path: `flwr run <app> <connection>` against a `flower-superlink --simulation`
    (Simulation Engine, 4 virtual SuperNodes, 2 rounds), with the app's pyproject run-config overridden
    by `-c`. The SuperLink runs in the venv (runtime dependency installation off) and is stopped with
    everything it started."""
    import socket
    import sys
    from pathlib import Path

    from test_deployment import Federation, _env, _run

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    repo = Path(__file__).resolve().parents[1]
    fed = Federation(tmp_path, _env(tmp_path))
    fed.watch()
    try:
        port = free_port()
        link = fed.start("superlink", [str(Path(sys.executable).parent / "flower-superlink"), "--simulation",
                                       "--insecure", "--disable-runtime-dependency-installation",
                                       "--host", "127.0.0.1", "--port", str(port),
                                       "--control-api-address", f"127.0.0.1:{free_port()}",
                                       "--database", str(tmp_path / "state.db")])
        fed.wait_for("the SuperLink to listen",
                     lambda: link.popen.poll() is not None or "Uvicorn running on" in link.text(), 60)
        assert link.popen.poll() is None, fed.logs()
        home = Path(fed.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        flat = fed_flat(fed_root, tmp_path, **{"federated.num_clients": 4, "tune.batch_size": 24})
        overrides = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in flat.items()
                             if not k.startswith("model.label_words"))
        overrides += ' model.label_words="positive:good;negative:bad"'
        res = _run(fed, [str(Path(sys.executable).parent / "flwr"), "run", str(repo), "sim", "--stream",
                         "--federation-config", "num-supernodes=4", "-c", overrides], "flwr-run", 400)
        assert res.returncode == 0, fed.logs()
        results = json.loads((tmp_path / "run" / "results.json").read_text())
        assert [r["round"] for r in results["rounds"]] == [1, 2], fed.logs()
        assert all(r["valid"] == 2 and not r["rejected"] for r in results["rounds"]), results["rounds"]
        assert set(results["accuracy"]) >= {"student_federated_prompt", "teacher_transferred_prompt"}
        assert "[post-fl] round 2/2" in res.stdout
    finally:
        fed.stop_all()
    import psutil

    left = [q.pid for q in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(q.info["cmdline"] or [])]
    assert left == [], f"processes of this test still running: {left}"
