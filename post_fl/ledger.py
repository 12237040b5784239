"""A site's own privacy ledger: every DP-SGD round it ever released, across runs, on its disk.

A federated client must not trust the operator's run config to bound what it spends, nor a
per-run accountant that a new run starts from zero. The ledger is a JSON file kept by the
client, named by the sha256 of its private data (a site's data file bytes, or in simulation
the partition's texts and labels), holding one entry per released round: run fingerprint,
round, noise multiplier, sample rate, DP-SGD steps and time. The epsilon it reports is the
RDP/PRV composition of *all* entries at the given delta, so a second run on the same data
continues where the first stopped.

Writes are write-ahead and atomic: :meth:`PrivacyLedger.record` writes a temp file, fsyncs
it and renames it over the ledger *before* the client releases the update it covers, so a
crash can lose an update but never the record of its noise (a round whose noise was drawn
always counts). :meth:`PrivacyLedger.check` refuses a round whose planned steps would lift
epsilon above the site's budget (:class:`BudgetExhausted`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .data import TextDataset

LEDGER_VERSION = 1


class BudgetExhausted(RuntimeError):
    """A client refuses a round: its ledger plus this round would exceed the site's epsilon budget."""

    def __init__(self, spent: float, after: float, budget: float, delta: float) -> None:
        self.spent, self.after, self.budget, self.delta = spent, after, budget, delta
        super().__init__(f"budget-exhausted: privacy budget epsilon {budget:g} at delta {delta:.3g}; "
                         f"spent {spent:.4g}, this round would bring it to {after:.4g}")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (a deployed site's data file)."""
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

    ``budget`` is the site's epsilon limit (inf = none); ``accountant`` the Opacus accountant
    (``rdp`` or ``prv``) used to compose the entries.
    """

    path: Path
    data_hash: str
    budget: float
    accountant: str = "rdp"
    client_id: int | None = None

    @classmethod
    def open(cls, directory: str | Path, data_hash: str, budget: float, accountant: str = "rdp",
             client_id: int | None = None) -> "PrivacyLedger":
        """The ledger of the data with ``data_hash`` under ``directory`` (created on first record)."""
        if not (budget > 0):
            raise ValueError(f"privacy budget epsilon must be > 0, got {budget}")
        return cls(Path(directory) / f"{data_hash}.json", data_hash, float(budget), accountant, client_id)

    def entries(self) -> list[dict]:
        """Every recorded round, oldest first; a damaged file is an error, never an empty history."""
        if not self.path.is_file():
            return []
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.path}: privacy ledger unreadable ({exc}); refusing to train "
                             "without knowing what this data already spent") from None
        if doc.get("data_sha256") != self.data_hash or not isinstance(doc.get("entries"), list):
            raise ValueError(f"{self.path}: not the privacy ledger of data {self.data_hash[:12]}")
        return doc["entries"]

    def history(self) -> list[tuple[float, float, int]]:
        """The accountant history (noise multiplier, sample rate, steps) of every entry."""
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in self.entries()]

    def epsilon(self, delta: float, extra: list[tuple[float, float, int]] | None = None) -> float:
        """Epsilon at ``delta`` of all entries (plus ``extra`` planned ones)."""
        from .tuning import epsilon_from_history

        hist = self.history() + list(extra or [])
        if any(h[0] <= 0 and h[2] > 0 for h in hist):
            return math.inf
        return epsilon_from_history(hist, delta, self.accountant) if hist else 0.0

    def check(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Epsilon after ``steps`` more steps; raises :class:`BudgetExhausted` if it exceeds the budget."""
        spent = self.epsilon(delta)
        after = self.epsilon(delta, [(noise_multiplier, sample_rate, steps)])
        if after > self.budget * (1 + 1e-9):
            raise BudgetExhausted(spent, after, self.budget, delta)
        return after

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float, run: str,
               server_round: int) -> float:
        """Append one released round (atomically, fsynced) and return the epsilon spent after it."""
        entries = self.entries()
        entries.append({"run": run, "round": int(server_round), "noise_multiplier": float(noise_multiplier),
                        "sample_rate": float(sample_rate), "steps": int(steps), "delta": float(delta),
                        "time": time.time()})
        doc = {"version": LEDGER_VERSION, "data_sha256": self.data_hash, "client_id": self.client_id,
               "accountant": self.accountant, "budget_epsilon": self.budget, "entries": entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)
        return self.epsilon(delta)


def read_ledgers(directory: str | Path, accountant: str = "rdp") -> dict[int, dict]:
    """Per client id: epsilon, delta, rounds and steps of the ledgers in ``directory`` (simulation harness).

    The epsilon of a ledger is computed at the largest delta any of its entries used.
    """
    from .tuning import epsilon_from_history

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
                                      "steps": sum(h[2] for h in hist), "data_sha256": doc["data_sha256"],
                                      "budget_epsilon": doc.get("budget_epsilon")}
    return out
