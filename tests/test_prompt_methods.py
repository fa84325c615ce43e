"""The virtual-token methods: prompt tuning, P-tuning (and prefix tuning where the behaviour is
shared): counts, training, masks under padding, generation, checkpoints, stored form, errors.

Prefix-specific behaviour (counts, GQA shapes, gradient checkpointing, fw inspect) is in
test_prefix.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import TINY_BERT, TINY_GPT2, TINY_LLAMA, TOKENIZER, write_recipe
from helpers import SHARP_BERT, LossRecorder, alone_and_padded, perturb, trainer

from framework.data import ClassificationData, InstructionData
from framework.method import MergeNotSupportedError

#: the methods under test, small enough for tiny backbones
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "prompt": ("prompt", {"num_virtual_tokens": 4}),
    "ptuning-mlp": ("ptuning", {"num_virtual_tokens": 4}),
    "ptuning-lstm": ("ptuning", {"num_virtual_tokens": 4, "encoder": "lstm", "encoder_hidden_size": 16}),
    "prefix": ("prefix", {"prefix_length": 4, "bottleneck": 32}),
}
#: learning rates that make each method learn on the tiny backbones (classification, causal LM)
LR = {"prompt": 0.03, "ptuning": 0.01, "prefix": 0.01}
LR_LM = {"prompt": 0.1, "ptuning": 0.1, "prefix": 0.03}
# a tiny encoder whose random attention is not near-uniform (as the decoders' 0.3 init) and
# without dropout, so that a frozen-head classification loss falls smoothly in a few steps


def recipe(backbone: dict[str, Any], key: str, task: str | None = None, **model: Any) -> dict[str, Any]:
    name, args = METHODS[key]
    out: dict[str, Any] = {
        "backbone": {"config": backbone, "tokenizer": TOKENIZER},
        "method": {"class_path": name, "init_args": dict(args)},
        **model,
    }
    if task:
        out["task"] = {"class_path": task}
    return out


def method_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


# -- counts ----------------------------------------------------------------------------------


def test_bert_base_prompt_tuning_20_tokens_has_15360_params(build):
    module = build({"backbone": {"config": {"model_type": "bert"}},
                    "method": {"class_path": "prompt", "init_args": {"num_virtual_tokens": 20}}})
    counts = module.param_counts()
    assert counts.method_params == counts.stored_params == 20 * 768 == 15_360
    assert counts.head_params == 768 * 2 + 2
    assert module.method.modified_modules["prompt_encoder"].startswith("prompt tuning: 20 virtual tokens (+15,360)")


def test_ptuning_trains_the_encoder_and_stores_its_output(build):
    d, p = TINY_BERT["hidden_size"], 4
    mlp = build(recipe(TINY_BERT, "ptuning-mlp")).param_counts()
    assert mlp.method_params == p * d + (d * d + d) + (d * d + d)  # embedding + Linear(d, d) + Linear(d, d)
    assert mlp.stored_params == p * d <= mlp.method_params
    h = 16
    lstm = build(recipe(TINY_BERT, "ptuning-lstm")).param_counts()
    lstm_params = 2 * (4 * h * (d + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)  # 2 layers x 2 directions
    assert lstm.method_params == p * d + lstm_params + (2 * h * h + h) + (h * d + d)
    assert lstm.stored_params == p * d


# -- training --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["prompt", "ptuning-mlp", "prefix"])
def test_encoder_classification_loss_falls_through_the_method_alone(build, sentiment_csv, tmp_path, key):
    """The head is frozen, so only the method can lower the loss; frozen weights stay bitwise equal."""
    module = build(recipe(SHARP_BERT, key, learning_rate=LR[METHODS[key][0]], train_head=False))
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    before = method_state(module)
    assert all(n.startswith(("prompt_encoder.", "prefix_encoder.")) for n in before)
    recorder = LossRecorder()
    data = ClassificationData(data_files=sentiment_csv, batch_size=16, max_train_examples=16)
    trainer(tmp_path, 20, recorder).fit(module, datamodule=data)
    losses = recorder.losses
    assert sum(losses[-3:]) < 0.75 * sum(losses[:3]), losses
    for name, value in frozen.items():
        assert torch.equal(module.model.get_parameter(name), value), f"frozen weight {name} changed"
    assert all(not torch.equal(module.model.get_parameter(n), v) for n, v in before.items())


@pytest.mark.parametrize("key,backbone", [("prompt", TINY_LLAMA), ("ptuning-lstm", TINY_LLAMA), ("prefix", TINY_GPT2)])
def test_decoder_causal_lm_loss_falls(build, instruction_jsonl, tmp_path, key, backbone):
    module = build(recipe(backbone, key, "CausalLM", learning_rate=LR_LM[METHODS[key][0]]))
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    recorder = LossRecorder()
    data = InstructionData(data_files=instruction_jsonl, batch_size=8, max_length=32, max_train_examples=8)
    trainer(tmp_path, 20, recorder).fit(module, datamodule=data)
    losses = recorder.losses
    assert sum(losses[-3:]) < 0.85 * sum(losses[:3]), losses
    for name, value in frozen.items():
        assert torch.equal(module.model.get_parameter(name), value), f"frozen weight {name} changed"


def test_prompt_tuning_trains_under_gradient_checkpointing(build):
    module = build(recipe(TINY_LLAMA, "prompt", "CausalLM", gradient_checkpointing=True))
    ids = torch.randint(1000, 2000, (2, 6))
    module.model(input_ids=ids).logits.float().pow(2).mean().backward()
    assert module.model.prompt_encoder.embedding.weight.grad is not None


# -- masks: padding does not change a sequence's outputs -------------------------------------


@pytest.mark.parametrize("key", list(METHODS))
def test_padding_does_not_change_an_encoder_sequence(build, key):
    module = build(recipe(TINY_BERT, key))
    alone, batch = alone_and_padded(module)
    assert batch.shape == (2,)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", list(METHODS))
@pytest.mark.parametrize("backbone", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama"])
def test_padding_does_not_change_a_decoder_sequence(build, key, backbone):
    module = build(recipe(backbone, key, "CausalLM"))
    alone, batch = alone_and_padded(module)
    assert alone.shape == (5, backbone["vocab_size"])  # virtual positions are dropped from the logits
    torch.testing.assert_close(batch[:5], alone, atol=1e-4, rtol=1e-5)


def test_the_method_changes_the_outputs(build):
    ids = torch.randint(1000, 2000, (2, 6))
    base = build({"backbone": {"config": TINY_LLAMA, "tokenizer": TOKENIZER}, "task": {"class_path": "CausalLM"}}, seed=3)
    with torch.no_grad():
        plain = base.eval().model(input_ids=ids).logits
        for key in METHODS:
            tuned = build(recipe(TINY_LLAMA, key, "CausalLM"), seed=3).eval().model(input_ids=ids).logits
            assert tuned.shape == plain.shape
            assert (tuned - plain).abs().max() > 1e-3, key


# -- generation --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["prompt", "ptuning-mlp", "prefix"])
@pytest.mark.parametrize("backbone", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama"])
def test_generation_left_padded_and_cached_matches_a_full_forward(build, key, backbone):
    """generate() with the virtual tokens: a prompt alone and left-padded in a batch give the same
    scores, and each step's scores equal a plain forward pass over the generated text."""
    module = build(recipe(backbone, key, "CausalLM")).eval()
    prompt = torch.randint(1000, 2000, (1, 5))
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0, 4:], ids[1] = prompt[0], torch.randint(1000, 2000, (9,))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    alone = module.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    padded = module.model.generate(input_ids=ids, attention_mask=(ids != 0).long(), **kwargs)
    assert torch.equal(alone.sequences[0, 5:], padded.sequences[0, 9:])
    for a, b in zip(alone.logits, padded.logits):
        torch.testing.assert_close(b[0], a[0], atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        full = module.model(input_ids=alone.sequences).logits[0]
    for step, scores in enumerate(alone.logits):
        torch.testing.assert_close(scores[0], full[4 + step], atol=1e-4, rtol=1e-5)
    # without a cache generate hands the model the whole text each step (and, in transformers 5,
    # the cache the last call returned): the same text
    uncached = module.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **kwargs)
    assert torch.equal(uncached.sequences, alone.sequences)


