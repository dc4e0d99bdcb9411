"""Sweep summaries: one table and a few plots for a multirun folder.

    finetune summarize outputs/multiruns/<date>/<time>      # rebuild by hand (also written at the end of a sweep)

Reads what each job left behind (Hydra's callbacks get no job results):
  <job>/result.json     status, error line, overrides, metric (finetune/run.py _write_result)
  <job>/manifest.json   resolved config and group choices (to show resolved values, e.g. lora_alpha=${eval:...})
  <job>/history.jsonl   the loss curve
  sweep_jobs.json       the planned jobs (written by finetune.callbacks.SummarySweeper): jobs never started
                        are listed as "not run"

Writes into the folder: summary.csv, summary.md, summary.json, loss_curves.png (every job on one plot; a
``backend=a,b,c`` sweep compares backends side by side), metric_vs_<param>.png (the final metric against each
swept parameter, one line per combination of the other swept parameters). Prints the table with rich.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from finetune.config.overrides import split_override
from finetune.errors import ConfigError
from finetune.history import loss_series, read_history
from finetune.run_dir import atomic_write, atomic_write_json
from finetune.run_files import MANIFEST, RESULT

METRIC_COLUMNS = (
    "train_loss",
    "eval_loss",
    "first_train_loss",
    "base_eval_exact_match",
    "eval_exact_match",
    "eval_token_f1",
    "eval_rouge_l",
    "base_eval_preference_accuracy",
    "eval_preference_accuracy",
    "eval_preference_margin",
    "trainable_params",
    "tokens_per_s",
    "train_runtime_s",
    "peak_rss_mb",
)
HPARAM_KEYS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "learning_rate",
    "num_epochs",
    "max_steps",
    "batch_size",
    "micro_batch_size",
    "cutoff_len",
    "warmup_ratio",
    "weight_decay",
)
GROUPS = ("backend", "model", "method", "hardware", "data", "launcher", "experiment", "sweep", "hparams_search")


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _split_override(text: str):
    key, value = split_override(text)
    return (key, value) if value is not None else (None, None)


def _select(cfg: Any, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _first_line(text: Any) -> str:
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _job_sort_key(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def load_jobs(folder) -> List[Dict]:
    """One record per job: name, dir, status, error, overrides, params (filled later), metrics, history."""
    folder = Path(folder)
    planned = _read_json(folder / "sweep_jobs.json") or {}
    dirs = {}
    if (folder / RESULT).exists() or (folder / MANIFEST).exists():
        dirs[folder.name] = folder  # a single run folder
    else:
        for d in folder.iterdir():
            if d.is_dir() and ((d / RESULT).exists() or (d / MANIFEST).exists() or d.name.isdigit()):
                dirs[d.name] = d
    names = set(dirs) | {str(k) for k in planned.get("jobs", {})}
    jobs = []
    for name in sorted(names, key=_job_sort_key):
        d = dirs.get(name)
        result = _read_json(d / RESULT) if d else None
        manifest = _read_json(d / MANIFEST) if d else None
        job = {
            "job": name,
            "dir": str(d) if d else None,
            "config": (manifest or {}).get("config") or {},
            "choices": (manifest or {}).get("choices") or {},
            "metrics": {},
            "history": [],
        }
        if result:
            job.update(
                status=result.get("status", "unknown"),
                error=_first_line(result.get("error")),
                overrides=list(result.get("overrides") or []),
                metrics=result.get("metrics") or {},
                metric_name=result.get("metric_name"),
                metric=result.get("metric"),
                backend=result.get("backend"),
                method=result.get("method"),
            )
        elif manifest:
            status = manifest.get("status", "unknown")
            job.update(
                status="died" if status == "running" else status,
                error=_first_line(manifest.get("error")),
                overrides=list(manifest.get("overrides") or []),
            )
            if status == "running":
                job["error"] = "no result.json: the job was killed or is still running"
        elif d is not None:
            job.update(
                status="no result",
                error="no result.json or manifest.json in the job folder",
                overrides=list(planned.get("jobs", {}).get(name, [])),
            )
        else:
            job.update(
                status="not run",
                error="never started (an earlier job failed with fail_fast=true or the sweep was interrupted)",
                overrides=list(planned["jobs"][name]),
            )
        job.setdefault("metric_name", None)
        job.setdefault("metric", None)
        if d is not None:
            job["history"] = read_history(d)
        jobs.append(job)
    return jobs


def _value(job: Dict, key: str, raw: str):
    """The value a job used for an override key: a group's chosen option, else the resolved config value."""
    if key in GROUPS or key in job["choices"]:
        return job["choices"].get(key, raw)
    resolved = _select(job["config"], key)
    if resolved is not None and not isinstance(resolved, (dict, list)):
        return resolved
    return _parse_scalar(raw)


