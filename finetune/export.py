"""Ship the model: ``finetune export`` writes a trained run (or a model folder) as a GGUF file for llama.cpp and
Ollama, with the prompt format it was trained with, converted and quantised by llama.cpp's own tools.

    finetune export <run | sweep | model folder> --to gguf [--type f16|bf16|q8_0|q4_k_m] [--out FOLDER]
    finetune export <run | adapter folder> --to gguf-lora [--type f16|bf16|q8_0] [--out FOLDER]
    python train.py ... export=gguf export_type=q8_0          (the same, as the run's last step; a sweep: every job)

What is exported: a run's merged model, else its base model with its adapter merged on the fly, else the model a
full fine-tuning saved; a sweep folder's best job (its summary.json); a model folder; for gguf-lora the run's
adapter (or an adapter folder) and its base model. Refused in one line, before anything heavy is imported: what
llama.cpp cannot take (an embedding model, Collie's own layouts), a type a target cannot have, an output folder
that is not new or empty.

The work is done by the step ``python -m finetune.recipes.export_gguf`` (this environment: the merge, the chat
template, the Modelfile) which runs llama.cpp's converters and quantizer in llama.cpp's own environment
(.venv-llamacpp, scripts/setup_llamacpp_env.sh, pinned in requirements-llamacpp.lock). When that environment is
missing or outdated, a ``setup_llamacpp`` step builds it first, its progress shown. Standard library only at
import.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from finetune.errors import ConfigError, one_of, suggest
from finetune.plan import Step
from finetune.run_files import MANIFEST, RESOLVED_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK = REPO_ROOT / "requirements-llamacpp.lock"
SETUP = REPO_ROOT / "scripts" / "setup_llamacpp_env.sh"
SETUP_CMD = "bash scripts/setup_llamacpp_env.sh (or: finetune setup-llamacpp)"
TARGETS = ("gguf", "gguf-lora")
TYPES = ("f16", "bf16", "q8_0", "q4_k_m")
LORA_TYPES = ("f16", "bf16", "q8_0")  # convert_lora_to_gguf.py's types; llama.cpp's quantiser does not take adapters
DEFAULT_TYPE = "f16"
FOLDER = {"gguf": "gguf", "gguf-lora": "gguf-lora"}  # <run>/<folder>: where a run's export goes
INFO = "export.json"  # what an export folder records (files, types, sizes, times, the prompt, the tools)
COLLIE_RAW_ADAPTER = "collie_adapter"  # <run>/collie_adapter: Collie's save_peft output (finetune/recipes/collie.py)
LOCAL_TOKENIZERS = ("tiny_llama", "tiny_llama_30m")  # model builders whose tokenizer is trained here
EMBEDDING_ARCHS = ("Bert", "Roberta", "XLMRoberta", "Electra", "DistilBert", "MPNet", "NomicBert", "JinaBert")


# ------------------------------------------------------------------------------------------- llama.cpp's environment


def venv_dir() -> Path:
    p = Path(os.environ.get("FINETUNE_LLAMACPP_VENV") or REPO_ROOT / ".venv-llamacpp").expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def venv_python() -> Path:
    return venv_dir().resolve() / "bin" / "python"


def venv_ready() -> bool:
    """Does llama.cpp's environment exist, complete and matching requirements-llamacpp.lock?"""
    stamp = venv_dir() / ".finetune-lock.sha256"
    return (
        venv_python().exists()
        and stamp.is_file()
        and stamp.read_text().strip() == hashlib.sha256(LOCK.read_bytes()).hexdigest()
    )


def setup_step() -> Step:
    return Step(name="setup_llamacpp", argv=["bash", str(SETUP)], env={"FINETUNE_LLAMACPP_VENV": str(venv_dir())})


def check_venv(key: str, value) -> None:
    """A missing environment is built by the setup_llamacpp step; refused only when it cannot be built here."""
    if venv_ready():
        return
    from finetune.tool_envs import cannot_build_env

    why = cannot_build_env()
    if why:
        raise ConfigError(
            key,
            value,
            f"llama.cpp's environment is missing and cannot be built here: {why}; build it where "
            f"it can be: {SETUP_CMD}",
        )


