"""post-fl ClientApp (Flower Message API): unpack, call ``post_fl.federated``, pack.

Private data: node config ``data-path`` (a deployed site's own CSV/TSV/JSONL file), else the
``partition-id`` of ``num-partitions`` of ``data.train`` (simulation).

Handlers: ``query.hello`` (client id, whether the student with the given hash is cached),
``query.model`` (receive and cache the student), ``train`` (DP prompt tuning; replies with
the prompt update and, under DP, nothing data-dependent besides it). The student is cached per
process by content hash.

The site's privacy record is its own: a :class:`post_fl.ledger.PrivacyLedger` keyed by the
sha256 of its data, in node config ``privacy-ledger`` (a deployed site's default: under
``$XDG_DATA_HOME/post_fl``; simulation: ``<output_dir>/client-ledgers``), enforcing node config
``privacy-budget-epsilon`` (required on a deployed site; the run's ``tune.target_epsilon`` in
simulation). A round that would exceed it is refused with a ``budget-exhausted`` status reply.
A deployed site refuses ``insecure_reproducible`` runs unless node config
``allow-insecure-reproducible=true``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from post_fl import federated as fl


def client_id(context: Context) -> int:
    """This client's partition id (simulation: ``partition-id``; deployment: node config the same)."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise KeyError("node config has no 'partition-id'; start the SuperNode with "
                       "--node-config 'partition-id=<i> num-partitions=<n>'") from None


def _configs(context: Context, run_config: dict | None):
    return fl.build_configs(run_config if run_config is not None else dict(context.run_config))


def _status(msg: Message, fields: dict) -> Message:
    return Message(RecordDict({fl.REPLY_STATUS_RECORD: ConfigRecord(dict(fields))}), reply_to=msg)


def make_client_app(run_config: dict[str, Any] | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp; ``run_config`` (flat) overrides ``context.run_config`` (``run_simulation`` passes none)."""
    app = ClientApp(mods=[secaggplus_when_asked, *(mods or [])])

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        """Tell the server whether this node already caches the student with the announced content hash."""
        run_cfg, fed = _configs(context, run_config)
        if context.node_config.get("data-path"):  # a site's own file: checked once, before any round
            from post_fl.preflight import check_site_file

            check_site_file(str(context.node_config["data-path"]), run_cfg)
        model_hash = str(msg.content.config_records[fl.TRAIN_CONFIG_RECORD]["model-hash"])
        has = fl.cached_student(model_hash, fl.cache_root(fed)) is not None
        reply = ConfigRecord({"client-id": client_id(context), "has-model": has, "cache-key": fl.cache_key()})
        return Message(RecordDict({fl.HELLO_RECORD: reply}), reply_to=msg)

    @app.query("model")
    def receive_model(msg: Message, context: Context) -> Message:
        """Install the student sent by the server into the node's cache (verified against its content hash)."""
        _, fed = _configs(context, run_config)
        cfg = msg.content.config_records[fl.STUDENT_FILES_RECORD]
        weights = {k: v.numpy() for k, v in msg.content.array_records[fl.STUDENT_WEIGHTS_RECORD].items()}
        files = {k[len("file:"):]: v for k, v in cfg.items() if k.startswith("file:")}
        import json

        package = fl.StudentPackage(str(cfg["model-hash"]), weights, files, json.loads(str(cfg["spec"])))
        fl.install_student(package, fl.cache_root(fed))
        return Message(RecordDict({fl.REPLY_STATUS_RECORD: ConfigRecord(
            {"status": "ok", "model-hash": package.model_hash})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Tune the global soft prompt on this node's private data with DP-SGD (fresh noise, budget checked
        against the site's ledger); reply with the prompt update only (plus the round number under DP),
        or with a ``budget-exhausted`` / ``refused`` status."""
        from post_fl.ledger import BudgetExhausted

        run_cfg, fed = _configs(context, run_config)
        node_config = dict(context.node_config)
        legacy = "fitins.config" in msg.content.config_records  # SecAgg+ speaks FitIns/FitRes
        ins = msg.content.config_records["fitins.config" if legacy else fl.TRAIN_CONFIG_RECORD]
        student = fl.cached_student(str(ins["model-hash"]), fl.cache_root(fed))
        if student is None:
            return _status(msg, {"status": fl.NEED_MODEL, "cache-key": fl.cache_key()})
        if legacy:
            prompt = next(iter(msg.content.array_records["fitins.parameters"].values())).numpy()
        else:
            prompt = msg.content.array_records[fl.TRAIN_PROMPT_RECORD]["prompt"].numpy()
        cid = client_id(context)
        try:
            fl.check_site_allows(run_cfg, node_config)
            data_path = node_config.get("data-path")
            if data_path:  # a deployed site: its own file, which never leaves the site
                data = fl.site_dataset(str(data_path), run_cfg, student.label_names)
            else:  # simulation: this node's partition of the shared training set
                num_partitions = node_config.get("num-partitions")
                parts = int(num_partitions) if num_partitions is not None else None
                data = fl.client_partition(run_cfg, fed, cid, parts)
            ledger = fl.open_ledger(run_cfg, data, cid, node_config) if (run_cfg.tune.private or data_path) else None
            res = fl.train_client(student, prompt, data, run_cfg, fed, int(ins["round"]), cid, float(ins["clip"]),
                                  ledger, run_id=str(context.run_id))
        except BudgetExhausted as exc:
            if legacy:  # SecAgg+ has no status reply: the mod turns this into a dropout with this reason
                raise
            return _status(msg, fl.budget_status(exc))
        except fl.ClientRefusal as exc:
            if legacy:
                raise
            return _status(msg, {"status": fl.REFUSED, "reason": str(exc)})
        if run_cfg.tune.private:  # the site's own view of its spending (this line stays on the site)
            from flwr.common.logger import log
            from logging import INFO

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
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type == "train" and msg.has_content() and \
            RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _array(a: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(a, dtype=np.float32))


app = make_client_app()