def _parse_scalar(raw: str):
    import re

    raw = re.sub(r"\\(.)", r"\1", str(raw))  # Hydra escapes : = , ( ) ... in a multirun job's overrides
    for cast in (int, float):
        try:
            return cast(raw)
        except (TypeError, ValueError):
            pass
    return raw


def swept_params(jobs: List[Dict], derived: Optional[List[str]] = None) -> List[str]:
    """Override keys whose (resolved) value differs between jobs, then hyperparameters that differ without being
    typed (listed in ``derived``: a paired lora_alpha, a backend's own defaults); all override keys if none differ."""
    keys: List[str] = []
    for job in jobs:
        vals = {}
        for ov in job.get("overrides") or []:
            k, v = _split_override(ov)
            if k is None or k.startswith("hydra.") or k == "output_dir":
                continue
            if k not in keys:
                keys.append(k)
            vals[k] = _value(job, k, v)
        job["params"] = vals
    # top-level values that differ although nobody typed them: paired interpolations (lora_alpha from a sweep
    # file's ${eval:2*lora_r}), values an experiment or backend file sets
    for k in HPARAM_KEYS:
        if k in keys:
            continue
        if len({json.dumps(j["config"].get(k), default=str) for j in jobs if j["config"]}) > 1:
            keys.append(k)
            if derived is not None:
                derived.append(k)
            for j in jobs:
                j["params"][k] = j["config"].get(k)
    varying = [k for k in keys if len({json.dumps(j["params"].get(k), default=str) for j in jobs}) > 1]
    return varying or keys


def other_differences(jobs: List[Dict], params: List[str]) -> Dict[str, List[str]]:
    """Other top-level config values that differ between jobs (e.g. backends' own defaults in a backend sweep)."""
    out = {}
    with_cfg = [j for j in jobs if j["config"]]
    for k in sorted({k for j in with_cfg for k in j["config"]}):
        if k in params or k.startswith("_") or k in ("output_dir", "name", "target_path", "merge_path"):
            continue
        vals = [json.dumps(j["config"].get(k), default=str) for j in with_cfg]
        if len(set(vals)) > 1 and not isinstance(with_cfg[0]["config"].get(k), dict):
            out[k] = [f"{j['job']}: {v}" for j, v in zip(with_cfg, vals)]
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v)


def _direction(folder: Path, metric_name: str) -> str:
    """The sweeper's direction (Optuna's hydra.sweeper.direction), else the metric's own: a score (eval_exact_match,
    ...) is maximised, a loss minimised (finetune/config/resolvers.py metric_direction)."""
    from finetune.config.resolvers import metric_direction, register

    try:
        from omegaconf import OmegaConf

        register()
        cfg = OmegaConf.load(folder / "multirun.yaml")
        d = OmegaConf.select(cfg, "hydra.sweeper.direction", default=None)
    except Exception:  # noqa: BLE001 - no multirun.yaml (a folder put together by hand)
        d = None
    if d is None:
        return metric_direction(metric_name)
    d = d[0] if isinstance(d, (list, tuple)) or OmegaConf.is_list(d) else d
    return "maximize" if str(d).lower().startswith("max") else "minimize"


