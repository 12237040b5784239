"""Client-batched simulation against single-site DP-SGD and Flower's Simulation Engine (not a test).

    python benchmarks/bench_batched.py [--clients 10 100 1000] [--flower-clients 10 100] [--n 40]
                                       [--epochs 1.0] [--out runs/bench_batched] [--json out.json]

One federated round in which K clients each hold n examples and each runs ``tune.epochs`` of
DP-SGD (batch 16, Poisson sampling, clip 1, sigma calibrated for epsilon = 8 over the round),
timed four ways, each in a fresh process (so peak memory is that measurement's own):

* ``batched``: :func:`post_fl.federated.batched.train_clients_batched`, all K clients in shared passes;
* ``single``: one single-site DP-SGD run (``tune_prompt``) of the same epochs over the same K*n
  examples (the cost of training on the pooled data once);
* ``fed-batched``: a whole federated round (sampling all K clients, local training, update
  validation, aggregation, evaluation, checkpoint) through ``run_federated`` with
  :class:`post_fl.federated.transports.BatchedTransport`;
* ``flower``: the same round on Flower's Simulation Engine (Ray backend, ``--num-cpus``
  workers, the real ServerApp and ClientApp).

Round time = from the server's client sampling of round 1 to the end of its checkpoint (hooks
in the measuring process); ``single``/``batched`` time the training loop alone (tokenization and
noise calibration excluded on both sides). Peak RSS is sampled every 0.2 s over the process and
all its children (Ray's workers included). The student is MiniLM's default student
(``model.teacher = "embedded"``, ``distill.num_layers = 0`` = a fifth of its 6 layers = 1 layer),
distilled for ``--distill-steps`` steps (its quality does not change the timings). Clients'
examples are the embedded task's training texts, reused cyclically when K*n exceeds them.
``--epochs`` below 1 shortens the round for both sides alike (a third of an epoch = one DP-SGD
step per client at n = 40); ``--single-steps S`` times only S steps of the single-site run (same
sample rate and batch) and scales the time to all its steps. The machine may be shared: read the
ratios, taken back to back within one run. Writes ``<out>/bench_batched.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH_SIZE, TARGET_EPSILON, VIRTUAL_TOKENS = 16, 8.0, 10


# ---------------------------------------------------------------- assets (main process)
def prepare_assets(out: Path, distill_steps: int) -> dict:
    """The MiniLM teacher's default student (distilled for a few steps) and the training texts, once."""
    spec_path = out / "assets" / "spec.json"
    if spec_path.is_file():
        return json.loads(spec_path.read_text())
    from post_fl.core.config import DistillConfig
    from post_fl.method.distill import distill_student
    from post_fl.method.student_cache import save_student
    from post_fl.core.embedded import load_embedded_task
    from post_fl.core.models import load_scoring_model

    task = load_embedded_task(0)
    teacher = load_scoring_model("embedded", task.train.label_names, dict(task.label_words))
    public = task.public.head(400) if hasattr(task.public, "head") else task.public
    cfg = DistillConfig(steps=distill_steps, eval_every=max(1, distill_steps), time_budget_s=300, cache=False)
    student, report = distill_student(teacher, public, cfg, 0)
    save_student(student, out / "assets" / "student", report)
    (out / "assets" / "train.json").write_text(json.dumps({"texts": list(task.train.texts),
                                                           "labels": [int(y) for y in task.train.labels]}))
    spec = {"student": str(out / "assets" / "student"), "label_names": list(teacher.label_names),
            "label_words": teacher.label_words, "head": teacher.head, "template": teacher.template,
            "max_length": teacher.max_length, "student_layers": int(student.backbone.config.num_hidden_layers),
            "train_examples": len(task.train), "distill_steps": distill_steps}
    spec_path.write_text(json.dumps(spec))
    return spec


