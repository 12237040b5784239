"""``post-fl federate --engine flower``: the federated job with its rounds on Flower's Simulation Engine.

    python -m simulation.federate federate --engine flower [post-fl federate options]

``post-fl federate --engine flower`` starts this module (``post_fl`` never imports the Flower glue): it runs
``post_fl.cli.main`` with :func:`flower_rounds` as the Flower engine. The job (checks, distillation, the
round lines, transfer, evaluation, results) is :func:`post_fl.federate.run_federate`, the same as with the
default engine; only the rounds run here, through the real ServerApp (the one round loop,
``post_fl.federated.run_federated``, over Flower's Grid, SecAgg+ when ``federated.secagg``) and ClientApps.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


def flower_rounds(run_cfg, fed_cfg, after_round: Callable[[int], None], backend: str = "ray") -> None:
    """Run ``fed_cfg.rounds`` rounds with the ServerApp and ``fed_cfg.num_clients`` virtual ClientApps, stopping
    after the last round's checkpoint (the job transfers and evaluates). ``backend``: ``ray`` (Flower's Simulation
    Engine) or ``inprocess`` (the same apps and messages over :class:`simulation.inprocess.InProcessGrid`)."""
    from client_app.app import make_client_app
    from post_fl.federated.config import flatten_configs
    from server_app.app import make_server_app

    flat = flatten_configs(run_cfg, fed_cfg)
    flat["output_dir"] = os.path.abspath(run_cfg.output_dir)  # Ray workers need not share this directory
    server_app, client_app = make_server_app(flat, after_round, finish=False), make_client_app(flat)
    if backend == "inprocess":
        from simulation.inprocess import run_inprocess

        run_inprocess(server_app, client_app, fed_cfg.num_clients, flat)
    elif backend == "ray":
        from simulation.run import run_apps

        run_apps(server_app, client_app, fed_cfg.num_clients, num_cpus=os.cpu_count() or 2)
    else:
        raise ValueError(f"--flower-backend: expected ray or inprocess, got {backend!r}")


def main(argv: list[str] | None = None) -> int:
    """``post-fl`` with the Flower engine available (``argv`` as ``post-fl`` takes it, e.g. ``federate ...``)."""
    from post_fl.cli import main as post_fl_main

    return post_fl_main(argv, engines={"flower": flower_rounds})


if __name__ == "__main__":
    sys.exit(main())
