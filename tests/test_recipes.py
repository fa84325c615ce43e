"""Every shipped recipe parses, builds its backbone offline and attaches its method:
`fw inspect` on it reports a method that trains something."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from framework.cli import main

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_every_method_of_fw_has_a_recipe(capsys):
    assert main(["methods", "--json"]) == 0
    shipped = {row["name"] for row in json.loads(capsys.readouterr().out) if row["package"] == "fw"}
    used = {yaml.safe_load(r.read_text())["model"]["method"]["class_path"] for r in RECIPES}
    for bench in RECIPES[0].parent.glob("bench/*.yaml"):  # the benchmark references and baselines
        used |= {m["method"]["class_path"] for m in yaml.safe_load(bench.read_text())["methods"].values() if m["method"]}
    # `adapter` is the general form of houlsby/pfeiffer/parallel_adapter, which have recipes
    assert shipped - {"adapter"} <= used, shipped - used


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_inspects_offline(recipe, capsys):
    assert main(["inspect", "--config", str(recipe), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    if report["method"] == "FisherMask":  # the mask is chosen by calibration at fit start
        assert report["method_params"] == 0 and "k = 113,566 entries" in report["modified_modules"][""]
        return
    assert 0 < report["stored_params"] <= report["method_params"] <= report["trainable_params"] < report["total_params"]
