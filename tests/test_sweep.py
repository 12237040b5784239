"""Privacy-utility sweep: grid file parsing, a tiny end-to-end sweep (CSV, plots, table), resume,
the canary membership-inference audit, and RAPT's privatisation of the text part of an input."""

from __future__ import annotations

import csv
import math

import json

import pytest
import torch
from conftest import build_tiny_model, make_sentiment, write_tiny_task

from post_fl import experiments as S
from post_fl.experiments import sweep as SW
from post_fl.core.config import ConfigError, TuneConfig
from post_fl.core.models import load_scoring_model

WORDS = {"positive": ["good"], "negative": ["bad"]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_task(tmp_path_factory.mktemp("sweep-assets"), 64, seed=21, with_student=False)


def sweep_toml(root, out, extra: str = "") -> str:
    return f"""
output_dir = "{out}"
methods = ["zero_shot", "majority", "direct", "post", "teacher_dp", "rapt"]
num_clients = [1, 3]
target_epsilon = [4, inf]
partitioning = ["iid"]
seeds = [0]
rounds = 1
clients_per_round = 2
cost_probe_steps = 1
{extra}
[base.model]
teacher = "{root / 'teacher'}"
label_words = {{ positive = ["good"], negative = ["bad"] }}
[base.data]
train = "{root / 'train.csv'}"
test = "{root / 'test.csv'}"
public = "{root / 'public.jsonl'}"
[base.prompt]
num_virtual_tokens = 4
[base.tune]
epochs = 1.0
batch_size = 16
delta = 1e-3
[base.distill]
steps = 2
batch_size = 8
[base.transfer]
steps = 3
batch_size = 8
[audit]
epsilons = [4, inf]
trials = 2
calibration_trials = 0
canaries = 4
base_examples = 4
epochs = 2
num_virtual_tokens = 4
"""


def _write(tmp_path, text: str):
    p = tmp_path / "sweep.toml"
    p.write_text(text)
    return p


# ---------------------------------------------------------------- parsing
def test_grid_file_errors_name_the_bad_key(assets, tmp_path):
    good = sweep_toml(assets, tmp_path / "out")
    cfg = S.load_sweep_config(_write(tmp_path, good))
    assert cfg.num_clients == [1, 3] and cfg.target_epsilon == [4.0, math.inf]
    assert cfg.base.tune.delta == 1e-3 and cfg.audit.trials == 2
    cases = {
        "num_client = [1]\n": r"unknown sweep setting\(s\) num_client",
        'methods = ["post", "fedprox"]\n': r"methods: unknown method\(s\) \['fedprox'\]",
        "target_epsilon = [0]\n": "target_epsilon: expected values > 0",
        'partitioning = ["iid", "shards"]\n': "partitioning: unknown scheme",
        'num_clients = ["ten"]\n': r"num_clients\[0\]: expected an integer",
    }
    for line, pattern in cases.items():
        key = line.split("=")[0].strip()
        text = "\n".join(x for x in good.splitlines() if not x.startswith(key + " ")) + "\n"
        text = line + text
        with pytest.raises(ConfigError, match=pattern):
            S.load_sweep_config(_write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"base\.tune\.lrr"):
        S.load_sweep_config(_write(tmp_path, good.replace("[base.tune]\n", "[base.tune]\nlrr = 0.1\n")))
    with pytest.raises(ConfigError, match=r"audit\.trails"):
        S.load_sweep_config(_write(tmp_path, good.replace("[audit]\n", "[audit]\ntrails = 3\n")))
    with pytest.raises(ConfigError, match=r"federated\.rounds: set by the sweep"):
        S.load_sweep_config(_write(tmp_path, good + "[federated]\nrounds = 3\n"))
    with pytest.raises(ConfigError, match=r"federated\.aggregatoin"):
        S.load_sweep_config(_write(tmp_path, good + "[federated]\naggregatoin = 'uniform'\n"))


def test_bad_key_through_the_cli_exits_2(assets, tmp_path, capsys):
    from post_fl.cli import main

    p = _write(tmp_path, "roundz = 2\n" + sweep_toml(assets, tmp_path / "out"))
    assert main(["sweep", "--config", str(p)]) == 2
    assert "roundz" in capsys.readouterr().err


def test_majority_class_accuracy():
    from post_fl.method.evaluate import majority_class_accuracy

    assert majority_class_accuracy([0, 1, 1, 2], [1, 1, 0, 2, 1]) == pytest.approx(0.6)
    assert majority_class_accuracy([2, 0, 0, 2], [0, 2]) == pytest.approx(0.5)  # tie: smallest label id
    with pytest.raises(ValueError, match="empty"):
        majority_class_accuracy([], [0])


def test_cells_are_deduplicated_and_keys_stable():
    cfg = S.SweepConfig(methods=["zero_shot", "direct", "post"], num_clients=[1, 10],
                        target_epsilon=[1.0, math.inf], partitioning=["iid", "dirichlet"],
                        dirichlet_alpha=[0.1, 1.0], seeds=[0, 1]).validate()
    cells = S.expand_cells(cfg)
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))
    # per seed: 1 zero-shot + 2 methods x 2 eps x (1 partition for 1 client + 3 for 10 clients)
    assert len(cells) == 2 * (1 + 2 * 2 * (1 + 3))
    assert "post|clients=10|eps=1|part=dirichlet(0.1)|seed=1" in keys
    assert "direct|clients=1|eps=inf|part=iid|seed=0" in keys and "zero_shot|seed=1" in keys
    assert not any("clients=1|" in k and "dirichlet" in k for k in keys)
    direct = next(c for c in cells if c.method == "direct" and c.num_clients == 10)
    post = S.Cell("post", *[getattr(direct, f) for f in ("num_clients", "target_epsilon", "partitioning",
                                                          "dirichlet_alpha", "seed")])
    assert direct.run_slug == post.run_slug  # one federated run serves both


