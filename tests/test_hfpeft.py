"""Hugging Face PEFT's implementations as fw methods (``peft_lora``, ``peft_ia3``, ``peft_vera``,
``peft_prompt``, ``peft_ptuning``, ``peft_prefix``): the benchmark references of fw's methods.

They must be the same method as fw's (same counts and modules; the same weights give the same
logits, mean pooling and padding included), train in fw's loop, and round-trip fw's
checkpoints.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA, TOKENIZER
from helpers import LossRecorder, trainer

from framework.data import ClassificationData

pytest.importorskip("peft")

MEAN = {"class_path": "Classification", "init_args": {"num_labels": 2, "pooling": "mean"}}
SHARP_BERT = {**TINY_BERT, "initializer_range": 0.3, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def recipe(method: str, backbone: dict[str, Any] = TINY_BERT, **args: Any) -> dict[str, Any]:
    return {"backbone": {"config": backbone, "tokenizer": TOKENIZER}, "task": MEAN,
            "method": {"class_path": method, "init_args": args}}


def padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 2000, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("fw", ["lora", "ia3"])
def test_injected_layers_target_what_fws_method_targets(build, fw):
    """fw's targets (suffixes and ``re:`` patterns: IA³'s FFN down projection) reach PEFT."""
    ours, theirs = build(recipe(fw)), build(recipe(f"peft_{fw}"))
    assert theirs.param_counts() == ours.param_counts()
    assert sorted(theirs.modified_modules()) == sorted(ours.modified_modules())


def test_ia3_same_vectors_same_logits(build):
    ours, theirs = build(recipe("ia3"), seed=1).eval(), build(recipe("peft_ia3"), seed=1).eval()
    vectors = [p for n, p in ours.model.named_parameters() if "ia3_l" in n]
    peft_vectors = [p for n, p in theirs.model.named_parameters() if "ia3_l" in n]  # in the same module order
    assert len(vectors) == len(peft_vectors) == 3 * TINY_BERT["num_hidden_layers"]
    with torch.no_grad():
        for mine, peft_vector in zip(vectors, peft_vectors):
            mine.uniform_(0.5, 1.5)
            peft_vector.copy_(mine.reshape(peft_vector.shape))
        batch = padded_batch()
        torch.testing.assert_close(theirs.model(**batch).logits, ours.model(**batch).logits)


@pytest.mark.parametrize("fw,args", [("prompt", {"num_virtual_tokens": 4}),
                                     ("ptuning", {"num_virtual_tokens": 4}),
                                     ("prefix", {"prefix_length": 4, "bottleneck": 16})])
def test_counts_match_fws_method(build, fw, args):
    ours, theirs = build(recipe(fw, **args)), build(recipe(f"peft_{fw}", **args))
    a, b = ours.param_counts(), theirs.param_counts()
    assert b.stored_params == a.stored_params > 0 and b.head_params == a.head_params
    if fw == "ptuning":  # PEFT's MLP has a third (hidden x hidden) layer
        hidden = TINY_BERT["hidden_size"]
        assert b.method_params == a.method_params + hidden * hidden + hidden
    else:
        assert b.method_params == a.method_params and b.trainable_params == a.trainable_params
    assert all(n.startswith(("peft_prompt_encoder.", "classifier.")) for n, p in theirs.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("fw", ["prompt", "prefix"])
def test_the_same_weights_give_fws_logits_under_mean_pooling_and_padding(build, fw):
    """fw's trained tensor copied into PEFT's encoder: the same logits (virtual positions, masks,
    mean pooling over a mask that covers the prefix, prefix layout)."""
    args = {"num_virtual_tokens": 4} if fw == "prompt" else {"prefix_length": 4, "reparameterize": False}
    ours = build(recipe(fw, **args), seed=1).eval()
    theirs = build(recipe(f"peft_{fw}", **args), seed=1).eval()
    stored = ours.method.stored_state_dict(ours.model)
    tensor = stored["prompt_encoder.embedding.weight" if fw == "prompt" else "prefix_encoder.prompt_embeddings"]
    batch = padded_batch()
    with torch.no_grad():
        theirs.model.peft_prompt_encoder["default"].embedding.weight.copy_(tensor)
        expected = ours.model(**batch).logits
        torch.testing.assert_close(theirs.model(**batch).logits, expected)
        stored_theirs = theirs.method.stored_state_dict(theirs.model)["peft_prompt_encoder.prompt_embeddings"]
        torch.testing.assert_close(stored_theirs, tensor)


@pytest.mark.parametrize("method,lr", [("peft_prompt", 0.03), ("peft_prefix", 0.01)])
def test_trains_in_fws_loop_through_the_encoder_alone(build, sentiment_csv, tmp_path, method, lr):
    args = {"num_virtual_tokens": 4} if method == "peft_prompt" else {"prefix_length": 4, "bottleneck": 32}
    module = build({**recipe(method, SHARP_BERT, **args), "task": {"class_path": "Classification"},
                    "learning_rate": lr, "train_head": False})
    encoder = {n: p.detach().clone() for n, p in module.model.peft_prompt_encoder.named_parameters()}
    recorder = LossRecorder()
    data = ClassificationData(data_files=sentiment_csv, batch_size=16, max_train_examples=16)
    trainer(tmp_path, 20, recorder).fit(module, datamodule=data)
    assert sum(recorder.losses[-3:]) < 0.75 * sum(recorder.losses[:3]), recorder.losses
    assert all(not torch.equal(p, encoder[n]) for n, p in module.model.peft_prompt_encoder.named_parameters())


def test_adapter_only_checkpoint_round_trip(build, tmp_path):
    module = build(recipe("peft_ptuning", num_virtual_tokens=4), seed=1)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    checkpoint: dict[str, Any] = {}
    module.on_save_checkpoint(checkpoint)
    assert all(k.startswith(("model.peft_prompt_encoder.", "model.classifier.")) for k in checkpoint["state_dict"])
    fresh = build(recipe("peft_ptuning", num_virtual_tokens=4), seed=1)
    batch = padded_batch()
    with torch.no_grad():
        expected = module.eval().model(**batch).logits
        assert not torch.allclose(fresh.eval().model(**batch).logits, expected)
        fresh.load_state_dict(checkpoint["state_dict"])
        torch.testing.assert_close(fresh.model(**batch).logits, expected)


def test_refuses_a_causal_lm_and_names_fws_method(build):
    with pytest.raises(ValueError, match=r"model\.method: PeftPromptTuning .*sequence classification.*prompt, ptuning, prefix"):
        build({"backbone": {"config": TINY_LLAMA, "tokenizer": TOKENIZER}, "task": {"class_path": "CausalLM"},
               "method": {"class_path": "peft_prompt"}})


def test_peft_vera_is_fws_vera(build):
    """Same key: the same counts and, with the same vectors, the same logits."""
    ours, theirs = build(recipe("vera", SHARP_BERT, r=8, projection_prng_key=3)), build(
        recipe("peft_vera", SHARP_BERT, r=8, projection_prng_key=3))
    assert ours.param_counts().method_params == theirs.param_counts().method_params == 2 * 2 * (8 + 64)
    ours_vectors = {n: p for n, p in ours.model.named_parameters() if "vera_lambda" in n}
    with torch.no_grad():
        for name, p in theirs.model.named_parameters():
            if "vera_lambda" in name:
                value = torch.randn_like(p)
                p.copy_(value)
                ours_vectors[name.replace(".default", "")].copy_(value)
        theirs.model.classifier.load_state_dict(ours.model.classifier.state_dict())
        batch = padded_batch()
        torch.testing.assert_close(theirs.model(**batch).logits, ours.model(**batch).logits, rtol=1e-5, atol=1e-6)


def test_peft_loraplus_groups_are_peft_create_loraplus_optimizers(build):
    module = build(recipe("peft_lora", r=4, loraplus_lr_ratio=16.0))
    groups = module.method.param_groups(module.model, 1e-3)
    by_lr: dict[float, set[int]] = {}
    for g in groups:  # PEFT's groups: A; B with decay; B and 1-D parameters without
        by_lr.setdefault(g["lr"], set()).update(id(p) for p in g["params"])
    names = {id(p): n for n, p in module.model.named_parameters()}
    fast = {names[i] for i in by_lr[16e-3]}
    assert {n for n in fast if "lora_B" in n} == {n for n, p in module.model.named_parameters() if "lora_B" in n}
    assert all("lora_A" in names[i] or "classifier" in names[i] for i in by_lr[1e-3])
    assert "classifier.bias" in fast  # PEFT's rule: every 1-D trainable parameter at the ratio
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in module.model.parameters())
