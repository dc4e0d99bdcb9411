"""The export step: a run (or a model or adapter folder) -> a folder with a GGUF file that llama.cpp and Ollama run
with the prompt the run trained with (finetune export, finetune/export.py says what is exported and refuses what
cannot be).

    python -m finetune.recipes.export_gguf <run | sweep | model | adapter> --to gguf|gguf-lora --type T --out DIR

1. the prompt: the run's PromptFormat as a chat template (finetune/recipes/chat_templates.py), its stop tokens
2. the model folder to convert: the merged model, or base + adapter merged now (finetune/recipes/merge.py)
3. a staging folder beside it (links to the weights; config.json and the tokenizer's files written for llama.cpp's
   converter, which runs transformers 4.57: the chat template, the EOS training ended answers with, whether the
   prompt starts with BOS, the tokenizer class by its 4.x name, rope_theta at the top level)
4. llama.cpp's convert_hf_to_gguf.py (f16 / bf16, or f16 then llama.cpp's quantiser for q8_0 / q4_k_m), or for gguf-lora
   convert_lora_to_gguf.py on the adapter plus the base model as its own GGUF; all in llama.cpp's environment
5. the GGUF read back (gguf): its chat template and EOS are the ones written; the template rendered for held-out
   style turns gives the training prompt's token ids (transformers tokenizer)
6. Modelfile (Ollama), README.md, export.json beside the GGUF; written into a temp folder and renamed, so an
   export appears only when complete.
Standard library at import.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from finetune.osutil import atomic_write, atomic_write_json
from finetune.recipes.common import log
from finetune.run_files import RESOLVED_CONFIG

QUANT = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}  # llama.cpp's names (LLAMA_FTYPE_MOSTLY_<name>)
CHECK_TURNS = [
    [{"role": "user", "content": "Reverse the words.\nred rice"}],
    [{"role": "user", "content": "Copy the words."}],
    [
        {"role": "user", "content": "Sort the words.\nb a"},
        {"role": "assistant", "content": "a b"},
        {"role": "user", "content": "Add the numbers.\n2 3"},
    ],
]


def tools() -> dict:
    from finetune.export import venv_dir, venv_python

    root = venv_dir().resolve() / "llama.cpp"
    return {
        "python": str(venv_python()),
        "convert": str(root / "convert_hf_to_gguf.py"),
        "convert_lora": str(root / "convert_lora_to_gguf.py"),
        "quantize": str(Path(__file__).resolve().parents[1] / "tools" / "llama_quantize.py"),
    }


def run_tool(argv: List[str], what: str) -> float:
    """Run one of llama.cpp's tools (its output goes to this step's log); seconds taken."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_LOCAL_GGUF")}
    t0 = time.perf_counter()
    log(f"{what}: {' '.join(argv)}")
    sys.stdout.flush()
    code = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL).returncode
    if code != 0:
        raise SystemExit(f"{what} failed (exit {code}); its output is above")
    return time.perf_counter() - t0


