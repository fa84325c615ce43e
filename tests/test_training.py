"""Training behaviour: the loss falls, frozen weights stay bitwise equal, checkpoints are
adapter-only and small, and resuming continues the step count and optimizer state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA, lora_recipe
from helpers import LossRecorder, classification_data, trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from framework.data import InstructionData
from framework.tasks import CausalLM


def test_loss_falls_and_frozen_weights_stay_bitwise_equal(build, sentiment_csv, tmp_path):
    recipe = lora_recipe(TINY_BERT, r=8, targets=["query", "value"])
    recipe["learning_rate"] = 0.01
    module = build(recipe)
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    assert frozen and trainable
    recorder = LossRecorder()
    trainer(tmp_path, 150, recorder).fit(module, datamodule=classification_data(sentiment_csv))
    first, last = recorder.losses[:10], recorder.losses[-10:]
    assert sum(last) / len(last) < 0.6 * sum(first) / len(first), recorder.losses
    for name, before in frozen.items():
        assert torch.equal(module.model.get_parameter(name), before), f"frozen weight {name} changed"
    assert any(not torch.equal(module.model.get_parameter(n), v) for n, v in trainable.items())


def test_causal_lm_loss_falls_on_response_tokens(build, instruction_jsonl, tmp_path):
    recipe = lora_recipe(TINY_LLAMA, r=8, targets=["all-linear"])
    recipe.update(task={"class_path": "CausalLM"}, learning_rate=0.01)
    module = build(recipe)
    assert isinstance(module.task, CausalLM) and module.param_counts().head_params == 0
    recorder = LossRecorder()
    data = InstructionData(data_files=instruction_jsonl, batch_size=16, max_length=48)
    trainer(tmp_path, 40, recorder).fit(module, datamodule=data)
    assert sum(recorder.losses[-5:]) / 5 < 0.5 * sum(recorder.losses[:5]) / 5, recorder.losses


def _checkpointed_run(build, files, tmp_path: Path, steps: int, recorder: Callback, ckpt_path: str | None = None):
    module = build(lora_recipe(TINY_BERT, r=8))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer(tmp_path, steps, ckpt, recorder).fit(module, datamodule=classification_data(files), ckpt_path=ckpt_path)
    return module, tmp_path / "ckpt" / "last.ckpt"


def test_checkpoint_holds_only_trainable_weights_and_is_small(build, sentiment_csv, tmp_path):
    module, path = _checkpointed_run(build, sentiment_csv, tmp_path, 6, LossRecorder())
    checkpoint = torch.load(path, weights_only=True)
    trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    assert all(".lora_" in k or ".classifier." in k for k in checkpoint["state_dict"])
    backbone_bytes = module.backbone_params * 4
    assert path.stat().st_size < 0.02 * backbone_bytes, (path.stat().st_size, backbone_bytes)
    meta = checkpoint["fw"]
    assert meta["method"]["class_path"] == "fw_lora.method.LoRA" and meta["method"]["init_args"]["r"] == 8
    assert meta["backbone"]["config"]["model_type"] == "bert"
    assert checkpoint["hyper_parameters"]["method"]["init_args"]["r"] == 8


def test_resume_continues_step_count_optimizer_and_schedule(build, sentiment_csv, tmp_path):
    _, path = _checkpointed_run(build, sentiment_csv, tmp_path, 10, LossRecorder())
    saved = torch.load(path, weights_only=True)
    recorder = LossRecorder()
    module, _ = _checkpointed_run(build, sentiment_csv, tmp_path / "resume", 16, recorder, ckpt_path=str(path))
    assert recorder.start_step == 10
    assert len(recorder.losses) == 6  # only the remaining steps ran
    saved_state = saved["optimizer_states"][0]["state"]
    assert saved_state and set(saved_state) == set(recorder.start_optimizer_state)
    for key, tensors in saved_state.items():
        for name, value in tensors.items():
            assert torch.equal(recorder.start_optimizer_state[key][name], value)
    assert saved["lr_schedulers"][0]["last_epoch"] == 10


def test_loading_a_checkpoint_for_another_target_list_fails_clearly(build, sentiment_csv, tmp_path):
    _, path = _checkpointed_run(build, sentiment_csv, tmp_path, 2, LossRecorder())
    other = build(lora_recipe(TINY_BERT, r=8, targets=["key"]))
    with pytest.raises(KeyError, match="do not fit this model"):
        other.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
