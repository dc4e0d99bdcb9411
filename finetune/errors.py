"""Errors the user can fix. Each is reported as one line on stderr with exit code 2 (see finetune/cli.py)."""

from __future__ import annotations

import difflib
from typing import Iterable, Optional


class ConfigError(Exception):
    """A refused configuration: names the key, the value and what is allowed."""

    exit_code = 2

    def __init__(
        self, key: str, value: object = None, allowed: str = "", hint: str = "", *, text: Optional[str] = None
    ):
        self.key, self.value, self.allowed, self.hint = key, value, allowed, hint
        if text is None:
            text = f"{key}={value!r}" if value is not None else key
            if allowed:
                text += f": {allowed}"
            if hint:
                text += f" ({hint})"
        super().__init__(text)


class RunError(Exception):
    """A run that started and failed (a step exited non-zero, timed out, or was killed). Exit code 1."""

    exit_code = 1


def close_match(word: str, choices: Iterable[str]) -> Optional[str]:
    """The choice closest to a typo, or None."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return match[0] if match else None


def suggest(word: str, choices: Iterable[str]) -> str:
    """'did you mean X?' for a typo, or ''."""
    match = close_match(word, choices)
    return f"did you mean {match!r}?" if match else ""


def one_of(choices: Iterable[str]) -> str:
    return "one of " + ", ".join(sorted(str(c) for c in choices))