def stage(model_dir: Path, dest: Path, exported, tokenizer) -> Path:
    """A folder the converter reads: the model's files linked, config.json and the tokenizer's config rewritten."""
    dest.mkdir(parents=True)
    written = ("config.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json", "tokenizer.json")
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in written:
            os.symlink(f.resolve(), dest / f.name)
    if (model_dir / "tokenizer.json").is_file():
        (dest / "tokenizer.json").write_text(json.dumps(byte_level_bpe(model_dir / "tokenizer.json")), encoding="utf-8")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]  # transformers 4.x reads it here (AutoConfig in the converter)
    config.setdefault("torch_dtype", config.get("dtype", "float32"))
    eos_id = tokenizer.convert_tokens_to_ids(exported.eos_token)
    config["eos_token_id"] = eos_id
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tc_path = model_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    tc.update(
        chat_template=exported.jinja,
        eos_token=exported.eos_token,
        add_bos_token=exported.bos_in_prompt,
        add_eos_token=False,
    )
    if tc.get("tokenizer_class") in (None, "TokenizersBackend"):  # transformers 5's name for a fast tokenizer
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc.pop("backend", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
    (dest / "chat_template.jinja").write_text(exported.jinja, encoding="utf-8")
    return dest


def byte_level_bpe(path: Path) -> dict:
    """tokenizer.json as llama.cpp's converter must read it. transformers 5.6 writes a byte-level BPE tokenizer it
    imported from a GGUF file (models/smollm2-135m) with byte_fallback=true: a SentencePiece flag that does nothing
    for byte-level BPE (its alphabet holds every byte), which the converter takes for a Llama SentencePiece-style
    vocabulary (tokenizer.ggml.model llama, pre-tokenizer default) that splits text differently. Said false, the
    converter takes its byte-level BPE path and recognises the pre-tokenizer by its hash (SmolLM2: smollm), as for
    the original model. Anything else is left as it is."""
    tok = json.loads(path.read_text(encoding="utf-8"))
    model, pre = tok.get("model") or {}, json.dumps(tok.get("pre_tokenizer") or {})
    if model.get("type") == "BPE" and model.get("byte_fallback") and '"ByteLevel"' in pre:
        model["byte_fallback"] = False
    return tok


def check_pre_tokenizer(model_dir: Path, tokenizer) -> Optional[str]:
    """llama.cpp's converter recognises a byte-level BPE tokenizer's pre-tokenizer by the hash of the ids it gives a
    fixed text, among the models it lists (convert_hf_to_gguf_update.py), and stops on any other. Checked here
    first, with the converter's own text and list, for a one-line refusal instead of its traceback. Returns the
    hash when it is known (None when the tokenizer is not byte-level BPE: nothing to check)."""
    import ast
    import hashlib
    import re

    from finetune.export import venv_dir

    path = model_dir / "tokenizer.json"
    if not path.is_file() or byte_level_bpe(path).get("model", {}).get("byte_fallback") is not False:
        return None
    if '"ByteLevel"' not in json.dumps(json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}):
        return None
    source = (venv_dir().resolve() / "llama.cpp" / "conversion" / "base.py").read_text(encoding="utf-8")
    text = ast.literal_eval(re.search(r"^\s*chktxt = ('.*')$", source, re.M).group(1))
    known = set(re.findall(r'chkhsh == "([0-9a-f]{64})"', source))
    digest = hashlib.sha256(str(tokenizer.encode(text)).encode()).hexdigest()
    if digest not in known:
        raise SystemExit(
            f"error: {model_dir}: llama.cpp's converter does not know this tokenizer (a byte-level BPE whose "
            f"pre-tokenizer hash {digest[:12]}... is none of the {len(known)} models convert_hf_to_gguf.py lists): "
            "it converts the tokenizers of published models (SmolLM2, Llama 3, Qwen2, ...), not one trained here "
            "(model=tiny_llama); export a model whose tokenizer llama.cpp lists"
        )
    return digest


def convert(src: Path, out: Path, type_: str, work: Path, name: str, t: dict) -> dict:
    """src (staged) -> out, quantised by llama.cpp's llama_model_quantize when asked; times and the intermediate's
    size."""
    times = {}
    direct = type_ in ("f16", "bf16")
    first = out if direct else work / f"{name}-f16.gguf"
    times["convert_s"] = run_tool(
        [
            t["python"],
            t["convert"],
            str(src),
            "--outfile",
            str(first),
            "--outtype",
            type_ if direct else "f16",
            "--model-name",
            name,
        ],
        "llama.cpp convert_hf_to_gguf.py",
    )
    if not direct:
        times["quantize_s"] = run_tool(
            [t["python"], t["quantize"], str(first), str(out), QUANT[type_]], "llama.cpp llama_model_quantize"
        )
        first.unlink()
    return times


