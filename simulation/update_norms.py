"""How large honest prompt updates are relative to the initial prompt (to choose ``max_update_norm_factor``).

    python -m simulation.update_norms --config simulation/configs/minilm-tweets.toml -c federated.num_clients=10

Runs one federated round in-process (no Flower) with no norm bound and no clipping, and prints each
sampled client's update L2 norm divided by the L2 norm of the initial prompt ``P_0``. The default
``federated.max_update_norm = 0`` clips and bounds updates at ``max_update_norm_factor`` x |P_0|.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile


def measure(flat: dict) -> dict:
    """One round's per-client ratios |update| / |P_0| (clients' updates unclipped, DP-SGD as configured)."""
    from post_fl import federated as F
    from post_fl.federated.aggregate import update_norm

    flat = {**flat, "federated.max_update_norm": math.inf, "federated.user_dp": False, "federated.secagg": False,
            "federated.rounds": 1, "output_dir": flat.get("output_dir") or tempfile.mkdtemp(prefix="norms-")}
    run_cfg, fed = F.build_configs(flat)
    server = F.FederatedServer(run_cfg, fed)
    server.prepare()
    p0 = update_norm(server.prompt)
    transport = F.LocalTransport(server, run_cfg, fed)
    sampled = server.sample(1, transport.client_ids())
    replies = transport.train_round(1, server.prompt, server.instructions(1, sampled))
    ratios = {u.client_id: update_norm(u.delta) / p0 for u in replies.updates}
    return {"initial_prompt_norm": p0, "ratios": ratios, "max_ratio": max(ratios.values(), default=math.nan),
            "failed": replies.failures}


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    from simulation.run import read_run_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="post-fl TOML with a [federated] table")
    ap.add_argument("-c", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    print(json.dumps(measure(read_run_config(args.config, args.set)), indent=1, default=str))


if __name__ == "__main__":
    main()
