"""Entry points.

- ``train.py``: the Hydra app (@hydra.main). ``setup()`` registers the schemas and resolvers and installs an
  error reporter that turns every refusal (ours or Hydra's compose errors) into one line on stderr, exit 2.
- ``finetune`` (console script): helper commands (``summarize``, ``reproduce``, ``setup-collie``, ``generate``,
  ``chat``, ``export``, ``setup-llamacpp``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, List

from finetune.config.overrides import split_override
from finetune.errors import ConfigError, RunError, one_of, suggest


def _known_keys() -> List[str]:
    from finetune.config.schema import known_keys

    return known_keys()


def _groups() -> dict:
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf"
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in conf.iterdir() if d.is_dir()}


def explain_hydra_error(ex: BaseException) -> str:
    """One line for Hydra/OmegaConf compose errors, from the exceptions' own fields (Hydra's missing_cfg_file,
    options and override; OmegaConf's full_key, value and object_type), not from their message text. Each kind is
    pinned by a test (tests/test_hydra_messages.py), so a Hydra or OmegaConf upgrade that changes them fails there."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

    if isinstance(ex, MissingConfigException) and "/" in (ex.missing_cfg_file or ""):  # backend=colie
        group, option = ex.missing_cfg_file.rsplit("/", 1)
        options = list(ex.options or _groups().get(group.split("/")[-1], []))
        allowed = ("one of " + ", ".join(options)) if options else f"no options in conf/{group}/"
        return str(ConfigError(group, option, allowed, suggest(option, options)))
    if isinstance(ex, OverrideParseException):  # lora_r   lora_r=[1
        return f"override {ex.override!r}: cannot be parsed (KEY=VALUE; quote values with special characters)"
    inner = ex if isinstance(ex, OmegaConfBaseException) else ex.__cause__
    if isinstance(inner, (ConfigKeyError, AttributeError)) and getattr(inner, "full_key", None):  # lora_rr=3
        key = inner.full_key
        return f"{key}: unknown key ({suggest(key, _known_keys()) or 'see `python train.py --cfg job` for every key'})"
    if isinstance(inner, ValidationError) and getattr(inner, "full_key", None):  # lora_r=abc
        return str(ConfigError(inner.full_key, inner.value, _expected_type(inner)))
    if isinstance(inner, MissingMandatoryValue) and getattr(inner, "full_key", None):
        return f"{inner.full_key}: required value is missing (set {inner.full_key}=...)"
    ambiguous = re.match(r"(Ambiguous value for argument|Sweep parameters) '(.+?)'", str(ex))
    if ambiguous:  # Hydra's own message spreads the fix over three more lines: one line with it
        override = ambiguous.group(2)
        key, _, value = override.partition("=")
        if ambiguous.group(1) == "Sweep parameters":  # range(), choice(), glob()
            return f"override {override!r}: is a sweep, which runs with -m (python train.py -m {override})"
        return (
            f"override {override!r}: a comma list is a sweep, which runs with -m; for a list write "
            f"{key}=[{value}], for text with commas quote it: {key}='{value}'"
        )
    lines = [
        ln.strip()
        for ln in str(ex).splitlines()
        if ln.strip() and not ln.startswith(("    full_key", "    object_type"))
    ]
    return lines[0] if lines else type(ex).__name__


def _expected_type(err) -> str:
    """What a schema field takes, from its annotation (OmegaConf's error carries the dataclass and the key)."""
    import dataclasses
    import typing

    fields = (
        {f.name: f for f in dataclasses.fields(err.object_type)} if dataclasses.is_dataclass(err.object_type) else {}
    )
    field = fields.get(str(err.key))
    hint = typing.get_type_hints(err.object_type).get(field.name) if field else None
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return {
        int: "must be integer",
        float: "must be float",
        bool: "must be a bool (true/false)",
        str: "must be a string",
    }.get(args[0], str(err.msg).splitlines()[0])