# ---------------------------------------------------------------- measured children
def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Peak resident memory of this process (MiB) while a block runs, sampled every 20 ms."""

    def __enter__(self) -> "RssSampler":
        import threading

        import psutil

        proc = psutil.Process()
        self.start_mib = proc.memory_info().rss / 2**20
        self.peak_mib = self.start_mib
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak_mib = max(self.peak_mib, proc.memory_info().rss / 2**20)
                time.sleep(0.02)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _client_data(spec: dict, k: int, n: int) -> dict:
    from post_fl.core.data import TextDataset

    pool = json.loads((Path(spec["student"]).parent / "train.json").read_text())
    texts, labels, total = pool["texts"], pool["labels"], len(pool["texts"])
    return {c: TextDataset([texts[(c * n + i) % total] for i in range(n)],
                           [labels[(c * n + i) % total] for i in range(n)], spec["label_names"]) for c in range(k)}


def _student(spec: dict):
    from post_fl.core.models import load_scoring_model

    return load_scoring_model(spec["student"], spec["label_names"], spec["label_words"], spec["head"],
                              spec["template"], spec["max_length"])


def child_engine(spec: dict, k: int, n: int, epochs: float, mode: str, single_steps: int = 0) -> dict:
    """``batched``: K clients in shared passes; ``single``: one DP-SGD run over the pooled K*n examples.

    ``single_steps`` > 0 runs only that many of the single-site run's steps (same sample rate, same
    expected batch) and scales the time to all its steps (a DP-SGD step over Poisson batches of a
    shuffled pool costs the same throughout the epoch); the row says so (``extrapolated_from_steps``).
    """
    import torch

    from post_fl.federated.batched import train_clients_batched
    from post_fl.core.config import TuneConfig
    from post_fl.core.data import TextDataset
    from post_fl.core.prompt import SoftPrompt, init_from_vocab
    from post_fl.privacy.accounting import calibrate_noise_multiplier, planned_steps
    from post_fl.method.tuning import tune_prompt

    torch.manual_seed(0)
    student = _student(spec)
    cfg = TuneConfig(epochs=epochs, batch_size=BATCH_SIZE, target_epsilon=TARGET_EPSILON)
    p0 = init_from_vocab(student.word_embeddings, VIRTUAL_TOKENS, torch.Generator().manual_seed(0)).weight.detach()
    data = _client_data(spec, k, n)
    sigma = float(calibrate_noise_multiplier(cfg, n, planned_steps(cfg, n)))  # every client's; timing only
    pooled = None
    if mode == "single":
        pooled = TextDataset([t for d in data.values() for t in d.texts],
                             [y for d in data.values() for y in d.labels], spec["label_names"])
    t0 = time.perf_counter()
    with RssSampler() as mem:
        if mode == "batched":
            r = train_clients_batched(student, p0, data, cfg, noise_multipliers={c: sigma for c in data})
            loop, extra = r.seconds, {"rows": r.examples_processed, "micro_batches": r.micro_batches,
                                      "client_state_mib": round(r.client_state_bytes / 2**20, 2),
                                      "tokenized_data_mib": round(r.data_bytes / 2**20, 2),
                                      "max_client_epsilon": max(c.epsilon for c in r.clients.values())}
        else:
            full = planned_steps(cfg, len(pooled))
            run_cfg = cfg
            if 0 < single_steps < full:  # same q (batch / N), fewer steps
                run_cfg = TuneConfig(epochs=single_steps * BATCH_SIZE / len(pooled), batch_size=BATCH_SIZE,
                                     target_epsilon=TARGET_EPSILON)
            r = tune_prompt(student, SoftPrompt(p0), pooled, run_cfg, noise_multiplier=sigma)
            loop, extra = r.seconds * full / r.steps, {"steps": full, "measured_steps": r.steps,
                                                      "sample_rate": r.sample_rate}
            if r.steps < full:
                extra["extrapolated_from_steps"] = r.steps
    return {"mode": mode, "clients": k, "n": n, "loop_s": loop, "wall_s": time.perf_counter() - t0,
            "rss_start_mib": round(mem.start_mib), "rss_peak_training_mib": round(mem.peak_mib),
            "rss_growth_training_mib": round(mem.peak_mib - mem.start_mib), **extra}


def _fed_flat(spec: dict, out: Path, k: int, n: int, epochs: float) -> dict:
    return {"model.teacher": "embedded", "model.student": spec["student"], "seed": 0,
            "output_dir": str(out), "data.max_train_examples": k * n, "data.max_test_examples": 50,
            "data.max_public_examples": 50, "transfer.steps": 2, "transfer.batch_size": 8,
            "prompt.num_virtual_tokens": VIRTUAL_TOKENS, "tune.epochs": epochs, "tune.batch_size": BATCH_SIZE,
            "tune.target_epsilon": TARGET_EPSILON, "federated.num_clients": k, "federated.rounds": 1,
            "federated.fraction_train": 1.0, "federated.min_clients": 1, "federated.resume": False,
            "federated.client_cache_dir": str(out / "client-cache")}


def _round_clock(times_path: Path):
    """Hooks that stamp round starts (the server's client sampling) and ends (after the checkpoint)."""
    from post_fl import federated as fl

    stamps: dict = {"start": {}, "end": {}}
    original = fl.FederatedServer.sample

    def sample(self, server_round, client_ids):
        stamps["start"][server_round] = time.perf_counter()
        return original(self, server_round, client_ids)

    def after_round(server_round):
        stamps["end"][server_round] = time.perf_counter()
        times_path.write_text(json.dumps(stamps))

    fl.FederatedServer.sample = sample
    return stamps, after_round


def child_federated(spec: dict, k: int, n: int, epochs: float, mode: str, out: Path, num_cpus: int) -> dict:
    """One round through run_federated: ``fed-batched`` (BatchedTransport) or ``flower`` (Ray simulation)."""
    import shutil

    run_dir = out / f"{mode}-{k}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh federation: its clients' privacy ledgers start empty
    flat = _fed_flat(spec, run_dir, k, n, epochs)
    times_path = out / f"{mode}-{k}.times.json"
    stamps, after_round = _round_clock(times_path)
    t0 = time.perf_counter()
    if mode == "fed-batched":
        from post_fl import federated as fl
        from post_fl.federated.transports import BatchedTransport

        run_cfg, fed = fl.build_configs(flat)
        server = fl.FederatedServer(run_cfg, fed)
        fl.run_federated(server, BatchedTransport(server, run_cfg, fed), after_round)
    else:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        from flwr.simulation import run_simulation

        from client_app.app import make_client_app
        from server_app.app import make_server_app

        backend = {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                   "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False,
                                 "logging_level": "error", "log_to_driver": True}}
        run_simulation(server_app=make_server_app(flat, after_round), client_app=make_client_app(flat),
                       num_supernodes=k, backend_name="ray", backend_config=backend)
        stamps = json.loads(times_path.read_text()) if times_path.is_file() else stamps
    wall = time.perf_counter() - t0
    res = json.loads((run_dir / "results.json").read_text())
    start, end = stamps["start"].get(1) or stamps["start"].get("1"), stamps["end"].get(1) or stamps["end"].get("1")
    row = res["rounds"][0]
    return {"mode": mode, "clients": k, "n": res["data"]["train"] / k, "round_s": end - start,
            "run_wall_s": wall, "valid_updates": row["valid"], "sampled": row["sampled"],
            "max_client_epsilon": res["privacy"]["sample_level"]["max_epsilon"]}


