"""The per-run training history every backend leaves behind: <run>/history.jsonl, one JSON object per log event.

Keys (all optional but "step"): step, epoch, loss, eval_loss, learning_rate, grad_norm, tokens_per_s,
peak_rss_mb, plus backend-specific ones (accuracy for dpo, ...). Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from finetune.run_files import HISTORY


def read_history(run_dir) -> List[Dict]:
    path = Path(run_dir) / HISTORY
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill; the rest is still good
    return rows


def write_history(run_dir, rows: List[Dict]) -> None:
    from finetune.osutil import atomic_write

    atomic_write(Path(run_dir) / HISTORY, "".join(json.dumps(r) + "\n" for r in rows))


def loss_series(rows: List[Dict], key: str = "loss"):
    pts = [(r["step"], r[key]) for r in rows if key in r and r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]
