"""CPython internals (Python 3.11): the atexit handlers of a process that ends with os._exit."""

from __future__ import annotations

import atexit
import sys

DIST, PINNED = "python", "3.11"
TOUCHES = ("atexit._run_exitfuncs",)


def run_exit_handlers() -> None:
    """Run the atexit handlers now: a forked step ends with os._exit (it must not run the parent's cleanup of the
    preloaded process), which skips them; the step's own (TensorBoard's writer, logging) still have to run."""
    if sys.version_info[:2] != (3, 11):
        print(f"[finetune] note: atexit._run_exitfuncs used on Python {sys.version.split()[0]}", file=sys.stderr)
    atexit._run_exitfuncs()
