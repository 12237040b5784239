"""Every input is checked before any stage works; all problems in one error; the run folder untouched."""

import json

import pytest

from post_fl.cli import main
from post_fl.core.config import load_config
from post_fl.core.data import TextDataset, write_text_file
from post_fl.core.tasks import PreflightError
from post_fl.preflight import check_federated, check_run, check_site_file, config_differences

from conftest import make_sentiment


@pytest.fixture
def files(tmp_path):
    train = write_text_file(make_sentiment(48, seed=1), tmp_path / "train.csv")
    test = write_text_file(make_sentiment(24, seed=2), tmp_path / "test.csv")
    public = write_text_file(TextDataset(make_sentiment(40, seed=3).texts, [], []), tmp_path / "public.jsonl")
    return train, test, public


def _cfg(tiny_dirs, files, run, **extra):
    train, test, public = files
    over = {"model.teacher": tiny_dirs["masked"], "data.train": str(train), "data.test": str(test),
            "data.public": str(public), "output_dir": str(run), "distill.steps": 2, "distill.batch_size": 8,
            "tune.batch_size": 8, "transfer.steps": 2, "prompt.num_virtual_tokens": 2, **extra}
    return load_config(None, over)


def _argv(cfg):
    d = cfg.data
    sets = {"model.teacher": cfg.model.teacher, "data.train": d.train, "data.test": d.test, "data.public": d.public,
            "distill.steps": 2, "distill.batch_size": 8, "tune.batch_size": 8, "transfer.steps": 2,
            "prompt.num_virtual_tokens": 2}
    out = ["--output-dir", cfg.output_dir, "--quiet"]
    for k, v in sets.items():
        out += ["--set", f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}"]
    return out


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


def test_every_problem_is_reported_at_once_and_nothing_is_created(tmp_path, tiny_dirs, files, capsys):
    train, test, public = files
    bad_train = tmp_path / "bad_train.csv"
    bad_train.write_text("sentence,label\nhello,positive\n")
    bad_test = tmp_path / "bad_test.csv"
    bad_test.write_text("text,label\ngood film,positive\nbad plot,negatve\n")
    run = tmp_path / "run"
    cfg = _cfg(tiny_dirs, files, run)
    argv = _argv(cfg) + ["--set", f'data.train="{bad_train}"', "--set", f'data.public="{tmp_path / "none.jsonl"}"',
                         "--set", f'model.teacher="{tmp_path / "no_teacher"}"']
    assert main(["run"] + argv) == 2
    err = capsys.readouterr().err
    assert "before any work started" in err
    assert f"{bad_train}: missing column 'text'" in err
    assert f"{tmp_path / 'none.jsonl'}: data file does not exist" in err
    assert "no such directory" in err and "no_teacher" in err
    assert not run.exists()  # not created, no config.json
    # the test file's typo is found together with everything else once train is fine
    argv = _argv(cfg) + ["--set", f'data.test="{bad_test}"', "--set", f'model.teacher="{tmp_path / "no_teacher"}"']
    assert main(["distill"] + argv) == 2
    err = capsys.readouterr().err
    assert "row 2: unknown label 'negatve'" in err and "did you mean 'negative'?" in err
    assert "no such directory" in err and "2 problem(s)" in err
    assert not run.exists()


def test_a_refused_run_leaves_an_existing_run_folder_untouched(tmp_path, tiny_dirs, files, capsys):
    run = tmp_path / "run"
    cfg = _cfg(tiny_dirs, files, run)
    assert main(["distill"] + _argv(cfg)) == 0
    before = _snapshot(run)
    typo = tmp_path / "typo.csv"
    rows = make_sentiment(48, seed=1)
    names = ["negative", "positive"]
    typo.write_text("text,label\n" + "".join(f"{t},{'postive' if i == 6 else names[y]}\n"
                                             for i, (t, y) in enumerate(zip(rows.texts, rows.labels))))
    assert main(["run"] + _argv(cfg) + ["--set", f'data.train="{typo}"']) == 2
    err = capsys.readouterr().err
    assert "row 7: label 'postive'" in err and "did you mean 'positive'?" in err
    assert "data.allow_rare_labels" in err
    assert _snapshot(run) == before  # config.json, stages and student exactly as they were


def _write_typo_train(tmp_path):
    """30 training rows labelled negative/positive, row 4 with the typo 'postive'."""
    typo = tmp_path / "typo.csv"
    data = make_sentiment(30, seed=4)
    names = ["negative", "positive"]
    typo.write_text("text,label\n" + "".join(f"{t},{'postive' if i == 3 else names[y]}\n"
                                             for i, (t, y) in enumerate(zip(data.texts, data.labels))))
    return typo


