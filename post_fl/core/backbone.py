"""The anatomy of a Hugging Face backbone that post-fl relies on: where its transformer layers are.

Students keep some of the teacher's layers (:mod:`post_fl.method.student`) and deep prompts hook every
layer (:mod:`post_fl.core.deep_prompt`); both find the layers here, the same way for every architecture.
"""

from __future__ import annotations

from torch import nn


def transformer_layers(backbone: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The (parent module, attribute name, ModuleList) holding the ``config.num_hidden_layers`` transformer layers.

    The first ``ModuleList`` of exactly that length, in module order (GPT-2's ``transformer.h``, BERT's
    ``encoder.layer``, LLaMA's ``model.layers``, ...). Raises ``ValueError`` naming the class when none is.
    """
    n = getattr(backbone.config, "num_hidden_layers", 0)
    for _, module in backbone.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n and n > 0:
                return module, attr, child
    raise ValueError(f"cannot find the {n} transformer layers of {type(backbone).__name__}")
