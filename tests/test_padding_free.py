"""Padding-free batches (finetune/recipes/padding_free.py, Collator(flatten=True)) compute the padded batch's loss
and gradients: the same targets, the same normalisation (the Trainer's num_items_in_batch), no attention across
examples. In-process on a random 2-layer Llama (seconds); the default run and the SmolLM2 showcase train with it
(their loss curves are checked against tests/reference/loss_curves.json)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for n, prompt in ((11, 4), (5, 2), (17, 9), (8, 0)):  # prompt tokens masked (-100), as train_on_inputs=false
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("eager_max_len", [256, 4], ids=["eager-block", "sdpa-per-example"])
def test_a_padding_free_row_gives_the_padded_batchs_loss_gradients_and_token_counts(eager_max_len, monkeypatch):
    from finetune.compat.transformers import set_attn_implementation
    from finetune.recipes import padding_free
    from finetune.recipes.common import TokenMeter
    from finetune.recipes.data import Collator

    monkeypatch.setattr(padding_free, "EAGER_MAX_LEN", eager_max_len)
    examples = _examples()
    padded = Collator(0)(examples)
    flat = Collator(0, flatten=True)(examples)
    assert flat["input_ids"].shape == (1, 48) and padded["input_ids"].shape == (4, 24)  # 41 + 7 to a multiple of 8
    assert flat["position_ids"][0].tolist() == [*range(11), *range(5), *range(17), *range(8), *range(7)]
    assert padding_free.segment_bounds(flat["position_ids"]) == [0, 11, 16, 33, 41, 48]
    # logits only where a target is: not the masked prompt tokens, not each example's last token
    keep = flat["logits_to_keep"].tolist()
    assert keep == [*range(3, 10), *range(12, 15), *range(24, 32), *range(33, 40)]
    assert flat["shift_labels"][0].tolist() == [flat["input_ids"][0, i + 1].item() for i in keep]
    # the Trainer's count of items (labels != -100, before the shift) is the padded batch's
    assert int((flat["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    # the meter's supervised tokens too (the targets after the shift)
    meters = [TokenMeter(1, 0), TokenMeter(1, 0)]
    meters[0].count(padded)
    meters[1].count(flat)
    assert meters[0].target == meters[1].target == len(keep) == 25
    assert meters[0].input == meters[1].input == 41

    model = _model()
    n_items = torch.tensor(int((padded["labels"] != -100).sum()))
    results = []
    for batch, attention in ((padded, "sdpa"), (flat, padding_free.register())):
        set_attn_implementation(model.config, attention)
        model.zero_grad()
        loss = model(**batch, num_items_in_batch=n_items).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_p, grads_p), (loss_f, grads_f) = results
    assert torch.allclose(loss_p, loss_f, atol=1e-6), (loss_p, loss_f)
    for a, b in zip(grads_p, grads_f):
        assert torch.allclose(a, b, atol=1e-6)
    # and the thread count changes nothing (the row and the attention block are padded to multiples of 8 for it)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model.zero_grad()
        model(**flat, num_items_in_batch=n_items).loss.backward()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_f))
    finally:
        torch.set_num_threads(threads)

    # no attention across examples: changing the first example leaves the others' logits as they were
    set_attn_implementation(model.config, padding_free.ATTENTION)
    other = [dict(examples[0], input_ids=[(t % 63) + 1 for t in examples[0]["input_ids"]]), *examples[1:]]
    with torch.no_grad():
        a = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits
        b = model(**{k: v for k, v in Collator(0, flatten=True)(other).items() if k in ("input_ids", "position_ids")})
        b = b.logits
    assert torch.allclose(a[0, 11:], b[0, 11:], atol=1e-6) and not torch.allclose(a[0, :11], b[0, :11])


def test_padding_free_is_refused_where_it_cannot_attend_per_example():
    from transformers import LlamaConfig, PretrainedConfig

    from finetune.recipes.padding_free import unsupported_reason, varlen_attention

    assert unsupported_reason(LlamaConfig(), 256) is None
    assert "gpt2" in unsupported_reason(PretrainedConfig(model_type="gpt2"), 256)
    mistral = PretrainedConfig(model_type="mistral", sliding_window=128)
    assert "sliding window (128)" in unsupported_reason(mistral, 256)
    assert unsupported_reason(mistral, 128) is None
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="needs the row's position_ids"):
        varlen_attention(None, q, q, q, None)
