"""Soft prompts: trainable virtual-token embeddings prepended to a frozen model's input.

Saved format (a PEFT prompt-tuning adapter, loadable with ``peft.PeftModel.from_pretrained``):

``<dir>/adapter_config.json``
    PEFT ``PromptTuningConfig`` fields: ``peft_type = "PROMPT_TUNING"``, ``task_type``,
    ``num_virtual_tokens``, ``token_dim``, ``num_transformer_submodules = 1``,
    ``base_model_name_or_path``, ...
``<dir>/adapter_model.safetensors``
    one float32 tensor ``prompt_embeddings`` of shape (num_virtual_tokens, token_dim).
``<dir>/post_fl.json``
    provenance that PEFT does not know: head, stage, epsilon, delta, label words, template.

Because every example in a batch is prefixed by the same prompt, the per-example gradient
of the prompt is simply that example's gradient w.r.t. its own copy of the prompt, which
the ordinary backward pass already computes. :func:`prompt_grad_sampler` hands exactly
that to Opacus, so DP-SGD costs one backward pass and no per-sample machinery.

This is the *input* prompt form; the deep form (a prompt at every layer, its own saved format) is
:mod:`post_fl.core.deep_prompt`, whose :func:`~post_fl.core.deep_prompt.load_any_prompt` reads either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .jsonio import jsonable

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROVENANCE = "post_fl.json"
PEFT_TASK_TYPES = {"causal": "CAUSAL_LM", "masked": "SEQ_CLS", "embedding": "FEATURE_EXTRACTION"}


class PromptError(ValueError):
    """A prompt file or tensor is unusable; the message names the file and field."""


class SoftPrompt(nn.Module):
    """``num_virtual_tokens`` trainable embeddings prepended to every input sequence."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] < 1:
            raise PromptError(f"prompt weight must be (num_virtual_tokens, dim), got shape {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().clone().float())

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Prepend the prompt to ``inputs_embeds`` (B x L x D) giving B x (N + L) x D."""
        if inputs_embeds.shape[-1] != self.dim:
            raise PromptError(f"prompt has embedding size {self.dim} but the model's embeddings have "
                              f"size {inputs_embeds.shape[-1]}")
        prefix = self.weight.unsqueeze(0).expand(inputs_embeds.shape[0], -1, -1).to(inputs_embeds.dtype)
        return torch.cat([prefix, inputs_embeds], dim=1)


def _register_opacus_grad_sampler() -> None:
    from opacus.grad_sample import register_grad_sampler

    @register_grad_sampler(SoftPrompt)
    def prompt_grad_sampler(layer: SoftPrompt, activations, backprops: torch.Tensor) -> dict:
        """Per-example prompt gradient: the gradient w.r.t. the example's own prompt copy."""
        return {layer.weight: backprops[:, : layer.num_virtual_tokens, :].to(layer.weight.dtype)}


try:  # Opacus is a core dependency, but the prompt module is usable without it.
    _register_opacus_grad_sampler()
except ImportError:  # pragma: no cover
    pass


def init_from_vocab(word_embeddings: torch.Tensor, num_virtual_tokens: int,
                    generator: torch.Generator | None = None) -> SoftPrompt:
    """A prompt whose virtual tokens are copies of random vocabulary embeddings (Lester et al. 2021)."""
    vocab = word_embeddings.shape[0]
    idx = torch.randint(0, vocab, (num_virtual_tokens,), generator=generator)
    return SoftPrompt(word_embeddings[idx].detach())


def init_from_text(word_embeddings: torch.Tensor, token_ids: list[int], num_virtual_tokens: int) -> SoftPrompt:
    """A prompt initialised from the embeddings of a text's tokens, repeated/cut to length."""
    if not token_ids:
        raise PromptError("prompt init text tokenizes to nothing")
    reps = (num_virtual_tokens + len(token_ids) - 1) // len(token_ids)
    ids = (token_ids * reps)[:num_virtual_tokens]
    return SoftPrompt(word_embeddings[torch.tensor(ids)].detach())


def write_prompt_files(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict,
                       provenance: dict) -> Path:
    """Write a prompt directory: ``tensors`` to :data:`ADAPTER_WEIGHTS`, ``config`` to :data:`ADAPTER_CONFIG`,
    ``provenance`` to :data:`PROVENANCE`. Each file goes to a temporary name and is then renamed, so a
    crash never leaves half a prompt. Returns the directory."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c, tmp_p = (d / (name + ".tmp") for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, PROVENANCE))
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, str(tmp_w))
    tmp_c.write_text(json.dumps(config, indent=2))
    tmp_p.write_text(json.dumps(jsonable(provenance), indent=2, default=str))
    tmp_w.replace(d / ADAPTER_WEIGHTS)
    tmp_c.replace(d / ADAPTER_CONFIG)
    tmp_p.replace(d / PROVENANCE)
    return d


def save_prompt(prompt: SoftPrompt | torch.Tensor, directory: str | Path, *, head: str,
                base_model: str = "", num_layers: int | None = None, num_attention_heads: int | None = None,
                metadata: dict[str, Any] | None = None) -> Path:
    """Write a prompt as a PEFT prompt-tuning adapter (see module docstring). Returns the directory.

    Files are written to temporary names and renamed, so a crash never leaves half a prompt.
    """
    weight = prompt.weight if isinstance(prompt, SoftPrompt) else prompt
    weight = weight.detach().to("cpu", torch.float32).contiguous()
    if weight.dim() != 2:
        raise PromptError(f"prompt must be 2-D (num_virtual_tokens, dim), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise PromptError("refusing to save a prompt with NaN or Inf values")
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": PEFT_TASK_TYPES.get(head, "FEATURE_EXTRACTION"),
        "num_virtual_tokens": weight.shape[0],
        "token_dim": weight.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
    }
    return write_prompt_files(directory, {"prompt_embeddings": weight}, config, {"head": head, **(metadata or {})})


def read_prompt_config(directory: str | Path) -> dict:
    """The :data:`ADAPTER_CONFIG` of a saved prompt directory (which must also hold :data:`ADAPTER_WEIGHTS`)."""
    d = Path(directory)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise PromptError(f"{d}: no {ADAPTER_CONFIG}; not a saved prompt")
    if not w_path.is_file():
        raise PromptError(f"{d}: no {ADAPTER_WEIGHTS}; not a saved prompt")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise PromptError(f"{cfg_path}: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise PromptError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    return config


def read_prompt_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved prompt's :data:`ADAPTER_WEIGHTS`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    w_path = Path(directory) / ADAPTER_WEIGHTS
    try:
        return load_file(str(w_path))
    except (SafetensorError, OSError) as exc:
        raise PromptError(f"{w_path}: cannot read ({exc})") from None


def read_provenance(directory: str | Path) -> dict | None:
    """The post-fl provenance (:data:`PROVENANCE`) of a saved prompt, or None when there is none."""
    p = Path(directory) / PROVENANCE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise PromptError(f"{p}: not valid JSON ({exc.msg})") from None


def load_prompt(directory: str | Path, expected_dim: int | None = None) -> tuple[SoftPrompt, dict]:
    """Read a prompt saved by :func:`save_prompt` (or by PEFT); check its size.

    Returns (prompt, adapter config with the provenance, if any, under ``"post_fl"``). A deep prompt
    (``peft_type = "POST_FL_DEEP_PROMPT"``) is refused here; :func:`post_fl.core.deep_prompt.load_any_prompt`
    reads either form.
    """
    d = Path(directory)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    config = read_prompt_config(d)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise PromptError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}, expected 'PROMPT_TUNING'")
    tensors = read_prompt_tensors(d)
    if "prompt_embeddings" not in tensors:
        raise PromptError(f"{w_path}: no tensor 'prompt_embeddings' (found {sorted(tensors)})")
    weight = tensors["prompt_embeddings"]
    n, dim = config.get("num_virtual_tokens"), config.get("token_dim")
    if weight.dim() != 2 or (n is not None and weight.shape[0] != n * config.get("num_transformer_submodules", 1)) \
            or (dim is not None and weight.shape[1] != dim):
        raise PromptError(f"{w_path}: prompt_embeddings has shape {tuple(weight.shape)} but {ADAPTER_CONFIG} "
                          f"says num_virtual_tokens={n}, token_dim={dim}")
    if expected_dim is not None and weight.shape[1] != expected_dim:
        raise PromptError(f"{d}: prompt has embedding size {weight.shape[1]}, but the model expects "
                          f"{expected_dim}; it was tuned for another model")
    if not torch.isfinite(weight).all():
        raise PromptError(f"{w_path}: prompt_embeddings contains NaN or Inf")
    provenance = read_provenance(d)
    if provenance is not None:
        config["post_fl"] = provenance
    return SoftPrompt(weight), config
