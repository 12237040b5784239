"""Client-batched simulation: one forward/backward pass of the frozen student serves many clients.

Only the soft prompt is trained and the model is frozen, so the local DP-SGD of K simulated
clients can share the model's passes. Each round, for every DP-SGD step:

1. every client that still has steps to take draws its own Poisson batch (rate
   ``q_c = sample_rate(tune, n_c)``) from its own generator;
2. the selected examples of all clients are concatenated (sorted by length, cut into
   micro-batches of at most ``micro_batch`` rows) and each example is prepended with *its
   client's* prompt: the prompts are a stacked ``K x V x D`` tensor and a micro-batch's prompt
   tensor is ``P[client_of_example]`` (``M x V x D``), a leaf of the autograd graph (deep prompts:
   ``K x L x V x D`` in units of their per-layer scales, put at every layer: :mod:`post_fl.core.deep_prompt`);
3. one backward pass of the summed per-example loss gives the gradient w.r.t. that gathered
   tensor, whose row ``i`` is exactly example ``i``'s gradient w.r.t. its own prompt (no Opacus
   hooks needed);
4. each per-example gradient is clipped to ``tune.max_grad_norm`` (Opacus' rule
   ``min(1, C / (||g|| + 1e-6))``) and added to its client's sum (``index_add``);
5. each client adds Gaussian noise of standard deviation ``sigma_c * C`` from its own generator
   (drawn as Opacus draws it in ``secure_mode``: the mean of four Gaussians), divides by its
   expected batch size ``int(n_c * q_c)`` and takes a ``tune.optimizer`` step (Adam or SGD) on its own prompt.

Every client therefore runs exactly the DP-SGD that :func:`post_fl.method.tuning.tune_prompt` would
run for it alone from the global prompt: the same number of steps (``planned_steps``), the same
``q``, ``sigma``, clipping, Poisson sampling and optimizer, and an accountant history that composes
the same way (Opacus' history merge), so its epsilon is the one ``tune_prompt`` reports.
Non-private tuning (``tune.private`` false) follows ``tune_prompt``'s plain path instead:
shuffled batches of ``batch_size``, the batch-mean loss, no clipping, no noise.

Randomness: each client's Poisson sampler and noise share one generator from
:func:`post_fl.privacy.randomness.dp_torch_generator` (fresh OS entropy per client per call; on a GPU
a second one there draws the noise: :func:`post_fl.method.tuning.dp_sgd_generators`), as in
``tune_prompt``. Only when a client is given an ``insecure_seed`` (``insecure_reproducible``
mode, NOT private) is its generator seeded, with the stream ``tune_prompt`` uses, and it then
consumes it in the same order as Opacus' ``DPDataLoader`` and ``DPOptimizer`` do: a client's
released prompt equals ``tune_prompt(..., insecure_seed=s)``'s (``tests/test_batched.py``).

Device: every client's prompt, Adam moments, gradient sum, data and noise live on the model's device
(``micro_batch``: at least 256 rows on a GPU, :func:`post_fl.core.compute.pass_rows`).

Memory: one micro-batch's activations (fixed by ``micro_batch``, not by K), every client's tokenized data,
and per client its prompt, Adam's two moments and a gradient sum (four ``V x D`` float32 tensors,
:attr:`BatchedRound.client_state_bytes`; a round's temporaries add about three more) plus a three-number
accountant history. Freed heap memory goes back to the OS after every micro-batch (:func:`release_freed_memory`).

:class:`BatchedTransport` puts this engine behind the :class:`post_fl.federated.Transport`
protocol, so ``run_federated(server, BatchedTransport(server, run_cfg, fed_cfg))`` runs the Flower path's
round logic, update validation, aggregation and outputs, the sampled clients trained in shared passes.
"""

from __future__ import annotations

import ctypes
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..core.compute import pass_rows
from ..core.config import TuneConfig
from ..core.data import DataError, TextDataset
from ..core.models import EncodedBatch, ScoringModel
from ..method.tuning import dp_sgd_generators, encode_dataset
from ..privacy.accounting import (calibrate_noise_multiplier, epsilon_from_history, planned_steps, resolve_delta,
                                  sample_rate)