# ---------------------------------------------------------------- end to end
def _png_ok(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_tiny_sweep_end_to_end_then_resume(assets, tmp_path, monkeypatch, capsys):
    from post_fl.cli import main

    out = tmp_path / "out"
    p = _write(tmp_path, sweep_toml(assets, out))
    assert main(["sweep", "--config", str(p), "--quiet"]) == 0
    csv_path = out / "results.csv"
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == S.CSV_COLUMNS
        rows = list(reader)
    cells = S.expand_cells(S.load_sweep_config(p))
    assert len(cells) == 18 and [r["key"] for r in rows] == [c.key for c in cells]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    by = {r["key"]: r for r in rows}
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
    dim = 32 * 4 * 4  # 4 virtual tokens x width 32 x float32
    for r in rows:
        if r["method"] in S.REFERENCE_METHODS:
            continue
        assert int(r["bytes_up_per_client_round"]) == dim and int(r["bytes_down_per_client_round"]) == dim
        assert int(r["model_bytes_once"]) > 0
        assert float(r["student_s_per_client_round"]) > 0 and float(r["teacher_s_per_client_round"]) > 0
        if r["method"] in ("direct", "post", "teacher_dp") and r["target_epsilon"] != "inf":
            assert 0 < float(r["epsilon"]) <= 4.0 + 1e-6
    # the majority-class reference: the training split's most frequent label on every test example
    from collections import Counter

    def labels(name):
        with (assets / name).open(newline="") as fh:
            return [r["label"] for r in csv.DictReader(fh)]

    (top, n_top), (_, n_second) = Counter(labels("train.csv")).most_common(2)
    assert n_top > n_second  # no tie, so the expected label is unambiguous
    test_labels = labels("test.csv")
    expected = sum(y == top for y in test_labels) / len(test_labels)
    assert float(by["majority|seed=0"]["accuracy"]) == pytest.approx(expected)
    d, po = by["direct|clients=3|eps=4|part=iid|seed=0"], by["post|clients=3|eps=4|part=iid|seed=0"]
    assert d["student_accuracy"] and d["student_accuracy"] == po["student_accuracy"] and d["epsilon"] == po["epsilon"]
    # RAPT: eta maps the sweep's epsilon to per-token epsilon = eta * diameter
    rapt = by["rapt|clients=1|eps=4|part=iid|seed=0"]
    teacher = load_scoring_model(str(assets / "teacher"), ["negative", "positive"], WORDS)
    from post_fl.privacy.rapt import per_token_epsilon

    assert per_token_epsilon(float(rapt["rapt_eta"]), teacher.word_embeddings) == pytest.approx(4.0, rel=1e-5)
    assert by["rapt|clients=1|eps=inf|part=iid|seed=0"]["rapt_eta"] == "inf"
    assert rapt["accuracy_privatized_inputs"] != ""
    # the update's guarantee: k tokens x eps + the label's randomised-response eps, per example (local, pure)
    k = (float(rapt["rapt_example_epsilon"]) - float(rapt["rapt_label_epsilon"])) / 4.0
    assert float(rapt["rapt_label_epsilon"]) == 4.0 and k >= 1 and k == int(k)
    assert float(rapt["epsilon"]) == float(rapt["rapt_example_epsilon"]) and float(rapt["delta"]) == 0.0
    assert "post-processing" in rapt["epsilon_unit"]
    assert by["rapt|clients=1|eps=inf|part=iid|seed=0"]["epsilon_unit"].startswith("none")
    # audit only on the configured subset (post, single site); below the claim for the DP cell
    audited = [r for r in rows if r["audit_epsilon_lb"] != ""]
    assert {r["key"] for r in audited} == {"post|clients=1|eps=4|part=iid|seed=0",
                                           "post|clients=1|eps=inf|part=iid|seed=0"}
    assert 0.0 <= float(by["post|clients=1|eps=4|part=iid|seed=0"]["audit_epsilon_lb"]) < 4.0
    for r in audited:  # the audit's power is reported beside every figure (a smoke-sized audit: almost none)
        assert float(r["audit_epsilon_lb"]) <= float(r["audit_max_epsilon_lb"]) < 1.0
    assert "(max 0.00)" in (out / "results.md").read_text()
    # plots and table
    _png_ok(out / "plots" / "accuracy_vs_epsilon.png")
    _png_ok(out / "plots" / "accuracy_vs_clients.png")
    md = (out / "results.md").read_text()
    assert md.startswith("| method | clients |") and "NOT the same unit" in md
    assert md.count("\n| post | ") == 4 and md.count("\n| rapt | ") == 4
    capsys.readouterr()

    # re-running skips every finished cell
    def boom(ctx, cell):
        raise AssertionError(f"finished cell {cell.key} was run again")

    monkeypatch.setattr(SW, "run_cell", boom)
    assert main(["sweep", "--config", str(p), "--quiet"]) == 0
    assert "18 already done, 0 to run" in capsys.readouterr().out
    assert len(S.read_results(csv_path)) == 18 and csv_path.read_text().count("\n") == 19
    # an interrupted sweep (last rows missing) runs exactly the missing cells
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[:-2]))
    ran = []
    monkeypatch.setattr(SW, "run_cell", lambda ctx, cell: ran.append(cell.key) or
                        {"key": cell.key, "status": "ok", "method": cell.method, "accuracy": 0.5})
    assert main(["sweep", "--config", str(p), "--quiet"]) == 0
    assert ran == [c.key for c in cells[-2:]]
    # only the grid axes may change between runs of one output dir
    changed = _write(tmp_path, sweep_toml(assets, out).replace("rounds = 1", "rounds = 2"))
    with pytest.raises(ConfigError, match="other settings"):
        S.run_sweep(S.load_sweep_config(changed))
    # a sweep recorded before a setting existed resumes when the setting keeps its legacy value ...
    saved_path = out / S.SETTINGS_JSON
    saved = json.loads(saved_path.read_text())
    del saved["base"]["distill"]["lr_schedule"], saved["base"]["distill"]["keep_best"]
    saved_path.write_text(json.dumps(saved))
    legacy = tmp_path / "legacy.toml"
    legacy.write_text(sweep_toml(assets, out).replace("[base.distill]\n",
                                                      '[base.distill]\nlr_schedule = "constant"\nkeep_best = false\n'))
    SW._check_settings(S.load_sweep_config(legacy))
    # ... and is refused when it takes the new behaviour
    with pytest.raises(ConfigError, match="base"):
        SW._check_settings(S.load_sweep_config(_write(tmp_path, sweep_toml(assets, out))))


