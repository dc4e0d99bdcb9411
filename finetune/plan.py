"""What a backend asks to be run: a Plan of files to write and Steps to execute. Standard library only.

A backend builds the Plan (finetune/backends/<name>.py: plan()); a launcher runs its steps (finetune/launchers/);
the run folder (finetune/run_dir.py) records both in the manifest. A dry run prints it and writes nothing.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from finetune.run_files import CONFIG_YAML, MANIFEST


@dataclass
class Step:
    """One process to run. ``argv`` is the single-process command; never passed through a shell.

    distributed:
      "none"      always one process
      "torchrun"  the launcher may run it as N ranks: argv[0] must be a Python interpreter and argv[1:] its
                  arguments (``-m module ...``); the launcher inserts ``-m torch.distributed.run <rdzv args>``
      "env"       the command starts its own ranks; the launcher passes NNODES, NODE_RANK, NPROC_PER_NODE,
                  MASTER_ADDR, MASTER_PORT in the environment (llamafactory-cli with FORCE_TORCHRUN=1)
    """

    name: str
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    cwd: Optional[str] = None
    log: str = ""  # log file, relative to the run folder (default logs/<name>.log)
    distributed: str = "none"
    rank0_only: bool = False  # in a multi-node run, only node_rank 0 runs this step
    optional: bool = False  # a failure is recorded but does not fail the run
    progress: str = ""  # JSONL the step appends to as it trains (step, total_steps, loss, tokens/s),
    # relative to the run folder or absolute: a live progress line on a terminal
    pausable: bool = False  # the first Ctrl-C asks it to save a checkpoint and stop (FINETUNE_PAUSE_FILE), not to die
    # None: a light step (a fresh interpreter starts faster than the preloaded one imports). A list: the step
    # imports torch, transformers and PEFT, and these modules too ('module' or 'module:Attr,Attr'): it is forked
    # from the process that imported them once (finetune/launchers/zygote.py)
    preload: Optional[List[str]] = None

    def __post_init__(self):
        if not self.log:
            self.log = f"logs/{self.name}.log"
        if self.distributed not in ("none", "torchrun", "env"):
            raise ValueError(f"Step.distributed={self.distributed!r}")
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise ValueError(f"Step {self.name}: argv must be a non-empty list of strings, got {self.argv!r}")


@dataclass
class Plan:
    backend: str
    steps: List[Step] = field(default_factory=list)
    files: Dict[str, str] = field(default_factory=dict)  # run-relative path -> text written before the steps
    outputs: Dict[str, str] = field(default_factory=dict)  # what the run produces: adapter, merged, ...
    notes: List[str] = field(default_factory=list)  # decisions worth showing (auto backend, traps avoided)

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self, run_dir: str, launcher_argv=None, launcher_env=None) -> str:
        """Human-readable plan for dry runs (secrets shown as <redacted>)."""
        from finetune.secrets import redact

        lines = [f"backend: {self.backend}", f"run folder: {run_dir}"]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        lines.append("files the run writes (not in a dry run):")
        lines += [f"  {run_dir}/{p}" for p in [MANIFEST, CONFIG_YAML, *self.files]]
        for k, v in self.outputs.items():
            lines.append(f"  {k}: {v}")
        lines.append("steps:")
        for i, s in enumerate(self.steps, 1):
            argv = redact(launcher_argv(s) if launcher_argv else s.argv)
            lines.append(f"  {i}. {s.name}  (log: {run_dir}/{s.log}; distributed: {s.distributed})")
            lines.append(f"     argv: {json.dumps(argv)}")
            lines.append(f"     shell: {shlex.join(argv)}")
            env = launcher_env(s) if launcher_env else s.env  # what the launcher really adds (GPUs, ranks, ...)
            if env:
                lines.append(f"     env: {json.dumps(redact(env), sort_keys=True)}")
            if s.cwd:
                lines.append(f"     cwd: {s.cwd}")
        for path, text in self.files.items():
            lines.append(f"--- {path}")
            lines.append(redact(text).rstrip())
        return "\n".join(lines)
