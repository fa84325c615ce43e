"""fw's own adapter format for every registered method (round trip: the same logits, no pickle),
and merged models that a Python without fw loads with transformers alone (fw's logits)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_BERT, TOKENIZER, padded_ids
from helpers import trained_module
from safetensors.torch import save_file

from framework import registry
from framework.cli import build_module
from framework.formats.fw import write_fw_adapter
from framework.formats.merged import write_merged
from framework.formats.source import read_adapter, updated

#: arguments that keep each registered method small on the tiny BERT
SMALL = {
    "prompt": {"num_virtual_tokens": 3}, "ptuning": {"num_virtual_tokens": 3},
    "prefix": {"prefix_length": 3, "bottleneck": 8}, "mam": {"prefix_length": 3, "prefix_bottleneck": 8},
    "unipelt": {"prefix_length": 3, "prefix_bottleneck": 8}, "fisher": {"fraction": 0.01, "num_samples": 3},
    "peft_prompt": {"num_virtual_tokens": 3}, "peft_ptuning": {"num_virtual_tokens": 3},
    "peft_prefix": {"prefix_length": 3, "bottleneck": 8}, "qlora": {"r": 4, "targets": ["query", "value"]},
    "compose": {"methods": [{"class_path": "lora", "init_args": {"r": 2}},
                            {"class_path": "ia3", "init_args": {"targets": ["key"], "feedforward_targets": []}}]},
    "multi": {"adapters": {"a": {"class_path": "lora", "init_args": {"r": 2}},
                           "b": {"class_path": "ia3", "init_args": {"targets": ["key"], "feedforward_targets": []}}}},
}
MEAN = {"class_path": "Classification", "init_args": {"num_labels": 2, "pooling": "cls"}}


def recipe(method: str | None, base: dict[str, Any] | None = None, **args: Any) -> dict[str, Any]:
    return {"backbone": base or {"config": TINY_BERT, "tokenizer": TOKENIZER}, "task": MEAN,
            "method": None if method is None else {"class_path": method, "init_args": args}}


trained = trained_module  # built under seed 0, FISH calibrated, trainable parameters moved


def logits(module, batch) -> torch.Tensor:
    with torch.no_grad():
        return module.model(**batch).logits


@pytest.mark.parametrize("name", [*sorted(registry.discover()), None])
def test_every_method_round_trips_through_fws_format(name, tmp_path):
    config = recipe(name, **SMALL.get(name or "", {}))
    module = trained(config)
    batch = padded_ids()
    ours = logits(module, batch)
    write_fw_adapter(module, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]  # no pickle
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["format"] == "fw-adapter" and meta["format_version"] == 1
    assert meta["param_counts"] == module.param_counts().as_dict()
    assert meta["architecture"]["hidden_size"] == TINY_BERT["hidden_size"] and meta["train_head"] is True

    adapter = read_adapter(tmp_path)
    rebuilt = updated(config, adapter.model_update(config))
    torch.manual_seed(0)  # the same random backbone: the adapter must restore what training changed
    fresh = build_module(rebuilt)
    assert not torch.equal(logits(fresh.eval(), batch), ours)
    adapter.load_into(fresh)
    # PEFT's prefix MLP runs on the batch's expanded prompt tokens in training and once on a
    # single row for its saved prompt: another GEMM shape, so rounding may differ (3e-8 seen)
    atol = 1e-6 if name == "peft_prefix" else 0
    torch.testing.assert_close(logits(fresh.eval(), batch), ours, rtol=0, atol=atol)
    assert fresh.param_counts().stored_params == module.param_counts().stored_params


def test_the_stored_form_is_what_the_method_stores(tmp_path):
    """A prefix is stored flat (not its MLP); FISH as indices and values; the head beside them."""
    from safetensors.torch import load_file

    prefix = trained(recipe("prefix", **SMALL["prefix"]))
    write_fw_adapter(prefix, tmp_path / "prefix")
    tensors = load_file(str(tmp_path / "prefix" / "adapter.safetensors"))
    assert sorted(tensors) == ["classifier.bias", "classifier.weight", "prefix_encoder.prompt_embeddings"]
    assert tensors["prefix_encoder.prompt_embeddings"].shape == (3, 2 * 2 * 64)
    fisher = trained(recipe("fisher", **SMALL["fisher"]))
    write_fw_adapter(fisher, tmp_path / "fisher")
    tensors = load_file(str(tmp_path / "fisher" / "adapter.safetensors"))
    indices = [k for k in tensors if k.endswith(".fisher_indices")]
    assert indices and all(tensors[k].dtype == torch.int64 for k in indices)
    k = sum(tensors[i].numel() for i in indices)
    assert k == fisher.method.k(build_module(recipe("fisher", **SMALL["fisher"])).model)
    assert fisher.param_counts().stored_params == k  # the indices locate the values; they are not counted


NO_FW = '''
import importlib.abc, json, sys
class NoFw(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "framework" or name.startswith(("framework.", "fw_")):
            raise ImportError(f"{name}: fw is not installed here")
sys.meta_path.insert(0, NoFw())
import torch, transformers
from safetensors.torch import load_file
inputs = load_file(sys.argv[1])
out = {}
for folder in sys.argv[2:]:
    config = transformers.AutoConfig.from_pretrained(folder)
    causal = config.architectures[0].endswith("CausalLM")
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForSequenceClassification
    model = auto.from_pretrained(folder).eval()
    transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        got = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    out[folder] = (got.float() - inputs[folder].float()).abs().max().item()
print(json.dumps(out))
'''


def test_merged_models_load_without_fw_and_give_fws_logits(tmp_path, tiny_llama_dir):
    """LoRA, IA³, BitFit, FISH, QLoRA (→ bf16), a composition of mergeable parts, the linear
    probe and full fine-tuning, merged and saved; a fresh Python that cannot import fw loads
    each folder with transformers and computes fw's logits."""
    llama = {"name_or_path": tiny_llama_dir, "tokenizer": TOKENIZER}
    cases = {
        "lora": recipe("lora", r=4), "ia3-llama": {**recipe("ia3", llama), "task": {"class_path": "CausalLM"}},
        "bitfit": recipe("bitfit"), "fisher": recipe("fisher", **SMALL["fisher"]), "compose": recipe("compose", **SMALL["compose"]),
        "linear_probe": recipe("linear_probe"), "full": recipe(None),
    }
    if pytest.importorskip("bitsandbytes"):
        cases["qlora"] = recipe("qlora", **SMALL["qlora"])
    batch = padded_ids()
    inputs: dict[str, torch.Tensor] = dict(batch)
    for name, config in cases.items():
        module = trained(config)
        before = logits(module, batch)
        write_merged(module, tmp_path / name)
        after = logits(module.eval(), batch)  # the merged model in fw: what the folder must reproduce
        if name != "qlora":  # float32: merging itself moves logits by rounding only
            assert (after - before).abs().max().item() <= 1e-5, name
        assert not any(isinstance(m, torch.nn.Module) and hasattr(m, "base_layer") for m in module.model.modules())
        assert (tmp_path / name / "model.safetensors").is_file() and not list((tmp_path / name).glob("*.bin"))
        inputs[str(tmp_path / name)] = after.contiguous()
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    done = subprocess.run([sys.executable, "-c", NO_FW, str(tmp_path / "inputs.safetensors"),
                           *(str(tmp_path / n) for n in cases)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    print("max |fw - transformers| logits of the merged folders:", {Path(k).name: v for k, v in diffs.items()})
    assert set(diffs) == {str(tmp_path / n) for n in cases}
    assert all(diff <= 1e-5 for diff in diffs.values()), diffs


def test_a_merged_model_keeps_only_the_architectures_weights(tmp_path):
    from safetensors.torch import load_file

    module = trained(recipe("lora", r=4))
    keys = set(module.base_state_keys)
    write_merged(module, tmp_path)
    saved = set(load_file(str(tmp_path / "model.safetensors")))
    assert not any("lora" in k for k in saved) and saved <= keys
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert (tmp_path / "tokenizer.json").is_file() or (tmp_path / "vocab.txt").is_file()