def test_causal_lm_task_predict_generates_text(build):
    from framework.tasks import CausalLM

    module = build(recipe(TINY_GPT2, "prompt", "CausalLM")).eval()
    ids = torch.tensor([[0, 0, 1996, 2143], [2023, 2003, 1037, 2204]])
    batch = {"prompt_input_ids": ids, "prompt_attention_mask": (ids != 0).long(), "reference": ["a", "b"]}
    records = CausalLM(max_new_tokens=3).predict(module.model, batch, module.tokenizer)
    assert [r["reference"] for r in records] == ["a", "b"] and all(isinstance(r["generated"], str) for r in records)


def test_fw_fit_then_predict_generates_with_prefix_tuning(tmp_path, instruction_jsonl):
    from framework.cli import main

    recipe_dict = {
        "seed_everything": 0,
        "test_after_fit": False,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 4, "enable_progress_bar": False, "num_sanity_val_steps": 0,
            "enable_model_summary": False, "limit_val_batches": 0, "limit_predict_batches": 1,
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "p"}},
            "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"save_last": True, "save_top_k": 0}}],
        },
        "model": {
            **recipe(TINY_LLAMA, "prefix", "CausalLM", learning_rate=0.01),
            "task": {"class_path": "CausalLM", "init_args": {"max_new_tokens": 4}},
        },
        "data": {"class_path": "InstructionData",
                 "init_args": {"data_files": instruction_jsonl, "batch_size": 8, "max_length": 48}},
    }
    path = write_recipe(tmp_path / "r.yaml", recipe_dict)
    assert main(["fit", "--config", path]) == 0
    ckpt = tmp_path / "runs" / "p" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["predict", "--config", path, "--ckpt_path", str(ckpt)]) == 0
    records = [json.loads(line) for line in (tmp_path / "runs" / "p" / "version_1" / "predictions.jsonl").open()]
    assert len(records) == 8 and all(r["generated"] for r in records)


