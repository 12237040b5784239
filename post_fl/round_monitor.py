"""What ``post-fl federate`` shows of each round: one printed line and one row of ``rounds.csv``.

Everything is read from what the round left behind, the server's checkpoint (the global prompt and the
round's metrics) and the simulated users' privacy ledgers, so the in-process engine and Flower's Simulation
Engine report the same way (the hook runs in the process of the server's round loop either way).

Per round: users sampled, trained (replied with an update), refused (over their budget), failed and
rejected; the L2 norm of the aggregated (mean) update; the validation accuracy of the student with the
global prompt; the epsilon spent so far per user (largest and median over all users, from their own
ledgers; 0 for a user not yet sampled) and, under DP-FedAvg, the user-level epsilon against the world and
against the server. Row 0 is the initial prompt.

The validation accuracy is harness monitoring outside DP (:data:`VALIDATION_NOTE`): a deployed server holds
no labelled private data and could not compute it; here it is displayed and written, and selects nothing.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from .core.config import RunConfig
from .core.data import TextDataset
from .core.deep_prompt import DeepPrompt, new_prompt
from .core.models import ScoringModel
from .core.prompt import SoftPrompt

ROUNDS_CSV = "rounds.csv"
COLUMNS = ("round", "users_sampled", "users_trained", "users_refused", "users_failed", "users_rejected",
           "mean_update_norm", "validation_accuracy", "epsilon_max", "epsilon_median",
           "user_epsilon_against_world", "user_epsilon_against_server", "seconds")
VALIDATION_NOTE = ("validation_accuracy (rounds.csv, the round lines, the plot) is harness monitoring of the "
                   "simulation, outside DP: the student with each round's global prompt scored on the labelled "
                   "private validation split, which a deployed server does not hold; it is only displayed and "
                   "selects nothing (the prompt of the last round is the one transferred)")


def epsilon_so_far(ledger_dir: Path, users: int, accountant: str, private: bool) -> tuple[float, float]:
    """(largest, median) example-level epsilon over all ``users`` from their ledgers in ``ledger_dir`` (0 for a
    user without entries); (inf, inf) without DP."""
    if not private:
        return math.inf, math.inf
    from .privacy.ledger import read_ledgers

    spent = read_ledgers(ledger_dir, accountant)
    eps = [float(spent.get(c, {}).get("epsilon", 0.0)) for c in range(users)]
    return max(eps), statistics.median(eps)


class RoundMonitor:
    """The ``after_round`` hook of ``post-fl federate``: prints a line and rewrites ``rounds.csv`` per round.

    ``student`` and ``validation`` score the global prompt (``validation`` may be None: no validation
    split); ``checkpoint_path`` and ``ledger_dir`` are the server's; ``emit`` prints a line.
    """

    def __init__(self, run_cfg: RunConfig, fed_cfg, student: ScoringModel, validation: TextDataset | None,
                 checkpoint_path: Path, ledger_dir: Path, run_dir: Path,
                 emit: Callable[[str], None] = print) -> None:
        self.cfg, self.fed, self.student, self.validation = run_cfg, fed_cfg, student, validation
        self.checkpoint_path, self.ledger_dir = Path(checkpoint_path), Path(ledger_dir)
        self.csv_path = Path(run_dir) / ROUNDS_CSV
        self.emit = emit
        self.rows: list[dict] = []
        self._start: SoftPrompt | DeepPrompt | None = None
        self._clock = time.perf_counter()

    def prompt_module(self, weight) -> SoftPrompt | DeepPrompt:
        """``weight`` as the server's prompt module (a deep prompt in the starting prompt's units)."""
        if self._start is None:
            self._start = new_prompt(self.student, self.cfg.prompt, self.cfg.seed)
        w = torch.as_tensor(weight, dtype=torch.float32)
        device = getattr(self.student, "device", None)  # where the student computes, when it says
        w = w.to(device) if device is not None else w
        return self._start.with_weight(w) if isinstance(self._start, DeepPrompt) else SoftPrompt(w)

    def validation_accuracy(self, weight) -> float:
        """Accuracy of the student with prompt ``weight`` on the validation split (nan without one)."""
        if self.validation is None or not len(self.validation):
            return math.nan
        from .method.evaluate import accuracy

        return accuracy(self.student, self.validation, self.prompt_module(weight), self.cfg.eval.batch_size)

    def start(self, completed_round: int) -> None:
        """Keep the rows of rounds 0..``completed_round`` (a resumed run) and score the initial prompt (row 0)."""
        self.rows = [r for r in read_rounds(self.csv_path) if int(r["round"]) <= completed_round]
        if not any(int(r["round"]) == 0 for r in self.rows):
            initial = new_prompt(self.student, self.cfg.prompt, self.cfg.seed).weight.detach()
            self.rows.insert(0, {"round": 0, "validation_accuracy": self.validation_accuracy(initial),
                                 "epsilon_max": 0.0, "epsilon_median": 0.0})
        self._write()
        self.emit(f"round 0 (initial prompt): validation accuracy {self.rows[0]['validation_accuracy']:.3f}"
                  if completed_round == 0 else f"resuming after round {completed_round} of {self.fed.rounds} "
                  "(the checkpoint of the last completed round)")
        self._clock = time.perf_counter()

    def __call__(self, rnd: int) -> None:
        from .federated.checkpoint import read_checkpoint

        state, prompt = read_checkpoint(self.checkpoint_path)
        m = next(r for r in reversed(state["metrics"]) if int(r["round"]) == rnd)
        eps_max, eps_median = epsilon_so_far(self.ledger_dir, self.fed.num_clients, self.cfg.tune.accountant,
                                             self.cfg.tune.private)
        row = {"round": rnd, "users_sampled": m["sampled"], "users_trained": m["valid"] + len(m["rejected"]),
               "users_refused": len(m["refused"]), "users_failed": len(m["failed"]),
               "users_rejected": len(m["rejected"]), "mean_update_norm": float(m["update_norm"]),
               "validation_accuracy": self.validation_accuracy(prompt),
               "epsilon_max": eps_max, "epsilon_median": eps_median,
               "user_epsilon_against_world": m.get("user_epsilon_against_world", ""),
               "user_epsilon_against_server": m.get("user_epsilon_against_server", ""),
               "seconds": round(time.perf_counter() - self._clock, 1)}
        self._clock = time.perf_counter()
        self.rows = [r for r in self.rows if int(r["round"]) != rnd] + [row]
        self._write()
        self.emit(round_line(row, self.fed.rounds, self.cfg.insecure_reproducible))

    def _write(self) -> None:
        tmp = self.csv_path.with_suffix(".tmp")
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: r.get(k, "") for k in COLUMNS})
        tmp.replace(self.csv_path)


def read_rounds(path: Path) -> list[dict]:
    """The rows of a ``rounds.csv`` (counts as int, other numbers as float, empty cells as ""); [] when absent."""
    if not Path(path).is_file():
        return []
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    def value(key: str, text: str):
        if text in ("", None):
            return ""
        return int(float(text)) if key == "round" or key.startswith("users_") else float(text)

    return [{k: value(k, v) for k, v in r.items()} for r in rows]


def round_line(row: dict, rounds: int, insecure: bool = False) -> str:
    """The printed line of one round (see the module docstring)."""
    extra = "".join(f", {row[k]} {k.split('_')[1]}" for k in ("users_failed", "users_rejected") if row.get(k))
    val = row["validation_accuracy"]
    eps = ("no DP" if math.isinf(row["epsilon_max"]) else
           f"max {row['epsilon_max']:.3g}, median {row['epsilon_median']:.3g}")
    user = ""
    if row.get("user_epsilon_against_world") not in ("", None):
        user = (f"; user-level ε {float(row['user_epsilon_against_world']):.3g} against the world, "
                f"{float(row['user_epsilon_against_server']):.3g} against the server")
    return (f"round {row['round']}/{rounds}: {row['users_trained']} users trained, {row['users_refused']} refused"
            f"{extra}; mean update norm {row['mean_update_norm']:.3g}; validation accuracy "
            + ("n/a" if math.isnan(val) else f"{val:.3f}") + f"; ε per user so far {eps}{user} ({row['seconds']:.0f} s)"
            + (" [NOT PRIVATE: insecure_reproducible]" if insecure else ""))
