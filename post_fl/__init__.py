"""post-fl: federated, differentially private soft-prompt tuning with POST prompt transfer.

Library stages (no Flower inside): ``config`` -> ``data`` -> ``models`` -> ``prompt`` ->
``distill`` -> ``tuning`` -> ``aggregate`` -> ``transfer`` -> ``evaluate``; ``pipeline``
runs them in order into a run folder and ``cli`` exposes them as ``post-fl`` commands.
"""

__version__ = "0.1.0"
