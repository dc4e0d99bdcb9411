"""OmegaConf resolvers usable in any config value.

- ``${eval:2*lora_r}``      arithmetic on numbers and config keys (pairs lora_alpha to lora_r in sweeps):
                             ``python train.py -m lora_r=4,8,16 'lora_alpha=${eval:2*lora_r}'``. Names are
                             top-level or dotted keys (``method.lora_r``). In YAML files the nested form
                             ``${eval:2*${lora_r}}`` works too (Hydra's command-line grammar refuses nested
                             interpolations unless quoted again, hence the plain-name form). Only numbers, names and
                             + - * / // % ** ( ) are accepted: parsed with ``ast``, never ``eval``'d.
- ``${repo_root:}``          the folder holding conf/ (so shipped data paths work from any working folder).
- ``${pkg_path:NAME}``       the folder of an installed Python package, found without importing it.
- ``${gguf_model_dir:FILE}`` where ``model=gguf`` converts FILE to (models/gguf/<stem>-<key>;
                             finetune/tools/gguf_model.py).
- ``${metric_direction:NAME}`` maximize for a score (exact match, F1, ROUGE, accuracy, margin, recall, MRR), else
                             minimize (a loss): the Optuna searches' direction follows ``metric=``.
- ``${hardware_job:WHAT}``   what one node of the hardware group asks of a launcher: ``nproc`` (processes per node:
                             one per GPU on CUDA hardware, else 1), ``gpus`` (GPUs per node), ``cpus`` and ``mem_gb``
                             (a GPU node's cores and 90% of its memory, where the hardware option names them; else
                             the launcher's small CPU-job defaults). The launcher files default to these, so
                             ``hardware=a100_80g_x8`` means 8 processes on 8 GPUs unless you type otherwise; they
                             resolve after validation has detected ``hardware=auto``.
"""

from __future__ import annotations

import ast
import importlib.util
import operator
from pathlib import Path

from omegaconf import OmegaConf

from finetune.config.root import REPO_ROOT  # noqa: E402 - imported from here by many modules

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def safe_eval(expr: str, lookup=None):
    """Evaluate an arithmetic expression of numbers (and names, through ``lookup``). ValueError otherwise."""

    def name_of(node):
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return f"{name_of(node.value)}.{node.attr}"
        raise ValueError("not a name")

    def ev(node):
        if isinstance(node, (ast.Name, ast.Attribute)) and lookup is not None:
            key = name_of(node)
            value = lookup(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{key} is {value!r}, not a number")
            return value
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"only numbers and + - * / // % ** are allowed, got {ast.dump(node)[:40]}")

    try:
        value = ev(ast.parse(str(expr), mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from e
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


def _pkg_path(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return f"<package {name} is not installed>"
    return str(Path(list(spec.submodule_search_locations)[0]))


MAXIMISED = ("exact_match", "f1", "rouge", "accuracy", "accuracies", "recall", "mrr", "ndcg", "gain", "margin")


def metric_direction(name) -> str:
    """ "maximize" for metrics where higher is better (scores), "minimize" for losses and anything else."""
    n = str(name).lower()
    return "maximize" if any(k in n for k in MAXIMISED) and "loss" not in n else "minimize"


def _gguf_model_dir(path) -> str:
    from finetune.config.paths import gguf_model_dir

    return gguf_model_dir(str(path)) if path not in (None, "") else "<model.gguf_file is not set>"


def _eval_resolver(expr, _root_):
    def lookup(key):
        from omegaconf import OmegaConf as OC

        value = OC.select(_root_, key, default=None)
        if value is None:
            raise ValueError(f"${{eval:{expr}}}: no config key {key!r}")
        return value

    return safe_eval(str(expr), lookup)


# what a launcher asks for a CPU job when the hardware group does not say (Slurm/k8s: small CPU jobs)
CPU_JOB = {"cpus": 2, "mem_gb": 4}


def hardware_job(what: str, hw) -> float:
    """See the module docstring (``${hardware_job:WHAT}``); ``hw`` is the composed hardware node."""
    cuda = str(hw.device) == "cuda"
    gpus = int(hw.gpus_per_node or 0) if cuda else 0
    if what == "nproc":
        return gpus if gpus > 0 else 1
    if what == "gpus":
        return gpus
    if what == "cpus":
        return int(hw.cpus) if cuda and hw.cpus else CPU_JOB["cpus"]
    if what == "mem_gb":
        return int(0.9 * float(hw.memory_gb)) if cuda and hw.memory_gb else CPU_JOB["mem_gb"]  # whole GB (sbatch)
    raise ValueError(f"${{hardware_job:{what}}}: one of nproc, gpus, cpus, mem_gb")


def register() -> None:
    for name, fn in (
        ("eval", _eval_resolver),
        ("repo_root", lambda: str(REPO_ROOT)),
        ("pkg_path", _pkg_path),
        ("gguf_model_dir", _gguf_model_dir),
        ("metric_direction", metric_direction),
        ("hardware_job", lambda what, _root_: hardware_job(str(what), _root_.hardware)),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
