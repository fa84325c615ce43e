"""FISH: exactly k entries, a toy case with known gradients, untouched entries bitwise equal
under weight decay and momentum, checkpoints of indices + values that scale with k."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BERT, TOKENIZER
from fw_fisher import FisherMask, SparseUpdate
from fw_fisher.mask import sparse_updates
from fw_fisher.method import candidate_params
from helpers import LossRecorder, classification_data, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn


def fisher_recipe(fraction: float = 0.005, **args) -> dict:
    return {
        "backbone": {"config": TINY_BERT, "tokenizer": TOKENIZER},
        "method": {"class_path": "fisher", "init_args": {"fraction": fraction, "num_samples": 32, **args}},
        "learning_rate": 0.01,
        "weight_decay": 0.1,
    }


def test_toy_gradient_on_known_weights_selects_exactly_those():
    model = nn.Linear(8, 4).requires_grad_(False)  # the core freezes the backbone before attach
    x = torch.zeros(6, 8)
    x[:, 5] = torch.arange(1.0, 7.0)  # only input feature 5 is ever non-zero

    def loss_fn(batch):  # depends on output unit 2 only -> gradient on W[2, 5] and b[2] only
        return model(batch["input_ids"])[:, 2].sum()

    method = FisherMask(fraction=2 / 36, num_samples=6)
    chosen = method.select(model, loss_fn, [{"input_ids": x[:3]}, {"input_ids": x[3:]}], progress=False)
    assert {k: v.tolist() for k, v in chosen.items()} == {"weight": [2 * 8 + 5], "bias": [2]}
    assert method.calibrated_on == 6
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "parametrizations.bias.0.values", "parametrizations.weight.0.values"]


def test_per_batch_estimator_selects_the_same_toy_weights():
    model = nn.Linear(8, 4)
    x = torch.zeros(4, 8)
    x[:, 1] = 1.0
    method = FisherMask(fraction=1 / 36, num_samples=4, per_example=False)
    chosen = method.select(model, lambda b: model(b["input_ids"])[:, 3].sum(), [{"input_ids": x}], progress=False)
    assert {k: v.tolist() for k, v in chosen.items()} in ({"weight": [3 * 8 + 1]}, {"bias": [3]})


def _fit(build, files, tmp_path, fraction, steps=12):
    module = build(fisher_recipe(fraction))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    recorder = LossRecorder()
    trainer(tmp_path, steps, ckpt, recorder).fit(module, datamodule=classification_data(files))
    return module, tmp_path / "last.ckpt", recorder


def test_mask_has_exactly_k_entries_and_untouched_entries_stay_bitwise_equal(build, sentiment_csv, tmp_path):
    reference = build(fisher_recipe())  # same seed: the same random backbone
    before = {n: p.detach().clone() for n, p in candidate_params(reference.model).items()}
    k = reference.method.k(reference.model)
    module, _, _ = _fit(build, sentiment_csv, tmp_path, 0.005)
    method = module.method
    updates = sparse_updates(module.model)
    assert k == round(0.005 * sum(t.numel() for t in before.values()))
    assert sum(u.indices.numel() for u in updates.values()) == k
    assert module.param_counts().method_params == k == module.param_counts().stored_params
    optimizer_state = sum(t.numel() for s in module.trainer.optimizers[0].state.values() for t in s.values() if t.dim() > 0)
    assert optimizer_state == 2 * module.param_counts().trainable_params  # AdamW state scales with k (+ head)

    method.merge(module.model)
    changed = 0
    for name, original in before.items():
        merged = module.model.get_parameter(name).detach()
        mask = torch.zeros(original.numel(), dtype=torch.bool)
        if name in updates:
            mask[updates[name].indices] = True
        assert torch.equal(merged.flatten()[~mask], original.flatten()[~mask]), f"{name}: an entry outside the mask moved"
        changed += int((merged.flatten()[mask] != original.flatten()[mask]).sum())
    assert changed > k // 2  # the masked entries did train (weight decay + gradients)
    assert not any(isinstance(m, SparseUpdate) for m in module.model.modules())


def test_checkpoint_stores_indices_and_values_scaling_with_k(build, sentiment_csv, tmp_path):
    small, small_ckpt, _ = _fit(build, sentiment_csv, tmp_path / "small", 0.001, steps=2)
    large, large_ckpt, _ = _fit(build, sentiment_csv, tmp_path / "large", 0.01, steps=2)
    state = torch.load(large_ckpt, weights_only=True)["state_dict"]
    assert all(k.endswith((".fisher_indices", ".fisher_values")) or k.startswith("model.classifier.") for k in state)
    entries = sum(v.numel() for k, v in state.items() if k.endswith(".fisher_values"))
    assert entries == large.param_counts().stored_params
    small_size, large_size = small_ckpt.stat().st_size, large_ckpt.stat().st_size
    ratio_k = large.param_counts().stored_params / small.param_counts().stored_params
    assert 5 < large_size / small_size <= ratio_k  # ~ linear in k (fixed overhead makes it a bit less)
    backbone_bytes = 4 * large.backbone_params
    assert large_size < 0.1 * backbone_bytes  # 1 % of entries: indices + values + optimizer state, no dense weights


def test_checkpoint_round_trip_into_a_fresh_module(build, sentiment_csv, tmp_path):
    module, path, _ = _fit(build, sentiment_csv, tmp_path, 0.005, steps=4)
    fresh = build(fisher_recipe())  # same seed, no calibration: the checkpoint brings the mask
    assert not sparse_updates(fresh.model)
    fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    module.eval(), fresh.eval()
    ids = torch.randint(1000, 2000, (2, 9))
    assert torch.equal(module.model(input_ids=ids).logits, fresh.model(input_ids=ids).logits)
    assert {n: u.indices.tolist() for n, u in sparse_updates(fresh.model).items()} == {
        n: u.indices.tolist() for n, u in sparse_updates(module.model).items()}


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="^fraction: "):
        FisherMask(fraction=0)
    with pytest.raises(ValueError, match="^num_samples: "):
        FisherMask(num_samples=0)
