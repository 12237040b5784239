"""Cross-organisation deployment on Flower's Deployment Engine (Flower 1.41), for real.

One federation is brought up once for this module with the scripts in ``deploy/``:
a locked SuperLink (``deploy/locked_superlink.py``: TLS, ``--enable-supernode-auth``, Control
API only with the operator token), site keys registered by the operator with ``flwr supernode
register``, three SuperNodes (each its own key, Runtime API port and CSV file passed as node
config ``data-path``), a fourth site whose CSV is malformed, and outsiders who hold the public
CA certificate but not the operator token: one tries to register its own SuperNode key and to
submit a run (no token, then a guessed token), one SuperNode whose key was never registered
and one speaking plain text to the TLS SuperLink. The operator's ``flwr run`` (over TLS, with a
Flower config in a temporary FLWR_HOME) then runs 2 rounds of post-fl with a tiny model. The
slow tests check that one federation: the run completes with the three good sites; every
outsider is refused and left no node and no run behind; the malformed site is left out: the
operator sees only the fixed code ``site input invalid``, the site's own log names its file and
the problem. Every process is started in its own process group on
127.0.0.1 with free ports, logs go to files under the test's temporary folder (printed when an
assertion fails), and teardown stops only those processes and their descendants.

The fast tests check the lock's parts without a federation: the peer filter refuses the
Control and Runtime APIs to non-loopback peers (the slow tests cannot, being loopback only),
the token plugin, the token file checks, and the launcher's refusal of unlocked settings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import make_sentiment, write_tiny_task

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
SITE_SIZES = (24, 32, 40)  # distinct, so a site's update shows which file it trained on
ROUNDS = 2
RUN_TIMEOUT = 300  # seconds for `flwr run --stream` (2 rounds, tiny model; ~2-3 min on 2 busy cores)
FRESH_SITE = os.environ.get("POST_FL_DEPLOY_FRESH_SITE") == "1"
SITE_BUDGET = 16.0  # each site's own epsilon limit (node config), above the run's target of 8
GUESSED_TOKEN = "x" * 43  # an outsider's guess: right length and alphabet, wrong value


def _load_locked_superlink():
    """deploy/locked_superlink.py as a module (deploy/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("locked_superlink", DEPLOY / "locked_superlink.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "FLWR_HOME": str(tmp / "flwr-home-default"),
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "PYTHON": sys.executable})
    return env


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


