"""Run post-fl in Flower's simulation runtime (Ray backend) from a TOML/flat run-config.

    python -m simulation.run --config simulation/configs/tiny.toml --num-supernodes 10
    python -m simulation.run -c federated.rounds=5 -c federated.num_clients=100 --num-supernodes 100

``--config`` is a post-fl TOML with a ``[federated]`` table (see simulation/configs/); ``-c``
overrides single keys. ``federated.num_clients`` defaults to ``--num-supernodes``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from post_fl.core.config import ConfigError


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


GPU_FRACTION = 0.25  # of a GPU per virtual client by default: four clients train on one GPU at a time


def client_gpus(gpus_per_client: float | None = None) -> tuple[float, int]:
    """(GPU share of each virtual client, GPUs Ray may hand out): ``gpus_per_client``, or by default
    :data:`GPU_FRACTION` of a GPU on a machine with CUDA GPUs and none without. Each client's ``compute.device =
    "auto"`` then finds the GPU Ray gave it (Ray sets ``CUDA_VISIBLE_DEVICES`` for the client's worker)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    share = (GPU_FRACTION if count else 0.0) if gpus_per_client is None else float(gpus_per_client)
    return share, count


def run_apps(server_app, client_app, num_supernodes: int, num_cpus: int = 2, cpus_per_client: float = 1.0,
             verbose: bool = False, gpus_per_client: float | None = None) -> None:
    """Run ``server_app`` and ``num_supernodes`` virtual ``client_app`` s on Flower's Simulation Engine (Ray), each
    client with ``cpus_per_client`` CPUs and a GPU share (:func:`client_gpus`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    share, gpus = client_gpus(gpus_per_client)
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": share},
               "init_args": {"num_cpus": num_cpus, "num_gpus": gpus, "include_dashboard": False,
                             "logging_level": "error", "log_to_driver": True}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes, backend_name="ray",
                   backend_config=backend, verbose_logging=verbose)


def simulate(run_config: dict[str, Any], num_supernodes: int, num_cpus: int = 2, cpus_per_client: float = 1.0,
             verbose: bool = False, gpus_per_client: float | None = None) -> None:
    """Run the ServerApp and ``num_supernodes`` virtual ClientApps with ``flwr.simulation.run_simulation``."""
    from client_app.app import make_client_app
    from server_app.app import make_server_app

    run_config = {"federated.num_clients": num_supernodes, **run_config}
    run_apps(make_server_app(run_config), make_client_app(run_config), num_supernodes, num_cpus, cpus_per_client,
             verbose, gpus_per_client)
    out = run_config.get("output_dir", "runs/default")
    if not os.path.isfile(os.path.join(out, "results.json")):
        raise RuntimeError(f"simulation did not finish: no {out}/results.json (see the log above)")


def main(argv: list[str] | None = None) -> None:
    """Command line: run one federated POST simulation on Flower's Simulation Engine (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="post-fl TOML with a [federated] table")
    ap.add_argument("-c", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one flat key, e.g. federated.rounds=5 (TOML value syntax)")
    ap.add_argument("--num-supernodes", type=int, required=True)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--gpus-per-client", type=float, default=None,
                    help=f"GPU share of each virtual client (default: {GPU_FRACTION} on a machine with CUDA GPUs, "
                         "else 0)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--insecure-reproducible", action="store_true",
                    help="seed every DP mechanism from the config seed (bit-exact reruns); NOT PRIVATE, and "
                         "every output says so")
    args = ap.parse_args(argv)
    try:
        flat = read_run_config(args.config, args.set)
    except ConfigError as exc:
        ap.error(str(exc))
    if args.insecure_reproducible:
        flat["insecure_reproducible"] = True
    from post_fl.federated.config import build_configs
    from post_fl.core.tasks import PreflightError
    from post_fl.preflight import check_federated

    try:  # every input and the client partitions checked before Ray starts
        check_federated(*build_configs({"federated.num_clients": args.num_supernodes, **flat}), partitions=True)
    except (ConfigError, PreflightError) as exc:
        ap.exit(2, f"simulation.run: error: {exc}\n")
    simulate(flat, args.num_supernodes, args.num_cpus, verbose=args.verbose, gpus_per_client=args.gpus_per_client)


def read_run_config(path: str | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The flat run-config (Flower style, ``section.key``) of a TOML file plus ``KEY=VALUE`` overrides."""
    from post_fl.cli import parse_overrides
    from post_fl.core.config import read_toml

    flat = _flatten(read_toml(path, "config file")) if path else {}
    flat.update(parse_overrides(list(overrides)))
    return flat


if __name__ == "__main__":
    main()
