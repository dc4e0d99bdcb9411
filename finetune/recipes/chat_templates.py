"""The prompt a run trained with, as templates that travel with an exported model (finetune export, finetune/export.py):

  jinja   the GGUF's ``tokenizer.chat_template`` (what llama.cpp, llama-cpp-python and transformers render)
  ollama  the same prompt in Go's text/template for Ollama's Modelfile (its TEMPLATE)

from a PromptFormat (finetune/recipes/prompting.py):

  alpaca        the run's alpaca template (finetune/templates/<name>.json) written out as a chat template: a user
                turn's first line is the instruction and the rest its input (as ``finetune chat`` does), earlier
                turns are their prompts and answers in order, a system turn is not part of the prompt; a leading
                BOS when the tokenizer adds one to a training prompt
  chat          the tokenizer's own chat template, verbatim
  llamafactory  the chat template LLaMA-Factory itself writes for its template (``Template._get_jinja_template``,
                what its own export saves), or the tokenizer's when the run's template was null

Every piece of text is a string literal inside an expression (``{{ '...' }}``), so no engine's whitespace rules
(trim_blocks, lstrip_blocks, Go's ``{{-``) can change it. For the chat kinds the Ollama template is derived by
rendering the Jinja template with marker messages (prefix and suffix of each role), and kept only when that
layout reproduces the Jinja rendering on probe conversations; otherwise the Modelfile says so and carries none.

Standard library at import (jinja2 inside ``render``).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from finetune.compat.llamafactory import jinja_template

# the instruction / input split of a typed turn, as prompting.split_turn does it
_JINJA_SPLIT = (
    "{%- set parts = message['content'].strip().split('\\n', 1) -%}"
    "{%- set instruction = parts[0].strip() -%}"
    "{%- set input = parts[1].strip() if parts | length > 1 else '' -%}"
)


def jinja_literal(text: str) -> str:
    """A Jinja string literal both jinja2 and llama.cpp's own Jinja engine read back as ``text``."""
    out = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f"'{out}'"


def go_literal(text: str) -> str:
    """A Go interpreted string literal for ``text`` (JSON's escapes are Go's)."""
    return json.dumps(text, ensure_ascii=False)


def _pieces(fmt_text: str) -> List[Tuple[str, Optional[str]]]:
    """'### Instruction:\\n{instruction}\\n\\n### Response:\\n' -> [(literal, field name or None), ...]."""
    return [(lit, name) for lit, name, _, _ in string.Formatter().parse(fmt_text)]


def _alpaca_jinja_prompt(fmt_text: str) -> str:
    parts = []
    for lit, name in _pieces(fmt_text):
        if lit:
            parts.append(jinja_literal(lit))
        if name:
            parts.append(name)
    return "{{- " + " + ".join(parts) + " -}}"


def _alpaca_go_prompt(fmt_text: str) -> str:
    names = {"instruction": "$ins", "input": "$inp"}
    out = ""
    for lit, name in _pieces(fmt_text):
        if lit:
            out += "{{ " + go_literal(lit) + " }}"
        if name:
            out += "{{ " + names[name] + " }}"
    return out


def alpaca_jinja(template: dict, bos: bool) -> str:
    """The alpaca prompt as a Jinja chat template (``bos``: start with the tokenizer's BOS, as its training
    prompts did)."""
    return (
        ("{{- bos_token -}}" if bos else "")
        + "{%- for message in messages -%}"
        + "{%- if message['role'] == 'user' -%}"
        + _JINJA_SPLIT
        + "{%- if input -%}"
        + _alpaca_jinja_prompt(template["prompt_input"])
        + "{%- else -%}"
        + _alpaca_jinja_prompt(template["prompt_no_input"])
        + "{%- endif -%}"
        + "{%- elif message['role'] == 'assistant' -%}"
        + "{{- message['content'] + "
        + jinja_literal("\n\n")
        + " -}}"
        + "{%- endif -%}"
        + "{%- endfor -%}"
    )