@dataclass
class Federation:
    root: Path
    env: dict
    procs: list[Proc] = field(default_factory=list)
    run_rc: int | None = None
    run_log: Path | None = None
    results: dict | None = None
    site_files: dict[int, Path] = field(default_factory=dict)
    num_clients: int = 0
    outsider: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)
    acquire_task: tuple[int, str] | None = None  # (HTTP status, body) of a task claim without the secret
    operator_runs: list | None = None
    operator_nodes: list | None = None

    def start(self, name: str, cmd: list[str], **env: str) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "wb")
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**self.env, **env}, cwd=self.root,
                             start_new_session=True)  # own process group: stopped as a group at the end
        fh.close()
        proc = Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def logs(self, tail: int = 60) -> str:
        """The last lines of every process's log (shown with failed assertions)."""
        out = []
        for log in sorted((self.root / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            out.append(f"----- {log.name} (last {tail} of {len(lines)} lines) -----")
            out.extend(lines[-tail:])
        return "\n".join(out)

    def wait_for(self, what: str, predicate, timeout: float, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def watch(self) -> None:
        """Remember every descendant of the started processes (SuperExec and app processes run in
        their own sessions and can outlive their parent), so teardown can stop exactly those."""
        import threading

        import psutil

        self._seen: dict[int, float] = {}
        self._stop_watch = threading.Event()

        def loop() -> None:
            while not self._stop_watch.wait(1.0):
                self._record(psutil)

        self._watcher = threading.Thread(target=loop, daemon=True)
        self._watcher.start()

    def _record(self, psutil) -> None:
        for p in list(self.procs):
            try:
                parent = psutil.Process(p.popen.pid)
                for q in [parent, *parent.children(recursive=True)]:
                    self._seen.setdefault(q.pid, q.create_time())
            except psutil.Error:
                pass

    def stop_all(self) -> None:
        """Stop the processes this module started and their descendants; nothing else."""
        import psutil

        if hasattr(self, "_stop_watch"):
            self._stop_watch.set()
            self._watcher.join(timeout=5)
        self._record(psutil)
        tree = []
        for pid, created in getattr(self, "_seen", {}).items():
            try:
                q = psutil.Process(pid)
                if q.create_time() == created:  # the same process, not a reused pid
                    tree.append(q)
            except psutil.Error:
                pass
        for p in reversed(self.procs):  # nodes before the SuperLink; each is its own process group
            if p.popen.poll() is None:
                try:
                    os.killpg(p.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        _, alive = psutil.wait_procs(tree, timeout=15)
        for q in alive:  # still running after SIGTERM to their group (e.g. in a session of their own)
            try:
                q.terminate() if q.status() != psutil.STATUS_ZOMBIE else None
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=5)
        for q in alive:
            try:
                q.kill()
            except psutil.Error:
                pass
        for p in self.procs:
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=5)


def _make_assets(root: Path) -> dict[str, Path]:
    """Tiny masked-LM teacher, a distilled 2-layer student and the server-side files (train.csv only
    fixes the label set; each site trains on its own file)."""
    a = write_tiny_task(root / "assets", 48, seed=11)
    return {name: a / file for name, file in [("teacher", "teacher"), ("student", "student"), ("train", "train.csv"),
                                              ("test", "test.csv"), ("public", "public.jsonl")]}


def _run(fed: Federation, cmd: list[str], name: str, timeout: float) -> subprocess.CompletedProcess:
    log = fed.root / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=fed.env, cwd=fed.root,
                             timeout=timeout, text=True)
    except subprocess.TimeoutExpired as exc:
        log.write_text(exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
        raise AssertionError(f"{name} timed out after {timeout}s\n{fed.logs()}") from None
    log.write_text(res.stdout)
    return res


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    if shutil.which("openssl") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs openssl and ssh-keygen")
    root = tmp_path_factory.mktemp("deploy")
    fed = Federation(root, _env(root))
    fed.watch()
    try:
        _bring_up_and_run(fed)
        yield fed
    finally:
        fed.stop_all()


def _bring_up_and_run(fed: Federation) -> None:
    root = fed.root
    sites = [*range(len(SITE_SIZES)), 3]  # site 3: a malformed file
    fed.num_clients = len(sites)
    certs = root / "certs"
    names = [f"site{i}" for i in sites] + ["intruder"]
    res = _run(fed, ["bash", str(DEPLOY / "make_certs.sh"), str(certs), "localhost", "127.0.0.1",
                     "--nodes", ",".join(names)], "make_certs", 60)
    assert res.returncode == 0, res.stdout

    port = _free_port()
    address = f"127.0.0.1:{port}"
    link = fed.start("superlink", ["bash", str(DEPLOY / "start_superlink.sh"), str(certs), str(root / "superlink"),
                                   "--host", "127.0.0.1", "--port", str(port)])

    # while the SuperLink starts: the model, the server's files and each site's private file
    assets = _make_assets(root)
    labelled = make_sentiment(max(SITE_SIZES), seed=30)
    from post_fl.core.data import TextDataset, write_text_file

    for i, n in enumerate(SITE_SIZES):
        part = TextDataset(labelled.texts[:n], labelled.labels[:n], labelled.label_names)
        fed.site_files[i] = write_text_file(part.shuffled(i), root / f"site{i}" / "private.csv")
    bad = root / "site3" / "private.csv"
    bad.parent.mkdir(parents=True)
    bad.write_text("text,comment\nthe movie was good,x\nthe film was bad,y\n")  # no label column
    fed.site_files[3] = bad

    # Each site has its own temp dir, hence its own student cache (post_fl caches the student in
    # tempfile.gettempdir() when federated.client_cache_dir is empty). The sites already hold the
    # student, as after an earlier run, which saves one whole message stage: every ClientApp call
    # is a fresh process in Flower 1.41 (seconds of imports each on 2 cores). With
    # POST_FL_DEPLOY_FRESH_SITE=1 site 0 starts empty and receives the student over the TLS link.
    from post_fl import federated as F
    from post_fl.federated import shipping
    from post_fl.core.models import load_scoring_model

    student = load_scoring_model(str(assets["student"]), ["negative", "positive"],
                                 {"positive": ["good"], "negative": ["bad"]}, "auto", "", 48)
    package = F.pack_student(assets["student"], student)
    for i in sites:
        (root / f"site{i}" / "tmp").mkdir(parents=True, exist_ok=True)
        if not (FRESH_SITE and i == 0):
            shipping._STUDENTS.pop(package.model_hash, None)  # install_student skips the disk when loaded
            F.install_student(package, root / f"site{i}" / "tmp" / "post_fl_students")
    shipping._STUDENTS.pop(package.model_hash, None)

    fed.wait_for("the SuperLink to listen", lambda: link.popen.poll() is not None or "Uvicorn running on" in link.text(),
                 60)
    assert link.popen.poll() is None, f"SuperLink exited\n{fed.logs()}"

    token = root / "superlink" / "operator.token"
    assert token.is_file() and token.stat().st_mode & 0o077 == 0, f"no private operator token\n{fed.logs()}"
    res = _run(fed, ["bash", str(DEPLOY / "register_supernode.sh"), str(root / "flwr-home"), address,
                     str(certs / "ca.crt"), "--token", str(token),
                     *[str(certs / "nodes" / f"site{i}.pub") for i in sites]],
               "register", 120)
    assert res.returncode == 0 and res.stdout.count("registered successfully") == len(sites), \
        f"{res.stdout}\n{fed.logs()}"
    _outsiders_try_to_register_and_run(fed, address, certs)

    for i in sites:
        fed.start(f"supernode-site{i}", [
            "bash", str(DEPLOY / "start_supernode.sh"), "--superlink", address, "--ca", str(certs / "ca.crt"),
            "--key", str(certs / "nodes" / f"site{i}"), "--partition-id", str(i),
            "--num-partitions", str(len(sites)), "--data", str(fed.site_files[i]), "--dataset-name", f"site{i}",
            "--labels", "negative,positive",
            "--budget", str(SITE_BUDGET), "--ledger", str(root / f"site{i}" / "ledger"),
            "--port", str(_free_port()), "--state", str(root / f"site{i}" / "state"), "--max-wait", "60"],
            TMPDIR=str(root / f"site{i}" / "tmp"))
    # intruder 1: a well-formed key the SuperLink operator never registered
    fed.start("intruder-unregistered", [
        "bash", str(DEPLOY / "start_supernode.sh"), "--superlink", address, "--ca", str(certs / "ca.crt"),
        "--key", str(certs / "nodes" / "intruder"), "--partition-id", "0", "--num-partitions", str(len(sites)),
        "--data", str(fed.site_files[0]), "--dataset-name", "site0", "--labels", "negative,positive",
        "--budget", str(SITE_BUDGET), "--ledger", str(root / "intruder1" / "ledger"),
        "--port", str(_free_port()), "--state", str(root / "intruder1"),
        "--max-wait", "30", "--", "--max-retries", "2"])
    # intruder 2: no TLS, no key (plain flower-supernode --insecure against the TLS SuperLink)
    fed.start("intruder-plaintext", [
        str(BIN / "flower-supernode"), "--insecure", "--superlink", address,
        "--node-config", f"partition-id=0 num-partitions={len(sites)}", "--port", str(_free_port()),
        "--max-retries", "1", "--max-wait-time", "30"])

    def activated() -> int:
        return len(set(re.findall(r"\[Fleet\.ActivateNode\] Activated node_id=(\d+)", link.text())))

    fed.wait_for(f"{len(sites)} SuperNodes to connect", lambda: activated() >= len(sites), 120)

    out = root / "out"
    a = assets
    overrides = " ".join([
        f'model.teacher="{a["teacher"]}"', f'model.student="{a["student"]}"', f'data.train="{a["train"]}"',
        f'data.test="{a["test"]}"', f'data.public="{a["public"]}"', 'model.label_words="positive:good;negative:bad"',
        f'output_dir="{out}"', "prompt.num_virtual_tokens=4", "tune.epochs=1.0", "tune.batch_size=16",
        "transfer.steps=4", "transfer.batch_size=8", f"federated.rounds={ROUNDS}",
        f"federated.num_clients={len(sites)}", "federated.fraction_train=1.0", "federated.min_clients=2",
        "federated.timeout=150.0"])
    fed.run_log = root / "logs" / "flwr-run.log"
    res = _run(fed, ["bash", str(DEPLOY / "run_federation.sh"), str(root / "flwr-home"), address,
                     str(certs / "ca.crt"), "--token", str(token), "-c", overrides], "flwr-run", RUN_TIMEOUT)
    fed.run_rc = res.returncode
    if (out / "results.json").is_file():
        fed.results = json.loads((out / "results.json").read_text())
    # what the SuperLink holds afterwards, as the operator sees it
    op_env = {**fed.env, "FLWR_HOME": str(root / "flwr-home")}
    for what, cmd in [("runs", ["ls"]), ("nodes", ["supernode", "ls"])]:
        res = subprocess.run([str(BIN / "flwr"), *cmd, "post-fl", "--format", "json"], env=op_env, cwd=root,
                             capture_output=True, text=True, timeout=60)
        (root / "logs" / f"operator-{what}.log").write_text(res.stdout + res.stderr)
        listing = _json_in(res.stdout)
        if what == "runs":
            fed.operator_runs = listing.get("runs") if listing else None
        else:
            fed.operator_nodes = listing.get("nodes") if listing else None


def _json_in(text: str) -> dict | None:
    """The first JSON object printed in ``text`` (the CLI may print a banner before it)."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except json.JSONDecodeError:
        return None


def _stage_app(dest: Path) -> Path:
    """A copy of the Flower app's sources (what deploy/run_federation.sh submits)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    for d in ("post_fl", "server_app", "client_app"):
        shutil.copytree(REPO / d, dest / d, ignore=ignore)
    return dest


def _outsiders_try_to_register_and_run(fed: Federation, address: str, certs: Path) -> None:
    """Someone holding the public CA certificate (and the SuperLink's address) but not the
    operator token tries the Control API: register the intruder's key, then submit a run.
    Once with no credentials, once with a guessed token stored where the CLI sends it."""
    root = fed.root
    guess = root / "guessed.token"
    guess.write_text(GUESSED_TOKEN + "\n")
    guess.chmod(0o600)
    app = _stage_app(root / "outsider-app")
    for who, token_args in [("outsider", []), ("guesser", [str(guess)])]:
        home = root / f"{who}-cli"
        res = _run(fed, ["bash", str(DEPLOY / "flwr_config.sh"), str(home), "post-fl", address,
                         str(certs / "ca.crt"), *token_args], f"{who}-config", 60)
        assert res.returncode == 0, res.stdout
        env = {**fed.env, "FLWR_HOME": str(home)}
        for action, cmd in [("register", ["supernode", "register", str(certs / "nodes" / "intruder.pub"), "post-fl"]),
                            ("run", ["run", str(app), "post-fl", "--run-config", "federated.rounds=1"])]:
            log = root / "logs" / f"{who}-{action}.log"
            res = subprocess.run([str(BIN / "flwr"), *cmd], env=env, cwd=root, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=120)
            log.write_text(res.stdout)
            fed.outsider[f"{who}-{action}"] = res
    fed.acquire_task = _claim_serverapp_task(address, certs / "ca.crt")


def _claim_serverapp_task(address: str, ca: Path) -> tuple[int, str]:
    """A process on the SuperLink machine, without the SuperExec secret, asks the Runtime API
    for a pending ServerApp task (in Flower's default subprocess isolation it would get one and
    its token). Returns the HTTP status and body."""
    import ssl
    import urllib.error
    import urllib.request

    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    body = AcquireTaskRequest(supported_task_types=["flwr-serverapp", "flwr-simulation"]).SerializeToString()
    req = urllib.request.Request(f"https://{address}/v1/runtime/acquire-task", data=body, method="POST",
                                 headers={"Content-Type": "application/protobuf"})
    try:
        with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(ca)), timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.mark.slow
def test_tls_federation_of_three_sites_runs_two_rounds(federation):
    from post_fl.privacy.ledger import read_ledgers

    fed = federation
    assert fed.run_rc == 0, fed.logs()
    assert fed.results is not None, f"no results.json\n{fed.logs()}"
    r = fed.results
    good = len(SITE_SIZES)
    assert [row["round"] for row in r["rounds"]] == list(range(1, ROUNDS + 1)), fed.logs()
    for row in r["rounds"]:  # the malformed site 3 was left out at hello (see its own test)
        assert row["sampled"] == good and row["valid"] == good, (row, fed.logs())
        assert not row["rejected"] and not row["failed"] and not row["refused"], row
    assert r["data"]["clients"] == fed.num_clients
    assert set(r["accuracy"]) >= {"student_federated_prompt", "teacher_transferred_prompt", "teacher_zero_shot"}
    assert all(0.0 <= v <= 1.0 for v in r["accuracy"].values())
    sample = r["privacy"]["sample_level"]
    assert sample["epsilon_per_client"] == {}  # a deployed site's epsilon stays with the site
    assert sample["rounds_per_client"] == {str(i): list(range(1, ROUNDS + 1)) for i in range(good)}, sample
    # each site accounted its rounds in its own ledger, keyed by its own dataset name (so it trained
    # on its file, not on a share of data.train), within the run's target and its budget
    for i in range(good):
        ledgers = read_ledgers(fed.root / f"site{i}" / "ledger")
        assert list(ledgers) == [i], (i, ledgers)
        led = ledgers[i]
        assert led["dataset"] == f"site{i}", led
        assert led["rounds"] == ROUNDS and led["budget_epsilon"] == SITE_BUDGET, led
        assert 0 < led["epsilon"] <= 8.0 + 1e-6, led
    # the student crossed the TLS link only to a site that lacked it
    assert ("Receiving: query.model" in fed.proc("supernode-site0").text()) == FRESH_SITE, fed.logs()
    assert "Receiving: query.model" not in fed.proc("supernode-site1").text(), fed.logs()
    # everything went over TLS: the SuperLink served HTTPS only, the CLI used the CA
    link = fed.proc("superlink").text()
    assert re.search(r"Uvicorn running on https://127\.0\.0\.1:\d+", link), fed.logs()
    assert "SuperNode authentication is disabled" not in link


@pytest.mark.slow
def test_unregistered_and_plaintext_supernodes_are_refused(federation):
    fed = federation
    unreg, plain = fed.proc("intruder-unregistered"), fed.proc("intruder-plaintext")
    for p in (unreg, plain):
        fed.wait_for(f"{p.name} to give up", lambda: p.popen.poll() is not None, 60)
    assert unreg.popen.returncode not in (0, None), fed.logs()
    assert "Failed to activate SuperNode" in unreg.text(), fed.logs()
    assert "No SuperNode found with the given public key" in fed.proc("superlink").text(), fed.logs()
    assert plain.popen.returncode not in (0, None), fed.logs()
    assert "Failed to initialize the connection to the SuperLink" in plain.text(), fed.logs()
    # only the registered sites ever got a node id, and the run still completed with them
    link = fed.proc("superlink").text()
    assert len(set(re.findall(r"Activated node_id=(\d+)", link))) == fed.num_clients, fed.logs()
    assert fed.run_rc == 0 and fed.results is not None, fed.logs()
    assert all(row["valid"] == len(SITE_SIZES) for row in fed.results["rounds"]), fed.logs()


@pytest.mark.slow
def test_malformed_site_data_fails_that_site_with_a_clear_message(federation):
    fed = federation
    bad = fed.site_files[3]
    assert fed.run_rc == 0 and fed.results is not None, fed.logs()
    # the site checks its file before any round; the operator learns only the fixed code (issue 22)
    run_log = fed.run_log.read_text(errors="replace")
    why = [line for line in run_log.splitlines() if "did not answer hello" in line]
    assert len(why) == 1 and why[0].rstrip().endswith("site input invalid"), (why, fed.logs())
    assert str(bad) not in run_log and "missing column" not in run_log and "comment" not in run_log, fed.logs()
    for row in fed.results["rounds"]:
        assert "3" not in row["failed"] and row["valid"] == len(SITE_SIZES), row
    assert "3" not in fed.results["privacy"]["sample_level"]["rounds_per_client"]
    assert not list((fed.root / "site3" / "ledger").glob("*.json"))  # it never trained
    node_log = fed.proc("supernode-site3").text()  # the whole reason, on the site only
    assert str(bad) in node_log and "missing column 'label'" in node_log, fed.logs()


@pytest.mark.slow
def test_outsiders_cannot_register_a_supernode(federation):
    """Holding the CA certificate is not enough: `flwr supernode register` without the operator
    token (or with a guessed one) is refused by the Control API and creates no node."""
    fed = federation
    link = fed.proc("superlink").text()
    for who in ("outsider", "guesser"):
        res = fed.outsider[f"{who}-register"]
        assert res.returncode != 0 and "registered successfully" not in res.stdout, (who, res.stdout, fed.logs())
        assert "Authentication failed" in res.stdout, (who, res.stdout)
    assert len(re.findall(r'"POST /v1/control/register-node HTTP/1\.1" 401', link)) >= 2, fed.logs()
    assert "Created node_id" in link  # the operator's registrations went through the same API
    assert fed.operator_nodes is not None, fed.logs()
    assert len(fed.operator_nodes) == fed.num_clients, (fed.operator_nodes, fed.logs())
    # and the intruder's key, which the outsiders tried to register, cannot connect
    assert "No SuperNode found with the given public key" in link, fed.logs()


@pytest.mark.slow
def test_outsiders_cannot_submit_a_run_and_the_operators_run_completes(federation):
    """`flwr run` without the operator token (or with a guessed one) is refused; the only run
    on the SuperLink is the operator's, and it finished."""
    fed = federation
    link = fed.proc("superlink").text()
    for who in ("outsider", "guesser"):
        res = fed.outsider[f"{who}-run"]
        assert res.returncode != 0, (who, res.stdout, fed.logs())
        assert "Authentication failed" in res.stdout, (who, res.stdout)
    assert len(re.findall(r'"POST /v1/control/start-run HTTP/1\.1" 401', link)) >= 2, fed.logs()
    assert fed.run_rc == 0 and fed.results is not None, fed.logs()
    assert fed.operator_runs is not None, fed.logs()
    assert len(fed.operator_runs) == 1, (fed.operator_runs, fed.logs())
    assert fed.operator_runs[0]["status"].startswith("finished"), fed.operator_runs


# ----------------------------------------------------------------- the lock's parts, no federation

def _asgi_call(app, path: str, peer: str) -> int:
    """Send one HTTP request for ``path`` from ``peer`` through ``app``; return the status code
    (200 when the request reached the wrapped app)."""
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "client": (peer, 50000), "headers": []}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


