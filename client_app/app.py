"""post-fl ClientApp (Flower Message API): unpack, call ``post_fl.federated``, pack.

Private data: node config ``data-path`` (a deployed site's own CSV/TSV/JSONL file), read with the
site's own node config ``text-column`` / ``label-column`` (default ``text`` / ``label``) and label set
``labels``; else the ``partition-id`` of ``num-partitions`` of ``data.train`` (simulation). A run
config that names other columns or another label set is refused (``refused: data settings``): the
server cannot make a site read anything else.

Handlers: ``query.hello`` (client id, whether the student with the given hash is cached, the
process's random cache id), ``query.model`` (receive and cache the student), ``train`` (DP prompt
tuning; replies with the prompt update and, under DP, nothing data-dependent besides it). The
student is cached per process by content hash.

Nothing private in any reply: :class:`SiteClientApp` lets no exception escape to Flower (whose own
error reply would carry the exception's message, e.g. a data check quoting the site's rows). Whatever
goes wrong, the reply carries one fixed code of :data:`post_fl.federated.protocol.REPLY_CODES` (a status
reply; for SecAgg+ stages the reason of an error reply) and the full message goes to the site's own
log.

The site's privacy record is its own: a :class:`post_fl.privacy.ledger.PrivacyLedger` keyed by node config
``dataset-name`` (simulation: the sha256 of the partition), in node config ``privacy-ledger`` (a
deployed site's default: under ``$XDG_DATA_HOME/post_fl``; simulation: ``<output_dir>/client-ledgers``),
enforcing node config ``privacy-budget-epsilon`` (required on a deployed site; the run's
``tune.target_epsilon`` in simulation) at the site's delta (node config ``privacy-delta``, default
min(1e-5, 1/(10 N))). A round that would exceed it is refused (``refused: budget``). A deployed site
refuses ``insecure_reproducible`` runs unless node config ``allow-insecure-reproducible=true``.
"""

from __future__ import annotations

from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from post_fl import federated as fl
from post_fl.core.compute import resolve_compute


def client_id(context: Context) -> int:
    """This client's partition id (simulation: ``partition-id``; deployment: node config the same)."""
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise fl.SiteInputInvalid("node config has no integer 'partition-id'; start the SuperNode with "
                                  "--node-config 'partition-id=<i> num-partitions=<n>'") from None


def _configs(context: Context, run_config: dict | None):
    return fl.build_configs(run_config if run_config is not None else dict(context.run_config))


def _status(msg: Message, fields: dict) -> Message:
    return Message(RecordDict({fl.REPLY_STATUS_RECORD: ConfigRecord(dict(fields))}), reply_to=msg)


def _is_secagg(msg: Message) -> bool:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return msg.metadata.message_type == "train" and msg.has_content() and \
        RECORD_KEY_CONFIGS in msg.content.config_records


class SiteClientApp(ClientApp):
    """A ClientApp from which no exception escapes: the reply to a failed message is a fixed code.

    ``train`` / ``query.*`` messages get a status reply ``{"status": code}``; SecAgg+ stages (whose
    workflow expects either its own records or an error) and unknown message types get an error reply
    whose reason is the code alone. The exception itself (file, rows, values, spent epsilon) is logged
    on the site with Flower's logger and never sent.
    """

    def __call__(self, message: Message, context: Context) -> Message:
        try:
            plain = message.metadata.message_type in ("train", "query.hello", "query.model") and \
                not _is_secagg(message)
        except Exception:  # noqa: BLE001 - a malformed message: answer with an error code below
            plain = False
        try:
            return super().__call__(message, context)
        except Exception as exc:  # noqa: BLE001 - nothing may reach Flower's error reply (it quotes str(exc))
            code = fl.reply_code(exc)
            _log_on_site(message, context, code, exc)
            if plain:
                return _status(message, {"status": code})
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=code), reply_to=message)


def _log_on_site(message: Message, context: Context, code: str, exc: BaseException) -> None:
    """The whole reason, in the site's own log only (the server is told ``code``)."""
    try:
        what = message.metadata.message_type
    except Exception:  # noqa: BLE001
        what = "message"
    log(ERROR if code == fl.SITE_ERROR else WARNING,
        "[post-fl site %s] %s: replied %r to the server; the reason stays on this site: %s: %s",
        context.node_config.get("partition-id", "?"), what, code, type(exc).__name__, exc,
        exc_info=exc if code == fl.SITE_ERROR else None)


