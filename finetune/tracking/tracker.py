"""The driver's tracking of one run (RunTracker) and of a sweep (start_sweep / finish_sweep / failed_job).

    tracker = RunTracker.start(cfg, run_dir, manifest, overrides, choices)   # after the run folder exists
    ... the plan's steps run; a background thread logs history.jsonl rows as they appear ...
    tracker.finish("completed", metrics)                                     # final metrics, artifacts, status

mlflow and wandb are imported in the background thread (about 2 s each), while the worker trains. Every call to
them is guarded: the first failure prints one warning line and turns that target off for the run; nothing here
raises into the driver. What each run logged (run ids, experiment, offline folder) is written to
<run>/tracking.json (a resumed run continues the same MLflow run from it) and added to the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from finetune import tracking as T
from finetune.config.overrides import override_key, typed_keys
from finetune.run_files import CONFIG_YAML, HISTORY, MANIFEST, METRICS, OVERRIDES, RESULT

RUN_FILES = (
    MANIFEST,
    CONFIG_YAML,
    OVERRIDES,
    METRICS,
    RESULT,
    "loss.png",
    HISTORY,
    "tracking.json",
)
SWEEP_FILES = (
    "summary.csv",
    "summary.md",
    "summary.json",
    "sweep_jobs.json",
    "multirun.yaml",
    "optimization_results.yaml",
)
NOT_METRICS = ("step", "total_steps")
# the HF Trainer's end-of-training log event (a mean loss, runtimes): one-off numbers, not per-step series; the
# run's final numbers come from metrics.json under the same names for every backend (train_loss = last loss)
END_OF_TRAINING = ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")
STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
JOIN_S = 60.0  # the most finish() waits for the background thread (each HTTP call gives up in seconds)


def warn(target: str, what: str, err: BaseException) -> None:
    """The one line a tracking failure prints; the run goes on without that target."""
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    msg = msg if len(msg) < 240 else msg[:237] + "..."
    sys.stdout.flush()
    print(
        f"[finetune] warning: {target} tracking is off for this run: {what} failed ({type(err).__name__}: {msg})",
        file=sys.stderr,
        flush=True,
    )


def _quiet_libraries() -> None:
    """MLflow, alembic and urllib3 log their own retries and migrations; failures are reported by warn() instead."""
    for name in ("mlflow", "alembic", "urllib3", "urllib3.connectionpool", "wandb"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def _environment() -> None:
    """Set before mlflow/wandb are imported: the client gives up in seconds on a dead server; W&B keeps its data,
    cache and config folders under outputs/ (not ~/.local, ~/.cache, ~/.config). A value you set wins."""
    for k, v in T.MLFLOW_HTTP_ENV.items():
        os.environ.setdefault(k, v)
    for k, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        os.environ.setdefault(k, str(T.WANDB_HOME / sub))
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # we print one line of our own
    import warnings

    # their import-time and deprecation warnings (urllib3's SOCKS notice, pydantic, ...) are not the user's concern
    warnings.filterwarnings(
        "ignore",
        module=r"(mlflow|wandb|urllib3|requests|pydantic|alembic|sqlalchemy|google|"
        r"opentelemetry|databricks)(\.|$)",
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj: dict) -> None:
    from finetune.run_dir import atomic_write_json

    atomic_write_json(path, obj)


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------- MLflow


def mlflow_client(uri: str):
    _environment()
    from mlflow import MlflowClient

    _quiet_libraries()
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, uri: str, name: str) -> str:
    """The experiment's id, created on first use. In a local sqlite store its artifacts go beside the database
    (<store>/artifacts/<id>), not into ./mlruns of whatever folder the command ran in."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        from finetune.run_dir import slug

        location = (Path(uri[len("sqlite:///") :]).parent / "artifacts" / slug(name)).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - created meanwhile by another job of a parallel sweep
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def ui_link(uri: str, exp_id: str, run_id: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"{uri}/#/experiments/{exp_id}/runs/{run_id}"
    store = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else None
    if store == T.LOCAL_STORE:
        return "the local store outputs/mlflow; see it with: finetune mlflow-server start"
    return uri


class MlflowSink:
    name = "mlflow"

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        params: Dict[str, str],
        tags: Dict[str, str],
        parent: Optional[dict],
        previous: Optional[dict],
        adapter: Optional[str],
    ):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.params, self.tags, self.parent, self.previous, self.adapter = params, tags, parent, previous, adapter
        self.client = self.exp_id = self.run_id = None

    def open(self) -> None:
        self.client = mlflow_client(self.uri)
        if self.previous and self.previous.get("uri") == self.uri and self.previous.get("run_id"):
            self.exp_id, self.run_id = self.previous["experiment_id"], self.previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")  # a resumed run continues its MLflow run
            return
        if self.parent and self.parent.get("uri") == self.uri and self.parent.get("experiment") == self.experiment:
            self.exp_id = self.parent["experiment_id"]
            self.tags = {**self.tags, "mlflow.parentRunId": self.parent["run_id"]}
        else:
            self.exp_id = experiment_id(self.client, self.uri, self.experiment)
        run = self.client.create_run(self.exp_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        items = list(self.params.items())
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + 100]], synchronous=True)

    def log(self, points: List[tuple]) -> None:
        """points: (key, value, step)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(s)) for k, v, s in points]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000], synchronous=True)

    def close(self, status: str, final: Dict[str, float], step: int, run_dir: Path, error: Optional[str]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        tags = [RunTag("finetune.status", status)]
        if error:
            tags += [
                RunTag("finetune.error", error[:5000]),
                RunTag("mlflow.note.content", f"**{status}**: {error}"[:5000]),
            ]  # the run page's description
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in final.items()], tags=tags, synchronous=True
        )
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if (run_dir / "logs").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "logs"), "logs")
        if self.adapter and Path(self.adapter).is_dir() and status == "completed":
            self.client.log_artifacts(self.run_id, self.adapter, "adapter")
        self.client.set_terminated(self.run_id, STATUS.get(status, "FAILED"))

    def record(self) -> dict:
        return {"uri": self.uri, "experiment": self.experiment, "experiment_id": self.exp_id, "run_id": self.run_id}

    def where(self) -> str:
        return f"run {self.run_id} in experiment '{self.experiment}' ({ui_link(self.uri, self.exp_id, self.run_id)})"


# --------------------------------------------------------------------------------------------- W&B


class WandbSink:
    name = "wandb"

    def __init__(
        self,
        project: str,
        entity: Optional[str],
        mode: str,
        run_name: str,
        group: Optional[str],
        job_type: str,
        config: Dict[str, str],
        tags: List[str],
        run_dir: Path,
        previous: Optional[dict],
    ):
        self.project, self.entity, self.mode, self.run_name = project, entity, mode, run_name
        self.group, self.job_type, self.config, self.tags, self.run_dir = group, job_type, config, tags, run_dir
        self.id = (previous or {}).get("id")
        self.run = None

    def open(self) -> None:
        _environment()
        self.mode = T.wandb_mode(self.mode)
        import wandb

        _quiet_libraries()
        # no console capture, system metrics, code or command line (it may hold a secret you typed)
        settings = wandb.Settings(
            silent=True,
            console="off",
            x_disable_stats=True,
            x_disable_meta=True,
            disable_git=True,
            save_code=False,
            disable_code=True,
        )
        self.run = wandb.init(
            project=self.project,
            entity=self.entity or None,
            group=self.group,
            job_type=self.job_type,
            name=self.run_name,
            config=self.config,
            tags=self.tags,
            dir=str(self.run_dir),
            id=self.id,
            resume="allow" if self.id else None,
            mode=self.mode,
            reinit="create_new",
            settings=settings,
        )
        self.id = self.run.id

    def log(self, points: List[tuple]) -> None:
        by_step: Dict[int, dict] = {}
        for k, v, s in points:
            by_step.setdefault(int(s), {})[k] = v
        for s in sorted(by_step):
            self.run.log(by_step[s], step=s)

    def close(self, status: str, final: Dict[str, float], step: int, run_dir: Path, error: Optional[str]) -> None:
        self.run.summary.update({**final, "finetune_status": status, **({"error": error} if error else {})})
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                self.run.save(str(run_dir / name), base_path=str(run_dir), policy="now")
        self.run.finish(exit_code=0 if status == "completed" else 1)

    def record(self) -> dict:
        return {
            "id": self.id,
            "project": self.project,
            "group": self.group,
            "mode": self.mode,
            "dir": str(self.run.dir) if self.run is not None else None,
        }

    def where(self) -> str:
        if self.mode == "offline":
            folder = Path(self.run.dir).parent if self.run is not None else self.run_dir / "wandb"
            return f"offline run {self.id} in {folder} (upload it: wandb sync {folder})"
        return f"run {self.id} in project '{self.project}'" + (f" ({self.run.url})" if self.run is not None else "")


# --------------------------------------------------------------------------------------------- one run


def sweep_job() -> Optional[Dict[str, Any]]:
    """This job's number, its sweep folder and overrides, when running as a job of a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        return {
            "num": str(hc.job.num),
            "sweep_dir": str(Path(str(hc.sweep.dir)).absolute()),
            "overrides": list(hc.overrides.task),
        }
    except Exception:  # noqa: BLE001 - not under Hydra
        return None