async def _reached(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("peer", ["203.0.113.7", "192.168.1.20", "::ffff:203.0.113.7", "2001:db8::1", "10.0.0.1"])
def test_peer_filter_serves_only_the_fleet_api_to_non_loopback_peers(peer):
    ls = _load_locked_superlink()
    refusals = []
    app = ls.PeerFilter(_reached, log=refusals.append)
    for path in ("/v1/fleet/activate-node", "/v1/fleet/pull-messages", "/health"):
        assert _asgi_call(app, path, peer) == 200, path
    for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/acquire-task",
                 "/v1/runtime/pull-messages", "/docs", "/openapi.json", "/v1/fleetX", "/",
                 "/v1/fleet/../control/start-run", "/v1/fleet//../control/register-node", "/v1/fleet/./x",
                 "/v1/fleet/.."):
        assert _asgi_call(app, path, peer) == 403, path
    assert len(refusals) == 12 and all(peer in r for r in refusals)


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.1"])
def test_peer_filter_lets_loopback_reach_every_api(peer):
    ls = _load_locked_superlink()
    app = ls.PeerFilter(_reached)
    for path in ("/v1/fleet/pull-messages", "/v1/control/start-run", "/v1/runtime/acquire-task"):
        assert _asgi_call(app, path, peer) == 200, path


