"""The single-site pipeline end to end through the ``post-fl`` CLI, on a tiny model and generated files."""

import json

import pytest

from post_fl.cli import main, parse_overrides
from post_fl.core.config import ConfigError


def _args(tiny_dirs, files, run, kind="masked"):
    train, test, public = files
    sets = {"model.teacher": f'"{tiny_dirs[kind]}"', "data.train": f'"{train}"', "data.test": f'"{test}"',
            "data.public": f'"{public}"', "distill.steps": 3, "distill.batch_size": 8, "tune.epochs": 1,
            "tune.batch_size": 8, "tune.target_epsilon": 4, "transfer.steps": 3, "prompt.num_virtual_tokens": 2}
    out = ["--output-dir", str(run), "--quiet"]
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def test_run_writes_every_artifact_and_result(tmp_path, tiny_dirs, files, capsys):
    run = tmp_path / "run"
    assert main(["run"] + _args(tiny_dirs, files, run)) == 0
    results = json.loads((run / "results.json").read_text())
    assert {"majority_class", "teacher_zero_shot", "student_zero_shot", "student_private_prompt",
            "teacher_direct_prompt", "teacher_transferred_prompt",
            "teacher_tuned_prompt_nonprivate"} <= set(results["accuracy"])
    assert all(0 <= a <= 1 for a in results["accuracy"].values())
    assert 0 < results["privacy"]["epsilon"] <= 4.02 and 0 < results["privacy"]["delta"] <= 1 / 48  # the derived default (tuning.resolve_delta)
    for d in ("student", "prompt_student", "prompt_teacher", "prompt_teacher_tuned"):
        assert (run / d).is_dir()
    out = capsys.readouterr().out
    assert "teacher transferred prompt" in out
    # where epsilon is reported, so is what it does not cover: the validation split, used outside DP (issue 22)
    n_val = results["data"]["validation"]
    assert n_val > 0 and f"validation split ({n_val} labelled examples" in results["privacy"]["outside_dp"]
    assert "outside DP: the validation split" in out


def test_stages_run_one_by_one_from_the_run_folder(tmp_path, tiny_dirs, files):
    run = tmp_path / "run"
    args = _args(tiny_dirs, files, run, kind="causal")
    assert main(["transfer"] + args) == 2  # nothing to transfer yet: clear error, no crash
    for stage in ("distill", "tune", "transfer", "evaluate"):
        assert main([stage] + args) == 0, stage
    results = json.loads((run / "results.json").read_text())
    assert "teacher_transferred_prompt" in results["accuracy"]
    assert "teacher_tuned_prompt_nonprivate" not in results["accuracy"]
    # the transfer's curve: a check at step 0 and at the last step (3), the step selected on held-out public text
    lines = (run / "transfer_curve.csv").read_text().splitlines()
    assert lines[0] == "step,train_loss,heldout_loss,validation_accuracy" and len(lines) == 3
    assert (run / "transfer_curve.png").read_bytes()[:4] == b"\x89PNG"
    stage = json.loads((run / "stages" / "transfer.json").read_text())
    assert stage["best_step"] in (0, 3) and stage["alpha_used"] == 1.0 and stage["heldout_examples"] == 2
    assert results["transfer"]["best_step"] == stage["best_step"] and "curve" not in results["transfer"]


def test_a_run_folder_refuses_a_different_config(tmp_path, tiny_dirs, files, capsys):
    run = tmp_path / "run"
    args = _args(tiny_dirs, files, run)
    assert main(["distill"] + args) == 0
    assert main(["tune"] + args + ["--set", "tune.lr=0.5"]) == 2
    assert "different config" in capsys.readouterr().err
    # a folder written before a setting existed: a result-neutral setting never matters, a legacy-valued one
    # continues only at its legacy value
    saved = json.loads((run / "config.json").read_text())
    del saved["eval"]["cache_zero_shot"], saved["distill"]["keep_best"]
    (run / "config.json").write_text(json.dumps(saved))
    assert main(["tune"] + args + ["--set", "eval.cache_zero_shot=false"]) == 2
    assert "distill.keep_best" in capsys.readouterr().err
    assert main(["tune"] + args + ["--set", "eval.cache_zero_shot=false", "--set", "distill.keep_best=false"]) == 0


def test_bad_input_gives_a_clear_error(tmp_path, tiny_dirs, files, capsys):
    run = tmp_path / "run"
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhello,positive\n")
    assert main(["distill"] + _args(tiny_dirs, files, run) + ["--set", f'data.train="{bad}"']) == 2
    err = capsys.readouterr().err
    assert "missing column 'text'" in err and str(bad) in err
    assert not (run / "student").exists()
    # nothing was made with the rejected config, so the corrected one may use the same folder
    assert main(["distill"] + _args(tiny_dirs, files, run)) == 0
    assert main(["run", "--output-dir", str(run), "--set", "tune.batchsize=3"]) == 2
    assert "tune.batchsize" in capsys.readouterr().err


