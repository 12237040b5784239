"""Check every input of a run before any stage does work, and report every problem at once.

A run needs its config, the train / test / public files (the validation split is carved from
train), the teacher (and a given student) model directory, the label words, and for a single
stage the artifacts of the stages before it. :func:`check_run` reads all of them cheaply (data
files, the model's ``config.json`` and tokenizer, a weightless skeleton of the model for the
verbalizer checks; never the weights) and raises one :class:`PreflightError` listing every
problem with its file, row, field and what was expected. Nothing is written: a refused run
leaves its run folder exactly as it was (not even created).

Entry points: ``post-fl run`` and each stage (via :class:`post_fl.pipeline.Pipeline`),
``post-fl sweep``, the Flower ServerApp (:func:`check_federated`), the ClientApp on a site's
own file (:func:`check_site_file`) and the simulation scripts (``python -m post_fl.preflight``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .core.config import EMBEDDED_DEFAULT, RunConfig, identifying_settings
from .core.tasks import PreflightError

STAGES = ("distill", "tune", "transfer", "tune_teacher", "evaluate")
# stage -> the run-folder artifacts it reads, and the stage that writes them
NEEDS = {"tune": (("student", "distill"),),
         "transfer": (("student", "distill"), ("prompt_student", "tune")),
         "tune_teacher": (),
         "evaluate": (("student", "distill"), ("prompt_student", "tune"))}


# ---------------------------------------------------------------- pieces
def data_problems(cfg: RunConfig) -> tuple[list[str] | None, dict[str, list[str]], list[str]]:
    """Check the train, test and public files; return (label names or None, label words, problems)."""
    from .core.data import label_problems, scan_text_file, training_label_names

    d = cfg.data
    problems: list[str] = []
    names: list[str] | None = None
    test_names: list[str] | None = None
    words = dict(cfg.model.label_words)
    if d.train == EMBEDDED_DEFAULT:
        known = _embedded_labels(getattr(d, "embedded_task", ""))
        if known is not None:  # the built-in task's labels, without reading its files
            names, words = list(known[0]), {**known[1], **words}
        else:
            from .core.tasks import load_task

            try:
                emb = load_task(dataclasses.replace(cfg, data=dataclasses.replace(d, test=EMBEDDED_DEFAULT,
                                                                                  public=EMBEDDED_DEFAULT)))
                names, words = list(emb.train.label_names), {**emb.label_words, **words}
            except (OSError, ValueError) as exc:
                problems.append(f"data.train = 'embedded': {exc}")
    else:
        scanned = scan_text_file(d.train, d.text_column, d.label_column)
        problems += [f"data.train: {p}" for p in scanned.problems]
        if not scanned.problems:
            names, label_issues = training_label_names(scanned, d.label_column, list(words) or None,
                                                       d.min_label_count, d.allow_rare_labels)
            problems += [f"data.train: {p}" for p in label_issues]
            test_names = names  # the test file is still checked against them, so every problem is reported
            names = names if not label_issues else None
    if d.test == EMBEDDED_DEFAULT:
        if d.train != EMBEDDED_DEFAULT:
            problems.append("data.test = 'embedded' only goes with data.train = 'embedded'; "
                            "expected a test file with the same labels as data.train")
    else:
        scanned = scan_text_file(d.test, d.test_text_column or d.text_column, d.label_column)
        problems += [f"data.test: {p}" for p in scanned.problems]
        test_names = names if names is not None else test_names
        if not scanned.problems and test_names is not None:
            problems += [f"data.test: {p}" for p in
                         label_problems(scanned, d.label_column, test_names, "a label of data.train")]
    if d.public != EMBEDDED_DEFAULT:
        scanned = scan_text_file(d.public, d.public_text_column or d.text_column, None)
        problems += [f"data.public: {p}" for p in scanned.problems]
    return names, words, problems


def _embedded_labels(task: str):
    """(label names, label words) of a built-in task, or None when unknown here."""
    from .core import embedded as E

    table = {"movie-reviews": ("MOVIE_LABELS", "MOVIE_LABEL_WORDS"), "tweets": ("EMBEDDED_LABELS", "EMBEDDED_LABEL_WORDS")}
    if task not in table or not all(hasattr(E, n) for n in table[task]):
        return None
    return getattr(E, table[task][0]), getattr(E, table[task][1])


def model_problems(cfg: RunConfig, names: Sequence[str] | None, words: dict) -> list[str]:
    """Check the device and precision asked for (``[compute]``), then the teacher (and a given student): directory,
    config, tokenizer and verbalizer, no weights read."""
    from .core.compute import compute_problems
    from .core.models import check_scoring_setup, resolve_model_path

    m = cfg.model
    problems: list[str] = compute_problems(cfg.compute)
    head = m.head
    try:
        if names is None:  # labels unknown (bad data): check only that the model is there
            resolve_model_path(m.teacher)
        else:
            head = check_scoring_setup(m.teacher, names, words, m.head, m.template, m.max_length)
    except (OSError, ValueError) as exc:
        problems.append(f"model.teacher: {exc}")
        return problems
    if m.student:
        try:
            if names is None:
                resolve_model_path(m.student)
            else:
                check_scoring_setup(m.student, names, words, head, m.template, m.max_length)
        except (OSError, ValueError) as exc:
            problems.append(f"model.student: {exc}")
    return problems


def stage_problems(cfg: RunConfig, run_dir: Path, stages: Sequence[str]) -> list[str]:
    """Artifacts a stage run alone needs from earlier stages that are neither in the run folder nor run now."""
    problems = []
    for stage in stages:
        for artifact, maker in NEEDS.get(stage, ()):
            if artifact == "student" and cfg.model.student:
                continue
            if maker in stages or (run_dir / artifact).exists():
                continue
            what = "no student model; set model.student or run" if artifact == "student" else "missing; run"
            problems.append(f"{run_dir / artifact}: {what} 'post-fl {maker}' first "
                            f"(needed by 'post-fl {stage.replace('_', '-')}')")
    return problems


def flat_config(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"tune": {"lr": 0.1}}`` -> ``{"tune.lr": 0.1}`` (JSON-normalised values, infinities as strings)."""
    from .core.jsonio import jsonable

    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k).endswith("label_words"):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = json.loads(json.dumps(jsonable(v)))
    return out


