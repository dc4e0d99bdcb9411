"""Hydra callbacks: the sweep summary, written at the end of every multirun, even one where a job failed.

Registered in conf/config.yaml (``hydra.callbacks.sweep_summary``). Hydra calls ``on_multirun_end`` only when
every job succeeded (a failed job makes the sweeper raise first), and it gives callbacks no job results. So:

- every job writes its own ``result.json`` (finetune/run.py); ``on_job_end`` adds one for a job that failed
  before its run folder existed (a refused config), with the error line;
- ``on_multirun_start`` writes ``sweep_jobs.json`` (the planned jobs of a grid sweep, so jobs that never ran are
  listed), applies ``fail_fast=true`` (basic sweeper: one job per batch, so the first failure stops the sweep)
  and registers an ``atexit`` fallback;
- the summary (finetune/report/summary.py) is written by ``on_multirun_end`` or, when the sweep raised (a job
  failed, Ctrl-C, Optuna's ``max_failure_rate``), by the ``atexit`` fallback: it runs on any normal interpreter
  exit, including our one-line error exit, so it covers every sweeper and launcher. The sweep still exits
  non-zero. ``finetune summarize <folder>`` rebuilds the same files by hand.

Only the standard library, omegaconf and hydra are imported here (the summary's matplotlib/rich are imported
when it is written).
"""

from __future__ import annotations

import atexit
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from finetune.config.overrides import typed_keys
from finetune.errors import ConfigError
from finetune.run_files import RESULT

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def planned_jobs(config: DictConfig) -> Optional[List[List[str]]]:
    """The overrides of each job a basic (grid) sweep will launch, in launch order; None for other sweepers."""
    sweeper = OmegaConf.select(config, "hydra.sweeper._target_", default="")
    if sweeper != BASIC_SWEEPER:
        return None
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    lists = {}  # the same expansion as BasicSweeper.split_arguments, but keeping each value as typed
    for ov in OverridesParser.create().parse_overrides(arguments):
        key = ov.get_key_element()
        if ov.is_sweep_override():
            lists[key] = [f"{key}={v}" for v in ov.sweep_string_iterator()]
        else:
            lists[key] = [ov.input_line]
    return [list(job) for job in itertools.product(*lists.values())]


def claim_sweep_dir(config: DictConfig) -> Path:
    """Claim the sweep's folder before any job starts, as a run claims its own (finetune/run_dir.py): two sweeps
    started in the same second get <time> and <time>-2; a hydra.sweep.dir you typed is that folder or a refusal
    (it must be new or empty). The jobs are composed again from Hydra's overrides, so a changed folder is passed
    on to them as one more hydra override. The lock is held until the sweep's process ends."""
    from omegaconf import open_dict, read_write

    from finetune.errors import ConfigError
    from finetune.run_dir import LOCK, claim_run_dir

    path = Path(str(config.hydra.sweep.dir)).absolute()
    typed = "hydra.sweep.dir" in typed_keys(config.hydra.overrides.hydra)
    if typed and path.is_dir() and any(p.name != LOCK for p in path.iterdir()):
        raise ConfigError("hydra.sweep.dir", str(path), "exists and is not empty; a sweep folder is never reused")
    folder = claim_run_dir(path, resume=False, exact=typed)
    _CLAIMED.append(folder)  # held (and locked) for the life of this process
    if folder.path != path:
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = str(folder.path)
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={folder.path}")
    return folder.path


_CLAIMED: list = []


