"""Flower 1.41 SuperLink whose Control and Runtime APIs only the federation operator can use.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode
register``) and the Runtime API (the ServerApp) on one HTTPS socket, and the open-source
distribution authenticates nobody on the Control API (``NoOpControlAuthnPlugin``; OIDC accounts
need the Flower Enterprise package ``flwr.ee``). Started as ``flower-superlink`` would be, this
launcher runs Flower's own SuperLink app with two locks added through Flower's extension points:

* :func:`operator_token_plugin`, a ``flwr.superlink.auth_plugin.ControlAuthnPlugin``: every
  Control API call must carry the operator's bearer token (the ``flwr`` CLI sends it as an OIDC
  access token; ``deploy/flwr_config.sh --token`` stores it in the CLI's credential store);
* :class:`PeerFilter`, an ASGI wrapper: peers outside the allowed networks (default: loopback)
  reach only the Fleet API (``/v1/fleet/``) and ``/health``. The Control API accepts loopback
  plus the networks given with ``--control-from``; the Runtime API accepts loopback only (the
  SuperExec that runs the ServerApp is started by this launcher on this machine).

It also closes the one unauthenticated Runtime API call: in Flower's default ``subprocess``
isolation anyone on loopback may claim a pending ServerApp task (``/v1/runtime/acquire-task``)
and receive its token. The launcher runs Flower's ``--isolation process`` with
``--superexec-auth-secret-file`` and starts the SuperExec itself with the same secret (the
command Flower builds for its own subprocess mode, plus the secret), so only that SuperExec
can claim tasks.

Usage (deploy/start_superlink.sh calls it)::

    python deploy/locked_superlink.py --operator-token-file FILE --superexec-secret-file FILE \\
        [--control-from CIDR ...] -- FLOWER-SUPERLINK-ARGS

The Flower arguments must include TLS certificates, ``--enable-supernode-auth`` and
``--disable-runtime-dependency-installation`` and must not set ``--isolation``; anything else
is refused with a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

FLOWER_SERIES = "1.41."  # the private Flower functions used below are those of this series
MIN_TOKEN_CHARS = 32
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
PUBLIC_PATH_PREFIXES = ("/v1/fleet/",)  # what any peer may reach (SuperNodes)
PUBLIC_PATHS = ("/health",)
CONTROL_PREFIX = "/v1/control/"


class OperatorTokenError(ValueError):
    """The operator token file is missing, too short or readable by others."""


def read_operator_token(path: Path) -> str:
    """Return the operator's bearer token from ``path`` (one line, >= 32 characters).

    Refuses a file that group or others may read or write, as ssh does for private keys.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise OperatorTokenError(f"operator token file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise OperatorTokenError(f"operator token file {path}: not a regular file")
    if st.st_mode & 0o077:
        raise OperatorTokenError(
            f"operator token file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read it; "
            f"run: chmod 600 {path}")
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise OperatorTokenError(
            f"operator token file {path}: expected one line of at least {MIN_TOKEN_CHARS} "
            "non-space characters (deploy/start_superlink.sh makes one)")
    return token


def read_superexec_secret(path: Path) -> Path:
    """Check the SuperExec shared secret file (mode 600, at least 32 bytes) and return its path."""
    try:
        st = path.stat()
    except OSError as exc:
        raise OperatorTokenError(f"SuperExec secret file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
        raise OperatorTokenError(f"SuperExec secret file {path}: must be a regular file of mode 600; "
                                 f"run: chmod 600 {path}")
    if st.st_size < 32:
        raise OperatorTokenError(f"SuperExec secret file {path}: expected at least 32 random bytes")
    return path


def parse_networks(values: Sequence[str], what: str) -> tuple:
    """Parse comma-separated CIDRs / addresses into ``ipaddress`` networks (error names the value)."""
    nets = []
    for value in values:
        for item in filter(None, (v.strip() for v in value.split(","))):
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{what}: '{item}' is not an IP address or CIDR network") from None
    return tuple(nets)


def _make_plugin_class():
    from flwr.common.constant import ACCESS_TOKEN_KEY, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.supercore.auth.typing import AccountInfo
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.superlink.auth_plugin import ControlAuthnPlugin

    class _OperatorTokenAuthnPlugin(ControlAuthnPlugin):
        """Control API authentication by one static operator token (constant-time compare).

        The SuperLink keeps only the token's SHA-256. A request is the operator's when its
        ``Authorization: Bearer`` token hashes to that digest; the account is Flower's single
        open-source account (``NOOP_FLWR_AID``), so runs and nodes stay in the default
        federation. ``flwr login`` and token refresh are refused: nobody can obtain a token
        from the SuperLink; the operator reads it from the token file.
        """

        def __init__(self, token: str = "") -> None:  # noqa: D107 (ABC requires __init__)
            if len(token) < MIN_TOKEN_CHARS:
                raise OperatorTokenError(f"operator token must have at least {MIN_TOKEN_CHARS} characters")
            self._digest = hashlib.sha256(token.encode("utf-8")).digest()

        def get_login_details(self):
            """Refuse ``flwr login``: tokens are not issued by the SuperLink."""
            raise FlowerError(ApiErrorCode.NO_ACCOUNT_AUTH,
                              "This SuperLink authenticates the operator by a token file, not by login: "
                              "write your CLI config with deploy/flwr_config.sh --token FILE.")

        def validate_tokens_in_metadata(self, metadata):
            """Accept exactly the requests whose access token is the operator's token."""
            presented = [v for k, v in metadata if k == ACCESS_TOKEN_KEY]
            if len(presented) != 1:
                return False, None
            value = presented[0].encode("utf-8") if isinstance(presented[0], str) else bytes(presented[0])
            if not hmac.compare_digest(hashlib.sha256(value).digest(), self._digest):
                return False, None
            return True, AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)

        def get_auth_tokens(self, device_code):
            """Refuse: no device-code login on this SuperLink."""
            raise FlowerError(ApiErrorCode.NO_ACCOUNT_AUTH, "This SuperLink issues no tokens.")

        def refresh_tokens(self, metadata):
            """Refuse every refresh: a token this SuperLink rejected stays rejected."""
            raise FlowerError(ApiErrorCode.ACCOUNT_AUTHENTICATION_FAILED,
                              "The operator token was refused by this SuperLink (tokens are never refreshed): "
                              "store the SuperLink's current token file with deploy/flwr_config.sh.")

    return _OperatorTokenAuthnPlugin


def operator_token_plugin(token: str):
    """A Flower ``ControlAuthnPlugin`` that accepts exactly the bearer token ``token``.

    The class is built on first use, so importing this module does not import Flower.
    """
    global _PLUGIN_CLASS
    if _PLUGIN_CLASS is None:
        _PLUGIN_CLASS = _make_plugin_class()
    return _PLUGIN_CLASS(token)


_PLUGIN_CLASS = None


class PeerFilter:
    """ASGI wrapper that lets a peer reach a path only if its address is allowed for that path.

    Any peer: ``/v1/fleet/...`` and ``/health``. Control API (``/v1/control/...``): loopback and
    ``control_from``. Everything else (Runtime API, ``/docs``, ``/openapi.json``): loopback only.
    The peer is the TCP peer (uvicorn runs with ``proxy_headers=False``, so ``X-Forwarded-For``
    is ignored). Refusals are answered 403 with a JSON reason and logged.
    """

    def __init__(self, app, control_from: Sequence = (), log=None) -> None:
        self.app = app
        self.control_nets = (*LOOPBACK, *control_from)
        self.log = log

    def allowed(self, path: str, peer: str | None) -> bool:
        """Whether a peer at address ``peer`` may request ``path`` (a path with ``.``/``..`` or empty
        segments is never public: only a plain ``/v1/fleet/...`` path counts as the Fleet API)."""
        segs = path.split("/")[1:]
        plain = not any(seg in (".", "..") for seg in segs) and "" not in segs[:-1]
        if plain and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PATH_PREFIXES)):
            return True
        try:
            addr = ipaddress.ip_address(peer or "")
        except ValueError:
            return False  # unknown peer (e.g. a Unix socket): only public paths
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        nets = self.control_nets if path.startswith(CONTROL_PREFIX) else LOOPBACK
        return any(addr.version == n.version and addr in n for n in nets)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        client = scope.get("client")
        peer = client[0] if client else None
        if self.allowed(path, peer):
            await self.app(scope, receive, send)
            return
        api = "Control API" if path.startswith(CONTROL_PREFIX) else "this API"
        reason = (f"{api} is served only to the federation operator's networks; {peer} may use "
                  "the Fleet API only")
        if self.log is not None:
            self.log(f"refused {path} from {peer}: {reason}")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": reason}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _parse_own_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = list(argv).index("--")
        own, flower = list(argv[:i]), list(argv[i + 1:])
    else:
        own, flower = list(argv), []
    p = argparse.ArgumentParser(prog="locked_superlink.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--operator-token-file", required=True, type=Path,
                   help="file with the operator's bearer token (mode 600)")
    p.add_argument("--superexec-secret-file", required=True, type=Path,
                   help="shared secret (mode 600) with which only our SuperExec may claim ServerApp tasks")
    p.add_argument("--control-from", action="append", default=[], metavar="CIDR[,CIDR]",
                   help="networks besides loopback that may reach the Control API (still token-checked)")
    return p.parse_args(own), flower


