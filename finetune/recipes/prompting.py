"""Prompts for generation, built exactly as the run built them for training, so a trained model is asked the way
it learned to answer. Used by the evaluation-by-generation step (finetune/recipes/gen_eval.py) and by
``finetune generate`` / ``finetune chat`` (finetune/generate.py).

A PromptFormat is read from a run folder (its resolved_config.json: backend, prompt_template_name, template) or
from a model folder (``finetune_prompt.json``, which the alpacalora backend writes beside its adapter and merged
model; else the tokenizer's chat template; else the raw text):

  alpaca        the alpacalora / collie prompt template (finetune/templates/<name>.json), tokenised as in
                training (tokenizer(prompt), the tokenizer's own special tokens); a typed turn's first line is
                the instruction and the rest its input; in a chat, earlier turns are their prompts and answers in
                order (a run trained on chat-format rows is ``chat``, as trained)
  llamafactory  LLaMA-Factory's own template (``template.encode_oneturn``, the ids its SFT training uses; the
                run's backend.template, or the tokenizer's chat template when it was null)
  chat          the tokenizer's chat template (add_generation_prompt)
  raw           the text as typed

Turns are {"role": "user"|"assistant"|"system", "content": ...}; an alpaca row becomes one user turn (instruction
and input). torch/transformers are imported by the callers; LLaMA-Factory only for the llamafactory kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from finetune.recipes.data import row_format, to_messages
from finetune.recipes.templates import alpaca_prompt, load_template

PROMPT_FILE = "finetune_prompt.json"


def split_turn(content: str) -> Tuple[str, Optional[str]]:
    """A typed chat turn as an alpaca row: the first line is the instruction, the rest its input (the inverse of
    LLaMA-Factory's alpaca converter, which joins them with a newline)."""
    first, _, rest = content.strip().partition("\n")
    return first.strip(), rest.strip() or None


@dataclass
class PromptFormat:
    kind: str  # alpaca | llamafactory | chat | raw
    template: Optional[str] = None  # alpaca template name, or LLaMA-Factory template name (None: own)
    template_text: dict = field(default_factory=dict)  # the alpaca template itself (self-contained model folders)
    cutoff_len: Optional[int] = None
    _lf: object = None  # LLaMA-Factory's Template, loaded on first use

    # ------------------------------------------------------------------------------------------- where from
    @classmethod
    def from_run_config(cls, cfg: dict) -> "PromptFormat":
        backend = cfg["backend"]["name"]
        if backend == "llamafactory":
            return cls("llamafactory", cfg["backend"].get("template"), cutoff_len=cfg.get("cutoff_len"))
        if ((cfg.get("_ctx") or {}).get("data") or {}).get("format") == "sharegpt":
            return cls("chat", cutoff_len=cfg.get("cutoff_len"))  # chat rows trained through the chat template
        name = cfg.get("prompt_template_name") or "alpaca"
        return cls("alpaca", name, load_template(name), cutoff_len=cfg.get("cutoff_len"))

    @classmethod
    def for_folder(cls, folder, tokenizer) -> "PromptFormat":
        """A model folder: what our run saved in it, else the tokenizer's chat template, else raw text."""
        path = Path(folder) / PROMPT_FILE
        if path.is_file():
            d = json.loads(path.read_text(encoding="utf-8"))
            return cls(d["kind"], d.get("template"), d.get("template_text") or {}, d.get("cutoff_len"))
        return cls("chat" if getattr(tokenizer, "chat_template", None) else "raw")

    def to_file(self, folder) -> None:
        d = {
            "kind": self.kind,
            "template": self.template,
            "template_text": self.template_text,
            "cutoff_len": self.cutoff_len,
            "how": "finetune generate/chat and the evaluation by generation build prompts this way "
            "(finetune/recipes/prompting.py)",
        }
        Path(folder, PROMPT_FILE).write_text(json.dumps(d, indent=1) + "\n", encoding="utf-8")

    def describe(self) -> str:
        if self.kind == "alpaca":
            return f"prompt template {self.template} (as trained)"
        if self.kind == "llamafactory":
            return f"LLaMA-Factory template {self.template or 'null (the tokenizer chat template)'} (as trained)"
        return "the tokenizer's chat template" if self.kind == "chat" else "raw text (no template)"

    # ------------------------------------------------------------------------------------------- encoding
    def encode(self, tokenizer, turns: List[dict]) -> List[int]:
        """Prompt ids for ``turns`` (ending with a user turn): what the model sees before its answer. Longer than
        cutoff_len, a chat drops its oldest exchanges first (the system turn stays), then a single prompt loses its
        start (a leading BOS stays): the newest question and the answer cue are always what the model sees last."""
        turns = list(turns)
        ids = self._encode(tokenizer, turns)
        limit = int(self.cutoff_len or 0)
        while limit and len(ids) > limit:
            users = [i for i, t in enumerate(turns) if t["role"] == "user"]
            if len(users) < 2:
                keep = 1 if ids and ids[0] == getattr(tokenizer, "bos_token_id", None) else 0
                return ids[:keep] + ids[len(ids) - (limit - keep) :]
            turns = [t for t in turns[: users[1]] if t["role"] == "system"] + turns[users[1] :]
            ids = self._encode(tokenizer, turns)
        return ids

    def _encode(self, tokenizer, turns: List[dict]) -> List[int]:
        if self.kind == "llamafactory":
            template = self._lf_template(tokenizer)
            system = next((t["content"] for t in turns if t["role"] == "system"), None)
            msgs = [t for t in turns if t["role"] != "system"] + [{"role": "assistant", "content": ""}]
            prompt_ids, _ = template.encode_oneturn(tokenizer, msgs, system)
            return prompt_ids
        if self.kind == "alpaca":  # earlier turns of a chat: their prompts and answers, in order
            text = ""
            for t in turns:
                if t["role"] == "system":
                    continue
                if t["role"] == "user":
                    text += alpaca_prompt(self.template_text, *t.get("alpaca") or split_turn(t["content"]))
                else:
                    text += t["content"] + "\n\n"
            return self._ids(tokenizer, text, special=True)
        if self.kind == "raw" or not getattr(tokenizer, "chat_template", None):
            return self._ids(tokenizer, "\n".join(t["content"] for t in turns), special=True)
        text = tokenizer.apply_chat_template(
            [{"role": t["role"], "content": t["content"]} for t in turns], tokenize=False, add_generation_prompt=True
        )
        return self._ids(tokenizer, text, special=False)

    def _ids(self, tokenizer, text: str, special: bool) -> List[int]:
        return tokenizer(text, add_special_tokens=special, padding=False)["input_ids"]

    def stop_ids(self, tokenizer) -> List[int]:
        ids = {tokenizer.eos_token_id}
        if self.kind == "llamafactory":
            ids |= set(self._lf_template(tokenizer).get_stop_token_ids(tokenizer))
        ids.discard(None)
        return sorted(ids)

    def _lf_template(self, tokenizer):
        if self._lf is None:
            from llamafactory.data.template import get_template_and_fix_tokenizer
            from llamafactory.hparams import DataArguments

            self._lf = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=self.template))
        return self._lf

    def encode_answer(self, tokenizer, turns: List[dict], answer: str) -> Tuple[List[int], List[int]]:
        """(prompt ids, answer ids) of ``turns`` answered by ``answer``, as training encodes them: LLaMA-Factory's
        template.encode_oneturn (what its sft, dpo and kto processors use), the alpaca prompt followed by the answer
        and EOS, or the chat template's rendering of the conversation with the answer."""
        if self.kind == "llamafactory":
            template = self._lf_template(tokenizer)
            system = next((t["content"] for t in turns if t["role"] == "system"), None)
            msgs = [t for t in turns if t["role"] != "system"] + [{"role": "assistant", "content": answer}]
            prompt_ids, answer_ids = template.encode_oneturn(tokenizer, msgs, system)
            return list(prompt_ids), list(answer_ids)
        prompt_ids = self._encode(tokenizer, turns)
        if self.kind == "alpaca" or self.kind == "raw" or not getattr(tokenizer, "chat_template", None):
            answer_ids = self._ids(tokenizer, answer, special=False) + [tokenizer.eos_token_id]
            return prompt_ids, answer_ids
        text = tokenizer.apply_chat_template(
            [{"role": t["role"], "content": t["content"]} for t in turns] + [{"role": "assistant", "content": answer}],
            tokenize=False,
        )
        full = self._ids(tokenizer, text, special=False)
        n = len(prompt_ids) if full[: len(prompt_ids)] == prompt_ids else 0
        return full[:n] if n else prompt_ids, full[n:] if n else self._ids(tokenizer, answer, special=False)

    # ------------------------------------------------------------------------------------------- data rows
    def row_turns(self, row: dict) -> Tuple[List[dict], str]:
        """(turns up to the answer, reference answer) of a data row (alpaca or sharegpt/messages; a preference
        pair's reference is its chosen answer)."""
        if "chosen" in row and "rejected" in row:
            turns, chosen, _ = pair_turns(row)
            return turns, chosen
        if row_format(row) == "sharegpt":
            msgs = to_messages(row)
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            return msgs[:last], msgs[last]["content"]
        ins, inp = row.get("instruction", ""), row.get("input") or None
        # LLaMA-Factory's alpaca converter joins instruction and input with a newline into one user turn
        content = "\n".join(x for x in (ins, inp) if x)
        return [{"role": "user", "content": content, "alpaca": (ins, inp)}], str(row.get("output", ""))