DEFAULT_MICRO_BATCH = 64
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as tune_prompt uses them
ADAM_EPS = 1e-8
OPACUS_NORM_EPS = 1e-6  # Opacus' clip factor min(1, C / (||g|| + 1e-6))


@dataclass
class ClientOutcome:
    """One client's local training in a batched round (the fields of ``tuning.TuneResult``)."""

    prompt: torch.Tensor  # the tuned prompt, V x D (deep: L x V x D, in the units of its scales)
    update: np.ndarray  # tuned prompt minus the global prompt (float32)
    epsilon: float  # over the whole accountant history (inf when not private)
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int  # DP-SGD steps taken in this call
    examples: int
    mean_loss: float  # mean over steps with a non-empty batch of the batch-mean loss
    accountant_history: list = field(default_factory=list)


@dataclass
class BatchedRound:
    """What :func:`train_clients_batched` produced for all clients of one round."""

    clients: dict[int, ClientOutcome]
    seconds: float  # the training loop alone (no tokenization, no noise calibration)
    examples_processed: int  # forward/backward rows over all steps and clients
    micro_batches: int
    client_state_bytes: int  # prompts + Adam moments + gradient sums of all clients
    data_bytes: int  # the tokenized examples of all clients (ids, masks, answer positions, labels)


def check_client_data(model: ScoringModel, data: TextDataset, client_id: int) -> None:
    """Raise :class:`DataError` naming ``client_id`` if its data cannot be tuned on (empty, unlabelled,
    or labels other than the model's verbalizer labels)."""
    if len(data) == 0:
        raise DataError(f"client {client_id}: cannot tune a prompt on an empty dataset")
    if not data.labelled:
        raise DataError(f"client {client_id}: prompt tuning needs labelled data")
    if list(data.label_names) != list(model.label_names):
        raise DataError(f"client {client_id}: data labels {data.label_names} differ from the model's verbalizer "
                        f"labels {model.label_names}")


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand the heap memory freed by the last micro-batch back to the OS (glibc ``malloc_trim``).

    Micro-batches of varying width leave glibc's heap fragmented; without this the resident memory
    of a round grows with the number of micro-batches (measured: +804 MiB for 300 clients of the
    MiniLM student, against +305 MiB with it), although the live tensors do not.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple, delta: float, accountant: str) -> float:
    """``epsilon_from_history``, memoised: clients of equal size share identical histories."""
    return epsilon_from_history([list(h) for h in history], delta, accountant)


