#!/usr/bin/env bash
# Start one organisation's Flower SuperNode (Flower >= 1.41): connects out to the SuperLink over
# TLS, authenticates with the site's private key, and runs post-fl's ClientApp on the site's
# own data file. Runs in the foreground; stop it with Ctrl-C / SIGTERM.
#
#   deploy/start_supernode.sh --superlink HOST:PORT --ca CA_CERT --key PRIVATE_KEY \
#       --partition-id I --num-partitions N --data FILE --dataset-name NAME --labels L1,L2 \
#       --budget EPSILON [--text-column COL] [--label-column COL] [--delta DELTA] [--ledger DIR] \
#       [--port PORT] [--state DIR] [--max-wait SECONDS] [-- extra flower-supernode args]
#
#   --superlink       the SuperLink's address (the federation operator gives it to you)
#   --ca              the CA certificate that signed the SuperLink's TLS certificate
#   --key             this site's private key (OpenSSH ECDSA; its .pub must be registered)
#   --partition-id    this site's client id in the federation, 0..N-1, unique per site
#   --num-partitions  N, the number of sites (= run-config federated.num_clients)
#   --data            this site's private data (CSV/TSV/JSONL with text and label columns);
#                     passed as node config data-path, never sent anywhere
#   --dataset-name    the name this data's privacy ledger is kept under (node config
#                     dataset-name; letters, digits, . _ -): keep it when the file is re-exported,
#                     or the budget starts again from zero
#   --labels          this site's label set, comma-separated (node config labels), e.g.
#                     negative,positive; a run whose labels differ is refused
#   --text-column     the file's text column (node config text-column, default text)
#   --label-column    the file's label column (node config label-column, default label); a run
#                     config naming other columns is refused: the operator cannot make the site
#                     read another column
#   --budget          the most epsilon this site's data may ever spend, over all runs
#                     (node config privacy-budget-epsilon; set by the site, not the operator):
#                     the ClientApp refuses a round that would exceed it
#   --delta           the delta the budget is judged at (node config privacy-delta; default
#                     min(1e-5, 1/(10 N)) for N examples); must be < 1/N
#   --ledger          folder of the site's persistent privacy ledger, one file per dataset name
#                     (node config privacy-ledger; default
#                     $XDG_DATA_HOME/post_fl/privacy-ledgers, i.e. ~/.local/share/...)
#   --port            local port of this SuperNode's Runtime API, used only on this machine
#                     by its ClientApp processes (default 9094; give each SuperNode on one
#                     machine its own)
#   --state           folder for installed apps (FLWR_HOME of this node; default ./supernode-state)
#   --max-wait        give up if the SuperLink is unreachable this long (default: retry forever)
#
# Locked: TLS only, the site's key, the Runtime API on 127.0.0.1, and no runtime dependency
# installation (Flower 1.41's SuperNode default; the ClientApp runs in this venv). Extra args
# that would undo this (--insecure, --allow-runtime-dependency-installation, --host, ...) are
# refused. What the site still trusts: the operator's app code (see README, "What a site trusts").
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-2}"; }
SUPERLINK=""; CA=""; KEY=""; PID=""; NPART=""; DATA=""; DNAME=""; LABELS=""; TCOL=""; LCOL=""; BUDGET=""; DELTA=""; LEDGER=""; PORT="9094"; STATE="./supernode-state"; MAXWAIT=""; EXTRA=()
[[ $# -gt 0 ]] || usage
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) SUPERLINK="${2:?}"; shift 2 ;;
    --ca) CA="${2:?}"; shift 2 ;;
    --key) KEY="${2:?}"; shift 2 ;;
    --partition-id) PID="${2:?}"; shift 2 ;;
    --num-partitions) NPART="${2:?}"; shift 2 ;;
    --data) DATA="${2:?}"; shift 2 ;;
    --dataset-name) DNAME="${2:?}"; shift 2 ;;
    --labels) LABELS="${2:?}"; shift 2 ;;
    --text-column) TCOL="${2:?}"; shift 2 ;;
    --label-column) LCOL="${2:?}"; shift 2 ;;
    --budget) BUDGET="${2:?}"; shift 2 ;;
    --delta) DELTA="${2:?}"; shift 2 ;;
    --ledger) LEDGER="${2:?}"; shift 2 ;;
    --port) PORT="${2:?}"; shift 2 ;;
    --state) STATE="${2:?}"; shift 2 ;;
    --max-wait) MAXWAIT="${2:?}"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "start_supernode.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
