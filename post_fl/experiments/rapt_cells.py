"""The RAPT baseline's clients in a sweep: privatise texts (d_chi) and labels (randomised response)
once, locally, then tune the prompt on the privatised data; RAPT's epsilon mapping and its row's privacy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..core.config import RunConfig
from .grid import RaptSweepConfig


def rapt_eta(epsilon: float, diameter: float) -> float:
    """RAPT's η for a sweep ε: ``η = ε / diam(φ(V))``, so each privatised token is ε-LDP.

    d_χ-privacy gives ``P[M(x)=y] ≤ exp(η‖φ(x)−φ(x')‖) P[M(x')=y]``; the worst pair of tokens
    is ``diam`` apart, so per-token ε = η·diam. ``ε = inf`` gives ``η = inf`` (no noise).
    """
    if math.isinf(epsilon):
        return math.inf
    if diameter <= 0:
        raise ValueError(f"embedding diameter must be > 0, got {diameter}")
    return epsilon / diameter



# ---------------------------------------------------------------- RAPT clients
def privatize_batch(model, batch, eta: float, generator: torch.Generator | None = None):
    """RAPT's local step: replace each text token by its d_χ-privatised nearest neighbour (template kept).

    Returns ``(privatised EncodedBatch, body mask)``; η = inf returns the tokens unchanged.
    """
    from ..core.models import EncodedBatch
    from ..privacy.rapt import privatize_token_ids

    mask = model.text_positions(batch)
    tok = model.tokenizer
    special = sorted(set(tok.all_special_ids) | ({tok.pad_token_id} if tok.pad_token_id is not None else set()))
    ids = privatize_token_ids(batch.input_ids, model.word_embeddings, eta, generator, special_ids=special,
                              attention_mask=mask)
    return EncodedBatch(ids, batch.attention_mask, batch.answer_index), mask


def scores_and_hidden(model, input_ids, attention_mask, answer_index, prompt):
    """Class scores and the text positions' hidden states of one prompted forward pass."""
    hidden, mask, n_prompt = model.hidden_states(input_ids, attention_mask, prompt)
    scores = model.class_scores(model.answer_logits_from_hidden(hidden, mask, n_prompt, answer_index))
    return scores, hidden[:, n_prompt:]


RAPT_STREAM = 7  # stream id of RAPT's privatisation in the insecure (seeded) mode of post_fl.privacy.randomness


@dataclass
class RaptPrivateData:
    """A RAPT client's training data after local privatisation: everything its update may depend on.

    ``batch``: the d_χ-privatised token ids (template kept); ``targets``: the reconstruction
    targets, the *privatised* ids at text positions (-100 elsewhere); ``labels``: labels after
    randomised response; ``max_text_tokens``: the most privatised tokens in one example (for
    the per-example guarantee ``k · ε_token + ε_label``).
    """

    batch: Any
    targets: torch.Tensor
    labels: torch.Tensor
    max_text_tokens: int


def privatize_client_data(model, data, eta: float, label_epsilon: float, generator: torch.Generator | None):
    """RAPT's local privatisation of a client's examples: d_χ on every text token, randomised response on labels.

    Returns :class:`RaptPrivateData`. The reconstruction targets are the privatised tokens, not the
    plain ones, so nothing downstream touches raw data (see :mod:`post_fl.privacy.rapt`).
    """
    from ..privacy.rapt import randomized_response

    batch = model.encode(data.texts)
    priv, mask = privatize_batch(model, batch, eta, generator)
    targets = torch.where(mask.bool(), priv.input_ids, torch.full_like(priv.input_ids, -100))
    labels = randomized_response(torch.tensor(data.labels), len(data.label_names), label_epsilon, generator)
    return RaptPrivateData(priv, targets, labels, int(mask.sum(1).max()) if len(mask) else 0)


def rapt_local_round(model, private: "RaptPrivateData", head, prompt_np: np.ndarray, tune, rapt_cfg, seed: int):
    """One RAPT client round on *privatised* data only: task loss + λ · reconstruction loss of the privatised tokens.

    Returns ``(prompt update, steps, mean loss, seconds)``. The batch order follows ``seed``;
    it needs no privacy, the update being post-processing of the privatised data.
    """
    from ..core.prompt import SoftPrompt
    from ..privacy.accounting import planned_steps
    from ..privacy.rapt import reconstruction_loss

    priv, targets, labels = private.batch, private.targets, private.labels
    if np.ndim(prompt_np) != 2:
        raise ValueError("RAPT cells tune input prompts only: set prompt.form = 'input' (a deep prompt was given)")
    prompt = SoftPrompt(torch.from_numpy(np.array(prompt_np, dtype=np.float32)))
    opt = torch.optim.Adam([{"params": prompt.parameters(), "lr": tune.lr},
                            {"params": head.parameters(), "lr": rapt_cfg.head_lr}])
    n = len(labels)
    steps = planned_steps(tune, n)
    bs = min(tune.batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:bs]
        width = int(priv.attention_mask[idx].sum(1).max())
        ids, att = priv.input_ids[idx, :width], priv.attention_mask[idx, :width]
        scores, hidden = scores_and_hidden(model, ids, att, priv.answer_index[idx], prompt)
        loss = torch.nn.functional.cross_entropy(scores, labels[idx])
        if rapt_cfg.reconstruction_weight > 0:
            loss = loss + rapt_cfg.reconstruction_weight * reconstruction_loss(head, hidden, targets[idx, :width], att)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    delta = prompt.weight.detach().numpy().astype(np.float32) - np.asarray(prompt_np, np.float32)
    return delta, steps, float(np.mean(losses)), time.perf_counter() - t0


