"""Where a run computes: the device and the precision of its frozen models, resolved once from ``[compute]``.

:func:`resolve_compute` is the one place that turns ``compute.device`` / ``compute.dtype`` into a torch device
and dtype. The loaders (:func:`post_fl.core.models.load_scoring_model`, through :mod:`post_fl.core.tasks` and the
federated server and clients) put every frozen model there and attach the :class:`Compute` to it; every stage
then takes the device from its model: prompts are made on it, encoded batches are moved to it inside
:meth:`~post_fl.core.models.ScoringModel.hidden_states`, Opacus takes per-example gradients there, the
transfer's fixed targets and the distillation's cached teacher outputs live there, and the DP noise is drawn
there from an OS-entropy generator on that device (:func:`post_fl.privacy.randomness.dp_torch_generator`).

**Device.** ``auto`` = the current CUDA GPU, else Apple's MPS, else the CPU. A device asked for explicitly that
is not there (``cuda`` without a CUDA GPU or without a CUDA build of torch, ``cuda:3`` on a machine with one GPU,
``mps`` off a Mac) raises :class:`DeviceError` naming ``compute.device`` and the device; preflight reports it
before any stage runs.

**Precision.** ``dtype`` is that of the *frozen* teacher and student weights. ``auto`` = bfloat16 on a CUDA GPU
that supports it (Ampere or newer), float32 on every other device: on a CPU float32 keeps results comparable
to every figure recorded so far. ``bfloat16`` may be asked for on any device; on a CPU with AMX or avx512_bf16
it is faster (measured: docs/benchmarks.md#gpu) and class scores differ slightly. Whatever the dtype, prompts,
optimiser state, answer-position logits, class scores, losses and the DP clipping and noise are float32
(:meth:`~post_fl.core.models.ScoringModel.answer_logits_from_hidden` casts the logits up), and a student being
distilled trains in float32. The teacher's weight hash includes its dtype, so caches keyed by it (teacher
outputs, students, zero-shot scores) never mix precisions.

**Batch sizes.** :func:`pass_rows` gives the rows of one forward pass where a batch bounds only memory, not a
result beyond float rounding: ``compute.batch_size`` when set, else the stage's own setting on a CPU and at
least :data:`GPU_PASS_ROWS` on a GPU. Logical batch sizes that are hyper-parameters (``tune.batch_size``, the
DP-SGD sampling rate; ``transfer.batch_size`` and ``distill.batch_size`` per step) are never changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .config import ComputeConfig, ConfigError

GPU_PASS_ROWS = 256  # rows of a memory-bound pass on a GPU when compute.batch_size = 0 (a fixed rule, not measured)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class DeviceError(ConfigError):
    """A device or precision asked for is not available on this machine; the message names the setting."""


@dataclass(frozen=True)
class Compute:
    """A resolved ``[compute]``: the torch device, the dtype of frozen models and the pass-size override."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    batch_size: int = 0  # compute.batch_size; 0 = auto (:func:`pass_rows`)

    def describe(self) -> dict:
        """For result files: the device, its name, the dtype of frozen models."""
        name = "cpu"
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
        elif self.device.type == "mps":
            name = "Apple MPS"
        return {"device": str(self.device), "device_name": name, "dtype": dtype_name(self.dtype),
                "batch_size": self.batch_size}


CPU = Compute(torch.device("cpu"))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str) -> torch.device:
    """``compute.device`` as a torch device; :class:`DeviceError` when it is not on this machine."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not mps_available():
            raise DeviceError("compute.device = 'mps': Apple's MPS backend is not available on this machine; "
                              "use 'auto' or 'cpu'")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"compute.device = {spec!r}: {why} (torch {torch.__version__}); use 'auto' or 'cpu'")
        count = torch.cuda.device_count()
        index = int(spec.split(":", 1)[1]) if ":" in spec else torch.cuda.current_device()
        if index >= count:
            raise DeviceError(f"compute.device = {spec!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    raise DeviceError(f"compute.device: expected auto|cpu|cuda|cuda:N|mps, got {spec!r}")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``compute.dtype`` on ``device``: ``auto`` = bfloat16 on a CUDA GPU that supports it, float32 elsewhere."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if spec == "auto":
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if spec not in DTYPES:
        raise DeviceError(f"compute.dtype: expected auto|float32|bfloat16, got {spec!r}")
    if spec == "bfloat16" and device.type == "cuda" and not cuda_bf16:
        raise DeviceError(f"compute.dtype = 'bfloat16': {torch.cuda.get_device_name(device)} ({device}) does not "
                          "support bfloat16; use 'auto' or 'float32'")
    return DTYPES[spec]


def resolve_compute(cfg: ComputeConfig | None = None) -> Compute:
    """The one place ``[compute]`` is resolved (default: ``auto`` everything)."""
    cfg = cfg or ComputeConfig()
    device = resolve_device(cfg.device)
    return Compute(device, resolve_dtype(cfg.dtype, device), cfg.batch_size)


def compute_problems(cfg: ComputeConfig) -> list[str]:
    """Preflight: the ``[compute]`` settings this machine cannot honour (empty when it can)."""
    try:
        resolve_compute(cfg)
    except DeviceError as exc:
        return [str(exc)]
    return []


def model_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without parameters)."""
    return next(iter(module.parameters()), torch.empty(0)).device


def pass_rows(configured: int, model: nn.Module) -> int:
    """Rows per forward pass of ``model`` where the batch bounds only memory: ``compute.batch_size`` when set,
    else ``configured`` (the stage's own setting) on a CPU and at least :data:`GPU_PASS_ROWS` on a GPU."""
    compute = getattr(model, "compute", None)
    if compute is not None and compute.batch_size:
        return compute.batch_size
    return configured if model_device(model).type == "cpu" else max(configured, GPU_PASS_ROWS)


def misplaced(named: Iterable[tuple[str, torch.Tensor]], device: torch.device,
              dtype: torch.dtype | None = None) -> list[str]:
    """Every named tensor that is not on ``device`` (or, for floating-point tensors, not of ``dtype`` when given),
    as ``"name: device, dtype"``: an audit of what a stage hands on."""
    device = torch.device(device)
    out = []
    for name, t in named:
        wrong_device = t.device.type != device.type or (device.index is not None and t.device.index != device.index)
        if wrong_device or (dtype is not None and t.is_floating_point() and t.dtype != dtype):
            out.append(f"{name}: {t.device}, {dtype_name(t.dtype)}")
    return out
