"""LLaMA-Factory internals (llamafactory 0.9.5): the chat template it writes for one of its templates."""

from __future__ import annotations

from finetune.compat import private

DIST, PINNED = "llamafactory", "0.9.5"
TOUCHES = ("llamafactory.data.template.Template._get_jinja_template",)


def jinja_template(template, tokenizer) -> str:
    """The Jinja chat template LLaMA-Factory saves with a model trained on ``template`` (what its export writes)."""
    return private(template, "_get_jinja_template", DIST, PINNED)(tokenizer)
