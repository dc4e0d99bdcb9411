"""A live progress line for a training step on a terminal, read from the JSONL file the worker writes as it trains.

Every backend's train step names such a file (Step.progress): the alpacalora, FlagEmbedding and Collie workers
append a row per log event to <run>/history.jsonl (step, total_steps, loss, tokens_per_s), LLaMA-Factory writes
<output>/trainer_log.jsonl (current_steps, total_steps, loss, throughput). On a terminal the step's output lines
scroll above one line that stays at the bottom:

    train  ━━━━━━━━━━━━━━━━━━━╸━━━━━━━━━━━━━  12/26  loss 5.612  15.0k tokens/s  0:00:08 elapsed  ETA 0:00:09

When the output is not a terminal (a log file, CI, a pipe) nothing changes: plain lines only.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Optional


def read_progress(row: dict) -> dict:
    """The fields the line shows, from a history.jsonl row or a LLaMA-Factory trainer_log.jsonl row."""
    step = row.get("current_steps", row.get("step"))
    out = {"step": int(step) if isinstance(step, (int, float)) else None, "total": row.get("total_steps")}
    if row.get("loss") is not None:
        out["loss"] = float(row["loss"])
    tps = row.get("tokens_per_s", row.get("throughput"))
    if isinstance(tps, (int, float)):
        out["tokens_per_s"] = float(tps)
    return out


class _Tail:
    """New complete lines of a file that another process appends to."""

    def __init__(self, path: Path):
        self.path, self.offset, self.rest = Path(path), 0, b""

    def rows(self):
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < self.offset:  # rewritten (a resume truncates history.jsonl): start over
                    self.offset, self.rest = 0, b""
                f.seek(self.offset)
                data = f.read()
                self.offset += len(data)
        except OSError:
            return []
        data, out = self.rest + data, []
        *lines, self.rest = data.split(b"\n")
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


class LiveProgress:
    """A rich progress line for one step, fed by polling ``path`` every ``interval`` seconds; ``print`` puts an
    output line above it. Use as a context manager."""

    def __init__(self, name: str, path: Path, interval: float = 0.5):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(highlight=False, soft_wrap=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[tps]}"),
            TimeElapsedColumn(),
            TextColumn("elapsed  ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            refresh_per_second=4,
        )
        self.task = self.progress.add_task(name, total=None, loss="", tps="starting")
        self.tail, self.interval = _Tail(path), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="finetune-progress", daemon=True)

    def __enter__(self) -> "LiveProgress":
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.update()
        self.progress.stop()

    def print(self, text: str) -> None:
        self.console.print(text, markup=False, emoji=False)

    def update(self) -> None:
        for row in self.tail.rows():
            p = read_progress(row)
            if p["step"] is None:
                continue
            fields = {"completed": p["step"]}
            if isinstance(p.get("total"), (int, float)) and p["total"] > 0:
                fields["total"] = int(p["total"])
            if "loss" in p:
                fields["loss"] = f"loss {p['loss']:.4g}"
            if "tokens_per_s" in p:
                tps = p["tokens_per_s"]
                fields["tps"] = f"{tps / 1000:.1f}k tokens/s" if tps >= 1000 else f"{tps:.0f} tokens/s"
            self.progress.update(self.task, **fields)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.update()


def live_progress(name: str, path: Optional[Path], echo: bool) -> Optional[LiveProgress]:
    """A LiveProgress when the step names a progress file, its output is echoed and stdout is a terminal."""
    import sys

    if not path or not echo:
        return None
    try:
        if not sys.stdout.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    return LiveProgress(name, Path(path))