# ------------------------------------------------------------------------------------------- what is exported


@dataclass
class Source:
    model: Optional[str]  # the Hugging Face model folder to convert (merged, saved, or the base of an adapter)
    adapter: Optional[str]  # a LoRA adapter: merged into `model` on the fly (gguf), or converted alone (gguf-lora)
    run_dir: Optional[str]  # the run it came from (its resolved config: the prompt format)
    name: str  # file names: <name>-<type>.gguf
    what: str  # for the user


def _has(folder, name: str) -> bool:
    return bool(folder) and (Path(str(folder)) / name).is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _refuse_layout(folder: Path, key: str) -> None:
    """What llama.cpp's converters cannot take, said in one line with what to use instead."""
    if _has(folder, "trainer_state_dict.json") and "tp_size" in _read_json(folder / "trainer_state_dict.json"):
        raise ConfigError(
            key,
            str(folder),
            "is a Collie checkpoint (Collie's own sharded layout), which llama.cpp's converter "
            "cannot read; export the run folder instead (its lazyllm_merge / lazyllm_lora are in Hugging Face "
            "layout)",
        )
    if folder.name == COLLIE_RAW_ADAPTER and _has(folder.parent, "collie_summary.json"):
        raise ConfigError(
            key,
            str(folder),
            "is Collie's own adapter layout (q/k rows permuted as Collie stores them), which "
            f"would give wrong weights; export the run folder {folder.parent} (its adapter in Hugging Face layout)",
        )
    meta = _read_json(folder / "config.json")
    archs = [str(a) for a in meta.get("architectures") or []]
    if (
        _has(folder, "modules.json")
        or any(a.startswith(EMBEDDING_ARCHS) for a in archs)
        or (meta.get("model_type") in ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet"))
    ):
        raise ConfigError(
            key,
            str(folder),
            f"is an embedding model ({', '.join(archs) or meta.get('model_type')}); GGUF export is for "
            "causal language models: use the folder itself with sentence-transformers or FlagEmbedding",
        )


def _best_job(folder: Path, key: str) -> Path:
    summary = _read_json(folder / "summary.json")
    best = summary.get("best_job")
    if not best:
        raise ConfigError(
            key, str(folder), "is a sweep folder whose summary.json names no best job (did a job complete?)"
        )
    job = folder / str(best)
    if not job.is_dir():
        raise ConfigError(key, str(folder), f"its summary's best job {best!r} is not a folder in it")
    return job


def tokenizer_trained_here(model: str) -> str:
    """Why a model of ours built on first use cannot go to GGUF (`export=` and `finetune export` of its run)."""
    return (
        f"model {model}'s tokenizer was trained here (finetune/tools/tiny_models.py), and llama.cpp's converter "
        "knows the tokenizers of published models only (by their pre-tokenizer): export a run of "
        "model=smollm2_135m, model=gguf or your own model"
    )


def resolve(path: str, to: str, key: str = "run") -> Source:
    """A run, a sweep (its best job), a model folder or an adapter folder -> what to export. ConfigError else."""
    folder = Path(path).expanduser().absolute()
    if _has(folder, "summary.json") and not _has(folder, RESOLVED_CONFIG):
        folder = _best_job(folder, key)
    if _has(folder, RESOLVED_CONFIG):
        cfg = _read_json(folder / RESOLVED_CONFIG)
        if (cfg.get("backend") or {}).get("name") == "flagembedding" or (cfg.get("model") or {}).get(
            "kind"
        ) == "encoder":
            raise ConfigError(
                key,
                str(folder),
                "is a run that trained an embedding model (backend flagembedding); GGUF export is "
                "for causal language models: use its model folder with sentence-transformers or FlagEmbedding",
            )
        if (cfg.get("backend") or {}).get("name") == "llamafactory" and (cfg.get("backend") or {}).get("stage") == "rm":
            raise ConfigError(
                key,
                str(folder),
                "is a reward model (LLaMA-Factory stage rm, a value head); GGUF export is for causal language models",
            )
        if (cfg.get("model") or {}).get("builder") in LOCAL_TOKENIZERS:  # refused before llama.cpp is built
            raise ConfigError(key, str(folder), tokenizer_trained_here(cfg["model"].get("name")))
        outputs = _read_json(folder / MANIFEST).get("outputs") or {}
        name = str(cfg.get("name") or folder.name)
        adapter = outputs.get("adapter")
        if (cfg.get("method") or {}).get("pissa_init") and _has(
            Path(str(adapter)) / "pissa_converted", "adapter_config.json"
        ):
            adapter = str(Path(str(adapter)) / "pissa_converted")
        base = str((cfg.get("model") or {}).get("path"))
        if to == "gguf-lora":
            if not _has(adapter, "adapter_config.json"):
                raise ConfigError(
                    key,
                    str(folder),
                    "holds no LoRA adapter (a LoRA-method run that completed), so there is nothing for "
                    "--to gguf-lora; use --to gguf",
                )
            return Source(base, str(adapter), str(folder), name, f"the adapter {adapter} (base {base})")
        if _has(outputs.get("merged"), "config.json"):
            return Source(str(outputs["merged"]), None, str(folder), name, f"the merged model {outputs['merged']}")
        if _has(adapter, "adapter_config.json"):
            return Source(base, str(adapter), str(folder), name, f"{base} with the adapter {adapter} (merged now)")
        if _has(outputs.get("model"), "config.json"):
            return Source(str(outputs["model"]), None, str(folder), name, f"the trained model {outputs['model']}")
        raise ConfigError(key, str(folder), "this run folder holds no trained model yet (did the run complete?)")
    _refuse_layout(folder, key)
    if _has(folder, "adapter_config.json"):
        meta = _read_json(folder / "adapter_config.json")
        base = meta.get("base_model_name_or_path")
        if not _has(base, "config.json"):
            raise ConfigError(key, str(folder), f"the adapter's base model {base!r} is not a model folder here")
        _refuse_layout(Path(str(base)), key)
        what = (
            f"the adapter {folder} (base {base})"
            if to == "gguf-lora"
            else f"{base} with the adapter {folder} (merged now)"
        )
        return Source(str(base), str(folder), None, folder.name, what)
    if to == "gguf-lora":
        raise ConfigError(
            key,
            str(folder),
            "is not a run folder or an adapter folder (adapter_config.json): --to gguf-lora converts an adapter",
        )
    if _has(folder, "config.json"):
        return Source(str(folder), None, None, folder.name, f"the model {folder}")
    raise ConfigError(
        key,
        str(folder),
        "not a run folder (resolved_config.json), a sweep folder (summary.json), a model "
        "folder (config.json) or an adapter folder (adapter_config.json)",
    )


def check_choice(to: Optional[str], type_: Optional[str], to_key: str = "to", type_key: str = "type") -> str:
    """The target and type, checked together; returns the type (default f16)."""
    if to not in TARGETS:
        raise ConfigError(to_key, to, one_of(TARGETS), suggest(to, TARGETS))
    type_ = type_ or DEFAULT_TYPE
    if type_ not in TYPES:
        raise ConfigError(type_key, type_, one_of(TYPES), suggest(type_, TYPES))
    if to == "gguf-lora" and type_ not in LORA_TYPES:
        raise ConfigError(
            type_key, type_, f"a LoRA GGUF is {one_of(LORA_TYPES)} (llama.cpp's quantizer does not take adapters)"
        )
    return type_


def default_out(source: Source, to: str) -> Path:
    """<run>/gguf (or gguf-lora); for a folder that is not a run: outputs/exports/<name>-<to>."""
    if source.run_dir:
        return Path(source.run_dir) / FOLDER[to]
    return REPO_ROOT / "outputs" / "exports" / f"{source.name}-{FOLDER[to]}"


def check_out(out: Path, key: str = "out") -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            key,
            str(out),
            "exists and is not empty; an export never writes into a folder it did not make: choose another --out",
        )


