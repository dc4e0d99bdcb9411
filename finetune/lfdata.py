"""LLaMA-Factory dataset folders, read the way LLaMA-Factory 0.9.5 reads them, with the standard library only.

A folder holds ``dataset_info.json`` (LLaMA-Factory's dataset registry) and the files its entries name. Every field
its data/README.md documents is read with LLaMA-Factory's own semantics (src/llamafactory/data/parser.py and
converter.py at v0.9.5):

  source      ``file_name`` (a file or a folder of files, relative to the folder); ``hf_hub_url``, ``ms_hub_url``,
              ``om_hub_url``, ``script_url`` and ``cloud_file_name`` are refused: nothing is downloaded here
  formatting  ``alpaca`` (default) or ``sharegpt``; ``ranking`` (preference pairs: rm, dpo, ORPO, SimPO)
  columns     prompt, query, response, history, messages, system, tools, chosen, rejected, kto_tag; images, videos
              and audios are refused (text models only). Without ``columns`` the defaults apply (instruction,
              input, output, conversations); with it, a column it does not name is unused (LLaMA-Factory sets it to
              None), as in LLaMA-Factory
  tags        role_tag, content_tag, user_tag, assistant_tag, observation_tag, function_tag, system_tag (sharegpt);
              the same default-or-None rule
  num_samples rows drawn from the file (more than it holds: rows repeat); ``split`` must be train for files;
              ``subset`` and ``folder`` only mean something for hub datasets (ignored for files, as LLaMA-Factory
              does)
  files       .json (a list or JSON lines), .jsonl, .txt (one row per line, column ``text``), .csv (header row; every
              value a string); .parquet and .arrow are refused (they cannot be checked without pyarrow before a run)

Every row is checked before anything runs, and a row LLaMA-Factory would silently drop ("Invalid role tag",
"Invalid message count", an unsupervised row in sft) or fail on (a column missing from the whole file: KeyError) is
refused with its row number. ``convert`` turns a row into this project's own row formats (finetune/data_check.py),
so that the alpacalora recipe, the evaluation steps and a data mixture read LLaMA-Factory data like any other file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from finetune.datafiles import iter_rows
from finetune.errors import ConfigError, close_match, suggest

INFO_FILE = "dataset_info.json"
# file types this module reads (LLaMA-Factory's FILEEXT2TYPE without parquet / arrow)
FILE_TYPES = {".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv"}
UNCHECKABLE = (".parquet", ".arrow")
REMOTE = {
    "hf_hub_url": "a Hugging Face hub dataset",
    "ms_hub_url": "a ModelScope hub dataset",
    "om_hub_url": "a Modelers hub dataset",
    "script_url": "a dataset loading script",
    "cloud_file_name": "a cloud (s3/gcs) file",
}
MEDIA = ("images", "videos", "audios")
COLUMNS = ("prompt", "query", "response", "history", "messages", "system", "tools", *MEDIA)
COLUMNS += ("chosen", "rejected", "kto_tag")
TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations"}
DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
ENTRY_KEYS = ("file_name", "formatting", "ranking", "subset", "split", "folder", "num_samples", "columns", "tags")
ENTRY_KEYS += tuple(REMOTE)
FORMATTINGS = ("alpaca", "sharegpt")
# our role names for LLaMA-Factory's roles (finetune/data_check.py accepts them in "messages" rows)
OUR_ROLE = {"user": "user", "assistant": "assistant", "observation": "observation", "function": "function_call"}
TOOLS_PREFIX = "You have access to the following tools:\n"


@dataclass
class Entry:
    """One dataset of a dataset_info.json, as LLaMA-Factory's DatasetAttr holds it."""

    name: str
    dataset_dir: Path
    files: List[Path]
    formatting: str = "alpaca"
    ranking: bool = False
    columns: Dict[str, Optional[str]] = field(default_factory=dict)
    tags: Dict[str, Optional[str]] = field(default_factory=dict)
    num_samples: Optional[int] = None
    raw: dict = field(default_factory=dict)  # the entry as written

    @property
    def format(self) -> str:
        """What the rows are, in this project's format names (finetune/data_check.py FORMATS)."""
        if self.ranking:
            return "preference"
        if self.columns.get("kto_tag"):
            return "kto"
        if self.formatting == "sharegpt":
            return "sharegpt"
        return "alpaca" if self.columns.get("response") else "text"

    def where(self, file: Path, n: int) -> str:
        return f"row {n} of {file}"


