"""The driver: validated config -> backend plan -> run folder + manifest -> launcher runs the steps -> metrics.

Called by train.py (inside @hydra.main) once per run or sweep job. Heavy libraries are never imported here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from finetune import secrets
from finetune.backends import get_backend
from finetune.checks import validate
from finetune.config.derived import CHECKPOINTS, world_size
from finetune.config.overrides import split_override
from finetune.config.validate import check_held_out
from finetune.errors import ConfigError, RunError
from finetune.interfaces import PlanContext
from finetune.launchers import get_launcher
from finetune.osutil import free_port
from finetune.plan import Plan, Step
from finetune.recipes.common import PAUSE_FILE, last_complete_checkpoint
from finetune.run_dir import (
    PAUSE_NAME,
    Manifest,
    atomic_write,
    atomic_write_json,
    claim_run_dir,
    default_run_dir,
    running,
)
from finetune.run_files import CONFIG_YAML, OVERRIDES, RESOLVED_CONFIG, RESULT, RUN_DIR_KEY
from finetune.secrets import redact


def _hydra_facts():
    """(overrides as typed, group choices, multirun job folder or None, argv) from Hydra, when running under it."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:  # noqa: BLE001 - not under Hydra (tests calling run() directly)
        return [], {}, None, sys.argv[:]
    choices = {
        k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/") and not k.startswith("schema/")
    }
    job_dir = hc.runtime.output_dir if hc.mode == RunMode.MULTIRUN else None
    return list(hc.overrides.task), choices, job_dir, [sys.executable, *sys.argv]


def claim_slot(cfg: DictConfig) -> None:
    """A job of a parallel local sweep (hydra/launcher=parallel) takes its slot: its share of the GPUs and
    threads (finetune/launchers/slots.py). Every other run is slot 0 of 1."""
    from finetune.launchers import slots

    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:  # noqa: BLE001 - not under Hydra (tests calling run() directly)
        slots.release()
        return
    if hc.mode != RunMode.MULTIRUN:
        slots.release()
        return
    slots.claim(Path(str(hc.sweep.dir)), slots.parallel_jobs(hc.launcher), int(hc.job.num), bool(cfg.dry_run))


def model_build_step(cfg: DictConfig) -> Optional[Step]:
    """Models the project makes itself (tiny random models; real ones converted from a GGUF file) are built on
    first use, into their own folder (a cache shared by runs), atomically."""
    if not cfg.model.builder or (Path(str(cfg.model.path)) / "config.json").exists():
        return None
    gguf = ["--gguf-file", str(cfg.model.gguf_file)] if cfg.model.get("gguf_file") else []
    return Step(
        name="build_model",
        preload=["tokenizers"],
        argv=[sys.executable, "-m", "finetune.tools.tiny_models", str(cfg.model.builder), str(cfg.model.path), *gguf],
    )


def check_unused_keys(cfg: DictConfig, backend, overrides: List[str]) -> None:
    """A key a backend would silently ignore is refused when typed: each backend lists them (NOT_USED: key ->
    what to use instead) in finetune/backends/<name>.py. tests/test_keys.py checks every root key against every
    backend: it is used, or listed there."""
    typed = {k: v for k, v in map(split_override, overrides) if v is not None}
    for key, hint in backend.NOT_USED.items():
        if key in typed:
            raise ConfigError(key, typed[key], f"is not used by backend {cfg.backend.name}; {hint}")


def prepare(cfg: DictConfig, overrides: Optional[List[str]] = None):
    """Every check, in order: the config's own rules (finetune/config/validate.py), then the backend's (its check and
    the keys it would ignore), then the launcher's; then the launcher port. Writes nothing."""
    overrides = list(overrides or [])
    backend = get_backend(cfg.backend.name)  # an unknown backend name is refused here, first
    facts = validate(cfg, overrides)
    backend.check(cfg)  # backend=auto writes its choice into cfg here
    check_unused_keys(cfg, get_backend(cfg.backend.name), overrides)
    from finetune.backends import pref_eval

    pref_eval.check(cfg)  # preference_eval and its metrics, for whichever backend runs
    check_held_out(cfg, facts["data"])
    launcher = get_launcher(cfg.launcher.name)
    launcher.check(cfg)
    with open_dict(cfg):
        if int(cfg.launcher.master_port) == 0 and world_size(cfg) > 1:
            cfg.launcher.master_port = free_port()
    # backend=auto wrote its choice into cfg (cfg.backend is the chosen one); it still plans, to record the choice
    return facts, get_backend("auto" if "auto_choice" in cfg else cfg.backend.name), launcher