# -- checkpoints and the stored form ---------------------------------------------------------


@pytest.mark.parametrize("key", list(METHODS))
def test_adapter_only_checkpoint_round_trip(build, tmp_path, key):
    module = build(recipe(TINY_BERT, key), seed=1)
    perturb(module)
    checkpoint: dict[str, Any] = {}
    module.on_save_checkpoint(checkpoint)
    prefix = "model.prefix_encoder." if key == "prefix" else "model.prompt_encoder."
    assert all(k.startswith((prefix, "model.classifier.")) for k in checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "c.ckpt")
    fresh = build(recipe(TINY_BERT, key), seed=1)  # the same random backbone, the method untrained
    ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        expected = module.eval().model(input_ids=ids).logits
        assert not torch.allclose(fresh.eval().model(input_ids=ids).logits, expected)
        fresh.load_state_dict(torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"])
        torch.testing.assert_close(fresh.model(input_ids=ids).logits, expected)


@pytest.mark.parametrize("key", ["ptuning-mlp", "ptuning-lstm"])
def test_ptuning_stores_only_the_encoder_output_and_it_suffices(build, key):
    from fw_ptuning import STORED_KEY

    module = build(recipe(TINY_LLAMA, key, "CausalLM"), seed=1)
    perturb(module)
    stored = module.method.stored_state_dict(module.model)
    assert list(stored) == [STORED_KEY] and stored[STORED_KEY].shape == (4, TINY_LLAMA["hidden_size"])
    counts = module.param_counts()
    assert counts.stored_params == 4 * TINY_LLAMA["hidden_size"] < counts.method_params
    fresh = build(recipe(TINY_LLAMA, key, "CausalLM"), seed=1)  # the same random backbone
    fresh.method.load_stored_state_dict(fresh.model, stored)
    assert not any(p.requires_grad for p in fresh.model.prompt_encoder.parameters())  # inference only
    ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().model(input_ids=ids).logits, module.eval().model(input_ids=ids).logits)


@pytest.mark.parametrize("key", ["prompt", "prefix"])
# the classifier through PEFT's task-agnostic wrapper: PEFT's SEQ_CLS prefix path looks for a
# `past_key_values` argument, which transformers 5.24 renamed to `cache`
@pytest.mark.parametrize("backbone,task,task_type", [(TINY_BERT, None, "FEATURE_EXTRACTION"), (TINY_LLAMA, "CausalLM", "CAUSAL_LM")],
                         ids=["bert", "llama"])
