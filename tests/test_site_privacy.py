"""Issue 22: what a site may say and spend. The privacy ledger under concurrency, site-fixed data settings,
delta and dataset name, and every reply of the real ClientApp under a hostile run config."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from post_fl.privacy.ledger import BudgetExhausted, PrivacyLedger

DELTA = 1e-5


# ---------------------------------------------------------------- the ledger under concurrency
def _racer(directory, budget, attempts, barrier, results, use_spend):
    """One process: open the ledger, wait for the others, then try ``attempts`` rounds as fast as it can."""
    ledger = PrivacyLedger.open(directory, "site-data", budget)
    barrier.wait()
    kept = refused = 0
    for i in range(attempts):
        try:
            if use_spend:
                ledger.spend(2.0, 0.2, 10, DELTA, f"run-{mp.current_process().pid}", i)
            else:
                ledger.record(2.0, 0.2, 10, DELTA, f"run-{mp.current_process().pid}", i)
            kept += 1
        except BudgetExhausted:
            refused += 1
    results.put((kept, refused))


def _race(directory, budget, processes, attempts, use_spend):
    ctx = mp.get_context("fork")  # children inherit the imported modules: the race starts at once
    barrier, results = ctx.Barrier(processes, timeout=300), ctx.Queue()  # a crashed child breaks the barrier
    procs = [ctx.Process(target=_racer, args=(directory, budget, attempts, barrier, results, use_spend))
             for _ in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0] * processes
    outcomes = [results.get() for _ in procs]
    return sum(k for k, _ in outcomes), sum(r for _, r in outcomes)


def test_concurrent_records_are_all_kept(tmp_path):
    """10 processes x 5 records at once on one ledger: all 50 are in it (an unlocked read-modify-write
    loses some: the reviewer saw 49 of 50)."""
    kept, _ = _race(tmp_path, float("inf"), 10, 5, use_spend=False)
    ledger = PrivacyLedger.open(tmp_path, "site-data", float("inf"))
    assert kept == 50 and len(ledger.entries()) == 50
    assert sorted((e["run"], e["round"]) for e in ledger.entries()) == \
        sorted({(e["run"], e["round"]) for e in ledger.entries()})  # no duplicates either


def test_concurrent_spends_never_pass_the_budget(tmp_path):
    """16 processes x 3 attempts race for a budget of 4.0 that holds exactly 5 rounds of (sigma 2, q 0.2,
    10 steps): exactly 5 are recorded, every other attempt is refused, epsilon stays <= 4.0."""
    from post_fl.privacy.accounting import epsilon_from_history

    one = (2.0, 0.2, 10)
    assert epsilon_from_history([one] * 5, DELTA) <= 4.0 < epsilon_from_history([one] * 6, DELTA)
    kept, refused = _race(tmp_path, 4.0, 16, 3, use_spend=True)
    ledger = PrivacyLedger.open(tmp_path, "site-data", 4.0)
    assert (kept, refused) == (5, 43)
    assert len(ledger.entries()) == 5 and ledger.epsilon(DELTA) <= 4.0 + 1e-9


# ---------------------------------------------------------------- nothing private in any reply (the real ClientApp)
SITE_LABELS = ("negative", "positive")


def _private_site_file(path):
    """A site file whose every row holds something no reply may ever carry."""
    import random

    from conftest import make_sentiment
    from post_fl.core.data import TextDataset, write_text_file

    rng = random.Random(22)
    base = make_sentiment(16, seed=22)
    streets = ["Birch Lane", "Harbour Road", "Quarry Street", "Mill Close"]
    texts = [f"{t} patient-{rng.randint(1000, 9999)} of {rng.choice(streets)} {rng.randint(1, 99)}"
             for t in base.texts]
    return write_text_file(TextDataset(texts, base.labels, list(SITE_LABELS)), path)


@pytest.fixture
def site(fed_root, tmp_path):
    """A deployed site (node config with its own file, settings, budget and ledger) and the student package."""
    from post_fl import federated as F
    from post_fl.core.models import load_scoring_model

    path = _private_site_file(tmp_path / "private" / "cohort.csv")
    student = load_scoring_model(str(fed_root / "student"), list(SITE_LABELS),
                                 {"positive": ["good"], "negative": ["bad"]})
    node = {"partition-id": 0, "num-partitions": 1, "data-path": str(path), "dataset-name": "cohort",
            "labels": ",".join(SITE_LABELS), "privacy-budget-epsilon": 8.0}
    return {"path": path, "node": node, "package": F.pack_student(fed_root / "student", student),
            "root": tmp_path}


def _wire(reply) -> bytes:
    """The bytes Flower would send for ``reply``."""
    from flwr.common.serde import message_to_proto

    return message_to_proto(reply).SerializeToString()


def _deliver(app, msg, ctx):
    """``app`` on ``msg``; an exception that escapes becomes the error reply Flower's runtime would send
    (``flwr/supernode/runtime/run_clientapp.py``: the exception's type and message)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    try:
        return app(msg, ctx)
    except Exception as exc:  # noqa: BLE001
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=str(type(exc)) + ":<'" + str(exc) + "'>"), reply_to=msg)