def test_a_typo_label_is_never_a_new_class(tmp_path, tiny_dirs, files):
    from post_fl.core.tasks import load_task

    typo = _write_typo_train(tmp_path)
    cfg = _cfg(tiny_dirs, files, tmp_path / "run", **{"data.train": str(typo)})
    with pytest.raises(PreflightError, match=r"row 4: label 'postive'.*only 1 row.*did you mean 'positive'"):
        check_run(cfg)
    with pytest.raises(ValueError, match="postive"):  # the stage itself applies the same rule
        load_task(cfg)
    # declared labels: anything else is an error whatever its count
    declared = _cfg(tiny_dirs, files, tmp_path / "run", **{
        "data.train": str(typo), "model.label_words": {"negative": ["bad"], "positive": ["good"]}})
    with pytest.raises(PreflightError, match=r"unknown label 'postive'.*declared.*did you mean 'positive'"):
        check_run(declared)
    # an explicit opt-in accepts a rare class (and a lower threshold too)
    for extra in ({"data.allow_rare_labels": True}, {"data.min_label_count": 1}):
        ok = _cfg(tiny_dirs, files, tmp_path / "run", **{"data.train": str(typo), **extra})
        assert load_task(ok).train.label_names == ["negative", "positive", "postive"]


def test_a_test_file_is_still_checked_when_the_training_labels_have_a_typo(tmp_path, tiny_dirs, files):
    """A rare (typo) training label does not hide the test file's unknown label: both in one error."""
    typo = _write_typo_train(tmp_path)
    bad_test = tmp_path / "bad_test.csv"
    bad_test.write_text("text,label\nfine,positive\nmeh,neutral\n")
    cfg = _cfg(tiny_dirs, files, tmp_path / "run", **{"data.train": str(typo), "data.test": str(bad_test)})
    with pytest.raises(PreflightError) as err:
        check_run(cfg)
    assert "label 'postive'" in str(err.value) and "row 2: unknown label 'neutral'" in str(err.value)


def test_a_stage_run_alone_needs_the_stages_before_it(tmp_path, tiny_dirs, files, capsys):
    run = tmp_path / "run"
    cfg = _cfg(tiny_dirs, files, run)
    assert main(["evaluate"] + _argv(cfg)) == 2
    err = capsys.readouterr().err
    assert "'post-fl distill' first" in err and "'post-fl tune' first" in err
    assert not run.exists()


def test_the_verbalizer_is_checked_without_loading_weights(tmp_path, tiny_dirs, files, monkeypatch):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("preflight must not load model weights")

    for cls in (transformers.AutoModelForMaskedLM, transformers.AutoModel, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", no_weights)
    check_run(_cfg(tiny_dirs, files, tmp_path / "run"))  # fine
    clash = _cfg(tiny_dirs, files, tmp_path / "run", **{"model.label_words": {"negative": ["bad"],
                                                                              "positive": ["bad"]}})
    with pytest.raises(PreflightError, match="model.teacher: labels 'negative' and 'positive' share"):
        check_run(clash)


def test_config_mismatch_names_the_differing_keys(tmp_path, tiny_dirs, files, capsys):
    run = tmp_path / "run"
    cfg = _cfg(tiny_dirs, files, run)
    assert main(["distill"] + _argv(cfg)) == 0
    assert main(["tune"] + _argv(cfg) + ["--set", "tune.lr=0.5", "--set", "seed=3"]) == 2
    err = capsys.readouterr().err
    assert "tune.lr: saved 0.04, now 0.5" in err and "seed: saved 0, now 3" in err
    assert f"--config {run / 'config.json'}" in err
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 1}}) == []


def test_site_file_is_checked_with_every_problem(tmp_path, tiny_dirs, files):
    site = tmp_path / "site.csv"
    site.write_text("text,label\ngood film,positive\n,negative\nbad plot,negtive\n")
    cfg = _cfg(tiny_dirs, files, tmp_path / "run", **{"model.label_words": {"negative": ["bad"],
                                                                            "positive": ["good"]}})
    labels = list(cfg.model.label_words)  # the site's own label set (node config labels)
    with pytest.raises(PreflightError) as exc:
        check_site_file(site, labels)
    assert "row 2: empty 'text'" in str(exc.value)
    good = write_text_file(make_sentiment(10, seed=5), tmp_path / "good.csv")
    check_site_file(good, labels)
    site.write_text("text,label\ngood film,positive\nbad plot,negtive\n")
    with pytest.raises(PreflightError, match="row 2: unknown label 'negtive'.*did you mean 'negative'"):
        check_site_file(site, labels)
    site.write_text("review,stars\ngood film,positive\nbad plot,negative\n")  # the site's own column names
    check_site_file(site, labels, "review", "stars")


