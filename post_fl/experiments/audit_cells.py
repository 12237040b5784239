"""The membership-inference audit of a sweep cell: canaries, their losses, and an empirical
lower bound on DP-SGD's epsilon (:func:`audit_prompt_tuning`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .grid import AuditSweepConfig


# ---------------------------------------------------------------- audit
def make_canaries(model, label_names: list[str], count: int, words: int, seed: int):
    """Canary texts of random whole vocabulary words with random labels (a TextDataset)."""
    import random

    from ..core.data import TextDataset

    rng = random.Random(seed)
    vocab = [w for w in model.tokenizer.get_vocab() if w.isalpha() and w.isascii() and w.islower() and len(w) > 2]
    if len(vocab) < words:
        vocab = [w for w in model.tokenizer.get_vocab() if w.isalpha()]
    vocab.sort()
    texts = [" ".join(rng.sample(vocab, min(words, len(vocab)))) for _ in range(count)]
    labels = [rng.randrange(len(label_names)) for _ in range(count)]
    return TextDataset(texts, labels, list(label_names))


@torch.no_grad()
def _canary_losses(model, canaries, prompt) -> np.ndarray:
    batch = model.encode(canaries.texts)
    scores = model(batch, prompt)
    return torch.nn.functional.cross_entropy(scores, torch.tensor(canaries.labels), reduction="none").numpy()


def audit_prompt_tuning(model, base_data, target_epsilon: float, audit: AuditSweepConfig, tune, seed: int):
    """Canary membership-inference audit of prompt tuning at ``target_epsilon``: an empirical ε lower bound.

    Each of ``audit.trials`` trials tunes a fresh prompt (DP-SGD at ``target_epsilon``,
    δ = ``audit.delta``, fresh DP noise every trial; none when inf) on ``base_data`` plus a
    random half of the canaries.
    A canary's membership score is its loss under the initial prompt minus its loss under the
    tuned prompt (how much tuning taught the prompt *that* text's label). Scores of included
    canaries are member observations, the others non-member ones;
    :func:`post_fl.privacy.audit.epsilon_lower_bound_from_scores` turns them into a Clopper-Pearson
    lower bound on ε at confidence 1 − ``audit.alpha``: the threshold is chosen on the first
    ``audit.calibration_trials`` trials and tested on the rest (Bonferroni over all thresholds
    when 0). Returns :class:`post_fl.privacy.audit.AuditResult`, whose ``max_epsilon_lower_bound`` is the
    most these observation counts could show.
    """
    from ..core.data import TextDataset
    from ..core.prompt import init_from_vocab
    from ..method.tuning import tune_prompt
    from ..privacy.audit import audit_by_canaries

    canaries = make_canaries(model, base_data.label_names, audit.canaries, audit.canary_words, seed + 101)
    cfg = dataclasses.replace(tune, target_epsilon=target_epsilon, dp=math.isfinite(target_epsilon),
                              delta=audit.delta, epochs=audit.epochs, lr=audit.lr, batch_size=audit.batch_size)
    sigma = None
    if cfg.private:  # one noise multiplier for every trial, calibrated for the worst case of q and steps
        from opacus.accountants.utils import get_noise_multiplier

        from ..privacy.accounting import planned_steps, quiet_accountant, sample_rate

        n_min, n_max = max(len(base_data), 1), len(base_data) + len(canaries)
        with quiet_accountant():
            sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=audit.delta,
                                               sample_rate=sample_rate(cfg, n_min), steps=planned_steps(cfg, n_max),
                                               accountant=cfg.accountant))
    counter = iter(range(10**6))

    def train_fn(included: list[int]):
        trial = next(counter)
        data = TextDataset(base_data.texts + [canaries.texts[i] for i in included],
                           base_data.labels + [canaries.labels[i] for i in included], list(base_data.label_names))
        prompt = init_from_vocab(model.word_embeddings, audit.num_virtual_tokens,
                                 torch.Generator().manual_seed(seed * 1000 + trial))
        before = _canary_losses(model, canaries, prompt)
        if len(data) == 0:
            return np.zeros(len(canaries))
        res = tune_prompt(model, prompt, data, cfg, seed=seed * 1000 + trial, noise_multiplier=sigma)
        if cfg.private and res.epsilon > target_epsilon * 1.001:
            raise RuntimeError(f"audit trial spent epsilon {res.epsilon:.3f} > target {target_epsilon}")
        return before - _canary_losses(model, canaries, res.prompt)

    return audit_by_canaries(train_fn, lambda scores, i: float(scores[i]), list(range(len(canaries))),
                             audit.trials, audit.delta, audit.alpha, seed=seed,
                             calibration_trials=audit.calibration_trials)