def _check_reply(reply, node):
    """Every reply is one of the allowed shapes, with fixed words only."""
    from post_fl import federated as F

    if reply.has_error():
        assert reply.error.reason in F.REPLY_CODES, reply.error.reason
        return
    c = reply.content
    configs = {k: dict(v) for k, v in c.config_records.items()}
    if F.HELLO_RECORD in configs:
        h = configs[F.HELLO_RECORD]
        assert set(h) == {"client-id", "has-model", "cache-key"} and h["client-id"] == node["partition-id"]
        assert isinstance(h["has-model"], bool) and len(h["cache-key"]) == 32 and int(h["cache-key"], 16) >= 0
    elif F.REPLY_STATUS_RECORD in configs:
        st = configs[F.REPLY_STATUS_RECORD]
        assert st["status"] in (*F.REPLY_CODES, F.NEED_MODEL, "ok"), st
        extra = {F.NEED_MODEL: {"cache-key"}, "ok": {"model-hash"}}.get(st["status"], set())
        assert set(st) == {"status"} | extra, st
    else:  # a train reply under DP: the update and the round number
        assert not configs
        assert {k: set(v) for k, v in c.array_records.items()} == {F.REPLY_UPDATE_RECORD: {"delta"}}
        assert {k: set(v) for k, v in c.metric_records.items()} == {F.REPLY_METRICS_RECORD: {"round"}}


def _assert_nothing_private(replies, site_file, *paths):
    """No 12-byte piece of the site's file, no cell of it and none of the site's paths in any reply's bytes."""
    import csv

    blob = b"".join(_wire(r) for r in replies)
    raw = site_file.read_bytes()
    leaked = [raw[i:i + 12] for i in range(len(raw) - 11) if raw[i:i + 12] in blob]
    assert not leaked, f"{len(leaked)} pieces of the site's file in replies, e.g. {leaked[:3]}"
    with site_file.open(newline="") as fh:
        cells = [v for row in csv.DictReader(fh) for v in row.values()]
    assert not [v for v in cells if v.encode() in blob]
    for p in paths:
        assert str(p).encode() not in blob, p


def _messages(package, prompt_shape=(4, 32), model_hash=None, clip=1.0):
    import json

    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from post_fl import federated as F
    from simulation.inprocess import ensure_task_identity

    ensure_task_identity()
    h = model_hash or package.model_hash
    hello = Message(RecordDict({F.TRAIN_CONFIG_RECORD: ConfigRecord({"model-hash": h})}), 1, "query.hello")
    files = {f"file:{k}": v for k, v in package.files.items()}
    files.update({"model-hash": package.model_hash, "spec": json.dumps(package.spec)})
    model = Message(RecordDict({F.STUDENT_WEIGHTS_RECORD: ArrayRecord({k: Array(np.ascontiguousarray(v))
                                                                        for k, v in package.weights.items()}),
                                F.STUDENT_FILES_RECORD: ConfigRecord(files)}), 1, "query.model")
    prompt = np.random.default_rng(0).normal(size=prompt_shape).astype(np.float32)
    train = Message(RecordDict({F.TRAIN_PROMPT_RECORD: ArrayRecord({"prompt": Array(prompt)}),
                                F.TRAIN_CONFIG_RECORD: ConfigRecord({"round": 1, "model-hash": h, "clip": clip})}),
                    1, "train")
    return [hello, model, train]


def _drive(flat, site, name, node_extra=None, **message_args):
    """hello, model and train of one run config on the site's real ClientApp; every reply (each checked)."""
    from flwr.app import Context, RecordDict

    from client_app.app import make_client_app

    node = {**site["node"], "privacy-ledger": str(site["root"] / "ledgers" / name), **(node_extra or {})}
    app = make_client_app(flat)
    ctx = Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})
    replies = [_deliver(app, m, ctx) for m in _messages(site["package"], **message_args)]
    _assert_nothing_private(replies, site["path"], site["path"].parent, site["root"])
    for r in replies:
        _check_reply(r, node)
    return replies