def run(cfg: DictConfig) -> Optional[float]:
    """One run: check -> plan -> (dry run: show it) -> write the run folder -> execute the steps -> collect metrics.
    The bookkeeping of how it ended (manifest status, result.json, the tracker) is `recorded`'s."""
    overrides, choices, job_dir, command = _hydra_facts()
    claim_slot(cfg)
    try:
        return _run(cfg, overrides, choices, job_dir, command)
    finally:
        from finetune.launchers import slots

        slots.release()


def _run(cfg: DictConfig, overrides, choices, job_dir, command) -> Optional[float]:
    facts, backend, launcher = prepare(cfg, overrides)
    run_dir = Path(str(cfg.output_dir)) if cfg.output_dir else Path(job_dir) if job_dir else default_run_dir(cfg.name)
    run_dir = run_dir.expanduser().absolute()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    found = secrets.collect(resolved)  # secrets reach the workers through their environment only
    if cfg.resume:
        _check_resumable(run_dir, resolved)
    if cfg.dry_run:
        return _dry_run(cfg, backend, launcher, run_dir, facts, found)
    # the folder is claimed first (atomically, locked for the run's life); the plan and every path derive from it
    folder = claim_run_dir(run_dir, resume=bool(cfg.resume), exact=bool(cfg.output_dir or job_dir))
    run_dir = folder.path
    try:
        try:
            plan, ctx = _planned(cfg, backend, launcher, run_dir, facts, found)
        except BaseException:
            folder.abandon()
            raise
        manifest = write_run_folder(cfg, run_dir, plan, resolved, facts, overrides, choices, command, ctx)
        print(f"[finetune] backend={cfg.backend.name} run folder: {run_dir}", flush=True)
        from finetune.report.metrics import finalize, prewarm
        from finetune.tracking.tracker import RunTracker

        prewarm()  # the plotting/TensorBoard imports load while the steps run, not after them
        # report_to=mlflow / wandb: logged from a background thread while the steps run (never fails the run)
        tracker = RunTracker.start(resolved, run_dir, manifest.data, overrides, choices, resume=bool(cfg.resume))
        with recorded(cfg, run_dir, manifest, tracker):
            execute(plan, launcher, cfg, run_dir, manifest)
            metrics = finalize(run_dir, backend.collect(cfg, run_dir, ctx))
        complete(cfg, run_dir, manifest, tracker, metrics)
        value = metrics.get(str(cfg.metric))
        if value is None and cfg.metric == "eval_loss":
            value = metrics.get("train_loss")
        return float(value) if isinstance(value, (int, float)) else None
    finally:
        folder.release()


def _planned(cfg: DictConfig, backend, launcher, run_dir: Path, facts: dict, found: dict):
    """(plan, planning context) for this run folder; the secrets go to the steps through their environment."""
    ctx = PlanContext(data=facts["data"], world_size=world_size(cfg), run_dir=str(run_dir))
    plan = build_plan(cfg, backend, launcher, run_dir, ctx)
    for step in plan.steps:
        step.env.update(secrets.env_for(found))
    return plan, ctx


def _dry_run(cfg: DictConfig, backend, launcher, run_dir: Path, facts: dict, found: dict) -> None:
    """The plan as the run would execute it (every check of the run applied), written nowhere."""
    plan, _ = _planned(cfg, backend, launcher, run_dir, facts, found)
    print(
        plan.render(
            str(run_dir),
            lambda s: launcher.argv(s, cfg),
            lambda s: launcher.env(s, cfg),
        )
    )
    print("dry run: nothing was written")
    return None


