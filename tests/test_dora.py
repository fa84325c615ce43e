"""DoRA: exact counts (BERT-base, tiny BERT and Llama), the stored state, the norm without
W + s·BA, merge/unmerge equality, and parity with Hugging Face PEFT's LoRA with use_dora=True
(same A, B and magnitude -> same logits, same AdamW step, with and without dropout), both ways
through PEFT's adapter format."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
import transformers
from conftest import TINY_BERT, TINY_GPT2, TINY_LLAMA, TOKENIZER, hf_model, padded_ids
from fw_dora import DoRA, DoRALinear
from safetensors.torch import load_file

from framework.formats.fw import write_fw_adapter

QUIET_BERT = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
CLS = {"class_path": "Classification", "init_args": {"num_labels": 2, "pooling": "cls"}}


def dora_recipe(config: dict, **args: Any) -> dict:
    return {"backbone": {"config": config, "tokenizer": TOKENIZER}, "task": CLS,
            "method": {"class_path": "dora", "init_args": args}}


def lm_recipe(config: dict, **args: Any) -> dict:
    return {**dora_recipe(config, **args), "task": {"class_path": "CausalLM"}}


def layers_of(model: torch.nn.Module) -> dict[str, DoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}


def _randomize(model: torch.nn.Module, seed: int = 3) -> None:
    """B off zero (so DoRA is not the base model) and the magnitude off the norm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(layers_of(model).items()):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
            layer.magnitude.mul_(torch.rand(layer.magnitude.shape, generator=generator) + 0.5)


# -- counts and stored state ------------------------------------------------------------------

def test_bert_base_r8_query_value_trains_313344(build):
    module = build(dora_recipe({"model_type": "bert"}, r=8))
    counts = module.param_counts()
    assert counts.method_params == 2 * 12 * (8 * (768 + 768) + 768) == 313_344
    assert counts.stored_params == 313_344
    assert module.method.modified_modules["bert.encoder.layer.0.attention.self.query"] == "DoRA r=8 (+13,056)"


def test_tiny_counts_bert_and_llama_with_gqa(build):
    r = 4
    bert = build(dora_recipe(TINY_BERT, r=r))
    assert bert.param_counts().method_params == TINY_BERT["num_hidden_layers"] * 2 * (r * (64 + 64) + 64) == 2_304
    llama = build(lm_recipe(TINY_LLAMA, r=r))
    kv = TINY_LLAMA["num_key_value_heads"] * TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    per_layer = (r * (32 + 32) + 32) + (r * (32 + kv) + kv)  # q_proj 32 -> 32, v_proj 32 -> 16
    assert llama.param_counts().method_params == TINY_LLAMA["num_hidden_layers"] * per_layer == 992


def test_stored_state_is_a_b_magnitude_and_head(build, tmp_path):
    module = build(dora_recipe(TINY_BERT, r=4))
    write_fw_adapter(module, tmp_path)
    keys = sorted(load_file(str(tmp_path / "adapter.safetensors")))
    query = "bert.encoder.layer.0.attention.self.query"
    assert [k for k in keys if k.startswith(query)] == [f"{query}.{n}" for n in ("lora_A", "lora_B", "magnitude")]
    assert len([k for k in keys if not k.startswith("classifier.")]) == 2 * 2 * 3


def test_fresh_dora_leaves_logits_unchanged_and_magnitude_is_the_row_norm(build):
    base = build({"backbone": {"config": TINY_BERT}, "task": CLS}, seed=1).eval()
    adapted = build(dora_recipe(TINY_BERT, r=8), seed=1).eval()
    batch = padded_ids()
    torch.testing.assert_close(adapted.model(**batch).logits, base.model(**batch).logits, atol=1e-6, rtol=0)
    for layer in layers_of(adapted.model).values():
        torch.testing.assert_close(layer.magnitude, layer.base_layer.weight.norm(dim=1), atol=1e-6, rtol=1e-6)


