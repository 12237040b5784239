"""Soft-prompt tuning on private data: plain, or DP-SGD with Opacus.

Only the prompt is trained; the model is frozen. Under DP-SGD each example's prompt
gradient is clipped to ``max_grad_norm`` and Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` is added to the sum, with Poisson sampling of
batches. Privacy accounting is kept apart from the optimiser, as in Opacus: the
accountant's *history* (noise multiplier, sample rate, steps) is plain data that a
federated client carries from round to round, so epsilon composes over every step the
client ever took, not over one call.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .config import TuneConfig
from .data import DataError, TextDataset
from .models import ScoringModel
from .prompt import SoftPrompt


class PromptedClassifier(nn.Module):
    """Frozen scoring model + trainable soft prompt; maps token tensors to class scores.

    This is the module Opacus wraps: its only trainable submodule is the prompt, whose
    per-example gradients come from ``prompt.prompt_grad_sampler``.
    """

    def __init__(self, model: ScoringModel, prompt: SoftPrompt) -> None:
        super().__init__()
        self.model = model
        self.prompt = prompt

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_index: torch.Tensor) -> torch.Tensor:
        from .models import EncodedBatch

        return self.model(EncodedBatch(input_ids, attention_mask, answer_index), self.prompt)


@dataclass
class TuneResult:
    """What one tuning call produced: the prompt and how much privacy it cost."""

    prompt: SoftPrompt
    epsilon: float  # spent so far, over the whole accountant history (inf when not private)
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    examples: int
    mean_loss: float
    seconds: float  # the training loop alone (no tokenization, no noise calibration)
    accountant_history: list = field(default_factory=list)


def resolve_delta(cfg: TuneConfig, n_examples: int) -> float:
    """The delta to use: ``cfg.delta`` or, when 0, 1/N (N = number of private examples)."""
    return cfg.delta if cfg.delta > 0 else 1.0 / max(n_examples, 1)


def planned_steps(cfg: TuneConfig, n_examples: int) -> int:
    """Number of optimiser steps that ``cfg.epochs`` epochs take (expected batches per epoch = N / batch)."""
    return max(1, math.ceil(cfg.epochs * n_examples / cfg.batch_size))


def sample_rate(cfg: TuneConfig, n_examples: int) -> float:
    """Poisson sampling rate q = 1 / (batches per epoch), about batch_size / N, as Opacus sets it."""
    return 1.0 / math.ceil(n_examples / min(cfg.batch_size, n_examples))


def calibrate_noise_multiplier(cfg: TuneConfig, n_examples: int, total_steps: int) -> float:
    """Smallest noise multiplier such that ``total_steps`` DP-SGD steps at rate q spend <= target epsilon."""
    return _noise_multiplier(cfg.target_epsilon, resolve_delta(cfg, n_examples), sample_rate(cfg, n_examples),
                             total_steps, cfg.accountant)


@functools.lru_cache(maxsize=256)
def _noise_multiplier(target_epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """Opacus' binary search for sigma (seconds per call), memoised: many clients share the same inputs."""
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q, steps=steps,
                                accountant=accountant)


def epsilon_from_history(history: list, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by a DP-SGD history of (noise multiplier, sample rate, steps) at ``delta``."""
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def encode_dataset(model: ScoringModel, data: TextDataset) -> TensorDataset:
    """Tokenize a labelled dataset once into (input_ids, attention_mask, answer_index, label) tensors."""
    if not data.labelled:
        raise DataError("prompt tuning needs labelled data")
    if list(data.label_names) != list(model.label_names):
        raise DataError(f"data labels {data.label_names} differ from the model's verbalizer labels "
                        f"{model.label_names}")
    b = model.encode(data.texts)
    return TensorDataset(b.input_ids, b.attention_mask, b.answer_index, torch.tensor(data.labels))


def _trim(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    width = int(attention_mask.sum(1).max()) if len(attention_mask) else 1
    return input_ids[:, :width], attention_mask[:, :width]


def tune_prompt(model: ScoringModel, prompt: SoftPrompt, data: TextDataset, cfg: TuneConfig, seed: int = 0,
                accountant_history: list | None = None, noise_multiplier: float | None = None,
                total_steps: int | None = None, progress: bool = False) -> TuneResult:
    """Train ``prompt`` on ``data`` for ``cfg.epochs`` epochs, with DP-SGD when ``cfg.private``.

    ``accountant_history`` continues an earlier accountant (federated rounds);
    ``noise_multiplier`` fixes sigma (else it is calibrated so that ``total_steps`` steps,
    default this call's steps, spend ``cfg.target_epsilon``). The prompt is trained in place
    and returned with epsilon spent over the whole history at delta.
    """
    if len(data) == 0:
        raise DataError("cannot tune a prompt on an empty dataset")
    if prompt.dim != model.embedding_dim:
        raise ValueError(f"prompt has embedding size {prompt.dim}, model expects {model.embedding_dim}")
    generator = torch.Generator().manual_seed(seed)
    dataset = encode_dataset(model, data)
    n = len(dataset)
    steps = planned_steps(cfg, n)
    delta = resolve_delta(cfg, n)
    net = PromptedClassifier(model, prompt)
    optimizer = torch.optim.Adam(prompt.parameters(), lr=cfg.lr)
    loader = DataLoader(dataset, batch_size=min(cfg.batch_size, n), shuffle=True, generator=generator)
    history = [tuple(h) for h in (accountant_history or [])]
    sigma, q = 0.0, sample_rate(cfg, n)
    engine = None
    if cfg.private:
        from opacus import PrivacyEngine

        sigma = noise_multiplier if noise_multiplier is not None else \
            calibrate_noise_multiplier(cfg, n, total_steps or steps)
        engine = PrivacyEngine(accountant=cfg.accountant)
        engine.accountant.history = list(history)
        noise_gen = torch.Generator().manual_seed(seed + 1)
        net, optimizer, loader = engine.make_private(
            module=net, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, noise_generator=noise_gen)
    net.train()
    start = time.perf_counter()  # training time only: not tokenization or noise calibration
    losses: list[float] = []
    loss_fn = nn.CrossEntropyLoss()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="tune" + (" (DP)" if cfg.private else ""), leave=False)
    done = 0
    while done < steps:
        for input_ids, attention_mask, answer_index, labels in loader:
            if done >= steps:
                break
            optimizer.zero_grad(set_to_none=True)
            if len(labels) == 0:  # an empty Poisson batch: the step still adds noise
                prompt.weight.grad_sample = torch.zeros((0, *prompt.weight.shape))
                optimizer.step()
            else:
                input_ids, attention_mask = _trim(input_ids, attention_mask)
                loss = loss_fn(net(input_ids, attention_mask, answer_index), labels)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            done += 1
            if bar is not None:
                bar.update(1)
                if losses:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    if engine is not None:
        history = [tuple(h) for h in engine.accountant.history]
        epsilon = float(engine.get_epsilon(delta))
    else:
        epsilon = math.inf
    prompt.weight.grad_sample = None
    prompt.weight.grad = None
    return TuneResult(prompt=prompt, epsilon=epsilon, delta=delta, noise_multiplier=sigma, sample_rate=q,
                      steps=done, examples=n, mean_loss=float(sum(losses) / len(losses)) if losses else math.nan,
                      seconds=time.perf_counter() - start, accountant_history=[list(h) for h in history])
