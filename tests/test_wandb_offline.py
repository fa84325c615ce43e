"""With no W&B API key, a WandbLogger recipe runs offline into the log directory, and the run
carries the full config and the parameter counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_BERT, TOKENIZER, write_recipe
from wandb_records import config_items, history_keys, read_records

FW = str(Path(sys.executable).with_name("fw"))


def test_wandb_offline_run_has_config_and_parameter_counts(tmp_path, sentiment_csv):
    recipe = {
        "trainer": {
            "max_steps": 4, "accelerator": "cpu", "enable_progress_bar": False, "log_every_n_steps": 1,
            "enable_checkpointing": False, "default_root_dir": str(tmp_path / "runs"),
            "logger": {"class_path": "WandbLogger", "init_args": {"project": "fw-tests", "name": "tiny"}},
        },
        "model": {"backbone": {"config": TINY_BERT, "tokenizer": TOKENIZER},
                  "method": {"class_path": "lora", "init_args": {"r": 4}}},
        "data": {"class_path": "ClassificationData", "init_args": {"data_files": sentiment_csv, "batch_size": 16}},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "no-netrc"))  # no key, no netrc
    run = subprocess.run([FW, "fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "W&B run is written offline" in run.stdout
    logs = list((tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, list((tmp_path / "runs").rglob("*"))
    records = read_records(logs[0])
    config = config_items(records)
    assert config["params/method_params"] == 2 * 2 * 4 * (64 + 64)
    assert config["params/trainable_params"] == 2 * 2 * 4 * 128 + 130
    full = config["config"]
    assert full["model"]["method"]["class_path"] == "fw_lora.LoRA" and full["model"]["method"]["init_args"]["r"] == 4
    assert full["data"]["init_args"]["batch_size"] == 16 and full["trainer"]["max_steps"] == 4
    assert {"train/loss", "test/accuracy"} <= history_keys(records)
