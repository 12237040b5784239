#!/usr/bin/env bash
# Launch post-fl on a running federation (Flower >= 1.41 `flwr run` over TLS). Run it from
# anywhere; it submits the Flower app in this repository.
#
#   deploy/run_federation.sh FLWR_HOME ADDRESS CA_CERT --token TOKEN_FILE [--name NAME]
#       [--no-stream] [flwr run options, e.g. -c 'federated.rounds=5 federated.num_clients=3']
#
#   FLWR_HOME  folder for the Flower CLI config (never your ~/.flwr unless
#              POST_FL_USE_REAL_FLWR_HOME=1); a TLS connection NAME (default "post-fl") to
#              ADDRESS (SuperLink HOST:PORT) trusting CA_CERT is written there
#   --token    the operator token (STATE_DIR/operator.token of deploy/start_superlink.sh);
#              the SuperLink refuses runs from anyone without it, and from peers outside
#              loopback / its --control-from networks
#   --no-stream  submit and return (default: stream the run's logs until it ends)
#
# Run-config values are TOML (strings quoted). Paths in it (model.teacher, model.student,
# data.test, data.public, output_dir) are read/written by the ServerApp on the SuperLink
# machine: give absolute paths there. federated.num_clients must equal the number of
# SuperNodes. Results: <output_dir>/results.json on the SuperLink machine.
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-2}"; }
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage 0
[[ $# -ge 3 ]] || usage
HERE="$(cd "$(dirname "$0")" && pwd)"; APP="$(cd "$HERE/.." && pwd)"
HOME_DIR="$1"; ADDRESS="$2"; CA="$3"; shift 3
NAME="post-fl"; STREAM=(--stream); ARGS=(); TOKEN=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --token) TOKEN="${2:?--token needs a file}"; shift 2 ;;
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --no-stream) STREAM=(); shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[[ -n "$TOKEN" ]] || { echo "run_federation.sh: --token TOKEN_FILE is required (the SuperLink's operator.token)" >&2; exit 2; }
command -v flwr >/dev/null || { echo "run_federation.sh: flwr not on PATH; activate the post-fl venv" >&2; exit 2; }
"$HERE/flwr_config.sh" "$HOME_DIR" "$NAME" "$ADDRESS" "$CA" "$TOKEN"
export FLWR_HOME="$(realpath "$HOME_DIR")"
# `flwr run DIR` walks every file under DIR before filtering (Flower 1.41), which is slow in a
# checkout with .venv/ and runs/; submit a staged copy of just the app's sources instead.
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/post-fl-app.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
cp "$APP/pyproject.toml" "$STAGE/"
[[ -f "$APP/README.md" ]] && cp "$APP/README.md" "$STAGE/"
[[ -f "$APP/.gitignore" ]] && cp "$APP/.gitignore" "$STAGE/"
for d in post_fl server_app client_app; do
  mkdir -p "$STAGE/$d"
  (cd "$APP/$d" && find . -name __pycache__ -prune -o -type f \( -name '*.py' -o -name '*.json' -o -name '*.toml' \) -print \
     | while read -r f; do mkdir -p "$STAGE/$d/$(dirname "$f")"; cp "$f" "$STAGE/$d/$f"; done)
done
flwr run "$STAGE" "$NAME" "${STREAM[@]}" "${ARGS[@]}"