# ------------------------------------------------------------------------------------------- preference rows


def _content(turn) -> str:
    return turn if isinstance(turn, str) else str(turn.get("content", turn.get("value", "")))


def _alpaca_turns(row: dict) -> List[dict]:
    ins, inp = row.get("instruction", ""), row.get("input") or None
    # LLaMA-Factory's alpaca converter joins instruction and input with a newline into one user turn
    return [{"role": "user", "content": "\n".join(x for x in (ins, inp) if x), "alpaca": (ins, inp)}]


def pair_turns(row: dict) -> Tuple[List[dict], str, str]:
    """(prompt turns, chosen answer, rejected answer) of a preference row, alpaca-style or sharegpt-style."""
    turns = to_messages(row) if row_format(row) == "sharegpt" else _alpaca_turns(row)
    return turns, _content(row["chosen"]), _content(row["rejected"])


def kto_turns(row: dict) -> Tuple[List[dict], str, bool]:
    """(prompt turns, answer, desirable) of a KTO row, alpaca-style (kto_tag) or sharegpt-style (label)."""
    label = row["label"] if isinstance(row.get("label"), bool) else bool(row.get("kto_tag"))
    if row_format(row) == "sharegpt":
        msgs = to_messages(row)
        return msgs[:-1], msgs[-1]["content"], label
    return _alpaca_turns(row), str(row.get("output", "")), label


def _key(turns: List[dict]) -> str:
    return json.dumps([(t["role"], t["content"]) for t in turns])


def preference_pairs(rows: List[dict]) -> List[Tuple[List[dict], str, str]]:
    """(prompt turns, chosen, rejected) of held-out rows: preference rows as they are; KTO rows paired up where a
    prompt has a desirable and an undesirable answer (the first of each, in row order)."""
    if rows and "chosen" in rows[0]:
        return [pair_turns(r) for r in rows]
    groups: dict = {}
    for r in rows:
        turns, answer, good = kto_turns(r)
        groups.setdefault(_key(turns), {"turns": turns}).setdefault(good, answer)
    return [(g["turns"], g[True], g[False]) for g in groups.values() if True in g and False in g]


def reference_rows(rows: List[dict]) -> List[dict]:
    """Rows whose answer is a reference for the evaluation by generation: preference rows (their chosen answer),
    KTO rows judged desirable (one per prompt), every other row."""
    if not rows or not any("kto_tag" in r or isinstance(r.get("label"), bool) for r in rows):
        return rows
    out, seen = [], set()
    for r in rows:
        turns, _, good = kto_turns(r)
        if good and _key(turns) not in seen:
            seen.add(_key(turns))
            out.append(r)
    return out