def swept_values(overrides: List[str], swept: List[str]) -> List[str]:
    keys = set(typed_keys(swept))
    return [o for o in overrides if override_key(o) in keys]


class RunTracker:
    """Logs one run to every tracking target of report_to, from a background thread of the driver."""

    def __init__(
        self,
        cfg: dict,
        run_dir: Path,
        manifest: dict,
        overrides: List[str],
        choices: Dict[str, str],
        resume: bool = False,
    ):
        self.run_dir = Path(run_dir)
        self.flush_s = float(cfg["tracking"]["flush_s"])
        self.history = self.run_dir / HISTORY
        self.state_file = self.run_dir / "tracking.json"
        previous = _read_json(self.state_file) if resume else {}
        self.last: Dict[str, int] = dict(previous.get("last_steps") or {})  # metric -> last step logged
        self.max_step = max(self.last.values(), default=0)
        self.series: set = set(self.last)
        job = sweep_job()
        sweep = _read_json(Path(job["sweep_dir"]) / "tracking.json") if job else {}
        if job:
            job["swept_values"] = swept_values(job["overrides"], sweep.get("swept") or [])
        name = T.run_name(self.run_dir, job)
        params = T.params(cfg, overrides, choices)
        backend, method = cfg["backend"]["name"], cfg["method"]["name"]
        self.sinks: list = []
        targets = T.targets(cfg.get("report_to"))
        if "mlflow" in targets:
            m = cfg["tracking"]["mlflow"]
            adapter = (manifest.get("outputs") or {}).get("adapter") if m.get("log_adapter") else None
            self.sinks.append(
                MlflowSink(
                    m["uri"],
                    m["experiment"],
                    name,
                    params,
                    T.tags(manifest, self.run_dir, job),
                    sweep.get("mlflow"),
                    previous.get("mlflow"),
                    adapter,
                )
            )
        if "wandb" in targets:
            w = cfg["tracking"]["wandb"]
            group = sweep.get("group") or (sweep_group(Path(job["sweep_dir"])) if job else None)
            self.sinks.append(
                WandbSink(
                    w["project"],
                    w.get("entity"),
                    w["mode"],
                    name,
                    group,
                    backend,
                    {**params, "run_dir": str(self.run_dir)},
                    [t for t in (backend, method, cfg["model"]["name"]) if t],
                    self.run_dir,
                    previous.get("wandb"),
                )
            )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="finetune-tracking", daemon=True)
        self.opened: list = []

    @classmethod
    def start(cls, cfg: dict, run_dir: Path, manifest: dict, overrides, choices, resume: bool = False):
        """A started tracker, or None when report_to has no tracking target (tensorboard/none: nothing changes)."""
        if not any(t in T.targets(cfg.get("report_to")) for t in ("mlflow", "wandb")):
            return None
        _environment()  # before the thread imports mlflow/wandb; workers ignore these
        try:
            tracker = cls(cfg, run_dir, manifest, overrides, choices, resume)
        except Exception as e:  # noqa: BLE001 - tracking never fails a run
            warn("experiment", "setting up", e)
            return None
        tracker.thread.start()
        return tracker

    # ---- background thread
    def _loop(self) -> None:
        try:
            os.nice(10)  # this thread only (Linux: per-thread): importing mlflow yields the cores to training
        except OSError:
            pass
        for sink in self.sinks:
            try:
                sink.open()
                self.opened.append(sink)
            except Exception as e:  # noqa: BLE001 - a tracker that fails to start is a warning, the run goes on
                warn(sink.name, f"starting the run ({getattr(sink, 'uri', None) or getattr(sink, 'mode', '')})", e)
        self._save_state()
        stamp = None
        while self.opened and not self.stop.wait(self.flush_s):
            stamp = self._flush(stamp)
        self._flush(None)

    def _new_points(self) -> List[tuple]:
        """(key, value, step) of history rows not logged yet: one point per metric and logged step. A rewritten
        file (LLaMA-Factory writes it at the end, a resume truncates it) is read again; what was logged is skipped."""
        from finetune.history import read_history

        points = []
        for row in read_history(self.run_dir):
            step = row.get("step")
            if not _numeric(step):
                continue
            for k, v in row.items():
                if k in NOT_METRICS or k in END_OF_TRAINING or not _numeric(v) or v != v:
                    continue
                if step > self.last.get(k, -1):
                    points.append((k, v, int(step)))
                    self.last[k] = int(step)
                    self.series.add(k)
                    self.max_step = max(self.max_step, int(step))
        return points

    def _flush(self, stamp):
        try:
            st = self.history.stat()
            now = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return stamp
        if now == stamp:
            return stamp
        points = self._new_points()
        if points:
            self._each("logging metrics", lambda s: s.log(points))
            self._save_state()
        return now

    def _each(self, what: str, call) -> None:
        for sink in list(self.opened):
            try:
                call(sink)
            except Exception as e:  # noqa: BLE001 - a tracker failing mid-run is a warning; the run goes on
                warn(sink.name, what, e)
                self.opened.remove(sink)

    def _save_state(self) -> None:
        try:
            state = {s.name: s.record() for s in self.opened}
            _write_json(self.state_file, {**state, "last_steps": self.last})
        except Exception:  # noqa: BLE001 - the record is a convenience (resume); never fail on it
            pass

    # ---- driver thread
    def record(self) -> Dict[str, dict]:
        return {s.name: s.record() for s in self.opened}

    def wait(self) -> None:
        """Stop tailing and log what history.jsonl holds now (the driver calls this before its final manifest)."""
        self.stop.set()
        self.thread.join(JOIN_S)
        if self.thread.is_alive():
            for sink in self.opened:
                warn(sink.name, "logging", TimeoutError(f"no answer within {JOIN_S:.0f} s"))
            self.opened = []

    def finish(self, status: str, metrics: Optional[dict] = None, error: Optional[str] = None) -> None:
        """Final metrics (those not already a logged series, or as final_<name>), artifacts, status."""
        self.wait()
        final = {}
        for k, v in (metrics or {}).items():
            if _numeric(v) and v == v and k not in NOT_METRICS:
                # (not final/<name>: the UI would chart a "final" section of one-point charts before the curves)
                final[f"final_{k}" if k in self.series else k] = float(v)
        self._each("finishing the run", lambda s: s.close(status, final, self.max_step, self.run_dir, error))
        self._save_state()
        for sink in self.opened:
            print(f"[finetune] {sink.name}: {sink.where()}", flush=True)


