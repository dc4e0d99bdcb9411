"""The driver: validated config -> backend plan -> run folder + manifest -> launcher runs the steps -> metrics.

Called by train.py (inside @hydra.main) once per run or sweep job. Heavy libraries are never imported here.
"""
from __future__ import annotations

import datetime as _dt
import sys
import time
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.backends import get_backend
from finetune.config.validate import validate, world_size
from finetune.errors import ConfigError, RunError
from finetune.plan import Plan, Step
from finetune import secrets
from finetune.run_dir import Manifest, atomic_write, atomic_write_json, create_run_dir, default_run_dir
from finetune.secrets import redact
from finetune.launchers import get_launcher
from finetune.launchers.process import free_port


def _hydra_facts():
    """(overrides as typed, group choices, multirun job folder or None, argv) from Hydra, when running under it."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:  # noqa: BLE001 - not under Hydra (tests calling run() directly)
        return [], {}, None, sys.argv[:]
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/") and not k.startswith("schema/")}
    job_dir = hc.runtime.output_dir if hc.mode == RunMode.MULTIRUN else None
    return list(hc.overrides.task), choices, job_dir, [sys.executable, *sys.argv]


def model_build_step(cfg: DictConfig) -> Optional[Step]:
    """Models the project makes itself (tiny random models; real ones converted from a GGUF file) are built on
    first use, into their own folder (a cache shared by runs), atomically."""
    if not cfg.model.builder or (Path(str(cfg.model.path)) / "config.json").exists():
        return None
    gguf = ["--gguf-file", str(cfg.model.gguf_file)] if cfg.model.get("gguf_file") else []
    return Step(name="build_model", argv=[sys.executable, "-m", "finetune.tools.tiny_models", str(cfg.model.builder),
                                          str(cfg.model.path), *gguf])


def check_unused_keys(cfg: DictConfig, backend, overrides: List[str]) -> None:
    """A key a backend would silently ignore is refused when typed: each backend lists them (NOT_USED: key ->
    what to use instead) in finetune/backends/<name>.py. tests/test_keys.py checks every root key against every
    backend: it is used, or listed there."""
    typed = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}
    for key, hint in getattr(backend, "NOT_USED", {}).items():
        if key in typed:
            raise ConfigError(key, typed[key], f"is not used by backend {cfg.backend.name}; {hint}")


def prepare(cfg: DictConfig, overrides: Optional[List[str]] = None):
    """Every check, in order: the config's own rules (finetune/config/validate.py), then the backend's (its check and
    the keys it would ignore), then the launcher's; then the launcher port. Writes nothing."""
    overrides = list(overrides or [])
    backend = get_backend(cfg.backend.name)            # an unknown backend name is refused here, first
    facts = validate(cfg, overrides)
    backend.check(cfg)                                 # backend=auto writes its choice into cfg here
    check_unused_keys(cfg, get_backend(cfg.backend.name), overrides)
    launcher = get_launcher(cfg.launcher.name)
    if hasattr(launcher, "check"):
        launcher.check(cfg)
    with open_dict(cfg):
        if int(cfg.launcher.master_port) == 0 and world_size(cfg) > 1:
            cfg.launcher.master_port = free_port()
    # backend=auto wrote its choice into cfg (cfg.backend is the chosen one); it still plans, to record the choice
    return facts, get_backend("auto" if "auto_choice" in cfg else cfg.backend.name), launcher