# ------------------------------------------------------------------------------------------ the registry


def dataset_names(value, key: str = "data.dataset") -> List[str]:
    """data.dataset as a list of names: a comma list ("a,b", LLaMA-Factory's own spelling) or a list."""
    if value is None or value == "":
        raise ConfigError(key, value, "name one or more datasets of the folder's dataset_info.json (a,b or [a,b])")
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(x).strip() for x in items]
    if any(not n for n in names):
        raise ConfigError(key, value, "holds an empty name")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(key, value, f"names {dup!r} twice")
    return names


def read_info(dataset_dir, key: str = "data.dataset_dir") -> dict:
    folder = Path(str(dataset_dir))
    if not folder.is_dir():
        raise ConfigError(key, str(dataset_dir), "no such folder (a folder holding dataset_info.json)")
    path = folder / INFO_FILE
    if not path.is_file():
        raise ConfigError(key, str(dataset_dir), f"has no {INFO_FILE} (LLaMA-Factory's list of the folder's datasets)")
    try:
        info = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(key, str(path), f"not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(key, str(path), f"not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(info, dict):
        raise ConfigError(key, str(path), "must hold a JSON object {name: entry}")
    return info


def _mapping(raw: dict, part: str, names, defaults: dict, where: str, key: str) -> Dict[str, Optional[str]]:
    """columns / tags with LLaMA-Factory's rule: absent -> the defaults; present -> what it names, the rest None."""
    if part not in raw:
        return {n: defaults.get(n) for n in names}
    given = raw[part]
    if not isinstance(given, dict):
        raise ConfigError(key, where, f"{part} must be an object {{name: column}}, not {type(given).__name__}")
    for k, v in given.items():
        if k not in names:
            hint = suggest(k, names)
            raise ConfigError(
                key, where, f"{part}.{k} is not a field LLaMA-Factory 0.9.5 reads ({', '.join(names)})", hint
            )
        if v is not None and not isinstance(v, str):
            raise ConfigError(key, where, f"{part}.{k} must be a string (the {part[:-1]} name), not {v!r}")
    return {n: given.get(n) for n in names}


def load_entry(info: dict, name: str, dataset_dir, key: str = "data.dataset") -> Entry:
    """The entry ``name`` of a dataset_info.json, every field checked; refused in one line when it cannot be read here
    (a hub/script/cloud source, a multimodal dataset, an unknown field, a missing file)."""
    folder = Path(str(dataset_dir))
    if name not in info:
        match = close_match(name, info)
        shown = ", ".join(list(info)[:12]) + (", ..." if len(info) > 12 else "")
        raise ConfigError(
            key,
            name,
            f"not in {folder / INFO_FILE} ({len(info)} entries: {shown})",
            f"did you mean {match!r}?" if match else "",
        )
    raw = info[name]
    where = f"{name} ({folder / INFO_FILE})"
    if not isinstance(raw, dict):
        raise ConfigError(key, name, f"its entry in {folder / INFO_FILE} must be an object, not {type(raw).__name__}")
    for k in raw:
        if k not in ENTRY_KEYS:
            raise ConfigError(
                key,
                name,
                f"field {k!r} of its entry is not one LLaMA-Factory 0.9.5 reads (it would be ignored): "
                + ", ".join(ENTRY_KEYS),
                suggest(k, ENTRY_KEYS),
            )
    remote = [k for k in REMOTE if k in raw]
    if remote:
        raise ConfigError(
            key,
            name,
            f"is {REMOTE[remote[0]]} ({remote[0]}={raw[remote[0]]!r}): nothing is downloaded here; put its rows in a "
            "file of the folder and name it with file_name",
        )
    if "file_name" not in raw or not isinstance(raw["file_name"], str) or not raw["file_name"]:
        raise ConfigError(key, name, "its entry has no file_name (the file or folder holding its rows)")
    columns = _mapping(raw, "columns", COLUMNS, DEFAULT_COLUMNS, where, key)
    tags = _mapping(raw, "tags", TAGS, DEFAULT_TAGS, where, key)
    media = [c for c in MEDIA if columns.get(c)]
    if media:
        raise ConfigError(
            key,
            name,
            f"is a multimodal dataset (columns.{media[0]}={columns[media[0]]!r}): {', '.join(MEDIA)} are not "
            "supported; this project trains text models",
        )
    formatting = raw.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        extra = " (openai: LLaMA-Factory's undocumented converter, which rewrites system prompts)"
        raise ConfigError(
            key,
            name,
            f"formatting {formatting!r}: one of {', '.join(FORMATTINGS)}" + (extra if formatting == "openai" else ""),
            suggest(str(formatting), FORMATTINGS),
        )
    ranking = raw.get("ranking", False)
    if not isinstance(ranking, bool):
        raise ConfigError(key, name, f"ranking must be true or false, not {ranking!r}")
    num = raw.get("num_samples")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num <= 0):
        raise ConfigError(key, name, f"num_samples must be an integer > 0, not {num!r}")
    split = raw.get("split", "train")
    if split != "train":
        raise ConfigError(key, name, f"split {split!r}: a local file holds one split, train")
    if ranking and not (columns.get("chosen") and columns.get("rejected")):
        raise ConfigError(
            key, name, "ranking needs columns.chosen and columns.rejected (the preferred and worse answer)"
        )
    if ranking and columns.get("kto_tag"):
        raise ConfigError(key, name, "is both a preference (ranking) and a KTO (columns.kto_tag) dataset; choose one")
    if formatting == "sharegpt" and not columns.get("messages"):
        raise ConfigError(key, name, "sharegpt formatting needs columns.messages (the list of turns)")
    if formatting == "sharegpt" and not (tags.get("role_tag") and tags.get("content_tag")):
        raise ConfigError(key, name, "sharegpt formatting needs tags.role_tag and tags.content_tag")
    return Entry(
        name=name,
        dataset_dir=folder,
        files=_files(raw["file_name"], folder, name, key),
        formatting=formatting,
        ranking=ranking,
        columns=columns,
        tags=tags,
        num_samples=num,
        raw=raw,
    )