def export_step(target: str, to: str, type_: str, out: Path, step_name: str = "export") -> Step:
    return Step(
        name=step_name,
        argv=[
            sys.executable,
            "-m",
            "finetune.recipes.export_gguf",
            str(target),
            "--to",
            to,
            "--type",
            type_,
            "--out",
            str(out),
        ],
        env={"FINETUNE_LLAMACPP_VENV": str(venv_dir())},
        preload=["gguf"],  # the metadata check; torch, transformers and PEFT are preloaded for every step
    )


# ------------------------------------------------------------------------------------------- as a run's last step


def check_config(cfg) -> None:
    """export= / export_type= of a run (called by validation, before anything is written)."""
    export, type_ = cfg.get("export"), cfg.get("export_type")
    if export is None:
        return
    check_choice(export, type_, "export", "export_type")
    if cfg.model.kind != "causal_lm" or cfg.backend.name == "flagembedding":
        raise ConfigError(
            "export",
            export,
            f"model {cfg.model.name} is an embedding model (backend {cfg.backend.name}); GGUF "
            "export is for causal language models: use the saved model folder with sentence-transformers or "
            "FlagEmbedding",
        )
    if cfg.backend.name == "llamafactory" and cfg.backend.get("stage") == "rm":
        raise ConfigError(
            "export", export, "a reward model (backend.stage=rm, a value head) is not a causal language model"
        )
    if cfg.model.get("builder") in LOCAL_TOKENIZERS:
        raise ConfigError("export", export, tokenizer_trained_here(cfg.model.name))
    if export == "gguf-lora" and not cfg.method.uses_lora:
        raise ConfigError("export", export, f"method {cfg.method.name} trains no LoRA adapter; use export=gguf")
    check_venv("export", export)


