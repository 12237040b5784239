"""post-fl ServerApp (Flower Message API): the round loop of :mod:`post_fl.federated` over a Grid.

``GridTransport`` is the only Flower-specific part: it learns each node's client id with a
``query.hello`` (which also says whether the node already caches the student) and binds it to
that node's Flower node id (a second node claiming the same id is refused, logged, and the
run goes on without it), sends the student once per client process that lacks it
(``query.model``), and runs train rounds, re-sending the weights only to clients that answer
``need-model``. A site that does not take part says only a fixed code
(:data:`post_fl.federated.protocol.REPLY_CODES`); the server records that code and nothing else (a reply
with any other status is a failure). Other failure reasons (Flower's own errors, timeouts) are kept as
one line (:func:`post_fl.federated.one_line_reason`).
"""

from __future__ import annotations

import json
import math
from logging import INFO, WARNING
from typing import Any

import numpy as np

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from post_fl import federated as fl
from post_fl.federated.aggregate import ClientUpdate


class GridTransport:
    """Sends post-fl messages through a Flower Grid and parses the replies strictly."""

    def __init__(self, grid: Grid, server: fl.FederatedServer, fed: fl.FederatedConfig) -> None:
        self.grid, self.server, self.fed = grid, server, fed
        self.timeout = fed.timeout or None
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.model_sends = 0

    def _send(self, messages: list[Message]) -> list[Message]:
        return list(self.grid.send_and_receive(messages, timeout=self.timeout)) if messages else []

    def client_ids(self) -> list[int]:
        nodes = sorted(self.grid.get_node_ids())
        cfg = RecordDict({fl.TRAIN_CONFIG_RECORD: ConfigRecord({"model-hash": self.server.model_hash})})
        replies = self._send([Message(cfg, n, "query.hello", group_id="hello") for n in nodes])
        missing: dict[str, int] = {}
        self.duplicates: dict[int, str] = {}  # node id -> why it was refused
        for r in sorted(replies, key=lambda m: m.metadata.src_node_id):
            node = r.metadata.src_node_id
            if r.has_error():
                log(WARNING, "node %s did not answer hello: %s", node, fl.one_line_reason(r.error.reason))
                continue
            h = r.content.config_records.get(fl.HELLO_RECORD)
            if h is None:  # the site declined: a fixed code (its reason stays in the site's own log)
                log(WARNING, "node %s did not answer hello: %s", node, _status_code(r.content))
                continue
            cid = int(h["client-id"])
            if cid in self.node_of:  # first (lowest) node id keeps the client id; the other is left out
                why = f"claims client id {cid}, already bound to node {self.node_of[cid]}"
                self.duplicates[node] = why
                log(WARNING, "node %s refused: %s", node, why)
                continue
            self.node_of[cid] = node
            if not h["has-model"]:
                missing.setdefault(str(h["cache-key"]), r.metadata.src_node_id)
        self.send_model(list(missing.values()))
        log(INFO, "%s clients answered; student sent to %s client process(es)", len(self.node_of), len(missing))
        return sorted(self.node_of)

    def _model_content(self) -> RecordDict:
        pkg = self.server.package
        files: dict[str, Any] = {f"file:{k}": v for k, v in pkg.files.items()}
        files.update({"model-hash": pkg.model_hash, "spec": json.dumps(pkg.spec)})
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in pkg.weights.items()})
        return RecordDict({fl.STUDENT_WEIGHTS_RECORD: arrays, fl.STUDENT_FILES_RECORD: ConfigRecord(files)})

    def send_model(self, nodes: list[int]) -> None:
        """Send the student weights to ``nodes`` (one per client process that lacks them)."""
        if not nodes:
            return
        content = self._model_content()
        for r in self._send([Message(content, n, "query.model", group_id="model") for n in nodes]):
            if r.has_error():
                raise RuntimeError(f"node {r.metadata.src_node_id} could not install the student: "
                                   f"{fl.one_line_reason(r.error.reason)}")
            status = r.content.config_records.get(fl.REPLY_STATUS_RECORD)
            if status is None or status.get("status") != "ok":
                raise RuntimeError(f"node {r.metadata.src_node_id} could not install the student: "
                                   f"{_status_code(r.content)}")
        self.model_sends += len(nodes)

    def _train_messages(self, rnd: int, prompt: np.ndarray, instructions: dict[int, dict]) -> list[Message]:
        msgs = []
        for cid, ins in instructions.items():
            content = RecordDict({fl.TRAIN_PROMPT_RECORD: ArrayRecord({"prompt": Array(np.ascontiguousarray(prompt))}),
                                  fl.TRAIN_CONFIG_RECORD: ConfigRecord(dict(ins))})
            msgs.append(Message(content, self.node_of[cid], "train", group_id=str(rnd)))
        return msgs

    def train_round(self, server_round: int, prompt: np.ndarray, instructions: dict[int, dict]) -> fl.RoundReplies:
        if self.fed.secagg:
            return self.secure_train_round(server_round, prompt, instructions)
        client_of = {n: c for c, n in self.node_of.items()}
        out = fl.RoundReplies()
        pending = dict(instructions)
        for attempt in range(2):
            need: dict[str, int] = {}
            retry: dict[int, dict] = {}
            for r in self._send(self._train_messages(server_round, prompt, pending)):
                cid = client_of.get(r.metadata.src_node_id)
                if cid is None or cid not in pending:  # not the node this client id is bound to
                    log(WARNING, "round %s: ignored a train reply from unbound node %s", server_round,
                        r.metadata.src_node_id)
                    continue
                if r.has_error():
                    reason = fl.one_line_reason(r.error.reason)
                    out.failures[cid] = f"error {r.error.code}: {reason}"
                    continue
                status = r.content.config_records.get(fl.REPLY_STATUS_RECORD)
                if status is not None and status.get("status") == fl.NEED_MODEL:
                    need.setdefault(str(status.get("cache-key")), r.metadata.src_node_id)
                    retry[cid] = pending[cid]
                    continue
                if status is not None:  # refused or failed: a fixed code, recorded as that code only
                    code = _status_code(r.content)
                    if code in fl.REFUSAL_CODES:
                        out.refusals[cid] = {"status": code}
                    else:
                        out.failures[cid] = code
                    continue
                try:
                    upd = parse_train_reply(cid, r.content)
                except ValueError as exc:
                    out.failures[cid] = str(exc)
                    continue
                out.updates.append(upd)
                out.metrics[cid] = upd.metrics
            if not retry:
                break
            if attempt == 0:
                self.send_model(list(need.values()))
                pending = retry
            else:
                for cid in retry:
                    out.failures[cid] = "still lacks the student after it was sent"
        return out

    def secure_train_round(self, server_round: int, prompt: np.ndarray,
                           instructions: dict[int, dict]) -> fl.RoundReplies:
        """One round through Flower's SecAgg+ (``SecAggPlusWorkflow``): the server learns only the mean.

        Flower 1.41's SecAgg+ workflow is written against the legacy strategy API, so it runs here
        inside a ``LegacyContext`` whose strategy only hands out this round's instructions and
        captures the unmasked aggregate. Clients weigh their (clipped) updates equally, so the
        result is the uniform mean over the clients that completed the protocol. Under distributed
        user-level DP each client's vector carries its Gaussian noise share, so the quantisation range
        is widened to C (1 + 10 sigma / sqrt(m)) per coordinate: a share is clipped by the quantiser
        with probability < 1e-23 per coordinate, so the noise reaches the sum intact.
        """
        from flwr.common import FitIns, ndarrays_to_parameters
        from flwr.common import parameters_to_ndarrays
        from flwr.server.client_manager import SimpleClientManager
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.strategy import Strategy as LegacyStrategy
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey
        import flwr.compat.common.recorddict_compat as compat

        client_of = {n: c for c, n in self.node_of.items()}
        grid = _ErrorRecordingGrid(self.grid)  # which node failed, and why (the workflow keeps only the error)
        proxies = {c: GridClientProxy(self.node_of[c], grid, self.grid.run.run_id) for c in instructions}
        params = ndarrays_to_parameters([np.ascontiguousarray(prompt)])
        captured: dict[str, Any] = {}

        class _Capture(LegacyStrategy):
            def initialize_parameters(self, client_manager):
                return None

            def configure_fit(self, server_round, parameters, client_manager):
                return [(proxies[c], FitIns(parameters, dict(instructions[c]))) for c in sorted(instructions)]

            def aggregate_fit(self, server_round, results, failures):
                captured["mean"] = parameters_to_ndarrays(results[0][1].parameters)[0] if results else None
                captured["metrics"] = {client_of[p.node_id]: dict(r.metrics) for p, r in results}
                captured["failures"] = failures
                return None, {}

            def configure_evaluate(self, *a):
                return []

            def aggregate_evaluate(self, *a):
                return None, {}

            def evaluate(self, *a):
                return None

        from flwr.app import Context

        base = Context(run_id=self.grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        ctx = LegacyContext(base, strategy=_Capture(), client_manager=SimpleClientManager())
        ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, True)
        clip_range = float(self.server.client_clip)
        if self.fed.user_noise_mode == "distributed":
            clip_range = float(clip_range * (1.0 + 10.0 * self.server.user_dp_sigma / math.sqrt(self.fed.min_clients)))
        SecAggPlusWorkflow(num_shares=self.fed.secagg_num_shares,
                           reconstruction_threshold=self.fed.secagg_reconstruction_threshold,
                           clipping_range=clip_range, max_weight=1.0,
                           quantization_range=self.fed.secagg_quantization_range,
                           timeout=self.timeout)(grid, ctx)
        out = fl.RoundReplies()
        for node, reason in grid.errors.items():  # a client that refused or failed drops out of SecAgg+
            cid = client_of.get(node)
            if cid is None or cid not in instructions:
                continue
            line = fl.one_line_reason(reason)
            if line in fl.REFUSAL_CODES:  # a site's refusal: the error reason is the fixed code alone
                out.refusals[cid] = {"status": line}
            else:
                out.failures[cid] = line
        if captured.get("mean") is None:
            for c in instructions:
                if c not in out.refusals:
                    out.failures.setdefault(c, "secure aggregation halted (too few clients completed SecAgg+)")
            return out
        out.metrics = captured["metrics"]
        out.secure_mean = np.asarray(captured["mean"], np.float32)
        out.secure_count = len(out.metrics)
        return out