def test_norm_without_the_full_matrix_equals_the_direct_one():
    torch.manual_seed(0)
    layer = DoRALinear(torch.nn.Linear(96, 80), r=8, alpha=16)
    _randomize(torch.nn.Sequential(layer))
    direct = (layer.weight + layer.scaling * layer.lora_B @ layer.lora_A).norm(dim=1)
    assert (layer.weight_norm() - direct).abs().max() <= 1e-6 * direct.max()
    assert not layer.weight_norm().requires_grad
    cached = layer.weight_norm()
    assert layer.weight_norm() is cached  # nothing changed: the cache serves it
    with torch.no_grad():
        layer.lora_A.mul_(2)  # an optimizer step bumps the version: computed again
    direct = (layer.weight + layer.scaling * layer.lora_B @ layer.lora_A).norm(dim=1)
    assert layer.weight_norm() is not cached
    assert (layer.weight_norm() - direct).abs().max() <= 1e-6 * direct.max()


def test_norm_computed_under_inference_mode_does_not_break_training_afterwards():
    torch.manual_seed(0)
    layer = DoRALinear(torch.nn.Linear(16, 12), r=4, alpha=8)
    x = torch.randn(5, 16)
    with torch.no_grad():
        layer.lora_B.add_(0.1)  # as after a step: the norm must be computed again
    with torch.inference_mode():
        layer(x)  # fw predict: nothing cached from here (an inference tensor cannot be saved for backward)
    layer(x).sum().backward()
    assert layer.magnitude.grad is not None and layer.lora_B.grad is not None


def test_bfloat16_base_and_adapters_follow_the_float32_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    exact = DoRALinear(linear, r=4, alpha=8)
    _randomize(torch.nn.Sequential(exact))
    half = DoRALinear(copy.deepcopy(linear).to(torch.bfloat16), r=4, alpha=8, dtype=torch.bfloat16)
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "magnitude"):
            getattr(half, name).copy_(getattr(exact, name))
    assert half.weight_norm().dtype == torch.float32  # a bfloat16 sum of squares would keep ~3 digits
    x = torch.randn(6, 64)
    out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), exact(x), atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert half.magnitude.grad.dtype == torch.bfloat16 and half.lora_A.grad is not None


# -- merging -------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [TINY_BERT, TINY_LLAMA, TINY_GPT2], ids=["bert", "llama", "gpt2"])
def test_merge_equals_unmerged_logits_and_unmerge_restores(build, config):
    targets = {"targets": ["c_attn"]} if config is TINY_GPT2 else {}
    module = build(dora_recipe(config, r=8, **targets) if config is TINY_BERT else lm_recipe(config, r=8, **targets)).eval()
    batch = padded_ids()
    layers = list(layers_of(module.model).values())
    assert layers and all(m.fan_in_fan_out == (config is TINY_GPT2) for m in layers)
    with torch.no_grad():
        base = module.model(**batch).logits
        _randomize(module.model)
        weights = [layer.base_layer.weight.clone() for layer in layers]
        unmerged = module.model(**batch).logits
        assert (unmerged - base).abs().max() > 1e-3  # B and the magnitude matter
        module.method.merge(module.model)
        merged = module.model(**batch).logits
        # float32 rounding of the merged weights: 1e-5 on BERT's logits; Llama's and GPT-2's wide
        # init (0.3) gives |logits| ~8 and the same relative error (~1.2e-5, as a LoRA merge with m = n)
        tolerance = 1e-5 * max(1.0, unmerged.abs().max().item() / 4)
        assert (merged - unmerged).abs().max() <= tolerance
        module.method.unmerge(module.model)
        for layer, weight in zip(layers, weights):
            torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=1e-6)
        assert (module.model(**batch).logits - unmerged).abs().max() <= tolerance


def test_unmerge_restores_rows_whose_magnitude_is_zero():
    torch.manual_seed(0)
    layer = DoRALinear(torch.nn.Linear(16, 12), r=4, alpha=8)
    _randomize(torch.nn.Sequential(layer))
    with torch.no_grad():
        layer.magnitude[3] = 0.0
    weight = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 16)
    before = layer(x)
    layer.merge()
    assert (layer(x) - before).abs().max() <= 1e-6 and torch.all(layer.base_layer.weight[3] == 0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), weight, atol=1e-6, rtol=1e-6)


# -- parity with Hugging Face PEFT ---------------------------------------------------------------

