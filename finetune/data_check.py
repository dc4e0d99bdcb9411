"""Read and check data files without heavy imports: format detection and row validation (row number in errors).

Formats:
  alpaca      {"instruction", "input"?, "output", "system"?, "history"?}
  sharegpt    {"conversations": [{"from", "value"}, ...]}  or  {"messages": [{"role", "content"}, ...]}
  preference  {"instruction", "input"?, "chosen", "rejected"}           (dpo, rm)
  kto         {"instruction", "input"?, "output", "kto_tag": bool}
  text        {"text"}                                                   (pt)
  embedding   {"query", "pos": [str], "neg": [str], "pos_scores"?, "neg_scores"?, "prompt"?, "type"?}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, List, Tuple

from finetune.config.schema import DataConfig, choices
from finetune.errors import ConfigError

FORMATS = choices(DataConfig, "format")[1:]  # what a file can hold ("auto" detects one of them)
SUFFIXES = (".json", ".jsonl")


def data_files(path: str, key: str = "data.path") -> List[Path]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(key, str(path), "no such file or folder")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES and f.is_file())
        if not files:
            raise ConfigError(key, str(path), "folder holds no .json or .jsonl file")
        return files
    if p.suffix not in SUFFIXES:
        raise ConfigError(key, str(path), "must be a .json or .jsonl file, or a folder of them")
    return [p]


def iter_rows(file: Path, key: str = "data.path") -> Iterator[Tuple[int, object]]:
    """Yield (row number from 1, row). A .json file holds a list (or JSON lines); .jsonl one object a line."""
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise ConfigError(key, str(file), f"cannot be read ({e.strerror})") from None
    if not raw.strip():
        raise ConfigError(key, str(file), "file is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(key, str(file), f"not UTF-8 (byte {e.start})") from None
    stripped = text.lstrip()
    if file.suffix == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(key, str(file), f"not valid JSON (line {e.lineno}: {e.msg})") from None
        yield from enumerate(rows, start=1)
        return
    n = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        n += 1
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            why = f"line {lineno} is not valid JSON ({e.msg}); expected JSON or JSONL"
            raise ConfigError(key, str(file), why) from None


def detect_format(row: object) -> str:
    if not isinstance(row, dict):
        return "unknown"
    if "query" in row and "pos" in row:
        return "embedding"
    if "conversations" in row or "messages" in row:
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


def check_row(row: object, fmt: str) -> str:
    """'' if the row is fine for the format, else what is wrong with it."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, expected an object"
    if fmt == "alpaca":
        for k in ("instruction", "output"):
            if not _str(row.get(k)):
                return f"missing string field {k!r}"
        if "input" in row and row["input"] is not None and not _str(row["input"]):
            return "field 'input' must be a string"
    elif fmt == "sharegpt":
        turns = row.get("conversations", row.get("messages"))
        if not isinstance(turns, list) or not turns:
            return "needs a non-empty list 'conversations' (from/value) or 'messages' (role/content)"
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                return f"turn {i} is not an object"
            role, content = (t.get("from"), t.get("value")) if "from" in t else (t.get("role"), t.get("content"))
            if role not in ("system", "human", "user", "gpt", "assistant", "function_call", "observation", "tool"):
                return f"turn {i} has role {role!r}; allowed: system, human/user, gpt/assistant"
            if not _str(content):
                return f"turn {i} has no string content"
        if not any((t.get("from") or t.get("role")) in ("gpt", "assistant") for t in turns):
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
                raise ConfigError(key, str(f), f"row {n} {problem} (data.format={detected})")
            total += 1
            if total >= max_rows:
                break
    if total == 0:
        raise ConfigError(key, str(path), "holds no rows")
    if allowed and detected not in allowed:
        raise ConfigError("data.format", detected, f"this backend/stage takes {', '.join(allowed)}")
    return {"format": detected, "rows": total, "files": hashes}
