"""Tasks: mean pooling for encoder classifiers (what the head reads, padding-independent)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA


def pooled_recipe(config: dict, pooling: str) -> dict:
    return {"backbone": {"config": config}, "task": {"class_path": "Classification", "init_args": {"pooling": pooling}}}


def test_mean_pooling_feeds_the_masked_mean_to_the_pooler(build):
    module = build(pooled_recipe(TINY_BERT, "mean"))
    module.eval()
    ids = torch.randint(1000, 2000, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    seen = {}
    module.model.bert.pooler.register_forward_hook(lambda m, args, out: seen.update(first=args[0][:, 0]))
    with torch.no_grad():
        module.model(input_ids=ids, attention_mask=mask)
        hidden = module.model.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # rewritten by the hook
    assert torch.allclose(seen["first"], hidden[:, 0])
    cls = build(pooled_recipe(TINY_BERT, "cls"))
    cls.eval()
    with torch.no_grad():
        raw = cls.model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = torch.stack([raw[0].mean(0), raw[1, :4].mean(0)])
    assert torch.allclose(seen["first"], expected, atol=1e-6)


def test_mean_pooling_is_padding_independent(build):
    module = build(pooled_recipe(TINY_BERT, "mean"))
    module.eval()
    short = torch.randint(1000, 2000, (1, 4))
    padded = torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 4 + [0] * 5])
    with torch.no_grad():
        alone = module.model(input_ids=short).logits
        batched = module.model(input_ids=padded, attention_mask=mask).logits
    assert torch.allclose(alone, batched, atol=1e-5)


def test_mean_pooling_refuses_decoders(build):
    with pytest.raises(ValueError, match="model.task.pooling: mean pooling needs an encoder"):
        build(pooled_recipe(TINY_LLAMA, "mean"))
