"""Client-count experiments of the sweep: the examples_per_client / dp_level / extra-seed axes, the
calibrated zero-shot reference, 95% intervals, the client-batched engine in cells, and the
accuracy-vs-clients plot and tables."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_task

from post_fl import experiments as S
from post_fl.experiments import cells as CELLS
from post_fl.experiments import sweep as SW
from post_fl.core.config import ConfigError
from post_fl.core.data import Task, TextDataset

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_task(tmp_path_factory.mktemp("clients-assets"), 64, seed=31, with_student=True)


def sweep_toml(root, out, head: str = "") -> str:
    return f"""{head}
output_dir = "{out}"
methods = ["zero_shot", "calibrated_zero_shot", "majority", "post", "teacher_dp"]
num_clients = [3]
examples_per_client = [4]
target_epsilon = [4]
dp_level = ["sample", "user"]
seeds = [0]
rounds = 1
clients_per_round = 3
cost_probe_steps = 0
engine = "batched"
[base.model]
teacher = "{root / 'teacher'}"
student = "{root / 'student'}"
label_words = {{ positive = ["good"], negative = ["bad"] }}
[base.data]
train = "{root / 'train.csv'}"
test = "{root / 'test.csv'}"
public = "{root / 'public.jsonl'}"
[base.prompt]
num_virtual_tokens = 4
[base.tune]
epochs = 1.0
batch_size = 4
delta = 1e-3
[base.transfer]
steps = 2
batch_size = 8
[audit]
enabled = false
"""


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "sweep.toml"
    p.write_text(text)
    return p


# ---------------------------------------------------------------- grid
def test_new_axes_expand_into_cells_and_keys():
    cfg = S.SweepConfig(methods=["zero_shot", "calibrated_zero_shot", "majority", "post", "rapt"],
                        num_clients=[1, 10], target_epsilon=[1.0, 8.0, math.inf], examples_per_client=[0, 5],
                        dp_level=["sample", "user"], seeds=[0], extra_seeds=[1],
                        extra_seeds_at_epsilon=[8.0]).validate()
    cells = S.expand_cells(cfg)
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))
    # seed 0: 3 references + 1 client (2 n-values x 3 eps x 2 methods, no user level) + 10 clients
    # (2 n-values x [sample: 3 eps x 2 methods + user: 2 finite eps x post only]); seed 1: eps = 8 only
    assert len(cells) == (3 + 12 + 16) + (4 + 6)
    assert "post|clients=10|n=5|eps=8|dp=user|part=iid|seed=1" in keys
    assert "post|clients=10|eps=1|part=iid|seed=0" in keys  # the old key form when the axes are at default
    assert "calibrated_zero_shot|seed=0" in keys and "calibrated_zero_shot|seed=1" not in keys
    assert not any("clients=1|" in k and "dp=user" in k for k in keys)  # one client: no user level
    assert not any("eps=inf|dp=user" in k for k in keys)  # no DP: one cell serves both levels
    assert not any(k.startswith("rapt|") and "dp=user" in k for k in keys)
    assert {c.target_epsilon for c in cells if c.seed == 1} == {8.0}
    slugs = {c.run_slug for c in cells if c.method == "post" and c.num_clients == 10 and c.target_epsilon == 8.0
             and c.seed == 0}
    assert slugs == {"student-c10-eps8-iid-s0", "student-c10-n5-eps8-iid-s0", "student-c10-eps8-user-iid-s0",
                     "student-c10-n5-eps8-user-iid-s0"}


def test_old_sweep_files_keep_their_cells():
    for name in ("default.toml", "tiny.toml", "audit.toml"):
        cfg = S.load_sweep_config(ROOT / "sweeps" / name)
        keys = [c.key for c in S.expand_cells(cfg)]
        assert keys and not any("|n=" in k or "dp=user" in k or "calibrated" in k for k in keys), name
        assert cfg.engine == "sequential" and "engine" not in S.settings_fingerprint(cfg)
    assert "calibrated_zero_shot" not in S.SweepConfig().methods  # default methods as before


def test_new_sweep_files_parse():
    for name, per in (("clients_fixed_total.toml", [0]), ("clients_fixed_per_client.toml", None)):
        cfg = S.load_sweep_config(ROOT / "sweeps" / name)
        assert cfg.engine == "batched" and cfg.dp_level == ["sample", "user"]
        assert cfg.target_epsilon == [1.0, 4.0, 8.0, math.inf] and cfg.extra_seeds_at_epsilon == [8.0]
        assert set(S.METHODS) <= set(cfg.methods)
        if per is not None:
            assert cfg.examples_per_client == per and "dirichlet" in cfg.partitioning
        else:
            assert all(n > 0 for n in cfg.examples_per_client) and cfg.partitioning == ["iid"]
        assert cfg.base.model.teacher == "embedded-smollm2" and cfg.base.data.embedded_task == "movie-reviews"


@pytest.mark.parametrize("line, pattern", [
    ("examples_per_client = [-1]", "examples_per_client: expected values >= 0"),
    ("dp_level = [\"group\"]", r"dp_level: unknown level\(s\) \['group'\]"),
    ("engine = \"fast\"", "engine: expected one of"),
    ("cost_probe_steps = -1", "cost_probe_steps: expected >= 0"),
    ("extra_seeds = [0]\nextra_seeds_at_epsilon = [4]", r"extra_seeds: \[0\] already in seeds"),
    ("extra_seeds = [1]", "extra_seeds_at_epsilon: expected the epsilon"),
    ("extra_seeds = [1]\nextra_seeds_at_epsilon = [8]", r"extra_seeds_at_epsilon: \[8.0\] not in target_epsilon"),
    ("partitioning = [\"iid\", \"dirichlet\"]", "examples_per_client > 0 .* only iid"),
])
def test_new_axes_errors_name_the_key(assets, tmp_path, line, pattern):
    keys = {x.split("=")[0].strip() for x in line.splitlines()}
    text = line + "\n" + "\n".join(x for x in sweep_toml(assets, tmp_path / "out").splitlines()
                                    if x.split("=")[0].strip() not in keys)
    with pytest.raises(ConfigError, match=pattern):
        S.load_sweep_config(_write(tmp_path, text))


def test_user_dp_and_batched_secagg_settings_are_refused(assets, tmp_path):
    good = sweep_toml(assets, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"federated\.user_dp_target_epsilon: set by the sweep"):
        S.load_sweep_config(_write(tmp_path, good + "[federated]\nuser_dp_target_epsilon = 2.0\n"))
    with pytest.raises(ConfigError, match="engine = batched.*secagg"):
        S.load_sweep_config(_write(tmp_path, good + "[federated]\nsecagg = true\n"))


# ---------------------------------------------------------------- cell configs
def test_cell_configs_examples_per_client_and_user_level(assets, tmp_path):
    from post_fl.federated.client import client_partition

    cfg = S.load_sweep_config(_write(tmp_path, sweep_toml(assets, tmp_path / "out")))
    ctx = S.SweepContext(cfg)
    user = S.Cell("post", 3, 4.0, "iid", 0.0, 0, 4, "user")
    run_cfg, fed = CELLS._cell_configs(ctx, user, assets / "student", tmp_path / "run")
    assert fed.user_dp and fed.user_dp_target_epsilon == 4.0 and fed.user_noise_mode == "server"
    assert not run_cfg.tune.private  # clients run no DP-SGD under user-level DP
    assert run_cfg.data.max_train_examples == 12
    sizes = [len(client_partition(run_cfg, fed, c)) for c in range(3)]
    assert sizes == [4, 4, 4]
    sample = dataclasses.replace(user, dp_level="sample")
    run_cfg, fed = CELLS._cell_configs(ctx, sample, assets / "student", tmp_path / "run2")
    assert not fed.user_dp and run_cfg.tune.private and run_cfg.tune.target_epsilon == 4.0
    # n x K beyond the training set: refused with both numbers
    big = dataclasses.replace(user, examples_per_client=30)
    have = len(ctx.task(0).train)
    with pytest.raises(ConfigError, match=rf"needs 90 training examples, but the training set has {have}"):
        S.check_examples_per_client(ctx, [big])


def test_sweep_refuses_too_many_examples_before_any_cell(assets, tmp_path, monkeypatch):
    text = sweep_toml(assets, tmp_path / "out").replace("examples_per_client = [4]", "examples_per_client = [30]")
    monkeypatch.setattr(SW, "run_cell", lambda ctx, cell: pytest.fail("a cell ran"))
    with pytest.raises(ConfigError, match=r"examples_per_client = 30 x num_clients = 3 needs 90"):
        S.run_sweep(S.load_sweep_config(_write(tmp_path, text)))
    assert not (tmp_path / "out" / "results.csv").exists()


# ---------------------------------------------------------------- calibrated zero-shot
class BiasedTeacher:
    """Class scores [0, 1.5 +/- 1]: right on the sign, but class 1 always wins without calibration."""

    num_classes = 2
    label_names = ["negative", "positive"]

    def encode(self, texts):
        return list(texts)

    def parameters(self):  # a stub model without weights: it computes on the CPU (post_fl.core.compute)
        return iter(())

    def __call__(self, batch, prompt=None):
        return torch.tensor([[0.0, 1.5 + (1.0 if "good" in t else -1.0)] for t in batch])


def _data(n: int, flip: bool = False) -> TextDataset:
    texts = [("good film" if i % 2 else "bad film") + f" {i}" for i in range(n)]
    labels = [(i % 2) ^ int(flip) for i in range(n)]
    return TextDataset(texts, labels, ["negative", "positive"])


def _stub_ctx(test: TextDataset) -> S.SweepContext:
    ctx = S.SweepContext(S.SweepConfig())
    ctx._tasks[0] = Task(_data(10), test, TextDataset(["x"], [], []), {}, validation=_data(20))
    ctx._teacher = BiasedTeacher()
    return ctx


def test_calibrated_zero_shot_is_fitted_on_validation_only():
    ctx = _stub_ctx(_data(40))
    zero = S.run_cell(ctx, S.Cell("zero_shot"))
    cal = S.run_cell(ctx, S.Cell("calibrated_zero_shot"))
    assert zero["accuracy"] == pytest.approx(0.5)  # the biased teacher says "positive" to everything
    assert cal["accuracy"] == pytest.approx(1.0) and cal["epsilon"] == 0.0
    assert cal["accuracy_ci_low"] <= cal["accuracy"] <= cal["accuracy_ci_high"] and cal["test_examples"] == 40
    # test labels that disagree with validation: a bias fitted on test would reach >= 0.5; ours stays fitted
    # on validation, so it is exactly wrong on every flipped test example
    _, bias = S.calibrated_zero_shot(ctx, 0)
    flipped = _stub_ctx(_data(40, flip=True))
    acc, bias2 = S.calibrated_zero_shot(flipped, 0)
    assert torch.equal(bias, bias2) and acc == pytest.approx(0.0)
    no_val = _stub_ctx(_data(4))
    no_val._tasks[0].validation = None
    with pytest.raises(ValueError, match="needs a validation split"):
        S.calibrated_zero_shot(no_val, 0)


# ---------------------------------------------------------------- end to end (batched engine)
@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_client_count_sweep_end_to_end(assets, tmp_path, engine):
    from post_fl.privacy.ledger import read_ledgers

    out = tmp_path / "out"
    text = sweep_toml(assets, out).replace('engine = "batched"', f'engine = "{engine}"')
    cfg = S.load_sweep_config(_write(tmp_path, text))
    rows = S.run_sweep(cfg)
    by = {r["key"]: r for r in rows}
    assert len(rows) == 7 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    for r in rows:
        lo, acc, hi = float(r["accuracy_ci_low"]), float(r["accuracy"]), float(r["accuracy_ci_high"])
        assert 0 <= lo <= acc <= hi <= 1 and int(r["test_examples"]) > 0
    for m in ("post", "teacher_dp"):
        sample = by[f"{m}|clients=3|n=4|eps=4|part=iid|seed=0"]
        user = by[f"{m}|clients=3|n=4|eps=4|dp=user|part=iid|seed=0"]
        assert sample["engine"] == user["engine"] == engine and sample["dp_level"] == "sample"
        assert int(sample["train_examples"]) == 12 and sample["examples_per_client"] == "4"
        measured, other = ("student", "teacher") if m == "post" else ("teacher", "student")
        assert float(sample[f"{measured}_s_per_client_round"]) > 0 and sample[f"{other}_s_per_client_round"] == ""
        assert "not probed" in sample["cost_source"]
        assert ("client-batched" in sample["cost_source"]) == (engine == "batched")
        # sample level: the row's epsilon is the most any client's ledger spent
        ledgers = read_ledgers(out / sample["run_dir"] / "client-ledgers")
        assert len(ledgers) == 3
        assert float(sample["epsilon"]) == pytest.approx(max(v["epsilon"] for v in ledgers.values()))
        assert 0 < float(sample["epsilon"]) <= 4.0 + 1e-6 and sample["epsilon_unit"].startswith("example-level")
        # user level: DP-FedAvg's epsilon, no DP-SGD ledgers
        assert user["epsilon_unit"] == S.USER_LEVEL_UNIT and 0 < float(user["epsilon"]) <= 4.0 + 1e-6
        assert float(user["delta"]) == pytest.approx(min(1e-5, 1 / 30))
        assert not read_ledgers(out / user["run_dir"] / "client-ledgers")
        summary = json.loads((out / user["run_dir"] / "sweep_summary.json").read_text())
        assert summary["user_dp_noise_multiplier"] > 0  # the server's DP-FedAvg noise was on
    png = out / "plots" / "clients_post.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "## Accuracy by number of clients" in md and "### post" in md and "| user | iid | 4 | 3 |" in md
    assert "calibrated_zero_shot" in md


# ---------------------------------------------------------------- plot
def _rows():
    rows = [{"status": "ok", "method": "majority", "accuracy": "0.5"},
            {"status": "ok", "method": "zero_shot", "accuracy": "0.55"},
            {"status": "ok", "method": "calibrated_zero_shot", "accuracy": "0.6"}]
    for part in ("iid", "dirichlet"):
        for lv in ("sample", "user"):
            for k in (1, 10, 100):
                for eps in ("1", "8", "inf"):
                    if (lv == "user" and (k == 1 or eps == "inf")) or (k == 1 and part != "iid"):
                        continue  # as expand_cells: no user level for 1 client or eps = inf; 1 client is iid
                    for seed in ((0, 1) if eps == "8" else (0,)):
                        rows.append({"status": "ok", "method": "post", "num_clients": str(k), "dp_level": lv,
                                     "partitioning": part, "dirichlet_alpha": "0.5" if part == "dirichlet" else "",
                                     "target_epsilon": eps, "seed": str(seed), "accuracy": "0.7",
                                     "test_examples": "400", "train_examples": "2000", "examples_per_client": "0"})
    return [S.with_row_interval(r) for r in rows]


def test_clients_plot_has_a_panel_per_level_and_partitioning(tmp_path):
    from post_fl.experiments.plots import clients_experiment_figure, plot_clients_experiment

    fig, caption = clients_experiment_figure(_rows(), "post", {"task": "movie-reviews"})
    axes = fig.get_axes()
    titles = [ax.get_title() for ax in axes]
    assert len(axes) == 4 and sum("sample-level" in t for t in titles) == 2
    assert sum("user-level" in t for t in titles) == 2
    assert sum("Dirichlet(α=0.5)" in t for t in titles) == 2
    assert all(ax.get_xscale() == "log" and ax.get_xlabel().startswith("number of clients") for ax in axes)
    labels = set(fig.legends[0].get_texts()[i].get_text() for i in range(len(fig.legends[0].get_texts())))
    assert {"ε = 8 (2 seeds)", "ε = 1", "ε = ∞ (no DP)", "majority class", "zero-shot teacher"} <= labels
    assert any(lab.startswith("calibrated zero-shot") for lab in labels)
    assert "movie-reviews" in fig._suptitle.get_text() and "2000 training examples" in fig._suptitle.get_text()
    assert "95% Wilson" in caption
    # user panels: no 1-client point, but the no-DP line is drawn there too
    user_iid = axes[1]
    bars = {c.get_label(): list(c.lines[0].get_xdata()) for c in user_iid.containers}
    assert "ε = ∞ (no DP)" in bars and "ε = 1" in bars
    assert all(len(xs) == 2 and min(xs) > 5 for xs in bars.values()), bars
    for ax in (axes[0], axes[2]):  # sample level, iid and Dirichlet: the single site is drawn in both
        assert len(next(c for c in ax.containers if c.get_label() == "ε = 1").lines[0].get_xdata()) == 3
    # fixed per client: only iid, two panels; the title names n
    per = [dict(r, examples_per_client="40") for r in _rows() if r.get("partitioning", "iid") == "iid"]
    fig2, _ = clients_experiment_figure(per, "post")
    assert len(fig2.get_axes()) == 2 and "n = 40 examples per client" in fig2._suptitle.get_text()
    p = plot_clients_experiment(_rows(), tmp_path / "c.png", "post")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_old_results_csv_is_migrated_to_the_new_columns(tmp_path):
    old_cols = [c for c in S.CSV_COLUMNS if c not in ("examples_per_client", "dp_level", "accuracy_ci_low",
                                                      "accuracy_ci_high", "accuracy_stderr", "engine")]
    p = tmp_path / "results.csv"
    with p.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=old_cols)
        w.writeheader()
        w.writerow({"key": "zero_shot|seed=0", "status": "ok", "method": "zero_shot", "accuracy": "0.5",
                    "test_examples": "100"})
    S.append_row(p, {"key": "majority|seed=0", "status": "ok", "method": "majority", "accuracy": 0.4})
    rows = S.read_results(p)
    assert [r["key"] for r in rows] == ["zero_shot|seed=0", "majority|seed=0"] and rows[0]["accuracy"] == "0.5"
    with p.open(newline="") as fh:
        assert next(csv.reader(fh)) == S.CSV_COLUMNS
    filled = S.with_row_interval(rows[0])
    assert float(filled["accuracy_ci_low"]) < 0.5 < float(filled["accuracy_ci_high"])
    p.write_text("key,status,bogus\n")
    with pytest.raises(ConfigError, match="use a new output_dir"):
        S.append_row(p, {"key": "x", "status": "ok"})
