"""Inference latency of one trained run: base model, method unmerged, method merged, on the
same batch. Run in a fresh process (``python -m framework.bench.latency RECIPE CKPT OUT``).

The variants are timed round-robin (base, unmerged, merged, base, ...) rather than one after
the other, so a slow spell of a shared machine falls on all of them alike and their ratios
stay meaningful; each figure is the median of ``repeats`` forwards, and ``latency_spread``
(the largest interquartile range over median among the variants) is the run's own noise.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from framework.method import MergeNotSupportedError


def interleaved_times(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each call, timing them in turn ``repeats`` times after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for name, call in calls.items():
                sync()
                t0 = time.perf_counter()
                call()
                sync()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return times


def spread(values: list[float]) -> float:
    """Interquartile range over median: the run's own timing noise."""
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / statistics.median(values)


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
    out: dict[str, Any] = {"latency_batch": list(inputs["input_ids"].shape), "latency_repeats": repeats}
    if module.method is None:  # full fine-tuning: the trained model is the base
        times = interleaved_times({"m": lambda: model(**inputs)}, repeats)["m"]
        out["latency_base_s"] = out["latency_unmerged_s"] = statistics.median(times)
        out["latency_spread"] = spread(times)
        return out
    base = build_module({k: v for k, v in recipe["model"].items() if k != "method"} | {"method": None}).model.eval()
    calls = {"base": lambda: base(**inputs), "unmerged": lambda: model(**inputs)}
    try:
        merged = copy.deepcopy(model)
        module.method.merge(merged)
        calls["merged"] = lambda: merged(**inputs)
    except MergeNotSupportedError:
        pass
    times = interleaved_times(calls, repeats)
    out.update({f"latency_{name}_s": statistics.median(times[name]) if name in times else None
                for name in ("base", "unmerged", "merged")})
    out["latency_spread"] = max(spread(t) for t in times.values())
    return out


if __name__ == "__main__":  # pragma: no cover - exercised through the runner's subprocess
    recipe_path, ckpt, target = sys.argv[1:4]
    Path(target).write_text(json.dumps(measure(recipe_path, ckpt), indent=2) + "\n")