CASES = {
    "bert": (QUIET_BERT, "AutoModelForSequenceClassification", ["query", "value"], 0.0),
    "llama": (TINY_LLAMA, "AutoModelForCausalLM", ["q_proj", "v_proj"], 0.0),
    "gpt2-conv1d": ({**TINY_GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, "AutoModelForCausalLM",
                    ["c_attn"], 0.0),
    "bert-dropout": (QUIET_BERT, "AutoModelForSequenceClassification", ["query", "value"], 0.1),
    "llama-dropout": (TINY_LLAMA, "AutoModelForCausalLM", ["q_proj", "v_proj"], 0.1),
}


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")
@pytest.mark.parametrize("case", list(CASES))
def test_same_weights_same_logits_and_adamw_step_as_peft(case):
    peft = pytest.importorskip("peft")
    config, auto, targets, dropout = CASES[case]
    r, alpha = 4, 8
    base = hf_model(config, auto)
    ours = copy.deepcopy(base).requires_grad_(False)
    DoRA(r=r, alpha=alpha, targets=targets, dropout=dropout).attach(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, use_dora=True,
        fan_in_fan_out=case.startswith("gpt2")))

    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}

    def peft_name(name: str) -> str:
        module, _, leaf = name.rpartition(".")
        leaf = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
                "magnitude": "lora_magnitude_vector.default.weight"}[leaf]
        return f"base_model.model.{module}.{leaf}"

    assert sorted(map(peft_name, mine)) == sorted(peft_params)
    for name in mine:  # fresh: B = 0, both magnitudes are the base weight's row norms
        if name.endswith("magnitude"):
            torch.testing.assert_close(mine[name], peft_params[peft_name(name)], atol=1e-6, rtol=1e-6)
    _randomize(ours)
    with torch.no_grad():
        for name, p in mine.items():
            peft_params[peft_name(name)].copy_(p)

    batch = padded_ids()
    labels = torch.tensor([0, 1, 1]) if case.startswith("bert") else batch["input_ids"]
    if dropout:
        ours.train(), theirs.train()
    torch.manual_seed(11)
    out_ours = ours(**batch, labels=labels)
    torch.manual_seed(11)
    out_theirs = theirs(**batch, labels=labels)
    diff = (out_ours.logits - out_theirs.logits).abs().max().item()
    print(f"{case}: max |fw - PEFT| logits {diff:.3g}")  # pytest -s shows what was measured
    assert diff <= 1e-5

    names = sorted(mine)
    opt_ours = torch.optim.AdamW([mine[n] for n in names], lr=1e-2)
    opt_theirs = torch.optim.AdamW([peft_params[peft_name(n)] for n in names], lr=1e-2)
    before = {n: p.detach().clone() for n, p in mine.items()}
    out_ours.loss.backward(), out_theirs.loss.backward()
    grads = max((mine[n].grad - peft_params[peft_name(n)].grad).abs().max().item() for n in names)
    opt_ours.step(), opt_theirs.step()
    assert all(not torch.equal(before[n], mine[n]) for n in names)  # A, B and every magnitude moved
    step = max((mine[n] - peft_params[peft_name(n)]).abs().max().item() for n in names)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        after = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()
    scale = out_theirs.logits.abs().max().item()
    print(f"{case}: gradients {grads:.3g}; after one AdamW step, max |fw - PEFT| weights {step:.3g}, "
          f"logits {after:.3g} (of max |logit| {scale:.3g})")
    # AdamW's first step is lr·g/(|g| + eps): where g ≈ 0 a rounding-level gradient difference
    # moves the weight by ~1e-5·lr/1e-2 (Llama: one v_proj A entry with |g| = 1.5e-6, gradients
    # 4.5e-7 apart, steps 5.3e-6 apart), which Llama's wide init (0.3) carries to ~1e-5 of its logits
    assert step <= 1e-5 and after <= 2e-5 * max(1.0, scale)


def test_peft_dora_reference_method_trains_the_same_count(build):
    pytest.importorskip("peft")
    ours = build(dora_recipe(TINY_BERT, r=4))
    theirs = build({**dora_recipe(TINY_BERT), "method": {"class_path": "peft_dora", "init_args": {"r": 4}}})
    assert ours.param_counts().method_params == theirs.param_counts().method_params == 2_304
    assert any("lora_magnitude_vector" in n for n, p in theirs.model.named_parameters() if p.requires_grad)


# -- the fw format and Hugging Face PEFT's ---------------------------------------------------------