def classify(e: BaseException):
    """(exit code, one-line message) for an exception that reached the top."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, ConfigError):
        return 2, str(e)
    if isinstance(e, RunError):
        return 1, f"run failed: {e}"
    for inner in (e.__cause__, e.__context__):
        if isinstance(inner, ConfigError):  # raised inside a resolver or a schema hook, wrapped
            return 2, str(inner)
    y = e if isinstance(e, yaml.YAMLError) else e.__cause__ if isinstance(e.__cause__, yaml.YAMLError) else None
    if y is not None:
        mark = getattr(y, "problem_mark", None)
        where = f"{mark.name} line {mark.line + 1}" if mark else "a config file"
        return 2, f"{where}: malformed YAML ({getattr(y, 'problem', None) or y})"
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return 2, explain_hydra_error(e)
    return 1, f"{type(e).__name__}: {e} (set HYDRA_FULL_ERROR=1 for the traceback)"


def _report(func: Callable[[], Any]) -> Any:
    """What Hydra reports errors with (finetune/compat/hydra.py): one line, exit 2 for bad input, 1 for failures."""
    try:
        return func()
    except Exception as e:  # noqa: BLE001 - any failure becomes one line and an exit code, never a bare traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _die(*reversed(classify(e)))


def _die(msg: str, code: int) -> None:
    sys.stdout.flush()
    first, *rest = str(msg).splitlines() or [""]
    prefix = "error: " if code == 2 else ""
    sys.stderr.write(f"{prefix}{first}\n" + "".join(f"{r}\n" for r in rest))
    sys.stderr.flush()
    sys.exit(code)


def stopped_line(e: BaseException) -> str:
    """The one line for a run stopped by the user: what was saved, and the command that continues it."""
    ckpt, run_dir = getattr(e, "checkpoint", None), getattr(e, "run_dir", None)
    how = "paused" if type(e).__name__ == "Paused" else "interrupted"
    if ckpt is None:
        return f"{how}: nothing was saved, so resume=true would have no checkpoint to continue from"
    return f"{how}: {ckpt.name} saved in {ckpt.parent}; continue with: python train.py output_dir={run_dir} resume=true"


def task(cfg) -> Any:
    """The body of train.py's @hydra.main. In a single run, a refusal or a failed step ends the process here
    (one line, exit 2 or 1) rather than as a Hydra job error; in a sweep the job fails and the others go on."""
    from finetune.run import run

    multirun = False
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - no Hydra config yet (called outside a job): a single run
        pass
    from finetune.run import Paused

    try:
        return run(cfg)
    except (Paused, KeyboardInterrupt) as e:
        if multirun:
            raise
        _die(stopped_line(e), 130)
    except Exception as e:  # noqa: BLE001 - any failure becomes one line and exit 1 (a sweep's own handler reports it)
        if multirun or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        code, msg = classify(e)
        if code == 1 and not isinstance(e, RunError):
            import traceback

            where = traceback.extract_tb(e.__traceback__)[-1]
            msg = f"internal error: {msg} (at {where.filename}:{where.lineno})"
        _die(msg, code)


def setup() -> None:
    """Register schemas and resolvers; route Hydra's error reporting through ours."""
    from finetune.compat import hydra as hydra_compat
    from finetune.config import resolvers, schema

    schema.register()
    resolvers.register()
    hydra_compat.route_error_reporting(_report)
    hydra_compat.wrap_mode_probe(_mode_probe)
    from finetune.config.resume import resume_argv

    try:
        sys.argv[:] = resume_argv(sys.argv)  # resume=true: the recorded run's overrides, before Hydra parses
        one_hardware_per_slurm_sweep(sys.argv[1:])
        no_dry_run_search(sys.argv[1:])
        known_group_options(sys.argv[1:])
    except ConfigError as e:
        _die(str(e), 2)


def known_group_options(args: List[str]) -> None:
    """An option that is not in its group's folder is refused with close matches, for every group alike. Hydra
    does this for the required groups, but skips a missing option of an optional one (`- optional experiment`):
    `experiment=alpaca_loraa` would silently run the default job."""
    groups = _groups()
    for arg in args:  # a user's own config folders (hydra.searchpath=[file://...]) hold options too
        if arg.startswith("hydra.searchpath="):
            for folder in re.findall(r"file://([^,\]\s]+)", arg):
                for group in Path(folder).iterdir() if Path(folder).is_dir() else []:
                    groups[group.name] = sorted({*groups.get(group.name, []), *(p.stem for p in group.glob("*.yaml"))})
            if "pkg://" in arg:
                return  # options inside a package: Hydra reports what it cannot find
    for arg in args:
        group, value = split_override(arg)
        if value is None or group not in groups or "(" in value or arg.startswith("~"):
            continue  # not a group choice, or a sweep function (glob, choice, range) Hydra expands
        for option in filter(None, (v.strip() for v in value.split(","))):
            if option not in groups[group] and option != "null":
                options = groups[group]
                raise ConfigError(group, option, "one of " + ", ".join(options), suggest(option, options))


