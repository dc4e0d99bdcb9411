"""Reproduce a run: replay its recorded overrides into a new folder and compare the loss curves and metrics.

    finetune reproduce outputs/runs/<date>/<time>-<name>            # a run, or one job of a sweep
    finetune reproduce <run> --allow-different                       # run even though code/versions differ

1. Reads <run>/manifest.json (git commit + dirty flag, package versions, overrides, resolved config) and
   <run>/overrides.yaml (the overrides as typed). Replaying the overrides (not .hydra/config.yaml) keeps schema
   validation and the group choices.
2. Compares the recorded environment with now and warns about every difference: git commit, dirty working tree
   (then or now: uncommitted code may differ), Python and package versions. A different commit or package
   versions stop it (exit 2) unless --allow-different.
3. Composes the replayed config (``train.py ... --cfg job --resolve``, fast) and compares it with the recorded
   resolved config (the old run folder's path mapped to the new one); a difference (changed defaults, another
   FINETUNE_MODELS, ...) is listed, and stops it unless --allow-different.
4. Runs ``train.py <overrides> output_dir=<new folder> hydra.mode=RUN`` (a sweep job is replayed as one run; a
   backend=auto run with the choice it recorded, not backend=auto, so that nothing is decided again).
5. Compares: the train/eval loss curves step by step (max |difference|) and every numeric metric; writes
   <new>/reproduce.json and <new>/reproduce_loss.png (both curves on one plot); prints the table.

Exit code: 0 when the loss curves match (within ``tolerance``, relative; on CPU with the same versions they are
identical), 1 when the new run failed or the curves differ, 2 when refused.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from finetune.config.resume import load_record, replay_overrides
from finetune.errors import ConfigError
from finetune.history import loss_series, read_history
from finetune.run_files import HISTORY, MANIFEST, METRICS, OVERRIDES

REPO = Path(__file__).resolve().parents[2]
TIMING_KEYS = (
    "train_runtime_s",
    "train_compute_s",
    "tokens_per_s",
    "peak_rss_mb",
    "samples_per_s",
    "steps_per_s",
    "wall_s",
)


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"WARNING: {msg}\n")
    sys.stderr.flush()


def environment_differences(manifest: dict) -> Tuple[List[str], List[str]]:
    """(blocking differences: commit, packages, python; warnings only: dirty trees)."""
    import platform as _pf

    from finetune.run_dir import git_info, package_versions

    blocking, warnings = [], []
    then, now = manifest.get("git") or {}, git_info()
    if then.get("commit") and now.get("commit") and then["commit"] != now["commit"]:
        blocking.append(f"git commit: recorded {then['commit'][:12]}, now {now['commit'][:12]}")
    if then.get("dirty"):
        warnings.append("the recorded run had uncommitted changes (dirty working tree): its exact code is unknown")
    if now.get("dirty"):
        warnings.append("the working tree has uncommitted changes now: the code may differ from the recorded run")
    rec_pk, now_pk = manifest.get("packages") or {}, package_versions()
    for name in sorted(set(rec_pk) | set(now_pk)):
        if name in rec_pk and rec_pk.get(name) != now_pk.get(name):
            blocking.append(f"package {name}: recorded {rec_pk.get(name)}, now {now_pk.get(name)}")
    py_now = sys.version.split()[0]
    if manifest.get("python") and manifest["python"] != py_now:
        blocking.append(f"python: recorded {manifest['python']}, now {py_now}")
    if manifest.get("platform") and manifest["platform"] != _pf.platform():
        warnings.append(f"platform: recorded {manifest['platform']}, now {_pf.platform()}")
    return blocking, warnings


def _flatten(obj: Any, prefix: str = "") -> Dict[str, Any]:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if str(k).startswith("_"):
                continue
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


def _map_paths(obj: Any, old: str, new: str) -> Any:
    if isinstance(obj, dict):
        return {k: _map_paths(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_paths(v, old, new) for v in obj]
    if isinstance(obj, str) and old in obj:
        return obj.replace(old, new)
    return obj


def _auto(v) -> bool:
    """A value that validation fills in from the machine (hardware.cpus=0, hardware=auto, ...)."""
    if isinstance(v, bool):
        return False
    return v is None or v in ("auto", "", "???") or (isinstance(v, (int, float)) and v == 0)


def config_differences(
    recorded: dict, composed: dict, old_dir: str, new_dir: str, before_run: bool = False
) -> List[str]:
    """Differences between the recorded resolved config and another one. ``before_run``: ``composed`` comes from
    ``--cfg job`` (before validation), so values that validation fills in (0/auto: hardware.cpus, ...) are not
    compared then; the new run's own manifest is compared strictly afterwards."""
    rec = _flatten(_map_paths(recorded, old_dir, new_dir))
    now = _flatten(composed)
    diffs = []
    for key in sorted(set(rec) | set(now)):
        if (
            key in ("output_dir", "report_to")
            or key.startswith(("auto_choice.", "tracking."))
            or rec.get(key) == "<redacted>"
        ):  # where a run is logged does not change what it trains
            continue
        a, b = rec.get(key, "<absent>"), now.get(key, "<absent>")
        if before_run and _auto(b):
            continue
        if a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
            diffs.append(f"{key}: recorded {a!r}, now {b!r}")
    return diffs


