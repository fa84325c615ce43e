"""recipes/multitask.yaml as it is, on a tiny random BERT and a few dozen real examples per
task: two named adapters train on mixed batches of Rotten Tomatoes and BBC News, and the
test split is scored per adapter."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import TINY_BERT, TOKENIZER

from framework.cli import main

RECIPE = Path(__file__).parents[1] / "recipes" / "multitask.yaml"


def test_the_multitask_recipe_trains_both_adapters_and_scores_each(tmp_path):
    args = ["fit", "--config", str(RECIPE), "--model.backbone.name_or_path", "null",
            "--model.backbone.config", json.dumps(TINY_BERT), "--model.backbone.tokenizer", TOKENIZER,
            "--data.init_args.max_train_examples", "48", "--data.init_args.max_eval_examples", "16",
            "--data.init_args.max_length", "32", "--data.init_args.batch_size", "16",
            "--trainer.max_epochs", "1", "--trainer.val_check_interval", "null", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]
    assert main(args) == 0
    run = tmp_path / "multitask" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    per_adapter = {k: v for k, v in summary["metrics"].items() if k.startswith("test/") and k.endswith("/accuracy")}
    assert set(per_adapter) == {"test/accuracy", "test/sst/accuracy", "test/news/accuracy"}
    assert all(0.0 <= v <= 1.0 for v in per_adapter.values())
    with (run / "metrics.csv").open() as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) == 6  # 96 mixed examples, batches of 16