def build_plan(cfg: DictConfig, backend, launcher, run_dir: Path, ctx: dict) -> Plan:
    """The backend's plan, with the model build step when the model is ours to build, the launcher's own files
    (k8s manifests, sbatch scripts) and where tracking will log: everything the dry run shows."""
    plan: Plan = backend.plan(cfg, run_dir, ctx)
    build = model_build_step(cfg)
    if build:
        plan.steps.insert(0, build)
    from finetune import export

    plan.steps += export.run_steps(cfg, run_dir)  # export=gguf|gguf-lora: the last step(s)
    plan.notes += export.run_note(cfg, run_dir)
    if cfg.export:
        plan.outputs[export.FOLDER[str(cfg.export)]] = str(Path(run_dir) / export.FOLDER[str(cfg.export)])
    for step in plan.steps:
        if step.pausable:  # the driver makes this file on the first Ctrl-C (finetune/launchers/process.py)
            step.env = {**step.env, PAUSE_FILE: str(Path(run_dir) / PAUSE_NAME)}  # a copy: plans share env dicts
    share_preloaded_process(plan.steps)
    plan.files.update(launcher.plan_files(plan, cfg, run_dir))
    from finetune.tracking import describe

    plan.notes += describe(cfg)
    return plan


def share_preloaded_process(steps: List[Step]) -> None:
    """Steps forked from a preloaded process share it when their environments agree on what libraries read at
    import (finetune/launchers/zygote.py import_env). A step that sets none of those variables (the model build,
    the evaluation by generation) takes the ones the run's other forked steps set (LLaMA-Factory's and
    FlagEmbedding's HF_HUB_OFFLINE=1, ...), so that a run pays the imports once, not twice."""
    from finetune.launchers.zygote import import_env

    forked = [s for s in steps if s.preload is not None]
    sets = {json.dumps(import_env(s.env), sort_keys=True) for s in forked if import_env(s.env)}
    if len(sets) == 1:
        shared = json.loads(sets.pop())
        for s in forked:
            if not import_env(s.env):
                s.env = {**s.env, **shared}


def write_run_folder(
    cfg: DictConfig,
    run_dir: Path,
    plan: Plan,
    resolved: dict,
    facts: dict,
    overrides: List[str],
    choices: dict,
    command: List[str],
    ctx: dict,
):
    """Write what the steps read into the claimed run folder: the manifest, config.yaml and overrides.yaml (a resume
    keeps the original run's: reproduce replays them), resolved_config.json and the plan's files. Every file is
    redacted. Returns the manifest."""
    if cfg.resume:
        manifest = Manifest.load(run_dir)
        manifest.data.setdefault("resumes", []).append(
            {"time": _dt.datetime.now().isoformat(timespec="seconds"), "command": redact(command)}
        )
    else:
        manifest = Manifest.new(
            run_dir,
            config=resolved,
            overrides=overrides,
            choices=choices,
            data_facts=facts["data"],
            seed=int(cfg.seed),
            command=command,
        )
        atomic_write(run_dir / CONFIG_YAML, OmegaConf.to_yaml(OmegaConf.create(redact(resolved))))
        atomic_write(run_dir / OVERRIDES, OmegaConf.to_yaml(OmegaConf.create(redact(list(overrides)))))
    from finetune.config.keys import schema_keys

    worker_cfg = {**resolved, RUN_DIR_KEY: str(run_dir), "_ctx": ctx.as_json(), "_keys": schema_keys()}
    atomic_write_json(run_dir / RESOLVED_CONFIG, redact(worker_cfg))
    for rel, text in plan.files.items():
        atomic_write(run_dir / rel, redact(text))
    manifest.update(
        status="running",
        plan=plan.to_dict(),
        outputs=plan.outputs,
        **({"auto_choice": ctx.auto_choice} if ctx.auto_choice is not None else {}),
    )
    return manifest


class Paused(Exception):
    """A step saved a complete checkpoint and stopped on request (the first Ctrl-C / SIGTERM)."""

    def __init__(self, run_dir: Path, checkpoint: Optional[Path]):
        super().__init__(f"paused at {checkpoint}")
        self.run_dir, self.checkpoint = run_dir, checkpoint


class Interrupted(KeyboardInterrupt):
    """A step stopped at once by the user (a second Ctrl-C, or a step that cannot pause); the newest complete
    checkpoint, if any, is what resume=true continues from."""

    def __init__(self, run_dir: Path, checkpoint: Optional[Path]):
        super().__init__("interrupted")
        self.run_dir, self.checkpoint = run_dir, checkpoint