missing=()
for v in SUPERLINK CA KEY PID NPART DATA DNAME LABELS BUDGET; do [[ -n "${!v}" ]] || missing+=("$v"); done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "start_supernode.sh: missing --superlink/--ca/--key/--partition-id/--num-partitions/--data/--dataset-name/--labels/--budget (${missing[*]})" >&2; usage
fi
for a in "${EXTRA[@]}"; do
  case "$a" in
    --insecure|--allow-runtime-dependency-installation|--host|--host=*|--root-certificates|--root-certificates=*|--auth-supernode-private-key|--auth-supernode-private-key=*|--superlink|--superlink=*|--node-config|--node-config=*)
      echo "start_supernode.sh: '$a' is not allowed after -- (it would undo the lock-down or bypass the options above)" >&2; exit 2 ;;
  esac
done
[[ "$PID" =~ ^[0-9]+$ && "$NPART" =~ ^[0-9]+$ && "$PID" -lt "$NPART" ]] || { echo "start_supernode.sh: need 0 <= partition-id < num-partitions" >&2; exit 2; }
[[ -r "$CA" ]] || { echo "start_supernode.sh: CA certificate '$CA' missing or unreadable" >&2; exit 2; }
[[ -r "$KEY" ]] || { echo "start_supernode.sh: private key '$KEY' missing or unreadable" >&2; exit 2; }
[[ "$DATA" != *"'"* && "$DATA" != *'"'* ]] || { echo "start_supernode.sh: data path must not contain quotes" >&2; exit 2; }
[[ "$LEDGER" != *"'"* && "$LEDGER" != *'"'* ]] || { echo "start_supernode.sh: ledger path must not contain quotes" >&2; exit 2; }
[[ "$DNAME" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ ]] || { echo "start_supernode.sh: --dataset-name must be 1-128 letters, digits, '.', '_' or '-' (not starting with . _ -), got '$DNAME'" >&2; exit 2; }
for v in LABELS TCOL LCOL; do
  [[ "${!v}" != *"'"* && "${!v}" != *'"'* ]] || { echo "start_supernode.sh: --labels/--text-column/--label-column must not contain quotes" >&2; exit 2; }
done
[[ -z "$DELTA" ]] || [[ "$DELTA" =~ ^[0-9]+(\.[0-9]+)?([eE]-?[0-9]+)?$ ]] || { echo "start_supernode.sh: --delta must be a number, got '$DELTA'" >&2; exit 2; }
[[ "$BUDGET" =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v b="$BUDGET" 'BEGIN { exit !(b > 0) }' \
  || { echo "start_supernode.sh: --budget must be a positive number (epsilon), got '$BUDGET'" >&2; exit 2; }
# The data file is checked by the ClientApp when it trains (a bad file fails this site's
# rounds with a message naming the file); warn early here so the operator sees it at once.
[[ -r "$DATA" ]] || echo "start_supernode.sh: WARNING: data file '$DATA' missing or unreadable" >&2
command -v flower-supernode >/dev/null || { echo "start_supernode.sh: flower-supernode not on PATH; activate the post-fl venv" >&2; exit 2; }
mkdir -p "$STATE"
export FLWR_HOME="$(realpath "$STATE")"   # installed apps of this node; never ~/.flwr
DATA="$(realpath -m "$DATA")"
NODE_CONFIG="partition-id=$PID num-partitions=$NPART data-path='$DATA' dataset-name='$DNAME' labels='$LABELS' privacy-budget-epsilon=$BUDGET"
[[ -z "$TCOL" ]] || NODE_CONFIG+=" text-column='$TCOL'"
[[ -z "$LCOL" ]] || NODE_CONFIG+=" label-column='$LCOL'"
[[ -z "$DELTA" ]] || NODE_CONFIG+=" privacy-delta=$DELTA"
if [[ -n "$LEDGER" ]]; then mkdir -p "$LEDGER"; LEDGER="$(realpath "$LEDGER")"; NODE_CONFIG+=" privacy-ledger='$LEDGER'"; fi
WAIT=(); [[ -z "$MAXWAIT" ]] || WAIT=(--max-wait-time "$MAXWAIT")
echo "SuperNode partition $PID/$NPART -> $SUPERLINK (TLS, key $KEY, data $DATA as dataset '$DNAME', labels $LABELS, budget epsilon $BUDGET, delta ${DELTA:-default}, ledger ${LEDGER:-default}, runtime port $PORT)"
exec flower-supernode \
  --superlink "$SUPERLINK" --root-certificates "$CA" \
  --auth-supernode-private-key "$KEY" \
  --node-config "$NODE_CONFIG" \
  --host 127.0.0.1 --port "$PORT" \
  "${WAIT[@]}" "${EXTRA[@]}"
