"""Mutation check of post-fl's privacy mechanisms: break each one on purpose and show a test catches it.

Each mutation is a source patch (exact text replacements) applied to a temporary copy of the repository
(the files git tracks or would track; never this checkout), after which the tests named for it are run
there with this venv's Python. A mutation is *caught* when those tests fail. The unpatched copy must
pass the same tests first, or the report says so and stops.

    .venv/bin/python benchmarks/privacy_mutations.py              # every mutation (about 8 min on 2 cores)
    .venv/bin/python benchmarks/privacy_mutations.py --list       # names only
    .venv/bin/python benchmarks/privacy_mutations.py --only world-eps-q --only ledger-lock

The list holds the mechanisms named in ``tests/test_dp_mechanisms.py`` and ``tests/test_batched.py``,
the server's user-level report, the wiring of RAPT's eta and of fresh noise, and the protections of a
site (replies, site settings, delta, ledger). Exit status 0 when every mutation is caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    patches: tuple[tuple[str, str], ...]  # (exact old text, new text), each old text must occur exactly once
    tests: tuple[str, ...]


FP, DP, SITE = "tests/test_fed_privacy.py", "tests/test_dp_mechanisms.py", "tests/test_site_privacy.py"

MUTATIONS = [
    # ------------------------------------------------------------ reports and wiring
    Mutation("world-eps-q", "user-level epsilon computed with q/10 instead of q (the server's report)",
             "post_fl/federated/privacy_report.py",
             (("return user_level_epsilon(sigma, fed.fraction_train, rounds, fed.resolved_user_delta)",
               "return user_level_epsilon(sigma, fed.fraction_train / 10, rounds, fed.resolved_user_delta)"),),
             (f"{FP}::test_user_level_epsilon_is_reported_against_the_world_and_against_the_server",)),
    Mutation("rapt-eta-batch", "RAPT eta x1000 at the sweep wiring (privatize_batch)", "post_fl/experiments/rapt_cells.py",
             (("ids = privatize_token_ids(batch.input_ids, model.word_embeddings, eta, generator,",
               "ids = privatize_token_ids(batch.input_ids, model.word_embeddings, eta * 1000, generator,"),),
             ("tests/test_sweep.py::test_a_rapt_client_privatises_its_tokens_at_the_rows_eta",)),
    Mutation("rapt-eta-client", "RAPT eta x1000 at the sweep wiring (the RAPT client)", "post_fl/experiments/rapt_cells.py",
             (("private[cid] = privatize_client_data(model, data, eta, label_epsilon,",
               "private[cid] = privatize_client_data(model, data, eta * 1000, label_epsilon,"),),
             ("tests/test_sweep.py::test_a_rapt_client_privatises_its_tokens_at_the_rows_eta",)),
    Mutation("server-noise-seed", "server DP-FedAvg noise seeded from the config seed outside insecure mode",
             "post_fl/federated/server.py",
             (("rng = dp_numpy_rng(self.cfg.seed if self.insecure else None, server_round, 3)",
               "rng = dp_numpy_rng(self.cfg.seed, server_round, 3)"),),
             (f"{FP}::test_dp_fedavg_server_noise_is_fresh_outside_insecure_mode",)),
    Mutation("share-seed", "distributed-DP noise shares seeded from the config seed", "post_fl/federated/client.py",
             (("fed_cfg.min_clients, dp_numpy_rng(insecure, 5))", "fed_cfg.min_clients, dp_numpy_rng(run_cfg.seed, 5))"),),
             (f"{FP}::test_distributed_noise_shares_are_fresh_per_client_call",)),
    # ------------------------------------------------------------ the mechanisms
    Mutation("dpsgd-clip", "DP-SGD clip bound 1e6 x what the accountant assumes", "post_fl/method/tuning.py",
             (("max_grad_norm=cfg.max_grad_norm, poisson_sampling=True",
               "max_grad_norm=cfg.max_grad_norm * 1e6, poisson_sampling=True"),),
             (f"{DP}::test_dp_sgd_clips_each_example_and_adds_noise_of_std_sigma_c",)),
    Mutation("dpsgd-noise", "DP-SGD noise a tenth of the charged multiplier", "post_fl/method/tuning.py",
             (("data_loader=loader, noise_multiplier=sigma,", "data_loader=loader, noise_multiplier=sigma * 0.1,"),),
             (f"{DP}::test_dp_sgd_clips_each_example_and_adds_noise_of_std_sigma_c",)),
    Mutation("fedavg-noise", "DP-FedAvg noise removed", "post_fl/privacy/user_dp.py",
             (("noise = rng.normal(0.0, noise_multiplier * clip_norm, size=np.shape(update_sum))",
               "noise = rng.normal(0.0, 0.0 * noise_multiplier * clip_norm, size=np.shape(update_sum))"),),
             (f"{DP}::test_dp_fedavg_on_large_updates_releases_clipped_mean_plus_noise_sigma_c_over_qn",
              f"{FP}::test_dp_fedavg_clips_on_the_server_and_adds_noise_of_std_sigma_c_over_qn")),
    Mutation("fedavg-clip", "DP-FedAvg clipping removed", "post_fl/privacy/user_dp.py",
             (("scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0", "scale = 1.0"),),
             (f"{DP}::test_dp_fedavg_on_large_updates_releases_clipped_mean_plus_noise_sigma_c_over_qn",
              f"{FP}::test_dp_fedavg_clips_on_the_server_and_adds_noise_of_std_sigma_c_over_qn")),
    Mutation("user-eps-q", "user_level_epsilon with q/10 (user_dp)", "post_fl/privacy/user_dp.py",
             (("acc.history = [(float(noise_multiplier), float(sample_rate), int(rounds))]",
               "acc.history = [(float(noise_multiplier), float(sample_rate) / 10, int(rounds))]"),),
             (f"{DP}::test_user_level_epsilon_matches_an_independent_rdp_computation",)),
    Mutation("share-variance", "distributed share std sigma C / m instead of / sqrt(m)", "post_fl/privacy/user_dp.py",
             (("std = noise_multiplier * clip_norm / math.sqrt(int(num_shares_min))",
               "std = noise_multiplier * clip_norm / int(num_shares_min)"),),
             (f"{DP}::test_noise_shares_have_variance_sigma2_c2_over_m_and_sum_to_sigma2_c2",)),
    Mutation("share-dropped", "client adds no distributed-DP share", "post_fl/federated/client.py",
             (("delta_prompt = (delta_prompt.astype(np.float64) + share).astype(np.float32)",
               "delta_prompt = (delta_prompt.astype(np.float64) + 0 * share).astype(np.float32)"),),
             (f"{FP}::test_secagg_with_user_dp_aggregate_carries_the_clients_noise",)),
    Mutation("fresh-seed", "every privacy generator seeded with a constant", "post_fl/privacy/randomness.py",
             (("return int.from_bytes(os.urandom((bits + 7) // 8), \"big\") & ((1 << bits) - 1)", "return 12345"),),
             (f"{DP}::test_dp_fedavg_noise_is_fresh_and_seeds_are_refused",)),
    Mutation("poisson-seed", "server's user-DP client sample seeded from the config seed", "post_fl/federated/server.py",
             (("rng = dp_numpy_rng(self.cfg.seed if self.insecure else None, server_round, 1)",
               "rng = dp_numpy_rng(self.cfg.seed, server_round, 1)"),),
             (f"{FP}::test_server_poisson_client_sample_is_fresh_outside_insecure_mode",)),
    Mutation("rapt-eta", "RAPT eta x1000 in rapt.py", "post_fl/privacy/rapt.py",
             (("noise = sample_dchi_noise(n, dim, eta, generator,", "noise = sample_dchi_noise(n, dim, eta * 1000, generator,"),),
             ("tests/test_rapt.py::test_large_eta_keeps_tokens_small_eta_changes_most",)),
    Mutation("batched-clip", "client-batched engine: per-example clipping removed", "post_fl/federated/batched.py",
             (("grads = clip_per_example(grads, cfg.max_grad_norm)", "grads = grads"),),
             ("tests/test_batched.py::test_clipping_changes_the_update_and_matches_tune_prompt",)),
    Mutation("batched-noise", "client-batched engine: per-client noise removed", "post_fl/federated/batched.py",
             (("noise = gaussian_noise(p.sigma * cfg.max_grad_norm, shape, p.noise_generator)",
               "noise = 0 * gaussian_noise(p.sigma * cfg.max_grad_norm, shape, p.noise_generator)"),),
             ("tests/test_batched.py::test_insecure_mode_batched_equals_tune_prompt_per_client",
              "tests/test_batched.py::test_noise_is_added_removing_it_changes_the_update")),
    Mutation("update-clip", "a client's update is not clipped", "post_fl/federated/client.py",
             (("    if clip > 0 and math.isfinite(clip):\n        from ..privacy.user_dp import clip_update",
               "    if False:\n        from ..privacy.user_dp import clip_update"),),
             (f"{FP}::test_train_client_update_is_clipped",)),
    # ------------------------------------------------------------ a site's protections
    Mutation("against-server-q", "epsilon against the server credits the server's sampling",
             "post_fl/federated/privacy_report.py",
             (("return user_level_epsilon_of_history([(s, 1.0, n) for s, n in sorted(per_sigma.items())],",
               "return user_level_epsilon_of_history([(s, fed.fraction_train, n) for s, n in sorted(per_sigma.items())],"),),
             (f"{FP}::test_user_level_epsilon_is_reported_against_the_world_and_against_the_server",)),
    Mutation("against-server-short", "short SecAgg rounds charged at full sigma against the server",
             "post_fl/federated/privacy_report.py",
             (("s = effective_noise_multiplier(sigma, k, fed.min_clients)", "s = sigma"),),
             (f"{FP}::test_user_level_epsilon_is_reported_against_the_world_and_against_the_server",)),
    Mutation("target-world", "user-level target calibrated against the world by default", "post_fl/federated/config.py",
             (("rate = 1.0 if fed_cfg.user_epsilon_against == \"server\" else fed_cfg.fraction_train",
               "rate = fed_cfg.fraction_train"),),
             (f"{FP}::test_user_dp_target_is_met_against_the_server_by_default",)),
    Mutation("ledger-no-check", "the ledger records without checking the budget", "post_fl/privacy/ledger.py",
             (("        if after > self.budget * (1 + 1e-9):\n            raise BudgetExhausted",
               "        if False:\n            raise BudgetExhausted"),),
             (f"{FP}::test_repeated_calls_stop_before_the_budget_is_exceeded",
              f"{SITE}::test_concurrent_spends_never_pass_the_budget")),
    Mutation("ledger-lock", "the ledger's file lock removed", "post_fl/privacy/ledger.py",
             (("            fcntl.flock(fd, fcntl.LOCK_EX)\n", "            pass\n"),),
             (f"{SITE}::test_concurrent_records_are_all_kept", f"{SITE}::test_concurrent_spends_never_pass_the_budget")),
    Mutation("ledger-not-written", "train_client checks the budget but records nothing", "post_fl/federated/client.py",
             (("epsilon = ledger.spend(sigma, q, steps, delta, run_id, server_round)",
               "epsilon = ledger.check(sigma, q, steps, delta)"),),
             (f"{FP}::test_repeated_calls_stop_before_the_budget_is_exceeded",)),
    Mutation("reply-guard", "an exception escapes the ClientApp (Flower replies with its message)", "client_app/app.py",
             (("        except Exception as exc:  # noqa: BLE001 - nothing may reach Flower's error reply",
               "        except ZeroDivisionError as exc:  # noqa: BLE001 - nothing may reach Flower's error reply"),),
             (f"{SITE}::test_no_reply_of_a_site_carries_its_data_under_a_hostile_run_config",)),
    Mutation("reply-reason", "a refusal reply carries the exception's message", "client_app/app.py",
             (("                return _status(message, {\"status\": code})",
               "                return _status(message, {\"status\": code, \"reason\": str(exc)})"),),
             (f"{SITE}::test_no_reply_of_a_site_carries_its_data_under_a_hostile_run_config",)),
    Mutation("run-columns", "the site reads the columns the run config names", "post_fl/federated/client.py",
             (("data = read_text_file(site.data_path, site.text_column, site.label_column, label_names=label_names)",
               "data = read_text_file(site.data_path, d.text_column, d.label_column, label_names=label_names)"),
              ("    if problems:\n        raise ClientRefusal(\"; \".join(problems), REFUSED_DATA_SETTINGS)",
               "    if False:\n        raise ClientRefusal(\"; \".join(problems), REFUSED_DATA_SETTINGS)")),
             (f"{SITE}::test_no_reply_of_a_site_carries_its_data_under_a_hostile_run_config",)),
    Mutation("cache-key", "the cache key is host:pid", "post_fl/federated/shipping.py",
             (("_CACHE_KEY = secrets.token_hex(16)", "_CACHE_KEY = f\"{__import__('socket').gethostname()}:{os.getpid()}\""),),
             (f"{SITE}::test_no_reply_of_a_site_carries_its_data_under_a_hostile_run_config",)),
    Mutation("site-delta", "the site's budget judged at the run config's delta", "client_app/app.py",
             (("delta=fl.site_delta(run_cfg, node_config, len(data)))", "delta=None)"),),
             (f"{SITE}::test_the_sites_delta_is_its_own_not_the_run_configs",)),
    Mutation("ledger-by-bytes", "the ledger keyed by the data file's sha256", "post_fl/federated/client.py",
             (("key = site.dataset_name if site else", "key = file_sha256(site.data_path) if site else"),
              ("from ..privacy.ledger import PrivacyLedger, dataset_sha256\n",
               "from ..privacy.ledger import PrivacyLedger, dataset_sha256, file_sha256\n")),
             (f"{SITE}::test_re_exporting_the_same_data_does_not_reset_its_budget",)),
]


def copy_repo(dest: Path) -> None:
    """The files git tracks or would track (not ignored): sources, tests, docs; no venv, runs or caches."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, float, str]:
    """(passed, seconds, last line) of pytest on ``tests`` in the copy ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                             cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - t0, f"timed out after {timeout:.0f} s"
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    return res.returncode == 0, time.perf_counter() - t0, (lines[-1] if lines else res.stderr[-200:])


def apply(root: Path, m: Mutation) -> str:
    """Patch the copy; returns the original text of the file (to restore it)."""
    path = root / m.file
    original = path.read_text()
    text = original
    for old, new in m.patches:
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"{m.name}: expected the text to patch exactly once in {m.file}, found it {n} times:\n{old}")
        text = text.replace(old, new)
    path.write_text(text)
    return original


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], help="run only this mutation (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:22s} {m.what}")
        return 0 if args.list else 2
    with tempfile.TemporaryDirectory(prefix="post-fl-mutations-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        where = subprocess.run([sys.executable, "-c", "import post_fl, client_app; print(post_fl.__file__)"],
                               cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)
        if not where.stdout.strip().startswith(str(root)):
            raise SystemExit(f"the copy's post_fl is not the one imported there: {where.stdout or where.stderr}")
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        for m in chosen:  # every patch applies (before any time is spent on tests)
            (root / m.file).write_text(apply(root, m))
        ok, secs, last = run_tests(root, tests, args.timeout * 2)
        print(f"baseline (no mutation): {len(tests)} tests {'pass' if ok else 'FAIL'} ({secs:.0f} s): {last}")
        if not ok:
            print("the unmutated copy must pass its tests first; nothing else was run")
            return 2
        caught = 0
        print(f"{'mutation':22s} {'result':7s} {'s':>4s}  what / the tests' last line")
        for m in chosen:
            original = apply(root, m)
            try:
                passed, secs, last = run_tests(root, m.tests, args.timeout)
            finally:
                (root / m.file).write_text(original)
            caught += not passed
            print(f"{m.name:22s} {'caught' if not passed else 'MISSED':7s} {secs:4.0f}  {m.what}\n"
                  f"{'':35s}{last}", flush=True)
        print(f"{caught} of {len(chosen)} mutations caught")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