# --------------------------------------------------------------------------------------------- a sweep


def sweep_group(sweep_dir: Path) -> str:
    """The sweep's name in both tools: sweep-<date>-<time> of its folder (outputs/multiruns/<date>/<time>)."""
    sweep_dir = Path(sweep_dir)
    return f"sweep-{sweep_dir.parent.name}-{sweep_dir.name}"


def swept_keys(config) -> List[str]:
    """Keys a multirun varies: sweep overrides on the command line (lora_r=4,8) and the sweeper's params (sweep
    files, Optuna's search space)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    keys = [str(k) for k in (OmegaConf.select(config, "hydra.sweeper.params", default=None) or {})]
    try:
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        keys += [override_key(o.get_key_element()) for o in parsed if o.is_sweep_override()]
    except Exception:  # noqa: BLE001 - the sweeper reports bad overrides itself
        pass
    return list(dict.fromkeys(typed_keys(keys)))


def start_sweep(config, sweep_dir: Path) -> None:
    """At the start of a multirun (Hydra's driver process): the MLflow parent run, and <sweep>/tracking.json that
    each job reads (parent run, swept keys, W&B group)."""
    from omegaconf import OmegaConf

    report_to = OmegaConf.to_container(config.report_to) if OmegaConf.is_config(config.report_to) else config.report_to
    if not any(t in T.targets(report_to) for t in ("mlflow", "wandb")):
        return
    state = {"swept": swept_keys(config), "group": sweep_group(sweep_dir)}
    if "mlflow" in T.targets(report_to):
        try:
            uri = T.mlflow_uri(OmegaConf.select(config, "tracking.mlflow.uri", default=None))
            name = (
                OmegaConf.select(config, "tracking.mlflow.experiment", default=None)
                or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                or str(config.name)
            )
            client = mlflow_client(uri)
            exp_id = experiment_id(client, uri, name)
            from finetune.run_dir import git_info
            from finetune.secrets import redact

            git = git_info()
            title = f"{state['group']} ({', '.join(state['swept']) or 'sweep'})"
            run = client.create_run(
                exp_id,
                run_name=title,
                tags={
                    "finetune.sweep_dir": str(sweep_dir),
                    "finetune.kind": "sweep",
                    "git.commit": str(git.get("commit")),
                    "git.dirty": str(git.get("dirty")).lower(),
                    "mlflow.source.git.commit": str(git.get("commit")),
                    "mlflow.source.name": "train.py",
                    "mlflow.source.type": "LOCAL",
                },
            )
            from mlflow.entities import Param

            sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).split(".")[-1]
            sweep_params = {
                "overrides": " ".join(redact([str(o) for o in config.hydra.overrides.task])) or "(none)",
                "swept": ",".join(state["swept"]),
                "sweeper": sweeper,
            }
            client.log_batch(
                run.info.run_id, params=[Param(k, T.param_value(v)) for k, v in sweep_params.items()], synchronous=True
            )
            state["mlflow"] = {"uri": uri, "experiment": name, "experiment_id": exp_id, "run_id": run.info.run_id}
        except Exception as e:  # noqa: BLE001 - tracking never fails a sweep
            warn("mlflow", "creating the sweep's parent run", e)
    if "wandb" in T.targets(report_to):
        state["wandb"] = {
            "project": OmegaConf.select(config, "tracking.wandb.project", default=None)
            or os.environ.get("WANDB_PROJECT")
            or str(config.name),
            "entity": OmegaConf.select(config, "tracking.wandb.entity", default=None),
            "mode": OmegaConf.select(config, "tracking.wandb.mode", default="auto"),
        }
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    _write_json(Path(sweep_dir) / "tracking.json", state)


def finish_sweep(sweep_dir: Path, summary: Optional[dict]) -> None:
    """After the summary is written: the parent run gets it (tables, plots) as artifacts, the best objective and
    the job counts, and ends FINISHED (every job completed) or FAILED. For W&B, a run of job type `sweep` in the
    sweep's group carries the same files."""
    sweep_dir = Path(sweep_dir)
    state = _read_json(sweep_dir / "tracking.json")
    if not state:
        return
    summary = summary or _read_json(sweep_dir / "summary.json")
    n_jobs, n_failed = int(summary.get("n_jobs") or 0), int(summary.get("n_failed") or 0)
    rows = summary.get("rows") or []
    best = next((r.get("objective") for r in rows if r.get("job") == summary.get("best_job")), None)
    best = best if _numeric(best) else None
    metric = summary.get("metric") or "objective"
    numbers = {"n_jobs": n_jobs, "n_failed": n_failed, **({f"best_{metric}": best} if best is not None else {})}
    files = [sweep_dir / f for f in SWEEP_FILES if (sweep_dir / f).is_file()] + sorted(sweep_dir.glob("*.png"))
    ok = n_failed == 0 and n_jobs > 0
    if state.get("mlflow"):
        m = state["mlflow"]
        try:
            from mlflow.entities import Metric, RunTag

            client = mlflow_client(m["uri"])
            now = int(time.time() * 1000)
            tags = [RunTag("finetune.status", "completed" if ok else "failed")]
            if summary.get("best_job") is not None:
                tags.append(RunTag("finetune.best_job", str(summary["best_job"])))
            client.log_batch(
                m["run_id"],
                metrics=[Metric(k, float(v), now, 0) for k, v in numbers.items()],
                tags=tags,
                synchronous=True,
            )
            for f in files:
                client.log_artifact(m["run_id"], str(f))
            client.set_terminated(m["run_id"], "FINISHED" if ok else "FAILED")
            print(
                f"[finetune] mlflow: sweep run {m['run_id']} in experiment '{m['experiment']}' "
                f"({ui_link(m['uri'], m['experiment_id'], m['run_id'])})",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - tracking never fails a sweep
            warn("mlflow", "finishing the sweep's parent run", e)
    if state.get("wandb"):
        w = state["wandb"]
        try:
            sink = WandbSink(
                w["project"],
                w.get("entity"),
                w["mode"],
                state["group"],
                state["group"],
                "sweep",
                {"swept": ",".join(state.get("swept") or [])},
                ["sweep"],
                sweep_dir,
                None,
            )
            sink.open()
            sink.run.summary.update(numbers)
            for f in files:
                sink.run.save(str(f), base_path=str(sweep_dir), policy="now")
            sink.run.finish(exit_code=0 if ok else 1)
            print(f"[finetune] wandb: sweep {sink.where()}", flush=True)
        except Exception as e:  # noqa: BLE001 - tracking never fails a sweep
            warn("wandb", "logging the sweep's summary", e)


def failed_job(config, job_dir: Path, error: str) -> None:
    """A job that failed before its run folder existed (a refused config): a failed child run with its error."""
    state = _read_json(Path(job_dir).parent / "tracking.json")
    m = state.get("mlflow")
    if not m:
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        num = str(HydraConfig.get().job.num)
        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - outside a Hydra job: the folder's name is the job's
        num, overrides = Path(job_dir).name, []
    try:
        from mlflow.entities import Param, RunTag

        from finetune.secrets import redact

        client = mlflow_client(m["uri"])
        swept = swept_values(overrides, state.get("swept") or [])
        name = T.run_name(Path(job_dir), {"num": num, "swept_values": swept})
        run = client.create_run(
            m["experiment_id"],
            run_name=name,
            tags={
                "mlflow.parentRunId": m["run_id"],
                "finetune.sweep_dir": str(Path(job_dir).parent),
                "finetune.job": num,
                "finetune.run_dir": str(job_dir),
                "finetune.status": "failed",
                "finetune.error": error[:5000],
                "mlflow.note.content": f"**failed**: {error}"[:5000],
            },
        )
        client.log_batch(
            run.info.run_id,
            params=[Param("overrides", T.param_value(" ".join(redact(overrides))))],
            tags=[RunTag("finetune.status", "failed")],
            synchronous=True,
        )
        client.set_terminated(run.info.run_id, "FAILED")
    except Exception as e:  # noqa: BLE001 - tracking never fails a sweep
        warn("mlflow", "recording the failed job", e)
