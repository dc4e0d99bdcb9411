"""llama-cpp-python internals (llama-cpp-python 0.3.36, in llama.cpp's own environment): a loaded model's tokens."""

from __future__ import annotations

from typing import Callable

from finetune.compat import private

DIST, PINNED = "llama-cpp-python", "0.3.36"
TOUCHES = ("llama_cpp.Llama._model", "llama_cpp._internals.LlamaModel.token_get_text")


def token_text(llm) -> Callable[[int], str]:
    """Token id -> its text in a loaded GGUF (Llama._model.token_get_text; the public API detokenises to bytes)."""
    return private(private(llm, "_model", DIST, PINNED), "token_get_text", DIST, PINNED)
