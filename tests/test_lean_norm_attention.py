"""The lean RMS norm (model.lean_norm) and grouped attention (model.lean_attention): the same
training as transformers' own forward (the norm bitwise; the attention's forward bitwise and
its key/value gradients the same sums in another order), exactly the activations they promise
less, and nothing changed where they do not apply."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA, TOKENIZER, padded_ids

from framework.lean_attention import NAME, lean_grouped_attention
from framework.lean_norm import lean_rms_norms

LORA_ALL = {"class_path": "lora", "init_args": {"r": 4, "targets": ["all-linear"], "dropout": 0.1}}
BATCH, LENGTH = 3, 9
LAYERS, HIDDEN = TINY_LLAMA["num_hidden_layers"], TINY_LLAMA["hidden_size"]
HEADS, KV_HEADS = TINY_LLAMA["num_attention_heads"], TINY_LLAMA["num_key_value_heads"]


def lm(**switches: bool) -> dict:
    return {"backbone": {"config": TINY_LLAMA, "tokenizer": TOKENIZER}, "task": {"class_path": "CausalLM"},
            "method": LORA_ALL, **switches}


def lm_batch() -> dict[str, torch.Tensor]:
    ids = padded_ids(batch=BATCH, length=LENGTH)  # one padded row: the attention has a mask
    return {**ids, "labels": ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)}


def train_step(module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and the bytes autograd saved, with the same LoRA dropout masks."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    module.model.zero_grad()
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.task.step(module.model, batch)[0]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(saved.values())


def pair(build, switch: str) -> tuple:
    """The tiny Llama with ``switch`` off and on (the other lean layers on), same weights."""
    off, on = build(lm(**{switch: False})), build(lm(**{switch: True}))
    off.model.load_state_dict(on.model.state_dict())
    return off, on


def test_lean_norm_is_bitwise_and_lora_keeps_no_copy_of_the_norms_output(build):
    off, on = pair(build, "lean_norm")
    batch = lm_batch()
    (loss_off, grads_off, bytes_off), (loss_on, grads_on, bytes_on) = train_step(off, batch), train_step(on, batch)
    assert torch.equal(loss_off, loss_on)
    assert grads_off.keys() == grads_on.keys() and all(torch.equal(grads_off[n], grads_on[n]) for n in grads_off)
    hidden = BATCH * LENGTH * HIDDEN * 4  # one hidden-width float32 activation
    # both norms of every layer, except the first layer's input norm: its input (the frozen
    # embeddings) needs no gradient, so the norm keeps nothing to recompute from
    assert bytes_off - bytes_on == (2 * LAYERS - 1) * hidden


def test_lean_attention_forward_is_bitwise_and_keeps_grouped_keys_and_values(build):
    off, on = pair(build, "lean_attention")
    assert on.model.config._attn_implementation == NAME and off.model.config._attn_implementation == "sdpa"
    batch = lm_batch()
    (loss_off, grads_off, bytes_off), (loss_on, grads_on, bytes_on) = train_step(off, batch), train_step(on, batch)
    assert torch.equal(loss_off, loss_on)
    assert grads_off.keys() == grads_on.keys()
    for name in grads_off:  # key/value gradients: the group's heads summed in the kernel, not after it
        assert (grads_on[name] - grads_off[name]).norm() <= 1e-5 * grads_off[name].norm(), name
    head_dim = HIDDEN // HEADS
    repeated = BATCH * (HEADS - KV_HEADS) * LENGTH * head_dim * 4  # one tensor's repeated heads
    assert bytes_off - bytes_on == LAYERS * 2 * repeated  # keys and values of every layer


def test_lean_attention_changes_only_training_and_only_this_model(build):
    off, on = pair(build, "lean_attention")
    ids = padded_ids(batch=BATCH, length=LENGTH)
    on.model.eval(), off.model.eval()
    with torch.no_grad():
        assert torch.equal(on.model(**ids).logits, off.model(**ids).logits)
        generated = [m.model.generate(**ids, max_new_tokens=4, do_sample=False) for m in (on, off)]
    assert torch.equal(*generated)
    assert off.model.config._attn_implementation == "sdpa"  # built after `on`: not switched by it
    assert NAME not in str(on.model.config.to_dict())  # a saved config.json names no fw attention


@pytest.mark.parametrize("config", [TINY_BERT, {**TINY_LLAMA, "num_key_value_heads": TINY_LLAMA["num_attention_heads"]}],
                         ids=["bert", "llama-without-gqa"])
def test_lean_layers_leave_other_models_as_they_are(build, config):
    task = {"class_path": "CausalLM"} if config["model_type"] == "llama" else None
    module = build({"backbone": {"config": config, "tokenizer": TOKENIZER}, **({"task": task} if task else {})})
    assert not lean_grouped_attention(module.model)
    assert module.model.config._attn_implementation != NAME
    if config["model_type"] == "bert":
        assert lean_rms_norms(module.model) == 0


def test_lean_norm_switch(build):
    off, on = build(lm(lean_norm=False)), build(lm(lean_norm=True))
    norms = [m for name, m in on.model.named_modules() if name.endswith("norm")]
    assert len(norms) == 2 * LAYERS + 1 and all("forward" in m.__dict__ for m in norms)
    assert not any("forward" in m.__dict__ for name, m in off.model.named_modules() if name.endswith("norm"))
    assert lean_rms_norms(on.model) == 0  # already lean: not wrapped twice


def test_a_tensor_changed_in_place_after_marking_has_no_recipe():
    from framework.recompute import mark, recompute_recipe

    x = torch.randn(4, requires_grad=True)
    y = mark(x * 2, torch.mul, x, torch.tensor(2.0))
    assert recompute_recipe(y) is not None and torch.equal(recompute_recipe(y)[0](*recompute_recipe(y)[1]), y)
    with torch.no_grad():
        y.add_(1)  # what the recipe gives is not y any more
    assert recompute_recipe(y) is None and recompute_recipe(x) is None


def test_lora_adds_in_place_only_into_an_output_nothing_else_holds():
    from fw_lora import LoRALinear

    layer = LoRALinear(torch.nn.Linear(8, 6), r=2, alpha=4).train()
    torch.nn.init.normal_(layer.lora_B)  # a non-zero update
    x = torch.randn(3, 8)
    expected = layer.base_layer(x) + layer.lora_update(x)
    assert torch.equal(layer(x), expected)  # in place: bitwise the out-of-place sum
    seen = []
    layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out))
    assert torch.equal(layer(x), expected)
    assert torch.equal(seen[0], layer.base_layer(x))  # what the hook holds is the base output