def _check_flower_config(config) -> list[str]:
    """Reasons the parsed Flower SuperLink config is not locked down (empty list = fine)."""
    bad = []
    if config.insecure or config.certificates is None:
        bad.append("TLS is off (give --ssl-ca-certfile, --ssl-certfile, --ssl-keyfile; no --insecure)")
    if not config.enable_supernode_auth:
        bad.append("SuperNode authentication is off (add --enable-supernode-auth)")
    if config.runtime_dependency_install:
        bad.append("runtime dependency installation is on (add --disable-runtime-dependency-installation)")
    if config.isolation != "process" or config.superexec_auth_secret is None:
        bad.append("ServerApp tasks must be claimed with the SuperExec secret (the launcher sets "
                   "--isolation process --superexec-auth-secret-file; do not pass --isolation)")
    if config.simulation:
        bad.append("--simulation is not a cross-organisation deployment")
    return bad


def _unlocking_environment(env) -> list[str]:
    """Environment variables that would open a way around the locks (empty list = fine).

    Flower 1.41 starts its legacy gRPC Control / Fleet servers on their own sockets (default
    0.0.0.0:9093 / :9092) when ``FLWR_INTERNAL_GRPC_*_API=1``, outside the peer filter; and
    ``FLWR_OIDC_ENABLED=1`` asks for the Enterprise authentication plugin this launcher replaces.
    """
    bad = []
    for var in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
        if env.get(var) == "1":
            bad.append(f"{var}=1 would start a gRPC API on its own socket, outside the peer filter; unset it")
    if env.get("FLWR_OIDC_ENABLED") == "1":
        bad.append("FLWR_OIDC_ENABLED=1 is set; this launcher replaces the Control API authentication plugin, unset it")
    return bad