def test_fw_format_round_trip(tmp_path, tiny_bert_dir):
    from helpers import module_from_adapter, trained_module


    config = {"backbone": {"name_or_path": tiny_bert_dir, "tokenizer": TOKENIZER}, "task": CLS,
              "method": {"class_path": "dora", "init_args": {"r": 4, "alpha": 8}}}
    module = trained_module(config, seed=1)
    batch = padded_ids()
    with torch.no_grad():
        ours = module.model(**batch).logits
    write_fw_adapter(module, tmp_path / "fw")
    with torch.no_grad():
        assert torch.equal(module_from_adapter(tmp_path / "fw", config).model(**batch).logits, ours)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peft_form_loads_in_peft_and_back_in_fw_with_the_same_logits(kind, tmp_path, request):
    pytest.importorskip("peft")
    from helpers import module_from_adapter, peft_model, trained_module

    from framework.formats.peft import write_peft_adapter

    base = request.getfixturevalue(f"tiny_{kind}_dir")
    config = {"backbone": {"name_or_path": base, "tokenizer": TOKENIZER},
              "method": {"class_path": "dora", "init_args": {"r": 4, "alpha": 8}}}
    config["task"] = CLS if kind == "bert" else {"class_path": "CausalLM"}
    module = trained_module(config, seed=1)
    batch = padded_ids()
    with torch.no_grad():
        ours = module.model(**batch).logits
    write_peft_adapter(module, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_dora"] is True and saved["r"] == 4
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == 2 * 2
    theirs = peft_model(base, kind == "llama", str(tmp_path / "peft"))
    with torch.no_grad():
        exported = (theirs(**batch).logits - ours).abs().max().item()
    assert exported <= 1e-5
    # PEFT's own save of the same adapter reads back into fw
    theirs.save_pretrained(str(tmp_path / "peft_saved"))
    assert sorted(load_file(str(tmp_path / "peft_saved" / "adapter_model.safetensors"))) == sorted(keys)
    for folder in ("peft", "peft_saved"):
        with torch.no_grad():
            assert (module_from_adapter(tmp_path / folder, config).model(**batch).logits - ours).abs().max() <= 1e-5, folder


def test_plain_lora_and_dora_adapters_are_not_read_as_each_other(tmp_path, tiny_bert_dir):
    peft = pytest.importorskip("peft")
    from framework.formats.fw import AdapterError
    from framework.formats.source import read_adapter

    auto = transformers.AutoModelForSequenceClassification
    for name, use_dora in (("lora", False), ("dora", True)):
        own = peft.get_peft_model(auto.from_pretrained(tiny_bert_dir), peft.LoraConfig(
            r=4, target_modules=["query", "value"], use_dora=use_dora))
        own.save_pretrained(str(tmp_path / name))

    def recipe(method: str) -> dict:
        return {"backbone": {"name_or_path": tiny_bert_dir, "tokenizer": TOKENIZER}, "task": CLS,
                "method": {"class_path": method, "init_args": {}}}

    with pytest.raises((ValueError, AdapterError), match="without use_dora: true is plain LoRA"):
        read_adapter(tmp_path / "lora").model_update(recipe("dora"))
    with pytest.raises((ValueError, AdapterError), match="use_dora=True"):
        read_adapter(tmp_path / "dora").model_update(recipe("lora"))
    assert read_adapter(tmp_path / "dora").model_update(recipe("dora"))["method"]["init_args"]["r"] == 4


def test_merged_export_loads_without_fw_with_the_same_logits(tmp_path, tiny_bert_dir):
    from helpers import trained_module

    from framework.formats.merged import write_merged

    config = {"backbone": {"name_or_path": tiny_bert_dir, "tokenizer": TOKENIZER}, "task": CLS,
              "method": {"class_path": "dora", "init_args": {"r": 4, "alpha": 8}}}
    module = trained_module(config, seed=1)
    batch = padded_ids()
    with torch.no_grad():
        ours = module.model(**batch).logits
    write_merged(module, tmp_path / "merged")
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert (plain(**batch).logits - ours).abs().max() <= 1e-5


def test_loss_falls_in_a_few_adam_steps(build):
    from helpers import adam_losses

    module = build(dora_recipe(QUIET_BERT, r=4)).train()
    batch = {**padded_ids(), "labels": torch.tensor([0, 1, 1])}
    losses = adam_losses(module, batch, steps=8)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses
