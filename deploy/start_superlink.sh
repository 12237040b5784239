#!/usr/bin/env bash
# Start the federation's Flower SuperLink (Flower 1.41 Deployment Engine), locked down: TLS,
# SuperNode authentication, Control API only for the operator, no runtime dependency installs.
# Runs in the foreground; stop it with Ctrl-C / SIGTERM.
#
#   deploy/start_superlink.sh CERT_DIR STATE_DIR [--host HOST] [--port PORT]
#                             [--operator-token FILE] [--control-from CIDR[,CIDR]]
#                             [-- extra flower-superlink args]
#
#   CERT_DIR   holds ca.crt, server.crt, server.key (deploy/make_certs.sh, or your own)
#   STATE_DIR  the SuperLink's state: state.db (runs, registered SuperNodes; survives restarts),
#              flwr-home/ (installed apps), operator.token and superexec.secret (the shared
#              secret with which only this SuperLink's SuperExec may claim ServerApp tasks).
#              Created if missing.
#   --host     address to listen on (default 127.0.0.1: this machine only). For other
#              organisations give the interface they reach, e.g. 0.0.0.0 or 203.0.113.10:
#              peers that are not loopback then reach the Fleet API (SuperNodes) and nothing else.
#   --port     the one HTTPS port of Flower 1.41's SuperLink (default 9092): Fleet API
#              (SuperNodes), Control API (`flwr run`, `flwr supernode register`) and Runtime API
#              (the ServerApp)
#   --operator-token FILE  the operator's bearer token for the Control API (default
#              STATE_DIR/operator.token; made, mode 600, if missing). Every `flwr` command must
#              present it: deploy/flwr_config.sh --token FILE puts it in the CLI config.
#   --control-from  networks besides loopback allowed to reach the Control API (still needing
#              the token); default none: run `flwr` on this machine (or through an SSH tunnel).
#
# Always on: SuperNode authentication (only keys registered by the operator with
# deploy/register_supernode.sh connect), no runtime dependency installation (the ServerApp
# runs in this Python environment: activate the post-fl venv first). The Runtime API answers
# loopback peers only, and only the SuperExec holding superexec.secret can claim ServerApp
# tasks. deploy/locked_superlink.py refuses to start otherwise.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-2}"; }
[[ $# -ge 1 && "$1" != "-h" && "$1" != "--help" ]] || usage $([[ $# -ge 1 ]] && echo 0 || echo 2)
[[ $# -ge 2 ]] || usage
CERTS="$1"; STATE="$2"; shift 2
HOST="127.0.0.1"; PORT="9092"; TOKEN=""; CONTROL_FROM=(); EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) HOST="${2:?--host needs a value}"; shift 2 ;;
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --operator-token) TOKEN="${2:?--operator-token needs a file}"; shift 2 ;;
    --control-from) CONTROL_FROM+=(--control-from "${2:?--control-from needs CIDR[,CIDR]}"); shift 2 ;;
    --no-node-auth) echo "start_superlink.sh: --no-node-auth was removed: SuperNode authentication is always on" >&2; exit 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "start_superlink.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
for f in ca.crt server.crt server.key; do
  [[ -r "$CERTS/$f" ]] || { echo "start_superlink.sh: $CERTS/$f missing or unreadable (run deploy/make_certs.sh)" >&2; exit 2; }
done
for a in "${EXTRA[@]}"; do
  case "$a" in
    --insecure|--allow-runtime-dependency-installation|--simulation|--isolation|--isolation=*|--superexec-auth-secret-file*|--host|--host=*|--port|--port=*)
      echo "start_superlink.sh: '$a' is not allowed here (it would undo the lock-down or bypass the options above)" >&2; exit 2 ;;
  esac
done
command -v flower-superlink >/dev/null || { echo "start_superlink.sh: flower-superlink not on PATH; activate the post-fl venv (. .venv/bin/activate)" >&2; exit 2; }
PY="$(dirname "$(command -v flower-superlink)")/python"
[[ -x "$PY" ]] || PY="${PYTHON:-python3}"

HERE="$(cd "$(dirname "$0")" && pwd)"
CERTS="$(cd "$CERTS" && pwd)"
mkdir -p "$STATE/flwr-home"
STATE="$(cd "$STATE" && pwd)"
export FLWR_HOME="$STATE/flwr-home"   # never the operator's ~/.flwr
if [[ -z "$TOKEN" ]]; then
  TOKEN="$STATE/operator.token"
  if [[ ! -e "$TOKEN" ]]; then
    (umask 077; "$PY" -c 'import secrets; print(secrets.token_urlsafe(32))' > "$TOKEN")
    echo "wrote the operator token $TOKEN (give it only to whoever may submit runs and register sites)"
  fi
fi
SECRET="$STATE/superexec.secret"
[[ -e "$SECRET" ]] || (umask 077; head -c 32 /dev/urandom > "$SECRET")

echo "SuperLink on https://$HOST:$PORT (state: $STATE; Control API: loopback${CONTROL_FROM[*]:+ and ${CONTROL_FROM[*]}}, token $TOKEN)"
exec "$PY" "$HERE/locked_superlink.py" --operator-token-file "$TOKEN" --superexec-secret-file "$SECRET" \
  "${CONTROL_FROM[@]}" -- \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.crt" --ssl-keyfile "$CERTS/server.key" \
  --enable-supernode-auth \
  --host "$HOST" --port "$PORT" \
  --database "$STATE/state.db" \
  --disable-runtime-dependency-installation \
  "${EXTRA[@]}"