def build_table(jobs: List[Dict], params: List[str]):
    metric_name = next((j["metric_name"] for j in jobs if j.get("metric_name")), "eval_loss")
    extra = [c for c in (metric_name, *METRIC_COLUMNS) if any(c in j["metrics"] for j in jobs)]
    header = ["job", "status", *params, "objective", *dict.fromkeys(extra), "error"]
    rows = []
    for j in jobs:
        metric = j.get("metric")
        if metric is None and metric_name == "eval_loss" and j["status"] == "completed":
            metric = j["metrics"].get("train_loss")  # what train.py returns when a run has no eval set
        j["metric_value"] = metric
        row = {
            "job": j["job"],
            "status": j["status"],
            **{p: j.get("params", {}).get(p) for p in params},
            "objective": metric,
        }
        for c in dict.fromkeys(extra):
            row[c] = j["metrics"].get(c)
        row["error"] = j.get("error") or ""
        rows.append(row)
    return header, rows, metric_name


def _label(job: Dict, params: List[str]) -> str:
    parts = [f"{p}={_fmt(job.get('params', {}).get(p))}" for p in params]
    return f"{job['job']}: " + (" ".join(parts) if parts else (job.get("backend") or ""))


def _save_fig(fig, path: Path) -> str:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return str(path)


