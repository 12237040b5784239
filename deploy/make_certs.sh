#!/usr/bin/env bash
# Make a throw-away CA, a SuperLink TLS certificate and one ECDSA key pair per SuperNode.
#
#   deploy/make_certs.sh OUT_DIR [HOST ...] [--nodes NAME[,NAME...]]
#
#   OUT_DIR     where everything is written (created; existing files are never overwritten)
#   HOST ...    DNS names / IP addresses the SuperLink is reached at (subjectAltName);
#               localhost 127.0.0.1 ::1 are always added: the operator's `flwr` commands dial
#               127.0.0.1 on the SuperLink machine (its Control API serves loopback only)
#   --nodes     SuperNode names, one key pair each (default: site1,site2,site3)
#
# Writes:
#   OUT_DIR/ca.crt, ca.key            the certificate authority (keep ca.key offline)
#   OUT_DIR/server.crt, server.key    the SuperLink's TLS certificate (signed by the CA) and key
#   OUT_DIR/nodes/NAME, NAME.pub      each SuperNode's authentication key pair: ECDSA P-384 in
#                                     OpenSSH format, the format Flower 1.41 reads
#                                     (flower-supernode --auth-supernode-private-key NAME,
#                                     flwr supernode register NAME.pub)
#
# For production: use a certificate from your organisation's CA instead of ca.crt/server.crt
# (give the SuperLink the certificate, its key and the CA bundle; give every SuperNode and
# every `flwr` user the CA bundle), and let each site generate its own key pair with
#   ssh-keygen -t ecdsa -b 384 -N "" -f site.key
# sending only site.key.pub to the SuperLink operator. Private keys never leave their site.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-2}"; }
[[ $# -ge 1 ]] || usage
[[ "$1" == "-h" || "$1" == "--help" ]] && usage 0
OUT="$1"; shift
HOSTS=(); NODES="site1,site2,site3"; DAYS="${CERT_DAYS:-365}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="${2:?--nodes needs a comma-separated list}"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) HOSTS+=("$1"); shift ;;
  esac
done
for h in localhost 127.0.0.1 ::1; do [[ " ${HOSTS[*]} " == *" $h "* ]] || HOSTS+=("$h"); done
command -v openssl >/dev/null || { echo "make_certs.sh: openssl not found" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "make_certs.sh: ssh-keygen not found (package openssh-client)" >&2; exit 1; }

mkdir -p "$OUT/nodes"
umask 077

if [[ ! -f "$OUT/ca.crt" ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -days "$DAYS" \
    -keyout "$OUT/ca.key" -out "$OUT/ca.crt" -subj "/CN=post-fl federation CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  echo "wrote $OUT/ca.crt"
fi

if [[ ! -f "$OUT/server.crt" ]]; then
  SAN=""
  for h in "${HOSTS[@]}"; do
    if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then SAN+="IP:$h,"; else SAN+="DNS:$h,"; fi
  done
  SAN="${SAN%,}"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -keyout "$OUT/server.key" \
    -out "$OUT/server.csr" -subj "/CN=${HOSTS[0]}" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$SAN" > "$OUT/server.ext"
  openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
    -days "$DAYS" -sha384 -extfile "$OUT/server.ext" -out "$OUT/server.crt" 2>/dev/null
  rm -f "$OUT/server.csr" "$OUT/server.ext"
  echo "wrote $OUT/server.crt (subjectAltName: $SAN)"
fi
openssl verify -CAfile "$OUT/ca.crt" "$OUT/server.crt" >/dev/null

IFS=',' read -r -a NODE_LIST <<< "$NODES"
for n in "${NODE_LIST[@]}"; do
  [[ "$n" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "make_certs.sh: bad node name '$n'" >&2; exit 2; }
  if [[ ! -f "$OUT/nodes/$n" ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$n" -f "$OUT/nodes/$n"
    echo "wrote $OUT/nodes/$n (private) and $OUT/nodes/$n.pub (register this one)"
  fi
done
chmod 644 "$OUT/ca.crt" "$OUT/server.crt" "$OUT"/nodes/*.pub
