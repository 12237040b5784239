"""Scaling of a post-fl Flower simulation: wall time and peak memory for 10, 100, 1000 virtual clients.

    python -m simulation.scaling --clients 10 100 1000 --out runs/scaling

Each size runs in a fresh process (``python -m simulation.run``, Ray backend) while this
script samples the resident memory of that process and all its descendants (Ray's raylet,
GCS and worker processes) every 0.2 s; "peak RSS" is the largest such sum. The model is
the tests' tiny masked LM (``--model tiny``, no download) or the embedded all-MiniLM-L6-v2
(``--model embedded``). Every size samples the same number of clients per round, so the
numbers show what the *population* costs: the hello/model handshake with every node, the
data split, the per-node state, and the per-worker student.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(cmd: list[str], env: dict, log_path: Path) -> tuple[float, int, int]:
    """Run ``cmd``; return (wall seconds, peak RSS of its process tree in bytes, exit code)."""
    peak = 0
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss(proc.pid))
                time.sleep(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        done.set()
        th.join()
        return time.perf_counter() - t0, peak, rc


def prepare_tiny(root: Path, n_train: int) -> dict:
    """Tiny teacher + student and generated data (the test suite's builders)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tiny_model, make_sentiment

    from post_fl.core.config import DistillConfig
    from post_fl.core.data import TextDataset, write_text_file
    from post_fl.method.distill import distill_student
    from post_fl.method.student_cache import save_student
    from post_fl.core.models import load_scoring_model

    words = {"positive": ["good"], "negative": ["bad"]}
    if not (root / "student" / "model.safetensors").is_file():
        build_tiny_model("masked", root / "teacher")
        write_text_file(make_sentiment(n_train, seed=1), root / "train.csv")
        write_text_file(make_sentiment(200, seed=2), root / "test.csv")
        pub = make_sentiment(200, seed=3)
        write_text_file(TextDataset(pub.texts, [], []), root / "public.jsonl")
        teacher = load_scoring_model(str(root / "teacher"), ["negative", "positive"], words)
        student, rep = distill_student(teacher, pub, DistillConfig(num_layers=2, steps=20, batch_size=16))
        save_student(student, root / "student", rep)
    return {"model.teacher": str(root / "teacher"), "model.student": str(root / "student"),
            "data.train": str(root / "train.csv"), "data.test": str(root / "test.csv"),
            "data.public": str(root / "public.jsonl"), "model.label_words.positive": "good",
            "model.label_words.negative": "bad", "prompt.num_virtual_tokens": 8, "transfer.steps": 20}


def main(argv: list[str] | None = None) -> None:
    """Command line: time and measure peak memory of simulations with each client count given."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    ap.add_argument("--train-examples", type=int, default=4000)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default="runs/scaling")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny":
        base = prepare_tiny(out / "assets", args.train_examples)
    else:
        base = {"data.max_train_examples": args.train_examples, "data.max_test_examples": 200,
                "data.max_public_examples": 200, "distill.steps": 20, "transfer.steps": 20}
        base["model.student"] = str(out / "assets-embedded" / "student")
    base.update({"tune.epochs": 1.0, "tune.batch_size": 16, "tune.delta": 1e-4, "seed": 0})
    rows = []
    for n in args.clients:
        run_dir = out / f"clients-{n}"
        flat = {**base, "output_dir": str(run_dir), "federated.num_clients": n, "federated.rounds": args.rounds,
                "federated.fraction_train": min(1.0, args.per_round / n), "federated.min_clients": 2,
                "federated.resume": False, "federated.client_cache_dir": str(out / "client-cache")}
        if args.model == "embedded" and not Path(base["model.student"]).exists():
            flat["model.student"] = ""  # the first size distils it into its run folder
        cfg_path = out / f"clients-{n}.json"
        cfg_path.write_text(json.dumps(flat))
        cmd = [sys.executable, "-c",
               "import json,sys; from simulation.run import simulate; "
               f"simulate(json.load(open({str(cfg_path)!r})), {n}, {args.num_cpus})"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        wall, peak, rc = measure(cmd, env, out / f"clients-{n}.log")
        res_path = run_dir / "results.json"
        res = json.loads(res_path.read_text()) if res_path.is_file() else {}
        if args.model == "embedded" and (run_dir / "student").exists():
            base["model.student"] = str(run_dir / "student")
        row = {"clients": n, "sampled_per_round": min(n, args.per_round), "rounds": args.rounds,
               "model": args.model, "wall_s": round(wall, 1), "peak_rss_mib": round(peak / 2**20),
               "exit_code": rc, "final_student_acc": res.get("accuracy", {}).get("student_federated_prompt"),
               "max_client_epsilon": res.get("privacy", {}).get("sample_level", {}).get("max_epsilon")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "scaling.json").write_text(json.dumps(rows, indent=2))
    print("\n| clients | sampled/round | rounds | model | wall (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['sampled_per_round']} | {r['rounds']} | {r['model']} | {r['wall_s']} | "
              f"{r['peak_rss_mib']} |")


if __name__ == "__main__":
    main()