def read_gguf(path: Path) -> dict:
    """The metadata a runtime reads from a GGUF file (the gguf package)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key):
        field = reader.fields.get(key)
        if field is None:
            return None
        try:
            return field.contents()
        except Exception:  # noqa: BLE001 - a GGUF field gguf-py cannot decode is reported as absent
            return None

    tokens = value("tokenizer.ggml.tokens") or []
    meta = {
        k: value(k)
        for k in (
            "general.architecture",
            "general.type",
            "general.name",
            "general.file_type",
            "tokenizer.chat_template",
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token",
        )
    }
    for role in ("bos", "eos", "eot"):
        i = meta.get(f"tokenizer.ggml.{role}_token_id")
        meta[f"{role}_token"] = tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None
    meta["tensors"] = len(reader.tensors)
    return meta


def check_prompt(exported, fmt, tokenizer) -> dict:
    """The chat template renders the training prompt: same token ids as the run's own prompt builder."""
    from finetune.recipes.chat_templates import render

    checked = 0
    for turns in CHECK_TURNS:
        text = render(exported.jinja, turns, tokenizer.bos_token or "", exported.eos_token)
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        want = fmt.encode(tokenizer, turns)
        if got != want:
            raise SystemExit(
                f"export check: the chat template renders {text!r}, whose ids differ from the training prompt's "
                f"({len(got)} vs {len(want)} tokens)"
            )
        checked += 1
    return {"conversations": checked, "ids_equal": True}


def modelfile(gguf: str, exported, lora: Optional[str] = None) -> str:
    lines = [f"FROM ./{gguf}"]
    if lora:
        lines.append(f"ADAPTER ./{lora}")
    if exported.ollama:
        if '"""' in exported.ollama:
            raise SystemExit('export: the Ollama template contains """, which a Modelfile cannot hold')
        lines.append(f'TEMPLATE """{exported.ollama}"""')
    else:
        lines.append(f"# no TEMPLATE: {exported.note}")
    for stop in exported.stop_tokens:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    lines += [
        "# greedy, as the run's evaluation answered (Ollama's default repeat penalty 1.1 changes answers)",
        "PARAMETER temperature 0",
        "PARAMETER repeat_penalty 1",
    ]
    return "\n".join(lines) + "\n"


def readme(info: dict, exported) -> str:
    files = info["files"]
    gguf, lora = files["model"], files.get("lora")
    name = info["name"].replace("_", "-").lower()
    lora_cli = f" --lora {lora}" if lora else ""
    lora_py = f', lora_path="{lora}"' if lora else ""
    first = "Reverse the words.\\nred rice"
    rows = [f"| `{gguf}` | the {'base ' if lora else ''}model, {info['type']}, {info['sizes_mb'][gguf]} MB |"]
    if lora:
        rows.append(f"| `{lora}` | the LoRA adapter (llama.cpp LoRA GGUF), {info['sizes_mb'][lora]} MB |")
    rows.append(
        f"| `Modelfile` | for Ollama: FROM{', ADAPTER' if lora else ''}, TEMPLATE, stop tokens, greedy decoding |"
    )
    rows.append("| `export.json` | what was exported, how, sizes, times, the checks |")
    table = "\n".join(rows)
    quantiser = " and its quantiser, `llama_model_quantize`" if info["type"] in QUANT else ""
    return f"""# {info["name"]} ({info["type"]} GGUF)

Exported by `finetune export` from {info["source"]}, with llama.cpp's own tools
(`{info["tools"]["converter"]}`{quantiser}; llama.cpp as vendored by
llama-cpp-python {info["tools"]["llama_cpp_python"]}).

| file | what |
|---|---|
{table}

The prompt travels with the file: `tokenizer.chat_template` is {exported.how}. Answers end at
{", ".join(f"`{s}`" for s in exported.stop_tokens)} (the GGUF's end-of-sequence token is `{exported.eos_token}`). It was
evaluated with greedy decoding: use temperature 0 and no repeat penalty to get the answers the run measured.

## llama.cpp

```bash
llama-cli -m {gguf}{lora_cli} --jinja -cnv --temp 0 --repeat-penalty 1
llama-server -m {gguf}{lora_cli} --jinja --temp 0      # OpenAI-compatible /v1/chat/completions
```

## llama-cpp-python

```python
from llama_cpp import Llama
llm = Llama(model_path="{gguf}"{lora_py}, chat_format="chat_template.default", verbose=False)
out = llm.create_chat_completion([{{"role": "user", "content": "{first}"}}], temperature=0, repeat_penalty=1)
print(out["choices"][0]["message"]["content"])
```

## Ollama

```bash
ollama create {name} -f Modelfile
ollama run {name}
```
{"" if exported.ollama else chr(10) + "Note: " + exported.note + chr(10)}
## finetune

```bash
finetune chat {gguf if not lora else "<this folder>"}
finetune generate {gguf if not lora else "<this folder>"} --prompt "Reverse the words." --input "red rice"
```
"""