def find_run(ref: str, tracking_uri: Optional[str] = None) -> Path:
    """A run folder, or the MLflow run id of a run logged with report_to=mlflow: its folder is the run's
    finetune.run_dir tag. When that folder is not on this machine, the run's artifacts (manifest, overrides,
    history, metrics: everything reproduce reads) are downloaded into outputs/cache/mlflow-runs/<id>."""
    import re

    path = Path(ref).expanduser()
    if path.exists() or not re.fullmatch(r"[0-9a-f]{32}", ref):
        return path
    from finetune.tracking import mlflow_uri
    from finetune.tracking.tracker import mlflow_client

    uri = mlflow_uri(tracking_uri)
    try:
        run = mlflow_client(uri).get_run(ref)
    except Exception as e:  # noqa: BLE001 - unknown id, unreachable server: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        why = f"neither a run folder nor an MLflow run id found at {uri} ({first[:200]})"
        raise ConfigError("run", ref, why) from None
    folder = run.data.tags.get("finetune.run_dir")
    if not folder:
        raise ConfigError("run", ref, f"MLflow run {ref} was not logged by finetune (no finetune.run_dir tag)")
    if (Path(folder) / MANIFEST).is_file():
        _say(f"reproduce: MLflow run {ref} is the run folder {folder}")
        return Path(folder)
    from finetune.config.paths import OUTPUTS_ROOT

    local = OUTPUTS_ROOT / "cache" / "mlflow-runs" / ref
    if not (local / MANIFEST).is_file():
        from mlflow.artifacts import download_artifacts

        local.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST, OVERRIDES, HISTORY, METRICS):
            try:
                download_artifacts(run_id=ref, artifact_path=name, dst_path=str(local), tracking_uri=uri)
            except Exception:  # noqa: BLE001 - history/metrics may be missing for a failed run
                if name == MANIFEST:
                    raise ConfigError(
                        "run",
                        ref,
                        f"its folder {folder} is not on this machine and the run has no manifest.json artifact",
                    ) from None
    _say(f"reproduce: MLflow run {ref}: its folder {folder} is not here; using its artifacts in {local}")
    return local


def compose(overrides: List[str], env: dict, cwd: str) -> dict:
    """The config the replay will run, from train.py itself (validation included), without running it."""
    from omegaconf import OmegaConf

    argv = [sys.executable, str(REPO / "train.py"), *overrides, "--cfg", "job", "--resolve"]
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise ConfigError(
            "overrides",
            " ".join(overrides),
            "replayable now; train.py refused them: " + (proc.stderr.strip().splitlines() or ["?"])[-1],
        )
    # `--cfg job` prints paths as typed; the recorded config holds them made absolute against the folder the run was
    # started from (validation does it): make them absolute against the same folder, which the replay runs in
    from finetune.config.paths import resolve_user_paths

    cfg = OmegaConf.create(proc.stdout)
    resolve_user_paths(cfg, Path(cwd))
    return OmegaConf.to_container(cfg, resolve=False)


