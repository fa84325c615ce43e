"""IA³: the BERT-base count, default targets by architecture, merge equality, unmerge."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BERT, TINY_GPT2, TINY_LLAMA, TOKENIZER
from fw_ia3 import IA3Linear


def ia3_recipe(config: dict, **args) -> dict:
    return {"backbone": {"config": config, "tokenizer": TOKENIZER}, "method": {"class_path": "ia3", "init_args": args}}


def test_bert_base_default_has_55296_method_params(build):
    module = build(ia3_recipe({"model_type": "bert"}))
    counts = module.param_counts()
    assert counts.method_params == 12 * (768 + 768 + 3072) == 55_296
    assert counts.stored_params == 55_296
    modified = module.method.modified_modules
    assert sum(name.endswith("attention.output.dense") for name in modified) == 0  # the FFN only, not attention's output
    assert sum(name.endswith(".output.dense") for name in modified) == 12
    assert modified["bert.encoder.layer.0.output.dense"].startswith("IA³ input scale (+3,072)")
    assert modified["bert.encoder.layer.0.attention.self.key"].startswith("IA³ output scale (+768)")


def test_decoder_defaults_llama_gqa_and_gpt2(build):
    llama = build(ia3_recipe(TINY_LLAMA))
    kv = TINY_LLAMA["num_key_value_heads"] * TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    per_layer = 2 * kv + TINY_LLAMA["intermediate_size"]
    assert llama.param_counts().method_params == TINY_LLAMA["num_hidden_layers"] * per_layer
    gpt2 = build(ia3_recipe(TINY_GPT2))
    d = TINY_GPT2["n_embd"]
    assert gpt2.param_counts().method_params == TINY_GPT2["n_layer"] * (3 * d + 4 * d)  # fused c_attn, then c_proj's input


def _randomize(module) -> None:
    with torch.no_grad():
        for layer in module.model.modules():
            if isinstance(layer, IA3Linear):
                layer.ia3_l.uniform_(0.1, 3.0)


@pytest.mark.parametrize("config", [TINY_BERT, TINY_GPT2, TINY_LLAMA])
def test_merge_equals_unmerged_logits_and_unmerge_restores(build, config):
    module = build(ia3_recipe(config))
    module.eval()
    ids = torch.randint(1000, 2000, (2, 9))
    with torch.no_grad():
        base = module.model(input_ids=ids).logits
        _randomize(module)
        layers = [m for m in module.model.modules() if isinstance(m, IA3Linear)]
        weights = [layer.base_layer.weight.clone() for layer in layers]
        unmerged = module.model(input_ids=ids).logits
        assert (unmerged - base).abs().max() > 1e-4  # the vectors matter
        module.method.merge(module.model)
        assert (module.model(input_ids=ids).logits - unmerged).abs().max() <= 1e-5
        module.method.unmerge(module.model)
        for layer, weight in zip(layers, weights):
            assert torch.allclose(layer.base_layer.weight, weight, atol=1e-6, rtol=1e-6)


def test_fresh_ia3_leaves_logits_unchanged(build):
    base = build({"backbone": {"config": TINY_BERT}}, seed=1)
    adapted = build(ia3_recipe(TINY_BERT), seed=1)
    base.eval(), adapted.eval()
    ids = torch.randint(1000, 2000, (2, 9))
    assert torch.equal(base.model(input_ids=ids).logits, adapted.model(input_ids=ids).logits)


def test_overlapping_target_lists_fail_clearly(build):
    with pytest.raises(ValueError, match="feedforward_targets: .* also match targets"):
        build(ia3_recipe(TINY_BERT, targets=["key", "value"], feedforward_targets=["value"]))