def test_federated_preflight_refuses_partitions_that_leave_a_client_empty(tmp_path, tiny_dirs, files):
    from post_fl.federated.config import FederatedConfig

    cfg = _cfg(tiny_dirs, files, tmp_path / "run")
    check_federated(cfg, FederatedConfig(num_clients=4), partitions=True)
    with pytest.raises(PreflightError, match="federated.partitioning: cannot split .* among 100 clients"):
        check_federated(cfg, FederatedConfig(num_clients=100, min_clients=2), partitions=True)


def test_preflight_command_for_the_simulation_scripts(tmp_path, tiny_dirs, files, capsys):
    from post_fl.core.config import RunConfig
    from post_fl.core.config_help import toml_value as _toml_value
    from post_fl.federated.config import FederatedConfig, flatten_configs
    from post_fl.preflight import main as preflight_main

    pyproject = tmp_path / "pyproject.toml"  # an app file declaring today's defaults
    defaults = {k: v for k, v in flatten_configs(RunConfig(), FederatedConfig()).items()
                if not k.startswith("model.label_words")}
    pyproject.write_text("[tool.flwr.app.config]\n" + "".join(f'"{k}" = {_toml_value(v)}\n'
                                                             for k, v in defaults.items()))
    train, test, public = files
    good = (f'model.teacher="{tiny_dirs["masked"]}" data.train="{train}" data.test="{test}" '
            f'data.public="{public}" federated.num_clients=4 model.label_words="positive:good;negative:bad"')
    assert preflight_main(["--pyproject", str(pyproject), "--flower-config", good]) == 0
    bad = good.replace(str(train), str(tmp_path / "missing.csv"))
    assert preflight_main(["--pyproject", str(pyproject), "--flower-config", bad]) == 2
    assert "missing.csv: data file does not exist" in capsys.readouterr().err


