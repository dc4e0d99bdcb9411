"""Experiment tracking: MLflow and Weights & Biases, the same way for every backend and every sweep.

    python train.py report_to=mlflow                      # or report_to=[tensorboard,mlflow], report_to=wandb
    python train.py -m lora_r=4,8 report_to=mlflow        # one parent run, one child run per job

Design (why the driver logs, not the training process):
- The driver (finetune/run.py) logs each run from the files every backend already writes: history.jsonl (one row
  per log event, read while the steps run, so the dashboard is live), then metrics.json, the manifest, the config
  and loss.png. So alpacalora, LLaMA-Factory, FlagEmbedding, Collie (in its own environment) and dummy runs get
  the same run names, params, tags and metric names, and compare in one MLflow experiment / W&B project. The
  trainers' own integrations (HF's MLflowCallback, LLaMA-Factory's report_to) are not used: they crash the worker
  when the server is unreachable at start, raise at train end when it died (skipping the save), drop whole param
  batches on a key collision, and name metrics their own way.
- Tracking never fails or stalls a run: the logging runs in a background thread of the driver while the worker
  trains; the MLflow client gives up within seconds (MLFLOW_HTTP_REQUEST_* defaults below); the first failure
  prints one warning line and turns tracking off for that run.
- A sweep is a parent run (created when the multirun starts, finetune/callbacks.py) with a child per job; the
  sweep summary and plots become the parent's artifacts. A failed job is a failed child with its error.
- W&B runs offline (local files under the run folder, ``wandb sync`` uploads them) unless an API key is set and
  the W&B server answers; its data/cache/config folders stay under outputs/, not in your home folder.
- Secrets never reach params or tags: everything logged goes through finetune.secrets.redact.

This module is the config side (standard library + omegaconf only): which targets, validation, defaults, and the
params/tags every backend shares. The logging itself is in tracker.py (imports mlflow / wandb in the thread).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from finetune.config.paths import OUTPUTS_ROOT
from finetune.config.schema import RootConfig, WandbTracking, choices
from finetune.errors import ConfigError, one_of

TARGETS = choices(RootConfig, "report_to")
LOCAL_STORE = OUTPUTS_ROOT / "mlflow"  # the default MLflow store: mlflow.db + artifacts/
WANDB_HOME = OUTPUTS_ROOT / "cache" / "wandb"  # W&B's data/cache/config folders (not ~/.local, ~/.cache)
URI_SCHEMES = ("http://", "https://", "sqlite:///", "databricks")
WANDB_MODES = choices(WandbTracking, "mode")
# the MLflow client's HTTP retry defaults wait about 4 minutes on a dead server; these give up in seconds
MLFLOW_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
INSTALL = {"mlflow": "pip install mlflow-skinny==3.17.2", "wandb": "pip install wandb==0.31.0"}


def targets(report_to: Any) -> List[str]:
    """report_to as a list: 'mlflow' -> ['mlflow'], [tensorboard, mlflow] -> both, 'none' -> []."""
    if report_to is None:
        return []
    if isinstance(report_to, str):
        items = [report_to]
    else:
        items = [str(x) for x in report_to]
    return [x for x in items if x != "none"]


def wants(report_to: Any, target: str) -> bool:
    return target in targets(report_to)


def describe(cfg) -> List[str]:
    """Plan notes: where this run will be logged (shown by dry_run=true)."""
    notes, chosen = [], targets(cfg.report_to)
    if "mlflow" in chosen:
        m = cfg.tracking.mlflow
        notes.append(
            f"mlflow: experiment '{m.experiment}' at {m.uri} (logged by the driver from history.jsonl while "
            "the steps run, then metrics and artifacts)"
        )
    if "wandb" in chosen:
        notes.append(
            f"wandb: project '{cfg.tracking.wandb.project}', mode {cfg.tracking.wandb.mode} (auto: offline "
            "unless an API key is set and W&B answers; offline runs stay in <run>/wandb for `wandb sync`)"
        )
    return notes


def local_store_uri() -> str:
    return f"sqlite:///{LOCAL_STORE / 'mlflow.db'}"


def check(cfg) -> None:
    """report_to and tracking.* rules (one line each); fills in the tracking defaults, recorded in the manifest."""
    from omegaconf import OmegaConf, open_dict

    raw = OmegaConf.to_container(cfg.report_to) if OmegaConf.is_config(cfg.report_to) else cfg.report_to
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise ConfigError("report_to", raw, one_of(TARGETS[:3]) + ", none, or a list such as [tensorboard,mlflow]")
    for x in items:
        if x not in TARGETS:
            from finetune.errors import suggest

            raise ConfigError(
                "report_to", x, one_of(TARGETS) + " (or a list such as [tensorboard,mlflow])", suggest(x, TARGETS)
            )
    if "none" in items and len(items) > 1:
        raise ConfigError("report_to", raw, "none cannot be combined with other targets")
    if len(set(items)) != len(items):
        raise ConfigError("report_to", raw, "lists a target twice")
    chosen = targets(raw)
    for lib in ("mlflow", "wandb"):
        if lib in chosen and importlib.util.find_spec(lib) is None:
            raise ConfigError("report_to", lib, f"needs the {lib} client, which is not installed: {INSTALL[lib]}")
    t = cfg.tracking
    with open_dict(cfg):
        t.mlflow.uri = mlflow_uri(t.mlflow.uri)
        if not t.mlflow.experiment:
            t.mlflow.experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or str(cfg.name)
        if not t.wandb.project:
            t.wandb.project = os.environ.get("WANDB_PROJECT") or str(cfg.name)
    if not str(t.mlflow.experiment).strip():
        raise ConfigError("tracking.mlflow.experiment", t.mlflow.experiment, "must be a non-empty name")
    if t.wandb.mode not in WANDB_MODES:
        raise ConfigError(
            "tracking.wandb.mode",
            t.wandb.mode,
            one_of(WANDB_MODES) + " (auto: online when an API key is set and W&B answers, else offline)",
        )
    if float(t.flush_s) <= 0:
        raise ConfigError("tracking.flush_s", t.flush_s, "must be > 0 (seconds between two reads of history.jsonl)")


def mlflow_uri(uri: Optional[str]) -> str:
    """tracking.mlflow.uri, else $MLFLOW_TRACKING_URI, else the local store outputs/mlflow/mlflow.db. A sqlite path
    you type is made absolute against the working folder; a password in an http(s) URI is kept out of every file
    (it is remembered as a secret, finetune/secrets.py)."""
    uri = str(uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri())
    key = "tracking.mlflow.uri"
    if uri.startswith("sqlite:///"):
        from finetune.config.paths import absolute

        path = uri[len("sqlite:///") :]
        return f"sqlite:///{absolute(path if path.startswith('/') else path)}"
    if uri.startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        parts = urlsplit(uri)
        if not parts.hostname:
            raise ConfigError(key, uri, "has no host (http://HOST:PORT)")
        if parts.password:
            from finetune import secrets

            secrets.remember([parts.password])
        return uri.rstrip("/")
    if uri.startswith("databricks"):
        return uri
    file_store = uri.startswith("file:") or "://" not in uri
    hint = "MLflow 3 retired the file store; use sqlite:///<path>/mlflow.db" if file_store else ""
    raise ConfigError(
        key,
        uri,
        "an MLflow tracking URI: http(s)://HOST:PORT (a server), sqlite:///PATH (a local store) or databricks",
        hint,
    )


def wandb_mode(mode: str) -> str:
    """offline / online. auto: $WANDB_MODE if set, else online only with an API key and W&B reachable."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "online", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    if not (os.environ.get("WANDB_API_KEY") or _netrc_has("api.wandb.ai")):
        return "offline"
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    try:
        socket.create_connection((host.hostname, host.port or 443), 3).close()
        return "online"
    except OSError:
        return "offline"


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# --------------------------------------------------------------------------------------------- params and tags