class _GatheredPrompt(nn.Module):
    """Row ``i`` of per-example prompts for example ``i``: M x V x D prepended to the embeddings, or M x L x V x D
    deep prompts in units of their per-layer ``scales``, put at every layer (:mod:`post_fl.core.deep_prompt`)."""

    def __init__(self, prompts: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        super().__init__()
        self.prompts, self.scales = prompts, scales

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        if self.scales is not None:  # B x L x V x D per-layer vectors (ScoringModel.hidden_states)
            return self.prompts * self.scales.to(self.prompts)[None, :, None, None]
        return torch.cat([self.prompts.to(inputs_embeds.dtype), inputs_embeds], dim=1)


def per_example_prompt_grads(model: ScoringModel, prompts: torch.Tensor, batch: EncodedBatch, labels: torch.Tensor,
                             scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients of the cross-entropy loss w.r.t. each example's own prompt.

    ``prompts`` is M x V x D (row i = the prompt of example i's client), or M x L x V x D deep prompts with
    per-layer ``scales``. Returns (M x ``prompts``' row shape gradients, M per-example losses) from one forward
    and one backward pass of the frozen model: the loss is the *sum* of the per-example losses, so row i of
    its gradient w.r.t. the gathered prompt tensor is example i's gradient and nothing else.
    """
    leaf = prompts.detach().requires_grad_(True)
    width = int(batch.attention_mask.sum(1).max()) if len(batch) else 1
    trimmed = EncodedBatch(batch.input_ids[:, :width], batch.attention_mask[:, :width], batch.answer_index)
    scores = model(trimmed, _GatheredPrompt(leaf, scales))
    losses = nn.functional.cross_entropy(scores, labels, reduction="none")
    (grads,) = torch.autograd.grad(losses.sum(), leaf)
    return grads, losses.detach()


def clip_per_example(grads: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Each row of ``grads`` (M x ...) scaled to L2 norm at most ``max_norm`` (Opacus' clip factor)."""
    norms = grads.reshape(len(grads), -1).norm(2, dim=-1)
    factor = (max_norm / (norms + OPACUS_NORM_EPS)).clamp(max=1.0)
    return grads * factor.view(-1, *([1] * (grads.dim() - 1)))


def sum_by_client(grads: torch.Tensor, client_index: torch.Tensor, num_clients: int) -> torch.Tensor:
    """Sum the rows of ``grads`` (M x V x D) into ``num_clients`` per-client sums (K x V x D)."""
    out = torch.zeros((num_clients, *grads.shape[1:]), dtype=grads.dtype, device=grads.device)
    return out.index_add_(0, client_index, grads)


def gaussian_noise(std: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise drawn as Opacus' DPOptimizer draws it in secure_mode (one discarded draw,
    then the mean of four Gaussians scaled back to ``std``), from ``generator``, on its device."""
    device = generator.device
    if std == 0:
        return torch.zeros(shape, device=device)
    torch.normal(mean=0, std=std, size=(1, 1), generator=generator, device=device)
    total = torch.zeros(shape, device=device)
    for _ in range(4):
        total += torch.normal(mean=0, std=std, size=shape, generator=generator, device=device)
    return total / 2


def extend_history(history: list, noise_multiplier: float, q: float, steps: int) -> list[tuple]:
    """An accountant history after ``steps`` more DP-SGD steps at (sigma, q), merged as Opacus'
    accountants merge consecutive equal steps."""
    out = [tuple(h) for h in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == q:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + steps)
    else:
        out.append((noise_multiplier, q, steps))
    return out


class _ClientPlan:
    """One client's fixed quantities for a round and its batch schedule (Poisson or shuffled)."""

    def __init__(self, row: int, n: int, cfg: TuneConfig, sigma: float, generators: tuple) -> None:
        self.row, self.n = row, n
        self.generator, self.noise_generator = generators  # one generator on the CPU (dp_sgd_generators)
        self.steps = planned_steps(cfg, n)
        self.q = sample_rate(cfg, n)
        self.sigma = sigma
        self.private = cfg.private
        loader_len = math.ceil(n / min(cfg.batch_size, n))  # len(DataLoader(batch_size=min(b, n)))
        self.batch = min(cfg.batch_size, n)
        # Opacus: DPDataLoader's sample rate 1/len(loader); its sampler yields int(1/rate) batches an epoch;
        # the optimiser divides by expected_batch_size = int(n * rate)
        self.epoch_len = int(1 / (1 / loader_len)) if self.private else loader_len
        self.expected_batch = int(n * (1 / loader_len))
        self._perm: list[int] = []
        self.losses: list[float] = []

    def batch_indices(self, step: int) -> torch.Tensor:
        """The example indices of this client's batch at ``step`` (consuming its generator as the
        torch/Opacus data loader in ``tune_prompt`` does)."""
        g = self.generator
        k = step % self.epoch_len
        if k == 0:  # a new epoch = a new DataLoader iterator
            if not self.private and step > 0:  # RandomSampler's tail randperm when an epoch is exhausted
                torch.randperm(self.n, generator=g)
            torch.empty((), dtype=torch.int64).random_(generator=g)  # the iterator's base seed
            if not self.private:
                self._perm = torch.randperm(self.n, generator=g).tolist()
        if self.private:
            mask = torch.rand(self.n, generator=g) < self.q
            return mask.nonzero(as_tuple=False).reshape(-1)
        return torch.tensor(self._perm[k * self.batch:(k + 1) * self.batch], dtype=torch.long)


def _client_generators(cfg: TuneConfig, insecure_seed: int | None, seed: int, device: torch.device):
    """The (sampler, noise) generators ``tune_prompt`` would use for this client (plain tuning: its shuffle seed)."""
    if cfg.private:
        return dp_sgd_generators(insecure_seed, device)
    g = torch.Generator().manual_seed(seed)
    return g, g


def train_clients_batched(model: ScoringModel, global_prompt: torch.Tensor | np.ndarray,
                          datasets: Mapping[int, TextDataset], cfg: TuneConfig,
                          histories: Mapping[int, list] | None = None,
                          noise_multipliers: Mapping[int, float] | None = None,
                          total_steps: Mapping[int, int] | None = None,
                          insecure_seeds: Mapping[int, int] | None = None,
                          seeds: Mapping[int, int] | None = None,
                          micro_batch: int = DEFAULT_MICRO_BATCH,
                          scales: torch.Tensor | None = None) -> BatchedRound:
    """One round of local prompt tuning for every client in ``datasets`` at once, from ``global_prompt``.

    Client ``c``'s outcome equals ``tune_prompt(model, SoftPrompt(global_prompt), datasets[c], cfg,
    seed=seeds[c], accountant_history=histories[c], noise_multiplier=noise_multipliers[c],
    total_steps=total_steps[c], insecure_seed=insecure_seeds[c])`` (``DeepPrompt(global_prompt, scales)`` for a
    deep L x V x D prompt); missing mappings or keys mean ``tune_prompt``'s defaults (no history, sigma calibrated to
    ``cfg.target_epsilon`` over this call's steps, fresh OS-entropy noise, seed 0).
    ``insecure_seeds`` (insecure_reproducible mode only, NOT private) must name every client or
    none. ``micro_batch`` bounds the rows of one forward/backward pass (memory), not the result.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch: expected >= 1, got {micro_batch}")
    if not datasets:
        raise ValueError("train_clients_batched needs at least one client")
    ids = sorted(datasets)
    histories, noise_multipliers = dict(histories or {}), dict(noise_multipliers or {})
    total_steps, seeds = dict(total_steps or {}), dict(seeds or {})
    if insecure_seeds is not None:
        missing = [c for c in ids if c not in insecure_seeds]
        if missing:
            raise ValueError(f"insecure_seeds: name every client or none; missing {missing[:5]}")
        for c in ids:
            s = insecure_seeds[c]
            if isinstance(s, bool) or not isinstance(s, int):
                raise TypeError(f"insecure_seeds[{c}] must be an int, got {s!r}")
    device, micro_batch = model.device, pass_rows(micro_batch, model)  # one device for every client
    base = torch.as_tensor(np.asarray(global_prompt, dtype=np.float32)).to(device, copy=True)
    scales = None if base.dim() != 3 or scales is None else torch.as_tensor(scales, dtype=torch.float32).to(device)
    if base.dim() not in (2, 3) or (base.dim() == 3 and (scales is None or scales.shape != base.shape[:1])):
        raise ValueError(f"global prompt must be (num_virtual_tokens, dim), or (num_layers, num_virtual_tokens, "
                         f"dim) with one of scales per layer; got shape {tuple(base.shape)}")
    if base.shape[-1] != model.embedding_dim:
        raise ValueError(f"prompt has embedding size {base.shape[-1]}, model expects {model.embedding_dim}")

    # tokenize every client's data once; one padded table with per-client offsets
    encoded, plans = [], []
    for c in ids:
        check_client_data(model, datasets[c], c)
        encoded.append(encode_dataset(model, datasets[c]).tensors)
    width = max(t[0].shape[1] for t in encoded)
    pad = model.tokenizer.pad_token_id

    def padded(t: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    input_ids = torch.cat([padded(t[0], pad) for t in encoded]).to(device)
    attention = torch.cat([padded(t[1], 0) for t in encoded]).to(device)
    answer = torch.cat([t[2] for t in encoded]).to(device)
    labels = torch.cat([t[3] for t in encoded]).to(device)
    lengths = attention.sum(1)
    data_bytes = sum(t.numel() * t.element_size() for t in (input_ids, attention, answer, labels))
    offsets = np.cumsum([0] + [len(t[0]) for t in encoded])
    del encoded
    for row, c in enumerate(ids):
        n = int(offsets[row + 1] - offsets[row])
        sigma = 0.0
        if cfg.private:
            sigma = float(noise_multipliers[c]) if noise_multipliers.get(c) is not None else \
                float(calibrate_noise_multiplier(cfg, n, total_steps.get(c) or planned_steps(cfg, n)))
        seed = insecure_seeds[c] if insecure_seeds is not None else None
        plans.append(_ClientPlan(row, n, cfg, sigma, _client_generators(cfg, seed, int(seeds.get(c, 0)), device)))

    K, shape, clip = len(ids), tuple(base.shape), cfg.clip_bound("deep" if base.dim() == 3 else "input")  # C
    prompts = base.unsqueeze(0).repeat(K, *([1] * base.dim()))
    exp_avg, exp_avg_sq = torch.zeros_like(prompts), torch.zeros_like(prompts)
    state_bytes = 4 * prompts.numel() * prompts.element_size()  # + the per-step gradient sums
    beta1, beta2 = ADAM_BETAS
    max_steps = max(p.steps for p in plans)
    rows_done = micro = 0
    start = time.perf_counter()
    for step in range(max_steps):
        active = [p for p in plans if step < p.steps]
        picks = [(p, p.batch_indices(step)) for p in active]
        flat = torch.cat([idx + int(offsets[p.row]) for p, idx in picks]).to(device)
        owner = torch.cat([torch.full((len(idx),), p.row, dtype=torch.long) for p, idx in picks]).to(device)
        grad_sum = torch.zeros_like(prompts)
        loss_sum = torch.zeros(K, dtype=torch.float64)
        if len(flat):
            order = torch.argsort(lengths[flat], stable=True)  # similar lengths together: less padding
            flat, owner = flat[order], owner[order]
            for lo in range(0, len(flat), micro_batch):
                rows, who = flat[lo:lo + micro_batch], owner[lo:lo + micro_batch]
                batch = EncodedBatch(input_ids[rows], attention[rows], answer[rows])
                grads, losses = per_example_prompt_grads(model, prompts.index_select(0, who), batch, labels[rows],
                                                         scales)
                if cfg.private:
                    grads = clip_per_example(grads, clip)
                grad_sum.index_add_(0, who, grads)
                loss_sum.index_add_(0, who.cpu(), losses.cpu().double())  # float64 on the CPU (MPS has none)
                rows_done += len(rows)
                micro += 1
                del grads, losses
                release_freed_memory()
        rows_active = torch.tensor([p.row for p in active], dtype=torch.long, device=device)
        grads = torch.empty((len(active), *shape), device=device)
        for i, (p, idx) in enumerate(picks):
            if len(idx):
                p.losses.append(float(loss_sum[p.row]) / len(idx))
            if cfg.private:  # (sum of clipped + N(0, (sigma C)^2)) / expected batch size, per client
                noise = gaussian_noise(p.sigma * clip, shape, p.noise_generator)
                grads[i] = (grad_sum[p.row] + noise) / p.expected_batch
            else:  # the batch-mean loss's gradient
                grads[i] = grad_sum[p.row] / len(idx)
        if cfg.optimizer == "sgd":  # torch.optim.SGD without momentum: p -= lr * g
            prompts[rows_active] = prompts[rows_active].add_(grads, alpha=-cfg.lr)
            continue
        m, v = exp_avg[rows_active], exp_avg_sq[rows_active]  # Adam (torch.optim.Adam's single-tensor update)
        m.lerp_(grads, 1 - beta1)
        v.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        t = step + 1
        step_size = cfg.lr / (1 - beta1 ** t)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(ADAM_EPS)
        exp_avg[rows_active], exp_avg_sq[rows_active] = m, v
        prompts[rows_active] = prompts[rows_active].addcdiv_(m, denom, value=-step_size)
    seconds = time.perf_counter() - start

    out: dict[int, ClientOutcome] = {}
    base_np = base.cpu().numpy()
    for c, p in zip(ids, plans):
        delta = resolve_delta(cfg, p.n)
        if cfg.private:
            history = extend_history(histories.get(c) or [], p.sigma, p.q, p.steps)
            epsilon = _epsilon(tuple(history), delta, cfg.accountant)
        else:
            history, epsilon = [tuple(h) for h in (histories.get(c) or [])], math.inf
        tuned = prompts[p.row].to("cpu", copy=True)  # the reply is made on the CPU
        out[c] = ClientOutcome(prompt=tuned, update=tuned.numpy().astype(np.float32) - base_np, epsilon=epsilon,
                               delta=delta, noise_multiplier=p.sigma, sample_rate=p.q, steps=p.steps,
                               examples=p.n,
                               mean_loss=float(sum(p.losses) / len(p.losses)) if p.losses else math.nan,
                               accountant_history=[list(h) for h in history])
    return BatchedRound(out, seconds, rows_done, micro, state_bytes, data_bytes)