class _ErrorRecordingGrid:
    """A Grid wrapper for the SecAgg+ workflow that remembers each node's last error reply reason."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.has_error():
                self.errors[r.metadata.src_node_id] = str(r.error.reason)
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


def _status_code(content: RecordDict) -> str:
    """The fixed code of a status reply, or ``site error`` for anything that is not one (never echoed)."""
    status = content.config_records.get(fl.REPLY_STATUS_RECORD)
    code = status.get("status") if status is not None else None
    return code if code in fl.REPLY_CODES else fl.SITE_ERROR


def parse_train_reply(cid: int, content: RecordDict) -> ClientUpdate:
    """The update and metrics of a train reply; ValueError naming what is missing."""
    arrays = content.array_records.get(fl.REPLY_UPDATE_RECORD)
    metrics = content.metric_records.get(fl.REPLY_METRICS_RECORD)
    if arrays is None or "delta" not in arrays or metrics is None:
        raise ValueError(f"reply lacks {fl.REPLY_UPDATE_RECORD}.delta or {fl.REPLY_METRICS_RECORD}")
    m = dict(metrics)
    n = m.get("num-examples")  # only non-DP clients report it
    return ClientUpdate(cid, arrays["delta"].numpy(), int(n) if n is not None else None, m)


def _one_log_view() -> None:
    """Round progress goes through Flower's logger only: no second copy via the root logger, no bars."""
    import logging

    flwr_logger = logging.getLogger("flwr")
    if flwr_logger.handlers:
        flwr_logger.propagate = False
    logging.getLogger("post_fl").setLevel(logging.WARNING)  # post_fl's own info lines duplicate the report


def make_server_app(run_config: dict[str, Any] | None = None, after_round=None, finish: bool = True) -> ServerApp:
    """A ServerApp; ``run_config`` (flat) overrides ``context.run_config`` (``run_simulation`` passes none).
    ``after_round(r)`` runs once round r is checkpointed; ``finish = False`` stops after the rounds (``post-fl
    federate --engine flower`` transfers and evaluates in its own process: :mod:`simulation.federate`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """Run the federated POST rounds over ``grid``, then transfer the global prompt and write results."""
        run_cfg, fed = fl.build_configs(run_config if run_config is not None else dict(context.run_config))
        _one_log_view()
        from post_fl.preflight import check_federated

        check_federated(run_cfg, fed)  # every server-side input checked before any work; all problems at once
        server = fl.FederatedServer(run_cfg, fed, report=lambda m: log(INFO, "[post-fl] %s", m))
        fl.run_federated(server, GridTransport(grid, server, fed), after_round, finish)

    return app


app = make_server_app()
