"""The rows a run trains and evaluates on, for the driver's validation and for every worker (one reader, so what
validated is what trains). Standard library only.

Where the rows come from:

  data.path=FILE|FOLDER                     one file (or a folder's files), in one of our formats (data_check.py)
  data=llamafactory data.dataset_dir=DIR data.dataset=a,b
                                            datasets of DIR/dataset_info.json, read as LLaMA-Factory 0.9.5 reads
                                            them (finetune/lfdata.py), converted to our formats

Several datasets (data.dataset=a,b) are concatenated, each row once (LLaMA-Factory's mix_strategy concat), unless:

  data.mix={a: 1, b: 3}     a mixture: rows per dataset in proportion to the weights, drawn with the run's seed
                            (each dataset its own random stream: adding one does not change another's rows); in
                            all ``data.mix_rows`` rows, by default as many as the weights allow without repeating
                            a row (LLaMA-Factory's interleave_under); more than a dataset holds repeats rows
  data.eval_dataset=c       a dataset held out for evaluation (not trained on, also when it is in data.dataset);
                            the held-out share val_set_size is then not used

A dataset's own ``num_samples`` (rows drawn from its file, repeated when larger) and ``max_samples`` (the first rows
of each dataset, as LLaMA-Factory applies it) come first. The realised composition (rows per dataset) is decided
here, before the run, and recorded in the manifest.

Rows in our formats: an alpaca-formatted dataset gives alpaca rows (instruction / input / output), a sharegpt one
"messages" rows. A run whose rows are not all plain alpaca rows (a sharegpt dataset, a system prompt, a history or
tools) trains every row as a conversation through the chat template (``chat_rows``): one prompt format per run.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from finetune.errors import ConfigError

SFT_FORMATS = ("alpaca", "sharegpt")
STAGE_HINT = {
    "preference": "preference pairs train with backend=llamafactory backend.stage=dpo or rm",
    "kto": "KTO rows train with backend=llamafactory backend.stage=kto",
    "text": "pre-training text trains with backend=llamafactory backend.stage=pt",
}


def registry(data: dict) -> bool:
    """Rows from a dataset_info.json (data=llamafactory), not from data.path."""
    return data.get("dataset") not in (None, "", [])


def names(data: dict) -> Tuple[List[str], Optional[str]]:
    """(training dataset names, held-out dataset name or None)."""
    from finetune.lfdata import dataset_names

    names = dataset_names(data.get("dataset"))
    held = data.get("eval_dataset") or None
    train = [n for n in names if n != held]
    if not train:
        raise ConfigError("data.eval_dataset", held, "holds out the only dataset of data.dataset: nothing to train on")
    return train, held


def entries(data: dict) -> Tuple[list, Optional[object]]:
    """(training entries, held-out entry or None) of data=llamafactory, each checked (finetune/lfdata.py)."""
    from finetune.lfdata import load_entry, read_info

    train, held = names(data)
    info = read_info(data["dataset_dir"])
    es = [load_entry(info, n, data["dataset_dir"]) for n in train]
    ev = load_entry(info, held, data["dataset_dir"], key="data.eval_dataset") if held else None
    return es, ev


# ------------------------------------------------------------------------------------------ sampling


def _rng(seed: int, name: str, what: str) -> random.Random:
    return random.Random(f"{int(seed)}/{name}/{what}")


def draw(n_rows: int, n: int, rng: random.Random) -> List[int]:
    """n row indices of n_rows: without repetition while they last (in file order), then repeated ones drawn at
    random (as LLaMA-Factory's num_samples: every row once, the rest with replacement)."""
    if n <= n_rows:
        return sorted(rng.sample(range(n_rows), n))
    return list(range(n_rows)) + [rng.randrange(n_rows) for _ in range(n - n_rows)]


def entry_rows(entry, seed: int, max_samples: Optional[int], key: str = "data.dataset") -> List[dict]:
    """A dataset's rows as LLaMA-Factory loads them: num_samples drawn, then the first max_samples."""
    from finetune.lfdata import entry_rows as read

    rows = read(entry, key)
    if entry.num_samples is not None:
        rows = [rows[i] for i in draw(len(rows), int(entry.num_samples), _rng(seed, entry.name, "num_samples"))]
    if max_samples:
        rows = rows[: int(max_samples)]
    return rows


def weights(data: dict, names: List[str]) -> Optional[Dict[str, float]]:
    """data.mix checked: a positive weight for every training dataset, or None (no mixture)."""
    mix = data.get("mix")
    if mix in (None, {}):
        return None
    if not isinstance(mix, dict):
        raise ConfigError("data.mix", mix, "a mapping {dataset: weight}, e.g. 'data.mix={a: 1, b: 3}'")
    unknown = [k for k in mix if k not in names]
    if unknown:
        raise ConfigError(
            "data.mix", mix, f"{unknown[0]!r} is not a training dataset (data.dataset: {', '.join(names)})"
        )
    missing = [n for n in names if n not in mix]
    if missing:
        raise ConfigError("data.mix", mix, f"gives no weight for {missing[0]!r}; weigh every dataset of data.dataset")
    for k, v in mix.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"data.mix.{k}", v, "must be a number > 0")
    return {n: float(mix[n]) for n in names}


