import math

import pytest

from post_fl.core.config import ConfigError, RunConfig, config_from_dict, load_config, unflatten
from post_fl.core.config_help import dumps_config


def test_defaults_validate_and_round_trip_through_toml(tmp_path):
    cfg = RunConfig().validate()
    path = tmp_path / "c.toml"
    path.write_text(dumps_config(cfg))
    assert load_config(path) == cfg


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[tune]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"tune\.learning_rate"):
        load_config(path)


def test_wrong_type_and_bad_value_are_named():
    with pytest.raises(ConfigError, match=r"tune\.batch_size: expected an integer"):
        config_from_dict({"tune": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match=r"transfer\.alpha"):
        config_from_dict({"transfer": {"alpha": 1.5}})
    with pytest.raises(ConfigError, match=r"model\.template"):
        config_from_dict({"model": {"template": "no placeholder"}})


def test_overrides_and_infinite_epsilon():
    cfg = load_config(None, {"tune.target_epsilon": "inf", "seed": 3, "model.label_words": {"0": ["bad"]}})
    assert math.isinf(cfg.tune.target_epsilon) and not cfg.tune.private
    assert cfg.seed == 3 and cfg.model.label_words == {"0": ["bad"]}


def test_unflatten_rejects_value_and_section_clash():
    assert unflatten({"a.b": 1, "a.c": 2}) == {"a": {"b": 1, "c": 2}}
    with pytest.raises(ConfigError):
        unflatten({"a": 1, "a.b": 2})


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tune\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_every_shipped_config_file_loads():
    """Run configs (benchmarks/, simulation/configs/) and sweep grids (sweeps/) in the repository parse
    and validate; data files they name need not exist here."""
    from pathlib import Path

    from post_fl import federated as F
    from post_fl.experiments.grid import load_sweep_config
    from simulation.run import read_run_config

    repo = Path(__file__).resolve().parents[1]
    run_configs = sorted((repo / "benchmarks").glob("*.toml"))
    sim_configs = sorted((repo / "simulation" / "configs").glob("*.toml"))
    sweeps = sorted((repo / "sweeps").glob("*.toml"))
    assert run_configs and sim_configs and sweeps
    for path in run_configs:
        load_config(path)
    for path in sim_configs:
        F.build_configs(read_run_config(str(path), ["federated.num_clients=10"]))
    for path in sweeps:
        load_sweep_config(path)


def test_every_setting_has_help_text_and_show_config_prints_it(capsys):
    from post_fl.cli import main
    from post_fl.core.config_help import FIELD_HELP, field_keys

    missing = [k for k in field_keys() if not FIELD_HELP.get(k, "").strip()]
    assert not missing, f"settings without help text in post_fl/core/config_help.py: {missing}"
    assert main(["show-config"]) == 0
    out = capsys.readouterr().out
    assert "derived default" in out.split("delta = 0.0")[0].rsplit("\n", 2)[-2]  # the comment just above
    import tomllib

    assert tomllib.loads(out)["tune"]["delta"] == 0.0  # still valid TOML


def test_a_saved_config_json_is_a_config_file(tmp_path):
    import json

    from post_fl.core.config import load_config

    cfg = load_config(None, {"tune.target_epsilon": "inf", "tune.lr": 0.2, "output_dir": "runs/x"})
    p = tmp_path / "config.json"
    from post_fl.core.jsonio import write_json

    write_json(cfg.to_dict(), p)
    again = load_config(p, {"seed": 4})
    assert again.tune.lr == 0.2 and again.tune.target_epsilon == float("inf") and again.seed == 4
    p.write_text("{broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(p)
    p.write_text(json.dumps({"tune": {"lrr": 1}}))
    with pytest.raises(ConfigError, match="tune.lrr"):
        load_config(p)


def test_legacy_valued_settings_are_left_out_of_fingerprints():
    from post_fl.core.config import LEGACY_VALUES, RESULT_NEUTRAL_SETTINGS, RunConfig, identifying_settings

    d = RunConfig().to_dict()
    d["distill"]["lr_schedule"], d["distill"]["keep_best"] = "constant", False
    d["data"]["public_unit"] = "auto"
    out = identifying_settings(d)
    assert "lr_schedule" not in out["distill"] and "keep_best" not in out["distill"]
    assert out["data"]["public_unit"] == "auto" and out["distill"]["lr"] == d["distill"]["lr"]
    assert d["distill"]["lr_schedule"] == "constant"  # the input is not changed
    d["eval"]["cache_zero_shot"] = False
    assert "cache_zero_shot" not in identifying_settings(d)["eval"]  # result-neutral: never identifies work
    for path in (*LEGACY_VALUES, *RESULT_NEUTRAL_SETTINGS):  # every entry names a real setting
        section, name = path.split(".")
        assert name in d[section], path
