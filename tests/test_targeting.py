"""Targeting by name: suffixes, globs, regexes, all-linear, heads excluded, clear errors;
the registry's name resolution; the modified-module tree."""

from __future__ import annotations

import pytest
from conftest import TINY_BERT, TINY_GPT2, TINY_LLAMA
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from framework import registry
from framework.architectures import role_patterns
from framework.targeting import find_modules, fold_indices, head_module_names, matches
from framework.tree import render_tree


def model(config: dict, cls=AutoModelForSequenceClassification) -> nn.Module:
    fields = dict(config)
    return cls.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))


@pytest.mark.parametrize(
    "name,pattern,expected",
    [
        ("bert.encoder.layer.0.attention.self.query", "query", True),
        ("bert.encoder.layer.0.attention.self.query", "self.query", True),
        ("bert.encoder.layer.0.attention.self.x_query", "query", False),
        ("bert.encoder.layer.0.attention.output.dense", "output.dense", True),
        ("bert.encoder.layer.0.output.dense", "*.layer.*.output.dense", True),
        ("bert.encoder.layer.0.attention.output.dense", r"re:.*\.layer\.\d+\.output\.dense", False),
        ("model.layers.3.self_attn.q_proj", r"re:.*\.(q|v)_proj", True),
    ],
)
def test_pattern_kinds(name, pattern, expected):
    assert matches(name, pattern) is expected


def test_all_linear_excludes_heads_and_output_embeddings():
    bert = model(TINY_BERT)
    names = [n for n, _ in find_modules(bert, ["all-linear"])]
    assert "classifier" not in names and "bert.pooler.dense" in names and len(names) == 2 * 6 + 1
    llama = model(TINY_LLAMA, AutoModelForCausalLM)
    assert "lm_head" in head_module_names(llama)
    assert all(not n.startswith("lm_head") for n, _ in find_modules(llama, ["all-linear"]))


def test_no_match_lists_folded_module_names():
    with pytest.raises(ValueError) as err:
        find_modules(model(TINY_BERT), ["query", "nothing_here"], field="model.method.init_args.targets")
    message = str(err.value)
    assert message.startswith("model.method.init_args.targets: pattern 'nothing_here' matches no Linear/Conv1D module")
    assert "bert.encoder.layer.*.attention.self.value" in message and "layer.0." not in message


def test_role_defaults_per_architecture():
    assert role_patterns(model(TINY_GPT2), ["query", "value"]) == ["attn.c_attn"]
    llama = model(TINY_LLAMA)
    ffn_down = [n for n, _ in find_modules(llama, role_patterns(llama, ["ffn_down"]), require_each=False)]
    assert ffn_down == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    bert = model(TINY_BERT)
    bert_down = [n for n, _ in find_modules(bert, role_patterns(bert, ["ffn_down"]), require_each=False)]
    assert bert_down == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    with pytest.raises(ValueError, match="no default targets for model_type 'xlnet'"):
        role_patterns(model({"model_type": "xlnet", "d_model": 32, "n_layer": 1, "n_head": 4, "d_inner": 64, "vocab_size": 100}), ["query"])


def test_fold_indices():
    assert fold_indices(["a.0.b", "a.1.b", "a.10.c", "x"]) == ["a.*.b", "a.*.c", "x"]


def test_registry_resolves_registered_names_in_recipes_and_argv():
    resolved = registry.resolve_names({"model": {"method": {"class_path": "lora", "init_args": {"r": 2}}},
                                       "data": {"class_path": "ClassificationData"}})
    assert resolved["model"]["method"] == {"class_path": "fw_lora.LoRA", "init_args": {"r": 2}}
    assert resolved["data"]["class_path"] == "ClassificationData"
    resolved = registry.resolve_cli_names(["fit", "--model.method", "lora", "--x", "lora"])
    assert resolved == ["fit", "--model.method", "fw_lora.LoRA", "--x", "lora"]
    assert registry.resolve_cli_names(["--model.method.class_path=lora"]) == ["--model.method.class_path=fw_lora.LoRA"]
    with pytest.raises(registry.UnknownMethodError, match="unknown method 'nope'"):
        registry.resolve_names({"model": {"method": "nope"}})
    assert registry.get("lora").__name__ == "LoRA"


def test_tree_folds_identical_layers_and_shows_notes():
    bert = model({**TINY_BERT, "num_hidden_layers": 3})
    modified = {f"bert.encoder.layer.{i}.attention.self.query": "LoRA" for i in range(3)}
    modified["bert.encoder.layer.2.output.dense"] = "other"
    text = render_tree(bert, modified)
    assert "0-1 (BertLayer) x2" in text and "2 (BertLayer)" in text
    assert "query (Linear)  <- LoRA" in text and "dense (Linear)  <- other" in text
