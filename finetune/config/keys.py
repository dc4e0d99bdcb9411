"""Every key a user can type, with its type, default, allowed values and help, read from the schema dataclasses
(finetune/config/schema.py): what `finetune keys [GROUP]` prints (LLaMA-Factory's and TRL's argument help, for a
Hydra config). Standard library and the schema only."""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Dict, List, Optional

from omegaconf import MISSING

from finetune.config import schema
from finetune.run_files import RUN_DIR_KEY

GROUPS = ("root", "tracking", "backend", "model", "method", "hardware", "data", "launcher")


@dataclasses.dataclass
class Key:
    key: str
    type: str
    default: str
    help: str
    choices: tuple = ()
    options: tuple = ()  # the group options that have it (all of them: empty)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(a group of keys)"
    else:
        value = MISSING
    if value is MISSING or value == "???":
        return "(set by the group option)"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def _key(prefix: str, f: dataclasses.Field, options: tuple = ()) -> Key:
    return Key(
        key=prefix + f.name,
        type=str(f.type).replace("typing.", ""),
        default=_default(f),
        help=f.metadata.get("help", ""),
        choices=tuple(f.metadata.get("choices", ())),
        options=options,
    )


def keys(group: str = "root") -> List[Key]:
    """The keys of one group ('root': the top-level keys; 'tracking': tracking.*), in declaration order."""
    if group == "root":
        return [_key("", f) for f in dataclasses.fields(schema.RootConfig) if f.name not in (*GROUPS, "tracking")]
    if group == "tracking":
        out = [
            _key("tracking.", f) for f in dataclasses.fields(schema.TrackingConfig) if f.name not in ("mlflow", "wandb")
        ]
        for name, node in (("mlflow", schema.MlflowTracking), ("wandb", schema.WandbTracking)):
            out += [_key(f"tracking.{name}.", f) for f in dataclasses.fields(node)]
        return out
    options: Dict[str, list] = {}
    fields: Dict[str, dataclasses.Field] = {}
    for option, node in schema.SCHEMAS[group].items():
        for f in dataclasses.fields(node):
            fields.setdefault(f.name, f)
            options.setdefault(f.name, []).append(option)
    every = len(schema.SCHEMAS[group])
    return [
        _key(f"{group}.", fields[name], () if len(opts) == every else tuple(opts)) for name, opts in options.items()
    ]


def render(group: Optional[str] = None, width: int = 100) -> str:
    """Plain text, one block per key: `key  type = default  [choices]  (options)`, then its help, indented."""
    lines: List[str] = []
    for g in [group] if group else GROUPS:
        title = "top-level keys: python train.py KEY=VALUE" if g == "root" else f"{g}.*"
        if g in schema.SCHEMAS:
            title += f"  (options: {', '.join(schema.SCHEMAS[g])}; choose with {g}=OPTION)"
        lines += ["", title]
        for k in keys(g):
            head = f"  {k.key}: {k.type} = {k.default}"
            if k.choices:
                head += f"  [{' | '.join(map(str, k.choices))}]"
            if k.options:
                head += f"  ({', '.join(k.options)} only)"
            lines.append(head)
            if k.help:
                lines += textwrap.wrap(k.help, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines).lstrip("\n")


def schema_keys() -> Dict[str, List[str]]:
    """{path: the schema's keys there} for the root ("") and each group (union over its options) and tracking:
    what a worker's ConfigView (finetune/recipes/common.py) accepts through .get besides the file's own keys. The
    same walk as ``keys``, grouped by the path above each key."""
    known: Dict[str, set] = {
        "": {f.name for f in dataclasses.fields(schema.RootConfig)} | {RUN_DIR_KEY, "_ctx", "_keys"}
    }
    for group in GROUPS[1:]:
        for k in keys(group):
            path, _, name = k.key.rpartition(".")
            known.setdefault(path, set()).add(name)
    known["tracking"] |= {"mlflow", "wandb"}  # the two sub-groups keys("tracking") spells out
    return {path: sorted(names) for path, names in known.items()}
