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
DDP_METHODS = {  # LoRA and prompt tuning in one run (composed): one pair of processes for both
    "lora+prompt": {"class_path": "compose", "init_args": {"methods": [
        {"class_path": "lora", "init_args": {"r": 4}}, {"class_path": "prompt", "init_args": {"num_virtual_tokens": 4}}]}},
    "fisher": {"class_path": "fisher", "init_args": {"fraction": 0.01, "num_samples": 32}},
}


def fw_fit(recipe: dict[str, Any], root: Path, *args: str, in_process: bool = False) -> Path:
    """Run `fw fit` (in a subprocess, as distributed runs need); returns the run's last checkpoint."""
    path = write_recipe(root / "recipe.yaml", recipe)
    if in_process:  # a one-process reference run
        from framework.cli import main

        assert main(["fit", "--config", path, *args]) == 0
        return root / "runs" / "r" / "version_0" / "checkpoints" / "last.ckpt"
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
    one = adapter(fw_fit(classification_recipe(tmp_path / "one", sentiment_csv, DDP_METHODS[name], 16), tmp_path / "one",
                         in_process=True))
    two = adapter(fw_fit(classification_recipe(tmp_path / "two", sentiment_csv, DDP_METHODS[name], 8), tmp_path / "two",
                         "--trainer.strategy", "ddp", "--trainer.devices", "2"))
    assert one.keys() == two.keys() and len(one) > 2
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=key)


# -- FSDP -------------------------------------------------------------------------------------

FSDP_METHODS = {  # LoRA on attention and Pfeiffer adapters on the FFN, sharded in one run
    "lora+pfeiffer": {"class_path": "compose", "init_args": {"methods": [
        {"class_path": "lora", "init_args": {"r": 4}}, {"class_path": "pfeiffer", "init_args": {"reduction_factor": 2}}]}},
}


def causal_lm_recipe(root: Path, files: dict[str, str], method: dict, **trainer: Any) -> dict:
    return {
        "seed_everything": 0,
        "test_after_fit": False,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 16, "enable_progress_bar": False, "log_every_n_steps": 1,
            "enable_model_summary": False, "num_sanity_val_steps": 0,
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(root / "runs"), "name": "r"}},
            "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"save_last": True, "save_top_k": 0}}],
            **trainer,
        },
        "model": {"backbone": {"config": TINY_LLAMA, "tokenizer": TOKENIZER}, "method": method,
                  "task": {"class_path": "CausalLM"}, "learning_rate": 0.01, "warmup_ratio": 0.0},
        "data": {"class_path": "InstructionData", "init_args": {"data_files": files, "batch_size": 4, "max_length": 32}},
    }


def metric_column(csv_path: Path, column: str) -> list[float]:
    import csv

    with csv_path.open() as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


def summary_metric(run: Path, name: str) -> float:
    import json

    return float(json.loads((run / "summary.json").read_text())["metrics"][name])


@pytest.mark.parametrize("name", list(FSDP_METHODS))
def test_fsdp_two_processes_train_and_the_adapter_checkpoint_round_trips(name, instruction_jsonl, tmp_path, build):
    fsdp = {"strategy": {"class_path": "framework.strategies.FSDP"}, "devices": 2}
    recipe = causal_lm_recipe(tmp_path, instruction_jsonl, FSDP_METHODS[name], **fsdp)
    ckpt = fw_fit(recipe, tmp_path)
    run = tmp_path / "runs" / "r"
    losses = metric_column(run / "version_0" / "metrics.csv", "train/loss")
    assert len(losses) == 16 and sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses

    # adapter-only, full tensors: every parameter the method trains, at its unsharded shape,
    # and each rank's half of the rows trained (the second half lives on rank 1)
    single = build({k: v for k, v in recipe["model"].items()})
    trainable = {f"model.{n}": p for n, p in single.model.named_parameters() if p.requires_grad}
    state = adapter(ckpt)
    assert state.keys() == trainable.keys()
    for key, value in state.items():
        assert value.shape == trainable[key].shape, key
        half = value.shape[0] // 2
        assert not torch.equal(value[half:], trainable[key].detach()[half:]), f"{key}: rank 1's shard did not arrive"

    # one device, fresh backbone + the checkpoint: the sharded run's validation metric, so the
    # frozen weights were unchanged there; and the checkpoint loads back into a sharded run
    fsdp_metric = summary_metric(run / "version_0", "val/token_loss")
    from framework.cli import main

    validate = ["validate", "--config", str(tmp_path / "recipe.yaml"), "--ckpt_path", str(ckpt)]
    assert main([*validate, "--trainer.devices", "1", "--trainer.strategy", "auto"]) == 0  # one device: in-process
    done = subprocess.run([str(Path(sys.executable).with_name("fw")), *validate], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-5000:]
    for version in (1, 2):
        assert summary_metric(run / f"version_{version}", "val/token_loss") == pytest.approx(fsdp_metric, abs=1e-4)


@pytest.mark.parametrize("method,reason", [
    ({"class_path": "qlora", "init_args": {"r": 4}}, "QLoRA cannot be sharded by FSDP \\(bitsandbytes' 4-bit weights"),
    ({"class_path": "fisher", "init_args": {"fraction": 0.01}}, "FisherMask cannot be sharded by FSDP \\(its k values"),
    ({"class_path": "compose", "init_args": {"methods": [{"class_path": "qlora"}]}}, "methods\\[0\\] \\(QLoRA\\): bitsandbytes'"),
])
def test_methods_that_cannot_be_sharded_are_refused_before_training(build, method, reason):
    """The method declares it (supports_sharding); the core refuses FSDP, naming the strategy field."""
    from lightning.pytorch import Trainer

    from framework.strategies import FSDP

    module = build({"backbone": {"config": TINY_LLAMA, "tokenizer": TOKENIZER}, "task": {"class_path": "CausalLM"},
                    "method": method})
    module.trainer = Trainer(accelerator="cpu", devices=1, strategy=FSDP(), logger=False)
    with pytest.raises(ValueError, match=f"trainer.strategy: .*{reason}.*train it with strategy: ddp"):
        module.setup("fit")
