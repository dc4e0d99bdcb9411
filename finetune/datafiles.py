"""Reading data files: the one reader of the driver's validation (finetune/data_check.py) and of every worker
(finetune/recipes/data.py, gen_eval, Collie's worker in its own environment), so that a file that validates is read
the same way when it trains. Standard library only. (LLaMA-Factory dataset folders: finetune/lfdata.py reads their
.json/.jsonl files with this, and .txt / .csv files itself; finetune/sources.py puts a run's rows together.)

- a path is a .json or .jsonl file, or a folder of them (its own files, sorted by name, not its subfolders);
- bytes are UTF-8, with or without a byte-order mark;
- a .json file holds a JSON list of rows or JSON lines; a .jsonl file one row a line (blank lines skipped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, List, Tuple

from finetune.errors import ConfigError

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
    """Yield (row number from 1, row) of one file."""
    try:
        raw = Path(file).read_bytes()
    except OSError as e:
        raise ConfigError(key, str(file), f"cannot be read ({e.strerror})") from None
    if not raw.strip():
        raise ConfigError(key, str(file), "file is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(key, str(file), f"not UTF-8 (byte {e.start})") from None
    if Path(file).suffix == ".json" and text.lstrip().startswith("["):
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


def read_rows(path: str, key: str = "data.path") -> List[dict]:
    """Every row of the file, or of every file of the folder in name order."""
    return [row for f in data_files(path, key) for _, row in iter_rows(f, key)]
