"""Progress: a bar on a terminal, a line every few percent in a log, nothing when quiet."""

import io
import logging
import warnings

import pytest

from post_fl.core import progress as P


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture(autouse=True)
def not_quiet():
    P.configure(quiet=False)
    yield
    P.configure(quiet=False)


def test_a_log_gets_a_line_every_few_percent_never_one_per_step():
    out, clock = io.StringIO(), FakeClock()
    bar = P.LineProgress(1000, "tune", out, every_percent=10, quiet_seconds=2.0, clock=clock)
    for _ in range(1000):
        clock.t += 0.01  # 10 s in all
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert 5 <= len(lines) <= 11, lines  # not 1000
    assert lines[-1].startswith("tune: 100% (1000/1000)")
    assert all(line.startswith("tune: ") and "%" in line for line in lines)


def test_a_short_loop_prints_nothing():
    out, clock = io.StringIO(), FakeClock()
    bar = P.LineProgress(50, "evaluate", out, clock=clock)
    for _ in range(50):
        bar.update(1)
    bar.close()
    assert out.getvalue() == ""


def test_terminal_log_and_quiet_choose_the_right_report():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    from tqdm import tqdm

    bar = P.progress_bar(10, "x", stream=Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(P.progress_bar(10, "x", stream=io.StringIO()), P.LineProgress)
    assert isinstance(P.progress_bar(10, "x", enabled=False), P.NullProgress)
    P.configure(quiet=True)
    assert type(P.progress_bar(10, "x", stream=Tty())) is P.NullProgress


def test_quiet_silences_library_bars_logs_and_warnings():
    import transformers

    P.configure(quiet=True)
    assert transformers.utils.logging.get_verbosity() == logging.ERROR
    assert not transformers.utils.logging.is_progress_bar_enabled()
    with warnings.catch_warnings(record=True) as caught:
        P.silence_libraries()
        warnings.warn_explicit("noisy", UserWarning, "opacus/privacy_engine.py", 1, module="opacus.privacy_engine")
        warnings.warn_explicit("ours", UserWarning, "post_fl/x.py", 1, module="post_fl.x")
    assert [str(w.message) for w in caught] == ["ours"]


def test_the_training_loops_report_through_the_helper(monkeypatch, capsys, tiny_dirs):
    """transfer (as tune/distill/evaluate) gets its report from progress_bar: lines, not one per step."""
    import torch

    from post_fl.core.config import TransferConfig
    from post_fl.core.models import load_scoring_model
    from post_fl.core.prompt import init_from_vocab
    from post_fl.method.transfer import transfer_prompt

    from conftest import make_sentiment

    monkeypatch.setattr(P, "QUIET_SECONDS", 0.0)
    model = load_scoring_model(tiny_dirs["masked"], ["negative", "positive"],
                               {"positive": ["good"], "negative": ["bad"]})
    prompt = init_from_vocab(model.word_embeddings, 2, torch.Generator().manual_seed(0))
    transfer_prompt(model, prompt, model, make_sentiment(16, seed=3), TransferConfig(steps=40, batch_size=4),
                    progress=True)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("transfer: ")]
    assert 2 <= len(lines) <= 11, lines
    P.configure(quiet=True)
    transfer_prompt(model, prompt, model, make_sentiment(16, seed=3), TransferConfig(steps=40, batch_size=4),
                    progress=True)
    assert "transfer: " not in capsys.readouterr().err


def test_library_bars_are_off_when_writing_to_a_log():
    import transformers

    transformers.utils.logging.enable_progress_bar()
    P.configure(quiet=False, stream=io.StringIO())  # not a terminal
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert not P.is_quiet()



def test_verbose_and_quiet_set_how_much_a_command_logs():
    from post_fl.cli import build_parser

    parser = build_parser()
    for command in (["run"], ["tune"], ["sweep", "-c", "x.toml"]):
        assert parser.parse_args(command + ["-v"]).verbose and parser.parse_args(command + ["-q"]).quiet
        with pytest.raises(SystemExit):  # one or the other
            parser.parse_args(command + ["-v", "-q"])
    post_fl_log = logging.getLogger("post_fl")
    try:
        P.setup_logging(1)
        assert post_fl_log.getEffectiveLevel() == logging.DEBUG and not P.is_quiet()
        assert logging.getLogger("transformers").level == logging.WARNING
        P.setup_logging(0)
        assert post_fl_log.level == logging.NOTSET and logging.getLogger("transformers").level == logging.ERROR
        P.setup_logging(-1)
        assert P.is_quiet()
    finally:
        P.setup_logging(0)
        P.configure(quiet=False)

LIBRARY_NOISE = ("Optimal order is the", "Full backward hook is firing", "non-full backward hook", "Secure RNG turned off",
                 "UserWarning", "FutureWarning", "DeprecationWarning", "warnings.warn(", "it/s]", "s/it]", "%|",
                 "Loading weights", "Writing model shards", "de-quantizing GGUF")


def test_a_main_job_log_file_has_no_library_noise(tmp_path, tiny_dirs):
    """`post-fl run` with its output in a file (not a terminal), as a job writes its log: post-fl's own lines
    (stages with their times, progress as plain lines, the results table) and nothing else: no carriage-return
    fragments of progress bars, no library warnings. A fresh process, so no test filter or earlier warning
    hides anything."""
    import os
    import subprocess
    import sys

    from post_fl.core.data import write_text_file

    from conftest import make_sentiment

    train = write_text_file(make_sentiment(48, seed=1), tmp_path / "train.csv")
    test = write_text_file(make_sentiment(24, seed=2), tmp_path / "test.jsonl")
    public = write_text_file(make_sentiment(40, seed=3), tmp_path / "public.csv")
    sets = {"model.teacher": f'"{tiny_dirs["causal"]}"', "data.train": f'"{train}"', "data.test": f'"{test}"',
            "data.public": f'"{public}"', "distill.steps": 20, "distill.batch_size": 8, "distill.eval_every": 10,
            "tune.epochs": 2, "tune.batch_size": 8, "tune.target_epsilon": 4, "transfer.steps": 20,
            "prompt.num_virtual_tokens": 2}
    argv = [sys.executable, "-m", "post_fl.cli", "run", "-o", str(tmp_path / "run")]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    log = tmp_path / "job.log"
    with open(log, "wb") as fh:
        rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, timeout=900,
                            env={**os.environ, "POST_FL_CACHE": str(tmp_path / "cache")}).returncode
    text = log.read_text()
    assert rc == 0, text
    assert "\r" not in text, text
    noise = [line for line in text.splitlines() if any(n in line for n in LIBRARY_NOISE)]
    assert not noise, noise
    for stage in ("distill", "tune", "transfer", "tune_teacher", "evaluate"):
        assert f"post_fl.pipeline: stage {stage} done in " in text, text
    assert "teacher transferred prompt" in text  # the results table
    progress = [line for line in text.splitlines() if line.startswith(("distill: ", "tune", "transfer: "))]
    assert all("%" in line and line.count("(") >= 1 for line in progress), progress