def composition(sizes: Dict[str, int], w: Optional[Dict[str, float]], total: Optional[int]) -> Dict[str, int]:
    """Rows per dataset: every row once without weights; with weights, ``total`` rows split in proportion (largest
    remainders), by default the most the weights allow without repeating a row."""
    if w is None:
        return dict(sizes)
    s = sum(w.values())
    share = {n: w[n] / s for n in sizes}
    if total is None:
        total = int(min(sizes[n] / share[n] for n in sizes) + 1e-9)
    exact = {n: total * share[n] for n in sizes}
    counts = {n: int(exact[n]) for n in sizes}
    for n in sorted(sizes, key=lambda n: (counts[n] - exact[n], list(sizes).index(n)))[: total - sum(counts.values())]:
        counts[n] += 1
    return counts


def mixed(per_source: Dict[str, List[dict]], counts: Dict[str, int], seed: int) -> Dict[str, List[dict]]:
    """Each dataset's rows of the mixture (its count drawn with its own random stream)."""
    return {n: [rows[i] for i in draw(len(rows), counts[n], _rng(seed, n, "mix"))] for n, rows in per_source.items()}


# ------------------------------------------------------------------------------------------ what runs read


def is_chat(row: dict) -> bool:
    return "messages" in row or "conversations" in row or bool(row.get("history") or row.get("system"))


def alpaca_to_messages(row: dict) -> dict:
    """An alpaca row as a conversation (LLaMA-Factory's alpaca converter: system, history pairs, then the user's
    instruction and input joined by a newline, then the answer); preference and KTO rows keep their answers."""
    msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for q, a in row.get("history") or []:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": "\n".join(x for x in (row.get("instruction"), row.get("input")) if x)})
    out = {k: v for k, v in row.items() if k in ("chosen", "rejected", "kto_tag", "tools")}
    for k in ("chosen", "rejected"):
        if isinstance(out.get(k), str):
            out[k] = {"role": "assistant", "content": out[k]}
    if "output" in row:
        msgs.append({"role": "assistant", "content": row["output"]})
    return {"messages": msgs, **out}


def chat_rows(rows: List[dict]) -> List[dict]:
    """One prompt format per run: if any row is a conversation, every row becomes one."""
    if not any(is_chat(r) for r in rows):
        return rows
    return [r if "messages" in r or "conversations" in r else alpaca_to_messages(r) for r in rows]


def source_rows(cfg: dict) -> Tuple[Dict[str, List[dict]], Optional[Tuple[str, List[dict]]]]:
    """({dataset: its rows in the run}, (held-out dataset, its rows) or None) of data=llamafactory."""
    data, seed, max_samples = cfg["data"], int(cfg.get("seed", 42)), cfg.get("max_samples")
    es, ev = entries(data)
    per = {e.name: entry_rows(e, seed, max_samples) for e in es}
    w = weights(data, list(per))
    if w is not None:
        per = mixed(per, composition({n: len(r) for n, r in per.items()}, w, data.get("mix_rows")), seed)
    held = (ev.name, entry_rows(ev, seed, max_samples, "data.eval_dataset")) if ev else None
    return per, held


