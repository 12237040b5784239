"""The Flower app's run-config in pyproject.toml stays in step with the typed defaults."""

import tomllib
from pathlib import Path

from post_fl.core.config import RunConfig
from post_fl.federated.config import FederatedConfig, build_configs, flatten_configs

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# keys whose app value differs from the library default on purpose, and why
INTENTIONAL = {
    "output_dir": "federated runs go to their own folder",
    "federated.eval_every": "as post-fl federate: the test split is scored after the last round",
    "model.label_words": "Flower run-configs have no tables: a 'label:word,...' string",
}


def test_every_setting_is_declared_with_its_default():
    app = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = flatten_configs(RunConfig(), FederatedConfig())
    assert set(app) - {"model.label_words"} == set(defaults), set(app) ^ set(defaults)
    drift = {k: (app[k], defaults[k]) for k in defaults if k not in INTENTIONAL and app[k] != defaults[k]}
    assert not drift, f"pyproject [tool.flwr.app.config] differs from config defaults: {drift}"
    run_cfg, fed_cfg = build_configs(app)  # and the declared values validate
    assert fed_cfg.rounds >= 1 and run_cfg.tune.private