class StepFailed(RunError):
    """A required step ended badly (exit code, timeout, killed); carries its result for the manifest."""

    def __init__(self, result):
        tail = "\n".join("    " + t for t in result.tail[-25:])
        super().__init__(f"{result.reason()} (log: {result.log})\n  last lines:\n{tail}")
        self.result = result


def execute(plan: Plan, launcher, cfg: DictConfig, run_dir: Path, manifest: Manifest) -> None:
    """Run the plan's steps in order through the launcher, each recorded in the manifest. An interrupted step
    raises KeyboardInterrupt, a failed required one StepFailed; an optional one that failed is recorded only."""
    timeout_s = float(cfg.timeout_min) * 60 or None
    (run_dir / PAUSE_NAME).unlink(missing_ok=True)  # a request left by the run this one resumes
    for step in plan.steps:
        print(f"[finetune] step {step.name}: {' '.join(redact(launcher.argv(step, cfg)))}", flush=True)
        result = launcher.run_step(step, cfg, run_dir, timeout_s)
        manifest.add_step(result.record())
        if result.status == "paused":
            raise Paused(run_dir, last_complete_checkpoint(run_dir / CHECKPOINTS))
        if result.status == "interrupted":
            manifest.update(status="interrupted", error=result.reason())
            raise Interrupted(run_dir, last_complete_checkpoint(run_dir / CHECKPOINTS))
        if not result.ok and not step.optional:
            raise StepFailed(result)


@contextlib.contextmanager
def recorded(cfg: DictConfig, run_dir: Path, manifest: Manifest, tracker):
    """How a run that did not complete ended, written whatever the cause (like lightning-hydra-template's
    task_wrapper): the manifest's status and error, result.json (what a sweep summary reads) and the MLflow / W&B
    run's end. Interrupted: exit 130; a failed step: its reason and log tail; anything else while collecting the
    metrics: the exception."""
    try:
        yield
    except Paused as e:
        manifest.update(status="paused", error=None, checkpoint=str(e.checkpoint))
        _end(cfg, run_dir, manifest, tracker, "paused", "paused", "paused by the user")
        raise
    except KeyboardInterrupt:
        if manifest.data.get("status") != "interrupted":
            manifest.update(status="interrupted", error="interrupted by the user")
        _end(cfg, run_dir, manifest, tracker, "interrupted", "interrupted", "interrupted by the user")
        raise
    except StepFailed as e:
        reason = e.result.reason()
        manifest.update(status="failed", error=reason, log_tail=e.result.tail[-15:])
        _end(cfg, run_dir, manifest, tracker, "failed", reason, reason)
        raise
    except Exception as e:  # noqa: BLE001 - collect/report failures fail the run with their message
        error = f"{type(e).__name__}: {e}"
        manifest.update(status="failed", error=error)
        _end(cfg, run_dir, manifest, tracker, "failed", error, error)
        raise


def _end(cfg, run_dir: Path, manifest: Manifest, tracker, status: str, result_error: str, tracker_error: str) -> None:
    _write_result(run_dir, cfg, status, {}, result_error)
    _end_tracking(tracker, manifest, status, {}, tracker_error)


def complete(cfg: DictConfig, run_dir: Path, manifest: Manifest, tracker, metrics: dict) -> None:
    """A completed run: notes on metrics the backend could not give, the tracker drained (its run ids go into the
    manifest), status completed, result.json, and the one summary line."""
    for note in metrics.get("absent") or []:
        print(f"[finetune] note: {note}", flush=True)
    if tracker:
        tracker.wait()
    from finetune.report.metrics import reused_work

    reused = reused_work(run_dir)
    data = dict(manifest.data.get("data") or {})
    if metrics.get("data_composition"):  # drawn by the backend (LLaMA-Factory's interleaving): what it trained on
        data.update(composition=metrics["data_composition"], composition_by="the backend (counted after the run)")
    manifest.update(
        data=data,
        status="completed",
        metrics=metrics,
        finished=_dt.datetime.now().isoformat(timespec="seconds"),
        **({"tracking": tracker.record()} if tracker else {}),
        **({"reused": reused} if reused else {}),
    )
    _write_result(run_dir, cfg, "completed", metrics, None)
    if tracker:
        tracker.finish("completed", metrics)
    shown = [k for k, v in metrics.items() if isinstance(v, float) and k.endswith("loss")]
    shown += [
        k
        for k in (
            "base_eval_exact_match",
            "eval_exact_match",
            "base_eval_preference_accuracy",
            "eval_preference_accuracy",
            "base_eval_preference_margin",
            "eval_preference_margin",
        )
        if isinstance(metrics.get(k), float)
    ]
    line = f"[finetune] completed: {run_dir}  " + "  ".join(f"{k}={metrics[k]:.4g}" for k in shown)
    if not isinstance(metrics.get("train_loss"), float):
        line += f"  train_loss: none ({_why_no_loss(cfg, metrics)})"
    if data.get("composition") and (len(data["composition"]) > 1 or "mix" in data):
        from finetune.sources import describe

        line += f"  data: {describe(data['composition'])}"
    print(line, flush=True)