# ---------------------------------------------------------------- audit
@pytest.fixture(scope="module")
def audit_model(tmp_path_factory):
    d = build_tiny_model("masked", tmp_path_factory.mktemp("audit") / "m", num_layers=2)
    return load_scoring_model(d, ["negative", "positive"], WORDS)


def test_audit_non_private_prompt_memorises_canaries(audit_model):
    audit = S.AuditSweepConfig(trials=8, calibration_trials=0, canaries=16, base_examples=0, num_virtual_tokens=16,
                               epochs=150, lr=0.3, batch_size=8)
    res = S.audit_prompt_tuning(audit_model, make_sentiment(0), math.inf, audit, TuneConfig(), seed=0)
    assert res.n_members + res.n_nonmembers == 8 * 16
    assert res.epsilon_lower_bound > 0.2, res


def test_audit_dp_prompt_stays_below_claimed_epsilon(audit_model):
    audit = S.AuditSweepConfig(trials=4, calibration_trials=0, canaries=16, base_examples=8, num_virtual_tokens=16,
                               epochs=10, lr=0.3, batch_size=8)
    base = make_sentiment(8, seed=5)
    res = S.audit_prompt_tuning(audit_model, base, 1.0, audit, TuneConfig(), seed=0)
    assert 0.0 <= res.epsilon_lower_bound < 1.0, res


