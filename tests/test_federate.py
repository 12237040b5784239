"""``post-fl federate``: the federated job end to end on a tiny task, on both engines; its refusals; resume."""

import csv
import json

import numpy as np
import pytest

from post_fl.cli import main
from post_fl.core.deep_prompt import load_any_prompt
from post_fl.federated import shipping

pytestmark = pytest.mark.usefixtures("one_thread")

TABLE_ROWS = {"majority_class", "teacher_zero_shot", "teacher_zero_shot_calibrated", "teacher_zero_shot_contextual",
              "student_zero_shot", "student_private_prompt", "teacher_direct_prompt", "teacher_transferred_prompt",
              "teacher_tuned_prompt_nonprivate"}


def write_config(root, tmp, **federated):
    """A tiny job's TOML over the files of ``write_tiny_task`` (6 users, 2 rounds, 3 users a round)."""
    fed = {"rounds": 2, "num_clients": 6, "fraction_train": 0.5, "client_cache_dir": str(tmp / "cache"), **federated}
    path = tmp / "job.toml"
    path.write_text(f"""seed = 3
[model]
teacher = "{root / 'teacher'}"
student = "{root / 'student'}"
label_words = {{ positive = ["good"], negative = ["bad"] }}
[data]
train = "{root / 'train.csv'}"
test = "{root / 'test.csv'}"
public = "{root / 'public.jsonl'}"
[prompt]
num_virtual_tokens = 4
[tune]
epochs = 2.0
[transfer]
steps = 4
batch_size = 8
[federated]
""" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fed.items()))
    return path


def federate(config, out, *extra, engine="batched"):
    """Run ``post-fl federate`` (the Flower engine through its glue, on the in-process grid); its exit code."""
    shipping._STUDENTS.clear()
    argv = ["federate", "--config", str(config), "-o", str(out), "--engine", engine, *extra]
    if engine == "batched":
        return main(argv)
    from simulation.federate import main as flower_main

    return flower_main([*argv, "--flower-backend", "inprocess"])


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def student_prompt(run):
    return load_any_prompt(run / "prompt_student")[0].weight.detach().numpy()


def test_both_engines_give_the_same_job_in_reproducible_mode(fed_root, tmp_path, capsys):
    """Batched engine and Flower's ServerApp/ClientApp: the same global prompt, rounds and epsilon (labelled
    NOT PRIVATE), and the outputs of the job: table, results.json, rounds.csv, PNG."""
    config = write_config(fed_root, tmp_path)
    runs = {e: tmp_path / e for e in ("batched", "flower")}
    for engine, run in runs.items():
        assert federate(config, run, "--insecure-reproducible", engine=engine) == 0
    out = capsys.readouterr().out
    got = {e: json.loads((r / "results.json").read_text()) for e, r in runs.items()}
    prompts = {e: student_prompt(r) for e, r in runs.items()}
    assert prompts["batched"].shape == prompts["flower"].shape == (4, 32)
    assert np.abs(prompts["batched"] - prompts["flower"]).max() < 1e-5
    rows = {e: read_csv(r / "rounds.csv") for e, r in runs.items()}
    assert [r["round"] for r in rows["batched"]] == ["0", "1", "2"]
    assert float(rows["batched"][2]["mean_update_norm"]) > 1e-3  # the prompt moved
    for key in ("users_trained", "users_refused", "epsilon_max", "epsilon_median", "validation_accuracy"):
        assert [r[key] for r in rows["batched"]] == [r[key] for r in rows["flower"]], key
    assert rows["batched"][1]["users_trained"] == "3" and rows["batched"][1]["users_refused"] == "0"
    for e, res in got.items():
        assert set(res["accuracy"]) == TABLE_ROWS and set(res["accuracy_intervals"]) == TABLE_ROWS
        assert "in_paired_standard_errors" in res["comparison"]["transferred_minus_teacher_zero_shot_calibrated"]
        assert res["not_private"] and res["privacy"]["not_private"]
        assert res["federated"]["engine"] == e and "outside DP" in res["federated"]["validation_monitoring"]
        assert "monitoring" in res["privacy"]["outside_dp"]
        assert (runs[e] / "federated.png").read_bytes()[:4] == b"\x89PNG"
    eps = {e: res["privacy"]["sample_level"]["epsilon_per_client"] for e, res in got.items()}
    assert eps["batched"] == eps["flower"] and 0 < max(eps["batched"].values()) <= 8 + 1e-6
    per_user = got["batched"]["privacy"]["per_user_epsilon"]
    assert per_user["users"] == 6 and per_user["max"] == got["batched"]["privacy"]["epsilon"] == max(eps["batched"].values())
    assert per_user["min"] == 0.0 or per_user["users_trained"] == 6  # a user never sampled spent nothing
    assert "round 1/2: 3 users trained, 0 refused" in out and "POST results" in out
    assert "epsilon per user" in out and "NOT PRIVATE" in out


def test_both_engines_account_the_same_epsilon_with_fresh_noise(fed_root, tmp_path):
    """With fresh (OS-entropy) noise the prompts differ but each user's epsilon is the same on both engines."""
    config = write_config(fed_root, tmp_path)
    runs = {e: tmp_path / e for e in ("batched", "flower")}
    for engine, run in runs.items():
        assert federate(config, run, engine=engine) == 0
    got = {e: json.loads((r / "results.json").read_text()) for e, r in runs.items()}
    assert not np.allclose(student_prompt(runs["batched"]), student_prompt(runs["flower"]), atol=1e-5)
    assert "not_private" not in got["batched"] and "not_private" not in got["flower"]
    assert got["batched"]["privacy"]["sample_level"]["epsilon_per_client"] == \
        got["flower"]["privacy"]["sample_level"]["epsilon_per_client"]
    assert got["batched"]["privacy"]["per_user_epsilon"] == got["flower"]["privacy"]["per_user_epsilon"]
    assert [r["epsilon_max"] for r in read_csv(runs["batched"] / "rounds.csv")] == \
        [r["epsilon_max"] for r in read_csv(runs["flower"] / "rounds.csv")]