def compare_curves(old_rows, new_rows, key: str) -> Dict[str, Any]:
    xo, yo = loss_series(old_rows, key)
    xn, yn = loss_series(new_rows, key)
    old, new = dict(zip(xo, yo)), dict(zip(xn, yn))
    common = sorted(set(old) & set(new))
    diffs = [abs(float(new[s]) - float(old[s])) for s in common]
    rel = [d / max(1.0, abs(float(old[s]))) for d, s in zip(diffs, common)]
    return {
        "key": key,
        "steps_recorded": len(xo),
        "steps_new": len(xn),
        "steps_compared": len(common),
        "max_abs_diff": max(diffs) if diffs else None,
        "max_rel_diff": max(rel) if rel else None,
        "identical": bool(common) and len(xo) == len(xn) and all(d == 0 for d in diffs),
        "same_steps": set(old) == set(new),
    }


def compare_metrics(old: dict, new: dict) -> List[Dict[str, Any]]:
    rows = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if not (isinstance(a, (int, float)) or isinstance(b, (int, float))) or isinstance(a, bool):
            continue
        diff = (b - a) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        rows.append({"metric": k, "recorded": a, "new": b, "diff": diff, "timing": k in TIMING_KEYS})
    return rows


def plot_both(path: Path, old_rows, new_rows, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for rows, name, style in ((old_rows, "recorded", "-"), (new_rows, "reproduced", "--")):
        for key, marker in (("loss", ""), ("eval_loss", "o")):
            x, y = loss_series(rows, key)
            if x:
                ax.plot(x, y, style + marker, label=f"{name} {key}", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return str(path)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def reproduce(
    run_dir, allow_different: bool = False, *, out_dir=None, tolerance: float = 1e-6, env: Optional[dict] = None
) -> int:
    """Replay ``run_dir`` into a new folder and compare. Returns the exit code (see the module docstring)."""
    from finetune.run_dir import atomic_write_json, default_run_dir

    run_dir = Path(run_dir).expanduser().absolute()
    manifest, overrides = load_record(run_dir)
    if manifest.get("status") != "completed":
        _warn(f"the recorded run's status is {manifest.get('status')!r}: only what it logged can be compared")
    name = (manifest.get("config") or {}).get("name") or "run"
    new_dir = Path(out_dir).expanduser().absolute() if out_dir else default_run_dir(f"reproduce-{name}")
    auto_choice = manifest.get("auto_choice") or (manifest.get("config") or {}).get("auto_choice")
    replay = replay_overrides(overrides, auto_choice) + [f"output_dir={new_dir}", "hydra.mode=RUN"]
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # the overrides are replayed as typed: from the folder they were typed in (relative paths), if it still exists
    cwd = manifest.get("cwd") if manifest.get("cwd") and Path(manifest["cwd"]).is_dir() else str(REPO)

    blocking, warnings, cfg_diffs = _before_replay(run_dir, manifest, overrides, auto_choice, replay, env, cwd, new_dir)
    if (blocking or cfg_diffs) and not allow_different:
        what = "code or package versions differ" if blocking else "the composed config differs"
        sys.stderr.write(
            f"error: reproduce: {what} from the recorded run ({len(blocking)} environment, "
            f"{len(cfg_diffs)} config differences above); pass --allow-different to run anyway\n"
        )
        return 2

    _say(f"  new folder: {new_dir}")
    argv = [sys.executable, str(REPO / "train.py"), *replay]
    _say(f"  running: {' '.join(argv)}")
    proc = subprocess.run(argv, cwd=cwd, env=env)
    if proc.returncode != 0:
        sys.stderr.write(f"reproduce: the replayed run failed (exit {proc.returncode}); see {new_dir}/logs\n")
        return 1

    report = _compare(run_dir, new_dir, manifest, tolerance)
    report.update(overrides=overrides, replayed=replay, environment_differences=blocking, warnings=warnings)
    atomic_write_json(new_dir / "reproduce.json", report)
    return _print_report(report, run_dir, new_dir, tolerance)


def _before_replay(run_dir: Path, manifest: dict, overrides, auto_choice, replay, env, cwd, new_dir: Path):
    """What could make the replay differ, said before it runs: package and code versions (blocking) or platform
    (warnings), and the config composed now against the recorded one. Returns (blocking, warnings, config diffs)."""
    git = manifest.get("git") or {}
    _say(f"reproduce: {run_dir}")
    _say(
        f"  recorded: commit {git.get('commit')} dirty={git.get('dirty')}, python {manifest.get('python')}, "
        f"created {manifest.get('created')}"
    )
    _say(f"  overrides: {' '.join(overrides) or '(none)'}")
    if auto_choice and auto_choice.get("overrides"):
        _say(f"  backend=auto chose: {' '.join(auto_choice['overrides'])} (replayed as typed, not decided again)")
    blocking, warnings = environment_differences(manifest)
    for w in warnings:
        _warn(w)
    for b in blocking:
        _warn(f"differs from the recorded run: {b}")
    composed = compose(replay, env, cwd)
    recorded_dir = str(manifest.get("run_dir") or run_dir)
    cfg_diffs = config_differences(manifest.get("config") or {}, composed, recorded_dir, str(new_dir), before_run=True)
    for d in cfg_diffs[:20]:
        _warn(f"config differs: {d}")
    if len(cfg_diffs) > 20:
        _warn(f"... and {len(cfg_diffs) - 20} more config differences")
    return blocking, warnings, cfg_diffs


def _compare(run_dir: Path, new_dir: Path, manifest: dict, tolerance: float) -> dict:
    """The replayed run against the recorded one: resolved configs, loss and eval-loss curves step by step,
    final metrics, and both curves on one plot."""
    recorded_dir = str(manifest.get("run_dir") or run_dir)
    new_cfg = json.loads((new_dir / MANIFEST).read_text()).get("config") or {}
    cfg_diffs = config_differences(manifest.get("config") or {}, new_cfg, recorded_dir, str(new_dir))
    for d in cfg_diffs:
        _warn(f"the replayed run's resolved config differs: {d}")
    old_rows, new_rows = read_history(run_dir), read_history(new_dir)
    curves = [compare_curves(old_rows, new_rows, k) for k in ("loss", "eval_loss")]
    curves = [c for c in curves if c["steps_recorded"] or c["steps_new"]]
    old_m = (
        json.loads((run_dir / METRICS).read_text())
        if (run_dir / METRICS).is_file()
        else (manifest.get("metrics") or {})
    )
    new_m = json.loads((new_dir / METRICS).read_text()) if (new_dir / METRICS).is_file() else {}
    matched = bool(curves) and all(
        c["same_steps"] and c["max_rel_diff"] is not None and c["max_rel_diff"] <= tolerance for c in curves
    )
    png = plot_both(new_dir / "reproduce_loss.png", old_rows, new_rows, f"{run_dir.name} vs reproduction")
    return {
        "recorded": str(run_dir),
        "reproduced": str(new_dir),
        "config_differences": cfg_diffs,
        "curves": curves,
        "metrics": compare_metrics(old_m, new_m),
        "tolerance": tolerance,
        "matched": matched,
        "identical": bool(curves) and all(c["identical"] for c in curves),
        "plot": png,
    }


def _print_report(report: dict, run_dir: Path, new_dir: Path, tolerance: float) -> int:
    """The comparison as two tables and a verdict line. Returns 0 when the curves match, else 1."""
    curves = report["curves"]
    _say("")
    _say(f"{'curve':<12} {'steps (rec/new)':>16} {'max |diff|':>12} {'identical':>9}")
    for c in curves:
        _say(
            f"{c['key']:<12} {str(c['steps_recorded']) + '/' + str(c['steps_new']):>16} "
            f"{_fmt(c['max_abs_diff']):>12} {str(c['identical']):>9}"
        )
    _say("")
    _say(f"{'metric':<24} {'recorded':>14} {'reproduced':>14} {'difference':>14}")
    for m in report["metrics"]:
        note = "  (timing: varies run to run)" if m["timing"] else ""
        _say(f"{m['metric']:<24} {_fmt(m['recorded']):>14} {_fmt(m['new']):>14} {_fmt(m['diff']):>14}{note}")
    _say("")
    if report["identical"]:
        _say(f"reproduced: loss curves identical ({new_dir})")
    elif report["matched"]:
        _say(f"reproduced: loss curves match within {tolerance:g} (relative) ({new_dir})")
    else:
        worst = max((c["max_abs_diff"] or 0.0) for c in curves) if curves else math.nan
        sys.stderr.write(
            f"reproduce: loss curves differ (max |diff| {worst:.6g}, steps "
            + ", ".join(f"{c['key']} {c['steps_recorded']}/{c['steps_new']}" for c in curves)
            + f"); report: {new_dir / 'reproduce.json'}\n"
        )
        return 1
    return 0
