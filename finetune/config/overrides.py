"""The one parser of command-line overrides as Hydra takes them: ``key=value``, ``+key=value`` (add),
``++key=value`` (add or set), ``~key`` / ``~key=value`` (delete). Standard library only: the driver, validation,
the tracker, the auto backend and the tests read typed keys through it."""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple


def split_override(override: str) -> Tuple[str, Optional[str]]:
    """(key without its +, ++ or ~ prefix, value or None when there is no '=')."""
    key, eq, value = str(override).partition("=")
    return key.lstrip("+~").strip(), (value if eq else None)


def override_key(override: str) -> str:
    """The key an override sets: ``+lora_r=8`` -> ``lora_r``."""
    return split_override(override)[0]


def typed_keys(overrides: Iterable[str]) -> List[str]:
    """The keys of the overrides, in order."""
    return [override_key(o) for o in overrides]
