#!/usr/bin/env bash
# Write a Flower (>= 1.41) CLI config with one TLS SuperLink connection, and the operator's token.
#
#   deploy/flwr_config.sh FLWR_HOME NAME ADDRESS CA_CERT [TOKEN_FILE]
#
#   FLWR_HOME  folder for the config (config.toml is written there). Refuses ~/.flwr (or
#              $HOME/.flwr) unless POST_FL_USE_REAL_FLWR_HOME=1.
#   NAME       connection name used as `flwr run . NAME`, `flwr supernode register KEY NAME`
#   ADDRESS    the SuperLink as HOST:PORT (the port deploy/start_superlink.sh listens on)
#   CA_CERT    the CA certificate that signed the SuperLink's certificate
#   TOKEN_FILE the operator token (deploy/start_superlink.sh wrote STATE_DIR/operator.token);
#              stored for ADDRESS in FLWR_HOME/credentials.yaml (mode 600), which the `flwr` CLI
#              sends as a bearer token on every Control API call. Without it the locked
#              SuperLink refuses every `flwr` command.
#
# An existing config.toml is updated: the connection NAME is replaced and made the default;
# other connections are kept (with FLWR_HOME=~/.flwr a copy config.toml.bak is left first).
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-2}"; }
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage 0
[[ $# -eq 4 || $# -eq 5 ]] || usage
HOME_DIR="$1"; NAME="$2"; ADDRESS="$3"; CA="$4"; TOKEN_FILE="${5:-}"
[[ "$NAME" =~ ^[A-Za-z0-9_-]+$ ]] || { echo "flwr_config.sh: connection name '$NAME' must be letters, digits, _ or -" >&2; exit 2; }
[[ "$ADDRESS" =~ ^[^:/]+:[0-9]+$ || "$ADDRESS" =~ ^\[.*\]:[0-9]+$ ]] || { echo "flwr_config.sh: address '$ADDRESS' must be HOST:PORT (no https://)" >&2; exit 2; }
[[ -r "$CA" ]] || { echo "flwr_config.sh: CA certificate '$CA' missing or unreadable" >&2; exit 2; }
[[ -z "$TOKEN_FILE" || -r "$TOKEN_FILE" ]] || { echo "flwr_config.sh: operator token file '$TOKEN_FILE' missing or unreadable" >&2; exit 2; }
HOME_DIR="$(realpath -m "$HOME_DIR")"; CA="$(realpath "$CA")"
if [[ "$HOME_DIR" == "$(realpath -m ~/.flwr)" && "${POST_FL_USE_REAL_FLWR_HOME:-0}" != "1" ]]; then
  echo "flwr_config.sh: refusing to write your real ~/.flwr; pass another FLWR_HOME or set POST_FL_USE_REAL_FLWR_HOME=1" >&2
  exit 2
fi
mkdir -p "$HOME_DIR"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif command -v flwr >/dev/null; then PY="$(dirname "$(command -v flwr)")/python"
else PY=python3; fi
"$PY" - "$HOME_DIR/config.toml" "$NAME" "$ADDRESS" "$CA" <<'PYEOF'
import shutil, sys, tomllib
from pathlib import Path
path, name, address, ca = Path(sys.argv[1]), *sys.argv[2:]
cfg = tomllib.loads(path.read_text()) if path.is_file() else {}
if path.is_file() and path.parent == Path.home() / ".flwr":
    shutil.copy(path, path.with_suffix(".toml.bak"))
links = cfg.setdefault("superlink", {})
links["default"] = name
links[name] = {"address": address, "root-certificates": ca}
def q(v):
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
def emit(table, prefix, out):
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    subs = {k: v for k, v in table.items() if isinstance(v, dict)}
    if prefix and (scalars or not subs):
        out.append(f"[{prefix}]")
    for k, v in scalars.items():
        val = "true" if v is True else "false" if v is False else str(v) if isinstance(v, (int, float)) else q(v)
        out.append(f'"{k}" = {val}' if not k.replace("-", "").replace("_", "").isalnum() else f"{k} = {val}")
    if scalars:
        out.append("")
    for k, v in subs.items():
        emit(v, f"{prefix}.{k}" if prefix else k, out)
out = []
emit(cfg, "", out)
path.write_text("\n".join(out).rstrip() + "\n")
print(f"wrote {path}: connection '{name}' -> {address} (TLS, CA {ca})")
PYEOF
if [[ -n "$TOKEN_FILE" ]]; then
  # the Flower CLI's own credential store (FLWR_HOME/credentials.yaml), as `flwr login` would
  # leave it: authn type "oidc" makes the CLI send the access token as "Authorization: Bearer"
  FLWR_HOME="$HOME_DIR" "$PY" - "$ADDRESS" "$TOKEN_FILE" <<'PYEOF'
import os, sys
from pathlib import Path
address, token_file = sys.argv[1], Path(sys.argv[2])
if token_file.stat().st_mode & 0o077:
    sys.exit(f"flwr_config.sh: operator token file {token_file} is readable by others; chmod 600 it")
token = token_file.read_text(encoding="utf-8").strip()
if len(token) < 32 or any(c.isspace() for c in token):
    sys.exit(f"flwr_config.sh: {token_file} is not an operator token (one line, >= 32 characters)")
from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY, REFRESH_TOKEN_STORE_KEY
from flwr.common.constant import AuthnType
from flwr.supercore.credential_store import get_credential_store
store = get_credential_store()
store.set(AUTHN_TYPE_STORE_KEY % address, AuthnType.OIDC.encode())
store.set(ACCESS_TOKEN_STORE_KEY % address, token.encode())
store.set(REFRESH_TOKEN_STORE_KEY % address, b"not-used")  # the CLI wants one; the SuperLink refreshes nothing
cred = Path(os.environ["FLWR_HOME"]) / "credentials.yaml"
cred.chmod(0o600)
print(f"stored the operator token for {address} in {cred}")
PYEOF
fi
