#!/usr/bin/env bash
# Register SuperNode public keys with the SuperLink (SuperLink operator only; Flower >= 1.41
# `flwr supernode register`). Only registered keys can connect: deploy/start_superlink.sh always
# runs --enable-supernode-auth, and its Control API takes registrations only from the operator
# (loopback or --control-from networks, with the operator token).
#
#   deploy/register_supernode.sh FLWR_HOME ADDRESS CA_CERT --token TOKEN_FILE PUBKEY [PUBKEY ...]
#
#   FLWR_HOME  folder for the Flower CLI config (written with deploy/flwr_config.sh; connection
#              name "post-fl"); never your ~/.flwr unless POST_FL_USE_REAL_FLWR_HOME=1
#   ADDRESS    SuperLink HOST:PORT, e.g. 127.0.0.1:9092 on the SuperLink machine
#   CA_CERT    the CA that signed its certificate
#   TOKEN_FILE the operator token (STATE_DIR/operator.token of deploy/start_superlink.sh)
#   PUBKEY     a site's public key (OpenSSH ECDSA, e.g. site1.pub from deploy/make_certs.sh or
#              `ssh-keygen -t ecdsa -b 384`), sent to you by that site
#
# Prints each new node id. List them with:  FLWR_HOME=... flwr supernode ls post-fl
# Remove one with:                          FLWR_HOME=... flwr supernode unregister NODE_ID post-fl
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-2}"; }
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage 0
[[ $# -ge 6 && "$4" == "--token" ]] || usage
HERE="$(cd "$(dirname "$0")" && pwd)"
export FLWR_HOME="$1"; ADDRESS="$2"; CA="$3"; TOKEN="$5"; shift 5
command -v flwr >/dev/null || { echo "register_supernode.sh: flwr not on PATH; activate the post-fl venv" >&2; exit 2; }
"$HERE/flwr_config.sh" "$FLWR_HOME" post-fl "$ADDRESS" "$CA" "$TOKEN" >/dev/null
export FLWR_HOME="$(realpath "$FLWR_HOME")"
for key in "$@"; do
  [[ -r "$key" ]] || { echo "register_supernode.sh: public key '$key' missing or unreadable" >&2; exit 2; }
  echo "registering $key"
  flwr supernode register "$key" post-fl --name "$(basename "${key%.pub}")"
done