# ---------------------------------------------------------------- orchestration
def measure(args: list[str], log_path: Path) -> dict:
    """Run one child measurement in a fresh process; its JSON line plus the peak RSS of its process tree."""
    sys.path.insert(0, str(ROOT))
    from simulation.scaling import measure as measure_tree

    result_path = log_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-result", str(result_path), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    wall, peak, rc = measure_tree(cmd, env, log_path)
    if rc != 0 or not result_path.is_file():
        raise RuntimeError(f"measurement {args} failed (exit {rc}); see {log_path}")
    row = json.loads(result_path.read_text())
    row.update({"process_wall_s": round(wall, 1), "peak_tree_rss_mib": round(peak / 2**20)})
    return row


def main(argv: list[str] | None = None) -> None:
    """Command line: the client-batched benchmark (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--flower-clients", type=int, nargs="*", default=[10, 100])
    ap.add_argument("--n", type=int, default=40, help="examples per client")
    ap.add_argument("--epochs", type=float, default=1.0, help="local epochs (tune.epochs) in the round")
    ap.add_argument("--distill-steps", type=int, default=10)
    ap.add_argument("--single-steps", type=int, default=0,
                    help="time only this many steps of the single-site run and scale to its epoch (0 = all)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default="runs/bench_batched")
    ap.add_argument("--json", default="", help="write the rows and ratios here (default <out>/bench_batched.json)")
    ap.add_argument("--child-result", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = prepare_assets(out, args.distill_steps)
    if args.child:
        mode, k = args.child[0], int(args.child[1])
        if mode in ("batched", "single"):
            row = child_engine(spec, k, args.n, args.epochs, mode, args.single_steps)
        else:
            row = child_federated(spec, k, args.n, args.epochs, mode, out, args.num_cpus)
        row["process_max_rss_mib"] = round(_peak_rss_mib())
        Path(args.child_result).write_text(json.dumps(row))
        return
    common = ["--n", str(args.n), "--epochs", str(args.epochs), "--out", str(out), "--num-cpus", str(args.num_cpus),
              "--single-steps", str(args.single_steps)]
    rows, t0 = [], time.perf_counter()
    plan = [(m, k) for k in args.clients for m in ("batched", "single")]
    plan += [(m, k) for k in args.flower_clients for m in ("fed-batched", "flower")]
    for mode, k in plan:
        row = measure(["--child", mode, str(k), *common], out / f"{mode}-{k}.log")
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {(r["mode"], r["clients"]): r for r in rows}
    ratios = {}
    for k in args.clients:
        b, s = by[("batched", k)], by[("single", k)]
        ratios[f"batched_round / single_site_epoch, K={k}"] = b["loop_s"] / s["loop_s"]
    for k in args.flower_clients:
        b, f = by[("fed-batched", k)], by[("flower", k)]
        ratios[f"flower_round / batched_round, K={k}"] = f["round_s"] / b["round_s"]
        ratios[f"flower_run_wall / batched_run_wall, K={k}"] = f["run_wall_s"] / b["run_wall_s"]
    report = {"setup": {**{k: spec[k] for k in ("student_layers", "train_examples", "distill_steps", "head",
                                                 "max_length")},
                        "n": args.n, "epochs": args.epochs, "single_steps": args.single_steps, "batch_size": BATCH_SIZE,
                        "target_epsilon": TARGET_EPSILON, "virtual_tokens": VIRTUAL_TOKENS,
                        "num_cpus": args.num_cpus, "cpu_count": os.cpu_count(),
                        "load_average_at_end": os.getloadavg(), "total_s": time.perf_counter() - t0},
              "rows": rows, "ratios": ratios}
    path = Path(args.json) if args.json else out / "bench_batched.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print("\n| mode | K | n | time (s) | peak RSS, process tree (MiB) | RSS growth while training (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        t = r.get("loop_s", r.get("round_s"))
        print(f"| {r['mode']} | {r['clients']} | {r['n']:.0f} | {t:.2f} | {r['peak_tree_rss_mib']} | "
              f"{r.get('rss_growth_training_mib', '')} |")
    print()
    for name, v in ratios.items():
        print(f"{name}: {v:.2f}")
    print(f"written {path}")


if __name__ == "__main__":
    main()
