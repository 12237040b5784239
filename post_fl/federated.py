"""Federated DP prompt tuning, without Flower: the round logic the ServerApp and ClientApp call.

A facade: ``from post_fl import federated as fl; fl.X`` re-exports the public names of

* :mod:`post_fl.fed_protocol` -- the round diagram, the message schema (record and status names
  shared by ``server_app`` and ``client_app``), who draws which randomness, shared file names;
* :mod:`post_fl.fed_config` -- :class:`FederatedConfig`, building/flattening the run config,
  the aggregation rule, seed derivation, DP-FedAvg's noise multiplier;
* :mod:`post_fl.student_cache` -- shipping the frozen student by sha256 hash and each client
  process's student cache;
* :mod:`post_fl.fed_client` -- one client: partition or site file (read with the site's own settings),
  privacy ledger, budget and delta, DP-SGD round (:func:`train_client`), refusals and their fixed codes;
* :mod:`post_fl.fed_server` -- :class:`FederatedServer` (sample, validate, aggregate, evaluate,
  checkpoint, transfer), the :class:`Transport` protocol and the round loop :func:`run_federated`;
* :mod:`post_fl.local_transport` -- in-process clients without Flower (tests, debugging).

Code that patches a name (tests' ``monkeypatch``) must patch it in the module that uses it.
"""

from __future__ import annotations

from .fed_client import (ClientRefusal, ClientResult, SiteInputInvalid, SiteSettings, _load_task, _PARTITIONS,
                         _SITE_DATA, budget_status, check_run_matches_site, check_site_allows, client_partition,
                         insecure_seed_for, ledger_dir_for, one_line_reason, open_ledger, reply_code, site_budget,
                         site_dataset, site_delta, site_settings, train_client)
from .fed_config import (FederatedConfig, _USER_SIGMAS, build_configs, derive_seed, flatten_configs, parse_label_words,
                         resolve_aggregation, user_noise_multiplier)
from .fed_protocol import (BUDGET_EXHAUSTED, CHECKPOINT_FILE, DP_REPLY_METRIC_KEYS, FAILURE_CODES, HELLO_RECORD,
                           LEDGER_DIR_NAME, NEED_MODEL, NON_DP_REPLY_METRIC_KEYS, REFUSAL_CODES, REFUSED,
                           REFUSED_DATA_SETTINGS, REFUSED_INSECURE, REPLY_CODES, REPLY_METRICS_RECORD,
                           REPLY_STATUS_RECORD, REPLY_UPDATE_RECORD, SITE_ERROR, SITE_INPUT_INVALID,
                           STUDENT_FILES_RECORD, STUDENT_SPEC_FILE, STUDENT_WEIGHTS_FILE, STUDENT_WEIGHTS_RECORD,
                           TRAIN_CONFIG_RECORD, TRAIN_PROMPT_RECORD)
from .fed_server import FederatedServer, RoundReplies, Transport, _floats, run_federated
from .local_transport import LocalTransport
from .privacy.randomness import NOT_PRIVATE_LABEL
from .student_cache import (_STUDENTS, StudentPackage, _load_cached_dir, cache_key, cache_root, cached_student,
                            install_student, pack_student, read_student_weights, state_hash)

__all__ = [
    "BUDGET_EXHAUSTED", "CHECKPOINT_FILE", "DP_REPLY_METRIC_KEYS", "FAILURE_CODES", "HELLO_RECORD", "LEDGER_DIR_NAME",
    "NEED_MODEL", "NON_DP_REPLY_METRIC_KEYS", "NOT_PRIVATE_LABEL", "REFUSAL_CODES", "REFUSED", "REFUSED_DATA_SETTINGS",
    "REFUSED_INSECURE", "REPLY_CODES", "REPLY_METRICS_RECORD", "REPLY_STATUS_RECORD", "SITE_ERROR", "SITE_INPUT_INVALID",
    "REPLY_UPDATE_RECORD", "STUDENT_FILES_RECORD", "STUDENT_SPEC_FILE", "STUDENT_WEIGHTS_FILE",
    "STUDENT_WEIGHTS_RECORD", "TRAIN_CONFIG_RECORD", "TRAIN_PROMPT_RECORD",
    "FederatedConfig", "build_configs", "derive_seed", "flatten_configs", "parse_label_words", "resolve_aggregation",
    "user_noise_multiplier",
    "StudentPackage", "cache_key", "cache_root", "cached_student", "install_student", "pack_student",
    "read_student_weights", "state_hash",
    "ClientRefusal", "ClientResult", "SiteInputInvalid", "SiteSettings", "budget_status", "check_run_matches_site",
    "check_site_allows", "client_partition", "insecure_seed_for", "ledger_dir_for", "one_line_reason", "open_ledger",
    "reply_code", "site_budget", "site_dataset", "site_delta", "site_settings", "train_client",
    "FederatedServer", "RoundReplies", "Transport", "run_federated", "LocalTransport",
    # process-wide caches and helpers other modules and tests reach through the facade
    "_STUDENTS", "_PARTITIONS", "_SITE_DATA", "_USER_SIGMAS", "_load_task",
    "_load_cached_dir", "_floats",
]
