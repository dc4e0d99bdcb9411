"""Imports run one way. Every `import` of a finetune module, including those inside functions, goes from a layer to
the same or a lower one, and no two modules import each other (directly or round a loop). In-process, no runs.

The layers, bottom to top (a module takes the layer of its most specific entry):
  0  leaves: errors, file names, OS helpers, secrets, other libraries' internals (compat), the declared interfaces,
     plans, data files, history.jsonl, machine probes, tool environments, the preloaded process (stdlib only)
  1  config: schemas, resolvers, paths, derived values, validation of the config's own rules, facts of the models
     the project builds (config/model_builds.py)
  2  what config describes, read from the world: run folders, data checks and caches, data sources, model builders
     (tools), hardware resolution (auto)
  3  the workers (recipes) and what runs models outside training: generate, the GGUF runner, the export
  4  reports and tracking
  5  backends, launchers, and validation with everything it needs (checks.py)
  6  the driver: run, Hydra callbacks, the command line
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    [
        "finetune.errors",
        "finetune.run_files",
        "finetune.osutil",
        "finetune.secrets",
        "finetune.compat",
        "finetune.interfaces",
        "finetune.plan",
        "finetune.datafiles",
        "finetune.lfdata",
        "finetune.history",
        "finetune.machine",
        "finetune.tool_envs",
        "finetune.launchers.zygote",
    ],
    ["finetune.config"],
    [
        "finetune.run_dir",
        "finetune.data_cache",
        "finetune.data_check",
        "finetune.sources",
        "finetune.tools",
        "finetune.auto",
    ],
    ["finetune.recipes", "finetune.generate", "finetune.gguf_runner", "finetune.export"],
    ["finetune.report", "finetune.tracking"],
    ["finetune.backends", "finetune.launchers", "finetune.checks"],
    ["finetune.run", "finetune.callbacks", "finetune.cli", "finetune"],
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict:
    out = {}
    for path in sorted((REPO / "finetune").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _target(name: str, modules: dict) -> str:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _graph() -> dict:
    modules = _modules()
    graph = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "finetune":
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "finetune"]
            for t in targets:
                t = _target(t, modules)
                if t and t != name and not name.startswith(t + "."):  # a module's own package __init__ is not an edge
                    graph[name].add(t)
    return graph


def level(module: str) -> int:
    name = module
    while name not in LEVEL:
        assert "." in name, f"{module} has no layer in tests/test_imports.py LAYERS"
        name = name.rpartition(".")[0]
    return LEVEL[name]


def test_every_import_goes_down_or_across():
    upward = [
        f"{a} (layer {level(a)}) imports {b} (layer {level(b)})"
        for a, targets in sorted(_graph().items())
        for b in sorted(targets)
        if level(b) > level(a)
    ]
    assert not upward, "imports that go up:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_walk_sees_imports_inside_functions():
    graph = _graph()
    assert "finetune.auto.hardware" in graph["finetune.checks"]  # imported inside validate()
    assert "finetune.config.schema" in graph["finetune.config.validate"]