class SweepSummary(Callback):
    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.sweep_dir: Optional[Path] = None
        self.done = False
        self.started = 0.0

    # ------------------------------------------------------------------ driver process
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from finetune.cli import _die
        from finetune.launchers import local, slots

        if OmegaConf.select(config, "launcher.name", default=None) == "local":
            try:  # before any job starts (Hydra turns a callback's exception into a warning: exit here instead)
                local.check_gpu_slots(config, slots.parallel_jobs(config.hydra.launcher))
            except ConfigError as e:
                _die(str(e), 2)
        if bool(OmegaConf.select(config, "dry_run", default=False)):
            return  # each job prints its plan and writes nothing: no summary
        try:
            self.sweep_dir = claim_sweep_dir(config)
        except ConfigError as e:
            _die(str(e), 2)
        self.started = time.time()
        basic = OmegaConf.select(config, "hydra.sweeper._target_", default="") == BASIC_SWEEPER
        if basic and bool(OmegaConf.select(config, "fail_fast", default=False)):
            # the sweeper is instantiated from this same config after this callback: one job per batch,
            # and BasicSweeper raises after the batch holding a failed job
            config.hydra.sweeper.max_batch_size = 1
        try:
            jobs = planned_jobs(config)
        except Exception as e:  # noqa: BLE001 - e.g. a glob over a group: the sweeper will report it
            jobs = None
            print(f"[finetune] sweep: could not list the planned jobs ({type(e).__name__}: {e})", file=sys.stderr)
        from finetune.tracking.tracker import start_sweep

        start_sweep(config, self.sweep_dir)  # report_to=mlflow: the parent run of the jobs' runs (never raises)
        if jobs is not None:
            from finetune.run_dir import atomic_write_json

            atomic_write_json(
                self.sweep_dir / "sweep_jobs.json",
                {
                    "jobs": {str(i): job for i, job in enumerate(jobs)},
                    "fail_fast": bool(OmegaConf.select(config, "fail_fast", default=False)),
                    "started": self.started,
                },
            )
            print(f"[finetune] sweep of {len(jobs)} jobs into {self.sweep_dir}", flush=True)
        atexit.register(self._fallback)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write("completed")

    def _fallback(self) -> None:
        if not self.done:
            self._write("ended early (a job failed or the sweep was stopped)")

    def _write(self, how: str) -> None:
        if self.done or self.sweep_dir is None:
            return
        self.done = True
        if not self.sweep_dir.is_dir():
            return
        try:
            from finetune.report.summary import summarize

            sys.stdout.flush()
            print(f"[finetune] sweep {how} after {time.time() - self.started:.0f} s", flush=True)
            summary = summarize(self.sweep_dir, echo=self.echo)
        except Exception as e:  # noqa: BLE001 - never mask the sweep's own outcome
            summary = None
            print(
                f"[finetune] could not write the sweep summary: {type(e).__name__}: {e} "
                f"(retry: finetune summarize {self.sweep_dir})",
                file=sys.stderr,
                flush=True,
            )
        from finetune.tracking.tracker import finish_sweep

        finish_sweep(self.sweep_dir, summary)  # the parent run gets the summary and plots (never raises)

    # ------------------------------------------------------------------ job process (local, joblib or Slurm)
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status != JobStatus.FAILED:
            return
        if str(OmegaConf.select(config, "hydra.mode", default="")) != "RunMode.MULTIRUN":
            return  # a single run's folder is ours (finetune/run.py); Hydra's run dir is "."
        out = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
        if not out:
            return
        job_dir = Path(str(out))
        run_dir = Path(str(config.output_dir)) if OmegaConf.select(config, "output_dir", default=None) else job_dir
        if (run_dir / RESULT).exists() or not job_dir.is_dir():
            return
        from finetune.compat.hydra import job_exception

        err = job_exception(job_return)
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        from finetune.run_dir import atomic_write_json

        def pick(key, default=None):
            try:
                return OmegaConf.select(config, key, default=default)
            except Exception:  # noqa: BLE001 - a bad interpolation is often why the job failed
                return default

        from finetune.tracking.tracker import failed_job

        failed_job(config, job_dir, f"{type(err).__name__}: {first}")  # a failed child run, when tracked
        atomic_write_json(
            job_dir / RESULT,
            {
                "status": "failed",
                "error": f"{type(err).__name__}: {first}",
                "metric_name": str(pick("metric", "eval_loss")),
                "metric": None,
                "metrics": {},
                "overrides": list(config.hydra.overrides.task),
                "backend": pick("backend.name"),
                "method": pick("method.name"),
                "time": time.time(),
            },
        )