def _start_superexec(fs, config, secret_file: Path):
    """Start ``flower-superexec`` as Flower's subprocess mode would, plus the shared secret; it
    exits with this process (``--parent-pid``)."""
    import subprocess

    from flwr.supercore.address import resolve_bind_address
    from flwr.supercore.utils import get_popen_detach_kwargs

    host = f"[{config.host}]" if ":" in config.host else config.host
    command = fs._get_superexec_command(
        runtime_address=resolve_bind_address(f"{host}:{config.port}"),
        runtime_certificates=config.certificates,
        runtime_root_certificates_path=config.ssl_ca_certfile,
        parent_pid=os.getpid(),
        runtime_dependency_install=False,
    )
    command += ["--superexec-auth-secret-file", str(secret_file)]
    return subprocess.Popen(command, **get_popen_detach_kwargs())


def main(argv: Sequence[str] | None = None) -> None:
    """Start Flower's SuperLink with operator-token Control API authentication and the peer filter."""
    own, flower_args = _parse_own_args(sys.argv[1:] if argv is None else argv)
    try:
        token = read_operator_token(own.operator_token_file)
        secret_file = read_superexec_secret(own.superexec_secret_file)
        control_from = parse_networks(own.control_from, "--control-from")
    except ValueError as exc:
        sys.exit(f"locked_superlink.py: {exc}")

    import flwr
    from flwr.supercore.version import package_version

    if not package_version.startswith(FLOWER_SERIES):
        sys.exit(f"locked_superlink.py: built for Flower {FLOWER_SERIES}x, found {package_version} "
                 f"({flwr.__file__}); check the Control API lock against that version first")

    import importlib

    import uvicorn
    from flwr.superlink.main import create_app

    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")

    if any(a == "--isolation" or a.startswith(("--isolation=", "--superexec-auth-secret-file")) for a in flower_args):
        sys.exit("locked_superlink.py: do not pass --isolation or --superexec-auth-secret-file; the launcher "
                 "sets both (--superexec-secret-file)")
    if bad_env := _unlocking_environment(os.environ):
        sys.exit("locked_superlink.py: refusing to start: " + "; ".join(bad_env))
    sys.argv = ["flower-superlink", *flower_args, "--isolation", "process",
                "--superexec-auth-secret-file", str(secret_file)]
    config = fs._parse_superlink_lifespan_config()  # Flower's own argument checks
    if bad := _check_flower_config(config):
        sys.exit("locked_superlink.py: refusing to start: " + "; ".join(bad))
    config = dataclasses.replace(config, authn_plugin=operator_token_plugin(token))

    from logging import INFO, WARN

    from flwr.supercore import log
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler

    nets = ", ".join(str(n) for n in (*LOOPBACK, *control_from))
    log(INFO, "Starting Flower SuperLink (locked): Fleet API for any peer on %s:%s; Control API for %s "
        "with the operator token; Runtime API for loopback only", config.host, config.port, nets)
    app = PeerFilter(create_app(config, fs.SuperLinkLifespan), control_from,
                     log=lambda msg: log(WARN, "PeerFilter: %s", msg))
    superexec = _start_superexec(fs, config, secret_file)
    log(INFO, "Started Flower SuperExec (pid %s) with the SuperExec secret", superexec.pid)
    uvicorn.run(app=app, host=config.host, port=config.port, reload=False, access_log=True,
                log_config=get_uvicorn_log_config(console_handler.level), ssl_keyfile=config.ssl_keyfile,
                ssl_certfile=config.ssl_certfile, workers=1, proxy_headers=False)


if __name__ == "__main__":
    main()