def test_override_parsing():
    assert parse_overrides(["tune.lr=0.1", "data.train=x.csv", "tune.target_epsilon=inf"]) == {
        "tune.lr": 0.1, "data.train": "x.csv", "tune.target_epsilon": float("inf")}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["nonsense"])


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for opt in ("--config", "--output-dir", "--set", "--seed", "--quiet"):
        assert opt in out


def test_public_file_may_name_its_own_text_columns(tmp_path, files):
    """The POST setting: a labelled private task in one format, public text (AG-News-like) in another."""
    from post_fl.core.config import load_config
    from post_fl.core.data import DataError
    from post_fl.core.tasks import load_task

    train, test, _ = files
    public = tmp_path / "news.csv"
    public.write_text("label,title,description\n1,Stocks rise,Markets gained today\n2,Team wins,A late goal\n")
    over = {"data.train": str(train), "data.test": str(test), "data.public": str(public),
            "model.label_words": {"negative": ["bad"], "positive": ["good"]}}
    with pytest.raises(DataError, match="news.csv.*'text'"):
        load_task(load_config(None, over))
    task = load_task(load_config(None, {**over, "data.public_text_column": "title+description"}))
    assert sorted(task.public.texts) == ["Stocks rise Markets gained today", "Team wins A late goal"]
    assert task.public.labels == [] and len(task.train) + len(task.validation or []) == 48


def test_split_sentences_keeps_whole_sentences_of_the_allowed_length():
    from post_fl.core.data import split_sentences

    texts = ['I loved it. The plot (which was "great") really worked! But the end was cut mid',
             'Is it good? Yes, it really is good." ' + "long " * 70 + "run-on."]
    assert split_sentences(texts) == ['The plot (which was "great") really worked!', "Yes, it really is good."]
    assert split_sentences(texts, min_words=3)[:2] == ["I loved it.", 'The plot (which was "great") really worked!']


def test_public_unit_sentence_splits_the_public_file(tmp_path, files):
    from post_fl.core.config import load_config
    from post_fl.core.data import DataError
    from post_fl.core.tasks import load_task

    train, test, _ = files
    public = tmp_path / "reviews.csv"
    public.write_text('text\n"A fine film with a great cast. I would watch it again, gladly! Cut off in the mi"\n'
                      '"Too short. The second review has one sentence of enough words."\n')
    over = {"data.train": str(train), "data.test": str(test), "data.public": str(public), "data.public_unit": "sentence",
            "model.label_words": {"negative": ["bad"], "positive": ["good"]}}
    task = load_task(load_config(None, over))
    assert sorted(task.public.texts) == ["A fine film with a great cast.", "I would watch it again, gladly!",
                                         "The second review has one sentence of enough words."]
    assert len(load_task(load_config(None, {**over, "data.public_unit": "text"})).public) == 2
    auto = load_config(None, {**over, "data.public_unit": "auto"})  # a public file: whole texts
    assert auto.data.resolved_public_unit() == "text" and len(load_task(auto).public) == 2
    assert load_config(None, {}).data.resolved_public_unit() == "sentence"  # the embedded IMDB reviews
    assert load_config(None, {"data.embedded_task": "tweets"}).data.resolved_public_unit() == "text"
    public.write_text("text\nno sentence end here\nNor. Here.\n")
    with pytest.raises(DataError, match="reviews.csv.*public_unit = 'sentence' found no sentence"):
        load_task(load_config(None, over))
    with pytest.raises(ConfigError, match="data.public_unit: expected auto.text.sentence, got 'word'"):
        load_config(None, {**over, "data.public_unit": "word"})


def test_test_file_may_name_its_own_text_column(tmp_path, files):
    from post_fl.core.config import load_config
    from post_fl.core.tasks import load_task

    train, _, public = files
    test = tmp_path / "dev.tsv"
    test.write_text("label\tcontent\npositive\tgood film\nnegative\tbad plot\n")
    over = {"data.train": str(train), "data.test": str(test), "data.public": str(public),
            "data.test_text_column": "content", "model.label_words": {"negative": ["bad"], "positive": ["good"]}}
    task = load_task(load_config(None, over))
    assert task.test.texts == ["good film", "bad plot"] and task.test.labels == [1, 0]