def test_peer_filter_control_from_opens_only_the_control_api():
    ls = _load_locked_superlink()
    app = ls.PeerFilter(_reached, ls.parse_networks(["203.0.113.0/24"], "--control-from"))
    assert _asgi_call(app, "/v1/control/start-run", "203.0.113.7") == 200
    assert _asgi_call(app, "/v1/runtime/acquire-task", "203.0.113.7") == 403  # Runtime stays loopback-only
    assert _asgi_call(app, "/v1/control/start-run", "198.51.100.1") == 403
    with pytest.raises(ValueError, match="--control-from: 'nonsense'"):
        ls.parse_networks(["10.0.0.0/8,nonsense"], "--control-from")


def test_operator_token_plugin_accepts_only_the_operator_token():
    from flwr.common.constant import ACCESS_TOKEN_KEY, REFRESH_TOKEN_KEY
    from flwr.supercore.error import FlowerError

    ls = _load_locked_superlink()
    token = "t0k" * 15
    plugin = ls.operator_token_plugin(token)
    ok, account = plugin.validate_tokens_in_metadata([(ACCESS_TOKEN_KEY, token)])
    assert ok and account is not None
    assert plugin.validate_tokens_in_metadata([(ACCESS_TOKEN_KEY, token.encode())])[0]
    for metadata in ([], [(ACCESS_TOKEN_KEY, token[:-1])], [(ACCESS_TOKEN_KEY, token + "x")],
                     [(REFRESH_TOKEN_KEY, token)], [(ACCESS_TOKEN_KEY, token), (ACCESS_TOKEN_KEY, token)],
                     [(ACCESS_TOKEN_KEY, GUESSED_TOKEN)]):
        assert plugin.validate_tokens_in_metadata(metadata) == (False, None), metadata
    for call in (plugin.get_login_details, lambda: plugin.get_auth_tokens("code"),
                 lambda: plugin.refresh_tokens([(REFRESH_TOKEN_KEY, token)])):
        with pytest.raises(FlowerError):
            call()  # nobody obtains or refreshes a token from the SuperLink
    with pytest.raises(ValueError, match="at least 32"):
        ls.operator_token_plugin("short")