def no_dry_run_search(args: List[str]) -> None:
    """An Optuna search picks each trial from the results of the ones before, and a dry run has none (Optuna would
    end with "No trials are completed yet"): refused, with how to see a trial's plan."""
    values = {k: v for k, v in map(split_override, args) if v is not None}
    if values.get("hparams_search") and values.get("dry_run", "").lower() in ("true", "yes", "1", "on"):
        raise ConfigError(
            "dry_run",
            True,
            f"an Optuna search (+hparams_search={values['hparams_search']}) samples each "
            "trial from the results of the earlier ones, which a dry run does not have; dry-run one "
            "trial as a single run: python train.py <the trial's keys> dry_run=true",
        )


def one_hardware_per_slurm_sweep(args: List[str]) -> None:
    """hydra/launcher=slurm_sweep submits a sweep's jobs as one Slurm array with one resource request, sized from the
    sweep's hardware group (conf/hydra/launcher/slurm_sweep.yaml): sweeping hardware= there would give every job
    the first option's GPUs. Refused before Hydra starts (its callbacks cannot stop a sweep)."""
    if not any(a.startswith("hydra/launcher=") and "slurm" in a for a in args):
        return
    for a in args:
        key, value = split_override(a)
        if key == "hardware" and "," in (value or ""):
            raise ConfigError(
                "hardware",
                value,
                "hydra/launcher=slurm_sweep asks Slurm for one set of resources for "
                "every job of the sweep; sweep one hardware option per sweep",
            )


# Overrides that could set hydra.mode through the config (a sweep/search file, an experiment, hydra.* itself).
_MODE_SOURCES = re.compile(r"^[~+]*(hydra|sweep|hparams_search|experiment)\b")


def _may_set_mode(override: str) -> bool:
    """Could this override bring in hydra.mode? hydra.* overrides may; a group file of ours may only if its text
    mentions a mode (none do); a file we cannot see (a user's search path) may."""
    m = _MODE_SOURCES.match(override)
    if not m:
        return False
    group = m.group(1)
    if group == "hydra":
        return True
    from pathlib import Path

    value = override.split("=", 1)[1] if "=" in override else ""
    conf = Path(__file__).resolve().parents[1] / "conf" / group
    for name in filter(None, re.split(r"[,\s]+", value)):
        path = conf / f"{name.strip()}.yaml"
        if not path.is_file() or re.search(r"^\s*mode\s*:", path.read_text(encoding="utf-8"), re.M):
            return True
    return False


def _mode_probe(probe):
    """Hydra composes the whole config once only to read hydra.mode (Hydra.get_mode), then again to run: two
    compositions of our ~60 files, about 0.45 s each, before any refusal can be printed. None of our config files
    sets hydra.mode, so unless an override could bring one in (hydra.*, or a sweep/hparams_search/experiment file
    that mentions a mode or is not in conf/), the answer is already known: None, i.e. RUN for `python train.py`,
    MULTIRUN for `-m`. Otherwise Hydra probes (finetune/compat/hydra.py installs this in its place)."""

    def mode_without_probe(self, config_name, overrides):
        if any(_may_set_mode(o) for o in overrides):
            return probe(self, config_name, overrides)
        return None

    return mode_without_probe


# ------------------------------------------------------------------------------------------ finetune command


