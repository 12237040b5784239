"""What crosses the wire between the federated POST server and its clients, and the shared file names.

One round (server round r)::

    server: sample clients ──▶ global prompt P_r, student hash, clip bound (nothing else)
    client: student from its cache (by sha256 of the safetensors state; asks once if missing)
            budget check against its own ledger; DP-SGD on its private data (fresh OS-entropy
            noise and Poisson batches); write-ahead ledger record; clip; [distributed-DP noise share]
            ──▶ the prompt update P_client - P_r (+ data-independent metadata only)
    server: validate updates (shape, finite, norm bound), aggregate (uniform mean under DP,
            capped FedAvg / median / trimmed mean otherwise, or DP-FedAvg),
            P_{r+1} = P_r + aggregate; evaluate; checkpoint atomically
    after R rounds: POST transfer of P_R to the teacher on public data; evaluate; results.json

Message schema (names shared by ``server_app`` and ``client_app``; only these cross the wire):

* train instruction: ArrayRecord ``global-prompt`` {``prompt``}; ConfigRecord ``config``
  {``round``, ``model-hash``, ``clip``}. No seed: the server cannot predict a client's noise.
  ``prompt`` is P x D, or L x P x D for ``prompt.form = "deep"``: a deep prompt's per-layer scales do
  not travel, each client recomputes them from the student and the run's (non-private) prompt settings.
* train reply: ArrayRecord ``prompt-update`` {``delta``}; MetricRecord ``metrics``
  {``round``} under DP (:data:`DP_REPLY_METRIC_KEYS`: nothing data-dependent besides the noised
  update), or {``round``, ``num-examples``, ``loss``, ``steps``, ``sample-rate``} in a non-DP run
  (labelled non-private) -- or ConfigRecord ``status`` {``status`` = ``need-model``, ``cache-key``}
  | {``status`` = one fixed code of :data:`REPLY_CODES`} and nothing else
* query ``hello``: ConfigRecord ``config`` {``model-hash``} -> ConfigRecord ``hello``
  {``client-id``, ``has-model``, ``cache-key``} -- or ConfigRecord ``status`` {``status`` = a fixed code}
* ``cache-key`` is a random id of the client process (one student copy serves its clients), never a
  host name or process id.

What a site says when it does not train (issue 22): only a fixed code (:data:`REPLY_CODES`), in a
status reply or, for SecAgg+ stages, as the reason of an error reply. No cell value, row number, file
path, count, epsilon, delta or budget of the site ever travels in a reply; the site logs the detailed
message locally (``client_app.app.SiteClientApp``).
* query ``model``: ArrayRecord ``student-weights``; ConfigRecord ``student`` {``model-hash``,
  ``spec`` (JSON: labels, verbalizer, head, template), ``file:<name>`` (config/tokenizer bytes)}

Randomness (see :mod:`post_fl.privacy.randomness`): DP-SGD noise and Poisson batches are drawn by each
client from fresh OS entropy; DP-FedAvg noise and Poisson client sampling by the server from
fresh OS entropy; distributed-DP noise shares by each client likewise. Only non-private choices
(initial prompt, data partition, fixed-size client sampling without user-level DP) follow
``seed``. A resumed run therefore continues with new noise: it repeats the rounds and the privacy
accounting of an uninterrupted run, not its bits. With ``insecure_reproducible`` every mechanism is
seeded from (seed, round[, client]) -- the client derives its own seed from its run config, the
server sends none -- so runs repeat bit for bit, and every output says :data:`NOT_PRIVATE_LABEL`.

Privacy accounting lives with the data: each client keeps a :class:`post_fl.privacy.ledger.PrivacyLedger`
(keyed by a deployed site's own dataset name, or in simulation the sha256 of the partition) and
refuses a round that would exceed its site's budget.
"""

from __future__ import annotations

# ---------------------------------------------------------------- message schema
TRAIN_PROMPT_RECORD, TRAIN_CONFIG_RECORD = "global-prompt", "config"
REPLY_UPDATE_RECORD, REPLY_METRICS_RECORD, REPLY_STATUS_RECORD = "prompt-update", "metrics", "status"
HELLO_RECORD, STUDENT_WEIGHTS_RECORD, STUDENT_FILES_RECORD = "hello", "student-weights", "student"
NEED_MODEL = "need-model"
DP_REPLY_METRIC_KEYS = ("round",)  # all a DP client reports besides its noised update: data-independent
NON_DP_REPLY_METRIC_KEYS = ("round", "num-examples", "loss", "steps", "sample-rate")  # non-private runs only
# the only words a site's reply may say about why it did not train: fixed codes, never a message
BUDGET_EXHAUSTED = "refused: budget"  # the round would take the site past its epsilon budget (or is not DP)
REFUSED = REFUSED_INSECURE = "refused: insecure run"  # insecure_reproducible, not allowed by the site
REFUSED_DATA_SETTINGS = "refused: data settings"  # the run names other columns or labels than the site reads
SITE_INPUT_INVALID = "site input invalid"  # the site's file or node config (or the run config) is unusable
SITE_ERROR = "site error"  # anything else that went wrong on the site
REFUSAL_CODES = (BUDGET_EXHAUSTED, REFUSED_INSECURE, REFUSED_DATA_SETTINGS)
FAILURE_CODES = (SITE_INPUT_INVALID, SITE_ERROR)
REPLY_CODES = REFUSAL_CODES + FAILURE_CODES
LEDGER_DIR_NAME = "client-ledgers"  # simulation: <output_dir>/client-ledgers (the harness reads them)
CHECKPOINT_FILE = "checkpoint.safetensors"
STUDENT_WEIGHTS_FILE = "model.safetensors"
STUDENT_SPEC_FILE = "post_fl_student_spec.json"