def test_same_outputs_as_hugging_face_peft_with_the_stored_tensor(build, key, backbone, task, task_type):
    """The stored tensor is PEFT's ``prompt_embeddings``: loaded into peft, it gives the same logits
    (virtual positions, masks, positions and the prefix layout agree)."""
    peft = pytest.importorskip("peft")
    module = build(recipe(backbone, key, task), seed=1).eval()
    stored = module.method.stored_state_dict(module.model)
    tensor = stored["prefix_encoder.prompt_embeddings"] if key == "prefix" else stored["prompt_encoder.embedding.weight"]
    plain = {"backbone": {"config": backbone, "tokenizer": TOKENIZER}, **({"task": {"class_path": task}} if task else {})}
    base = build(plain, seed=1).model  # the same random backbone (and head)
    config = (peft.PrefixTuningConfig if key == "prefix" else peft.PromptTuningConfig)(task_type=task_type, num_virtual_tokens=4)
    theirs = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(tensor)
        ids = torch.randint(1000, 2000, (2, 7))
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        if task and key == "prompt":
            expected = expected[:, 4:]  # peft keeps the virtual positions in the logits
        torch.testing.assert_close(module.model(input_ids=ids, attention_mask=mask).logits, expected)


# -- initialisation --------------------------------------------------------------------------


def test_prompt_initialisations(build):
    words = lambda m: m.model.get_input_embeddings().weight  # noqa: E731
    vocab = build(recipe(TINY_BERT, "prompt"))  # init: vocab, the default
    table = vocab.model.prompt_encoder.embedding.weight
    assert all((words(vocab) == row).all(-1).any() for row in table)  # each row is a vocabulary embedding
    random = build({**recipe(TINY_BERT, "prompt"), "method": {"class_path": "prompt", "init_args": {"init": "random"}}})
    assert random.model.prompt_encoder.embedding.weight.shape == (20, TINY_BERT["hidden_size"])
    text = build({**recipe(TINY_BERT, "prompt"),
                  "method": {"class_path": "prompt", "init_args": {"num_virtual_tokens": 5, "init": "text", "init_text": "great movie"}}})
    text.method.prepare(text.prepare_context(None))  # the core calls it before fitting, with the backbone's tokenizer
    ids = text.tokenizer("great movie", add_special_tokens=False)["input_ids"]
    expected = words(text)[torch.tensor((ids * 5)[:5])]
    assert torch.equal(text.model.prompt_encoder.embedding.weight, expected)
    with torch.no_grad():
        text.model.prompt_encoder.embedding.weight.zero_()
    text.method.prepare(text.prepare_context(None))  # a second fit does not re-initialise trained weights
    assert text.model.prompt_encoder.embedding.weight.abs().sum() == 0


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(METHODS))
def test_cannot_merge(build, key):
    module = build(recipe(TINY_BERT, key))
    with pytest.raises(MergeNotSupportedError, match="cannot be merged"):
        module.method.merge(module.model)


@pytest.mark.parametrize(
    "cls,bad,field",
    [
        ("fw_prompt:PromptTuning", {"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ("fw_prompt:PromptTuning", {"init": "text"}, "init_text"),
        ("fw_ptuning:PTuning", {"encoder": "gru"}, "encoder"),
        ("fw_ptuning:PTuning", {"encoder_hidden_size": -1}, "encoder_hidden_size"),
        ("fw_prefix:PrefixTuning", {"prefix_length": 0}, "prefix_length"),
        ("fw_prefix:PrefixTuning", {"bottleneck": 0}, "bottleneck"),
    ],
)
def test_bad_hyper_parameters_name_the_field(cls, bad, field):
    import importlib

    module_name, _, name = cls.partition(":")
    with pytest.raises(ValueError, match=f"^{field}: "):  # the plugin's own argument; the core adds the path
        getattr(importlib.import_module(module_name), name)(**bad)


def test_too_long_input_names_the_field(build):
    module = build(recipe(TINY_BERT, "prompt"))
    ids = torch.randint(1000, 2000, (1, TINY_BERT["max_position_embeddings"] - 2))
    with pytest.raises(ValueError, match="num_virtual_tokens: 4 virtual positions \\+ 126 input tokens exceed"):
        module.model(input_ids=ids)
