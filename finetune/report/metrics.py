"""End of a run: metrics.json, a loss-curve PNG and TensorBoard events, the same for every backend.

Backends return their own numbers from collect(); this adds what can be derived from history.jsonl
(first/final/min loss, final eval loss) and writes the files. Imported only after training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from finetune.history import loss_series, read_history
from finetune.run_dir import atomic_write_json
from finetune.run_files import METRICS


def summarize_history(rows) -> Dict:
    out = {}
    _, loss = loss_series(rows, "loss")
    if loss:
        out.update(first_train_loss=float(loss[0]), train_loss=float(loss[-1]), min_train_loss=float(min(loss)))
        k = max(1, len(loss) // 5)
        out["first_train_loss_avg"] = float(sum(loss[:k]) / k)
        out["final_train_loss_avg"] = float(sum(loss[-k:]) / k)
    _, ev = loss_series(rows, "eval_loss")
    if ev:
        out.update(first_eval_loss=float(ev[0]), eval_loss=float(ev[-1]))
    steps = [r["step"] for r in rows if "step" in r]
    if steps:
        out["steps"] = int(max(steps))
    return out


def _warm() -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from tensorboard.compat.proto.event_pb2 import Event  # noqa: F401
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: F401

        fig, ax = plt.subplots(figsize=(1, 1))  # loads the fonts once
        ax.set_title("warm")
        fig.canvas.draw()
        plt.close(fig)
    except Exception:  # noqa: BLE001  (finalize imports them again and reports any real problem)
        pass


def prewarm() -> None:
    """Import matplotlib and TensorBoard's writer (about 1 s) in a background thread while the run's steps work in
    their own processes, so that the end of the run (finalize) does not wait for them. The driver itself only waits
    on its child process meanwhile."""
    import threading

    # not a daemon: the interpreter waits for it at exit (a daemon thread killed in the middle of a C extension's
    # import aborted the process: "terminate called without an active exception")
    threading.Thread(target=_warm, name="finetune-prewarm", daemon=False).start()


def plot_loss(run_dir: Path, rows) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, style in (("loss", "-"), ("eval_loss", "o--")):
        x, y = loss_series(rows, key)
        if x:
            ax.plot(x, y, style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    tmp = out.with_name(".loss.png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)
    return str(out)


def write_tensorboard(run_dir: Path, rows) -> str:
    """Write scalars from history.jsonl unless the backend already wrote event files."""
    tb = Path(run_dir) / "tensorboard"
    if tb.exists() and any(tb.rglob("events.out.tfevents.*")):
        return str(tb)
    import time

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(tb))
    for r in rows:
        step = int(r.get("step", 0))
        values = [
            Summary.Value(tag=f"train/{k}" if k != "eval_loss" else "eval/loss", simple_value=float(v))
            for k, v in r.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float))
        ]
        if values:
            writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
    writer.flush()
    writer.close()
    return str(tb)


def generation_metrics(run_dir: Path) -> Dict:
    """The evaluation by generation (finetune/recipes/gen_eval.py): base_eval_* before training, eval_* after."""
    import json

    out: Dict = {}
    for stage, prefix in (("before", "base_eval_"), ("after", "eval_")):
        path = Path(run_dir) / "eval" / f"generate_{stage}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        for k in ("exact_match", "token_f1", "rouge_l"):
            out[prefix + k] = result["metrics"][k]
        out[f"generate_{stage}_tokens_per_s"] = result.get("generate_tokens_per_s")
        out["generate_eval_rows"] = result["metrics"]["rows"]
    if "eval_exact_match" in out and "base_eval_exact_match" in out:
        out["eval_exact_match_gain"] = out["eval_exact_match"] - out["base_eval_exact_match"]
    return out


def preference_metrics(run_dir: Path) -> Dict:
    """The preference evaluation (finetune/recipes/pref_eval.py): base_eval_preference_* before training,
    eval_preference_* after, and the accuracy's gain."""
    import json

    out: Dict = {}
    for stage, prefix in (("before", "base_eval_preference_"), ("after", "eval_preference_")):
        path = Path(run_dir) / "eval" / f"preference_{stage}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        for k in ("accuracy", "margin"):
            out[prefix + k] = result["metrics"][k]
        out["preference_eval_pairs"] = result["metrics"]["pairs"]
    if "eval_preference_accuracy" in out and "base_eval_preference_accuracy" in out:
        out["eval_preference_accuracy_gain"] = out["eval_preference_accuracy"] - out["base_eval_preference_accuracy"]
    return out


def reused_work(run_dir: Path) -> Dict:
    """What the run's steps took from a shared cache instead of computing (the manifest's "reused"): the base
    model's answers of the evaluation by generation (finetune/recipes/gen_eval.py)."""
    import json

    path = Path(run_dir) / "eval" / "generate_before.json"
    cache = json.loads(path.read_text(encoding="utf-8")).get("cache") if path.exists() else None
    return {"generate_eval_before": cache} if cache and cache.get("reused") else {}


def write_generation_tensorboard(run_dir: Path, metrics: Dict, last_step: int) -> None:
    """The generation and preference scores as scalars (step 0: before training, last step: after) and the samples
    table as text, in tensorboard/generation/ (beside the backend's own event files)."""
    import time

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text.metadata import create_summary_metadata
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(Path(run_dir) / "tensorboard" / "generation"))
    for step, prefix in ((0, "base_eval_"), (last_step, "eval_")):
        values = [
            Summary.Value(tag=f"{group}/{k}", simple_value=float(metrics[prefix + name]))
            for group, k, name in (
                ("generation", "exact_match", "exact_match"),
                ("generation", "token_f1", "token_f1"),
                ("generation", "rouge_l", "rouge_l"),
                ("preference", "accuracy", "preference_accuracy"),
                ("preference", "margin", "preference_margin"),
            )
            if metrics.get(prefix + name) is not None
        ]
        if values:
            writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
    table = Path(run_dir) / "eval" / "samples.md"
    if table.exists():
        text = TensorProto(dtype=7, string_val=[table.read_bytes()], tensor_shape=TensorShapeProto(dim=[]))  # 7: string
        value = Summary.Value(tag="generation/samples", metadata=create_summary_metadata(None, None), tensor=text)
        writer.add_event(Event(wall_time=time.time(), step=last_step, summary=Summary(value=[value])))
    writer.flush()
    writer.close()


def finalize(run_dir, metrics: Dict) -> Dict:
    run_dir = Path(run_dir)
    rows = read_history(run_dir)
    merged = {
        **summarize_history(rows),
        **generation_metrics(run_dir),
        **preference_metrics(run_dir),
        **{k: v for k, v in (metrics or {}).items() if v is not None},
    }
    if rows:
        merged["loss_png"] = plot_loss(run_dir, rows)
        merged["tensorboard"] = write_tensorboard(run_dir, rows)
    if "eval_exact_match" in merged or "eval_preference_accuracy" in merged:
        write_generation_tensorboard(run_dir, merged, int(merged.get("steps") or 0))
    if "eval_exact_match" in merged:
        merged["generation_samples"] = str(run_dir / "eval" / "samples.md")
    if "eval_preference_accuracy" in merged:
        merged["preference_samples"] = str(run_dir / "eval" / "preference_samples.md")
    atomic_write_json(run_dir / METRICS, merged)
    return merged