def train_rows(cfg: dict) -> List[dict]:
    """The rows the run trains on (before any held-out share), in our formats: data.path's rows (the first
    max_samples), or the datasets' rows in data.dataset order, mixed."""
    data = cfg["data"]
    if not registry(data):
        from finetune.datafiles import read_rows

        rows = read_rows(data["path"])
        return rows[: int(cfg["max_samples"])] if cfg.get("max_samples") else rows
    per, held = source_rows(cfg)
    rows = chat_rows([r for rs in per.values() for r in rs] + (held[1] if held else []))
    return rows[: sum(len(r) for r in per.values())]


def eval_rows(cfg: dict) -> Optional[List[dict]]:
    """The held-out dataset's rows (data.eval_dataset) in the run's prompt format, or None."""
    data = cfg["data"]
    if not registry(data) or not data.get("eval_dataset"):
        return None
    per, held = source_rows(cfg)
    n = sum(len(r) for r in per.values())
    return chat_rows([r for rs in per.values() for r in rs] + held[1])[n:]


def fingerprint(cfg: dict) -> dict:
    """What the rows depend on (for caches): the files' bytes, the entries, the mixture and the seed."""
    from finetune.data_cache import file_digest
    from finetune.datafiles import data_files

    data = cfg["data"]
    if not registry(data):
        return {"files": file_digest(data_files(data["path"])), "max_samples": cfg.get("max_samples")}
    es, ev = entries(data)
    return {
        "files": file_digest([f for e in es + ([ev] if ev else []) for f in e.files]),
        "entries": {e.name: e.raw for e in es + ([ev] if ev else [])},
        "order": [e.name for e in es],
        "eval": ev.name if ev else None,
        "mix": data.get("mix"),
        "mix_rows": data.get("mix_rows"),
        "seed": int(cfg.get("seed", 42)),
        "max_samples": cfg.get("max_samples"),
    }


def write_sampled(cfg: dict, folder: Path) -> Dict[str, str]:
    """The sampled rows of each dataset (a mixture, or an entry's num_samples), exactly as they were read, as JSON
    lines in ``folder``/<name>.jsonl, for LLaMA-Factory to read instead of the whole files: the rows and counts it
    trains on are this module's. Returns {name: file}."""
    import json

    from finetune.lfdata import file_rows
    from finetune.osutil import atomic_write

    data, seed, max_samples = cfg["data"], int(cfg.get("seed", 42)), cfg.get("max_samples")
    es, ev = entries(data)
    raw = {}
    for e in es + ([ev] if ev else []):
        rows = [row for f in e.files for _, row in file_rows(f)]
        if e.num_samples is not None:
            rows = [rows[i] for i in draw(len(rows), int(e.num_samples), _rng(seed, e.name, "num_samples"))]
        if max_samples:
            rows = rows[: int(max_samples)]
        raw[e.name] = rows
    w = weights(data, [e.name for e in es])
    if w is not None:
        train = {e.name: raw[e.name] for e in es}
        raw.update(mixed(train, composition({n: len(r) for n, r in train.items()}, w, data.get("mix_rows")), seed))
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, rows in raw.items():
        path = folder / f"{name}.jsonl"
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        out[name] = str(path)
    return out


# ------------------------------------------------------------------------------------------ validation


def combined_format(formats: Dict[str, str], key: str = "data.dataset") -> str:
    """The one kind of data the datasets make together: sft (alpaca and sharegpt mix, as conversations), pre-training
    text (plain text and alpaca prompts), preference pairs or KTO rows."""
    kinds = set(formats.values())
    if len(kinds) == 1:
        return kinds.pop()
    if kinds == {"alpaca", "sharegpt"}:
        return "sharegpt"
    if kinds == {"alpaca", "text"}:
        return "text"
    a = next(iter(formats))
    b = next(n for n in formats if formats[n] != formats[a])
    raise ConfigError(
        key,
        ",".join(formats),
        f"{a} holds {formats[a]} rows and {b} {formats[b]} rows: one run trains one kind of data (sft: alpaca and "
        "sharegpt; pre-training text; preference pairs; KTO rows)",
    )


