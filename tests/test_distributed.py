"""DDP and FSDP on this CPU with the gloo backend, through `fw fit` subprocesses (Lightning's
launcher re-executes the command line, so the runs cannot be in-process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA, TOKENIZER, write_recipe

pytestmark = pytest.mark.distributed

#: no dropout anywhere, so a 2-process run and a 1-process run compute the same thing
QUIET_BERT = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
DDP_METHODS = {
    "lora": {"class_path": "lora", "init_args": {"r": 4}},
    "prompt": {"class_path": "prompt", "init_args": {"num_virtual_tokens": 4}},
    "fisher": {"class_path": "fisher", "init_args": {"fraction": 0.01, "num_samples": 32}},
}


def fw_fit(recipe: dict[str, Any], root: Path, *args: str) -> Path:
    """Run `fw fit` in a subprocess; returns the run's last checkpoint."""
    path = write_recipe(root / "recipe.yaml", recipe)
    fw = str(Path(sys.executable).with_name("fw"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([fw, "fit", "--config", path, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return root / "runs" / "r" / "version_0" / "checkpoints" / "last.ckpt"


def classification_recipe(root: Path, files: dict[str, str], method: dict, batch_size: int, steps: int = 6) -> dict:
    return {
        "seed_everything": 0,
        "test_after_fit": False,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": steps, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(root / "runs"), "name": "r"}},
            "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"save_last": True, "save_top_k": 0}}],
        },
        "model": {"backbone": {"config": QUIET_BERT, "tokenizer": TOKENIZER}, "method": method,
                  "learning_rate": 0.01, "warmup_ratio": 0.0},
        "data": {"class_path": "ClassificationData",
                 "init_args": {"data_files": files, "batch_size": batch_size, "shuffle": False}},
    }


def adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["state_dict"]


@pytest.mark.parametrize("name", list(DDP_METHODS))
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(name, sentiment_csv, tmp_path):
    """2 ranks x batch 8 (without shuffling: rank r reads rows r, r+2, ...) against 1 rank x
    batch 16: the same examples per step, averaged gradients, so the same adapter."""
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = adapter(fw_fit(classification_recipe(tmp_path / "one", sentiment_csv, DDP_METHODS[name], 16), tmp_path / "one"))
    two = adapter(fw_fit(classification_recipe(tmp_path / "two", sentiment_csv, DDP_METHODS[name], 8), tmp_path / "two",
                         "--trainer.strategy", "ddp", "--trainer.devices", "2"))
    assert one.keys() == two.keys() and len(one) > 2
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=key)
