"""Where randomness comes from: one seed for the harmless part, fresh OS entropy for privacy.

Two kinds of randomness exist in post-fl and they never mix:

* **Non-private randomness** (prompt initialisation, data splits and partitions, distillation
  batches, transfer batches) comes from the run's one ``seed`` so that experiments repeat.
* **Privacy mechanisms** (DP-SGD's Gaussian noise and Poisson batch sampling, DP-FedAvg's
  noise and Poisson client sampling, distributed-DP noise shares, RAPT's d_chi noise) draw from
  generators seeded with fresh bytes from ``os.urandom`` *on the party that adds the noise*,
  every time a mechanism starts. No config value and no server-sent number can predict them.

Bit-exact reproducibility of a DP run exists only behind the explicit ``insecure_reproducible``
switch (``--insecure-reproducible`` on the command line, ``insecure_reproducible = true`` in a
config or run-config). It seeds the mechanisms from the config seed, so the released prompt is
**not private** against anyone who knows the config; every output of such a run carries
:data:`NOT_PRIVATE_LABEL`. Use it for tests and debugging only.

Opacus' own ``secure_mode`` needs ``torchcsprng``, which has no build for the pinned torch, so
the generators here are torch's / numpy's default PRNGs seeded with 64 (torch) or 128 (numpy)
bits of OS entropy: unpredictable to the server and other parties, though not a CSPRNG.
"""

from __future__ import annotations

import os

import numpy as np
import torch

NOT_PRIVATE_LABEL = ("NOT PRIVATE: insecure_reproducible mode seeds the DP noise and sampling from the "
                     "config seed; the reported epsilon does not hold against anyone who knows the config")


def fresh_seed(bits: int = 64) -> int:
    """A non-negative integer of ``bits`` bits read from the operating system's entropy source."""
    return int.from_bytes(os.urandom((bits + 7) // 8), "big") & ((1 << bits) - 1)


def _mix(insecure_seed: int, stream: tuple[int, ...]) -> int:
    """A 63-bit seed for one named stream of the insecure mode (SeedSequence over seed + stream ids)."""
    words = np.random.SeedSequence([int(insecure_seed) & 0xFFFFFFFFFFFFFFFF, *[int(s) for s in stream]])
    return int(words.generate_state(2, np.uint64)[0] & np.uint64(0x7FFFFFFFFFFFFFFF))


def dp_torch_generator(insecure_seed: int | None = None, *stream: int,
                       device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` (where its noise is drawn: a CUDA generator for noise added to CUDA
    tensors, as Opacus requires) for a privacy mechanism: OS-entropy seeded, or (insecure mode only) from
    ``insecure_seed`` and the ``stream`` ids that tell mechanisms, rounds and clients apart."""
    seed = fresh_seed(63) if insecure_seed is None else _mix(insecure_seed, stream)
    return torch.Generator(device=device).manual_seed(seed)


def dp_numpy_rng(insecure_seed: int | None = None, *stream: int) -> np.random.Generator:
    """A numpy generator for a privacy mechanism (see :func:`dp_torch_generator`)."""
    if insecure_seed is None:
        return np.random.default_rng(fresh_seed(128))
    return np.random.default_rng(_mix(insecure_seed, stream))
