"""In-process clients without Flower (:class:`LocalTransport`), for tests and debugging.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .aggregate import ClientUpdate
from .core.config import RunConfig
from .fed_config import FederatedConfig
from .student_cache import cache_root, cached_student, install_student
from .fed_client import client_partition, ClientRefusal, open_ledger, train_client, budget_status
from .fed_server import RoundReplies, FederatedServer


class LocalTransport:
    """Clients simulated in this process without Flower: same student-by-hash protocol and client state.

    For tests and debugging; ``tamper`` may rewrite a client's :class:`ClientUpdate` (to test rejection).
    """

    def __init__(self, server: FederatedServer, run_cfg: RunConfig, fed_cfg: FederatedConfig,
                 tamper: Callable[[ClientUpdate], ClientUpdate] | None = None) -> None:
        self.server, self.cfg, self.fed, self.tamper = server, run_cfg, fed_cfg, tamper
        self.states: dict[int, dict] = {}
        self.model_sends = 0

    def client_ids(self) -> list[int]:
        return list(range(self.fed.num_clients))

    def train_round(self, server_round: int, prompt: np.ndarray, instructions: dict[int, dict]) -> RoundReplies:
        from .privacy.ledger import BudgetExhausted

        out = RoundReplies()
        root = cache_root(self.fed)
        for cid, ins in instructions.items():
            student = cached_student(ins["model-hash"], root)
            if student is None:  # the client would reply need-model; the server sends the package
                self.model_sends += 1
                student = install_student(self.server.package, root)
            try:  # as in Flower, a client that raises gives an error reply, not a dead run
                data = client_partition(self.cfg, self.fed, cid)
                ledger = open_ledger(self.cfg, data, cid) if self.cfg.tune.private else None
                res = train_client(student, prompt, data, self.cfg, self.fed, server_round, cid, ins["clip"],
                                   ledger, run_id="local")
            except BudgetExhausted as exc:
                out.refusals[cid] = budget_status(exc)
                continue
            except ClientRefusal as exc:  # its fixed code only, as a site's reply would say
                out.refusals[cid] = {"status": exc.code}
                continue
            except ValueError as exc:  # bad or empty private data (DataError is a ValueError)
                out.failures[cid] = f"{type(exc).__name__}: {exc}"
                continue
            upd = ClientUpdate(cid, res.delta, res.metrics.get("num-examples"), res.metrics)
            if self.tamper is not None:
                upd = self.tamper(upd)
            out.updates.append(upd)
            out.metrics[cid] = upd.metrics
        return out