def export_lora(source, model_dir: Path, exported, tokenizer, type_: str, tmp: Path, work: Path, t: dict):
    """--to gguf-lora: the base model as its own GGUF and the adapter as a llama.cpp LoRA GGUF; (files, times)."""
    base_name = Path(source.model).name
    staged = stage(model_dir, work / "base", exported, tokenizer)
    files = {"model": f"{base_name}-{type_}.gguf", "lora": f"{source.name}-lora-{type_}.gguf"}
    times = {f"base_{k}": v for k, v in convert(staged, tmp / files["model"], type_, work, base_name, t).items()}
    adapter = work / "adapter"
    adapter.mkdir()
    for f in Path(source.adapter).iterdir():
        if f.is_file():
            os.symlink(f.resolve(), adapter / f.name)
    times["convert_lora_s"] = run_tool(
        [t["python"], t["convert_lora"], str(adapter), "--base", str(staged), "--outfile", str(tmp / files["lora"])]
        + ["--outtype", type_],
        "llama.cpp convert_lora_to_gguf.py",
    )
    return files, times


def check_files(tmp: Path, files: dict, exported) -> dict:
    """What a runtime reads from the written files is what was meant: the chat template, EOS, and for gguf-lora an
    adapter GGUF. Refused (SystemExit) otherwise; the checked fields for export.json."""
    checks = {}
    meta = read_gguf(tmp / files["model"])
    if meta["tokenizer.chat_template"] != exported.jinja:
        raise SystemExit("export check: the GGUF's tokenizer.chat_template is not the template written")
    if meta["eos_token"] != exported.eos_token:
        raise SystemExit(f"export check: the GGUF's EOS is {meta['eos_token']!r}, not {exported.eos_token!r}")
    checks["gguf"] = {
        k: meta[k]
        for k in (
            "general.architecture",
            "tokenizer.ggml.pre",
            "eos_token",
            "bos_token",
            "tokenizer.ggml.add_bos_token",
            "tensors",
        )
    }
    if files.get("lora"):
        lmeta = read_gguf(tmp / files["lora"])
        if lmeta["general.type"] != "adapter":
            raise SystemExit(
                f"export check: {files['lora']} is not a LoRA adapter GGUF (general.type {lmeta['general.type']!r})"
            )
        checks["lora"] = {"general.type": lmeta["general.type"], "tensors": lmeta["tensors"]}
    return checks


