"""FlagEmbedding internals (FlagEmbedding 1.4.2): how its Trainers save the tokenizer beside the weights."""

from __future__ import annotations

from finetune.compat import private

DIST, PINNED = "FlagEmbedding", "1.4.2"
TOUCHES = (
    "FlagEmbedding.abc.finetune.embedder.AbsTrainer.AbsEmbedderTrainer._save_processing_class",
    "FlagEmbedding.abc.finetune.reranker.AbsTrainer.AbsRerankerTrainer._save_processing_class",
)


def save_processing_class(trainer, output_dir: str) -> None:
    """Save the trainer's tokenizer as FlagEmbedding's own _save does."""
    private(trainer, "_save_processing_class", DIST, PINNED)(output_dir)
