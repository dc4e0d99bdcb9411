"""Secrets (hub tokens, API keys, passwords) never reach a file of the run folder. Standard library only.

- A config key whose last part looks like a secret (``hf_hub_token``, ``api_key``, ``password``, ...) is a secret.
- Everything written to the run folder (manifest.json, config.yaml, overrides.yaml, resolved_config.json, the
  plan's files, step records) goes through ``redact``: secret keys' values, ``key=value`` strings with a secret
  key (the overrides, the command line) and every occurrence of a secret value anywhere become ``<redacted>``.
- The worker processes get the secrets through their environment (``FINETUNE_SECRETS``: JSON of dotted key ->
  value); ``merge_secrets`` puts them back into the config a worker reads.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterable

REDACTED = "<redacted>"
ENV = "FINETUNE_SECRETS"
_SECRET = re.compile(r"(secret|password|passwd|api[_-]?key|credential|private[_-]?key)", re.I)
_TOKEN = re.compile(r"(^|_)(token|auth|access[_-]?token)$", re.I)
# tokenizer/model settings that end in _token but are not credentials
_NOT_SECRET = re.compile(
    r"^(pad|eos|bos|unk|sep|cls|mask|special|chat|im_start|im_end|new_special|add_special|"
    r"max_new|max|num|skip_special)_?tokens?$",
    re.I,
)
_values: set = set()  # secret values seen in this process (replaced wherever they appear)


def is_secret_key(key: str) -> bool:
    last = str(key).split(".")[-1].lstrip("-+~")
    if _NOT_SECRET.match(last):
        return False
    return bool(_SECRET.search(last) or _TOKEN.search(last))


def collect(config: Any, prefix: str = "") -> Dict[str, str]:
    """{dotted key: value} of every secret in a plain config dict (and remember the values for ``redact``)."""
    found: Dict[str, str] = {}
    if isinstance(config, dict):
        for k, v in config.items():
            key = f"{prefix}{k}"
            if is_secret_key(str(k)) and isinstance(v, (str, int)) and str(v) not in ("", REDACTED):
                found[key] = str(v)
            else:
                found.update(collect(v, key + "."))
    remember(found.values())
    return found


def remember(values: Iterable[str]) -> None:
    _values.update(v for v in values if v and len(v) >= 4)


def _text(s: str) -> str:
    m = re.match(r"^([+~]*[-\w.]+)=(.*)$", s, re.S)
    if m and is_secret_key(m.group(1)) and m.group(2) not in ("", "null"):
        return f"{m.group(1)}={REDACTED}"
    for v in sorted(_values, key=len, reverse=True):
        if v in s:
            s = s.replace(v, REDACTED)
    return s


def redact(obj: Any) -> Any:
    """A copy of obj with every secret replaced by <redacted> (see the module docstring)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return _text(obj)
    return obj


def env_for(secrets: Dict[str, str]) -> Dict[str, str]:
    """The environment a worker gets the secrets through (empty when there are none)."""
    return {ENV: json.dumps(secrets)} if secrets else {}


def merge_secrets(config: dict) -> dict:
    """Worker side: put the secrets from FINETUNE_SECRETS back into a (redacted) config read from disk."""
    raw = os.environ.get(ENV)
    if not raw:
        return config
    for key, value in json.loads(raw).items():
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config
