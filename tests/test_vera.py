"""VeRA: exact counts (BERT-base, tiny BERT and Llama), only the vectors stored, merge equality,
and parity with Hugging Face PEFT's VeRA (same key -> same matrices, same logits, same step)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import transformers
from conftest import TINY_BERT, TINY_LLAMA, TOKENIZER, hf_model, padded_ids
from fw_vera import VeRA, VeRALinear, projections
from safetensors.torch import load_file

from framework.formats.fw import write_fw_adapter

QUIET_BERT = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
CLS = {"class_path": "Classification", "init_args": {"num_labels": 2, "pooling": "cls"}}


def vera_recipe(config: dict, **args: Any) -> dict:
    return {"backbone": {"config": config, "tokenizer": TOKENIZER}, "task": CLS,
            "method": {"class_path": "vera", "init_args": args}}


def lm_recipe(config: dict, **args: Any) -> dict:
    return {**vera_recipe(config, **args), "task": {"class_path": "CausalLM"}}


def test_bert_base_default_trains_24576_vectors_and_no_matrix(build):
    module = build(vera_recipe({"model_type": "bert"}))
    counts = module.param_counts()
    assert counts.method_params == 12 * 2 * (256 + 768) == 24_576
    assert counts.stored_params == 24_576
    layers = [m for m in module.model.modules() if isinstance(m, VeRALinear)]
    assert len(layers) == 24 and all(m.vera_A is layers[0].vera_A and m.vera_B is layers[0].vera_B for m in layers)
    assert layers[0].vera_A.shape == (256, 768) and layers[0].vera_B.shape == (768, 256)
    assert not any("vera_A" in n or "vera_B" in n for n, _ in module.model.named_parameters())
    assert module.method.modified_modules["bert.encoder.layer.0.attention.self.query"] == "VeRA r=256 (+1,024)"


def test_tiny_counts_bert_and_llama_with_gqa(build):
    r = 8
    bert = build(vera_recipe(TINY_BERT, r=r))
    assert bert.param_counts().method_params == TINY_BERT["num_hidden_layers"] * 2 * (r + 64)
    llama = build(lm_recipe(TINY_LLAMA, r=r))
    kv = TINY_LLAMA["num_key_value_heads"] * TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    assert llama.param_counts().method_params == TINY_LLAMA["num_hidden_layers"] * ((r + 32) + (r + kv))
    a, b = llama.method.shared_projections(llama.model)
    assert a.shape == (r, 32) and b.shape == (32, r)  # sized to the largest target, v_proj (32 -> 16) slices B


def test_stored_state_is_the_vectors_and_head_only(build, tmp_path):
    module = build(vera_recipe(TINY_BERT, r=4))
    write_fw_adapter(module, tmp_path)
    keys = sorted(load_file(str(tmp_path / "adapter.safetensors")))
    vectors = [k for k in keys if not k.startswith("classifier.")]
    assert len(vectors) == 2 * 2 * 2 and all(k.endswith((".vera_lambda_b", ".vera_lambda_d")) for k in vectors)
    assert "vera_A" not in str(module.model.state_dict().keys())  # non-persistent buffers
    query = "bert.encoder.layer.0.attention.self.query"
    assert keys[:2] == [f"{query}.vera_lambda_b", f"{query}.vera_lambda_d"]


def _randomize(model: torch.nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("config", [TINY_BERT, TINY_LLAMA], ids=["bert", "llama"])
def test_merge_equals_unmerged_logits_and_unmerge_restores(build, config):
    module = build(vera_recipe(config, r=8) if config is TINY_BERT else lm_recipe(config, r=8)).eval()
    batch = padded_ids()
    with torch.no_grad():
        base = module.model(**batch).logits
        _randomize(module.model)
        layers = [m for m in module.model.modules() if isinstance(m, VeRALinear)]
        weights = [layer.base_layer.weight.clone() for layer in layers]
        unmerged = module.model(**batch).logits
        assert (unmerged - base).abs().max() > 1e-3  # the vectors matter
        module.method.merge(module.model)
        assert (module.model(**batch).logits - unmerged).abs().max() <= 1e-5
        module.method.unmerge(module.model)
        for layer, weight in zip(layers, weights):
            torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=1e-6)
        assert (module.model(**batch).logits - unmerged).abs().max() <= 1e-5


def test_fresh_vera_leaves_logits_unchanged(build):
    base = build({"backbone": {"config": TINY_BERT}, "task": CLS}, seed=1).eval()
    adapted = build(vera_recipe(TINY_BERT, r=8), seed=1).eval()
    batch = padded_ids()
    assert torch.equal(base.model(**batch).logits, adapted.model(**batch).logits)


# -- parity with Hugging Face PEFT ------------------------------------------------------------

CASES = {
    "bert": (QUIET_BERT, "AutoModelForSequenceClassification", ["query", "value"]),
    "llama": (TINY_LLAMA, "AutoModelForCausalLM", ["q_proj", "v_proj"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_key_same_matrices_logits_and_adamw_step_as_peft(case):
    peft = pytest.importorskip("peft")
    config, auto, targets = CASES[case]
    r, key = 16, 1234
    base = hf_model(config, auto)
    ours = copy.deepcopy(base).requires_grad_(False)
    VeRA(r=r, projection_prng_key=key).attach(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=r, target_modules=targets, projection_prng_key=key))

    a, b = next(m for m in ours.modules() if isinstance(m, VeRALinear)).vera_A, next(
        m for m in ours.modules() if isinstance(m, VeRALinear)).vera_B
    assert torch.equal(a, theirs.base_model.vera_A["default"]) and torch.equal(b, theirs.base_model.vera_B["default"])
    assert torch.equal(a, projections(r, a.shape[1], b.shape[0], key)[0])

    _randomize(ours)
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(f"base_model.model.{n}.default" for n in mine) == sorted(peft_params)
    with torch.no_grad():
        for name, p in mine.items():
            peft_params[f"base_model.model.{name}.default"].copy_(p)

    batch = padded_ids()
    labels = torch.tensor([0, 1, 1]) if case == "bert" else batch["input_ids"]
    out_ours, out_theirs = ours(**batch, labels=labels), theirs(**batch, labels=labels)
    diff = (out_ours.logits - out_theirs.logits).abs().max().item()
    print(f"{case}: max |fw - PEFT| logits {diff:.3g}")  # pytest -s shows what was measured
    assert diff <= 1e-5

    names = sorted(mine)
    opt_ours = torch.optim.AdamW([mine[n] for n in names], lr=1e-2)
    opt_theirs = torch.optim.AdamW([peft_params[f"base_model.model.{n}.default"] for n in names], lr=1e-2)
    before = {n: p.detach().clone() for n, p in mine.items()}
    out_ours.loss.backward(), out_theirs.loss.backward()
    opt_ours.step(), opt_theirs.step()
    assert all(not torch.equal(before[n], mine[n]) for n in names)  # the step moved every vector
    step = max((mine[n] - peft_params[f"base_model.model.{n}.default"]).abs().max().item() for n in names)
    with torch.no_grad():
        after = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()
    print(f"{case}: after one AdamW step, max |fw - PEFT| lambdas {step:.3g}, logits {after:.3g}")
    assert step <= 1e-5 and after <= 1e-5


# -- Hugging Face PEFT's format ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peft_form_loads_in_peft_and_back_in_fw_with_the_same_logits(kind, tmp_path, request):
    peft = pytest.importorskip("peft")
    from helpers import module_from_adapter, peft_model, trained_module

    from framework.formats.peft import write_peft_adapter

    base = request.getfixturevalue(f"tiny_{kind}_dir")
    config = {"backbone": {"name_or_path": base, "tokenizer": TOKENIZER},
              "method": {"class_path": "vera", "init_args": {"r": 8, "projection_prng_key": 7}}}
    config["task"] = CLS if kind == "bert" else {"class_path": "CausalLM"}
    auto = transformers.AutoModelForSequenceClassification if kind == "bert" else transformers.AutoModelForCausalLM
    module = trained_module(config, seed=1)
    batch = padded_ids()
    with torch.no_grad():
        ours = module.model(**batch).logits
    write_peft_adapter(module, tmp_path / "peft")
    saved = __import__("json").loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved["save_projection"] is False and saved["projection_prng_key"] == 7
    with pytest.warns(UserWarning, match="PRNG"):
        theirs = peft_model(base, kind == "llama", str(tmp_path / "peft"))
    with torch.no_grad():
        assert (theirs(**batch).logits - ours).abs().max() <= 1e-5
    # PEFT's own folder with its default save_projection: true (the matrices saved) reads back into fw
    targets = saved["target_modules"]
    own = peft.get_peft_model(auto.from_pretrained(base, dtype=torch.float32), peft.VeraConfig(
        r=8, target_modules=targets, projection_prng_key=7, modules_to_save=saved["modules_to_save"]))
    own.load_state_dict(theirs.state_dict(), strict=False)
    own.save_pretrained(str(tmp_path / "peft_saved"))
    assert "base_model.vera_A" in load_file(str(tmp_path / "peft_saved" / "adapter_model.safetensors"))
    for folder in ("peft", "peft_saved"):
        with torch.no_grad():
            assert (module_from_adapter(tmp_path / folder, config).model(**batch).logits - ours).abs().max() <= 1e-5, folder


def test_peft_adapter_with_other_matrices_is_refused(tmp_path, tiny_bert_dir):
    peft = pytest.importorskip("peft")
    from framework.formats.source import read_adapter, updated

    auto = transformers.AutoModelForSequenceClassification
    own = peft.get_peft_model(auto.from_pretrained(tiny_bert_dir), peft.VeraConfig(r=8, target_modules=["query", "value"]))
    with torch.no_grad():
        own.base_model.vera_A["default"].mul_(2)
    own.save_pretrained(str(tmp_path / "a"))
    config = {"backbone": {"name_or_path": tiny_bert_dir, "tokenizer": TOKENIZER}, "task": CLS,
              "method": {"class_path": "vera", "init_args": {}}}
    adapter = read_adapter(tmp_path / "a")
    module = __import__("framework.cli", fromlist=["build_module"]).build_module(updated(config, adapter.model_update(config)))
    with pytest.raises(ValueError, match="vera_A is not what projection_prng_key=0 generates"):
        adapter.load_into(module)
