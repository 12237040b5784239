"""RAPT: local d_χ-privacy text privatisation and privatized-token reconstruction.

Implements the two client-side ingredients of RAPT (Li, Tan, Liu 2023,
"Privacy-Preserving Prompt Tuning for Large Language Model Services",
arXiv:2305.06212):

1. **Text-to-text local DP** via the d_χ-privacy (metric local differential
   privacy) mechanism of Feyisetan et al. (2020), used by RAPT: every token ``x``
   is mapped to its embedding ``φ(x)``, perturbed with noise ``z`` whose density
   is ``p(z) ∝ exp(−η‖z‖)``, and replaced by the vocabulary token whose embedding
   is nearest (Euclidean) to ``φ(x) + z``::

       M(x) = argmin_{y ∈ V} ‖φ(y) − (φ(x) + z)‖

   RAPT calls the privacy parameter η.  The mechanism satisfies η·d_χ-privacy
   with ``d(x, x') = ‖φ(x) − φ(x')‖``: for all tokens ``x, x'`` and every output
   ``y``::

       P[M(x) = y] ≤ exp(η · ‖φ(x) − φ(x')‖) · P[M(x') = y]

   (the noisy embedding is η·d_χ-private by the triangle inequality; the
   nearest-neighbour projection is post-processing).  Smaller η = more noise =
   more privacy.  See :func:`per_token_epsilon` for the conversion to a classic
   per-token ε-LDP guarantee.

2. **Privatized token reconstruction** (:class:`ReconstructionHead`,
   :func:`reconstruction_loss`): RAPT observes that prompt tuning on privatized
   text learns poor representations and adds an auxiliary task that recovers the
   *plain* (original) tokens from the frozen LLM's hidden states at the
   privatized positions.  The head is trained jointly with the soft prompt::

       total_loss = task_loss + λ · reconstruction_loss

   Only the soft prompt and the head are trainable; the LLM is frozen.  The
   plain tokens never leave the client in RAPT's threat model: the server only
   sees privatized text, the reconstruction target lives with the user.

3. **Randomised response on labels** (:func:`randomized_response`): RAPT's original threat
   model protects only the text sent to the LLM provider. In a federation the client *uploads a
   prompt update*, and an update trained on the plain labels and on plain-token reconstruction
   targets carries no formal guarantee. post-fl therefore trains the RAPT update only on locally
   privatised data: d_χ-privatised tokens (inputs *and* reconstruction targets) and labels
   privatised with K-ary randomised response at ``label_epsilon``. The update is then
   post-processing of ε-LDP outputs, so for one training example of k text tokens it satisfies
   ``(k · ε_token + ε_label)``-LDP (basic composition; pure, δ = 0), whatever the server does with
   it. The number of examples and each text's token count are not hidden.

All noise takes a ``torch.Generator``; callers pass one from
:func:`post_fl.privacy.randomness.dp_torch_generator` (fresh OS entropy), never a config seed.
This module depends only on torch; it is wired into the tuning loop elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "sample_dchi_noise",
    "per_token_epsilon",
    "privatize_token_ids",
    "ReconstructionHead",
    "reconstruction_loss",
    "randomized_response",
    "randomized_response_keep_probability",
]

# Number of float32 entries of one query-chunk × vocabulary distance block
# (16M floats = 64 MiB); keeps a 30k × 768 vocabulary cheap on CPU.
_DIST_BLOCK_ELEMS = 1 << 24


def _positive(value, name: str, meaning: str) -> float:
    """``value`` as a float > 0 (inf allowed), else ValueError naming ``name`` (``meaning`` explains it)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if math.isnan(number) or number <= 0:
        raise ValueError(f"{name} ({meaning}) must be > 0, got {value}")
    return number


def _check_eta(eta: float, *, allow_inf: bool) -> float:
    eta = _positive(eta, "eta", "the d_χ-privacy parameter")
    if math.isinf(eta) and not allow_inf:
        raise ValueError("eta must be finite here")
    return eta