def _files(file_name: str, folder: Path, name: str, key: str) -> List[Path]:
    """LLaMA-Factory's rule: file_name is a file, or a folder whose files (all of one type) are the rows."""
    path = folder / file_name
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        if not files:
            raise ConfigError(key, name, f"file_name {file_name!r} is an empty folder")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(key, name, f"file_name {file_name!r}: no such file or folder in {folder}")
    types = {p.suffix.lower() for p in files}
    for t in types:
        if t in UNCHECKABLE:
            raise ConfigError(
                key,
                name,
                f"{file_name} is a {t[1:]} file: its rows cannot be checked before the run; convert it to JSON "
                "lines (.jsonl)",
            )
        if t not in FILE_TYPES:
            raise ConfigError(key, name, f"{file_name}: file type {t or '(none)'!r}: one of .json, .jsonl, .txt, .csv")
    if len({FILE_TYPES[t] for t in types}) > 1:
        raise ConfigError(key, name, f"file_name {file_name!r} holds files of different types (LLaMA-Factory refuses)")
    return files


# ------------------------------------------------------------------------------------------ rows


def file_rows(file: Path, key: str = "data.dataset") -> Iterator[Tuple[int, dict]]:
    """(row number from 1, row) of one file, as LLaMA-Factory's loader (HF datasets) gives them."""
    kind = FILE_TYPES[Path(file).suffix.lower()]
    if kind == "json":
        yield from iter_rows(Path(file), key)
        return
    try:
        text = Path(file).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(key, str(file), f"not UTF-8 (byte {e.start})") from None
    if kind == "text":  # datasets' text builder: one row per line, column "text"
        for n, line in enumerate(text.splitlines(), start=1):
            yield n, {"text": line}
        return
    for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=1):
        yield n, dict(row)


class RowError(Exception):
    pass


def _get(row: dict, col: Optional[str], present: set, part: str):
    """The value of a mapped column, with LLaMA-Factory's failure when the column is in no row of the file."""
    if col not in present:
        raise RowError(
            f"column {col!r} (columns.{part}) is in no row of the file: LLaMA-Factory would stop with KeyError: "
            f"{col!r}; name the column the rows use, or drop columns.{part}"
        )
    return row.get(col)


