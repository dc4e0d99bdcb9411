"""Prompt templates by name: finetune/templates/<name>.json, the alpaca-lora format (prompt_input, prompt_no_input,
response_split). Standard library only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


def load_template(name: str) -> dict:
    path = TEMPLATES / f"{name or 'alpaca'}.json"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATES.glob("*.json"))
        raise ValueError(f"prompt_template_name={name!r}: no {path}; known: {', '.join(known)}")
    return json.loads(path.read_text(encoding="utf-8"))


def template_names() -> List[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.json"))


def alpaca_prompt(template: dict, instruction: str, input: Optional[str] = None) -> str:
    """alpaca-lora's Prompter.generate_prompt without the label: prompt_input if input is non-empty."""
    if input:
        return template["prompt_input"].format(instruction=instruction, input=input)
    return template["prompt_no_input"].format(instruction=instruction)
