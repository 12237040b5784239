#!/usr/bin/env bash
# Run post-fl with the Flower CLI (`flwr run`) on a simulation SuperLink that this script starts and stops.
#
#   simulation/flwr_run.sh NUM_SUPERNODES [extra `flwr run` args, e.g. -c 'federated.rounds=5']
#
# Works without an activated venv: every program comes from .venv/bin (or $POST_FL_VENV/bin).
# 1. Checks every input and the client partitions first (python -m post_fl.preflight): a bad
#    file or impossible split is reported before anything starts.
# 2. Starts `flower-superlink --simulation` on free local ports in its own process group, with
#    FLWR_HOME=runs/flwr-home (your ~/.flwr is never touched) and a connection "local" to it.
# 3. Runs `flwr run . local --stream` with --federation-config num-supernodes=N.
# 4. On exit (success, error or Ctrl-C) stops that SuperLink and every flwr-simulation it started,
#    and reaps them: nothing is left running, no zombie.
# run-config paths are made absolute because the ServerApp runs from the installed FAB.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:?usage: simulation/flwr_run.sh NUM_SUPERNODES [flwr run args...]}"; shift || true
BIN="${POST_FL_VENV:-$PWD/.venv}/bin"
for exe in python flwr flower-superlink; do
  if [ ! -x "$BIN/$exe" ]; then
    echo "flwr_run.sh: $BIN/$exe not found; install the venv first (./setup.sh) or set POST_FL_VENV" >&2
    exit 2
  fi
done
export PATH="$BIN:$PATH"  # the SuperLink starts flwr-simulation and the apps from the same venv
export FLWR_HOME="${FLWR_HOME:-$PWD/runs/flwr-home}"
# The apps run in this venv instead of a per-run environment Flower would build with `uv sync`.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$FLWR_HOME"
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

"$BIN/python" -m post_fl.preflight --pyproject pyproject.toml --flower-config "$CFG"

free_port() { "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
CONTROL="$(free_port)"
LINK_PID=""

descendants() {  # every process below $1 (children first listed after their parent)
  local kid
  for kid in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$kid"
    descendants "$kid"
  done
}

cleanup() {
  local rc=$? pids
  trap - EXIT INT TERM
  if [ -n "$LINK_PID" ] && kill -0 "$LINK_PID" 2>/dev/null; then
    pids="$(descendants "$LINK_PID") $LINK_PID"
    kill -TERM -- "-$LINK_PID" $pids 2>/dev/null || true  # its process group and anything that left it
    for _ in $(seq 50); do
      kill -0 $pids 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$LINK_PID" $pids 2>/dev/null || true
  fi
  [ -n "$LINK_PID" ] && wait "$LINK_PID" 2>/dev/null || true  # reap the SuperLink: no zombie
  rm -f "$FLWR_HOME/state-$PORT.db"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

setsid "$BIN/flower-superlink" --simulation --insecure --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port "$PORT" --control-api-address "127.0.0.1:$CONTROL" \
  --database "$FLWR_HOME/state-$PORT.db" >"$FLWR_HOME/superlink.log" 2>&1 &
LINK_PID=$!
for _ in $(seq 600); do
  grep -q "Uvicorn running on" "$FLWR_HOME/superlink.log" 2>/dev/null && break
  kill -0 "$LINK_PID" 2>/dev/null || { cat "$FLWR_HOME/superlink.log" >&2; echo "flwr_run.sh: the SuperLink exited" >&2; exit 1; }
  sleep 0.1
done
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = "127.0.0.1:$PORT"
insecure = true
TOML
# A GPU share per virtual client where CUDA GPUs are present (POST_FL_GPUS_PER_CLIENT overrides the share,
# simulation.run.GPU_FRACTION by default); without GPUs nothing is added and Flower's defaults hold.
FED="num-supernodes=$N"
read -r SHARE GPUS < <("$BIN/python" -c 'import sys; sys.path.insert(0, "."); from simulation.run import client_gpus
import os; v = os.environ.get("POST_FL_GPUS_PER_CLIENT"); s, n = client_gpus(float(v) if v else None); print(s, n)')
if [ "${GPUS:-0}" -gt 0 ]; then
  FED="$FED client-resources-num-gpus=$SHARE init-args-num-gpus=$GPUS"
fi
"$BIN/flwr" run . local --stream --federation-config "$FED" -c "$CFG" ${REST[@]+"${REST[@]}"}