def config_differences(saved: dict, current: dict, ignore: Sequence[str] = ("output_dir",)) -> list[str]:
    """Every setting whose value differs between two config dicts, as ``"key: saved X, now Y"``."""
    a, b = flat_config(saved), flat_config(current)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            show = lambda v: "(not set)" if v is missing else json.dumps(v)  # noqa: E731
            out.append(f"{key}: saved {show(va)}, now {show(vb)}")
    return out


def config_problems(path: str | Path | None, overrides: dict[str, Any] | None = None) -> list[str]:
    """Every bad setting of a config file plus ``--set`` overrides (not just the first one).

    Each setting is tried on its own over the defaults (unknown key, wrong type, bad value), then,
    if each is fine alone, all together (settings that depend on each other).
    """
    from .core.config import ConfigError, config_from_dict, read_config_file, unflatten

    try:
        data = read_config_file(path) if path is not None else {}
    except ConfigError as exc:
        return [str(exc)]
    flat = flat_config(data)
    flat.update({k: v for k, v in (overrides or {}).items()})
    where = f"{path}: " if path is not None else ""
    problems = []
    for key, value in flat.items():
        try:
            config_from_dict(unflatten({key: value}))
        except ConfigError as exc:
            problems.append(f"{where}{exc}" if key not in (overrides or {}) else f"--set {key}: {exc}")
    if not problems:
        try:
            config_from_dict(unflatten(flat))
        except ConfigError as exc:
            problems.append(f"{where}{exc}")
    return problems


MADE = ("stages", "student", "prompt_student", "prompt_teacher", "prompt_teacher_tuned", "results.json")


def run_folder_problems(cfg: RunConfig, run_dir: Path) -> list[str]:
    """A run folder that already holds artifacts made with a different config (names the differing keys)."""
    from .core.jsonio import read_json

    cfg_path = run_dir / "config.json"
    if not cfg_path.exists() or not any((run_dir / n).exists() for n in MADE):
        return []
    try:
        saved = read_json(cfg_path)
    except (OSError, ValueError) as exc:
        return [f"{cfg_path}: {exc}"]
    if not isinstance(saved, dict):
        return [f"{cfg_path}: expected a JSON object of settings, got {type(saved).__name__}"]
    diff = config_differences(identifying_settings(saved), identifying_settings(cfg.to_dict()))
    if not diff:
        return []
    return [f"{cfg_path} holds a different config ({'; '.join(diff)}); stages of one run share one config: "
            f"continue it with --config {cfg_path}, or use a new --output-dir"]


