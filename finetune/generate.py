r"""Use what was trained: ``finetune generate`` and ``finetune chat`` (the `finetune` command, finetune/cli.py).

    finetune generate <run-or-model> --prompt "Reverse the words." [--input "red rice"] [--max-new-tokens N]
    finetune generate <run-or-model> --data rows.json        (alpaca or chat rows; each answer beside its reference)
    finetune chat <run-or-model>                             (streamed answers, history; /reset, /exit; a line
                                                              ending with \ goes on on the next one)

<run-or-model> is a .gguf file or a folder ``finetune export`` wrote (export.json): it answers through llama.cpp
(llama-cpp-python, in llama.cpp's own environment: finetune/gguf_runner.py) with the chat template the file
carries; else a run folder (its merged model, or the base model with its adapter when it was not merged, or the
model a full fine-tuning saved; prompts are built the way that run trained: finetune/recipes/prompting.py), a model
folder (config.json: its finetune_prompt.json when one of our runs saved it, else its tokenizer's chat template) or
an adapter folder (adapter_config.json, on the base model it names). Greedy decoding, as in the evaluation by
generation, so the same prompt gives the same answer.

What is resolved here (the folder, the files to load) is checked before torch is imported: a wrong path is one
line on stderr, exit 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from finetune.errors import ConfigError
from finetune.run_files import MANIFEST, RESOLVED_CONFIG

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class Target:
    model: str  # model folder to load
    adapter: Optional[str]  # LoRA adapter to put on it
    run_config: Optional[dict]  # the run's resolved config (prompt format, max_new_tokens)
    what: str  # for the user: which folder is answering

    def prompt_format(self, tokenizer):
        from finetune.recipes.prompting import PromptFormat

        if self.run_config is not None:
            return PromptFormat.from_run_config(self.run_config)
        return PromptFormat.for_folder(self.adapter or self.model, tokenizer)


def _has(folder, name: str) -> bool:
    return bool(folder) and (Path(str(folder)) / name).is_file()


def resolve(path: str, key: str = "run") -> Target:
    """A run folder, a model folder or an adapter folder -> what to load. ConfigError otherwise."""
    folder = Path(path).expanduser().absolute()
    if _has(folder, RESOLVED_CONFIG):
        from finetune.recipes.common import read_config

        cfg = read_config(str(folder / RESOLVED_CONFIG))
        try:
            outputs = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("outputs") or {}
        except (OSError, ValueError):
            outputs = {}
        base = str(cfg["model"]["path"])
        if _has(outputs.get("merged"), "config.json"):
            return Target(outputs["merged"], None, cfg, f"the merged model {outputs['merged']}")
        adapter = outputs.get("adapter")
        if cfg["method"].get("pissa_init") and _has(Path(str(adapter)) / "pissa_converted", "adapter_config.json"):
            adapter = str(Path(str(adapter)) / "pissa_converted")
        if _has(adapter, "adapter_config.json"):
            return Target(base, str(adapter), cfg, f"{base} with the adapter {adapter}")
        if _has(outputs.get("model"), "config.json"):
            return Target(outputs["model"], None, cfg, f"the trained model {outputs['model']}")
        raise ConfigError(
            key,
            str(folder),
            "this run folder holds no trained model yet (no merged model, adapter or "
            "saved model: did the run complete?)",
        )
    if _has(folder, "adapter_config.json"):
        meta = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        base = meta.get("base_model_name_or_path")
        if not _has(base, "config.json"):
            raise ConfigError(key, str(folder), f"the adapter's base model {base!r} is not a model folder here")
        return Target(str(base), str(folder), None, f"{base} with the adapter {folder}")
    if _has(folder, "config.json"):
        return Target(str(folder), None, None, f"the model {folder}")
    raise ConfigError(
        key,
        str(folder),
        "not a run folder (resolved_config.json), a model folder (config.json) or "
        "an adapter folder (adapter_config.json)",
    )


def _load(target: Target):
    from finetune.recipes.gen_eval import load_model

    trust = bool((target.run_config or {}).get("trust_remote_code"))
    model, tokenizer = load_model(target.model, target.adapter, trust)
    return model, tokenizer, target.prompt_format(tokenizer)


def _max_new(target: Target, given: Optional[int]) -> int:
    if given:
        return int(given)
    return int((target.run_config or {}).get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)


def _open(path: str, max_new_tokens: Optional[int]):
    """What generate and chat answer with: (target, model, tokenizer, prompt format, new-token limit). A bad
    --max-new-tokens or path is refused before the model loads."""
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise ConfigError("max-new-tokens", max_new_tokens, "must be > 0")
    target = resolve(path)
    model, tokenizer, fmt = _load(target)
    return target, model, tokenizer, fmt, _max_new(target, max_new_tokens)


def gguf_target(path: str, key: str = "run") -> Optional[dict]:
    """A .gguf file or an export folder -> {model, lora, max_new_tokens}; None for anything else."""
    from finetune.export import INFO

    p = Path(path).expanduser().absolute()
    folder = p if p.is_dir() else p.parent
    info = {}
    if (folder / INFO).is_file():
        info = json.loads((folder / INFO).read_text(encoding="utf-8"))
    if p.is_dir():
        if not info:
            return None
        files = info["files"]
        return {
            "model": str(folder / files["model"]),
            "lora": files.get("lora") and str(folder / files["lora"]),
            "max_new_tokens": info.get("max_new_tokens"),
        }
    if p.suffix != ".gguf":
        return None
    if not p.is_file():
        raise ConfigError(key, str(p), "no such file (a GGUF file, or a folder finetune export wrote)")
    files = info.get("files") or {}
    if files.get("lora") == p.name:  # the adapter: on the base model exported beside it
        return {"model": str(folder / files["model"]), "lora": str(p), "max_new_tokens": info.get("max_new_tokens")}
    return {"model": str(p), "lora": None, "max_new_tokens": info.get("max_new_tokens")}


def run_gguf(action: str, target: dict, args: List[str], max_new_tokens: Optional[int]) -> int:
    """finetune.gguf_runner in llama.cpp's environment (built first when missing, its progress shown)."""
    import os
    import subprocess

    from finetune.export import REPO_ROOT, check_venv, setup_step, venv_python, venv_ready

    if max_new_tokens is not None and max_new_tokens <= 0:
        raise ConfigError("max-new-tokens", max_new_tokens, "must be > 0")
    check_venv("run", target["model"])
    if not venv_ready():
        print(f"[finetune {action}] building llama.cpp's environment first (once per machine)", flush=True)
        step = setup_step()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if subprocess.call(step.argv, env={**env, **step.env}) != 0:
            print(f"[finetune {action}] building llama.cpp's environment failed", file=sys.stderr, flush=True)
            return 1
    limit = int(max_new_tokens or target.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    what = target["model"] + (f" with the LoRA {target['lora']}" if target.get("lora") else "")
    print(
        f"[finetune {action}] {what} through llama.cpp; greedy, at most {limit} new tokens", file=sys.stderr, flush=True
    )
    argv = [str(venv_python()), "-m", "finetune.gguf_runner", action, "--model", target["model"]]
    argv += ["--lora", target["lora"]] if target.get("lora") else []
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONNOUSERSITE": "1"}
    return subprocess.call([*argv, *args, "--max-new-tokens", str(limit)], env=env)


def generate_command(
    path: str,
    prompt: Optional[str],
    input_text: Optional[str],
    data: Optional[str],
    max_new_tokens: Optional[int],
    batch_size: int = 8,
) -> int:
    if (prompt is None) == (data is None):
        raise ConfigError("prompt", prompt, "give exactly one of --prompt TEXT or --data FILE (or use finetune chat)")
    if data is not None and not Path(data).is_file():
        raise ConfigError("data", data, "no such file (alpaca or chat rows, .json or .jsonl)")
    gguf = gguf_target(path)
    if gguf:
        extra = ["--data", str(Path(data).absolute())] if data else ["--prompt", prompt]
        return run_gguf("generate", gguf, extra + (["--input", input_text] if input_text else []), max_new_tokens)
    target, model, tokenizer, fmt, limit = _open(path, max_new_tokens)
    print(
        f"[finetune generate] {target.what}; {fmt.describe()}; greedy, at most {limit} new tokens",
        file=sys.stderr,
        flush=True,
    )
    from finetune.recipes.gen_eval import answer_of, generate

    if prompt is not None:
        from transformers import TextStreamer

        turns = [
            {
                "role": "user",
                "content": "\n".join(x for x in (prompt, input_text) if x),
                "alpaca": (prompt, input_text or None),
            }
        ]
        generate(
            model,
            tokenizer,
            [fmt.encode(tokenizer, turns)],
            limit,
            fmt.stop_ids(tokenizer),
            1,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        )
        return 0
    from finetune.recipes.data import read_rows

    rows = read_rows(data)
    pairs = [fmt.row_turns(r) for r in rows]
    answers, _ = generate(
        model, tokenizer, [fmt.encode(tokenizer, t) for t, _ in pairs], limit, fmt.stop_ids(tokenizer), batch_size
    )
    right = 0
    for i, ((turns, ref), ans) in enumerate(zip(pairs, answers), 1):
        ok = answer_of(ans, len(answer_of(ref, 10**6).splitlines())) == answer_of(ref, 10**6)
        right += ok
        shown = " | ".join(" ".join(t["content"].split()) for t in turns)
        print(
            f"[{i}] {shown}\n    -> {ans.strip()}" + (f"    ({'right' if ok else 'reference: ' + ref})" if ref else ""),
            flush=True,
        )
    if any(ref for _, ref in pairs):
        print(f"exact match: {right}/{len(rows)}", flush=True)
    return 0


HELP = (
    "/reset clears the history, /exit (or Ctrl-D) quits; end a line with \\ to go on on the next one (alpaca "
    "prompts: the first line is the instruction, the rest its input)"
)


def read_turn() -> str:
    """One turn as typed: lines ending with a backslash continue on the next line."""
    lines = [input("you> ")]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input("...> "))
    return "\n".join(lines)