def _why_no_loss(cfg: DictConfig, metrics: dict) -> str:
    """Why a completed run has no training loss to show."""
    if cfg.backend.name == "dummy":
        return "the dummy backend trains nothing"
    steps, every = metrics.get("steps"), cfg.get("logging_steps")
    if isinstance(steps, int) and isinstance(every, int) and 0 < steps < every:
        return f"logging_steps={every} is more than the {steps} steps trained; set logging_steps={steps} or fewer"
    return "the trainer logged none; see logs/train.log"


def _end_tracking(tracker, manifest: Manifest, status: str, metrics: dict, error: str) -> None:
    """A run that failed or was interrupted: its MLflow / W&B run ends with that status and the error."""
    if tracker:
        tracker.wait()
        manifest.update(tracking=tracker.record())
        tracker.finish(status, metrics, error)


# backends whose training continues from <run>/checkpoints (the dummy placeholder simply runs again)
CHECKPOINTING = ("alpacalora", "llamafactory", "flagembedding")
# keys a resumed run may hold differently from the recorded one (none changes what is trained)
_RESUME_SAME_EXCEPT = ("resume", "dry_run", "timeout_min", "launcher.master_port", "report_to", "tracking")


def _check_resumable(run_dir: Path, resolved: dict) -> None:
    """A resume continues the run with the config it was started with: the recorded overrides were replayed
    (finetune/config/resume.py); if the composed config still differs (changed defaults or code since), refuse."""
    from finetune.report.reproduce import config_differences

    holder = running(run_dir)
    if holder:
        raise ConfigError("resume", True, f"the run in {run_dir} is running ({holder}); wait for it to end or stop it")
    name = (Manifest.load(run_dir).data.get("config") or {}).get("backend", {}).get("name")
    if name in CHECKPOINTING and last_complete_checkpoint(run_dir / CHECKPOINTS) is None:
        raise ConfigError(
            "resume",
            True,
            f"{run_dir} holds no complete checkpoint (the run stopped before it saved one: save_steps=0 saves only "
            "when you pause it with Ctrl-C), so there is nothing to continue from; start a new run",
        )
    recorded = Manifest.load(run_dir).data.get("config") or {}
    diffs = [
        d
        for d in config_differences(recorded, redact(resolved), str(run_dir), str(run_dir))
        if d.split(":")[0].split(".")[0] not in _RESUME_SAME_EXCEPT and d.split(":")[0] not in _RESUME_SAME_EXCEPT
    ]
    if diffs:
        raise ConfigError(
            "resume",
            True,
            f"the config composed now differs from the one the run in {run_dir} was "
            f"started with ({diffs[0]}{f'; and {len(diffs) - 1} more' if len(diffs) > 1 else ''}); "
            "start a new run instead",
        )


def _write_result(run_dir: Path, cfg: DictConfig, status: str, metrics: dict, error: Optional[str]) -> None:
    """result.json: what a sweep summary reads for this job (Hydra's callbacks do not see job results)."""
    overrides, _, _, _ = _hydra_facts()
    atomic_write_json(
        run_dir / RESULT,
        {
            "status": status,
            "error": error,
            "metric_name": str(cfg.metric),
            "metric": metrics.get(str(cfg.metric)),
            "metrics": metrics,
            "overrides": redact(overrides),
            "backend": cfg.backend.name,
            "method": cfg.method.name,
            "time": time.time(),
        },
    )