def alpaca_ollama(template: dict, bos_text: Optional[str]) -> str:
    """The same prompt in Ollama's Go template. Go's templates have no string split: the first newline is found
    with a range over the message's bytes (text/template ranges over integers since Go 1.24, golang/go#66107;
    Ollama is built with a newer Go). Unlike the Jinja template it does not strip spaces around the instruction
    and the input. Checked here by its text only: no Go >= 1.24 or Ollama on the machines this was written on."""
    ins_inp = (
        "{{- $c := .Content }}{{- $nl := -1 }}{{- $in := -1 }}"
        "{{- range $i := len $c }}"
        "{{- if and (ge $nl 0) (lt $in 0) }}{{ $in = $i }}{{ end }}"
        "{{- if and (lt $nl 0) (eq (index $c $i) 10) }}{{ $nl = $i }}{{ end }}"
        "{{- end }}"
        '{{- $ins := $c }}{{- $inp := "" }}'
        "{{- if ge $nl 0 }}{{ $ins = slice $c 0 $nl }}{{ end }}"
        "{{- if ge $in 0 }}{{ $inp = slice $c $in }}{{ end }}"
    )
    return (
        (("{{ " + go_literal(bos_text) + " }}") if bos_text else "")
        + "{{- range .Messages }}"
        + '{{- if eq .Role "user" }}'
        + ins_inp
        + "{{- if $inp }}"
        + _alpaca_go_prompt(template["prompt_input"])
        + "{{- else }}"
        + _alpaca_go_prompt(template["prompt_no_input"])
        + "{{- end }}"
        + '{{- else if eq .Role "assistant" }}{{ .Content }}{{ '
        + go_literal("\n\n")
        + " }}"
        + "{{- end }}"
        + "{{- end }}"
    )


# ------------------------------------------------------------------------------------------- chat templates


@dataclass
class Layout:
    """A chat template as text around each turn: what Ollama's Go template can say."""

    start: str = ""  # before the first turn (a BOS, a default system turn)
    wrap: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # role -> (prefix, suffix)
    cue: str = ""  # after the last turn: the assistant's prefix (add_generation_prompt)

    def render(self, messages: List[dict]) -> str:
        text = self.start
        for m in messages:
            pre, post = self.wrap[m["role"]]
            text += pre + m["content"] + post
        return text + self.cue

    def ollama(self) -> str:
        out = ("{{ " + go_literal(self.start) + " }}") if self.start else ""
        out += "{{- range .Messages }}"
        first = True
        for role, (pre, post) in self.wrap.items():
            out += ("{{- if" if first else "{{- else if") + f' eq .Role "{role}" }}}}'
            out += ("{{ " + go_literal(pre) + " }}" if pre else "") + "{{ .Content }}"
            out += "{{ " + go_literal(post) + " }}" if post else ""
            first = False
        out += "{{- end }}" if self.wrap else ""
        out += "{{- end }}"
        return out + ("{{ " + go_literal(self.cue) + " }}" if self.cue else "")


PROBES = [
    [{"role": "user", "content": "U1"}],
    [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"}],
    [
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ],
    [{"role": "user", "content": "U1"}, {"role": "user", "content": "U2"}],  # tells a user suffix from the cue
]


def render(jinja: str, messages: List[dict], bos_token: str = "", eos_token: str = "") -> str:
    """A chat template rendered as llama-cpp-python and transformers render it (jinja2, trim/lstrip blocks)."""
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )

    def raise_exception(message):
        raise ValueError(message)

    return env.from_string(jinja).render(
        messages=messages,
        bos_token=bos_token,
        eos_token=eos_token,
        add_generation_prompt=True,
        raise_exception=raise_exception,
    )


