#!/usr/bin/env bash
# Start the federation's Flower SuperLink (Flower >= 1.41 Deployment Engine) with TLS and
# SuperNode authentication. Runs in the foreground; stop it with Ctrl-C / SIGTERM.
#
#   deploy/start_superlink.sh CERT_DIR STATE_DIR [--host HOST] [--port PORT] [--no-node-auth]
#                             [-- extra flower-superlink args]
#
#   CERT_DIR   holds ca.crt, server.crt, server.key (deploy/make_certs.sh, or your own)
#   STATE_DIR  the SuperLink's state: state.db (runs, registered SuperNodes; survives restarts)
#              and flwr-home/ (installed apps). Created if missing.
#   --host     address to listen on (default 0.0.0.0: reachable by other organisations;
#              use 127.0.0.1 for a single-machine test)
#   --port     the one HTTPS port of Flower 1.41's SuperLink: Fleet API (SuperNodes), Control
#              API (`flwr run`, `flwr supernode register`) and Runtime API (ServerApp) (default 9092)
#   --no-node-auth  accept any SuperNode that trusts the CA (not recommended)
#
# Node authentication is on: only SuperNodes whose public key was registered with
# `deploy/register_supernode.sh` (= `flwr supernode register`) can connect.
# Runtime dependency installation is disabled: the ServerApp runs in this Python environment
# (activate the post-fl venv first).
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
[[ $# -ge 1 && "$1" != "-h" && "$1" != "--help" ]] || usage $([[ $# -ge 1 ]] && echo 0 || echo 2)
[[ $# -ge 2 ]] || usage
CERTS="$1"; STATE="$2"; shift 2
HOST="0.0.0.0"; PORT="9092"; AUTH=(--enable-supernode-auth); EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) HOST="${2:?--host needs a value}"; shift 2 ;;
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --no-node-auth) AUTH=(); shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "start_superlink.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
for f in ca.crt server.crt server.key; do
  [[ -r "$CERTS/$f" ]] || { echo "start_superlink.sh: $CERTS/$f missing or unreadable (run deploy/make_certs.sh)" >&2; exit 2; }
done
command -v flower-superlink >/dev/null || { echo "start_superlink.sh: flower-superlink not on PATH; activate the post-fl venv (. .venv/bin/activate)" >&2; exit 2; }

CERTS="$(cd "$CERTS" && pwd)"
mkdir -p "$STATE/flwr-home"
STATE="$(cd "$STATE" && pwd)"
export FLWR_HOME="$STATE/flwr-home"   # never the operator's ~/.flwr

echo "SuperLink on https://$HOST:$PORT (state: $STATE, node auth: ${AUTH[*]:-off})"
exec flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.crt" --ssl-keyfile "$CERTS/server.key" \
  "${AUTH[@]}" \
  --host "$HOST" --port "$PORT" \
  --database "$STATE/state.db" \
  --disable-runtime-dependency-installation \
  "${EXTRA[@]}"
