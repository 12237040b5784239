"""The Flower app's run-config in pyproject.toml stays in step with the federated job's typed defaults."""

import tomllib
from pathlib import Path

from post_fl.core.config import RunConfig
from post_fl.federated.config import FEDERATED_RUN_DEFAULTS, FederatedConfig, build_configs, flatten_configs

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# keys whose app value differs from the library default on purpose, and why
INTENTIONAL = {
    "output_dir": "federated runs go to their own folder",
    "federated.eval_every": "as post-fl federate: the test split is scored after the last round",
    "model.label_words": "Flower run-configs have no tables: a 'label:word,...' string",
}


def test_every_setting_is_declared_with_its_default():
    app = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = flatten_configs(*build_configs({}))  # RunConfig's defaults under FEDERATED_RUN_DEFAULTS
    assert set(app) - {"model.label_words"} == set(defaults), set(app) ^ set(defaults)
    assert set(flatten_configs(RunConfig(), FederatedConfig())) == set(defaults)
    drift = {k: (app[k], defaults[k]) for k in defaults if k not in INTENTIONAL and app[k] != defaults[k]}
    assert not drift, f"pyproject [tool.flwr.app.config] differs from config defaults: {drift}"
    run_cfg, fed_cfg = build_configs(app)  # and the declared values validate
    assert fed_cfg.rounds >= 1 and run_cfg.tune.private


def test_federated_defaults_differ_from_the_single_site_ones_only_where_declared():
    single, federated = flatten_configs(RunConfig(), FederatedConfig()), flatten_configs(*build_configs({}))
    differ = {k for k in single if single[k] != federated[k]}
    assert differ == set(FEDERATED_RUN_DEFAULTS)  # each entry does change a default, and nothing else does
    run_cfg, _ = build_configs({"tune.epochs": 2.0})  # a run-config's own value wins over the federated default
    assert run_cfg.tune.epochs == 2.0


def test_the_embedded_config_spells_out_the_federated_defaults():
    """simulation/configs/embedded.toml says every value it sets is the federated job's default."""
    from post_fl.federate import _flat

    toml = _flat(tomllib.loads((PYPROJECT.parent / "simulation" / "configs" / "embedded.toml").read_text()))
    defaults = flatten_configs(*build_configs({}))
    drift = {k: (v, defaults.get(k)) for k, v in toml.items() if k != "output_dir" and defaults.get(k) != v}
    assert not drift, f"simulation/configs/embedded.toml differs from the federated defaults: {drift}"
