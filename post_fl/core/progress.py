"""What a run says while it works: log lines, progress, and the libraries' noise kept out of both.

Every training, distillation, transfer and evaluation loop gets its progress report from
:func:`progress_bar`: a bar on a terminal; written to a log file (not a terminal), one line each time
the loop passes another ``LINE_EVERY_PERCENT`` percent and a last line with its time, never a line per
step and never a carriage-return fragment; nothing for a loop shorter than ``QUIET_SECONDS``.
:func:`setup_logging` (``post-fl -v`` / ``-q``) sets how much a command logs, and :func:`configure`
switches every report (and, off a terminal or when quiet, the libraries' own progress bars) at once.

Library warnings that say nothing to the user are filtered where they arise, each with a comment saying
why: Opacus' "Optimal order is the largest/smallest alpha" (:func:`post_fl.privacy.accounting.quiet_accountant`),
torch's "Full backward hook is firing ..." under Opacus' grad sampler (:mod:`post_fl.method.tuning`),
Opacus' "Secure RNG turned off" (replaced by one accurate post-fl line, :mod:`post_fl.method.tuning`);
transformers' GGUF reader's own bar is held to the libraries' switch (:mod:`post_fl.core.embedded`).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

LINE_EVERY_PERCENT = 10  # non-terminal: one line per this many percent of the loop
QUIET_SECONDS = 2.0  # loops shorter than this stay silent (on a terminal too)
LIBRARY_LOGGERS = ("transformers", "datasets", "opacus", "huggingface_hub", "flwr_datasets", "httpx", "torch")

_state = {"quiet": False}


def setup_logging(verbosity: int = 0, stream: TextIO | None = None) -> None:
    """How much a post-fl command says: ``-1`` (``--quiet``: warnings and errors, no progress, the libraries
    silenced), ``0`` (post-fl's info lines and progress; the libraries' loggers at ERROR) or ``1``
    (``--verbose``: post-fl's debug lines too, the libraries' warnings). Log lines go to stderr."""
    import logging

    logging.basicConfig(level=logging.WARNING if verbosity < 0 else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("post_fl").setLevel(logging.DEBUG if verbosity > 0 else logging.NOTSET)
    for noisy in ("transformers", "httpx", "opacus"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbosity > 0 else logging.ERROR)
    configure(quiet=verbosity < 0, stream=stream)


def configure(quiet: bool, stream: TextIO | None = None) -> None:
    """Switch every post-fl progress report off (``quiet``) or on; quiet also silences the libraries'
    progress bars, info logs and Python warnings (transformers, datasets, Hugging Face Hub, opacus).
    When ``stream`` (default stderr) is not a terminal, the libraries' bars are switched off too:
    in a log file they would write a fragment per update."""
    _state["quiet"] = quiet
    stream = stream if stream is not None else sys.stderr
    if quiet:
        silence_libraries()
    elif not (getattr(stream, "isatty", None) and stream.isatty()):
        library_bars_off()


def is_quiet() -> bool:
    """True after ``configure(quiet=True)``."""
    return _state["quiet"]


def library_bars_off() -> None:
    """The progress bars of transformers, datasets and the Hugging Face Hub off (their logs stay)."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def silence_libraries() -> None:
    """Library progress bars off, their loggers at ERROR and their Python warnings ignored."""
    import logging
    import os
    import warnings

    library_bars_off()
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["DATASETS_VERBOSITY"] = "error"
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    pattern = r"(" + "|".join(LIBRARY_LOGGERS) + r")(\.|$)"
    warnings.filterwarnings("ignore", module=pattern)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


class NullProgress:
    """A progress report that shows nothing (quiet, or switched off by the caller)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LineProgress(NullProgress):
    """For logs: ``desc: 30% (30/100) 12s, loss=0.41`` each time another ``every_percent`` percent is
    done, and a last line at the end, once the loop has run for ``quiet_seconds``."""

    def __init__(self, total: int, desc: str, stream: TextIO | None = None, every_percent: float = LINE_EVERY_PERCENT,
                 quiet_seconds: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc = max(int(total), 0), desc
        self.stream = stream if stream is not None else sys.stderr
        self.every, self.clock = every_percent, clock
        self.quiet_seconds = QUIET_SECONDS if quiet_seconds is None else quiet_seconds
        self.start = clock()
        self.n = 0
        self.next_mark = every_percent
        self.postfix = ""
        self.printed = 0
        self.closed = False

    def _line(self) -> None:
        pct = 100.0 * self.n / self.total if self.total else 100.0
        tail = f", {self.postfix}" if self.postfix else ""
        self.stream.write(f"{self.desc}: {pct:.0f}% ({self.n}/{self.total}) {self.clock() - self.start:.0f}s{tail}\n")
        self.stream.flush()
        self.printed += 1

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.total:
            return
        pct = 100.0 * self.n / self.total
        if pct >= self.next_mark:
            while self.next_mark <= pct:
                self.next_mark += self.every
            if self.n < self.total and self.clock() - self.start >= self.quiet_seconds:
                self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.printed or self.clock() - self.start >= self.quiet_seconds:
            self._line()


def progress_bar(total: int, desc: str, enabled: bool = True, stream: TextIO | None = None):
    """The progress report of a loop of ``total`` steps: ``update(n)``, ``set_postfix(...)``, ``close()``.

    A tqdm bar when ``stream`` (default stderr) is a terminal, :class:`LineProgress` otherwise, and
    :class:`NullProgress` when ``enabled`` is false or post-fl is quiet.
    """
    if not enabled or is_quiet():
        return NullProgress()
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=stream, delay=QUIET_SECONDS, dynamic_ncols=True)
    return LineProgress(total, desc, stream)
