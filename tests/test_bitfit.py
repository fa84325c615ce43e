"""BitFit: every bias of the backbone (counted independently), subsets, Llama refused,
checkpoints hold the biases alone."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BERT, TINY_GPT2, TINY_LLAMA, TOKENIZER


def bitfit_recipe(config: dict, **args) -> dict:
    return {"backbone": {"config": config, "tokenizer": TOKENIZER}, "method": {"class_path": "bitfit", "init_args": args}}


def test_bert_base_trains_every_backbone_bias(build):
    module = build(bitfit_recipe({"model_type": "bert"}))
    expected = sum(p.numel() for n, p in module.model.named_parameters() if n.endswith(".bias") and not n.startswith("classifier."))
    # BERT-base per layer: q,k,v,o 4*768 + FFN 3072+768 + 2 LayerNorms 2*768; embeddings LN 768; pooler 768
    assert expected == 12 * (4 * 768 + 3072 + 768 + 2 * 768) + 768 + 768 == 102_912
    counts = module.param_counts()
    assert counts.method_params == counts.stored_params == expected
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in trainable)
    assert "bert.embeddings.LayerNorm.bias" in trainable


def test_subset_by_name_and_gpt2(build):
    module = build(bitfit_recipe(TINY_BERT, targets=["query", "value"]))
    assert module.param_counts().method_params == 2 * 2 * TINY_BERT["hidden_size"]
    gpt2 = build(bitfit_recipe(TINY_GPT2))
    assert gpt2.param_counts().method_params == sum(
        p.numel() for n, p in gpt2.model.named_parameters() if n.endswith(".bias") and not n.startswith("score")
    )
    with pytest.raises(ValueError, match="pattern 'nothing' matches no module with a bias"):
        build(bitfit_recipe(TINY_BERT, targets=["nothing"]))


def test_llama_without_biases_fails_clearly(build):
    with pytest.raises(ValueError, match="has no bias parameters .* BitFit would train nothing"):
        build(bitfit_recipe(TINY_LLAMA))


def test_checkpoint_holds_the_biases_and_head_only(build, sentiment_csv, tmp_path):
    from helpers import LossRecorder, classification_data, trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = build(bitfit_recipe(TINY_BERT))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer(tmp_path, 4, ckpt, LossRecorder()).fit(module, datamodule=classification_data(sentiment_csv))
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(k.endswith(".bias") or k.startswith("model.classifier.") for k in state)
    assert sum(v.numel() for k, v in state.items() if not k.startswith("model.classifier.")) == module.param_counts().stored_params
    fresh = build(bitfit_recipe(TINY_BERT), seed=5)
    fresh.load_state_dict(state)
    fresh.eval(), module.eval()
    ids = torch.randint(1000, 2000, (2, 7))
    # `fresh` has other random weights (seed 5); the biases and the head come from the checkpoint
    query = "bert.encoder.layer.0.attention.self.query"
    assert torch.equal(fresh.model.get_submodule(query).bias, module.model.get_submodule(query).bias)
    assert fresh.model(input_ids=ids).logits.shape == (2, 2)
