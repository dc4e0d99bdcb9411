"""transformers internals (transformers 5.6.0): the attention implementation a config holds, a hook around
Trainer._save_checkpoint, and the weights' save and resume methods (FlagEmbedding's Trainer is a transformers one).
Imports nothing heavy itself: the callers hold the objects."""

from __future__ import annotations

from typing import Callable

from finetune.compat import guard, private

DIST, PINNED = "transformers", "5.6.0"
TOUCHES = (
    "transformers.PretrainedConfig._attn_implementation",
    "transformers.Trainer._save_checkpoint",
    "transformers.Trainer._save",
    "transformers.Trainer._load_from_checkpoint",
)


def attn_implementation(config) -> str:
    """What the attention layers read on every call ("eager", "sdpa", ...)."""
    return private(config, "_attn_implementation", DIST, PINNED)


def set_attn_implementation(config, impl: str) -> None:
    """Switch the attention of a loaded model between calls (the alpacalora recipe does it per batch on CPU)."""
    if attn_implementation(config) != impl:
        config._attn_implementation = impl


class SaveCheckpointHook:
    """A Trainer mixin (before Trainer in the bases): ``around_save_checkpoint(save)`` runs around every checkpoint
    save (Trainer._save_checkpoint), and must call ``save()``."""

    def _save_checkpoint(self, model, trial):
        guard(DIST, PINNED, "the checkpoint hook")
        own = private(super(), "_save_checkpoint", DIST, PINNED)
        return self.around_save_checkpoint(lambda: own(model, trial))

    def around_save_checkpoint(self, save: Callable[[], None]) -> None:
        save()


def wrap_save(trainer, make: Callable[[Callable], Callable]) -> None:
    """Replace ``trainer._save(output_dir, state_dict)`` (the weights of a save) by ``make(own_save)``."""
    trainer._save = make(private(trainer, "_save", DIST, PINNED))


def wrap_load_from_checkpoint(trainer, make: Callable[[Callable], Callable]) -> None:
    """Replace ``trainer._load_from_checkpoint(resume_from_checkpoint, model=None)`` by ``make(own_load)``."""
    trainer._load_from_checkpoint = make(private(trainer, "_load_from_checkpoint", DIST, PINNED))
