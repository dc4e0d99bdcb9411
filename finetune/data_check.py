"""Read and check data files without heavy imports: format detection and row validation (row number in errors).

Formats (each of preference and kto in two layouts: alpaca-style, or LLaMA-Factory's sharegpt-style):
  alpaca      {"instruction", "input"?, "output", "system"?, "history"?}
  sharegpt    {"conversations": [{"from", "value"}, ...]}  or  {"messages": [{"role", "content"}, ...]}
  preference  {"instruction", "input"?, "chosen", "rejected"}                                  (dpo, rm)
              {"conversations" | "messages": [... ending with the user], "chosen": {turn}, "rejected": {turn}}
  kto         {"instruction", "input"?, "output", "kto_tag": bool}
              {"conversations" | "messages": [... ending with the answer], "label" | "kto_tag": bool}
  text        {"text"}                                                   (pt)
  embedding   {"query", "pos": [str], "neg": [str], "pos_scores"?, "neg_scores"?, "prompt"?, "type"?}
"""

from __future__ import annotations

import hashlib
from typing import List

from finetune.config.schema import DataConfig, choices
from finetune.datafiles import data_files, iter_rows
from finetune.errors import ConfigError

FORMATS = choices(DataConfig, "format")[1:]  # what a file can hold ("auto" detects one of them)
# how a user asks for a format: its own data option where there is one
ASK_FOR = {"alpaca": "data=alpaca", "sharegpt": "data=sharegpt", "embedding": "data=embedding"}


def detect_format(row: object) -> str:
    if not isinstance(row, dict):
        return "unknown"
    if "query" in row and "pos" in row:
        return "embedding"
    if "conversations" in row or "messages" in row:
        if "chosen" in row and "rejected" in row:
            return "preference"
        if isinstance(row.get("label"), bool) or "kto_tag" in row:
            return "kto"
        return "sharegpt"
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "kto_tag" in row:
        return "kto"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return "unknown"


def _str(v) -> bool:
    return isinstance(v, str)


ROLES = ("system", "human", "user", "gpt", "assistant", "function_call", "observation", "tool")
ANSWER_ROLES = ("gpt", "assistant", "function_call")


def chat_layout(row: dict) -> bool:
    """A row in the sharegpt / messages layout (a list of turns), as opposed to alpaca-style fields."""
    return "conversations" in row or "messages" in row


def _turn(t) -> tuple:
    return (t.get("from"), t.get("value")) if "from" in t else (t.get("role"), t.get("content"))


def _check_turns(turns, last: str) -> str:
    """The turns of a chat-layout row; ``last``: which role ends them (answer: sft, kto; user: preference)."""
    if not isinstance(turns, list) or not turns:
        return "needs a non-empty list 'conversations' (from/value) or 'messages' (role/content)"
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            return f"turn {i} is not an object"
        role, content = _turn(t)
        if role not in ROLES:
            return f"turn {i} has role {role!r}; allowed: system, human/user, gpt/assistant"
        if not _str(content):
            return f"turn {i} has no string content"
    final = _turn(turns[-1])[0]
    if last == "user" and final in ANSWER_ROLES + ("system",):
        return "its turns must end with the user's (the answers are 'chosen' and 'rejected')"
    if last == "answer" and not any(_turn(t)[0] in ANSWER_ROLES for t in turns):
        return "has no assistant turn"
    return ""


def check_row(row: object, fmt: str) -> str:
    """'' if the row is fine for the format, else what is wrong with it."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, expected an object"
    if fmt in ("preference", "kto") and chat_layout(row):
        problem = _check_turns(row.get("conversations", row.get("messages")), "user" if fmt == "preference" else "x")
        if problem:
            return problem
        if fmt == "kto":
            tag = "label" if "label" in row else "kto_tag"
            if not isinstance(row.get(tag), bool):
                return f"field {tag!r} must be true or false"
            if _turn(row.get("conversations", row.get("messages"))[-1])[0] not in ANSWER_ROLES:
                return "its turns must end with the answer the label judges"
            return ""
        for k in ("chosen", "rejected"):
            t = row.get(k)
            if not isinstance(t, dict) or _turn(t)[0] not in ANSWER_ROLES or not _str(_turn(t)[1]):
                return f"field {k!r} must be an assistant turn ({{from: gpt, value}} or {{role: assistant, content}})"
        return ""
    if fmt == "alpaca":
        for k in ("instruction", "output"):
            if not _str(row.get(k)):
                return f"missing string field {k!r}"
        if "input" in row and row["input"] is not None and not _str(row["input"]):
            return "field 'input' must be a string"
    elif fmt == "sharegpt":
        problem = _check_turns(row.get("conversations", row.get("messages")), "answer")
        if problem:
            return problem
        if not any(_turn(t)[0] in ("gpt", "assistant") for t in row.get("conversations", row.get("messages"))):
            return "has no assistant turn"
    elif fmt == "preference":
        for k in ("instruction", "chosen", "rejected"):
            if not _str(row.get(k)):
                return f"missing string field {k!r}"
    elif fmt == "kto":
        for k in ("instruction", "output"):
            if not _str(row.get(k)):
                return f"missing string field {k!r}"
        if not isinstance(row.get("kto_tag"), bool):
            return "field 'kto_tag' must be true or false"
    elif fmt == "text":
        if not _str(row.get("text")):
            return "missing string field 'text'"
    elif fmt == "embedding":
        if not _str(row.get("query")):
            return "missing string field 'query'"
        if not isinstance(row.get("pos"), list) or not row["pos"] or not all(_str(p) for p in row["pos"]):
            return "field 'pos' must be a non-empty list of strings"
        if "neg" in row and (not isinstance(row["neg"], list) or not all(_str(p) for p in row["neg"])):
            return "field 'neg' must be a list of strings"
        for sk, lk in (("pos_scores", "pos"), ("neg_scores", "neg")):
            if sk in row and (not isinstance(row[sk], list) or len(row[sk]) != len(row.get(lk, []))):
                return f"field {sk!r} must be a list as long as {lk!r}"
    return ""


def check_data(path: str, fmt: str, allowed: List[str], key: str = "data.path", max_rows: int = 200_000) -> dict:
    """Validate every row (up to max_rows) of every file; return {format, rows, files: {path: sha256}}."""
    files = data_files(path, key)
    detected = fmt
    total = 0
    hashes = {}
    for f in files:
        hashes[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
        for n, row in iter_rows(f, key):
            if detected == "auto":
                detected = detect_format(row)
                if detected == "unknown":
                    raise ConfigError(
                        key,
                        str(f),
                        f"row {n}: cannot tell the format from its keys "
                        f"{sorted(row) if isinstance(row, dict) else type(row).__name__}; "
                        f"set data.format to {', '.join(FORMATS)}",
                    )
            problem = check_row(row, detected)
            if problem:
                other = detect_format(row)
                if other not in ("unknown", detected) and not check_row(row, other):
                    ask = ASK_FOR.get(other, f"data.format={other}")
                    problem = f"is a {other} row ({', '.join(sorted(row))}), not {detected}: use {ask}"
                raise ConfigError(key, str(f), f"row {n} {problem} (data.format={detected})")
            total += 1
            if total >= max_rows:
                break
    if total == 0:
        raise ConfigError(key, str(path), "holds no rows")
    if allowed and detected not in allowed:
        raise ConfigError("data.format", detected, f"this backend/stage takes {', '.join(allowed)}")
    return {"format": detected, "rows": total, "files": hashes}
