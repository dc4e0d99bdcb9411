"""OmegaConf internals (omegaconf 2.3.1): walking a config node by key."""

from __future__ import annotations

from finetune.compat import private

DIST, PINNED = "omegaconf", "2.3.1"
TOUCHES = ("omegaconf.DictConfig._get_node",)


def child(node, key: str):
    """The child node ``key`` of a DictConfig node (not its value: a structured node keeps its schema)."""
    return private(node, "_get_node", DIST, PINNED)(key)