def test_operator_token_file_must_be_private_and_long(tmp_path):
    ls = _load_locked_superlink()
    f = tmp_path / "operator.token"
    f.write_text("a" * 40 + "\n")
    f.chmod(0o600)
    assert ls.read_operator_token(f) == "a" * 40
    f.chmod(0o644)
    with pytest.raises(ls.OperatorTokenError, match="chmod 600"):
        ls.read_operator_token(f)
    f.chmod(0o600)
    f.write_text("short\n")
    with pytest.raises(ls.OperatorTokenError, match="at least 32"):
        ls.read_operator_token(f)
    with pytest.raises(ls.OperatorTokenError, match="missing.token"):
        ls.read_operator_token(tmp_path / "missing.token")


def test_superexec_secret_file_must_be_private_and_long(tmp_path):
    ls = _load_locked_superlink()
    f = tmp_path / "superexec.secret"
    f.write_bytes(os.urandom(32))
    f.chmod(0o600)
    assert ls.read_superexec_secret(f) == f
    f.chmod(0o640)
    with pytest.raises(ls.OperatorTokenError, match="mode 600"):
        ls.read_superexec_secret(f)
    f.chmod(0o600)
    f.write_bytes(b"short")
    with pytest.raises(ls.OperatorTokenError, match="at least 32"):
        ls.read_superexec_secret(f)