def _status(reply):
    from post_fl import federated as F

    if reply.has_error():
        return reply.error.reason
    st = reply.content.config_records.get(F.REPLY_STATUS_RECORD)
    return st["status"] if st is not None else "hello" if F.HELLO_RECORD in reply.content.config_records else "update"


HOSTILE = {  # what a server can ask of a site, and what the site answers (hello, model, train)
    "label column = text (the review's finding)": ({"data.label_column": "text"}, "refused: data settings"),
    "text column = label": ({"data.text_column": "label"}, "refused: data settings"),
    "a column the file lacks": ({"data.text_column": "text+stars"}, "refused: data settings"),
    "another label set": ({"model.label_words": "positive:good;neutral:bad"}, "refused: data settings"),
    "labels named by the file's text": ({"model.label_words": "positive:good;negative:bad;patient:x"},
                                        "refused: data settings"),
    "insecure run": ({"insecure_reproducible": True}, "refused: insecure run"),
    "no DP": ({"tune.dp": False}, "refused: budget"),
    "a budget-busting run": ({"tune.target_epsilon": 1e4}, "refused: budget"),
    "delta just under 1/N": ({"tune.delta": 1 / 17}, None),
    "one example": ({"data.max_train_examples": 1}, None),
    "cache on the data folder": ({"federated.client_cache_dir": "<private>"}, None),
    "bad config": ({"tune.batch_size": 0}, "site input invalid"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_no_reply_of_a_site_carries_its_data_under_a_hostile_run_config(fed_root, tmp_path, site, case):
    """The real ClientApp on a site file of private sentences, under run configs a hostile server may send:
    every reply (hello, model, train; status, refusal, error) is a fixed shape and its bytes hold no piece of
    the site's file and none of its paths. Before issue 22, ``data.label_column = text`` sent every sentence
    back in the hello error."""
    from test_federated import fed_flat

    over, expected = HOSTILE[case]
    over = {k: (str(site["path"].parent) if v == "<private>" else v) for k, v in over.items()}
    flat = fed_flat(fed_root, tmp_path, **{"federated.num_clients": 1, "federated.min_clients": 1, **over})
    if "model.label_words" in over:
        flat = {k: v for k, v in flat.items() if not k.startswith("model.label_words.")}
    replies = _drive(flat, site, case)
    statuses = [_status(r) for r in replies]
    if expected is None:
        assert statuses in (["hello", "ok", "update"], ["hello", "ok", "refused: budget"]), statuses
    else:
        assert expected in statuses, statuses


@pytest.mark.parametrize("instruction", [{"prompt_shape": (4, 7)}, {"clip": -1.0}, {"model_hash": "ab" * 32}])
def test_no_reply_carries_site_data_under_hostile_train_instructions(fed_root, tmp_path, site, instruction):
    """A wrong prompt shape, a negative clip bound or an unknown student hash: fixed codes only."""
    from test_federated import fed_flat

    flat = fed_flat(fed_root, tmp_path, **{"federated.num_clients": 1, "federated.min_clients": 1})
    replies = _drive(flat, site, "instruction", **instruction)  # checks every reply
    assert _status(replies[-1]) in ("site error", "need-model", "update")


def _hostile_values(key, default, site_path):
    """Values a hostile server might give ``key``: the site's own paths and column names for strings, the
    other value for booleans, extremes for numbers."""
    if key == "tune.epochs":  # a million epochs would be a million DP-SGD steps: work, not a leak
        return [1e-9, 20.0]
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, int):
        return [0, 1, 10**6]
    if isinstance(default, float):
        return [1e-9, 1e6]
    if key.endswith("_column"):
        return ["text", "label"]
    return [str(site_path), str(site_path.parent)]


@pytest.mark.slow
def test_every_run_config_field_a_server_can_set_leaves_the_site_data_private(fed_root, tmp_path, site):
    """Every key of the run config (93, plus the label words), each set to hostile values in turn: no reply of
    the real ClientApp (hello, model, train) carries a piece of the site's file or a path of the site."""
    from post_fl import federated as F
    from post_fl.core.config import RunConfig
    from test_federated import fed_flat

    base = fed_flat(fed_root, tmp_path, **{"federated.num_clients": 1, "federated.min_clients": 1,
                                           "tune.epochs": 1.0})
    defaults = F.flatten_configs(RunConfig(), F.FederatedConfig())
    cases = [(k, v) for k, d in defaults.items() for v in _hostile_values(k, d, site["path"])]
    cases.append(("model.label_words", "positive:good;negative:bad;" + site["path"].read_text().split("\n")[1][:20]
                  .replace(",", " ") + ":x"))
    seen = set()
    for i, (key, value) in enumerate(cases):
        flat = {k: v for k, v in base.items() if not (key == "model.label_words" and k.startswith(key))}
        flat[key] = value
        replies = _drive(flat, site, f"case{i}")
        seen.add(_status(replies[-1]))
    assert {"update", "refused: data settings", "site input invalid", "refused: budget"} <= seen, seen


# ---------------------------------------------------------------- the site's delta and dataset name
def test_the_sites_delta_is_its_own_not_the_run_configs(fed_root, tmp_path, site):
    """A run config with tune.delta just under 1/N (which would admit more rounds) does not move the delta a
    site's budget is judged at: the ledger records min(1e-5, 1/(10 N)), or the site's node config
    privacy-delta; a privacy-delta >= 1/N is the site's own bad input."""
    import json

    from test_federated import fed_flat

    flat = fed_flat(fed_root, tmp_path, **{"federated.num_clients": 1, "federated.min_clients": 1,
                                           "tune.delta": 1 / 17})  # the site has N = 16 examples
    replies = _drive(flat, site, "default-delta")
    assert _status(replies[-1]) == "update"
    entries = json.loads((site["root"] / "ledgers" / "default-delta" / "cohort.json").read_text())["entries"]
    assert [e["delta"] for e in entries] == [1e-5]
    replies = _drive(flat, site, "own-delta", {"privacy-delta": 1e-7})
    entries = json.loads((site["root"] / "ledgers" / "own-delta" / "cohort.json").read_text())["entries"]
    assert _status(replies[-1]) == "update" and [e["delta"] for e in entries] == [1e-7]
    replies = _drive(flat, site, "bad-delta", {"privacy-delta": 0.1})
    assert _status(replies[-1]) == "site input invalid"
    assert not (site["root"] / "ledgers" / "bad-delta" / "cohort.json").exists()


def test_re_exporting_the_same_data_does_not_reset_its_budget(fed_root, tmp_path, site):
    """The ledger is keyed by the site's dataset-name, not by the file's bytes: the same data written again as
    JSONL (other bytes, other path) under the same name continues the same ledger and is refused once the
    budget is spent."""
    from post_fl.core.data import read_text_file, write_text_file
    from test_federated import fed_flat

    flat = fed_flat(fed_root, tmp_path, **{"federated.num_clients": 1, "federated.min_clients": 1,
                                           "federated.rounds": 1, "tune.target_epsilon": 8.0})
    first = _drive(flat, site, "shared")
    assert _status(first[-1]) == "update"  # one round spends (almost) the whole budget of 8
    again = write_text_file(read_text_file(site["path"]), site["root"] / "export-2" / "cohort.jsonl")
    assert again.read_bytes() != site["path"].read_bytes()
    second = _drive(flat, site, "shared", {"data-path": str(again)})
    assert _status(second[-1]) == "refused: budget"
    ledger = PrivacyLedger.open(site["root"] / "ledgers" / "shared", "cohort", 8.0)
    assert len(ledger.entries()) == 1 and ledger.epsilon(1e-5) <= 8.0 + 1e-6


def test_a_site_reads_its_own_columns_and_needs_its_settings(fed_root, tmp_path, site):
    """A site whose file uses other column names reads them (node config text-column / label-column); the run
    must name the same (else refused); a site without dataset-name or labels is invalid input."""
    from post_fl.core.data import read_text_file
    from test_federated import fed_flat

    data = read_text_file(site["path"])
    own = site["root"] / "own" / "cohort.csv"
    own.parent.mkdir()
    own.write_text("review,stars\n" + "".join(f'"{t}",{data.label_names[y]}\n' for t, y in zip(data.texts, data.labels)))
    node = {"data-path": str(own), "text-column": "review", "label-column": "stars"}
    flat = fed_flat(fed_root, tmp_path, **{"federated.num_clients": 1, "federated.min_clients": 1})
    assert _status(_drive(flat, site, "cols-refused", node)[0]) == "refused: data settings"
    flat.update({"data.text_column": "review", "data.label_column": "stars"})
    assert [_status(r) for r in _drive(flat, site, "cols", node)] == ["hello", "ok", "update"]
    for missing in ("dataset-name", "labels"):
        bad = {k: v for k, v in site["node"].items() if k != missing}
        replies = _drive(fed_flat(fed_root, tmp_path), {**site, "node": bad}, f"no-{missing}")
        assert [_status(r) for r in replies] == ["site input invalid", "ok", "site input invalid"]