# ---------------------------------------------------------------- entry points
def check_run(cfg: RunConfig, stages: Sequence[str] = STAGES, run_dir: str | Path | None = None,
              check_folder: bool = True) -> None:
    """Check everything ``stages`` of a single-site run will read; raise :class:`PreflightError` listing
    every problem. With ``check_folder``, also the run folder (artifacts the stages need, a saved config
    that differs). Reads only; never creates or writes anything."""
    run = Path(run_dir or cfg.output_dir)
    names, words, problems = data_problems(cfg)
    problems += model_problems(cfg, names, words)
    if check_folder:
        problems += stage_problems(cfg, run, list(stages))
        problems += run_folder_problems(cfg, run)
    if problems:
        raise PreflightError(problems)


def check_federated(run_cfg: RunConfig, fed_cfg, partitions: bool = False) -> None:
    """Check a federated run's server-side inputs (data, teacher, student); with ``partitions`` (simulation,
    where clients split ``data.train``) also that every client gets enough examples."""
    names, words, problems = data_problems(run_cfg)
    problems += model_problems(run_cfg, names, words)
    if partitions and names is not None and not problems:
        from .core.data import partition
        from .core.tasks import load_task

        try:
            train = load_task(run_cfg).train
            partition(train, fed_cfg.num_clients, fed_cfg.partitioning, fed_cfg.dirichlet_alpha,
                      fed_cfg.classes_per_client, run_cfg.seed, fed_cfg.min_partition_size)
        except ValueError as exc:
            problems.append(f"federated.partitioning: {exc}")
    if problems:
        raise PreflightError(problems, "federated run")


def users_problems(run_cfg: RunConfig, fed_cfg) -> list[str]:
    """``post-fl federate``'s simulated users: enough private examples for every user, a partitioning that
    leaves nobody below ``federated.min_partition_size``, and an epsilon budget that allows each user's DP-SGD
    steps (a noise multiplier Opacus can calibrate) and the user-level target. Each problem names its setting
    and the value expected."""
    from .core.config import ConfigError
    from .core.data import partition
    from .core.tasks import load_task
    from .federated.config import user_noise_multiplier
    from .privacy.accounting import calibrate_noise_multiplier, planned_steps

    train = load_task(run_cfg).train
    n, users, least = len(train), fed_cfg.num_clients, fed_cfg.min_partition_size
    if users * least > n:
        return [f"federated.num_clients (--users) = {users}: the private training set has {n} examples "
                f"(data.max_train_examples = {run_cfg.data.max_train_examples}) and every user needs "
                f"federated.min_partition_size = {least}; expected at most {n // least} users"]
    try:
        parts = partition(train, users, fed_cfg.partitioning, fed_cfg.dirichlet_alpha, fed_cfg.classes_per_client,
                          run_cfg.seed, least)
    except ValueError as exc:
        why = str(exc).rstrip(".")
        return [f"federated.partitioning = {fed_cfg.partitioning!r} with {users} users: {why}; expected a split that "
                f"gives every user at least federated.min_partition_size = {least} example(s)"]
    problems = []
    tune = run_cfg.tune
    for size in sorted({len(p) for p in parts}) if tune.private else ():
        steps = fed_cfg.rounds * planned_steps(tune, size)
        try:
            calibrate_noise_multiplier(tune, size, steps)
        except ConfigError as exc:  # tune.delta >= 1 / size
            problems.append(str(exc))
            break
        except ValueError:  # Opacus: "The privacy budget is too low."
            problems.append(f"tune.target_epsilon = {tune.target_epsilon:g} allows no DP-SGD step: a user with "
                            f"{size} examples takes {steps} steps over {fed_cfg.rounds} rounds, and no noise "
                            "multiplier up to 1e6 keeps them within it; expected a larger epsilon (e.g. 1 or more)")
            break
    if fed_cfg.user_dp:
        try:
            user_noise_multiplier(fed_cfg)
        except ValueError as exc:
            problems.append(f"federated.user_dp_target_epsilon = {fed_cfg.user_dp_target_epsilon:g} allows no "
                            f"round ({exc}); expected a larger user-level epsilon")
    return problems