GROUPS = ("backend", "model", "method", "hardware", "data", "launcher")
# nested keys worth a param (the rest of each group is schema plumbing); backend.*, method.*, hardware.* in full
GROUP_KEYS = {
    "model": ("path", "family", "kind"),
    "data": ("path", "format", "eval_path"),
    "launcher": ("nproc_per_node", "nnodes"),
}
SKIP_BACKEND = ("name", "methods", "model_kinds", "data_formats", "candidates")
NOT_PARAMS = ("tracking", "output_dir", "target_path", "merge_path", "dry_run", "explain", "resume", "auto_choice")
MAX_VALUE = 500


def param_value(v: Any) -> str:
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif v is None:
        s = "null"
    elif isinstance(v, (dict, list)):
        s = json.dumps(v, default=str)
    else:
        s = str(v)
    return s if len(s) <= MAX_VALUE else s[: MAX_VALUE - 3] + "..."


def params(config: Dict[str, Any], overrides: List[str], choices: Dict[str, str]) -> Dict[str, str]:
    """The params every backend logs under the same names: the root keys (lora_r, learning_rate, ...), the group
    choices (backend=alpacalora, model=tiny_llama, ...), every backend.* / method.* / hardware.* key, the model and
    data paths, the world size, and the overrides as typed. Secrets are redacted; keys that look secret are left
    out."""
    from finetune.secrets import is_secret_key, redact

    config = redact(config)
    out: Dict[str, Any] = {}
    for k, v in config.items():
        if k in GROUPS or k in NOT_PARAMS or k.startswith("_"):
            continue
        out[k] = v
    for g in GROUPS:
        node = config.get(g) or {}
        out[g] = node.get("name")
        keys = GROUP_KEYS.get(g) or [k for k in node if k not in SKIP_BACKEND]
        for k in keys:
            if k in node and not isinstance(node[k], dict):
                out[f"{g}.{k}"] = node[k]
    for g, option in (choices or {}).items():
        if g not in GROUPS and "/" not in g and option is not None:
            out[g] = option  # experiment=..., sweep=..., hparams_search=...
    import re

    typed = [re.sub(r"\\(.)", r"\1", str(o)) for o in overrides]  # a multirun job's overrides come escaped (\:)
    out["overrides"] = " ".join(redact(typed)) or "(none)"
    return {k: param_value(v) for k, v in out.items() if not is_secret_key(k)}