def test_launcher_refuses_an_unlocked_superlink(tmp_path, monkeypatch):
    ls = _load_locked_superlink()
    f = tmp_path / "operator.token"
    f.write_text("a" * 40)
    f.chmod(0o600)
    secret = tmp_path / "superexec.secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    own = ["--operator-token-file", str(f), "--superexec-secret-file", str(secret)]
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() hands Flower's parser its own argv
    with pytest.raises(SystemExit) as exc:
        ls.main([*own, "--", "--insecure"])
    msg = str(exc.value.code)
    for reason in ("TLS is off", "SuperNode authentication is off", "runtime dependency installation is on"):
        assert reason in msg, msg
    with pytest.raises(SystemExit) as exc:  # back to Flower's subprocess isolation, where task hand-out is open
        ls.main([*own, "--", "--isolation", "subprocess"])
    assert "do not pass --isolation" in str(exc.value.code)
    for var in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API", "FLWR_OIDC_ENABLED"):
        with monkeypatch.context() as m:  # each would open a path around the locks
            m.setenv(var, "1")
            with pytest.raises(SystemExit) as exc:
                ls.main([*own, "--", "--enable-supernode-auth"])
            assert var in str(exc.value.code)


def test_scripts_refuse_flags_that_undo_the_lock(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    for f in ("ca.crt", "server.crt", "server.key"):
        (certs / f).write_text("x")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for extra in (["--", "--insecure"], ["--", "--allow-runtime-dependency-installation"], ["--no-node-auth"],
                  ["--", "--host", "0.0.0.0"]):
        res = subprocess.run(["bash", str(DEPLOY / "start_superlink.sh"), str(certs), str(tmp_path / "s"), *extra],
                             capture_output=True, text=True, env=env, timeout=30)
        assert res.returncode == 2 and "start_superlink.sh:" in res.stderr, (extra, res.stderr)
    node = ["bash", str(DEPLOY / "start_supernode.sh"), "--superlink", "127.0.0.1:1", "--ca", str(certs / "ca.crt"),
            "--key", str(certs / "server.key"), "--partition-id", "0", "--num-partitions", "2", "--data", "d.csv",
            "--dataset-name", "d", "--labels", "a,b", "--budget", "4"]
    for extra in ("--insecure", "--allow-runtime-dependency-installation", "--host"):
        res = subprocess.run([*node, "--", extra], capture_output=True, text=True, env=env, timeout=30)
        assert res.returncode == 2 and f"'{extra}' is not allowed" in res.stderr, (extra, res.stderr)
    for bad, why in ((["--dataset-name", "../other"], "--dataset-name must be"), (["--labels", "a',b"], "quotes")):
        res = subprocess.run([*node, *bad], capture_output=True, text=True, env=env, timeout=30)
        assert res.returncode == 2 and why in res.stderr, (bad, res.stderr)
    res = subprocess.run([a for a in node if a not in ("--labels", "a,b")], capture_output=True, text=True, env=env,
                         timeout=30)
    assert res.returncode == 2 and "missing" in res.stderr and "LABELS" in res.stderr, res.stderr


@pytest.mark.slow
def test_only_the_superlinks_own_superexec_can_claim_serverapp_tasks(federation):
    """The Runtime API's task hand-out needs the SuperExec secret: a loopback process without it
    is refused, while the launcher's SuperExec (holding it) ran the operator's ServerApp."""
    fed = federation
    assert fed.acquire_task is not None
    status, body = fed.acquire_task
    assert status == 401 and "Authentication failed" in body, fed.acquire_task
    link = fed.proc("superlink").text()
    assert "SuperExec authentication failed for /flwr.proto.Runtime/AcquireTask" in link, fed.logs()
    assert "Started Flower SuperExec" in link and "with the SuperExec secret" in link, fed.logs()
    assert fed.run_rc == 0 and fed.results is not None, fed.logs()