def run_steps(cfg, run_dir: Path) -> List[Step]:
    """The steps a run appends for export=gguf|gguf-lora: the environment (when missing), then the export."""
    if not cfg.get("export"):
        return []
    steps = [] if venv_ready() else [setup_step()]
    to = str(cfg.export)
    out = Path(run_dir) / FOLDER[to]
    return steps + [
        export_step(str(run_dir), to, str(cfg.export_type or DEFAULT_TYPE), out, "export_" + to.replace("-", "_"))
    ]


def run_note(cfg, run_dir: Path) -> List[str]:
    if not cfg.get("export"):
        return []
    to = str(cfg.export)
    return [
        f"export={to}: {FOLDER[to]}/ gets the "
        + ("adapter as a llama.cpp LoRA GGUF and the base model" if to == "gguf-lora" else "model")
        + f" "
        f"as {cfg.export_type or DEFAULT_TYPE} GGUF (llama.cpp's converter"
        + (" and quantizer" if str(cfg.export_type) in ("q8_0", "q4_k_m") else "")
        + "), with the run's prompt as its chat template, an Ollama Modelfile and a README"
        + ("" if venv_ready() else "; llama.cpp's environment is built first (setup_llamacpp, once per machine)")
    ]


# ------------------------------------------------------------------------------------------- finetune export


def export_command(path: str, to: str, type_: Optional[str], out: Optional[str]) -> int:
    """Check everything, then run the steps (environment, export) with their output on the terminal."""
    type_ = check_choice(to, type_)
    source = resolve(path, to)
    dest = Path(out).expanduser().absolute() if out else default_out(source, to)
    check_out(dest, "out")
    check_venv("run", path)
    print(f"[finetune export] {source.what} -> {dest} ({to}, {type_})", flush=True)
    steps = ([] if venv_ready() else [setup_step()]) + [export_step(path, to, type_, dest)]
    import subprocess

    for step in steps:
        env = {**os.environ, **step.env}
        env.pop("PYTHONPATH", None) if step.name == "setup_llamacpp" else None
        code = subprocess.call(step.argv, env=env)
        if code != 0:
            print(f"export failed: step {step.name} exited with {code}", file=sys.stderr, flush=True)
            return 1
    return 0