def chat_loop(system: Optional[str], answer: Callable[[List[dict]], str]) -> int:
    """The conversation of `finetune chat`, for a Hugging Face model and for a .gguf (finetune/gguf_runner.py):
    turns read as typed, /reset, /exit (or Ctrl-D); ``answer(history)`` streams the model's reply after `model> `
    and returns it."""
    start: List[dict] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        try:
            line = read_turn()
        except EOFError:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(start)
            print("(history cleared)", flush=True)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text}; {HELP})", flush=True)
            continue
        history.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        history.append({"role": "assistant", "content": answer(history).strip()})


def chat_command(path: str, max_new_tokens: Optional[int], system: Optional[str] = None) -> int:
    gguf = gguf_target(path)
    if gguf:
        return run_gguf("chat", gguf, ["--system", system] if system else [], max_new_tokens)
    target, model, tokenizer, fmt, limit = _open(path, max_new_tokens)
    from transformers import TextStreamer

    from finetune.recipes.gen_eval import generate

    print(
        f"[finetune chat] {target.what}\n[finetune chat] {fmt.describe()}; greedy, at most {limit} new tokens "
        f"per answer; {HELP}",
        flush=True,
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def answer(history: List[dict]) -> str:
        answers, _ = generate(
            model, tokenizer, [fmt.encode(tokenizer, history)], limit, fmt.stop_ids(tokenizer), 1, streamer=streamer
        )
        return answers[0]

    return chat_loop(system, answer)