@pytest.mark.parametrize("args, message", [
    (["--users", "0"], "federated.num_clients: expected >= 1, got 0"),
    (["--users", "200"], "federated.num_clients (--users) = 200: the private training set has 87 examples "
                         "(data.max_train_examples = 0) and every user needs federated.min_partition_size = 2; "
                         "expected at most 43 users"),
    (["--users", "80", "--partitioning", "pathological", "--set", "federated.min_partition_size=1"],
     "federated.partitioning = 'pathological' with 80 users: Label: 1 is needed to be assigned to more partitions "
     "(40) than there are samples"),  # 40 users share one class of 37 examples: some would get none
    (["--set", "tune.target_epsilon=1e-9"], "tune.target_epsilon = 1e-09 allows no DP-SGD step"),
], ids=["no-users", "more-users-than-examples", "a-user-left-empty", "no-step-in-budget"])
def test_bad_input_is_refused_before_any_stage(fed_root, tmp_path, capsys, args, message):
    config = write_config(fed_root, tmp_path)
    run = tmp_path / "run"
    assert federate(config, run, *args) == 2
    err = capsys.readouterr().err
    assert message in err and "expected" in err
    assert err.count("\n  - ") <= 1  # one problem, one line
    assert not run.exists()  # refused before any stage: nothing written


def test_a_stopped_job_resumes_after_its_last_completed_round(fed_root, tmp_path, capsys):
    """Stopped after round 1: the rerun continues with round 2 (round 1's row kept), the ledgers hold each
    round once; stopped inside round 2 (its noise drawn, no checkpoint): the rerun redoes it and the ledgers
    charge it again."""
    from post_fl.federate import federate_configs, run_federate
    from post_fl.federated.server import FederatedServer
    from post_fl.privacy.ledger import read_ledgers

    class Stop(Exception):
        pass

    def stop_after(rnd):
        if rnd == 1:
            raise Stop

    config = write_config(fed_root, tmp_path, min_clients=1)
    run = tmp_path / "run"
    run_cfg, fed = federate_configs(config, {"output_dir": str(run)})
    shipping._STUDENTS.clear()
    with pytest.raises(Stop):
        run_federate(run_cfg, fed, progress=False, emit=lambda line: None, after_round=stop_after)
    first = read_csv(run / "rounds.csv")
    assert [r["round"] for r in first] == ["0", "1"] and not (run / "results.json").exists()
    assert federate(config, run) == 0
    assert "resuming after round 1 of 2" in capsys.readouterr().out
    rows = read_csv(run / "rounds.csv")
    assert [r["round"] for r in rows] == ["0", "1", "2"] and rows[1] == first[1]
    sampled = sum(r["sampled"] for r in json.loads((run / "results.json").read_text())["federated"]["round_details"])
    assert sum(v["rounds"] for v in read_ledgers(run / "client-ledgers").values()) == sampled == 6

    # stopped inside round 2, after every sampled user's ledger recorded it and trained
    redo = tmp_path / "redo"
    run_cfg, fed = federate_configs(config, {"output_dir": str(redo)})
    complete_round = FederatedServer.complete_round

    def crash_in_round_2(self, rnd, sampled, replies):
        if rnd == 2:
            raise Stop
        return complete_round(self, rnd, sampled, replies)

    FederatedServer.complete_round = crash_in_round_2
    try:
        with pytest.raises(Stop):
            run_federate(run_cfg, fed, progress=False, emit=lambda line: None)
    finally:
        FederatedServer.complete_round = complete_round
    charged = sum(v["rounds"] for v in read_ledgers(redo / "client-ledgers").values())
    assert charged == 6  # round 1 and the lost round 2
    assert federate(config, redo) == 0
    second = json.loads((redo / "results.json").read_text())["federated"]["round_details"][1]
    trained, refused = second["valid"] + len(second["rejected"]), len(second["refused"])
    assert sum(v["rounds"] for v in read_ledgers(redo / "client-ledgers").values()) == charged + trained
    assert trained >= 1 and trained + refused == second["sampled"] == 3  # refused: over budget after the lost round


@pytest.mark.slow
def test_post_fl_federate_engine_flower_runs_on_flowers_simulation_engine(fed_root, tmp_path):
    """``post-fl federate --engine flower``: post-fl starts the Flower glue (python -m simulation.federate), whose
    rounds run on Flower's Simulation Engine (Ray); the job's outputs are the same as with the batched engine."""
    config = write_config(fed_root, tmp_path, num_clients=4)
    run = tmp_path / "run"
    assert main(["federate", "--config", str(config), "-o", str(run), "--engine", "flower", "-q"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["federated"]["engine"] == "flower" and set(results["accuracy"]) == TABLE_ROWS
    assert [r["round"] for r in read_csv(run / "rounds.csv")] == ["0", "1", "2"]
    eps = results["privacy"]["sample_level"]["epsilon_per_client"]  # the Ray workers' users wrote their ledgers
    assert len(eps) >= 2 and all(0 < e <= 8 + 1e-6 for e in eps.values())
