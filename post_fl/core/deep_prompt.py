"""Deep prompts: a soft prompt at every transformer layer (prefix-tuning / P-tuning v2 style).

A :class:`DeepPrompt` holds ``weight`` of shape (L, P, D): L transformer layers, P virtual tokens, width
D. At layer 0 its P vectors are prepended to the input embeddings, exactly like an input prompt
(:class:`post_fl.core.prompt.SoftPrompt`); at every layer l >= 1 a forward pre-hook on that layer
*replaces* the hidden states at the P prompt positions with the layer's P vectors. The prompt thus sets
the residual stream of its positions at every depth instead of only at the bottom, which steers a
small (few-layer) student far more than an input prompt can.

**Units.** ``weight`` is stored in units of each layer's hidden-state RMS on text: the vectors a layer
sees are ``weight[l] * scales[l]``. The hidden-state scale grows by two orders of magnitude with depth
(about 200x over SmolLM2's layers), so in raw units one learning rate (Adam's step is about ``lr`` per
coordinate) would be far too large at the bottom or far too small at the top; in these units it fits
every layer. ``scales`` (shape (L,)) is a plain tensor, not a parameter and not a buffer (Opacus refuses
buffers in trainable modules); it is fixed when the prompt is made.

**Initialisation from the model's own states** (:func:`deep_prompt_from_input`): the model runs once with
an input prompt on a neutral text; the hidden states entering each layer at the prompt positions become
that layer's vectors, divided by the layer's RMS over the text positions (which becomes ``scales``). At
init the deep prompt therefore *is* that input prompt: for a causal model its prompt positions see only
the prompt, so class scores are equal on every text (within float rounding); for a bidirectional encoder
the prompt's states depend on the text, so they are equal on the neutral text and close elsewhere.
Training starts from a point the model already handles instead of from random vectors of the wrong
scale. :meth:`DeepPrompt.input_prompt` (the layer-0 slice, an ordinary :class:`SoftPrompt`) is what a
deep student prompt means on another model: "direct use" on the teacher and the transfer's start.

**DP-SGD.** :meth:`DeepPrompt.forward` returns per-example copies (B, L, P, D) of ``weight * scales``,
which the model consumes; the Opacus grad sampler registered below hands Opacus each example's gradient
w.r.t. its own copy, times ``scales`` (the chain rule through ``copies = weight * scales``). One backward
pass gives every per-example gradient, as for the input prompt.

**Hooks** (:func:`deep_prompt_hooks`) are installed once per layer (idempotently; a deep copy of the
backbone carries working hooks), do nothing unless a forward of *that* backbone carries a deep prompt
(a :mod:`contextvars` variable set by ``ScoringModel.hidden_states``, so threads and unprompted forwards
are unaffected) and can be removed (:func:`remove_deep_prompt_hooks`).

**Saved format** (``peft_type = "POST_FL_DEEP_PROMPT"``, the same directory layout as an input prompt)::

    <dir>/adapter_config.json       peft_type, task_type, num_layers, num_virtual_tokens, token_dim,
                                    base_model_name_or_path, format_version, units
    <dir>/adapter_model.safetensors weight (L, P, D) float32 and scales (L,) float32
    <dir>/post_fl.json              provenance: head, stage, epsilon, delta, label words, template

It is not PEFT's prefix-tuning format on purpose: PEFT's prefix tuning stores per-layer attention
past key/values (2 x L x P x D, consumed as a KV cache), whereas a deep prompt replaces the hidden
states at the prompt positions before each layer; the two are different models of the prompt, so
PEFT could load the file but would compute something else. ``peft_type`` is therefore post-fl's own,
and PEFT refuses the directory instead of misreading it. :func:`load_any_prompt` reads either form.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .backbone import transformer_layers
from .config import PROMPT_FORMS, PromptConfig
from .prompt import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_TASK_TYPES, PromptError, SoftPrompt, init_from_text,
                     init_from_vocab, load_prompt, read_prompt_config, read_prompt_tensors, read_provenance,
                     save_prompt, write_prompt_files)

DEEP_PEFT_TYPE = "POST_FL_DEEP_PROMPT"
DEEP_FORMAT_VERSION = 1
# the neutral text a deep prompt's init and scales are measured on (no task content, no label word)
NEUTRAL_TEXT = "This is a sentence about a film, and what I thought of it."


class DeepPrompt(nn.Module):
    """P trainable vectors per transformer layer, in units of each layer's hidden-state RMS (module docstring)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        if weight.dim() != 3 or min(weight.shape) < 1:
            raise PromptError(f"deep prompt weight must be (num_layers, num_virtual_tokens, dim), "
                              f"got shape {tuple(weight.shape)}")
        scales = torch.as_tensor(scales).detach().float().reshape(-1)
        if scales.shape[0] != weight.shape[0]:
            raise PromptError(f"deep prompt scales must have one entry per layer ({weight.shape[0]}), "
                              f"got shape {tuple(scales.shape)}")
        if not (torch.isfinite(scales).all() and (scales > 0).all()):
            raise PromptError("deep prompt scales must be finite and > 0")
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.scales = scales.to(self.weight.device, copy=True)  # plain tensor: Opacus refuses buffers in trainable modules

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` and the like move ``scales`` with ``weight`` (it is not a parameter or buffer)."""
        out = super()._apply(fn, recurse)
        self.scales = self.scales.to(self.weight.device)
        return out

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[1]

    @property
    def dim(self) -> int:
        return self.weight.shape[2]

    def vectors(self) -> torch.Tensor:
        """The hidden-state vectors themselves, ``weight * scales`` (L, P, D)."""
        return self.weight * self.scales.to(self.weight.device)[:, None, None]

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Per-example copies (B, L, P, D) of :meth:`vectors` for a batch of input embeddings (B, T, D)."""
        if inputs_embeds.shape[-1] != self.dim:
            raise PromptError(f"deep prompt has width {self.dim} but the model's embeddings have "
                              f"size {inputs_embeds.shape[-1]}")
        return self.vectors().unsqueeze(0).expand(inputs_embeds.shape[0], -1, -1, -1)

    def input_prompt(self) -> SoftPrompt:
        """The layer-0 slice as an ordinary input prompt (raw embedding units): this prompt on another model."""
        return SoftPrompt(self.vectors()[0].detach())

    def with_weight(self, weight: torch.Tensor) -> "DeepPrompt":
        """A deep prompt with these ``weight`` values (same units, so the same ``scales``)."""
        return DeepPrompt(torch.as_tensor(weight), self.scales)


def prompt_form(prompt: SoftPrompt | DeepPrompt) -> str:
    """The form of a prompt object: "deep" (a prompt at every layer) or "input" (virtual tokens before the input)."""
    return "deep" if isinstance(prompt, DeepPrompt) else "input"


def as_input_prompt(prompt: SoftPrompt | DeepPrompt) -> SoftPrompt:
    """An input prompt for use on another model: ``prompt`` itself, or a deep prompt's layer-0 slice."""
    return prompt.input_prompt() if isinstance(prompt, DeepPrompt) else prompt


def _register_opacus_grad_sampler() -> None:
    from opacus.grad_sample import register_grad_sampler

    @register_grad_sampler(DeepPrompt)
    def deep_prompt_grad_sampler(layer: DeepPrompt, activations, backprops: torch.Tensor) -> dict:
        """Per-example gradient of ``weight``: the gradient w.r.t. the example's own copy (B, L, P, D) times
        ``scales`` (copies = weight * scales)."""
        scales = layer.scales.to(backprops.device, layer.weight.dtype)
        return {layer.weight: backprops.to(layer.weight.dtype) * scales[None, :, None, None]}


try:  # Opacus is a core dependency, but the module is usable without it.
    _register_opacus_grad_sampler()
except ImportError:  # pragma: no cover
    pass


# ---------------------------------------------------------------- hooks
# (id of each layer of the backbone being run -> its index, per-example copies B x L x P x D) while a forward
# with a deep prompt runs in this context; None otherwise
_ACTIVE: contextvars.ContextVar[tuple[dict[int, int], torch.Tensor] | None] = \
    contextvars.ContextVar("post_fl_deep_prompt", default=None)


def _replace_prompt_states(layer: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a transformer layer: replace the input hidden states at the prompt positions
    by the deep prompt's vectors of this layer (layers >= 1; layer 0 receives them prepended)."""
    active = _ACTIVE.get()
    if active is None:
        return None
    index, copies = active
    li = index.get(id(layer))
    if not li:  # not this backbone's layer, or layer 0
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    p = copies.shape[2]
    replaced = torch.cat([copies[:, li].to(hidden.dtype), hidden[:, p:]], dim=1)
    if args:
        return (replaced, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": replaced}


def _has_hook(layer: nn.Module) -> bool:
    return any(h is _replace_prompt_states for h in layer._forward_pre_hooks.values())


def install_deep_prompt_hooks(backbone: nn.Module) -> nn.ModuleList:
    """Put the prompt-state pre-hook on every transformer layer of ``backbone`` that lacks it; returns the
    layers. Idempotent. The hooks act only during :func:`deep_prompt_hooks`."""
    layers = transformer_layers(backbone)[2]
    for layer in layers:
        if not _has_hook(layer):
            layer.register_forward_pre_hook(_replace_prompt_states, with_kwargs=True)
    return layers


def remove_deep_prompt_hooks(backbone: nn.Module) -> int:
    """Remove the prompt-state hooks from ``backbone``'s layers; returns how many were removed."""
    removed = 0
    for layer in transformer_layers(backbone)[2]:
        for key in [k for k, h in layer._forward_pre_hooks.items() if h is _replace_prompt_states]:
            del layer._forward_pre_hooks[key]
            layer._forward_pre_hooks_with_kwargs.pop(key, None)
            removed += 1
    return removed


@contextlib.contextmanager
def deep_prompt_hooks(backbone: nn.Module, copies: torch.Tensor) -> Iterator[None]:
    """Within this block, forwards of ``backbone`` in this thread/context put ``copies`` (B x L x P x D) at
    the prompt positions of every layer >= 1 (the caller prepends ``copies[:, 0]`` to the embeddings)."""
    layers = install_deep_prompt_hooks(backbone)
    if copies.dim() != 4 or copies.shape[1] != len(layers):
        raise PromptError(f"deep prompt has {copies.shape[1] if copies.dim() == 4 else '?'} layers but the model "
                          f"{type(backbone).__name__} has {len(layers)} transformer layers; it was made for "
                          "another model")
    token = _ACTIVE.set(({id(layer): i for i, layer in enumerate(layers)}, copies))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def num_model_layers(model) -> int:
    """How many transformer layers the backbone of a :class:`post_fl.core.models.ScoringModel` has."""
    return len(transformer_layers(model.backbone)[2])


# ---------------------------------------------------------------- making deep prompts
def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu().double().pow(2).mean().sqrt().float()  # on the CPU: MPS has no float64


@torch.no_grad()
def layer_input_states(model, soft: SoftPrompt, text: str = NEUTRAL_TEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """(states (L, P, D), RMS (L,)) of ``model`` (a ScoringModel) run with input prompt ``soft`` on ``text``.

    Layer 0: the prompt itself and the RMS of the text's input embeddings (what layer 0's prompt vectors are
    prepended to). Layer l >= 1: the hidden states entering layer l at the prompt positions, and their RMS
    over the text positions.
    """
    layers = transformer_layers(model.backbone)[2]
    seen: dict[int, torch.Tensor] = {}

    def record(i: int):
        def hook(module, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    batch = model.encode([text])
    try:
        model.hidden_states(batch.input_ids, batch.attention_mask, soft)
    finally:
        for h in handles:
            h.remove()
    p = soft.num_virtual_tokens
    embeds = model.backbone.get_input_embeddings()(batch.input_ids.to(model.device))[0].detach()
    states = [soft.weight.detach().to(embeds.dtype)] + [seen[i][0, :p] for i in range(1, len(layers))]
    rms = [_rms(embeds)] + [_rms(seen[i][0, p:]) for i in range(1, len(layers))]
    return torch.stack(states).float(), torch.stack(rms).float()


def deep_prompt_from_input(model, soft: SoftPrompt, text: str = NEUTRAL_TEXT) -> DeepPrompt:
    """The deep prompt equivalent to input prompt ``soft`` on ``model`` (module docstring, initialisation)."""
    states, rms = layer_input_states(model, soft, text)
    rms = rms.to(states.device)
    return DeepPrompt(states / rms[:, None, None], rms)


def resolved_form(model, form: str) -> str:
    """The prompt form ``form`` names on ``model``: ``"auto"`` is a deep prompt on a causal LM (where the
    student frontier measured it to steer a small student 2-3x more than an input prompt) and an input
    prompt on any other head (not measured there)."""
    if form != "auto":
        return form
    return "deep" if getattr(model, "head", "") == "causal" else "input"


def new_prompt(model, cfg: PromptConfig, seed: int, form: str | None = None) -> SoftPrompt | DeepPrompt:
    """The starting prompt of ``cfg`` on ``model`` (a ScoringModel): random vocabulary embeddings (seeded by
    ``seed``) or ``cfg.init_text``'s embeddings, as an input prompt or, for form ``"deep"`` (``form`` or else
    ``cfg.form``), the deep prompt made from it. Depends only on the model, ``cfg`` and ``seed``."""
    form = resolved_form(model, form or cfg.form)
    if form not in PROMPT_FORMS:
        raise PromptError(f"prompt form {form!r} unknown; expected one of {', '.join(PROMPT_FORMS)}")
    if cfg.init == "text":
        soft = init_from_text(model.word_embeddings, model._ids(cfg.init_text), cfg.num_virtual_tokens)
    else:
        soft = init_from_vocab(model.word_embeddings, cfg.num_virtual_tokens, torch.Generator().manual_seed(seed))
    return soft if form == "input" else deep_prompt_from_input(model, soft)


def prompt_with_weight(weight, model, cfg: PromptConfig, seed: int) -> SoftPrompt | DeepPrompt:
    """A prompt module of form ``cfg.form`` holding ``weight`` (a tensor or array: (P, D) input, (L, P, D) deep).

    A deep prompt's ``scales`` are those of :func:`new_prompt` ``(model, cfg, seed)``, recomputed here: they
    depend only on the model and the non-private prompt settings, so a federated client and the server get
    the same ones without sending them.
    """
    w = torch.as_tensor(weight, dtype=torch.float32).to(model.device)  # where the model computes
    if resolved_form(model, cfg.form) == "input":
        if w.dim() != 2:
            raise PromptError(f"prompt.form = 'input' expects a (num_virtual_tokens, dim) prompt, got shape "
                              f"{tuple(w.shape)}")
        return SoftPrompt(w)
    start = new_prompt(model, cfg, seed, "deep")
    if tuple(w.shape) != tuple(start.weight.shape):
        raise PromptError(f"prompt.form = 'deep' expects a (num_layers, num_virtual_tokens, dim) = "
                          f"{tuple(start.weight.shape)} prompt for this model, got shape {tuple(w.shape)}")
    return start.with_weight(w)


# ---------------------------------------------------------------- saving and loading
def save_deep_prompt(prompt: DeepPrompt, directory: str | Path, *, head: str, base_model: str = "",
                     metadata: dict[str, Any] | None = None) -> Path:
    """Write a deep prompt in post-fl's own format (module docstring), atomically. Returns the directory."""
    weight, scales = prompt.weight.detach().cpu().float(), prompt.scales.detach().cpu().float()
    if not (torch.isfinite(weight).all() and torch.isfinite(scales).all()):
        raise PromptError("refusing to save a deep prompt with NaN or Inf values")
    config = {
        "peft_type": DEEP_PEFT_TYPE,
        "format_version": DEEP_FORMAT_VERSION,
        "task_type": PEFT_TASK_TYPES.get(head, "FEATURE_EXTRACTION"),
        "num_layers": prompt.num_layers,
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "token_dim": prompt.dim,
        "base_model_name_or_path": base_model,
        "units": "hidden states entering layer l at the prompt positions are weight[l] * scales[l]; layer 0's "
                 "are prepended to the input embeddings, later layers' replace the prompt positions",
        "inference_mode": True,
    }
    return write_prompt_files(directory, {"weight": weight, "scales": scales}, config,
                              {"head": head, "prompt_form": "deep", **(metadata or {})})


def load_deep_prompt(directory: str | Path, expected_dim: int | None = None,
                     expected_layers: int | None = None) -> tuple[DeepPrompt, dict]:
    """Read a deep prompt saved by :func:`save_deep_prompt`; check it against the config and the model.

    Returns (prompt, config with the provenance, if any, under ``"post_fl"``).
    """
    d = Path(directory)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    config = read_prompt_config(d)
    if config.get("peft_type") != DEEP_PEFT_TYPE:
        raise PromptError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}, expected {DEEP_PEFT_TYPE!r}")
    version = config.get("format_version")
    if version != DEEP_FORMAT_VERSION:
        raise PromptError(f"{cfg_path}: format_version is {version!r}, expected {DEEP_FORMAT_VERSION}")
    tensors = read_prompt_tensors(d)
    for name in ("weight", "scales"):
        if name not in tensors:
            raise PromptError(f"{w_path}: no tensor {name!r} (found {sorted(tensors)})")
    weight, scales = tensors["weight"], tensors["scales"]
    want = tuple(config.get(k) for k in ("num_layers", "num_virtual_tokens", "token_dim"))
    if weight.dim() != 3 or tuple(weight.shape) != want:
        raise PromptError(f"{w_path}: weight has shape {tuple(weight.shape)} but {ADAPTER_CONFIG} says "
                          f"num_layers, num_virtual_tokens, token_dim = {want}")
    if tuple(scales.shape) != (weight.shape[0],):
        raise PromptError(f"{w_path}: scales has shape {tuple(scales.shape)}, expected ({weight.shape[0]},) "
                          "(one per layer)")
    if not (torch.isfinite(weight).all() and torch.isfinite(scales).all()):
        raise PromptError(f"{w_path}: weight or scales contains NaN or Inf")
    if not (scales > 0).all():
        raise PromptError(f"{w_path}: scales must be > 0")
    if expected_dim is not None and weight.shape[2] != expected_dim:
        raise PromptError(f"{d}: deep prompt has width {weight.shape[2]}, but the model expects {expected_dim}; "
                          "it was tuned for another model")
    if expected_layers is not None and weight.shape[0] != expected_layers:
        raise PromptError(f"{d}: deep prompt has {weight.shape[0]} layers, but the model has {expected_layers} "
                          "transformer layers; it was tuned for another model")
    provenance = read_provenance(d)
    if provenance is not None:
        config["post_fl"] = provenance
    return DeepPrompt(weight, scales), config


def load_any_prompt(directory: str | Path, expected_dim: int | None = None,
                    expected_layers: int | None = None) -> tuple[SoftPrompt | DeepPrompt, dict]:
    """Read an input prompt (PEFT ``PROMPT_TUNING``) or a deep prompt (``POST_FL_DEEP_PROMPT``), by its
    config's ``peft_type``; ``expected_layers`` is checked for deep prompts only."""
    d = Path(directory)
    kind = read_prompt_config(d).get("peft_type")
    if kind == "PROMPT_TUNING":
        return load_prompt(d, expected_dim)
    if kind == DEEP_PEFT_TYPE:
        return load_deep_prompt(d, expected_dim, expected_layers)
    raise PromptError(f"{d / ADAPTER_CONFIG}: peft_type is {kind!r}, expected 'PROMPT_TUNING' (an input prompt) "
                      f"or {DEEP_PEFT_TYPE!r} (a deep prompt)")


def save_any_prompt(prompt: SoftPrompt | DeepPrompt, directory: str | Path, *, head: str, base_model: str = "",
                    num_layers: int | None = None, num_attention_heads: int | None = None,
                    metadata: dict[str, Any] | None = None) -> Path:
    """:func:`save_prompt` for an input prompt (PEFT adapter), :func:`save_deep_prompt` for a deep prompt."""
    if isinstance(prompt, DeepPrompt):
        return save_deep_prompt(prompt, directory, head=head, base_model=base_model, metadata=metadata)
    return save_prompt(prompt, directory, head=head, base_model=base_model, num_layers=num_layers,
                       num_attention_heads=num_attention_heads, metadata=metadata)