def export(source, to: str, type_: str, tmp: Path) -> dict:
    import transformers
    from transformers import AutoTokenizer

    from finetune.export import INFO
    from finetune.recipes.chat_templates import for_format
    from finetune.recipes.common import read_config
    from finetune.recipes.prompting import PromptFormat

    transformers.utils.logging.disable_progress_bar()
    t_start = time.perf_counter()
    t = tools()
    work = tmp / ".work"
    work.mkdir()
    model_dir = Path(source.model)
    cfg = read_config(str(Path(source.run_dir) / RESOLVED_CONFIG)) if source.run_dir else None
    tok_dir = (
        source.adapter
        if source.adapter and (Path(source.adapter) / "tokenizer_config.json").is_file()
        else source.model
    )
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    fmt = (
        PromptFormat.from_run_config(cfg) if cfg else PromptFormat.for_folder(source.adapter or source.model, tokenizer)
    )
    if fmt.kind == "raw":
        raise SystemExit(
            f"export: {source.what} has no prompt format to carry (no run config, no finetune_prompt.json, no chat "
            "template); export the run folder it came from"
        )
    check_pre_tokenizer(Path(tok_dir), tokenizer)
    exported = for_format(fmt, tokenizer)
    checks = {"prompt_ids": check_prompt(exported, fmt, tokenizer)}
    log(
        f"prompt: {exported.how}; stop tokens {exported.stop_tokens}; template checked on "
        f"{checks['prompt_ids']['conversations']} conversations"
    )
    times = {}
    name = source.name
    files = {}
    if to == "gguf":
        if source.adapter:
            from finetune.recipes.merge import merge_adapter

            t0 = time.perf_counter()
            model_dir = merge_adapter(source.model, source.adapter, str(work / "merged"))
            times["merge_s"] = round(time.perf_counter() - t0, 1)
            log(f"merged {source.adapter} into {source.model} ({times['merge_s']} s)")
        staged = stage(model_dir, work / "hf", exported, tokenizer)
        files["model"] = f"{name}-{type_}.gguf"
        times.update(convert(staged, tmp / files["model"], type_, work, name, t))
    else:
        files, lora_times = export_lora(source, model_dir, exported, tokenizer, type_, tmp, work, t)
        times.update(lora_times)
    checks.update(check_files(tmp, files, exported))
    shutil.rmtree(work)
    times = {k: round(v, 1) for k, v in times.items()}
    times["total_s"] = round(time.perf_counter() - t_start, 1)
    from importlib import metadata

    info = {
        "name": name,
        "to": to,
        "type": type_,
        "source": source.what,
        "run": source.run_dir,
        "files": files,
        "sizes_mb": {f: round((tmp / f).stat().st_size / 2**20, 1) for f in files.values()},
        "bytes": {f: (tmp / f).stat().st_size for f in files.values()},
        "times": times,
        "prompt": {
            "how": exported.how,
            "kind": fmt.kind,
            "template": fmt.template,
            "chat_template": exported.jinja,
            "eos_token": exported.eos_token,
            "stop_tokens": exported.stop_tokens,
            "bos_in_prompt": exported.bos_in_prompt,
            "ollama_template": exported.ollama is not None,
        },
        "checks": checks,
        "tools": {
            "converter": "convert_lora_to_gguf.py" if to == "gguf-lora" else "convert_hf_to_gguf.py",
            "llama_cpp_python": _lock_version(),
            "transformers_here": metadata.version("transformers"),
        },
        "max_new_tokens": (cfg or {}).get("max_new_tokens"),
    }
    atomic_write(tmp / "Modelfile", modelfile(files["model"], exported, files.get("lora")))
    atomic_write(tmp / "README.md", readme(info, exported))
    atomic_write_json(tmp / INFO, info)
    return info


def _lock_version() -> str:
    from finetune.export import LOCK

    for line in LOCK.read_text().splitlines():
        if line.startswith("llama-cpp-python=="):
            return line.split("==", 1)[1]
    return "?"


def main(argv: Optional[List[str]] = None) -> int:
    from finetune.errors import ConfigError
    from finetune.export import check_choice, check_out, resolve

    ap = argparse.ArgumentParser(prog="python -m finetune.recipes.export_gguf")
    ap.add_argument("target")
    ap.add_argument("--to", required=True)
    ap.add_argument("--type", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        type_ = check_choice(a.to, a.type)
        source = resolve(a.target, a.to)
        out = Path(a.out).absolute()
        check_out(out)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = export(source, a.to, type_, tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for f in info["files"].values():
        log(f"wrote {out / f} ({info['sizes_mb'][f]} MB)")
    log(f"exported in {info['times']['total_s']} s: {out} (Modelfile, README.md, {Path('export.json')})")
    print(
        f"[finetune export] {out / info['files']['model']}"
        + (f" + {info['files']['lora']}" if info["files"].get("lora") else ""),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