def test_server_app_checks_inputs_before_any_work(tmp_path, tiny_dirs, files, monkeypatch):
    """The ServerApp's main refuses bad inputs before a FederatedServer (distillation, rounds) exists."""
    from post_fl import federated as fl
    from server_app.app import make_server_app

    made = []
    monkeypatch.setattr(fl, "FederatedServer", lambda *a, **k: made.append(1))
    train, test, public = files
    flat = {"model.teacher": str(tmp_path / "nope"), "data.train": str(train), "data.test": str(test),
            "data.public": str(public), "output_dir": str(tmp_path / "run")}
    app = make_server_app(flat)
    with pytest.raises(PreflightError, match="no such directory"):
        app._main(None, None)
    assert not made and not (tmp_path / "run").exists()


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _script_env(tmp_path):
    import os

    # as a new user runs it: no activated venv (only system paths), Flower home in the test's folder
    import sys
    from pathlib import Path

    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
           "FLWR_HOME": str(tmp_path / "flwr-home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if not (REPO / ".venv" / "bin" / "python").exists():  # a checkout whose venv lives elsewhere
        env["POST_FL_VENV"] = str(Path(sys.executable).parent.parent)
    return env


def test_flwr_run_script_refuses_bad_inputs_before_starting_anything(tmp_path):
    import subprocess

    res = subprocess.run(["bash", str(REPO / "simulation" / "flwr_run.sh"), "2", "-c",
                          f'data.train="{tmp_path / "missing.csv"}"'], env=_script_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "missing.csv: data file does not exist" in res.stderr
    assert not (tmp_path / "flwr-home" / "superlink.log").exists()  # no SuperLink was started


@pytest.mark.slow
def test_flwr_run_script_runs_without_a_venv_and_stops_what_it_started(tmp_path, fed_root):
    """The README's `simulation/flwr_run.sh N` on a tiny task: exit 0, results written, and no
    flower-superlink or flwr-simulation left behind (not even a zombie)."""
    import json
    import subprocess

    import psutil

    r = fed_root
    cfg = (f'model.teacher="{r / "teacher"}" model.student="{r / "student"}" data.train="{r / "train.csv"}" '
           f'data.test="{r / "test.csv"}" data.public="{r / "public.jsonl"}" '
           'model.label_words="positive:good;negative:bad" federated.rounds=1 federated.min_clients=2 '
           'federated.fraction_train=1.0 tune.batch_size=8 transfer.steps=2 prompt.num_virtual_tokens=2')
    env = _script_env(tmp_path)
    res = subprocess.run(["bash", str(REPO / "simulation" / "flwr_run.sh"), "2", "-c", cfg], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((REPO / "runs" / "flwr-2" / "results.json").read_text())
    assert [x["round"] for x in results["rounds"]] == [1]
    left = [(q.pid, q.status()) for q in psutil.process_iter(["cmdline"])
            if env["FLWR_HOME"] in " ".join(q.info["cmdline"] or [])]
    assert left == [], f"processes the script started are still there: {left}"


def test_client_app_checks_a_sites_file_at_hello(tmp_path, tiny_dirs, files, caplog):
    """A deployed site's own file is validated at the first message, before any model or round; the
    problem list goes to the site's log, the reply says only ``site input invalid``."""
    import logging

    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client_app.app import make_client_app
    from post_fl import federated as F
    from simulation.inprocess import ensure_task_identity

    site = tmp_path / "site.csv"
    site.write_text("text,label\ngood film,positive\nbad plot,negtive\n")
    train, test, public = files
    flat = {"model.teacher": tiny_dirs["masked"], "data.train": str(train), "data.test": str(test),
            "data.public": str(public), "model.label_words": "positive:good;negative:bad",
            "federated.client_cache_dir": str(tmp_path / "cache")}
    app = make_client_app(flat)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "data-path": str(site),
                                                    "dataset-name": "site", "labels": "negative,positive",
                                                    "privacy-budget-epsilon": 8.0},
                  state=RecordDict(), run_config={})
    from types import SimpleNamespace

    msg = SimpleNamespace(metadata=SimpleNamespace(message_type="query.hello"))  # never read: refused before
    with pytest.raises(PreflightError, match="row 2: unknown label 'negtive'.*did you mean 'negative'"):
        app._registered_funcs["query.hello"](msg, ctx)
    ensure_task_identity()
    hello = Message(RecordDict({F.TRAIN_CONFIG_RECORD: ConfigRecord({"model-hash": "0" * 64})}), 1, "query.hello")
    with caplog.at_level(logging.WARNING):
        reply = app(hello, ctx)
    assert {k: dict(v) for k, v in reply.content.config_records.items()} == \
        {F.REPLY_STATUS_RECORD: {"status": F.SITE_INPUT_INVALID}}
    assert "unknown label 'negtive'" in caplog.text and str(site) in caplog.text  # the site's own log


def test_sweep_checks_its_base_run_before_any_cell(tmp_path, tiny_dirs, files, capsys):
    train, test, _ = files
    out = tmp_path / "sweep"
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f'''output_dir = "{out}"
methods = ["zero_shot"]
num_clients = [1]
target_epsilon = [4]
partitioning = ["iid"]
seeds = [0]
[base.model]
teacher = "{tmp_path / 'no-teacher'}"
[base.data]
train = "{train}"
test = "{test}"
public = "{tmp_path / 'no-public.jsonl'}"
''')
    assert main(["sweep", "--config", str(sweep), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "no-public.jsonl: data file does not exist" in err
    assert not out.exists()


def test_simulation_run_checks_inputs_and_partitions_before_ray(tmp_path, tiny_dirs, files, monkeypatch, capsys):
    import simulation.run as sim

    monkeypatch.setattr(sim, "simulate", lambda *a, **k: pytest.fail("the simulation must not start"))
    train, test, public = files
    argv = ["--num-supernodes", "100", "-c", f'model.teacher="{tiny_dirs["masked"]}"',
            "-c", f'data.train="{train}"', "-c", f'data.test="{test}"', "-c", f'data.public="{public}"',
            "-c", 'model.label_words="positive:good;negative:bad"']
    with pytest.raises(SystemExit) as exc:
        sim.main(argv)
    assert exc.value.code == 2
    assert "cannot split" in capsys.readouterr().err  # 48 examples (less the validation split) for 100 clients


def test_every_config_problem_is_reported_at_once(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[tune]\nlrr = 1\nepochs = -1\n[data]\nmin_label_count = 0\n")
    assert main(["run", "--config", str(cfg), "--output-dir", str(tmp_path / "run"), "--set", "prompt.init=\"x\""]) == 2
    err = capsys.readouterr().err
    for key in ("tune.lrr", "tune.epochs", "data.min_label_count", "prompt.init"):
        assert key in err, (key, err)
    assert not (tmp_path / "run").exists()