def test_default_audit_is_large_enough_to_detect_epsilon_8():
    from post_fl.privacy.audit import max_epsilon_lower_bound, observations_needed

    a = S.AuditSweepConfig()
    a.validate()
    per_side = (a.trials - a.calibration_trials) * a.canaries / 2  # expected members (and non-members)
    assert per_side >= 1.05 * observations_needed(8.0, a.delta, a.alpha)
    assert max_epsilon_lower_bound(int(per_side), int(per_side), a.delta, a.alpha) > 8.0
    assert 8.0 in a.epsilons and math.inf in a.epsilons
    with pytest.raises(ConfigError, match="calibration_trials"):
        S.AuditSweepConfig(trials=4).validate()


# ---------------------------------------------------------------- RAPT privatisation of the text span
def test_rapt_privatises_only_the_text_tokens(audit_model):
    m = audit_model
    batch = m.encode(["good movie was very nice", "bad"])
    mask = m.text_positions(batch)
    # [CLS] text It was [MASK] . [SEP]: only the text tokens are privatised
    assert mask[0].tolist()[:7] == [0, 1, 1, 1, 1, 1, 0] and mask[1].sum() == 1
    same, _ = S.privatize_batch(m, batch, math.inf)
    assert torch.equal(same.input_ids, batch.input_ids)
    noisy, _ = S.privatize_batch(m, batch, 1e-3, torch.Generator().manual_seed(0))
    outside = (mask == 0)
    assert torch.equal(noisy.input_ids[outside], batch.input_ids[outside])
    assert not torch.equal(noisy.input_ids[mask.bool()], batch.input_ids[mask.bool()])
    assert S.rapt_eta(4.0, 2.0) == 2.0 and S.rapt_eta(math.inf, 2.0) == math.inf


