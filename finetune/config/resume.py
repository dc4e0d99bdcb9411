"""Replaying a run's recorded overrides: for `resume=true` (the same folder) and `finetune reproduce` (a new one).

    python train.py output_dir=<run> resume=true

continues the run in that folder with the config it was started with: the overrides recorded in
<run>/overrides.yaml are put back on the command line before Hydra composes, so the composed config is the run's,
not the defaults'. Anything else typed with it that would change the training config is refused with one line
(only the keys in RESUME_MAY_CHANGE may differ). Standard library + omegaconf only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

from finetune.config.overrides import override_key  # noqa: F401 - its callers import it from here too
from finetune.errors import ConfigError
from finetune.run_files import MANIFEST, OVERRIDES

# keys a replay drops from the recorded overrides (the replay sets its own)
DROP_KEYS = ("output_dir", "resume", "dry_run", "hydra.mode", "hydra.run.dir")
# keys a resume may set differently from the recorded run: none of them changes what is trained
RESUME_MAY_CHANGE = ("output_dir", "resume", "dry_run", "timeout_min", "report_to", "tracking")
TRUE = ("true", "yes", "1", "on")


def load_record(run_dir: Path) -> Tuple[dict, List[str]]:
    """(manifest, overrides as typed) of a run folder."""
    manifest_path = Path(run_dir) / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(
            "run_dir",
            str(run_dir),
            "a run folder holding manifest.json (outputs/runs/<date>/<time>-<name> or a sweep job folder)",
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    overrides = manifest.get("overrides")
    ov_file = Path(run_dir) / OVERRIDES
    if ov_file.is_file():
        from omegaconf import OmegaConf

        loaded = OmegaConf.to_container(OmegaConf.load(ov_file))
        if isinstance(loaded, list):
            overrides = loaded
    return manifest, [str(o) for o in (overrides or [])]


def replay_overrides(overrides: List[str], auto_choice: Optional[dict] = None) -> List[str]:
    """The recorded overrides minus the run-folder ones. A backend=auto run is replayed with the choice it made
    (auto_choice.overrides: backend, method, micro batch, checkpointing, ZeRO, processes) instead of backend=auto,
    so that nothing is decided again (a changed machine or estimator could otherwise pick something else)."""
    pins = list((auto_choice or {}).get("overrides") or [])
    pinned = {override_key(p) for p in pins}
    keep = []
    for ov in overrides:
        key = override_key(ov)
        if key in DROP_KEYS:
            continue
        if pins and (key in pinned or key.startswith("backend.")):  # backend.* belonged to the auto backend
            continue
        keep.append(ov)
    return keep + pins


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def resume_argv(argv: List[str]) -> List[str]:
    """The command line with the recorded run's overrides in place, when it asks for `resume=true`; else argv.
    Raises ConfigError (one line) for a folder that holds no run, a finished run, or a changed setting."""
    args = argv[1:]
    overrides = [a for a in args if _is_override(a)]
    values = {override_key(o): o.split("=", 1)[1] for o in overrides}
    if values.get("resume", "").strip().lower() not in TRUE:
        return argv
    if "output_dir" not in values or not values["output_dir"]:
        return argv  # validation refuses it with its own message
    if any(a in ("-m", "--multirun") for a in args):
        raise ConfigError("resume", True, "continues one run: drop -m (resume each job of a sweep by its own folder)")
    from finetune.config.paths import absolute

    run_dir = absolute(values["output_dir"])
    if not (run_dir / MANIFEST).is_file():
        raise ConfigError(
            "output_dir",
            values["output_dir"],
            "holds no run to resume (no manifest.json); resume=true continues a run folder that train.py created",
        )
    manifest, recorded = load_record(run_dir)
    if manifest.get("status") == "completed":
        raise ConfigError(
            "resume",
            True,
            f"the run in {run_dir} completed; there is nothing to resume (start a new run, or `finetune reproduce` it)",
        )
    replay = replay_overrides(recorded, manifest.get("auto_choice"))
    recorded_by_key = {override_key(o): o for o in replay}
    extra = []
    for o in overrides:
        key = override_key(o)
        if key in ("output_dir", "resume"):
            continue
        if key in RESUME_MAY_CHANGE or key.split(".")[0] in RESUME_MAY_CHANGE:
            extra.append(o)
        elif recorded_by_key.get(key) != o:
            was = recorded_by_key.get(key)
            started = f"with {was}" if was else f"without {key} (its default)"
            raise ConfigError(
                key,
                o.split("=", 1)[1],
                f"cannot change on resume: the run in {run_dir} was started "
                f"{started}; resume with only output_dir=... resume=true, or start a new run",
            )
    flags = [a for a in args if not _is_override(a)]
    return [argv[0], *flags, *replay, f"output_dir={values['output_dir']}", "resume=true", *extra]