def make_client_app(run_config: dict[str, Any] | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp; ``run_config`` (flat) overrides ``context.run_config`` (``run_simulation`` passes none)."""
    app = SiteClientApp(mods=[secaggplus_when_asked, *(mods or [])])

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        """Tell the server whether this node already caches the student with the announced content hash.

        A deployed site first checks its own settings, that the run asks for the columns and labels it
        reads, and its file (once per process)."""
        run_cfg, fed = _configs(context, run_config)
        cid = client_id(context)
        node_config = dict(context.node_config)
        site = fl.site_settings(node_config)
        if site is not None:
            from post_fl.preflight import check_site_file

            fl.site_budget(run_cfg, node_config)  # a site without a valid budget takes no part
            fl.check_run_matches_site(run_cfg, site)
            check_site_file(site.data_path, site.labels, site.text_column, site.label_column)
        model_hash = str(msg.content.config_records[fl.TRAIN_CONFIG_RECORD]["model-hash"])
        has = fl.cached_student(model_hash, fl.cache_root(fed), resolve_compute(run_cfg.compute)) is not None
        reply = ConfigRecord({"client-id": cid, "has-model": bool(has), "cache-key": fl.cache_key()})
        return Message(RecordDict({fl.HELLO_RECORD: reply}), reply_to=msg)

    @app.query("model")
    def receive_model(msg: Message, context: Context) -> Message:
        """Install the student sent by the server into the node's cache (verified against its content hash)."""
        run_cfg, fed = _configs(context, run_config)
        cfg = msg.content.config_records[fl.STUDENT_FILES_RECORD]
        weights = {k: v.numpy() for k, v in msg.content.array_records[fl.STUDENT_WEIGHTS_RECORD].items()}
        files = {k[len("file:"):]: v for k, v in cfg.items() if k.startswith("file:")}
        import json

        package = fl.StudentPackage(str(cfg["model-hash"]), weights, files, json.loads(str(cfg["spec"])))
        fl.install_student(package, fl.cache_root(fed), resolve_compute(run_cfg.compute))
        return Message(RecordDict({fl.REPLY_STATUS_RECORD: ConfigRecord(
            {"status": "ok", "model-hash": package.model_hash})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Tune the global soft prompt on this node's private data with DP-SGD (fresh noise, budget checked
        against the site's ledger); reply with the prompt update only (plus the round number under DP).
        Refusals and failures raise: :class:`SiteClientApp` turns them into a fixed code."""
        run_cfg, fed = _configs(context, run_config)
        node_config = dict(context.node_config)
        legacy = "fitins.config" in msg.content.config_records  # SecAgg+ speaks FitIns/FitRes
        ins = msg.content.config_records["fitins.config" if legacy else fl.TRAIN_CONFIG_RECORD]
        student = fl.cached_student(str(ins["model-hash"]), fl.cache_root(fed), resolve_compute(run_cfg.compute))
        if student is None:
            return _status(msg, {"status": fl.NEED_MODEL, "cache-key": fl.cache_key()})
        if legacy:
            prompt = next(iter(msg.content.array_records["fitins.parameters"].values())).numpy()
        else:
            prompt = msg.content.array_records[fl.TRAIN_PROMPT_RECORD]["prompt"].numpy()
        cid = client_id(context)
        fl.check_site_allows(run_cfg, node_config)
        site = fl.site_settings(node_config)
        if site is not None:  # a deployed site: its own file, read with its own settings; it never leaves the site
            fl.check_run_matches_site(run_cfg, site, student.label_names)
            data = fl.site_dataset(site, run_cfg, student.label_names)
        else:  # simulation: this node's partition of the shared training set
            num_partitions = node_config.get("num-partitions")
            parts = int(num_partitions) if num_partitions is not None else None
            data = fl.client_partition(run_cfg, fed, cid, parts)
        ledger = fl.open_ledger(run_cfg, data, cid, node_config) if (run_cfg.tune.private or site) else None
        res = fl.train_client(student, prompt, data, run_cfg, fed, int(ins["round"]), cid, float(ins["clip"]),
                              ledger, run_id=str(context.run_id), delta=fl.site_delta(run_cfg, node_config, len(data)))
        if run_cfg.tune.private:  # the site's own view of its spending (this line stays on the site)
            log(INFO, "[post-fl client %s] round %s: epsilon %.4g of budget %g spent at delta %.3g (ledger %s)%s",
                cid, ins["round"], res.private["epsilon"], ledger.budget, res.private["delta"], ledger.path,
                " [NOT PRIVATE: insecure_reproducible]" if run_cfg.insecure_reproducible else "")
        if legacy:  # equal weights (num_examples = 1): the protocol reveals the uniform sum only
            import flwr.compat.common.recorddict_compat as compat
            from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

            fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([res.delta]), 1, dict(res.metrics))
            return Message(compat.fitres_to_recorddict(fitres, False), reply_to=msg)
        content = RecordDict({
            fl.REPLY_UPDATE_RECORD: ArrayRecord({"delta": _array(res.delta)}),
            fl.REPLY_METRICS_RECORD: MetricRecord(res.metrics),
        })
        return Message(content, reply_to=msg)

    return app


def secaggplus_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for train messages that carry a SecAgg+ stage; others pass through."""
    from flwr.client.mod import secaggplus_mod

    if _is_secagg(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _array(a: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(a, dtype=np.float32))


app = make_client_app()
