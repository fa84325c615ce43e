"""MAM, UniPELT and `compose`: parameter counts that decompose into their parts, training on
tiny encoders and decoders, padding independence, generation, merge refused or all-or-none,
conflicting compositions refused, checkpoints round-trip."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TINY_BERT, TINY_GPT2, TINY_LLAMA, TOKENIZER
from fw_adapters import ParallelAdapter, SerialAdapter
from fw_unipelt import GatedLoRALinear
from helpers import SHARP_BERT, LossRecorder, alone_and_padded, perturb, trainer

from framework.data import ClassificationData, InstructionData
from framework.gates import SequenceGate
from framework.method import MergeNotSupportedError

LORA = {"class_path": "lora", "init_args": {"r": 8}}
PARALLEL = {"class_path": "parallel_adapter", "init_args": {}}
HYBRIDS = {
    "mam": {"class_path": "mam", "init_args": {}},
    "unipelt": {"class_path": "unipelt", "init_args": {}},
    "compose": {"class_path": "compose", "init_args": {"methods": [LORA, PARALLEL]}},
}


def recipe(config: dict, method: dict, task: str | dict | None = None, **model: Any) -> dict:
    out = {"backbone": {"config": config, "tokenizer": TOKENIZER}, "method": method, **model}
    if task:
        out["task"] = {"class_path": task} if isinstance(task, str) else task
    return out


def numel(module, where) -> int:
    return sum(p.numel() for n, p in module.model.named_parameters() if p.requires_grad and where(n))


# -- counts on BERT-base ----------------------------------------------------------------------


def test_mam_bert_base_count_decomposes(build):
    module = build(recipe({"model_type": "bert"}, HYBRIDS["mam"]))
    counts = module.param_counts()
    prefix = numel(module, lambda n: n.startswith("prefix_encoder."))
    adapters = numel(module, lambda n: ".adapter." in n)
    assert prefix == 30 * 768 + (768 * 800 + 800) + (800 * 18_432 + 18_432) == 15_402_272
    assert adapters == 12 * (768 * 384 + 384 + 384 * 768 + 768) == 7_091_712
    assert counts.method_params == prefix + adapters == 22_493_984
    assert counts.stored_params == 30 * 18_432 + adapters == 7_644_672
    wrappers = [m for m in module.model.modules() if isinstance(m, ParallelAdapter)]
    assert len(wrappers) == 12 and wrappers[0].scaling == 4.0 and wrappers[0].adapter.down.out_features == 384


def test_unipelt_bert_base_count_decomposes(build):
    module = build(recipe({"model_type": "bert"}, HYBRIDS["unipelt"]))
    counts = module.param_counts()
    lora = numel(module, lambda n: "lora_" in n)
    lora_gates = numel(module, lambda n: ".self.query.gate." in n or ".self.value.gate." in n)
    prefix = numel(module, lambda n: n.startswith("prefix_encoder."))
    prefix_gates = numel(module, lambda n: n.startswith("prefix_gates."))
    adapters = numel(module, lambda n: ".adapter." in n)
    gate_names = ("output.dense.gate.proj.weight", "output.dense.gate.proj.bias")
    adapter_gates = numel(module, lambda n: n.endswith(gate_names) and ".attention." not in n)
    assert lora == 12 * 2 * 8 * (768 + 768) == 294_912
    assert lora_gates == 12 * 2 * 769 == 18_456
    assert prefix == 10 * 768 + (768 * 512 + 512) + (512 * 18_432 + 18_432) == 9_857_024
    assert prefix_gates == adapter_gates == 12 * 769 == 9_228
    assert adapters == 894_528
    parts = lora + lora_gates + prefix + prefix_gates + adapters + adapter_gates
    assert counts.method_params == parts == 11_083_376
    assert counts.stored_params == parts - prefix + 10 * 18_432 == 1_410_672
    assert sum(isinstance(m, GatedLoRALinear) for m in module.model.modules()) == 24
    assert all(m.gate is not None for m in module.model.modules() if isinstance(m, SerialAdapter))
    assert module.method.methods[1].alpha == 2.0 and module.method.methods[1].r == 8


def test_compose_lora_and_parallel_adapter_is_the_sum_of_the_two(build):
    bert = {"model_type": "bert"}
    alone = [build(recipe(bert, m)).param_counts().method_params for m in (LORA, PARALLEL)]
    composed = build(recipe(bert, HYBRIDS["compose"])).param_counts()
    assert alone == [294_912, 894_528]
    assert composed.method_params == composed.stored_params == sum(alone) == 1_189_440


# -- composition rules -------------------------------------------------------------------------


def test_conflicting_composition_fails_naming_the_module(build):
    bitfit_then_lora = {"class_path": "compose", "init_args": {"methods": [{"class_path": "bitfit"}, LORA]}}
    conflict = r"methods\[1\] \(LoRA\) modifies 'bert.encoder.layer.0.attention.self.query'.*methods\[0\] \(BitFit\)"
    with pytest.raises(ValueError, match=conflict):
        build(recipe(TINY_BERT, bitfit_then_lora))
    lora_on_attention_output = {"class_path": "lora", "init_args": {"targets": ["attention.output.dense"]}}
    wrapped_first = {"class_path": "compose", "init_args": {"methods": [lora_on_attention_output, {"class_path": "houlsby"}]}}
    with pytest.raises(ValueError, match=r"methods\[1\] \(Houlsby\) attached after methods\[0\] \(LoRA\).*must modify different modules"):
        build(recipe(TINY_BERT, wrapped_first))


def test_a_method_with_its_own_checkpoint_format_cannot_be_composed(build):
    bad = {"class_path": "compose", "init_args": {"methods": [LORA, {"class_path": "fisher"}]}}
    with pytest.raises(ValueError, match=r"methods\[1\]: FisherMask writes its own checkpoint format"):
        build(recipe(TINY_BERT, bad))


def test_compose_of_mergeable_methods_merges_with_equal_logits(build):
    both = {"class_path": "compose", "init_args": {"methods": [LORA, {"class_path": "ia3"}]}}
    module = build(recipe(TINY_BERT, both)).eval()
    perturb(module)
    ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        before = module.model(input_ids=ids).logits
        module.method.merge(module.model)
        torch.testing.assert_close(module.model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_merge_fails_clearly_and_changes_nothing(build, name):
    module = build(recipe(TINY_BERT, HYBRIDS[name])).eval()
    perturb(module)
    ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        before = module.model(input_ids=ids).logits
        with pytest.raises(MergeNotSupportedError, match="cannot be merged: its part methods"):
            module.method.merge(module.model)
        torch.testing.assert_close(module.model(input_ids=ids).logits, before)  # LoRA was unmerged again


# -- behaviour ----------------------------------------------------------------------------------


def test_gate_is_the_mean_over_real_tokens(build):
    module = build(recipe(TINY_BERT, HYBRIDS["unipelt"])).eval()
    gate = next(m for m in module.model.modules() if isinstance(m, SequenceGate))
    x = torch.randn(2, 4, gate.proj.in_features)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    gate.padding.mask = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], dim=1)  # e.g. 3 prefix positions
    each = torch.sigmoid(gate.proj(x))
    expected = torch.stack([each[0, :2].mean(0), each[1].mean(0)]).view(2, 1, 1)
    torch.testing.assert_close(gate(x), expected)


@pytest.mark.parametrize("name", ["mam", "unipelt"])
def test_padding_does_not_change_an_encoder_sequence(build, name):
    alone, batch = alone_and_padded(build(recipe(TINY_BERT, HYBRIDS[name])))
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mam", "unipelt"])
@pytest.mark.parametrize("backbone", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama"])
def test_padding_does_not_change_a_decoder_sequence_and_generation_works(build, name, backbone):
    module = build(recipe(backbone, HYBRIDS[name], "CausalLM"))
    perturb(module)  # make the zero-initialised parts matter
    alone, batch = alone_and_padded(module)
    torch.testing.assert_close(batch[:5], alone, atol=1e-4, rtol=1e-5)
    prompt = torch.randint(1000, 2000, (1, 5))
    out = module.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                                do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = module.model(input_ids=out.sequences).logits[0]
    torch.testing.assert_close(out.logits[0][0], full[4], atol=1e-4, rtol=1e-5)  # first step: the gated prefix


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_trains_on_encoder_with_frozen_weights_unchanged(build, sentiment_csv, tmp_path, name):
    """The head is frozen, so only the hybrid can lower the loss (on a small batch it can fit)."""
    module = build(recipe(SHARP_BERT, HYBRIDS[name], learning_rate=0.01, train_head=False))
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    recorder = LossRecorder()
    data = ClassificationData(data_files=sentiment_csv, batch_size=16, max_train_examples=16)
    trainer(tmp_path, 25, recorder).fit(module, datamodule=data)
    assert sum(recorder.losses[-3:]) < 0.75 * sum(recorder.losses[:3]), recorder.losses
    assert all(torch.equal(module.model.get_parameter(n), v) for n, v in frozen.items())


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_trains_on_decoder(build, instruction_jsonl, tmp_path, name):
    module = build(recipe(TINY_LLAMA, HYBRIDS[name], "CausalLM", learning_rate=0.01))
    recorder = LossRecorder()
    data = InstructionData(data_files=instruction_jsonl, batch_size=8, max_length=32, max_train_examples=8)
    trainer(tmp_path, 20, recorder).fit(module, datamodule=data)
    assert sum(recorder.losses[-3:]) < 0.85 * sum(recorder.losses[:3]), recorder.losses


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_checkpoint_round_trip(build, tmp_path, name):
    module = build(recipe(TINY_BERT, HYBRIDS[name]), seed=1)
    perturb(module)
    checkpoint: dict[str, Any] = {}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "c.ckpt")
    fresh = build(recipe(TINY_BERT, HYBRIDS[name]), seed=1)
    ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        expected = module.eval().model(input_ids=ids).logits
        fresh.load_state_dict(torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"])
        torch.testing.assert_close(fresh.eval().model(input_ids=ids).logits, expected)
