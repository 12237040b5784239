"""benchmarks/student_frontier.py on a tiny causal task: every measure of a point, resumable rows, the plot."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from post_fl.core.data import TextDataset, write_text_file

from conftest import build_tiny_model, make_sentiment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def frontier():
    spec = importlib.util.spec_from_file_location("student_frontier", ROOT / "benchmarks" / "student_frontier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    build_tiny_model("causal", root / "teacher")
    write_text_file(make_sentiment(80, seed=1), root / "train.csv")
    write_text_file(make_sentiment(24, seed=2), root / "test.csv")
    write_text_file(TextDataset(make_sentiment(60, seed=3).texts, [], []), root / "public.jsonl")
    cfg = root / "run.toml"
    cfg.write_text(f"""
[model]
teacher = "{root / 'teacher'}"
label_words = {{ negative = ["bad"], positive = ["good"] }}
[data]
train = "{root / 'train.csv'}"
test = "{root / 'test.csv'}"
public = "{root / 'public.jsonl'}"
validation_fraction = 0.25
[prompt]
num_virtual_tokens = 2
[tune]
epochs = 1.0
batch_size = 8
[distill]
num_layers = 2
steps = 4
batch_size = 4
eval_every = 2
cache = false
[transfer]
steps = 3
batch_size = 4
eval_every = 1
""")
    return cfg


def test_a_point_measures_everything_and_a_rerun_skips_it(frontier, tiny_config, tmp_path, monkeypatch):
    out = tmp_path / "frontier.json"
    argv = ["student_frontier.py", "--config", str(tiny_config), "--out", str(out), "--plot",
            "--point", "lm-deep", "distill.objective=lm", "distill.layer_selection=ends", "distill.sequence_length=16",
            "distill.corpus_tokens=300", "prompt.form=deep"]
    monkeypatch.setattr(sys, "argv", argv)
    frontier.main()
    rows = json.loads(out.read_text())
    assert [r["point"] for r in rows] == ["lm-deep"]
    row = rows[0]
    for key in ("student_zero_shot", "student_nondp", "student_dp", "transferred", "direct_use", "teacher_zero_shot"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["overrides"]["distill.objective"] == "lm" and row["teacher_layers_kept"] == [0, 3]
    assert row["epsilon"] <= 8.0 + 1e-6 and row["student_epoch_s"] > 0 and row["teacher_epoch_s"] > 0
    assert row["gain_nondp"] == pytest.approx(row["student_nondp"] - row["student_zero_shot"])
    assert out.with_suffix(".png").stat().st_size > 0
    # a rerun finds the point and measures nothing
    monkeypatch.setattr(frontier, "measure_point", lambda *a, **k: pytest.fail("measured again"))
    frontier.main()
    assert json.loads(out.read_text()) == rows


def test_a_point_with_a_bad_override_is_refused(frontier, tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["student_frontier.py", "--config", str(tiny_config), "--out",
                                      str(tmp_path / "f.json"), "--point", "bad", "distill.objective"])
    with pytest.raises(SystemExit, match="key=value"):
        frontier.main()


def test_gradient_norms_reports_each_form_on_public_text(tiny_config, tmp_path, capsys):
    """benchmarks/gradient_norms.py: per-example norms of both prompt forms, beside the auto clip bound."""
    from post_fl.core.config import load_config
    from post_fl.pipeline import Pipeline

    pipe = Pipeline(load_config(tiny_config), tmp_path / "run")
    pipe.save_config()
    pipe.distill()
    spec = importlib.util.spec_from_file_location("gradient_norms", ROOT / "benchmarks" / "gradient_norms.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--run", str(tmp_path / "run"), "--texts", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "public" and out["texts"] == 6
    for form, bound in (("input", 1.0), ("deep", 0.25)):
        row = out["forms"][form]
        assert 0 < row["q10"] <= row["median"] <= row["q90"] and row["auto_clip_bound"] == bound
    assert out["forms"]["deep"]["parameters"] > out["forms"]["input"]["parameters"]
