"""Inference latency of one trained run: base model, method unmerged, method merged, on the
same batch. Run in a fresh process (``python -m framework.bench.latency RECIPE CKPT OUT``)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from framework.method import MergeNotSupportedError


def _median_seconds(fn: Any, repeats: int, warmup: int = 2) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(recipe_path: str, ckpt_path: str, repeats: int = 10) -> dict[str, Any]:
    from framework.cli import build_module, instantiate_data

    recipe = yaml.safe_load(Path(recipe_path).read_text())
    module = build_module(recipe["model"])
    module.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"])
    data = instantiate_data(recipe["data"])
    data.tokenizer = module.tokenizer
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    model = module.model.eval()
    out: dict[str, Any] = {"latency_batch": list(inputs["input_ids"].shape)}
    out["latency_unmerged_s"] = _median_seconds(lambda: model(**inputs), repeats)
    if module.method is None:
        out["latency_base_s"] = out["latency_unmerged_s"]
        return out
    try:
        module.method.merge(model)
        out["latency_merged_s"] = _median_seconds(lambda: model(**inputs), repeats)
    except MergeNotSupportedError:
        out["latency_merged_s"] = None
    base = build_module({k: v for k, v in recipe["model"].items() if k != "method"} | {"method": None})
    base.model.eval()
    out["latency_base_s"] = _median_seconds(lambda: base.model(**inputs), repeats)
    return out


if __name__ == "__main__":  # pragma: no cover - exercised through the runner's subprocess
    recipe_path, ckpt, target = sys.argv[1:4]
    Path(target).write_text(json.dumps(measure(recipe_path, ckpt), indent=2) + "\n")
