#!/usr/bin/env bash
# Run post-fl with the Flower CLI (`flwr run`) on a local simulation SuperLink, Flower 1.41 style.
#
#   simulation/flwr_run.sh NUM_SUPERNODES [extra `flwr run` args, e.g. -c 'federated.rounds=5']
#
# Flower 1.41 reads SuperLink connections from $FLWR_HOME/config.toml (not from pyproject.toml).
# This script points FLWR_HOME at runs/flwr-home (never your ~/.flwr), writes a config whose
# default connection "local" uses the magic local address (flwr then starts a managed
# `flower-superlink --simulation` in the background), sets the number of virtual SuperNodes
# via --federation-config and streams the logs. run-config paths are made absolute because
# the ServerApp runs from the installed FAB, not from this directory.
# The managed SuperLink keeps running for later runs; stop it with
#   kill "$(pgrep -f "flower-superlink.*runs/flwr-home/local-superlink")"
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:?usage: simulation/flwr_run.sh NUM_SUPERNODES [flwr run args...]}"; shift || true
export FLWR_HOME="${FLWR_HOME:-$PWD/runs/flwr-home}"
# The managed SuperLink inherits this: the ServerApp/ClientApps run in this venv instead of a
# per-run environment that Flower would otherwise build with `uv sync` (slow, and needs a registry).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="${FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION:-1}"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = ":local:"
TOML
OUT="$PWD/runs/flwr-$N"
# Flower 1.41 merges several -c options shallowly (a later -c with federated.* keys drops an
# earlier one's federated.* keys), so every override goes into ONE -c string.
CFG="output_dir=\"$OUT\" federated.num_clients=$N"
REST=()
while [ $# -gt 0 ]; do
  case "$1" in
    -c|--run-config) CFG="$CFG $2"; shift 2 ;;
    *) REST+=("$1"); shift ;;
  esac
done
exec flwr run . local --stream --federation-config "num-supernodes=$N" -c "$CFG" "${REST[@]}"
