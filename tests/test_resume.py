"""Exact resume: a run resumed from any of its checkpoints (mid-epoch, at an epoch boundary,
after a kill -9) ends with the uninterrupted run's adapter, dropout on, shuffling on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TOKENIZER, sentiment_files, write_recipe

from framework.cli import main

DROPOUT_BERT = {**TINY_BERT, "hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.1}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return sentiment_files(tmp_path_factory.mktemp("resume-data"), 48, 16, 16)


def recipe(root: Path, files: dict[str, str], *callbacks: dict) -> dict:
    """3 epochs of 3 batches, validation every 2; a checkpoint after every step (all kept: step=K.ckpt)."""
    return {
        "seed_everything": 3,
        "test_after_fit": False,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 3, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "val_check_interval": 2,
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(root / "runs"), "name": "r"}},
            "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {
                "save_top_k": -1, "every_n_train_steps": 1, "filename": "{step}", "save_last": True}}, *callbacks],
        },
        "model": {"backbone": {"config": DROPOUT_BERT, "tokenizer": TOKENIZER},
                  "method": {"class_path": "lora", "init_args": {"r": 4, "dropout": 0.3}},
                  "learning_rate": 0.01, "scheduler": "cosine"},
        "data": {"class_path": "ClassificationData", "init_args": {"data_files": files, "batch_size": 16}},
    }


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


KILLER = '''
import os, signal
from lightning.pytorch import Callback

class KillAtStep(Callback):
    """kill -9 this process when step ``step`` is about to start (its checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def killed_at(step: int, files: dict[str, str], tmp_path: Path) -> Path:
    """``fw fit`` in a subprocess, killed with SIGKILL before step ``step``; its run folder."""
    (tmp_path / "killer.py").write_text(KILLER)
    root = tmp_path / f"killed-{step}"
    root.mkdir()
    path = write_recipe(root / "r.yaml", recipe(root, files, {"class_path": "killer.KillAtStep", "init_args": {"step": step}}))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    fw = str(Path(sys.executable).with_name("fw"))
    done = subprocess.run([fw, "fit", "--config", path], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    return root


def test_resumed_runs_end_where_the_uninterrupted_run_ends(files, tmp_path):
    """Resumed mid-epoch in the last epoch from a kept checkpoint, and after
    kill -9 (at an epoch boundary and mid-epoch): the final adapter is the uninterrupted one's."""
    root = tmp_path / "whole"
    path = write_recipe(tmp_path / "whole.yaml", recipe(root, files))
    assert main(["fit", "--config", path]) == 0
    whole = root / "runs" / "r" / "version_0"
    reference = adapter(whole)
    for step in (7,):  # from a kept checkpoint: mid-epoch in the last epoch
        assert main(["fit", "--config", path, "--ckpt_path", str(whole / "checkpoints" / f"step={step}.ckpt")]) == 0
        resumed = sorted((root / "runs" / "r").glob("version_*"))[-1]
        assert_same_adapter(adapter(resumed), reference)
        summary = json.loads((resumed / "summary.json").read_text())
        assert summary["train_steps"] == 9 and summary["resumed_at_step"] == step  # the whole run's steps
    for step in (3, 5):  # killed at the first epoch's end, and mid-epoch; resumed with `last`
        killed = killed_at(step, files, tmp_path)
        last = killed / "runs" / "r" / "version_0" / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=True)["global_step"] == step
        resume = write_recipe(killed / "resume.yaml", recipe(killed, files))  # the same run, without the killer
        assert main(["fit", "--config", resume, "--ckpt_path", "last"]) == 0
        assert_same_adapter(adapter(killed / "runs" / "r" / "version_1"), reference)
