#!/usr/bin/env bash
# Write a Flower (>= 1.41) CLI config with one TLS SuperLink connection.
#
#   deploy/flwr_config.sh FLWR_HOME NAME ADDRESS CA_CERT
#
#   FLWR_HOME  folder for the config (config.toml is written there). Refuses ~/.flwr (or
#              $HOME/.flwr) unless POST_FL_USE_REAL_FLWR_HOME=1.
#   NAME       connection name used as `flwr run . NAME`, `flwr supernode register KEY NAME`
#   ADDRESS    the SuperLink as HOST:PORT (the port deploy/start_superlink.sh listens on)
#   CA_CERT    the CA certificate that signed the SuperLink's certificate
#
# An existing config.toml is updated: the connection NAME is replaced and made the default;
# other connections are kept (with FLWR_HOME=~/.flwr a copy config.toml.bak is left first).
set -euo pipefail
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage 0
[[ $# -eq 4 ]] || usage
HOME_DIR="$1"; NAME="$2"; ADDRESS="$3"; CA="$4"
[[ "$NAME" =~ ^[A-Za-z0-9_-]+$ ]] || { echo "flwr_config.sh: connection name '$NAME' must be letters, digits, _ or -" >&2; exit 2; }
[[ "$ADDRESS" =~ ^[^:/]+:[0-9]+$ || "$ADDRESS" =~ ^\[.*\]:[0-9]+$ ]] || { echo "flwr_config.sh: address '$ADDRESS' must be HOST:PORT (no https://)" >&2; exit 2; }
[[ -r "$CA" ]] || { echo "flwr_config.sh: CA certificate '$CA' missing or unreadable" >&2; exit 2; }
HOME_DIR="$(realpath -m "$HOME_DIR")"; CA="$(realpath "$CA")"
if [[ "$HOME_DIR" == "$(realpath -m ~/.flwr)" && "${POST_FL_USE_REAL_FLWR_HOME:-0}" != "1" ]]; then
  echo "flwr_config.sh: refusing to write your real ~/.flwr; pass another FLWR_HOME or set POST_FL_USE_REAL_FLWR_HOME=1" >&2
  exit 2
fi
mkdir -p "$HOME_DIR"
PY="${PYTHON:-python3}"
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
