"""The tokenised-dataset cache shared by runs (and by the jobs of a sweep): built once, then read.

API (standard library only at import; ``datasets`` is imported only for a datasets.Dataset value):

    from finetune.data_cache import get_or_build, file_digest

    key = {"data": file_digest(data_files), "tokenizer": file_digest(tokenizer_files),
           "template": template_name_or_dict, "cutoff_len": 1030, "train_on_inputs": True, "max_samples": None}
    info = {}
    examples = get_or_build(key, lambda: encode_rows(rows, tokenizer, ...), info=info)
    # info == {"key": "3f2a...", "path": ".../3f2a....json", "hit": True, "seconds": 0.01, "waited_s": 0.0}

- ``key_parts``: a JSON-serialisable dict of everything that changes the result (data hash, tokenizer files'
  hash, template, cutoff, ...). The cache key is the sha256 of its canonical JSON. Put every such input in it:
  a key that misses one returns stale data.
- ``build_fn()``: returns either JSON-serialisable data (a list of {"input_ids", "labels", ...} dicts: stored
  as one JSON file) or a ``datasets.Dataset``/``DatasetDict`` (stored with ``save_to_disk``, returned by
  ``load_from_disk``, memory-mapped). The same kind comes back on a hit.
- Safe under parallel jobs: one builder per key at a time (an exclusive ``filelock`` lock on ``<key>.lock``;
  the others wait, then read), and the entry appears atomically (written to a temp name in the same folder, then
  renamed), so a reader never sees half an entry and a killed builder leaves only a temp file.
- Where: ``$FINETUNE_DATA_CACHE``, else ``<repo>/outputs/cache/tokenized``, or the ``cache_dir`` argument.
  ``FINETUNE_DATA_CACHE=off`` disables it (always builds).
- ``python -m finetune.data_cache list|clear [--cache-dir DIR]`` shows or empties it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional

from finetune.osutil import atomic_write

VERSION = 1


def cache_root(cache_dir=None) -> Optional[Path]:
    """The cache folder, or None when disabled (FINETUNE_DATA_CACHE=off)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("FINETUNE_DATA_CACHE")
    if env and env.lower() in ("off", "0", "false", "none"):
        return None
    if env:
        return Path(env)
    from finetune.config.paths import OUTPUTS_ROOT

    return Path(OUTPUTS_ROOT) / "cache" / "tokenized"


def file_digest(paths: Iterable) -> str:
    """sha256 over the names and bytes of files (sorted by name), for key_parts."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def cache_key(key_parts: Dict[str, Any]) -> str:
    text = json.dumps({"v": VERSION, **key_parts}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _locked(lock_path: Path):
    """One builder per key across processes: filelock's exclusive lock on ``<key>.lock`` (fcntl.flock on Linux),
    waited for without a timeout, released when the block ends or the process dies."""
    from filelock import FileLock

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_path))


def _entry(root: Path, key: str) -> Optional[Path]:
    for p in (root / f"{key}.json", root / f"{key}.hfds"):
        if p.exists():
            return p
    return None


def _load(path: Path):
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    import datasets

    return datasets.load_from_disk(str(path))


def _store(root: Path, key: str, value, key_parts: dict) -> Path:
    """Write atomically: temp name in the same folder, then rename (a file or a folder)."""
    is_hf = type(value).__module__.startswith("datasets")
    if is_hf:
        final = root / f"{key}.hfds"
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.", suffix=".tmp"))
        try:
            value.save_to_disk(str(tmp / "data"))
            (tmp / "data" / "finetune_key.json").write_text(json.dumps(key_parts, indent=1, default=str))
            os.replace(tmp / "data", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        final = root / f"{key}.json"
        atomic_write(final, json.dumps(value, separators=(",", ":")))
        (root / f"{key}.key.json").write_text(json.dumps(key_parts, indent=1, default=str))
    return final


def get_or_build(
    key_parts: Dict[str, Any], build_fn: Callable[[], Any], *, cache_dir=None, info: Optional[dict] = None
):
    """Return the cached value for ``key_parts``, building it with ``build_fn()`` (once, under a lock) if absent.

    ``info`` (optional dict) receives: key, path, hit (True when read from the cache), seconds (total time in
    this call), waited_s (time spent waiting for another job's lock)."""
    t0 = time.perf_counter()
    root = cache_root(cache_dir)
    key = cache_key(key_parts)
    rec = {"key": key, "path": None, "hit": False, "seconds": 0.0, "waited_s": 0.0}
    if root is None:
        value = build_fn()
        rec["seconds"] = time.perf_counter() - t0
        if info is not None:
            info.update(rec)
        return value
    root.mkdir(parents=True, exist_ok=True)
    value = None
    path = _entry(root, key)
    if path is not None:  # fast path: no lock needed to read a finished entry
        value, rec["hit"] = _load(path), True
    else:
        t_lock = time.perf_counter()
        with _locked(root / f"{key}.lock"):
            rec["waited_s"] = time.perf_counter() - t_lock
            path = _entry(root, key)  # another job may have built it while we waited
            if path is not None:
                value, rec["hit"] = _load(path), True
            else:
                value = build_fn()
                path = _store(root, key, value, key_parts)
                if type(value).__module__.startswith("datasets"):
                    value = _load(path)  # memory-mapped from the cache, as a hit would be
    rec["path"] = str(path)
    rec["seconds"] = time.perf_counter() - t0
    if info is not None:
        info.update(rec)
    return value


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m finetune.data_cache", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["list", "clear"])
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    root = cache_root(args.cache_dir)
    if root is None or not root.exists():
        print(f"no cache at {root}")
        return 0
    entries = sorted(p for p in root.iterdir() if p.suffix in (".json", ".hfds") and not p.name.endswith(".key.json"))
    if args.action == "list":
        for p in entries:
            size = sum(f.stat().st_size for f in p.rglob("*")) if p.is_dir() else p.stat().st_size
            print(f"{p.name}\t{size / 1e6:.2f} MB")
        print(f"{len(entries)} entries in {root}")
    else:
        shutil.rmtree(root)
        print(f"removed {root} ({len(entries)} entries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
