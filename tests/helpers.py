"""Helpers several test modules share (fixtures live in conftest.py): a Trainer for short
runs, a recorder of training losses, the tiny recipe of the CLI tests, and probes of a model's
outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from conftest import TINY_BERT, TOKENIZER
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from framework.data import ClassificationData

#: a tiny BERT whose random weights are large enough to give sharp logits, and no dropout
SHARP_BERT = {**TINY_BERT, "initializer_range": 0.3, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.start_step: int | None = None
        self.start_optimizer_state: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step
        state = trainer.optimizers[0].state_dict()["state"]
        self.start_optimizer_state = {k: {n: t.clone() for n, t in v.items()} for k, v in state.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def trainer(tmp_path: Path, max_steps: int, *callbacks: Callback, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=list(callbacks), enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **kwargs,
    )


def classification_data(files: dict[str, str], batch_size: int = 16) -> ClassificationData:
    return ClassificationData(data_files=files, batch_size=batch_size)


def tiny_recipe(tmp_path: Path, files: dict[str, str], **model: object) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 10, "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "runs"), "enable_model_summary": False,
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"}},
            "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"save_last": True, "save_top_k": 0}}],
        },
        "model": {
            "backbone": {"config": TINY_BERT, "tokenizer": TOKENIZER},
            "method": {"class_path": "lora", "init_args": {"r": 8}},
            "learning_rate": 0.01,
            **model,
        },
        "data": {"class_path": "ClassificationData", "init_args": {"data_files": files, "batch_size": 16}},
    }


def alone_and_padded(module, short: int = 5, long: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a sequence alone, and of the same sequence right-padded in a batch."""
    module.eval()
    a = torch.randint(1000, 2000, (1, short))
    ids = torch.zeros(2, long, dtype=torch.long)
    ids[0, :short], ids[1] = a[0], torch.randint(1000, 2000, (long,))
    mask = (ids != 0).long()
    with torch.no_grad():
        alone = module.model(input_ids=a, attention_mask=torch.ones_like(a)).logits[0]
        batch = module.model(input_ids=ids, attention_mask=mask).logits[0]
    return alone, batch


def perturb(module: Any) -> None:
    """Move every trainable parameter off its initialisation (unseeded)."""
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def trained_module(model_config: dict[str, Any], seed: int = 0) -> Any:
    """A module as if trained, without the training: built under ``seed``, FISH's mask
    calibrated on one batch, every trainable parameter moved off its initialisation; in eval
    mode (what the export and loading tests compare logits of)."""
    from conftest import padded_ids, perturb_trainable

    from framework.cli import build_module

    torch.manual_seed(seed)
    module = build_module(model_config)
    if (model_config.get("method") or {}).get("class_path") == "fisher":
        batch = {**padded_ids(), "labels": torch.tensor([0, 1, 1])}
        module.method.select(module.model, lambda b: module.task.step(module.model, b)[0], [batch], progress=False)
    return perturb_trainable(module)


def adam_losses(module: Any, batch: dict[str, Any], steps: int, lr: float = 1e-2) -> list[float]:
    """The task losses of ``steps`` Adam steps on one batch over the trainable parameters."""
    optimizer = torch.optim.Adam([p for p in module.model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = module.task.step(module.model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def module_from_adapter(folder: Path, model_config: dict[str, Any], seed: int = 5) -> Any:
    """What ``fw ... --adapter folder`` builds: the recipe updated by the folder's method
    settings, built under ``seed`` (a random-init backbone's weights come from its own seed),
    the folder's weights loaded; in eval mode."""
    from framework.cli import build_module
    from framework.formats.source import read_adapter, updated

    adapter = read_adapter(folder)
    torch.manual_seed(seed)
    module = build_module(updated(model_config, adapter.model_update(model_config)))
    adapter.load_into(module)
    return module.eval()


def peft_model(base: str, causal: bool, adapter_dir: str) -> Any:
    """``PeftModel.from_pretrained`` of ``adapter_dir`` on the float32 ``base`` folder (a causal
    LM, else a sequence classifier), in eval mode: how a PEFT user loads fw's export."""
    import peft
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    return peft.PeftModel.from_pretrained(auto.from_pretrained(base, dtype=torch.float32), adapter_dir).eval()