def build_parser():
    """The `finetune` command's arguments: one subcommand each."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="finetune", description="finetune helper commands (training itself: python train.py ...)"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("summarize", help="rebuild a sweep's summary (table, CSV, Markdown, plots)")
    p.add_argument("folder")
    p = sub.add_parser("reproduce", help="replay a run's recorded overrides into a new folder and compare")
    p.add_argument("run_dir", help="a run folder, or the MLflow run id of a run logged with report_to=mlflow")
    p.add_argument(
        "--tracking-uri",
        help="where to look the MLflow run id up (default: $MLFLOW_TRACKING_URI, else the local store outputs/mlflow)",
    )
    p.add_argument("--allow-different", action="store_true", help="run even if code or versions differ")
    p.add_argument("--output-dir", help="the new run folder (default: outputs/runs/<date>/<time>-reproduce-<name>)")
    p = sub.add_parser("keys", help="every key you can type, with its type, default, allowed values and help")
    p.add_argument("group", nargs="?", help="root, tracking, backend, model, method, hardware, data or launcher")
    sub.add_parser("setup-collie", help="create Collie's own virtual environment (.venv-collie)")
    sub.add_parser(
        "setup-llamacpp",
        help="create llama.cpp's own environment (.venv-llamacpp: its converters, quantizer and llama-cpp-python)",
    )
    p = sub.add_parser(
        "export",
        help="write a run (its merged model, or base + adapter), a sweep's best job or a model folder as a GGUF "
        "file for llama.cpp / Ollama, with the run's prompt as its chat template, a Modelfile and a README",
    )
    p.add_argument(
        "run", metavar="run-or-model", help="a run folder, a sweep folder (its best job), a model or adapter folder"
    )
    p.add_argument(
        "--to",
        required=True,
        help="gguf: the model as one GGUF file; gguf-lora: the adapter as a llama.cpp LoRA GGUF plus the base model",
    )
    p.add_argument(
        "--type",
        help="f16 (default), bf16, q8_0 or q4_k_m (quantised by llama.cpp's quantiser); gguf-lora: f16, bf16, q8_0",
    )
    p.add_argument(
        "--out",
        help="a new (or empty) folder; default <run>/gguf (gguf-lora: <run>/gguf-lora; a model folder: "
        "outputs/exports/<name>-gguf)",
    )
    p = sub.add_parser(
        "mlflow-server",
        help="a local MLflow tracking server and UI on outputs/mlflow "
        "(start: in the background; url: its address; stop)",
    )
    p.add_argument("action", choices=("start", "stop", "status", "url"))
    p.add_argument("--port", type=int, help="default 5000, or a free port when 5000 is taken; 0: a free port")
    p = sub.add_parser(
        "generate",
        help="answer prompts with a trained run (its merged model, or base + adapter), "
        "a model folder, an adapter folder, or a .gguf file / export folder (through llama.cpp, with the file's own "
        "chat template); prompts built as the run trained",
    )
    p.add_argument("run", metavar="run-or-model")
    p.add_argument("--prompt", help="the instruction (one prompt; the answer is streamed)")
    p.add_argument("--input", help="the input that goes with --prompt (alpaca rows have instruction + input)")
    p.add_argument("--data", help="a file of alpaca or chat rows: each answered, beside its reference")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's max_new_tokens, else 128")
    p = sub.add_parser(
        "chat",
        help="chat in the terminal with a trained run, a model, an adapter or a .gguf file / export folder "
        "(streamed answers, history kept; /reset, /exit)",
    )
    p.add_argument("run", metavar="run-or-model")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's max_new_tokens, else 128")
    p.add_argument("--system", help="a system message (chat templates that have one)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.cmd == "keys":
            from finetune.config.keys import GROUPS, render

            if args.group and args.group not in GROUPS:
                raise ConfigError("group", args.group, one_of(GROUPS), suggest(args.group, GROUPS))
            print(render(args.group))
            return 0
        if args.cmd == "summarize":
            from finetune.report.summary import summarize

            summarize(args.folder, echo=True)
            return 0
        if args.cmd == "reproduce":
            from finetune.report.reproduce import find_run, reproduce

            run_dir = find_run(args.run_dir, args.tracking_uri)
            return reproduce(run_dir, allow_different=args.allow_different, out_dir=args.output_dir)
        if args.cmd == "mlflow-server":
            from finetune.tracking.server import main as server

            return server(args.action, args.port)
        if args.cmd == "generate":
            from finetune.generate import generate_command

            return generate_command(args.run, args.prompt, args.input, args.data, args.max_new_tokens)
        if args.cmd == "chat":
            from finetune.generate import chat_command

            return chat_command(args.run, args.max_new_tokens, args.system)
        if args.cmd == "export":
            from finetune.export import export_command

            return export_command(args.run, args.to, args.type, args.out)
        if args.cmd == "setup-llamacpp":
            import subprocess

            from finetune.export import SETUP

            return subprocess.call(["bash", str(SETUP)])
        if args.cmd == "setup-collie":
            import subprocess
            from pathlib import Path

            script = Path(__file__).resolve().parents[1] / "scripts" / "setup_collie_env.sh"
            return subprocess.call(["bash", str(script)])
    except ConfigError as e:
        _die(str(e), 2)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("finetune."):
            _die(f"'finetune {args.cmd}' is not available in this version", 2)
        raise
    return 0
