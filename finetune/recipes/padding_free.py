"""Padding-free batches: a micro-batch's examples side by side in one row, each attending only to itself.

A padded micro-batch of 8 alpaca examples (right padding to the longest, a multiple of 8) is 10% padding on the
shipped data with SmolLM2's tokenizer (5,519 real positions of 6,144 over 12 random batches), and every linear
layer pays for those positions, the output layer and the loss for them and for every masked prompt token. Here the
collator (finetune/recipes/data.py ``Collator(flatten=True)``) concatenates the examples into one row with
``position_ids`` that restart at 0 for each example, and passes ``logits_to_keep``: the positions that have a
target, where alone the model computes logits (with ``train_on_inputs: false`` the prompts' logits are skipped).
``varlen_attention``, registered with transformers' attention interface, attends within each example: the
examples gathered into a padded block for the attention alone (eager, causal and key-padding mask) when none is
longer than EAGER_MAX_LEN tokens, transformers' SDPA per example above (the CPU's counterpart of flash-attention's
variable-length kernel; per example SDPA was 7% slower than padded eager batches on short examples, measured).

The loss is the padded batch's, target for target: ``shift_labels`` are the kept positions' targets (each example's
labels shifted by one, so no example predicts the next one's first token), which transformers' causal-LM loss takes
as they are, and ``labels`` stay each example's own, so the Trainer's ``num_items_in_batch`` (it counts
``labels != -100`` before the shift) is the padded batch's count too.

Measured (SmolLM2-135M, LoRA r 8 on every linear layer, bf16 autocast, micro-batch 8, shipped data, 2 threads,
steps interleaved per batch in one process): 0.96x the time of padded batches with eager attention.

Used by the alpacalora recipe (backend.padding_free: null = on CPU for the model types below, with attention auto
and no packing); the attention implementation is switched for training and evaluation and restored afterwards.
"""

from __future__ import annotations

from typing import List, Optional

ATTENTION = "finetune_varlen"
# eager attention up to this many tokens, SDPA above: padded batches with attention auto on CPU (alpacalora) and
# the longest example of a padding-free row (measured on the 30M Llama: see alpacalora.attention_to_switch)
EAGER_MAX_LEN = 256
# model types whose decoder layers pass position_ids to the attention call (transformers 5.6, checked in the
# modelling code) and whose attention is plain causal SDPA (no logit soft-capping); a sliding window only where
# no example is longer than it
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported_reason(config, cutoff_len: int) -> Optional[str]:
    """Why padding-free batches cannot train this model (None: they can)."""
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and cutoff_len > int(window):
        return f"its sliding window ({window}) is shorter than cutoff_len ({cutoff_len})"
    return None


def segment_bounds(position_ids) -> List[int]:
    """Start of each example in the row (where its position is 0), and the row's length."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return starts + [int(position_ids.shape[-1])]


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention within each example of a padding-free row (query/key/value: 1 x heads x tokens x head dim; returns
    1 x tokens x heads x head dim, as transformers' attention functions do): eager attention on the examples
    gathered into a padded block when the longest is at most EAGER_MAX_LEN tokens, else SDPA per example."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise RuntimeError(
            f"{ATTENTION} attends within the examples of one padding-free row: it needs the row's position_ids and "
            f"no cache (got batch {query.shape[0]}, {query.shape[2]} queries, {key.shape[2]} keys, position_ids "
            f"{'missing' if position_ids is None else 'given'})"
        )
    bounds = segment_bounds(position_ids)
    longest = max(e - s for s, e in zip(bounds, bounds[1:]))
    attend = eager_block_attention if longest <= EAGER_MAX_LEN else sdpa_per_example_attention
    return attend(module, query, key, value, bounds, dropout=dropout, scaling=scaling)


def sdpa_per_example_attention(module, query, key, value, bounds, dropout=0.0, scaling=None):
    """transformers' SDPA attention, causal, on each example's slice of the row, zero-padded at its end to a multiple
    of 8 (the padded positions come after every real one: causal attention keeps them out; with other lengths the
    backward summed in an order that depends on the thread count)."""
    import torch
    from torch.nn import functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    outs = []
    for s, e in zip(bounds, bounds[1:]):
        pad = -(e - s) % 8
        q, k, v = (F.pad(t[:, :, s:e], (0, 0, 0, pad)) for t in (query, key, value))
        out = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)[0]
        outs.append(out[:, : e - s])
    return torch.cat(outs, dim=1), None


def eager_block_attention(module, query, key, value, bounds, dropout=0.0, scaling=None):
    """transformers' eager attention on the row's examples gathered into a padded (examples x heads x longest x
    head dim) block, for the attention alone (causal and key-padding mask); the output scattered back to the row."""
    import torch
    from transformers.models.llama.modeling_llama import eager_attention_forward

    starts = torch.tensor(bounds[:-1])
    lengths = torch.tensor(bounds[1:]) - starts
    # the block's length a multiple of 8, as a padded batch's: with another length the attention's backward summed
    # in an order that depends on the thread count (measured: 1 vs 2 threads gave other gradients)
    longest = -(-int(lengths.max()) // 8) * 8
    steps = torch.arange(longest)
    valid = steps[None, :] < lengths[:, None]  # examples x longest
    index = torch.where(valid, starts[:, None] + steps[None, :], starts[:, None])
    flat_index = index.flatten().to(query.device)

    def gather(t):  # 1 x heads x tokens x d -> examples x heads x longest x d
        return t[0].index_select(1, flat_index).view(t.shape[1], *index.shape, t.shape[-1]).transpose(0, 1)

    causal = steps[None, :] <= steps[:, None]  # longest x longest
    allowed = (causal[None] & valid[:, None, :]).to(query.device)  # examples x longest(query) x longest(key)
    mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
    mask = mask.masked_fill_(~allowed, torch.finfo(query.dtype).min)[:, None]
    out, _ = eager_attention_forward(module, gather(query), gather(key), gather(value), mask, dropout=dropout,
                                     scaling=scaling)  # fmt: skip
    return out[valid.to(out.device)].unsqueeze(0), None


def register() -> str:
    """Register the attention function with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, varlen_attention)
    return ATTENTION