def test_a_rapt_client_privatises_its_tokens_at_the_rows_eta(audit_model, monkeypatch):
    """The sweep's RAPT client (``_rapt_client_fn``, through ``privatize_client_data`` and ``privatize_batch``)
    draws its d_chi noise at exactly the eta its row records, and that eta is the cell's per-token epsilon:
    an eta scaled anywhere in that wiring (e.g. x1000, 1000x less noise than the row claims) fails here."""
    from types import SimpleNamespace

    import post_fl.federated.client as FED
    import post_fl.privacy.rapt as R
    from post_fl.core.config import RunConfig
    from post_fl.federated.config import FederatedConfig
    from post_fl.privacy.rapt import per_token_epsilon

    drawn = []
    real = R.sample_dchi_noise

    def spy(n, dim, epsilon, *args, **kwargs):
        drawn.append((n, epsilon))
        return real(n, dim, epsilon, *args, **kwargs)

    monkeypatch.setattr(R, "sample_dchi_noise", spy)
    data = make_sentiment(12, seed=4)
    monkeypatch.setattr(FED, "client_partition", lambda run_cfg, fed, cid: data)
    m = audit_model
    diameter = per_token_epsilon(1.0, m.word_embeddings)  # eta = 1: the embedding diameter
    eta = S.rapt_eta(4.0, diameter)
    fn = S.rapt_client_fn(SimpleNamespace(student=m), RunConfig(tune=TuneConfig(epochs=1, batch_size=8)),
                           FederatedConfig(), eta, S.RaptSweepConfig(), label_epsilon=4.0)
    fn(0, {"round": 1}, torch.zeros(2, m.embedding_dim).numpy())
    text_tokens = int(m.text_positions(m.encode(data.texts)).sum())
    assert drawn == [(text_tokens, eta)]  # one draw per privatised token, all at the row's eta
    assert per_token_epsilon(drawn[0][1], m.word_embeddings) == pytest.approx(4.0, rel=1e-6)
    fn(0, {"round": 2}, torch.zeros(2, m.embedding_dim).numpy())
    assert len(drawn) == 1  # privatised once: later rounds are post-processing


def test_rapt_update_is_trained_on_privatised_tokens_and_labels_only(audit_model):
    from conftest import make_sentiment

    m, data = audit_model, make_sentiment(32, seed=3)
    raw = m.encode(data.texts)
    priv = S.privatize_client_data(m, data, 1e-3, 0.5, torch.Generator().manual_seed(0))
    mask = m.text_positions(raw).bool()
    # reconstruction targets are the privatised tokens at text positions, never the plain ones
    assert torch.equal(priv.targets[mask], priv.batch.input_ids[mask])
    assert (priv.targets[~mask] == -100).all()
    assert not torch.equal(priv.targets[mask], raw.input_ids[mask])
    assert not torch.equal(priv.labels, torch.tensor(data.labels))  # randomised response at eps 0.5
    assert priv.max_text_tokens == int(mask.sum(1).max())
    # the local round sees only the privatised data: equal private data -> equal update, whatever the raw data
    from post_fl.privacy.rapt import ReconstructionHead

    head = lambda: ReconstructionHead(m.embedding_dim, m.word_embeddings, mlp=False)  # noqa: E731
    prompt = torch.zeros(2, m.embedding_dim).numpy()
    tune, rapt = TuneConfig(epochs=1, batch_size=8, lr=0.05), S.RaptSweepConfig()
    torch.manual_seed(0)
    d1 = S.rapt_local_round(m, priv, head(), prompt, tune, rapt, seed=1)[0]
    torch.manual_seed(0)
    d2 = S.rapt_local_round(m, priv, head(), prompt, tune, rapt, seed=1)[0]
    assert (d1 == d2).all() and abs(d1).sum() > 0
    # no privatisation at eps = inf: plain data, and the row says there is no guarantee
    plain = S.privatize_client_data(m, data, math.inf, math.inf, None)
    assert torch.equal(plain.labels, torch.tensor(data.labels))
    assert S.rapt_row_privacy(math.inf, math.inf, {0: 5})["epsilon_unit"].startswith("none")
    row = S.rapt_row_privacy(4.0, 2.0, {0: 5, 1: 7})
    assert row["rapt_example_epsilon"] == row["epsilon"] == 7 * 4.0 + 2.0 and row["delta"] == 0.0
    assert S.rapt_label_epsilon(S.RaptSweepConfig(), 4.0) == 4.0
    assert S.rapt_label_epsilon(S.RaptSweepConfig(label_epsilon=1.5), 4.0) == 1.5
