"""Prefix tuning: trained vs stored counts, key/value shapes under grouped-query attention, the
stored flat prefix, gradient checkpointing refused, backbones a prefix cannot reach.

Training, padding, generation and checkpoints are tested with the other virtual-token
methods in test_prompt_methods.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_BERT, TINY_GPT2, TINY_LLAMA, TOKENIZER, write_recipe
from fw_prefix import STORED_KEY, PrefixEncoder, kv_shape

from framework.cli import main


def prefix_recipe(backbone: dict, task: str | None = None, **args) -> dict:
    out = {"backbone": {"config": backbone, "tokenizer": TOKENIZER}, "method": {"class_path": "prefix", "init_args": args}}
    if task:
        out["task"] = {"class_path": task}
    return out


def test_inspect_reports_trained_and_stored_counts_on_bert_base(tmp_path, capsys):
    recipe = {"model": prefix_recipe({"model_type": "bert"}, prefix_length=30, bottleneck=512)}
    recipe["model"]["backbone"].pop("tokenizer")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["inspect", "--config", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    embedding, mlp_in, mlp_out = 30 * 768, 768 * 512 + 512, 512 * 12 * 2 * 768 + 12 * 2 * 768
    assert report["method_params"] == embedding + mlp_in + mlp_out == 9_872_384  # what trains
    assert report["stored_params"] == 30 * 12 * 2 * 768 == 552_960  # the flat prefix
    assert report["trainable_params"] == 9_872_384 + 768 * 2 + 2
    assert report["modified_modules"]["prefix_encoder"].startswith("prefix tuning: 30 positions x 12 layers x 2 x 768")
    assert main(["inspect", "--config", path, "--json", "--model.method.init_args.reparameterize", "false"]) == 0
    flat = json.loads(capsys.readouterr().out)
    assert flat["method_params"] == flat["stored_params"] == 552_960


def test_grouped_query_attention_gets_key_value_width_prefixes(build):
    module = build(prefix_recipe(TINY_LLAMA, "CausalLM", prefix_length=3, bottleneck=16))
    shape = kv_shape(module.model)
    head_dim = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (2, 2, head_dim)
    assert shape.kv_width == 16 < TINY_LLAMA["hidden_size"]
    stored = module.method.stored_state_dict(module.model)[STORED_KEY]
    assert stored.shape == (3, 2 * 2 * 16)
    ids = torch.randint(1000, 2000, (2, 5))
    out = module.model(input_ids=ids, use_cache=True)
    keys = out.past_key_values.layers[0].keys
    assert keys.shape == (2, 2, 3 + 5, head_dim)  # the prefix in front of the tokens, at the kv width
    torch.testing.assert_close(keys[:, :, :3], stored[:, :16].view(3, 2, head_dim).transpose(0, 1).expand(2, -1, -1, -1))


def test_gpt2_prefix_is_hidden_wide():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in TINY_GPT2.items() if k != "model_type"}))
    shape = kv_shape(model)
    assert (shape.num_layers, shape.num_kv_heads, shape.kv_width) == (2, 4, TINY_GPT2["n_embd"])


def test_flat_prefix_layout_is_layer_then_key_value_then_heads():
    from fw_prefix import KVShape

    shape = KVShape(num_layers=2, num_kv_heads=2, head_dim=3)
    encoder = PrefixEncoder(shape, prefix_length=4, token_dim=8, bottleneck=None)
    flat = torch.arange(4 * shape.flat_width, dtype=torch.float32).view(4, shape.flat_width)
    encoder.use_stored(flat)
    (k0, v0), (k1, v1) = encoder.key_values(batch_size=2, dtype=torch.float32, device=torch.device("cpu"))
    assert k0.shape == (2, 2, 4, 3)
    assert torch.equal(k0[1, 1, 2], flat[2, 3:6])  # position 2, layer 0, key, head 1
    assert torch.equal(v0[0, 0, 0], flat[0, 6:9])  # layer 0 value, head 0
    assert torch.equal(k1[0, 0, 3], flat[3, 12:15])  # layer 1 key
    assert torch.equal(v1[0, 1, 1], flat[1, 21:24])  # layer 1 value, head 1


@pytest.mark.parametrize("backbone,task", [(TINY_BERT, None), (TINY_LLAMA, "CausalLM")], ids=["bert", "llama"])
def test_the_stored_flat_prefix_alone_reproduces_the_outputs(build, backbone, task):
    module = build(prefix_recipe(backbone, task, prefix_length=3, bottleneck=16), seed=1)
    with torch.no_grad():
        for p in module.model.prefix_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    stored = module.method.stored_state_dict(module.model)
    assert STORED_KEY in stored and not any(k.startswith("prefix_encoder.") and k != STORED_KEY for k in stored)
    counts = module.param_counts()
    assert counts.stored_params == stored[STORED_KEY].numel() < counts.method_params
    fresh = build(prefix_recipe(backbone, task, prefix_length=3, bottleneck=16), seed=1)
    fresh.method.load_stored_state_dict(fresh.model, stored)
    ids = torch.randint(1000, 2000, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().model(input_ids=ids).logits, module.eval().model(input_ids=ids).logits)


def test_without_reparameterization_the_prefix_itself_trains(build):
    module = build(prefix_recipe(TINY_BERT, prefix_length=5, reparameterize=False))
    counts = module.param_counts()
    assert counts.method_params == counts.stored_params == 5 * 2 * 2 * TINY_BERT["hidden_size"]
    assert module.model.prefix_encoder.mlp is None


# -- refusals ----------------------------------------------------------------------------------


def test_gradient_checkpointing_is_refused_with_a_clear_message(build):
    with pytest.raises(ValueError, match="model.gradient_checkpointing: prefix tuning reaches every layer through the key/value cache"):
        build({**prefix_recipe(TINY_LLAMA, "CausalLM", prefix_length=2), "gradient_checkpointing": True})
    module = build(prefix_recipe(TINY_GPT2, "CausalLM", prefix_length=2))
    with pytest.raises(ValueError, match="set model.gradient_checkpointing: false"):
        module.model.gradient_checkpointing_enable()


def test_gradient_checkpointing_through_the_cli_fails_before_training(tmp_path, capsys, instruction_jsonl):
    recipe = {
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_checkpointing": False},
        "model": {**prefix_recipe(TINY_LLAMA, "CausalLM", prefix_length=2), "gradient_checkpointing": True},
        "data": {"class_path": "InstructionData", "init_args": {"data_files": instruction_jsonl}},
    }
    assert main(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)]) == 2
    err = capsys.readouterr().err
    assert "fw: error: model.gradient_checkpointing: prefix tuning" in err


def test_checkpointing_switched_on_behind_the_guard_is_refused_at_the_first_step(build):
    module = build(prefix_recipe(TINY_GPT2, "CausalLM", prefix_length=2))
    module.model.transformer.gradient_checkpointing = True  # GPT-2 would drop past_key_values in training
    with pytest.raises(ValueError, match="model.gradient_checkpointing: prefix tuning"):
        module.model(input_ids=torch.randint(1000, 2000, (1, 4)))


def test_a_model_that_ignores_the_cache_is_an_error_not_a_silent_no_op(build):
    from fw_prefix import PrefixInjector

    module = build(prefix_recipe(TINY_GPT2, "CausalLM", prefix_length=2))
    injector = PrefixInjector(module.model.prefix_encoder)
    _, kwargs = injector.before_forward(module.model, (), {"input_ids": torch.randint(1000, 2000, (1, 4))})
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # `cache` from transformers 5.24 on
    assert cache.get_seq_length() == 2 and kwargs["attention_mask"].shape == (1, 6)
    with pytest.raises(RuntimeError, match="did not read the prefix in layers \\[0, 1\\]"):
        injector.after_forward(module.model, (), kwargs, None)  # as if no layer had read past_key_values


def test_backbones_a_prefix_cannot_reach_are_refused(build):
    distilbert = {"model_type": "distilbert", "dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64, "vocab_size": 30522}
    with pytest.raises(ValueError, match="'distilbert' attention does not read past_key_values"):
        build(prefix_recipe(distilbert, prefix_length=2))