def layout_of(jinja: str, bos_token: str, eos_token: str) -> Optional[Layout]:
    """The Layout a chat template follows, found by rendering it with marker turns and trying each way to cut the
    text around them, or None when no layout reproduces every probe conversation (a default system turn that a
    given one replaces, text that depends on the position of a turn, ...): then no plain Ollama template says it."""
    try:
        want = [render(jinja, p, bos_token, eos_token) for p in PROBES]
    except Exception:  # noqa: BLE001 - a template that refuses the probes (no system role, ...) has no plain layout
        return None
    one, multi, with_system = want[0], want[1], want[2]
    if one.count("U1") != 1 or multi.count("A1") != 1 or multi.count("U2") != 1:
        return None
    head, rest = one.split("U1")  # head = start + user prefix; rest = user suffix + cue
    between, after_a1 = multi.split("U1", 1)[1].split("A1", 1)  # between = user suffix + assistant prefix
    mid, tail = after_a1.split("U2", 1)  # mid = assistant suffix + user prefix; tail = user suffix + cue
    if tail != rest:
        return None
    for cut in range(len(rest) + 1):
        u_post, cue = rest[:cut], rest[cut:]
        if not between.startswith(u_post):
            continue
        a_pre = between[cut:]
        for k in range(len(head) + 1):
            start, u_pre = head[:k], head[k:]
            if not mid.endswith(u_pre):
                continue
            lay = Layout(start, {"user": (u_pre, u_post), "assistant": (a_pre, mid[: len(mid) - len(u_pre)])}, cue)
            if "S1" in with_system:
                x, y = with_system.split("S1", 1)
                if not x.startswith(start) or (u_pre + "U1") not in y:
                    continue
                lay.wrap["system"] = (x[len(start) :], y[: y.index(u_pre + "U1")])
            if all(_roles_ok(lay, p) and lay.render(p) == w for p, w in zip(PROBES, want)):
                return lay
    return None


def _roles_ok(layout: Layout, messages: List[dict]) -> bool:
    return all(m["role"] in layout.wrap for m in messages)


# ------------------------------------------------------------------------------------------- from a run


@dataclass
class Exported:
    """What an exported model carries about its prompt."""

    jinja: str  # tokenizer.chat_template
    ollama: Optional[str]  # Modelfile TEMPLATE, or None when the prompt cannot be said in Go's templates
    eos_token: str  # the token training ended each answer with: the GGUF's EOS
    stop_tokens: List[str]  # every token that ends an answer (EOS, end of turn)
    bos_in_prompt: bool  # the prompt starts with the BOS token (written by the template itself)
    how: str  # for the README: which prompt this is
    note: str = ""  # why the Modelfile has no TEMPLATE, when it has none


def for_format(fmt, tokenizer) -> Exported:
    """The templates for a PromptFormat and the run's tokenizer (transformers)."""
    eos = tokenizer.eos_token
    stops = [tokenizer.convert_ids_to_tokens(i) for i in fmt.stop_ids(tokenizer)]
    bos_token = tokenizer.bos_token or ""
    if fmt.kind == "alpaca":
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        bos = bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
        return Exported(
            jinja=alpaca_jinja(fmt.template_text, bos),
            ollama=alpaca_ollama(fmt.template_text, bos_token if bos else None),
            eos_token=eos,
            stop_tokens=stops,
            bos_in_prompt=bos,
            how=f"the alpaca prompt template {fmt.template} the run trained with (first line of a message: the "
            "instruction; the rest: its input)",
        )
    if fmt.kind == "llamafactory":
        lf = fmt._lf_template(tokenizer)  # also sets the tokenizer's EOS the way LLaMA-Factory trained
        jinja = jinja_template(lf, tokenizer) if fmt.template else tokenizer.chat_template
        eos = tokenizer.eos_token
        stops = [tokenizer.convert_ids_to_tokens(i) for i in fmt.stop_ids(tokenizer)]
        how = f"LLaMA-Factory's template {fmt.template or 'null (the tokenizer chat template)'}, as trained"
    elif fmt.kind == "chat":
        jinja, how = tokenizer.chat_template, "the tokenizer's chat template, as trained"
    else:
        raise ValueError(f"a {fmt.kind} prompt format has no chat template to export")
    layout = layout_of(jinja, bos_token, eos)
    return Exported(
        jinja=jinja,
        ollama=layout.ollama() if layout else None,
        eos_token=eos,
        stop_tokens=stops,
        bos_in_prompt=bool(bos_token) and render(jinja, PROBES[0], bos_token, eos).startswith(bos_token),
        how=how,
        note=""
        if layout
        else "the chat template is more than text around each turn; Ollama's Go template cannot "
        "say it: the Modelfile has no TEMPLATE (Ollama then uses the GGUF's chat template)",
    )
