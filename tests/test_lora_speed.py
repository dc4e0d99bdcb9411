"""The LoRA forward of finetune/recipes/lora_speed.py computes what PEFT's does: MaskDropout is Bernoulli dropout
(p at 2^-16 resolution, expectation exact, identity in eval mode, reproducible from the seed, its gradient the
kept-and-scaled mask), and dropping PEFT's input cast under autocast leaves the model's outputs bit for bit the
same. In-process on a random 2-layer Llama (a second): the runs that train with it are the default run and the
SmolLM2 showcases, whose losses tests/reference/loss_curves.json checks."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_mask_dropout_is_bernoulli_dropout_with_an_exact_expectation():
    from finetune.recipes.lora_speed import MaskDropout

    drop = MaskDropout(0.05)
    assert drop.k == 3277 and abs(drop.effective_p - 0.05) < 1e-5
    x = torch.ones(1 << 20, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    sigma = (drop.effective_p * (1 - drop.effective_p) / x.numel()) ** 0.5
    assert abs(dropped - drop.effective_p) < 5 * sigma, dropped
    kept = y[y != 0].float()
    assert torch.allclose(kept, torch.full_like(kept, drop.scale), rtol=4e-3)  # bf16 of 65536/62259
    assert abs(y.float().mean().item() - 1.0) < 5 * sigma / (1 - drop.effective_p) + 4e-3
    y.float().sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * keep * scale)/dx = keep * scale, and x is ones
    torch.manual_seed(0)
    assert torch.equal(drop(torch.ones_like(x)), y), "the same seed draws the same mask"
    drop.eval()
    z = torch.randn(4, 8)
    assert drop(z) is z
    with pytest.raises(ValueError, match="resolution"):
        MaskDropout(1e-6)


def _tiny_lora_model(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, lora)
    for p in model.parameters():  # mixed precision as the recipe sets it: trainable weights fp32
        if p.requires_grad:
            p.data = p.data.float()
    return model


def test_without_the_input_cast_the_outputs_are_bit_for_bit_the_same():
    from finetune.recipes.lora_speed import MaskDropout, speed_up_lora

    model = _tiny_lora_model(0.1).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
    changed = speed_up_lora(model, mixed_precision=True)
    assert changed["dropouts"] == changed["uncast"] == 14  # 7 linear layers x 2 decoder layers
    assert changed["p"] == [(0.1, 6554 / 65536)]
    assert all(isinstance(d, MaskDropout) for m in model.modules() if hasattr(m, "lora_dropout")
               for d in m.lora_dropout.values())  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)

    model.train()  # and it trains: every LoRA weight gets a gradient through the new dropout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(grads) == 28 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_full_precision_keeps_the_cast_and_no_dropout_means_nothing_to_swap():
    from finetune.recipes.lora_speed import speed_up_lora

    changed = speed_up_lora(_tiny_lora_model(0.05), mixed_precision=False)
    assert changed["dropouts"] == 14 and changed["uncast"] == 0
    assert speed_up_lora(_tiny_lora_model(0.0), mixed_precision=True)["dropouts"] == 0