def run(cfg: DictConfig) -> Optional[float]:
    overrides, choices, job_dir, command = _hydra_facts()
    facts, backend, launcher = prepare(cfg, overrides)

    run_dir = Path(str(cfg.output_dir)) if cfg.output_dir else Path(job_dir) if job_dir else default_run_dir(cfg.name)
    run_dir = run_dir.expanduser().absolute()
    ctx = {"data": facts["data"], "world_size": world_size(cfg), "run_dir": str(run_dir)}
    plan: Plan = backend.plan(cfg, run_dir, ctx)
    build = model_build_step(cfg)
    if build:
        plan.steps.insert(0, build)
    if hasattr(launcher, "plan_files"):             # files the launcher adds (k8s manifests), shown by the dry run
        plan.files.update(launcher.plan_files(plan, cfg, run_dir))

    from finetune.tracking import describe

    plan.notes += describe(cfg)                     # where report_to=mlflow / wandb will log (the dry run shows it)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    found = secrets.collect(resolved)               # secrets reach the workers through their environment only
    for step in plan.steps:
        step.env.update(secrets.env_for(found))

    if cfg.dry_run:
        print(plan.render(str(run_dir), lambda s: launcher.argv(s, cfg),
                          (lambda s: launcher.env(s, cfg)) if hasattr(launcher, "env") else None))
        print("dry run: nothing was written")
        return None

    if cfg.resume:
        _check_resumable(run_dir, resolved)
    run_dir = create_run_dir(run_dir, resume=bool(cfg.resume))
    ctx["run_dir"] = str(run_dir)
    if cfg.resume:           # config.yaml and overrides.yaml stay the original run's (what reproduce replays)
        manifest = Manifest.load(run_dir)
        manifest.data.setdefault("resumes", []).append(
            {"time": _dt.datetime.now().isoformat(timespec="seconds"), "command": redact(command)})
    else:
        manifest = Manifest.new(run_dir, config=resolved, overrides=overrides, choices=choices,
                                data_facts=facts["data"], seed=int(cfg.seed), command=command)
        atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(redact(resolved))))
        atomic_write(run_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(redact(list(overrides)))))
    atomic_write_json(run_dir / "resolved_config.json", redact({**resolved, "_run_dir": str(run_dir), "_ctx": ctx}))
    for rel, text in plan.files.items():
        atomic_write(run_dir / rel, redact(text))
    manifest.update(status="running", plan=plan.to_dict(), outputs=plan.outputs,
                    **({"auto_choice": ctx["auto_choice"]} if "auto_choice" in ctx else {}))
    print(f"[finetune] backend={cfg.backend.name} run folder: {run_dir}", flush=True)

    timeout_s = float(cfg.timeout_min) * 60 or None
    from finetune.report.metrics import prewarm
    from finetune.tracking.tracker import RunTracker

    prewarm()                  # the plotting/TensorBoard imports load while the steps run, not after them
    # report_to=mlflow / wandb: logged from a background thread while the steps run (never fails the run)
    tracker = RunTracker.start(resolved, run_dir, manifest.data, overrides, choices, resume=bool(cfg.resume))
    try:
        for step in plan.steps:
            print(f"[finetune] step {step.name}: {' '.join(redact(launcher.argv(step, cfg)))}", flush=True)
            result = launcher.run_step(step, cfg, run_dir, timeout_s)
            manifest.add_step(result.record())
            if result.status == "interrupted":
                manifest.update(status="interrupted", error=result.reason())
                raise KeyboardInterrupt
            if not result.ok and not step.optional:
                tail = "\n".join("    " + t for t in result.tail[-15:])
                manifest.update(status="failed", error=result.reason(), log_tail=result.tail[-15:])
                _write_result(run_dir, cfg, "failed", {}, result.reason())
                _end_tracking(tracker, manifest, "failed", {}, result.reason())
                raise RunError(f"{result.reason()} (log: {result.log})\n  last lines:\n{tail}")
        metrics = backend.collect(cfg, run_dir, ctx)
        from finetune.report.metrics import finalize

        metrics = finalize(run_dir, metrics)
    except KeyboardInterrupt:
        if manifest.data.get("status") != "interrupted":
            manifest.update(status="interrupted", error="interrupted by the user")
        _write_result(run_dir, cfg, "interrupted", {}, "interrupted")
        _end_tracking(tracker, manifest, "interrupted", {}, "interrupted by the user")
        raise
    except RunError:
        raise
    except Exception as e:  # noqa: BLE001 - collect/report failures fail the run with their message
        manifest.update(status="failed", error=f"{type(e).__name__}: {e}")
        _write_result(run_dir, cfg, "failed", {}, f"{type(e).__name__}: {e}")
        _end_tracking(tracker, manifest, "failed", {}, f"{type(e).__name__}: {e}")
        raise
    for note in metrics.get("absent") or []:
        print(f"[finetune] note: {note}", flush=True)
    if tracker:
        tracker.wait()                  # the whole history is logged; the run ids go into the manifest
    manifest.update(status="completed", metrics=metrics, finished=_dt.datetime.now().isoformat(timespec="seconds"),
                    **({"tracking": tracker.record()} if tracker else {}))
    _write_result(run_dir, cfg, "completed", metrics, None)
    if tracker:
        tracker.finish("completed", metrics)
    value = metrics.get(str(cfg.metric))
    if value is None and cfg.metric == "eval_loss":
        value = metrics.get("train_loss")
    shown = [k for k, v in metrics.items() if isinstance(v, float) and k.endswith("loss")]
    shown += [k for k in ("base_eval_exact_match", "eval_exact_match") if isinstance(metrics.get(k), float)]
    print(f"[finetune] completed: {run_dir}  " + "  ".join(f"{k}={metrics[k]:.4g}" for k in shown), flush=True)
    return float(value) if isinstance(value, (int, float)) else None


def _end_tracking(tracker, manifest: Manifest, status: str, metrics: dict, error: str) -> None:
    """A run that failed or was interrupted: its MLflow / W&B run ends with that status and the error."""
    if tracker:
        tracker.wait()
        manifest.update(tracking=tracker.record())
        tracker.finish(status, metrics, error)


# keys a resumed run may hold differently from the recorded one (none changes what is trained)
_RESUME_SAME_EXCEPT = ("resume", "dry_run", "timeout_min", "launcher.master_port", "report_to", "tracking")


def _check_resumable(run_dir: Path, resolved: dict) -> None:
    """A resume continues the run with the config it was started with: the recorded overrides were replayed
    (finetune/config/resume.py); if the composed config still differs (changed defaults or code since), refuse."""
    from finetune.report.reproduce import config_differences

    recorded = Manifest.load(run_dir).data.get("config") or {}
    diffs = [d for d in config_differences(recorded, redact(resolved), str(run_dir), str(run_dir))
             if d.split(":")[0].split(".")[0] not in _RESUME_SAME_EXCEPT and d.split(":")[0] not in _RESUME_SAME_EXCEPT]
    if diffs:
        from finetune.errors import ConfigError

        raise ConfigError("resume", True, f"the config composed now differs from the one the run in {run_dir} was "
                          f"started with ({diffs[0]}{f'; and {len(diffs) - 1} more' if len(diffs) > 1 else ''}); "
                          "start a new run instead")


def _write_result(run_dir: Path, cfg: DictConfig, status: str, metrics: dict, error: Optional[str]) -> None:
    """result.json: what a sweep summary reads for this job (Hydra's callbacks do not see job results)."""
    overrides, _, _, _ = _hydra_facts()
    atomic_write_json(run_dir / "result.json", {
        "status": status, "error": error, "metric_name": str(cfg.metric),
        "metric": metrics.get(str(cfg.metric)), "metrics": metrics, "overrides": redact(overrides),
        "backend": cfg.backend.name, "method": cfg.method.name, "time": time.time(),
    })