def _opt_str(value, col: str, part: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"column {col!r} (columns.{part}) must be a string or null, not {type(value).__name__}")
    return value


def _alpaca(e: Entry, row: dict, present: set) -> dict:
    """An alpaca-formatted row in our formats (alpaca / preference / kto / text; a row with history or a system
    prompt keeps them)."""
    c = e.columns
    out: dict = {}
    prompt = _opt_str(_get(row, c["prompt"], present, "prompt"), c["prompt"], "prompt") if c["prompt"] else ""
    query = _opt_str(_get(row, c["query"], present, "query"), c["query"], "query") if c["query"] else ""
    if c["history"]:
        hist = _get(row, c["history"], present, "history")
        if hist is not None and not isinstance(hist, list):
            raise RowError(f"column {c['history']!r} (columns.history) must be a list of [prompt, response] pairs")
        for i, pair in enumerate(hist or []):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RowError(f"history item {i} must be a pair of strings [prompt, response], not {pair!r}")
        if hist:
            out["history"] = [list(p) for p in hist]
    for part in ("system", "tools"):
        if c[part]:
            v = _get(row, c[part], present, part)
            if isinstance(v, (dict, list)) and part == "tools":
                v = json.dumps(v, ensure_ascii=False)
            v = _opt_str(v, c[part], part)
            if v:
                out[part] = v
    if c["kto_tag"]:
        tag = _get(row, c["kto_tag"], present, "kto_tag")
        if not isinstance(tag, bool):
            raise RowError(f"column {c['kto_tag']!r} (columns.kto_tag) must be true or false, not {tag!r}")
        if not c["response"]:
            raise RowError("a KTO row needs columns.response (the answer the tag judges)")
        resp = _get(row, c["response"], present, "response")
        if not isinstance(resp, str):
            raise RowError(f"column {c['response']!r} (columns.response) must be a string, not {resp!r}")
        out.update(instruction=prompt, input=query, output=resp, kto_tag=tag)
    elif e.ranking:
        pair = {}
        for part in ("chosen", "rejected"):
            v = _get(row, c[part], present, part)
            if not isinstance(v, str):
                raise RowError(
                    f"column {c[part]!r} (columns.{part}) must be a string in an alpaca preference row, not "
                    f"{type(v).__name__} (LLaMA-Factory would drop the row)"
                )
            pair[part] = v
        out.update(instruction=prompt, input=query, **pair)
    elif c["response"]:
        resp = _get(row, c["response"], present, "response")
        if not isinstance(resp, str):
            raise RowError(
                f"column {c['response']!r} (columns.response) must be a string, not "
                f"{'null' if resp is None else type(resp).__name__} (LLaMA-Factory would drop the row: no answer)"
            )
        out.update(instruction=prompt, input=query, output=resp)
    else:  # unsupervised: pre-training text (LLaMA-Factory joins prompt and query with a newline)
        text = "\n".join(x for x in (prompt, query) if x)
        if not text:
            raise RowError(f"has no text (column {c['prompt']!r}, columns.prompt, is empty)")
        return {"text": text}
    return out


def _turn(t, i: int, rt: str, ct: str) -> Tuple[str, str]:
    if not isinstance(t, dict):
        raise RowError(f"turn {i} is not an object")
    if rt not in t or ct not in t:
        raise RowError(f"turn {i} lacks {rt!r} or {ct!r} (tags.role_tag / tags.content_tag)")
    if not isinstance(t[ct], str):
        raise RowError(f"turn {i} has no string {ct!r}")
    return t[rt], t[ct]


