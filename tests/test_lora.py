"""LoRA: parameter counts, initialisation, merge/unmerge equality, GPT-2 Conv1D, rsLoRA."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_BERT, TINY_GPT2, TINY_LLAMA, lora_recipe
from fw_lora import LoRALinear


def _randomize_lora(module) -> None:
    """B starts at zero (LoRA is a no-op at init); give it values so merging matters."""
    with torch.no_grad():
        for layer in module.model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(0, 0.5)


def test_bert_base_query_value_r8_has_294912_method_params(build):
    # BertConfig() defaults: 12 layers, hidden 768 -> 12 * 2 * 8 * (768 + 768)
    module = build(lora_recipe({"model_type": "bert"}, r=8, targets=["query", "value"]))
    counts = module.param_counts()
    assert counts.method_params == 294_912
    assert counts.stored_params == 294_912
    assert counts.head_params == 768 * 2 + 2  # the classifier trains as the task head
    assert counts.trainable_params == 294_912 + 1_538
    assert len(module.method.modified_modules) == 24


def test_default_targets_are_the_architectures_query_and_value(build):
    module = build(lora_recipe(TINY_BERT, r=4))
    assert sorted({name.rsplit(".", 1)[1] for name in module.method.modified_modules}) == ["query", "value"]
    llama = build(lora_recipe(TINY_LLAMA, r=4))
    assert sorted({name.rsplit(".", 1)[1] for name in llama.method.modified_modules}) == ["q_proj", "v_proj"]


def test_gpt2_c_attn_count_is_r_times_in_plus_out_per_layer(build):
    r = 8
    module = build(lora_recipe(TINY_GPT2, r=r, targets=["c_attn"]))
    d = TINY_GPT2["n_embd"]
    assert module.param_counts().method_params == TINY_GPT2["n_layer"] * r * (d + 3 * d)
    layer = module.model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    assert layer.lora_A.shape == (r, d) and layer.lora_B.shape == (3 * d, r)


def test_initialisation_b_zero_a_kaiming_and_scaling(build):
    module = build(lora_recipe(TINY_BERT, r=4, alpha=8))
    layer = module.model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(layer.lora_A.shape[1])  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    assert layer.scaling == 2.0
    rs = build(lora_recipe(TINY_BERT, r=4, alpha=8, rslora=True))
    assert rs.model.get_submodule("bert.encoder.layer.0.attention.self.query").scaling == 4.0


def test_fresh_lora_leaves_logits_unchanged(build):
    base = build({"backbone": {"config": TINY_BERT}}, seed=3)
    adapted = build(lora_recipe(TINY_BERT, r=4), seed=3)
    ids = torch.randint(1000, 2000, (2, 9))
    base.eval(), adapted.eval()
    assert torch.equal(base.model(input_ids=ids).logits, adapted.model(input_ids=ids).logits)


@pytest.mark.parametrize("config,targets", [
    (TINY_BERT, ["query", "value", "intermediate.dense"]), (TINY_GPT2, ["c_attn", "c_fc"]), (TINY_LLAMA, ["all-linear"])])
def test_merge_gives_the_same_logits_and_unmerge_restores_the_base(build, config, targets):
    module = build(lora_recipe(config, r=4, targets=targets))
    _randomize_lora(module)
    module.eval()
    ids = torch.randint(1000, 2000, (2, 11))
    layers = [m for m in module.model.modules() if isinstance(m, LoRALinear)]
    base_weights = [layer.base_layer.weight.detach().clone() for layer in layers]
    with torch.no_grad():
        unmerged = module.model(input_ids=ids).logits
        module.method.merge(module.model)
        assert all(layer.merged for layer in layers)
        assert not torch.equal(layers[0].base_layer.weight, base_weights[0])
        merged = module.model(input_ids=ids).logits
        assert (merged - unmerged).abs().max() <= 1e-5
        module.method.unmerge(module.model)
        for layer, weight in zip(layers, base_weights):
            assert torch.allclose(layer.base_layer.weight, weight, atol=1e-6, rtol=0)
        assert (module.model(input_ids=ids).logits - unmerged).abs().max() <= 1e-5


def test_unload_leaves_a_plain_transformers_model(build):
    module = build(lora_recipe(TINY_BERT, r=4))
    _randomize_lora(module)
    module.eval()
    ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        before = module.model(input_ids=ids).logits
        plain = module.method.unload(module.model)
        assert not any(isinstance(m, LoRALinear) for m in plain.modules())
        assert (plain(input_ids=ids).logits - before).abs().max() <= 1e-5
    assert set(plain.state_dict()) == set(type(plain)(plain.config).state_dict())


def test_bf16_base_with_fp32_adapters_runs(build):
    recipe = lora_recipe(TINY_LLAMA, r=4)
    recipe["backbone"]["dtype"] = "bfloat16"
    module = build(recipe)
    layer = module.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    out = module.model(input_ids=torch.randint(1000, 2000, (1, 5))).logits
    out.float().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32


@pytest.mark.parametrize("bad,field", [({"r": 0}, "r"), ({"r": -2}, "r"), ({"alpha": 0}, "alpha"), ({"dropout": 1.5}, "dropout")])
def test_bad_hyper_parameters_name_their_own_argument(bad, field):
    """A plugin names its own argument; the recipe path is the core's to add (test_cli)."""
    from fw_lora import LoRA

    with pytest.raises(ValueError, match=f"^{field}: "):
        LoRA(**bad)
