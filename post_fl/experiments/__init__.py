"""Experiments: privacy-utility sweeps over clients, epsilon, partitioning and methods (``post-fl sweep``).

* ``grid`` -- the sweep file (TOML) and its grid of cells;
* ``context`` -- what the cells share (teacher, student, zero-shot scores), timed transports, the DP
  client and the cost probe;
* ``cells`` -- one cell: its run config, the federated run behind each method, the reference methods;
* ``rapt_cells`` -- the RAPT baseline's clients (local privatisation, reconstruction head);
* ``audit_cells`` -- the canary membership-inference audit of a cell;
* ``report`` -- ``results.csv``, the Markdown table, the plots' data;
* ``plots`` -- the PNGs;
* ``sweep`` -- :func:`run_sweep`, the resumable loop over the grid.

Uses :mod:`post_fl.federated`, :mod:`post_fl.method`, :mod:`post_fl.privacy` and :mod:`post_fl.core`.
Names are imported on first use.
"""

from ..core.exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "grid": ("METHODS", "DEFAULT_METHODS", "REFERENCE_METHODS", "STUDENT_METHODS", "DP_LEVELS", "ENGINES",
             "PARTITIONINGS", "RESULTS_CSV", "RESULTS_MD", "SETTINGS_JSON", "SweepConfig", "RaptSweepConfig",
             "AuditSweepConfig", "Cell", "expand_cells", "load_sweep_config", "sweep_config_from_dict"),
    "context": ("SweepContext", "SweepTransport", "TimedBatchedTransport", "settings_fingerprint",
                "seconds_per_step", "dp_client_fn"),
    "cells": ("run_cell", "check_examples_per_client", "calibrated_zero_shot", "with_interval",
              "server_prompt_rounds", "USER_LEVEL_UNIT"),
    "rapt_cells": ("RAPT_STREAM", "RaptPrivateData", "rapt_eta", "privatize_batch", "privatize_client_data",
                   "rapt_local_round", "rapt_label_epsilon", "rapt_row_privacy", "rapt_client_fn",
                   "scores_and_hidden"),
    "audit_cells": ("audit_prompt_tuning", "make_canaries"),
    "report": ("CSV_COLUMNS", "EPSILON_AXIS_NOTE", "read_results", "finished_keys", "append_row", "write_report",
               "markdown_table", "clients_tables", "migrate_columns", "report_context", "with_row_interval"),
    "plots": ("plot_accuracy_vs_epsilon", "plot_accuracy_vs_clients", "plot_clients_experiment",
              "clients_experiment_figure", "plot_transfer_curve", "plot_federated_run"),
    "sweep": ("run_sweep",),
})