def _check_embedding(embedding_matrix: torch.Tensor) -> torch.Tensor:
    if not isinstance(embedding_matrix, torch.Tensor):
        raise ValueError(f"embedding_matrix must be a torch.Tensor, got {type(embedding_matrix).__name__}")
    if embedding_matrix.dim() != 2 or embedding_matrix.shape[0] < 1 or embedding_matrix.shape[1] < 1:
        raise ValueError(
            f"embedding_matrix must be a non-empty 2-D [vocab_size, dim] tensor, got shape {tuple(embedding_matrix.shape)}"
        )
    return embedding_matrix.detach()


def sample_dchi_noise(
    shape_n: int,
    dim: int,
    epsilon: float,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample ``shape_n`` i.i.d. d_χ-privacy noise vectors in R^dim with density ∝ exp(−ε‖z‖).

    This is the multivariate Laplace-like noise of the d_χ-privacy mechanism
    (Feyisetan et al. 2020; RAPT's η is this ``epsilon``).  It is sampled as
    ``z = r · u`` with the direction ``u`` uniform on the unit sphere S^{dim−1}
    (a normalised standard Gaussian) and the magnitude ``r ~ Gamma(shape=dim,
    scale=1/ε)``, so ``E‖z‖ = dim/ε`` and ``Var‖z‖ = dim/ε²``.  Because ``dim``
    is an integer the Gamma variate is drawn as a sum of ``dim`` Exp(1) variables
    (exact, and reproducible through ``generator``).

    Adding this noise to an embedding gives ε·d_χ-privacy w.r.t. the Euclidean
    distance: output densities for inputs ``a`` and ``b`` differ by a factor of
    at most ``exp(ε‖a − b‖)``.

    Args:
        shape_n: number of noise vectors (rows).
        dim: embedding dimension.
        epsilon: the d_χ parameter η > 0 (finite).
        generator: optional ``torch.Generator`` for reproducibility (CPU generator).
    Returns:
        Tensor of shape ``[shape_n, dim]``.
    """
    eps = _check_eta(epsilon, allow_inf=False)
    if int(shape_n) != shape_n or shape_n < 0:
        raise ValueError(f"shape_n must be a non-negative integer, got {shape_n!r}")
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    n, d = int(shape_n), int(dim)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    direction = torch.randn(n, d, generator=generator, dtype=torch.float64, device=gen_device)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-300)
    # Gamma(d, 1/eps) = (sum of d Exp(1)) / eps;  Exp(1) = -log(U), U in (0, 1]
    u = torch.rand(n, d, generator=generator, dtype=torch.float64, device=gen_device)
    magnitude = -torch.log1p(-u).sum(dim=1, keepdim=True) / eps  # log1p(-u): u in [0,1) -> finite
    z = direction * magnitude
    return z.to(dtype=dtype, device=device if device is not None else gen_device)


def per_token_epsilon(eta: float, embedding_matrix: torch.Tensor, method: str = "auto") -> float:
    """Convert the d_χ parameter η into a per-token ε-LDP guarantee: ``ε = η · diam(φ(V))``.

    Under η·d_χ-privacy, any two tokens ``x, x'`` satisfy
    ``P[M(x)=y] ≤ exp(η‖φ(x)−φ(x')‖) P[M(x')=y]``; taking the worst pair gives
    standard ε-local DP per token with ``ε = η · max_{x,x'} ‖φ(x)−φ(x')‖``.
    A sequence of ``n`` tokens privatized independently is ``n·ε``-LDP (basic
    composition), or more finely ``η·Σ_i ‖φ(x_i)−φ(x'_i)‖`` for a specific pair
    of sequences.

    Args:
        eta: the d_χ parameter η > 0 (``math.inf`` gives ``inf``).
        embedding_matrix: ``[vocab_size, dim]`` embeddings φ used by the mechanism.
        method: ``"exact"`` computes the true diameter (max pairwise distance,
            O(V²·dim), chunked); ``"bound"`` uses the cheap valid upper bound
            ``diam ≤ 2·min(max_i ‖φ_i‖, max_i ‖φ_i − mean‖)`` (O(V·dim));
            ``"auto"`` (default) is exact for V ≤ 8192 and the bound otherwise.
    Returns:
        The per-token ε (a float, an upper bound when ``method`` is ``"bound"``).
    """
    eta = _check_eta(eta, allow_inf=True)
    emb = _check_embedding(embedding_matrix).to(torch.float64)
    if method not in ("auto", "exact", "bound"):
        raise ValueError(f"method must be 'auto', 'exact' or 'bound', got {method!r}")
    if method == "auto":
        method = "exact" if emb.shape[0] <= 8192 else "bound"
    if method == "bound":
        max_norm = emb.norm(dim=1).max()
        max_centred = (emb - emb.mean(dim=0, keepdim=True)).norm(dim=1).max()
        diam = float(2.0 * torch.minimum(max_norm, max_centred))
    else:
        sq = (emb * emb).sum(dim=1)
        v = emb.shape[0]
        chunk = max(1, _DIST_BLOCK_ELEMS // max(v, 1))
        best = 0.0
        for s in range(0, v, chunk):
            blk = emb[s : s + chunk]
            d2 = sq[s : s + chunk, None] - 2.0 * blk @ emb.T + sq[None, :]
            best = max(best, float(d2.max().clamp_min(0.0)))
        diam = math.sqrt(best)
    if math.isinf(eta):
        return 0.0 if diam == 0.0 else math.inf
    return eta * diam


def _nearest_token(noisy: torch.Tensor, emb: torch.Tensor, emb_sq: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """argmin_v ‖emb_v − noisy_i‖ per row, chunked over the query rows."""
    v = emb.shape[0]
    chunk = max(1, _DIST_BLOCK_ELEMS // v)
    out = torch.empty(noisy.shape[0], dtype=torch.long, device=noisy.device)
    for s in range(0, noisy.shape[0], chunk):
        q = noisy[s : s + chunk]
        # ‖q‖² is constant per row, so argmin of ‖e‖² − 2 q·e suffices
        scores = torch.addmm(emb_sq[None, :], q, emb.T, beta=1.0, alpha=-2.0)
        if banned is not None:
            scores[:, banned] = math.inf
        out[s : s + chunk] = scores.argmin(dim=1)
    return out


def privatize_token_ids(
    input_ids: torch.Tensor,
    embedding_matrix: torch.Tensor,
    eta: float,
    generator: torch.Generator | None = None,
    special_ids: Iterable[int] = (),
    attention_mask: torch.Tensor | None = None,
    *,
    exclude_special_from_output: bool = True,
) -> torch.Tensor:
    """Privatize token ids with RAPT's d_χ-privacy mechanism (η-d_χ-private per token).

    Each eligible token ``x`` becomes ``argmin_y ‖φ(y) − (φ(x) + z)‖`` with
    ``z ~ p(z) ∝ exp(−η‖z‖)`` (:func:`sample_dchi_noise`), i.e. for any tokens
    ``x, x'`` and output ``y``: ``P[M(x)=y] ≤ exp(η‖φ(x)−φ(x')‖)·P[M(x')=y]``
    (per-token ε: :func:`per_token_epsilon`).  Tokens are privatized
    independently.

    Untouched positions: ids in ``special_ids`` and positions where
    ``attention_mask == 0`` (padding).  With ``exclude_special_from_output``
    (default) special ids are also removed from the candidate set, so a content
    token is never turned into e.g. ``[PAD]``/``[SEP]``; this is still
    post-processing of the noisy embedding, so the guarantee is unchanged.
    Nearest-neighbour search is Euclidean and chunked (a 30k × 768 vocabulary is
    fine on CPU).

    Args:
        input_ids: integer tensor of any shape (typically ``[batch, seq]``).
        embedding_matrix: ``[vocab_size, dim]`` embedding table φ (e.g. the
            model's input embeddings); not modified, no gradient.
        eta: d_χ parameter η > 0; ``math.inf`` returns ``input_ids`` unchanged
            (a clone; no noise is sampled).
        generator: optional ``torch.Generator`` for reproducible noise.
        special_ids: token ids that are never privatized.
        attention_mask: optional tensor of ``input_ids``' shape; 0 = padding.
    Returns:
        A LongTensor with the same shape and device as ``input_ids``, values in
        ``[0, vocab_size)``.
    Raises:
        ValueError: on ``eta <= 0``/NaN, a non-2-D embedding matrix, ids outside
            the vocabulary, or an attention mask of the wrong shape.
    """
    eta = _check_eta(eta, allow_inf=True)
    emb = _check_embedding(embedding_matrix)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError("input_ids must be an integer torch.Tensor")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape {tuple(input_ids.shape)}"
        )
    vocab_size, dim = emb.shape
    ids = input_ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"input_ids contain ids outside the vocabulary [0, {vocab_size}) of embedding_matrix "
            f"(min {int(ids.min())}, max {int(ids.max())}); is it the right embedding table?"
        )
    special = sorted({int(s) for s in special_ids})
    if any(s < 0 or s >= vocab_size for s in special):
        raise ValueError(f"special_ids must lie in [0, {vocab_size}), got {special}")
    if math.isinf(eta) or ids.numel() == 0:
        return ids.clone()

    eligible = torch.ones_like(ids, dtype=torch.bool)
    if special:
        eligible &= ~torch.isin(ids, torch.tensor(special, dtype=torch.long, device=ids.device))
    if attention_mask is not None:
        eligible &= attention_mask.to(ids.device) != 0
    out = ids.clone()
    n = int(eligible.sum())
    if n == 0:
        return out

    work = emb.to(device=ids.device, dtype=torch.float32)
    emb_sq = (work * work).sum(dim=1)
    src = work[ids[eligible]]
    noise = sample_dchi_noise(n, dim, eta, generator, dtype=torch.float32, device=ids.device)
    banned = None
    if special and exclude_special_from_output and len(special) < vocab_size:
        banned = torch.tensor(special, dtype=torch.long, device=ids.device)
    out[eligible] = _nearest_token(src + noise, work, emb_sq, banned)
    return out


class ReconstructionHead(nn.Module):
    """RAPT's privatized-token reconstruction head: hidden state → logits over the vocabulary.

    Maps the frozen LLM's hidden state ``h_i`` at a privatized position to a
    distribution over the ORIGINAL (plain) token::

        logits_i = MLP(h_i) · Eᵀ (+ b)        MLP: hidden → dim (→ dim)

    where ``E`` is the fixed ``[vocab_size, dim]`` embedding matrix (a
    non-persistent buffer, not trained, not in ``state_dict``).  Tying the output
    layer to ``E`` means the trainable parameters are ``O(hidden·dim)`` instead
    of ``O(hidden·vocab)`` for a free linear classifier (≈0.6M vs ≈23M for
    768 × 30k), which matters when the head is communicated/aggregated in
    federated training; the logits matmul costs the same either way.

    Args:
        hidden_size: size of the LLM hidden states fed to the head.
        embedding_matrix: ``[vocab_size, dim]`` embedding table (detached copy kept).
        mlp: 2-layer MLP (Linear-GELU-Linear, the default) vs a single Linear.
        vocab_bias: learn a per-token output bias.
    """

    def __init__(self, hidden_size: int, embedding_matrix: torch.Tensor, mlp: bool = True, vocab_bias: bool = True):
        super().__init__()
        emb = _check_embedding(embedding_matrix)
        if int(hidden_size) != hidden_size or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        self.hidden_size = int(hidden_size)
        vocab_size, dim = emb.shape
        self.vocab_size, self.embed_dim = int(vocab_size), int(dim)
        self.register_buffer("embedding_matrix", emb.clone().float(), persistent=False)
        if mlp:
            self.proj = nn.Sequential(nn.Linear(self.hidden_size, dim), nn.GELU(), nn.Linear(dim, dim))
        else:
            self.proj = nn.Linear(self.hidden_size, dim)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if vocab_bias else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[..., hidden_size]`` hidden states → ``[..., vocab_size]`` logits over plain tokens."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states last dim {hidden_states.shape[-1]} does not match the head's hidden_size {self.hidden_size}"
            )
        z = self.proj(hidden_states.to(self.embedding_matrix.dtype))
        logits = z @ self.embedding_matrix.T
        if self.bias is not None:
            logits = logits + self.bias
        return logits


def reconstruction_loss(
    head: ReconstructionHead,
    hidden_states: torch.Tensor,
    original_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of recovering the plain tokens from hidden states of privatized input.

    ``hidden_states[b, t]`` must be the frozen model's hidden state at the
    position of the privatized token whose plain id is ``original_ids[b, t]``
    (if a soft prompt of length P is prepended, drop its P positions first).
    Positions with ``attention_mask == 0`` or ``original_ids == -100`` are
    ignored.  Combine with the prompt-tuning loss as
    ``total = task_loss + λ · reconstruction_loss(...)`` (λ = ``rapt_lambda``,
    λ = 1 is the plain joint objective; the head's parameters are optimised
    together with the soft prompt).

    Returns:
        A scalar tensor (0.0, still differentiable, if no position counts).
    Raises:
        ValueError: on shape mismatches between ``hidden_states``,
            ``original_ids`` and ``attention_mask``, or a hidden size mismatch.
    """
    if hidden_states.shape[:-1] != original_ids.shape:
        raise ValueError(
            f"hidden_states leading shape {tuple(hidden_states.shape[:-1])} does not match original_ids shape "
            f"{tuple(original_ids.shape)} (drop soft-prompt positions before calling)"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(original_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match original_ids shape {tuple(original_ids.shape)}"
        )
    targets = original_ids.long().clone()
    if attention_mask is not None:
        targets[attention_mask == 0] = -100
    valid = targets != -100
    if not bool(valid.any()):
        return hidden_states.sum() * 0.0
    logits = head(hidden_states[valid])
    return F.cross_entropy(logits, targets[valid])


def randomized_response_keep_probability(epsilon: float, num_classes: int) -> float:
    """Probability that K-ary randomised response keeps the true label: ``e^ε / (e^ε + K − 1)``."""
    eps = _positive(epsilon, "label epsilon", "randomised response")
    k = int(num_classes)
    if k < 1 or k != num_classes:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if math.isinf(eps) or k == 1:
        return 1.0
    return 1.0 / (1.0 + (k - 1) * math.exp(-eps))


def randomized_response(labels: torch.Tensor, num_classes: int, epsilon: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """K-ary randomised response (Warner 1965; Kairouz, Oh & Viswanath 2016): ε-LDP per label.

    Each label is kept with probability ``e^ε / (e^ε + K − 1)`` and otherwise replaced by one of
    the other ``K − 1`` labels uniformly, so for any true labels ``y, y'`` and output ``z``:
    ``P[M(y) = z] ≤ e^ε · P[M(y') = z]``. ``epsilon = inf`` (or K = 1) returns the labels
    unchanged. ``generator`` should come from :func:`post_fl.privacy.randomness.dp_torch_generator`.
    """
    keep_p = randomized_response_keep_probability(epsilon, num_classes)
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError("labels must be an integer torch.Tensor")
    y = labels.long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got min {int(y.min())}, max {int(y.max())}")
    if keep_p == 1.0 or y.numel() == 0:
        return y.clone()
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keep = torch.rand(y.shape, generator=generator, device=gen_device) < keep_p
    # a uniformly random *other* label: y + offset (mod K), offset in 1..K-1
    offset = torch.randint(1, int(num_classes), y.shape, generator=generator, device=gen_device)
    flipped = (y.to(gen_device) + offset) % int(num_classes)
    return torch.where(keep, y.to(gen_device), flipped).to(y.device)
