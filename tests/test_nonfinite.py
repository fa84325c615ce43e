"""A NaN/inf loss stops the run before anything of its step is applied: exit code 1, one line
naming the step and the likely causes, the last checkpoint finite, no adapter written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TOKENIZER, sentiment_files, write_recipe
from helpers import tiny_recipe

from framework.cli import main


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory) -> dict[str, str]:
    return sentiment_files(tmp_path_factory.mktemp("small"), 64, 16, 16)


OVERFLOWING_FP16 = {"config": {**TINY_BERT, "initializer_range": 1000.0}, "tokenizer": TOKENIZER, "dtype": "float16"}
WAYS = {  # how the loss becomes NaN -> the step that stops, what the line blames
    "lora-huge-learning-rate": ({"learning_rate": 1e9}, "a learning rate too high for this method (model.learning_rate: 1e+09)"),
    "full-fine-tuning-huge-learning-rate": ({"learning_rate": 1e9, "method": None}, "model.learning_rate: 1e+09"),
    "float16-overflow": ({"backbone": OVERFLOWING_FP16}, "float16 overflow"),
}


def fit(tmp_path: Path, files: dict[str, str], capsys, **model) -> tuple[int, str, Path]:
    recipe = tiny_recipe(tmp_path, files, **model)
    recipe["trainer"]["max_epochs"] = 3
    recipe["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1  # a checkpoint after every step
    capsys.readouterr()
    code = main(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)])
    err = capsys.readouterr().err
    return code, err, tmp_path / "runs" / "tiny" / "version_0"


@pytest.mark.parametrize("way", list(WAYS))
def test_a_nonfinite_loss_stops_the_run_with_the_last_checkpoint_finite(way, small_csv, tmp_path, capsys):
    model, blamed = WAYS[way]
    code, err, run = fit(tmp_path, small_csv, capsys, **model)
    errors = [line for line in err.splitlines() if line.startswith("fw: error: training stopped at step ")]
    assert code == 1 and len(errors) == 1 and "the loss is nan" in errors[0] and blamed in errors[0], err
    assert "Traceback" not in err
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    for ckpt in run.rglob("*.ckpt"):  # whatever was written holds the last finite step
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), ckpt
    if way != "float16-overflow":  # it failed at step 1, before any checkpoint
        assert f"the last checkpoint, written before it, is {run / 'checkpoints' / 'last.ckpt'}" in errors[0]


def test_a_recipe_may_skip_a_few_nonfinite_steps(small_csv, tmp_path, capsys):
    code, err, _ = fit(tmp_path, small_csv, capsys, backbone=OVERFLOWING_FP16, max_nonfinite_steps=2)
    assert code == 1 and "training stopped at step 3: the loss is nan" in err, err


def test_a_nonfinite_gradient_drops_the_step_or_stops(build):
    from lightning.pytorch import Trainer

    from framework.finite import NonFiniteTrainingError

    module = build({"backbone": {"config": TINY_BERT, "tokenizer": TOKENIZER}, "method": {"class_path": "lora"},
                    "max_nonfinite_steps": 1})
    module.trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)  # precision, world size
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad])
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, float("inf"))
    module.on_before_optimizer_step(optimizer)  # the first is skipped: no gradient is left to apply
    assert all(p.grad is None for p in module.parameters())
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    module.on_before_optimizer_step(optimizer)  # finite: kept
    assert any(p.grad is not None for p in module.parameters())
    next(p for p in module.parameters() if p.requires_grad).grad[0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match="the gradient norm is nan"):
        module.on_before_optimizer_step(optimizer)
