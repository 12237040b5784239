"""Federated DP prompt tuning without Flower: the round logic that ``server_app`` and ``client_app``
(Flower glue) and the in-process transports call.

* ``protocol`` -- the round diagram, the message schema (record and status names shared by the
  Flower apps), who draws which randomness, shared file names;
* ``config`` -- :class:`FederatedConfig`, building and flattening the flat run config, the
  aggregation rule, seed derivation, DP-FedAvg's noise multiplier;
* ``aggregate`` -- update validation, the norm bound and the aggregators (FedAvg, median, ...);
* ``shipping`` -- the frozen student shipped once by content hash, each process's student cache;
* ``client`` -- one client: its partition or site file, privacy ledger, budget and delta, its DP-SGD
  round (:func:`train_client`), refusals and their fixed codes;
* ``server`` -- :class:`FederatedServer` (sample, validate, aggregate, evaluate, checkpoint,
  transfer), the :class:`Transport` protocol and the round loop :func:`run_federated`;
* ``checkpoint`` -- the round checkpoint file (prompt and server state), written atomically;
* ``privacy_report`` -- user-level epsilon against the world and against the server, the privacy
  section of ``results.json`` and its printed lines;
* ``batched`` -- the client-batched engine: many clients' DP-SGD in shared passes;
* ``transports`` -- in-process clients: :class:`LocalTransport`, :class:`BatchedTransport`.

Uses :mod:`post_fl.method`, :mod:`post_fl.privacy` and :mod:`post_fl.core`. Names are imported on
first use. Code that patches a name (tests' ``monkeypatch``) patches it in the module that uses it.
"""

from ..core.exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "protocol": ("BUDGET_EXHAUSTED", "CHECKPOINT_FILE", "DP_REPLY_METRIC_KEYS", "FAILURE_CODES", "HELLO_RECORD",
                 "LEDGER_DIR_NAME", "NEED_MODEL", "NON_DP_REPLY_METRIC_KEYS", "REFUSAL_CODES", "REFUSED",
                 "REFUSED_DATA_SETTINGS", "REFUSED_INSECURE", "REPLY_CODES", "REPLY_METRICS_RECORD",
                 "REPLY_STATUS_RECORD", "REPLY_UPDATE_RECORD", "SITE_ERROR", "SITE_INPUT_INVALID",
                 "STUDENT_FILES_RECORD", "STUDENT_SPEC_FILE", "STUDENT_WEIGHTS_FILE", "STUDENT_WEIGHTS_RECORD",
                 "TRAIN_CONFIG_RECORD", "TRAIN_PROMPT_RECORD"),
    "config": ("FederatedConfig", "build_configs", "derive_seed", "flatten_configs", "parse_label_words",
               "resolve_aggregation", "user_noise_multiplier"),
    "aggregate": ("ClientUpdate", "RoundFailedError", "aggregate_updates", "update_norm"),
    "shipping": ("StudentPackage", "cache_key", "cache_root", "cached_student", "install_student", "pack_student",
                 "read_student_weights", "state_hash"),
    "client": ("ClientRefusal", "ClientResult", "SiteInputInvalid", "SiteSettings", "budget_status",
               "check_run_matches_site", "check_site_allows", "client_partition", "insecure_seed_for",
               "ledger_dir_for", "one_line_reason", "open_ledger", "reply_code", "site_budget", "site_dataset",
               "site_delta", "site_settings", "train_client"),
    "server": ("FederatedServer", "RoundReplies", "Transport", "run_federated"),
    "privacy_report": ("privacy_lines",),
    "batched": ("BatchedRound", "train_clients_batched"),
    "transports": ("LocalTransport", "BatchedTransport"),
})
