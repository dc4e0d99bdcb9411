"""Hydra internals (hydra-core 1.3.8): error reporting, the mode probe, a failed job's exception."""

from __future__ import annotations

from typing import Any, Callable

from finetune.compat import guard, private

DIST, PINNED = "hydra-core", "1.3.8"
TOUCHES = (
    "hydra._internal.utils.run_and_report",
    "hydra._internal.hydra.Hydra.get_mode",
    "hydra.core.utils.JobReturn._return_value",
)


def route_error_reporting(report: Callable[[Callable[[], Any]], Any]) -> None:
    """Hydra runs the app and its own setup through hydra._internal.utils.run_and_report, which prints a traceback
    or Hydra's message; ``report`` replaces it (one line, exit 2 for bad input, 1 for failures: finetune/cli.py)."""
    import hydra._internal.utils as hutils

    guard(DIST, PINNED, "finetune's error reporting")
    private(hutils, "run_and_report", DIST, PINNED)
    hutils.run_and_report = report


def wrap_mode_probe(wrap: Callable[[Callable], Callable]) -> None:
    """Hydra.get_mode composes the whole config to read hydra.mode; ``wrap(probe)`` returns the replacement (once)."""
    from hydra._internal.hydra import Hydra

    probe = private(Hydra, "get_mode", DIST, PINNED)
    if getattr(probe, "_finetune", False):
        return
    replacement = wrap(probe)
    replacement._finetune = True
    Hydra.get_mode = replacement


def job_exception(job_return) -> BaseException:
    """The exception a failed sweep job raised (JobReturn keeps it in _return_value; .return_value re-raises it)."""
    return private(job_return, "_return_value", DIST, PINNED)