def check_federate(run_cfg: RunConfig, fed_cfg, engine: str, run_dir: str | Path | None = None) -> None:
    """Check everything ``post-fl federate`` will read before any stage: data, teacher (and a given student),
    the users' partitions and budgets (:func:`users_problems`), the engine, and the run folder (a saved config
    or a round checkpoint written with other settings). Raises :class:`PreflightError` listing every problem."""
    from .federated.checkpoint import read_checkpoint
    from .federated.server import FederatedServer

    run = Path(run_dir or run_cfg.output_dir)
    names, words, problems = data_problems(run_cfg)
    problems += model_problems(run_cfg, names, words)
    if fed_cfg.secagg and engine != "flower":
        problems.append("federated.secagg = true: the client-batched engine aggregates in the clear; expected "
                        "--engine flower (SecAgg+ on Flower's Simulation Engine) or federated.secagg = false")
    if names is not None and not problems:
        problems += users_problems(run_cfg, fed_cfg)
    problems += run_folder_problems(run_cfg, run)
    server = FederatedServer(run_cfg, fed_cfg, run)
    if fed_cfg.resume and server.checkpoint_path.is_file():
        try:
            state, _ = read_checkpoint(server.checkpoint_path)
            if state.get("fingerprint") != server.fingerprint():
                problems.append(f"{server.checkpoint_path} holds rounds of a run with other settings; expected the "
                                "same settings to resume it, another --output-dir, or federated.resume = false")
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{server.checkpoint_path}: unreadable checkpoint ({exc}); expected the file a "
                            "completed round wrote, or another --output-dir")
    if problems:
        raise PreflightError(problems, "federated run")


_SITES_CHECKED: set[tuple] = set()


def check_site_file(path: str | Path, label_names: Sequence[str], text_column: str = "text",
                    label_column: str = "label") -> None:
    """Check a deployed site's own training file (node config ``data-path``) once per process, with the
    site's own settings (node config ``text-column``, ``label-column``, ``labels``; never the run config's):
    readable, both columns present, no empty rows, every label among ``label_names``. Raises
    :class:`PreflightError` listing every problem. The message quotes the file (rows, values): a site
    logs it locally and replies only ``site input invalid``."""
    from .core.data import label_problems, natural_label_order, scan_text_file

    p = Path(path)
    known = list(label_names)
    key = (str(p), p.stat().st_mtime_ns if p.exists() else 0, text_column, label_column, tuple(known))
    if key in _SITES_CHECKED:
        return
    scanned = scan_text_file(p, text_column, label_column)
    problems = list(scanned.problems)
    if not problems and known:
        problems += label_problems(scanned, label_column, natural_label_order(known),
                                   "a label of this site (node config labels)")
    if problems:
        raise PreflightError([f"node config data-path: {q}" for q in problems], "site")
    _SITES_CHECKED.add(key)


def flower_run_config(pyproject: str | Path, overrides: str = "") -> dict[str, Any]:
    """The flat run-config ``flwr run`` would use: ``[tool.flwr.app.config]`` of ``pyproject`` plus a
    ``-c`` string (``key=value`` pairs separated by spaces, TOML values)."""
    from flwr.common.config import parse_config_args

    from .core.config import read_toml

    flat = dict(read_toml(pyproject, "app file")["tool"]["flwr"]["app"]["config"])
    flat.update(parse_config_args([overrides]) if overrides.strip() else {})
    return flat


def main(argv: list[str] | None = None) -> int:
    """``python -m post_fl.preflight --flower-config 'k=v ...'``: check a Flower simulation's inputs and
    partitions before the Flower runtime starts (used by ``simulation/flwr_run.sh``); exit 2 on problems."""
    import argparse

    from .federated.config import build_configs

    ap = argparse.ArgumentParser(prog="python -m post_fl.preflight", description=main.__doc__)
    ap.add_argument("--pyproject", default="pyproject.toml", help="app file with [tool.flwr.app.config]")
    ap.add_argument("--flower-config", "-c", default="", help="the -c string given to flwr run")
    args = ap.parse_args(argv)
    try:
        run_cfg, fed_cfg = build_configs(flower_run_config(args.pyproject, args.flower_config))
        check_federated(run_cfg, fed_cfg, partitions=True)
    except ValueError as exc:
        print(f"preflight: error: {exc}", file=sys.stderr)
        return 2
    print("preflight: every input checked, no problems")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
