r"""A GGUF file answering through llama.cpp (llama-cpp-python), with the chat template the file itself carries: what
``finetune generate`` / ``finetune chat`` run for a .gguf file or an export folder (finetune/generate.py starts it
in llama.cpp's own environment, .venv-llamacpp: its interpreter, this repository on PYTHONPATH).

    python -m finetune.gguf_runner generate --model M.gguf [--lora L.gguf] (--prompt P [--input I] | --data F)
    python -m finetune.gguf_runner chat --model M.gguf [--lora L.gguf] [--system S]
    python -m finetune.gguf_runner answer --model M.gguf [--lora L.gguf] --data F --out answers.json
    python -m finetune.gguf_runner bench --model M.gguf [--threads N]     (llama.cpp's speed, as llama-bench counts)

Answers come from llama-cpp-python's own chat completion (``create_chat_completion``) with the GGUF's template
(``chat_format="chat_template.default"``: the file's ``tokenizer.chat_template``, its BOS and EOS), greedy
(temperature 0, no repeat penalty: as the run's evaluation). ``answer`` writes, per row, the prompt's token ids as
that chat completion builds them (the same formatter, the same tokenize call) and the answer, plus tokens/s: what
the tests compare with the trained model.

Standard library and llama_cpp only (this environment has no omegaconf or transformers); rows are read and
answers scored with the repository's standard-library modules.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from finetune.compat.llama_cpp import token_text
from finetune.datafiles import read_rows
from finetune.generate import HELP, chat_loop
from finetune.recipes.gen_eval import answer_of
from finetune.recipes.prompting import PromptFormat


class Runner:
    def __init__(self, model: str, lora: Optional[str] = None, n_ctx: int = 2048, threads: Optional[int] = None):
        from llama_cpp import Llama

        self.llm = Llama(model_path=model, lora_path=lora, n_ctx=n_ctx, n_threads=threads, verbose=False, seed=0)
        meta = self.llm.metadata
        if "tokenizer.chat_template" not in meta:
            raise SystemExit(f"{model}: the GGUF carries no chat template (tokenizer.chat_template)")
        self.llm.chat_format = "chat_template.default"  # the file's own template, never a guessed built-in one
        self.template = meta["tokenizer.chat_template"]
        self.eos_id, self.bos_id = self.llm.token_eos(), self.llm.token_bos()

    def describe(self) -> str:
        eos = token_text(self.llm)(self.eos_id) if self.eos_id != -1 else "none"
        return f"the GGUF's own chat template; stops at {eos} and llama.cpp's end-of-generation tokens"

    def prompt_ids(self, messages: List[dict]) -> List[int]:
        """The ids create_chat_completion feeds the model for these messages: llama-cpp-python's Jinja2ChatFormatter
        made as Llama.__init__ makes it for chat_template.default, tokenized as its completion handler does."""
        from llama_cpp import llama_chat_format

        tok = token_text(self.llm)
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template=self.template,
            eos_token=tok(self.eos_id) if self.eos_id != -1 else "",
            bos_token=tok(self.bos_id) if self.bos_id != -1 else "",
            stop_token_ids=[self.eos_id],
        )
        result = formatter(messages=messages)
        return self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)

    def answer(self, messages: List[dict], max_new_tokens: int, stream: bool = False):
        kwargs = dict(messages=messages, max_tokens=max_new_tokens, temperature=0.0, repeat_penalty=1.0, seed=0)
        if not stream:
            out = self.llm.create_chat_completion(**kwargs)
            return out["choices"][0]["message"]["content"] or "", out["usage"]
        text = ""
        for chunk in self.llm.create_chat_completion(stream=True, **kwargs):
            piece = chunk["choices"][0]["delta"].get("content") or ""
            text += piece
            print(piece, end="", flush=True)
        print(flush=True)
        return text, None


def _turns(prompt: str, input_text: Optional[str]) -> List[dict]:
    return [{"role": "user", "content": "\n".join(x for x in (prompt, input_text) if x)}]


def generate(r: Runner, prompt, input_text, data, max_new: int) -> int:
    if prompt is not None:
        r.answer(_turns(prompt, input_text), max_new, stream=True)
        return 0
    fmt = PromptFormat("chat")
    rows = read_rows(data)
    right, with_ref = 0, 0
    for i, row in enumerate(rows, 1):
        turns, ref = fmt.row_turns(row)
        ans, _ = r.answer([{"role": t["role"], "content": t["content"]} for t in turns], max_new)
        ok = bool(ref) and answer_of(ans, len(answer_of(ref, 10**6).splitlines())) == answer_of(ref, 10**6)
        right += ok
        with_ref += bool(ref)
        shown = " | ".join(" ".join(t["content"].split()) for t in turns)
        print(
            f"[{i}] {shown}\n    -> {ans.strip()}" + (f"    ({'right' if ok else 'reference: ' + ref})" if ref else ""),
            flush=True,
        )
    if with_ref:
        print(f"exact match: {right}/{len(rows)}", flush=True)
    return 0


def chat(r: Runner, max_new: int, system: Optional[str]) -> int:
    print(f"[finetune chat] {r.describe()}; greedy, at most {max_new} new tokens per answer; {HELP}", flush=True)
    return chat_loop(system, lambda history: r.answer(history, max_new, stream=True)[0])


def answer_rows(r: Runner, data: str, out: str, max_new: int) -> int:
    """Every row answered, with its prompt ids and the timing (tests and benchmarks read the JSON)."""
    fmt = PromptFormat("chat")
    rows, t_total, n_gen = [], 0.0, 0
    for row in read_rows(data):
        turns, ref = fmt.row_turns(row)
        messages = [{"role": t["role"], "content": t["content"]} for t in turns]
        ids = r.prompt_ids(messages)
        t0 = time.perf_counter()
        ans, usage = r.answer(messages, max_new)
        dt = time.perf_counter() - t0
        if usage["prompt_tokens"] != len(ids):
            raise SystemExit(f"the chat completion used {usage['prompt_tokens']} prompt tokens, not {len(ids)}")
        t_total += dt
        n_gen += usage["completion_tokens"]
        rows.append(
            {"prompt_ids": ids, "answer": ans, "reference": ref, "completion_tokens": usage["completion_tokens"]}
        )
    result = {
        "rows": rows,
        "seconds": round(t_total, 3),
        "completion_tokens": n_gen,
        "tokens_per_s": round(n_gen / t_total, 2) if t_total else None,
        "threads": r.llm.n_threads,
    }
    Path(out).write_text(json.dumps(result) + "\n", encoding="utf-8")
    return 0


def bench(r: Runner, n_prompt: int = 64, n_gen: int = 64) -> int:
    """llama.cpp's own speed on this CPU, counted as llama-bench counts it: prompt processing (one batch of
    n_prompt tokens) and text generation (n_gen tokens decoded one at a time after it), after a warm-up that pages
    the weights in. Prints one JSON line."""
    llm = r.llm
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 16
    toks = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:n_prompt]
    llm.reset()
    llm.eval(toks[:8])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(toks)
    pp = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n_gen):
        llm.eval([toks[i % len(toks)]])
    tg = time.perf_counter() - t0
    result = {
        "pp_tokens_per_s": round(n_prompt / pp, 1),
        "tg_tokens_per_s": round(n_gen / tg, 1),
        "threads": llm.n_threads,
    }
    print(json.dumps(result), flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune.gguf_runner")
    ap.add_argument("action", choices=("generate", "chat", "answer", "bench"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--lora")
    ap.add_argument("--prompt")
    ap.add_argument("--input")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--system")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    r = Runner(a.model, a.lora, threads=a.threads)
    if a.action == "chat":
        return chat(r, a.max_new_tokens, a.system)
    if a.action == "answer":
        return answer_rows(r, a.data, a.out, a.max_new_tokens)
    if a.action == "bench":
        return bench(r)
    return generate(r, a.prompt, a.input, a.data, a.max_new_tokens)


if __name__ == "__main__":
    sys.exit(main())
