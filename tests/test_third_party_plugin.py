"""A real, separately installed package registers a method through the `fw.methods` entry
point and is usable from a recipe by its registered name, with no change to fw."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_BERT, TOKENIZER, write_recipe

PLUGIN_SOURCE = Path(__file__).parent / "plugins" / "fw_toy_plugin"
FW = str(Path(sys.executable).with_name("fw"))


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the plugin package into a directory of its own (not fw's environment)."""
    root = tmp_path_factory.mktemp("third_party")
    source = root / "src"
    shutil.copytree(PLUGIN_SOURCE, source)
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(source)],
        check=True, capture_output=True, text=True,
    )
    assert list(site.glob("fw_toy_plugin-*.dist-info"))
    return site


def run_fw(args: list[str], site: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site) if site else ""}
    return subprocess.run([FW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_plugin_is_listed_only_when_installed(plugin_site, tmp_path, capsys):
    listed = run_fw(["methods"], plugin_site, tmp_path)
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith("toyscale"))
    assert line.split()[:2] == ["toyscale", "fw-toy-plugin"] and "trainable gain" in line
    from framework.cli import main

    assert main(["methods"]) == 0  # this environment: fw without the plugin
    assert "toyscale" not in capsys.readouterr().out


def test_plugin_is_usable_from_a_recipe_by_its_registered_name(plugin_site, tmp_path):
    recipe = {"model": {"backbone": {"config": TINY_BERT, "tokenizer": TOKENIZER},
                        "method": {"class_path": "toyscale", "init_args": {"targets": ["query", "value"]}}}}
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} film {i},{i % 2}\n" for i in range(40)))
    recipe.update(
        trainer={"max_steps": 3, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                 "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        data={"class_path": "ClassificationData", "init_args": {"data_files": {s: str(data) for s in ("train", "validation", "test")}}},
    )
    fitted = run_fw(["fit", "--config", write_recipe(tmp_path / "fit.yaml", recipe)], plugin_site, tmp_path)
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    assert "ToyScale gain (+1)" in fitted.stdout + fitted.stderr
    assert "method               | ToyScale" in fitted.stdout
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["method"] == "ToyScale" and summary["params"]["method_params"] == 2 * TINY_BERT["num_hidden_layers"]
