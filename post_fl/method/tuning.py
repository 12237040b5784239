"""Soft-prompt tuning on private data: plain, or DP-SGD with Opacus.

Only the prompt is trained; the model is frozen. Under DP-SGD each example's prompt
gradient is clipped to ``max_grad_norm`` and Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` is added to the sum, with Poisson sampling of
batches. Privacy accounting is kept apart from the optimiser, as in Opacus: the
accountant's *history* (noise multiplier, sample rate, steps) is plain data that a
federated client carries from round to round, so epsilon composes over every step the
client ever took, not over one call.

Randomness: the Poisson batch sampler and the Gaussian noise draw from one generator of
:func:`post_fl.privacy.randomness.dp_torch_generator`, seeded from fresh OS entropy on every call
(``insecure_seed=None``); only the non-private shuffle of plain tuning follows ``seed``. On a GPU (the
model's device, :mod:`post_fl.core.compute`) the noise is drawn there, from a second OS-entropy generator
on that device (:func:`dp_sgd_generators`), while the sampler draws on the CPU.
Opacus' ``secure_mode`` needs ``torchcsprng``, which has no build for the pinned torch, so the
engine runs with it off and its "Secure RNG turned off" warning (which assumes a seeded,
predictable generator) is replaced by one accurate log line; the optimiser still draws its noise
the floating-point-attack-resistant way Opacus uses in secure mode (the mean of 4 Gaussians,
Holohan & Braghin 2021), from the OS-entropy generator.

Accounting (steps, sampling rate, noise calibration, epsilon of a history, delta) lives in
:mod:`post_fl.privacy.accounting`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..core.config import TuneConfig
from ..core.data import DataError, TextDataset
from ..core.deep_prompt import DeepPrompt, prompt_form
from ..core.models import ScoringModel
from ..core.prompt import SoftPrompt
from ..privacy.accounting import (calibrate_noise_multiplier, planned_steps, quiet_accountant, resolve_delta,
                                  sample_rate)
from ..privacy.randomness import dp_torch_generator

log = logging.getLogger(__name__)

# stream id of DP-SGD in the insecure (seeded) mode of post_fl.privacy.randomness
DP_SGD_STREAM = 11
NOISE_STREAM = 1  # sub-stream of DP-SGD's noise generator on an accelerator (insecure mode only)
_RNG_NOTE = [False]  # the one-time explanation of Opacus' secure_mode has been logged


class PromptedClassifier(nn.Module):
    """Frozen scoring model + trainable prompt (input or deep); maps token tensors to class scores.

    This is the module Opacus wraps: its only trainable submodule is the prompt, whose
    per-example gradients come from the grad sampler registered for its class
    (``post_fl.core.prompt`` for :class:`SoftPrompt`, ``post_fl.core.deep_prompt`` for :class:`DeepPrompt`).
    """

    def __init__(self, model: ScoringModel, prompt: SoftPrompt | DeepPrompt) -> None:
        super().__init__()
        self.model = model
        self.prompt = prompt

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_index: torch.Tensor) -> torch.Tensor:
        from ..core.models import EncodedBatch

        return self.model(EncodedBatch(input_ids, attention_mask, answer_index), self.prompt)


@dataclass
class TuneResult:
    """What one tuning call produced: the prompt and how much privacy it cost."""

    prompt: SoftPrompt | DeepPrompt
    epsilon: float  # spent so far, over the whole accountant history (inf when not private)
    delta: float
    noise_multiplier: float
    max_grad_norm: float  # the clipping bound C this prompt's form got (tune.max_grad_norm resolved)
    sample_rate: float
    steps: int
    examples: int
    mean_loss: float
    seconds: float  # the training loop alone (no tokenization, no noise calibration)
    accountant_history: list = field(default_factory=list)


def encode_dataset(model: ScoringModel, data: TextDataset) -> TensorDataset:
    """Tokenize a labelled dataset once into (input_ids, attention_mask, answer_index, label) tensors."""
    if not data.labelled:
        raise DataError("prompt tuning needs labelled data")
    if list(data.label_names) != list(model.label_names):
        raise DataError(f"data labels {data.label_names} differ from the model's verbalizer labels "
                        f"{model.label_names}")
    b = model.encode(data.texts)
    return TensorDataset(b.input_ids, b.attention_mask, b.answer_index, torch.tensor(data.labels))


def _privacy_engine(accountant: str, insecure: bool):
    """An Opacus ``PrivacyEngine`` without ``secure_mode`` (no torchcsprng for the pinned torch).

    Opacus warns "Secure RNG turned off ... perfectly fine for experimentation", which describes
    a seeded generator; here the generators are OS-entropy seeded, so that warning is caught and
    one accurate line is logged instead (per process; in insecure mode every call logs it).
    """
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant=accountant)
    if insecure:
        log.warning("DP-SGD noise and Poisson sampling seeded from insecure_seed: the released prompt is NOT "
                    "private against anyone who knows the seed (insecure_reproducible mode)")
    elif not _RNG_NOTE[0]:
        _RNG_NOTE[0] = True
        log.info("DP-SGD: Opacus secure_mode is off because torchcsprng has no build for the pinned torch; "
                 "the Poisson sampler and the Gaussian noise use torch's generator seeded with 63 bits from "
                 "os.urandom per call (unpredictable to the server, not a CSPRNG), noise drawn as in secure_mode")
    return engine


def dp_sgd_generators(insecure_seed: int | None, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(Poisson sampler's generator, noise generator) of one DP-SGD run, both OS-entropy seeded (insecure mode:
    from ``insecure_seed``). On the CPU they are one generator; on an accelerator the noise generator lives on
    ``device``, because Opacus draws noise with ``torch.normal(device=<parameter's device>, generator=...)``,
    which needs a generator of that device, while the sampler's ``torch.rand`` stays on the CPU."""
    sampler = dp_torch_generator(insecure_seed, DP_SGD_STREAM)
    if torch.device(device).type == "cpu":
        return sampler, sampler
    return sampler, dp_torch_generator(insecure_seed, DP_SGD_STREAM, NOISE_STREAM, device=device)