def tags(manifest: Dict[str, Any], run_dir: Path, job: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """Tags: where the run is (its folder: `finetune reproduce <run id>` finds it by this tag), what it ran, at which
    commit. job: {"sweep_dir", "num", "parent_run_id"} for a sweep job."""
    from finetune.secrets import redact

    cfg = manifest.get("config") or {}
    git = manifest.get("git") or {}

    def name(group):
        return (cfg.get(group) or {}).get("name")

    out = {
        "finetune.run_dir": str(run_dir),
        "finetune.backend": name("backend"),
        "finetune.method": name("method"),
        "finetune.model": name("model"),
        "finetune.config_name": cfg.get("name"),
        "git.commit": git.get("commit"),
        "git.dirty": None if git.get("dirty") is None else str(bool(git["dirty"])).lower(),
        "mlflow.source.git.commit": git.get("commit"),
        "mlflow.source.name": "train.py",
        "mlflow.source.type": "LOCAL",
    }
    if job:
        out.update({"finetune.sweep_dir": job.get("sweep_dir"), "finetune.job": job.get("num")})
        if job.get("parent_run_id"):
            out["mlflow.parentRunId"] = job["parent_run_id"]
    return {k: str(redact(v)) for k, v in out.items() if v is not None}


def run_name(run_dir: Path, job: Optional[Dict[str, Any]] = None) -> str:
    """A single run: its folder's name (10-22-31-run). A sweep job: job-N and the swept values (job-1 lora_r=8)."""
    if not job:
        return Path(run_dir).name
    return " ".join([f"job-{job.get('num')}", *job.get("swept_values", [])])