def test_a_killed_run_resumes_after_its_last_completed_stage(tmp_path, tiny_dirs, files, monkeypatch, capsys):
    import post_fl.method.transfer as T

    run = tmp_path / "run"
    args = _args(tiny_dirs, files, run) + ["--set", "eval.teacher_prompt_tuning=false"]

    def killed(*a, **k):
        raise KeyboardInterrupt  # the run is killed during the transfer stage

    real = T.transfer_prompt
    monkeypatch.setattr(T, "transfer_prompt", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["run"] + args)
    assert (run / "stages" / "tune.done.json").is_file() and not (run / "stages" / "transfer.done.json").exists()
    done = {n: (run / "stages" / f"{n}.json").stat().st_mtime_ns for n in ("distill", "tune")}
    prompt_before = (run / "prompt_student").stat().st_mtime_ns
    monkeypatch.setattr(T, "transfer_prompt", real)
    assert main(["run"] + args) == 0  # same command again: distill and tune are not redone
    assert {n: (run / "stages" / f"{n}.json").stat().st_mtime_ns for n in ("distill", "tune")} == done
    assert (run / "prompt_student").stat().st_mtime_ns == prompt_before
    assert (run / "stages" / "transfer.done.json").is_file() and (run / "results.json").is_file()
    # a changed input (the training file) makes the stages that read it run again
    train = files[0]
    train.write_text(train.read_text())  # same content, new mtime
    import os

    os.utime(train, ns=(train.stat().st_atime_ns, train.stat().st_mtime_ns + 10**9))
    assert main(["run"] + args) == 0
    assert (run / "stages" / "tune.json").stat().st_mtime_ns != done["tune"]
    # --no-resume reruns everything
    before = (run / "stages" / "distill.json").stat().st_mtime_ns
    assert main(["run", "--no-resume"] + args) == 0
    assert (run / "stages" / "distill.json").stat().st_mtime_ns != before


def test_the_saved_config_json_continues_a_run(tmp_path, tiny_dirs, files):
    run = tmp_path / "run"
    args = _args(tiny_dirs, files, run)
    assert main(["distill"] + args) == 0
    # finishing stage by stage: no --set flags retyped, the folder's own config.json
    for stage in ("tune", "transfer", "evaluate"):
        assert main([stage, "--quiet", "--config", str(run / "config.json")]) == 0, stage
    assert (run / "results.json").is_file()


def test_results_table_keeps_small_deltas_exact():
    from post_fl.cli import _fmt

    assert _fmt(0.00025) == "0.00025" and _fmt(1e-05) == "1e-05" and _fmt(float("inf")) == "inf"
    assert _fmt(3.99408) == "3.994"


def test_quiet_silences_the_libraries(tmp_path, tiny_dirs, files):
    import transformers

    from post_fl.core import progress

    try:
        assert main(["distill"] + _args(tiny_dirs, files, tmp_path / "run")) == 0  # _args passes --quiet
        assert progress.is_quiet()
        assert transformers.utils.logging.get_verbosity() == transformers.logging.ERROR
    finally:
        progress.configure(quiet=False)


def test_the_teacher_prompt_is_cached_by_teacher_data_and_recipe(tmp_path, tiny_dirs, files, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("POST_FL_CACHE", str(tmp_path / "cache"))  # not the suite's shared cache

    def tune(run, *extra):
        assert main(["tune-teacher"] + _args(tiny_dirs, files, run, kind="causal") + list(extra)) == 0
        stage = json.loads((run / "stages" / "tune_teacher.json").read_text())
        return stage, load_file(str(run / "prompt_teacher_tuned" / "adapter_model.safetensors"))["prompt_embeddings"]

    first, w1 = tune(tmp_path / "a")
    again, w2 = tune(tmp_path / "b")
    other, w3 = tune(tmp_path / "c", "--set", "eval.teacher_tune_lr=0.2")
    assert (first["cache"], again["cache"], other["cache"]) == ("miss", "hit", "miss")
    assert (w1 == w2).all() and not (w1 == w3).all()
    assert again["seconds_per_example"] == first["seconds_per_example"] > 0
    off, _ = tune(tmp_path / "d", "--set", "eval.cache_teacher_prompt=false")
    assert off["cache"] == "off"


def test_a_transfer_that_moves_the_class_shares_gets_a_warning(caplog):
    """The run log states the label-free held-out check, and warns when a class share moves by more than the
    bound (the two measured runs: 0.04 kept zero-shot accuracy, 0.31 lost 0.16)."""
    import logging

    from post_fl.method.transfer import CLASS_SHARE_SHIFT_WARNING, log_heldout_check

    def check(after):
        return {"texts": 100, "agreement_with_zero_shot": 0.7, "class_shares_zero_shot": [0.6, 0.4],
                "class_shares_transferred": after}

    with caplog.at_level(logging.INFO, logger="post_fl.method.transfer"):
        log_heldout_check(check([0.56, 0.44]), ["negative", "positive"])
    assert "negative 0.60 -> 0.56" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="post_fl.method.transfer"):
        log_heldout_check(check([0.91, 0.09]), ["negative", "positive"])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "0.31" in warnings[0].getMessage() and CLASS_SHARE_SHIFT_WARNING == 0.2
    log_heldout_check(None, ["negative", "positive"])  # no held-out texts: nothing to say