def _trim(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    width = int(attention_mask.sum(1).max()) if len(attention_mask) else 1
    return input_ids[:, :width], attention_mask[:, :width]


def tune_prompt(model: ScoringModel, prompt: SoftPrompt | DeepPrompt, data: TextDataset, cfg: TuneConfig, seed: int = 0,
                accountant_history: list | None = None, noise_multiplier: float | None = None,
                total_steps: int | None = None, progress: bool = False,
                insecure_seed: int | None = None) -> TuneResult:
    """Train ``prompt`` (input or deep) on ``data`` for ``cfg.epochs`` epochs, with DP-SGD when ``cfg.private``.

    ``accountant_history`` continues an earlier accountant (federated rounds);
    ``noise_multiplier`` fixes sigma (else it is calibrated so that ``total_steps`` steps,
    default this call's steps, spend ``cfg.target_epsilon``). The prompt is trained in place
    and returned with epsilon spent over the whole history at delta.

    DP-SGD's Poisson batches and Gaussian noise come from fresh OS entropy
    (:func:`post_fl.privacy.randomness.dp_torch_generator`); two calls with equal arguments release
    different prompts. ``insecure_seed`` (an int, only in ``insecure_reproducible`` mode) seeds
    them instead: bit-exact, and NOT private against anyone who knows it. ``seed`` drives only the
    shuffle of non-private tuning. A caller that tunes repeatedly in insecure mode (federated
    rounds) passes a distinct ``insecure_seed`` per call, or every call repeats the same noise.
    """
    if len(data) == 0:
        raise DataError("cannot tune a prompt on an empty dataset")
    if prompt.dim != model.embedding_dim:
        raise ValueError(f"prompt has embedding size {prompt.dim}, model expects {model.embedding_dim}")
    if insecure_seed is not None and (isinstance(insecure_seed, bool) or not isinstance(insecure_seed, int)):
        raise TypeError(f"insecure_seed must be None or an int, got {insecure_seed!r}")
    device = model.device  # where the model computes: the prompt, each batch and the DP noise go there
    if prompt.weight.device != device:
        raise ValueError(f"the prompt is on {prompt.weight.device} but the model on {device}; make it on the "
                         "model's device (prompt.to(model.device))")
    # non-private tuning shuffles with the run's seed; DP-SGD samples its Poisson batches from the DP generator
    generator, noise_generator = dp_sgd_generators(insecure_seed, device) if cfg.private else \
        (torch.Generator().manual_seed(seed), None)
    dataset = encode_dataset(model, data)
    n = len(dataset)
    steps = planned_steps(cfg, n)
    delta = resolve_delta(cfg, n)
    net = PromptedClassifier(model, prompt)
    optimizer = torch.optim.SGD(prompt.parameters(), lr=cfg.lr) if cfg.optimizer == "sgd" else \
        torch.optim.Adam(prompt.parameters(), lr=cfg.lr)
    loader = DataLoader(dataset, batch_size=min(cfg.batch_size, n), shuffle=True, generator=generator)
    history = [tuple(h) for h in (accountant_history or [])]
    sigma, q, clip = 0.0, sample_rate(cfg, n), cfg.clip_bound(prompt_form(prompt))
    engine = None
    if cfg.private:
        sigma = noise_multiplier if noise_multiplier is not None else \
            calibrate_noise_multiplier(cfg, n, total_steps or steps)
        engine = _privacy_engine(cfg.accountant, insecure_seed is not None)
        engine.accountant.history = list(history)
        # DP generators for the Poisson sampler (the loader's generator, which Opacus' DPDataLoader keeps) and
        # the noise (the same one on the CPU): never the config seed, never a server-sent seed
        net, optimizer, loader = engine.make_private(
            module=net, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=clip, poisson_sampling=True, noise_generator=noise_generator)
        optimizer.secure_mode = True  # noise as the mean of 4 Gaussians (floating-point attack resistant)
    net.train()
    start = time.perf_counter()  # training time only: not tokenization or noise calibration
    losses: list[float] = []
    loss_fn = nn.CrossEntropyLoss()
    bar = None
    if progress:
        from ..core.progress import progress_bar

        bar = progress_bar(steps, desc="tune" + (" (DP)" if cfg.private else ""))
    done = 0
    while done < steps:
        for input_ids, attention_mask, answer_index, labels in loader:
            if done >= steps:
                break
            optimizer.zero_grad(set_to_none=True)
            if len(labels) == 0:  # an empty Poisson batch: the step still adds noise
                prompt.weight.grad_sample = torch.zeros((0, *prompt.weight.shape), device=device)
                optimizer.step()
            else:
                input_ids, attention_mask = _trim(input_ids, attention_mask)
                input_ids, attention_mask, answer_index, labels = (
                    t.to(device) for t in (input_ids, attention_mask, answer_index, labels))
                loss = loss_fn(net(input_ids, attention_mask, answer_index), labels)
                with warnings.catch_warnings():
                    # Opacus' grad sampler hooks the soft-prompt module with a full backward hook; that module
                    # takes no tensor input, so torch says the hook "is firing when gradients are computed with
                    # respect to module outputs since no inputs require gradients". The prompt's per-example
                    # gradients come from exactly that output gradient (post_fl.core.prompt's grad sampler).
                    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are "
                                            "computed with respect to module outputs", category=UserWarning)
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
        with quiet_accountant():
            epsilon = float(engine.get_epsilon(delta))
    else:
        epsilon = math.inf
    prompt.weight.grad_sample = None
    prompt.weight.grad = None
    return TuneResult(prompt=prompt, epsilon=epsilon, delta=delta, noise_multiplier=sigma, max_grad_norm=clip,
                      sample_rate=q, steps=done, examples=n,
                      mean_loss=float(sum(losses) / len(losses)) if losses else math.nan,
                      seconds=time.perf_counter() - start, accountant_history=[list(h) for h in history])
