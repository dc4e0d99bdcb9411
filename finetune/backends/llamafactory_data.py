"""dataset_info.json entries for LLaMA-Factory, built from what is in our data files (standard library only).

The columns and tags are read from the rows and checked, never guessed from the file name: a sharegpt file may use
"conversations" + from/value/human/gpt or "messages" + role/content/user/assistant, and LLaMA-Factory silently
drops a conversation whose turns do not alternate user -> assistant ("Invalid role tag"), so such a row is refused
here with its row number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from finetune.data_check import chat_layout, data_files, iter_rows
from finetune.errors import ConfigError

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
OBSERVATION_ROLES = ("observation", "tool")
FUNCTION_ROLES = ("function_call",)


def _optional_columns(rows: List[dict], names) -> Dict[str, str]:
    present = set()
    for row in rows:
        present |= {n for n in names if row.get(n) not in (None, "", [])}
    return {n: n for n in names if n in present}


def _sharegpt_entry(file: Path, rows: List[tuple], key: str, ranking: bool = False) -> dict:
    """A sharegpt-layout file's entry; ``ranking``: preference pairs (the turns end with the user's, the answers are
    the turns 'chosen' and 'rejected')."""
    msg_key = role_tag = content_tag = None
    tags: Dict[str, str] = {}
    for n, row in rows:
        mk = "conversations" if "conversations" in row else "messages"
        if msg_key is None:
            msg_key = mk
        elif mk != msg_key:
            raise ConfigError(
                key, str(file), f"row {n} holds {mk!r} but earlier rows hold {msg_key!r}; use one layout per file"
            )
        turns = row[mk]
        rt, ct = ("from", "value") if "from" in turns[0] else ("role", "content")
        if role_tag is None:
            role_tag, content_tag = rt, ct
        for i, t in enumerate(turns):
            if rt not in t or ct not in t:
                raise ConfigError(
                    key, str(file), f"row {n} turn {i} lacks {rt!r}/{ct!r} (the file uses {role_tag}/{content_tag})"
                )
            if (rt, ct) != (role_tag, content_tag):
                raise ConfigError(
                    key, str(file), f"row {n} uses {rt}/{ct} but earlier rows use {role_tag}/{content_tag}"
                )
        body = turns[1:] if turns[0][rt] == "system" else turns
        if not body or len(body) % 2 != int(ranking):
            raise ConfigError(
                key,
                str(file),
                f"row {n} has {len(body)} non-system turns; LLaMA-Factory needs "
                + ("user/assistant pairs and a last user turn" if ranking else "user/assistant pairs")
                + " (it would silently drop this row)",
            )
        # (index in the row's turns, the turn, whether an answer must come there); a preference row's two answers
        # ('chosen', 'rejected') are turns in the assistant's place
        places = [(i + len(turns) - len(body), t, i % 2 == 1) for i, t in enumerate(body)]
        if ranking:
            places += [(k, row[k], True) for k in ("chosen", "rejected")]
        for where, t, answer in places:
            if not isinstance(t, dict) or rt not in t or ct not in t:
                raise ConfigError(key, str(file), f"row {n} turn {where} lacks {rt!r}/{ct!r} (the file uses {rt}/{ct})")
            role = t[rt]
            kinds = (
                (("assistant_tag", ASSISTANT_ROLES), ("function_tag", FUNCTION_ROLES))
                if answer
                else (("user_tag", USER_ROLES), ("observation_tag", OBSERVATION_ROLES))
            )
            for tag, allowed in kinds:
                if role in allowed:
                    if tags.setdefault(tag, role) != role:
                        raise ConfigError(
                            key,
                            str(file),
                            f"row {n} uses role {role!r} where earlier rows use "
                            f"{tags[tag]!r}; use one name per role in a file",
                        )
                    break
            else:
                want = "assistant (gpt/assistant/function_call)" if answer else "user (human/user/observation/tool)"
                raise ConfigError(
                    key,
                    str(file),
                    f"row {n} turn {where} has role {role!r} "
                    f"where {want} must come; turns must alternate (LLaMA-Factory would drop this row)",
                )
    tags.update(role_tag=role_tag, content_tag=content_tag, system_tag="system")
    # tags LF needs even when unused in this file: pick the same family as the roles seen
    openai = tags.get("user_tag", "human") == "user"
    tags.setdefault("user_tag", "user" if openai else "human")
    tags.setdefault("assistant_tag", "assistant" if openai else "gpt")
    tags.setdefault("observation_tag", "tool" if openai else "observation")
    tags.setdefault("function_tag", "function_call")
    columns = {"messages": msg_key, **_optional_columns([r for _, r in rows], ("system", "tools"))}
    return {"formatting": "sharegpt", "columns": columns, "tags": tags}


def entry_for(file: Path, fmt: str, key: str = "data.path") -> dict:
    """The dataset_info.json entry for one file of format fmt (already validated row by row by data_check)."""
    rows = [(n, r) for n, r in iter_rows(file, key)]
    plain = [r for _, r in rows]
    if fmt == "alpaca":
        cols = {"prompt": "instruction", "response": "output"}
        cols.update(
            {
                k: v
                for k, v in (("query", "input"), ("system", "system"), ("history", "history"))
                if v in _optional_columns(plain, (v,))
            }
        )
        entry = {"columns": cols}
    elif fmt == "sharegpt":
        entry = _sharegpt_entry(file, rows, key)
    elif fmt == "preference" and plain and chat_layout(plain[0]):
        entry = _sharegpt_entry(file, rows, key, ranking=True)
        entry["columns"].update(chosen="chosen", rejected="rejected")
        entry["ranking"] = True
    elif fmt == "kto" and plain and chat_layout(plain[0]):
        tag = "label" if "label" in plain[0] else "kto_tag"
        entry = _sharegpt_entry(file, rows, key)
        entry["columns"]["kto_tag"] = tag
    elif fmt == "preference":
        cols = {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}
        if _optional_columns(plain, ("input",)):
            cols["query"] = "input"
        cols.update(_optional_columns(plain, ("system",)))
        entry = {"ranking": True, "columns": cols}
    elif fmt == "kto":
        cols = {"prompt": "instruction", "response": "output", "kto_tag": "kto_tag"}
        if _optional_columns(plain, ("input",)):
            cols["query"] = "input"
        entry = {"columns": cols}
    elif fmt == "text":
        entry = {"columns": {"prompt": "text"}}
    else:
        raise ConfigError("data.format", fmt, "LLaMA-Factory takes alpaca, sharegpt, preference, kto or text data")
    return {"file_name": str(Path(file).resolve()), **entry}


def dataset_info(path: str, fmt: str, prefix: str, key: str = "data.path") -> Dict[str, dict]:
    """{name: entry} for every data file under path; names are prefix, prefix_1, ..."""
    files = data_files(path, key)
    return {(prefix if i == 0 else f"{prefix}_{i}"): entry_for(f, fmt, key) for i, f in enumerate(files)}
