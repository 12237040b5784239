"""The core every other layer builds on: settings, data, models, prompts, caches, progress.

* ``config`` -- typed settings of a run (one place), read from TOML / ``--set``; ``config_help`` says what
  each means (``post-fl show-config``) and writes the config as TOML;
* ``compute`` -- the device and precision a run computes with, resolved once from ``[compute]``;
* ``data`` -- data files, label rules, sentence splitting, partitions among clients;
* ``tasks`` -- a run's task and models read from its config (:func:`load_task`), :class:`PreflightError`;
* ``embedded`` -- the default model and data shipped in registry packages, the post-fl cache folder;
* ``models`` -- a language model as a class scorer (head, template, verbalizer);
* ``prompt`` -- the soft prompt, its Opacus grad sampler, the PEFT prompt-tuning format;
* ``deep_prompt`` -- the deep prompt (a prompt at every layer): hooks, init from the model's states, its format;
* ``backbone`` -- where a backbone's transformer layers are;
* ``keyed_cache``, ``jsonio`` -- cache files named by a content key, strict JSON written atomically;
* ``progress`` -- progress on a terminal and in a log, library noise switched off.

Imports nothing else of post-fl. Names are imported on first use (:mod:`post_fl.core.exports`).
"""

from .exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "config": ("ConfigError", "RunConfig", "ModelConfig", "DataConfig", "PromptConfig", "TuneConfig",
               "DistillConfig", "TransferConfig", "EvalConfig", "ComputeConfig", "load_config", "config_from_dict"),
    "config_help": ("dumps_config", "dumps_config_with_help"),
    "compute": ("Compute", "DeviceError", "resolve_compute", "pass_rows"),
    "data": ("DataError", "TextDataset", "Task", "read_text_file", "write_text_file", "partition"),
    "tasks": ("PreflightError", "load_task", "load_teacher", "load_student"),
    "embedded": ("load_embedded_task", "cache_dir"),
    "models": ("ModelError", "EncodedBatch", "ScoringModel", "load_scoring_model"),
    "prompt": ("PromptError", "SoftPrompt", "init_from_vocab", "init_from_text", "save_prompt", "load_prompt"),
    "deep_prompt": ("DeepPrompt", "as_input_prompt", "deep_prompt_from_input", "new_prompt", "prompt_with_weight",
                    "save_deep_prompt", "load_deep_prompt", "load_any_prompt", "save_any_prompt"),
    "backbone": ("transformer_layers",),
    "keyed_cache": ("read_keyed_tensors", "write_keyed_tensors"),
    "jsonio": ("jsonable", "read_json", "write_json"),
    "progress": ("progress_bar", "configure"),
})
