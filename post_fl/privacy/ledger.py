"""A site's own privacy ledger: every DP-SGD round it ever released, across runs, on its disk.

A federated client must not trust the operator's run config to bound what it spends, nor a
per-run accountant that a new run starts from zero. The ledger is a JSON file kept by the
client, named by its dataset *key*: on a deployed site the site-chosen dataset name (node config
``dataset-name``), so re-exporting the same data to a new file does not start a fresh budget; in
simulation the sha256 of the partition's texts and labels. It holds one entry per released round:
run, round, noise multiplier, sample rate, DP-SGD steps, delta and time. The epsilon it reports
is the RDP/PRV composition of *all* entries at the given delta, so a second run on the same data
continues where the first stopped.

Concurrency: every read-check-write happens under an exclusive ``fcntl.flock`` on a sidecar lock
file (``.<ledger>.lock``), so concurrent runs on one site (threads or processes) never lose a record
and never both pass a budget check that only one of them fits: :meth:`PrivacyLedger.spend` checks
the budget and appends the round in one locked step. Writes are atomic (a temp file, fsynced,
renamed over the ledger) and write-ahead: :meth:`spend` records a round *before* its noise is drawn
and before the update it covers is released, so a crash can lose an update, or charge a round that
never trained, but never loses the record of released noise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.data import TextDataset

LEDGER_VERSION = 2
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a site-chosen dataset name: a safe file stem


class BudgetExhausted(RuntimeError):
    """A client refuses a round: its ledger plus this round would exceed the site's epsilon budget.

    The message (spent, after, budget, delta) stays in the site's own log; a reply to the server
    carries only the fixed code ``refused: budget`` (:data:`post_fl.federated.protocol.BUDGET_EXHAUSTED`)."""

    def __init__(self, spent: float, after: float, budget: float, delta: float) -> None:
        self.spent, self.after, self.budget, self.delta = spent, after, budget, delta
        super().__init__(f"budget-exhausted: privacy budget epsilon {budget:g} at delta {delta:.3g}; "
                         f"spent {spent:.4g}, this round would bring it to {after:.4g}")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_sha256(data: TextDataset) -> str:
    """sha256 over a dataset's texts, labels and label names (a simulated client's partition)."""
    payload = json.dumps([list(data.texts), [int(y) for y in data.labels], list(data.label_names)],
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def default_site_ledger_dir() -> Path:
    """Where a deployed site keeps its ledgers when its node config names none (``$XDG_DATA_HOME``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "post_fl" / "privacy-ledgers"


@dataclass
class PrivacyLedger:
    """The persistent DP-SGD history of one dataset (see the module docstring).

    ``key`` names the dataset (a site's ``dataset-name``, or a simulated partition's sha256);
    ``budget`` is the site's epsilon limit (inf = none); ``accountant`` the Opacus accountant
    (``rdp`` or ``prv``) used to compose the entries.
    """

    path: Path
    key: str
    budget: float
    accountant: str = "rdp"
    client_id: int | None = None

    @classmethod
    def open(cls, directory: str | Path, key: str, budget: float, accountant: str = "rdp",
             client_id: int | None = None) -> "PrivacyLedger":
        """The ledger of the dataset ``key`` under ``directory`` (created on first record)."""
        if not (budget > 0):
            raise ValueError(f"privacy budget epsilon must be > 0, got {budget}")
        if not DATASET_NAME.fullmatch(str(key)):
            raise ValueError(f"privacy ledger key {key!r}: expected 1-128 letters, digits, '.', '_' or '-' "
                             "(not starting with '.', '_' or '-')")
        return cls(Path(directory) / f"{key}.json", str(key), float(budget), accountant, client_id)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.lock")

    @contextlib.contextmanager
    def locked(self):
        """Hold the ledger's exclusive lock (``fcntl.flock`` on the sidecar lock file) for a read-check-write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def entries(self) -> list[dict]:
        """Every recorded round, oldest first; a damaged file is an error, never an empty history.

        Reading needs no lock: writers replace the file atomically, so a reader sees a whole old
        or a whole new ledger. Decisions that depend on the content (:meth:`spend`) hold the lock."""
        if not self.path.is_file():
            return []
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.path}: privacy ledger unreadable ({exc}); refusing to train "
                             "without knowing what this data already spent") from None
        key = doc.get("dataset", doc.get("data_sha256"))  # data_sha256: ledgers of version 1
        if key != self.key or not isinstance(doc.get("entries"), list):
            raise ValueError(f"{self.path}: not the privacy ledger of dataset {self.key[:40]}")
        return doc["entries"]

    def history(self) -> list[tuple[float, float, int]]:
        """The accountant history (noise multiplier, sample rate, steps) of every entry."""
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in self.entries()]

    def _epsilon_of(self, hist: list[tuple[float, float, int]], delta: float) -> float:
        from .accounting import epsilon_from_history

        if any(h[0] <= 0 and h[2] > 0 for h in hist):
            return math.inf
        return epsilon_from_history(hist, delta, self.accountant) if hist else 0.0

    def epsilon(self, delta: float, extra: list[tuple[float, float, int]] | None = None) -> float:
        """Epsilon at ``delta`` of all entries (plus ``extra`` planned ones)."""
        return self._epsilon_of(self.history() + list(extra or []), delta)

    def check(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Epsilon after ``steps`` more steps; raises :class:`BudgetExhausted` if it exceeds the budget.

        A look only: nothing is recorded, and another process may spend in between. A round that
        will release anything goes through :meth:`spend`."""
        hist = self.history()
        return self._judge(hist, (noise_multiplier, sample_rate, steps), delta)

    def _judge(self, hist: list, planned: tuple[float, float, int], delta: float) -> float:
        after = self._epsilon_of(hist + [planned], delta)
        if after > self.budget * (1 + 1e-9):
            raise BudgetExhausted(self._epsilon_of(hist, delta), after, self.budget, delta)
        return after

    def _entry(self, noise_multiplier, sample_rate, steps, delta, run, server_round) -> dict:
        return {"run": run, "round": int(server_round), "noise_multiplier": float(noise_multiplier),
                "sample_rate": float(sample_rate), "steps": int(steps), "delta": float(delta), "time": time.time()}

    def _write(self, entries: list[dict]) -> None:
        """Replace the ledger with ``entries`` atomically (temp file, fsync, rename); caller holds the lock."""
        doc = {"version": LEDGER_VERSION, "dataset": self.key, "client_id": self.client_id,
               "accountant": self.accountant, "budget_epsilon": self.budget, "entries": entries}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def spend(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float, run: str,
              server_round: int) -> float:
        """Check the budget and record one round in one locked step; return the epsilon after it.

        Raises :class:`BudgetExhausted` (recording nothing) when the round would lift epsilon above the
        budget. Called *before* the round's noise is drawn (write-ahead), so no two concurrent runs can
        both pass the check with room for one."""
        with self.locked():
            entries = self.entries()
            hist = [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]
            after = self._judge(hist, (noise_multiplier, sample_rate, steps), delta)
            self._write(entries + [self._entry(noise_multiplier, sample_rate, steps, delta, run, server_round)])
        return after

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float, run: str,
               server_round: int) -> float:
        """Append one round without a budget check (locked, atomic, fsynced); return the epsilon after it."""
        with self.locked():
            entries = self.entries()
            entries.append(self._entry(noise_multiplier, sample_rate, steps, delta, run, server_round))
            self._write(entries)
        return self.epsilon(delta)


def read_ledgers(directory: str | Path, accountant: str = "rdp") -> dict[int, dict]:
    """Per client id: epsilon, delta, rounds and steps of the ledgers in ``directory`` (simulation harness).

    The epsilon of a ledger is computed at the largest delta any of its entries used.
    """
    from .accounting import epsilon_from_history

    out: dict[int, dict] = {}
    d = Path(directory)
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        doc = json.loads(p.read_text())
        entries = doc.get("entries", [])
        if doc.get("client_id") is None or not entries:
            continue
        delta = max(float(e["delta"]) for e in entries)
        hist = [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]
        eps = math.inf if any(h[0] <= 0 for h in hist) else epsilon_from_history(hist, delta, accountant)
        out[int(doc["client_id"])] = {"epsilon": eps, "delta": delta, "rounds": len(entries),
                                      "steps": sum(h[2] for h in hist),
                                      "dataset": doc.get("dataset", doc.get("data_sha256")),
                                      "budget_epsilon": doc.get("budget_epsilon")}
    return out