def _sharegpt(e: Entry, row: dict, present: set) -> dict:
    """A sharegpt-formatted row in our "messages" layout (roles user/assistant/system/function_call/observation),
    with LLaMA-Factory's rules: an optional leading system turn, then user/observation and assistant/function turns
    alternating; an even count (sft, kto) or an odd one ending with the user (ranking)."""
    c, tg = e.columns, e.tags
    rt, ct = tg["role_tag"], tg["content_tag"]
    msgs = _get(row, c["messages"], present, "messages")
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"column {c['messages']!r} (columns.messages) must be a non-empty list of turns")
    turns = [_turn(t, i, rt, ct) for i, t in enumerate(msgs)]
    system, offset = "", 0
    if tg["system_tag"] and turns[0][0] == tg["system_tag"]:
        system, turns, offset = turns[0][1], turns[1:], 1
    elif c["system"]:
        system = _opt_str(_get(row, c["system"], present, "system"), c["system"], "system")
    roles = {tg["user_tag"]: "user", tg["observation_tag"]: "observation"}
    answers = {tg["assistant_tag"]: "assistant", tg["function_tag"]: "function"}
    out_turns = []
    for i, (role, content) in enumerate(turns):
        allowed = roles if i % 2 == 0 else answers
        if role not in allowed or role is None:
            want = (
                "user (tags.user_tag / observation_tag)" if i % 2 == 0 else "assistant (assistant_tag / function_tag)"
            )
            names = ", ".join(repr(k) for k in allowed if k)
            raise RowError(
                f"turn {i + offset} has role {role!r} where a {want} turn must come ({names}); turns must alternate "
                "(LLaMA-Factory would drop the row: 'Invalid role tag')"
            )
        out_turns.append({"role": OUR_ROLE[allowed[role]], "content": content})
    if not out_turns:
        raise RowError("has no turns besides the system prompt")
    need_odd = e.ranking
    if len(out_turns) % 2 != (1 if need_odd else 0):
        raise RowError(
            f"has {len(out_turns)} non-system turns; "
            + ("a preference row's turns end with the user (an odd count)" if need_odd else "turns come in pairs")
            + " (LLaMA-Factory would drop the row: 'Invalid message count')"
        )
    out: dict = {"messages": ([{"role": "system", "content": system}] if system else []) + out_turns}
    if c["tools"]:
        tools = _get(row, c["tools"], present, "tools")
        if isinstance(tools, (dict, list)):
            tools = json.dumps(tools, ensure_ascii=False)
        tools = _opt_str(tools, c["tools"], "tools")
        if tools:
            out["tools"] = tools
    if c["kto_tag"]:
        tag = _get(row, c["kto_tag"], present, "kto_tag")
        if not isinstance(tag, bool):
            raise RowError(f"column {c['kto_tag']!r} (columns.kto_tag) must be true or false, not {tag!r}")
        out["kto_tag"] = tag
    if e.ranking:
        for part in ("chosen", "rejected"):
            v = _get(row, c[part], present, part)
            if not isinstance(v, dict):
                raise RowError(
                    f"column {c[part]!r} (columns.{part}) must be a turn object ({{{rt!r}: ..., {ct!r}: ...}}) in a "
                    f"sharegpt preference row, not {type(v).__name__}"
                )
            role, content = _turn(v, 0, rt, ct)
            if role not in answers or role is None:
                raise RowError(f"{part} has role {role!r}; it must be an answer ({tg['assistant_tag']!r})")
            out[part] = {"role": OUR_ROLE[answers[role]], "content": content}
    return out


def convert(e: Entry, row, present: set) -> dict:
    """The row in our formats; RowError says what is wrong (the caller adds where)."""
    if not isinstance(row, dict):
        raise RowError(f"is a {type(row).__name__}, expected an object")
    return _sharegpt(e, row, present) if e.formatting == "sharegpt" else _alpaca(e, row, present)


def entry_rows(e: Entry, key: str = "data.dataset", max_rows: Optional[int] = None) -> List[dict]:
    """Every row of the entry's files in our formats, checked; a bad row is refused with where and why."""
    out: List[dict] = []
    for file in e.files:
        rows = list(file_rows(file, key))
        present = {k for _, row in rows if isinstance(row, dict) for k in row}  # the columns HF datasets sees
        for n, row in rows:
            try:
                out.append(convert(e, row, present))
            except RowError as err:
                raise ConfigError(key, e.name, f"{e.where(file, n)} {err}") from None
            if max_rows is not None and len(out) >= max_rows:
                return out
    if not out:
        raise ConfigError(key, e.name, f"{', '.join(map(str, e.files))} holds no rows")
    return out


def digest(e: Entry) -> Dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in e.files}