def check(cfg: dict, allowed: List[str]) -> dict:
    """data=llamafactory, every row checked: {format, rows (trained on), files: {path: sha256}, sources: {name:
    {format, rows, files}}, composition: {name: rows}, mix, eval_dataset: {name, rows}} (the manifest's data)."""
    from finetune.lfdata import digest

    data, seed, max_samples = cfg["data"], int(cfg.get("seed", 42)), cfg.get("max_samples")
    if data.get("path"):
        raise ConfigError(
            "data.path",
            data["path"],
            "give data.path (a file) or data.dataset (datasets of a dataset_info.json, data=llamafactory), not both",
        )
    if data.get("eval_path"):
        raise ConfigError(
            "data.eval_path", data["eval_path"], "with data.dataset, hold a dataset out: data.eval_dataset"
        )
    es, ev = entries(data)
    per = {e.name: entry_rows(e, seed, max_samples) for e in es}
    formats = {e.name: e.format for e in es}
    fmt = combined_format(formats)
    if ev is not None:
        held = entry_rows(ev, seed, max_samples, "data.eval_dataset")
        try:
            both = combined_format({**formats, ev.name: ev.format}, "data.eval_dataset")
        except ConfigError:
            both = None
        if both is None or (both != fmt and not (fmt in SFT_FORMATS and both in SFT_FORMATS)):
            raise ConfigError("data.eval_dataset", ev.name, f"holds {ev.format} rows; the training datasets {fmt} rows")
    else:
        held = []
    w = weights(data, list(per))
    total = data.get("mix_rows")
    if total is not None:
        if w is None:
            raise ConfigError("data.mix_rows", total, "sizes a mixture: set data.mix={dataset: weight, ...} too")
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise ConfigError("data.mix_rows", total, "must be an integer > 0 (null: as many as the weights allow)")
    counts = composition({n: len(r) for n, r in per.items()}, w, total)
    if sum(counts.values()) == 0:
        raise ConfigError("data.mix", data.get("mix"), "leaves no rows; set data.mix_rows")
    if fmt in SFT_FORMATS and any(is_chat(r) for rs in list(per.values()) + [held] for r in rs):
        fmt = "sharegpt"  # trained as conversations (system prompts, histories, tools, or sharegpt datasets)
    if data.get("format", "auto") not in ("auto", fmt):  # (a second validation, backend=auto's, finds its own)
        raise ConfigError(
            "data.format", data["format"], "data=llamafactory reads each dataset's format from its dataset_info.json"
        )
    if allowed and fmt not in allowed:
        name = next(n for n, f in formats.items() if f not in allowed or f == fmt)
        raise ConfigError(
            "data.dataset",
            name,
            f"holds {formats[name]} rows; this backend/stage takes {', '.join(allowed)}",
            STAGE_HINT.get(formats[name], ""),
        )
    facts = {
        "format": fmt,
        "rows": sum(counts.values()),
        "files": {f: h for e in es + ([ev] if ev else []) for f, h in digest(e).items()},
        "sources": {
            e.name: {"format": e.format, "rows": len(per[e.name]), "files": [str(f) for f in e.files]} for e in es
        },
        "composition": counts,
    }
    if w is not None:
        facts["mix"] = {"weights": w, "rows": sum(counts.values()), "seed": seed}
    if ev is not None:
        facts["eval_dataset"] = {"name": ev.name, "format": ev.format, "rows": len(held)}
    facts["sampled"] = w is not None or any(e.num_samples is not None for e in es + ([ev] if ev else []))
    return facts


def describe(counts: Dict[str, int]) -> str:
    """'a 10 + b 30 rows' for the completion line."""
    return " + ".join(f"{n} {c}" for n, c in counts.items()) + " rows"