def plot_loss_curves(folder: Path, jobs: List[Dict], params: List[str]) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_curves = [j for j in jobs if loss_series(j["history"], "loss")[0] or loss_series(j["history"], "eval_loss")[0]]
    if not with_curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    cmap = plt.get_cmap("tab10" if len(with_curves) <= 10 else "tab20")
    for i, j in enumerate(with_curves):
        color = cmap(i % cmap.N)
        label = _label(j, params) + ("" if j["status"] == "completed" else f" [{j['status']}]")
        x, y = loss_series(j["history"], "loss")
        if x:
            ax.plot(x, y, "-", color=color, label=label)
        x, y = loss_series(j["history"], "eval_loss")
        if x:
            ax.plot(
                x, y, "o--", color=color, label=None if loss_series(j["history"], "loss")[0] else label, markersize=3
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (solid: train, dashed: eval)")
    ax.set_title(f"{folder.name}: {len(with_curves)} jobs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = _save_fig(fig, folder / "loss_curves.png")
    plt.close(fig)
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_metric_vs_params(folder: Path, jobs: List[Dict], params: List[str], metric_name: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [j for j in jobs if _is_number(j.get("metric_value"))]
    outs = []
    if not done:
        return outs
    for p in params:
        xs = [j["params"].get(p) for j in done]
        numeric = all(_is_number(x) for x in xs)
        order = sorted({json.dumps(x, default=str) for x in xs}) if not numeric else None
        others = [q for q in params if q != p]
        groups: Dict[str, List[Dict]] = {}
        for j in done:
            key = " ".join(f"{q}={_fmt(j['params'].get(q))}" for q in others)
            groups.setdefault(key, []).append(j)
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for key, members in groups.items():
            pts = []
            for j in members:
                x = j["params"].get(p)
                pts.append((x if numeric else order.index(json.dumps(x, default=str)), j["metric_value"]))
            pts.sort()
            ax.plot([a for a, _ in pts], [b for _, b in pts], "o-", label=key or None)
        if numeric:
            pos = [x for x in xs if x > 0]
            if len(pos) == len(xs) and max(pos) / min(pos) >= 20:
                ax.set_xscale("log")
        else:
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels(
                [json.loads(o) if isinstance(json.loads(o), str) else o for o in order], rotation=20, fontsize=8
            )
        ax.set_xlabel(p)
        ax.set_ylabel(f"objective ({metric_name})")
        ax.set_title(f"final {metric_name} vs {p}")
        ax.grid(alpha=0.3)
        if any(groups):
            ax.legend(fontsize=7)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in p)
        outs.append(_save_fig(fig, folder / f"metric_vs_{safe}.png"))
        plt.close(fig)
    return outs


def _markdown(header: List[str], rows: List[Dict]) -> str:
    def cell(v):
        return _fmt(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(r.get(h)) for h in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _csv(header: List[str], rows: List[Dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({h: ("" if r.get(h) is None else r.get(h)) for h in header})
    return buf.getvalue()


def _echo(header, rows, best, metric_name, folder: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {folder}", show_lines=False)
    for h in header:
        table.add_column(h, overflow="fold", max_width=60 if h == "error" else None)
    for r in rows:
        style = (
            "bold green" if best is not None and r["job"] == best else ("red" if r["status"] != "completed" else None)
        )
        table.add_row(*[_fmt(r.get(h)) for h in header], style=style)
    console = Console(width=200)
    console.print(table)


def summarize(folder, echo: bool = True) -> Dict:
    """Build the summary of a multirun folder (or of one run folder). Returns what it wrote and found."""
    folder = Path(folder).expanduser().absolute()
    if not folder.is_dir():
        raise ConfigError("folder", str(folder), "an existing multirun folder (outputs/multiruns/<date>/<time>)")
    jobs = load_jobs(folder)
    if not jobs:
        raise ConfigError("folder", str(folder), "a multirun folder holding job folders with result.json")
    derived: List[str] = []
    params = swept_params(jobs, derived)
    header, rows, metric_name = build_table(jobs, params)
    direction = _direction(folder, metric_name)
    scored = [r for r in rows if r["status"] == "completed" and _is_number(r.get("objective"))]
    best = None
    if scored:
        pick = min if direction == "minimize" else max
        best = pick(scored, key=lambda r: r["objective"])["job"]
    failed = [r for r in rows if r["status"] != "completed"]

    atomic_write(folder / "summary.csv", _csv(header, rows))
    md = [
        f"# Sweep summary: {folder.name}",
        "",
        f"{len(rows)} jobs, {len(rows) - len(failed)} completed, {len(failed)} not completed. "
        f"Objective: `{metric_name}` ({direction}; the value train.py returned to the sweeper, train_loss for a "
        "run without an eval set)" + (f"; best: job {best}." if best is not None else "."),
        "",
        _markdown(header, rows),
    ]
    others = other_differences(jobs, params)
    if others:
        md += ["Other settings that differ between jobs (not swept; e.g. each backend's own defaults):", ""]
        md += [f"- `{k}`: " + ", ".join(v) for k, v in others.items()]
    pngs = []
    for old in folder.glob("metric_vs_*.png"):  # from an earlier summary with other parameters
        old.unlink()
    try:
        curves = plot_loss_curves(folder, jobs, params)
        if curves:
            pngs.append(curves)
            md += ["", "![loss curves](loss_curves.png)"]
        typed = [p for p in params if p not in derived] or params
        for p in plot_metric_vs_params(folder, jobs, typed, metric_name):
            pngs.append(p)
            md += ["", f"![{Path(p).stem}]({Path(p).name})"]
    except ImportError as e:  # matplotlib missing: tables still written
        md += ["", f"(plots not written: {e})"]
    atomic_write(folder / "summary.md", "\n".join(md) + "\n")
    out = {
        "folder": str(folder),
        "metric": metric_name,
        "direction": direction,
        "best_job": best,
        "params": params,
        "other_differences": others,
        "n_jobs": len(rows),
        "n_failed": len(failed),
        "rows": rows,
        "files": [str(folder / "summary.csv"), str(folder / "summary.md"), *pngs],
    }
    atomic_write_json(folder / "summary.json", out)
    if echo:
        _echo(header, rows, best, metric_name, folder)
        for r in failed:
            print(f"job {r['job']} {r['status']}: {r['error']}")
        print(
            f"summary: {folder / 'summary.md'} ({len(rows)} jobs, {len(failed)} not completed"
            + (f", best {metric_name}: job {best}" if best is not None else "")
            + ")"
        )
    return out
