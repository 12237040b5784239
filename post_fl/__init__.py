"""post-fl: federated, differentially private soft-prompt tuning with POST prompt transfer.

The packages are the architecture; imports run one way, down this list (``tests/test_layering.py``):

* the shell -- ``cli`` (``post-fl``), ``pipeline`` (the single-site stages over a run folder),
  ``preflight`` (every input checked before work), ``resume`` (stage completion markers);
* :mod:`post_fl.experiments` -- privacy-utility sweeps: grid, cells, report, plots;
* :mod:`post_fl.federated` -- the server's round loop, the client, the message schema, transports,
  the client-batched engine (no Flower inside: ``server_app`` / ``client_app`` are the Flower glue);
* :mod:`post_fl.method` -- the POST method: distillation, prompt tuning, transfer, evaluation;
* :mod:`post_fl.privacy` -- accounting, delta, randomness, the ledger, user-level DP, RAPT, audit;
* :mod:`post_fl.core` -- config, data, tasks, models, soft prompts, caches, progress.
"""

__version__ = "0.1.0"
