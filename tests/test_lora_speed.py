"""The LoRA forward of finetune/recipes/lora_speed.py computes what PEFT's does: MaskDropout is Bernoulli dropout
(p at 2^-16 resolution, expectation exact, identity in eval mode, reproducible from the seed, its gradient the
kept-and-scaled mask), dropping PEFT's input cast under autocast leaves the model's outputs bit for bit the same,
and the update added inside the base matmul reaches the output where PEFT's rounding dropped it (with PEFT's
gradients). In-process (seconds): the runs that train with it are the default run and the SmolLM2 showcases,
whose losses tests/reference/loss_curves.json checks."""

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
    assert changed["dropouts"] == changed["uncast"] == changed["single_rounding"] == 14  # 7 linears x 2 layers
    assert changed["p"] == [(0.1, 6554 / 65536)]
    assert all(isinstance(d, MaskDropout) for m in model.modules() if hasattr(m, "lora_dropout")
               for d in m.lora_dropout.values())  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        single = model(input_ids=ids).logits
    for layer in _lora_layers(model):  # PEFT's own forward again, without its input cast
        del layer.forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert not torch.equal(single, after) and torch.allclose(single.float(), after.float(), atol=0.05)

    model.train()  # and it trains: every LoRA weight gets a gradient through the new dropout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(grads) == 28 and all(g is not None and g.abs().sum() > 0 for g in grads)


def _lora_layers(model):
    from finetune.recipes.lora_speed import lora_layers

    return lora_layers(model)


def _update_reaching_the_output(forward, layer, x, update):
    """Least-squares slope of (output - rounded exact base output) on the exact update: 1 when the update moves the
    output as often as its size says, 0 when it is rounded away."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward(x).float()
    base = (x.float() @ layer.base_layer.weight.float().t()).bfloat16().float()
    return float(((out - base) * update).sum() / (update * update).sum())


def test_the_update_is_added_inside_the_base_matmul_and_not_rounded_away():
    import types

    from peft import LoraConfig, get_peft_model

    from finetune.recipes.lora_speed import single_rounding_forward

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False)).to(torch.bfloat16)
    model = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False))
    layer = _lora_layers(model)[0]
    for p in layer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    x = torch.randn(512, 256).bfloat16()
    # an update an eighth of a bf16 step of the outputs (early training: LoRA B starts at zero)
    with torch.no_grad():
        out_scale = (x.float() @ layer.base_layer.weight.float().t()).abs().mean()
        raw = layer.lora_B["default"](layer.lora_A["default"](x.float())) * layer.scaling["default"]
        layer.lora_B["default"].weight.mul_(out_scale * 2**-11 / raw.abs().mean())
        update = layer.lora_B["default"](layer.lora_A["default"](x.float())) * layer.scaling["default"]
    layer.eval()
    peft_slope = _update_reaching_the_output(layer, layer, x, update)
    single = types.MethodType(single_rounding_forward, layer)
    single_slope = _update_reaching_the_output(single, layer, x, update)
    assert peft_slope < 0.3, peft_slope  # PEFT: base(x) is on the bf16 grid, base + small update rounds back to it
    assert 0.8 < single_slope < 1.2, single_slope

    layer.train()  # the same gradients as PEFT's forward, up to bf16 rounding
    grads = []
    for forward in (layer, single):
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(3)
            forward(xg).float().pow(2).mean().backward()
        grads.append([xg.grad.float()] + [p.grad.clone() for p in layer.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert ((a - b).norm() / b.norm()).item() < 0.01  # measured: 0.2-0.4%

    # any other state takes PEFT's forward: adapters disabled, merged
    with torch.no_grad():
        with model.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(single(x), layer.base_layer(x))
        layer.eval()
        layer.merge()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(single(x), layer.base_layer(x))


def test_full_precision_keeps_the_cast_and_no_dropout_means_nothing_to_swap():
    from finetune.recipes.lora_speed import speed_up_lora

    changed = speed_up_lora(_tiny_lora_model(0.05), mixed_precision=False)
    assert changed["dropouts"] == 14 and changed["uncast"] == changed["single_rounding"] == 0
    assert speed_up_lora(_tiny_lora_model(0.0), mixed_precision=True)["dropouts"] == 0
