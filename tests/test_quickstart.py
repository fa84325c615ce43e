"""The quickstart recipe on the real pretrained MiniLM and real Rotten Tomatoes snippets
(shortened). Slow: `make test-all` or `pytest -m slow` runs it; `make quickstart` runs it whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from framework.cli import main

RECIPE = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"


@pytest.mark.slow
def test_quickstart_recipe_learns_sentiment_on_real_data(tmp_path):
    args = ["fit", "--config", str(RECIPE), "--data.init_args.max_train_examples", "1200",
            "--data.init_args.max_eval_examples", "600", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]
    assert main(args) == 0
    summary = json.loads((tmp_path / "quickstart" / "version_0" / "summary.json").read_text())
    assert summary["params"]["method_params"] == 6 * 2 * 8 * (384 + 384)
    assert summary["metrics"]["test/accuracy"] > 0.70  # majority class ~0.57