def rapt_label_epsilon(rapt_cfg: "RaptSweepConfig", token_epsilon: float) -> float:
    """The randomised-response ε of a RAPT cell: ``rapt.label_epsilon``, or the cell's per-token ε when 0."""
    return rapt_cfg.label_epsilon if rapt_cfg.label_epsilon > 0 else token_epsilon


def rapt_row_privacy(token_epsilon: float, label_epsilon: float, max_text_tokens) -> dict[str, Any]:
    """The privacy columns of a RAPT row: per-token, per-label and per-example local ε, and what they cover.

    The uploaded prompt update is trained only on privatised tokens and randomised-response labels, so
    it is post-processing of local DP: an example of k text tokens is ``(k ε_token + ε_label)``-LDP
    (pure, δ = 0). ``max_text_tokens`` (client id -> the most tokens in one of its examples) gives the
    worst k. ``epsilon`` holds that per-example bound (inf without privatisation).
    """
    if math.isinf(token_epsilon):
        return {"epsilon": math.inf, "delta": 0.0, "rapt_token_epsilon": math.inf, "rapt_label_epsilon": math.inf,
                "rapt_example_epsilon": math.inf, "epsilon_unit": "none (no privatisation; the update uses raw data)"}
    k = max((int(v) for v in (max_text_tokens or {}).values()), default=0)
    example = k * token_epsilon + label_epsilon if max_text_tokens else math.inf
    return {"epsilon": example, "delta": 0.0, "rapt_token_epsilon": token_epsilon, "rapt_label_epsilon": label_epsilon,
            "rapt_example_epsilon": example,
            "epsilon_unit": (f"local DP per example: {k} tokens x {token_epsilon:g} (d_chi) + label {label_epsilon:g} "
                             "(randomised response); the prompt update is post-processing of the privatised data")}


def rapt_client_fn(server, run_cfg: RunConfig, fed, eta: float, rapt_cfg: RaptSweepConfig,
                    label_epsilon: float = math.inf) -> Callable:
    """A RAPT client: privatise its partition once, locally (d_χ tokens, randomised-response labels), then
    tune prompt + reconstruction head on the privatised data only.

    The privatisation noise comes from :func:`post_fl.privacy.randomness.dp_torch_generator` (fresh OS entropy;
    the config seed only in ``insecure_reproducible`` mode). ``fn.max_text_tokens`` records, per client,
    the most privatised tokens in one example (for the per-example guarantee).
    """
    from ..federated.aggregate import ClientUpdate
    from ..federated.client import client_partition
    from ..federated.config import derive_seed
    from ..privacy.randomness import dp_torch_generator
    from ..privacy.rapt import ReconstructionHead

    private: dict[int, RaptPrivateData] = {}
    heads: dict[int, ReconstructionHead] = {}
    model = server.student  # the teacher, loaded as the federation's model
    insecure_seed = run_cfg.seed if run_cfg.insecure_reproducible else None

    def fn(cid: int, ins: dict, prompt_np: np.ndarray):
        data = client_partition(run_cfg, fed, cid)
        if len(data) == 0:
            raise ValueError(f"client {cid}: empty partition")
        if cid not in private:  # privatised once: later rounds are post-processing, no further privacy cost
            private[cid] = privatize_client_data(model, data, eta, label_epsilon,
                                                 dp_torch_generator(insecure_seed, RAPT_STREAM, cid))
            fn.max_text_tokens[cid] = private[cid].max_text_tokens
            heads[cid] = ReconstructionHead(model.embedding_dim, model.word_embeddings, mlp=False)
        seed = derive_seed(run_cfg.seed, ins["round"], cid, RAPT_STREAM)  # batch order only: post-processing
        torch.manual_seed(seed)
        delta, steps, loss, seconds = rapt_local_round(model, private[cid], heads[cid], prompt_np, run_cfg.tune,
                                                       rapt_cfg, seed)
        n = len(private[cid].labels)
        metrics = {"num-examples": n, "loss": loss, "epsilon": math.inf, "delta": 0.0,
                   "steps": steps, "noise-multiplier": 0.0, "sample-rate": min(run_cfg.tune.batch_size, n) / n}
        return ClientUpdate(cid, delta, n, metrics), steps, seconds

    fn.max_text_tokens = {}
    return fn

