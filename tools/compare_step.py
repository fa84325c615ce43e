#!/usr/bin/env python
"""fw vs Hugging Face PEFT, one training step at a time, in one process, on one batch.

`fw bench` times each method in its own process, minutes apart; on a shared machine a slow
spell can land on one side of a fw/PEFT ratio. This tool builds every method of the list on
the same backbone (the recipe's), takes one real training batch from the recipe's data, and
times full training steps (forward, loss, backward, AdamW step) *round-robin*: method A,
method B, ..., A, B, ... so drift hits all alike. ``--profile`` then shows, per method, the
operators that took the most CPU time in a few profiled steps: where a difference comes from.

    python tools/compare_step.py                                   # quickstart backbone, the 5 pairs
    python tools/compare_step.py --methods lora peft_lora --steps 30 --profile
    python tools/compare_step.py --recipe recipes/bench/tiny.yaml  # a bench config: its recipe + overrides
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: fw's method -> its Hugging Face PEFT reference, with the arguments the CPU bench uses
PAIRS: dict[str, tuple[dict[str, Any], float]] = {
    "linear_probe": ({"class_path": "linear_probe"}, 1e-2),
    "lora": ({"class_path": "lora", "init_args": {"r": 8, "alpha": 16}}, 3e-3),
    "peft_lora": ({"class_path": "peft_lora", "init_args": {"r": 8, "alpha": 16}}, 3e-3),
    "ia3": ({"class_path": "ia3"}, 3e-2),
    "peft_ia3": ({"class_path": "peft_ia3"}, 3e-2),
    "prompt": ({"class_path": "prompt", "init_args": {"num_virtual_tokens": 20}}, 3e-2),
    "peft_prompt": ({"class_path": "peft_prompt", "init_args": {"num_virtual_tokens": 20}}, 3e-2),
    "ptuning": ({"class_path": "ptuning", "init_args": {"num_virtual_tokens": 20}}, 1e-2),
    "peft_ptuning": ({"class_path": "peft_ptuning", "init_args": {"num_virtual_tokens": 20}}, 1e-2),
    "prefix": ({"class_path": "prefix", "init_args": {"prefix_length": 30}}, 5e-3),
    "peft_prefix": ({"class_path": "peft_prefix", "init_args": {"prefix_length": 30}}, 5e-3),
}


def load_recipe(path: Path) -> dict[str, Any]:
    """A recipe, or a bench config's recipe with its overrides merged in."""
    from framework.config import deep_update

    raw = yaml.safe_load(path.read_text())
    if "recipe" in raw and "methods" in raw:
        recipe = yaml.safe_load((path.parent / raw["recipe"]).read_text())
        deep_update(recipe, copy.deepcopy(raw.get("overrides", {})))
        return recipe
    return raw


def build(recipe: dict[str, Any], method: str) -> tuple[Any, torch.optim.Optimizer]:
    from framework.cli import build_module

    spec, lr = PAIRS[method]
    torch.manual_seed(0)
    module = build_module({**recipe["model"], "method": spec})
    module.model.train()
    return module, torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)


def first_batch(recipe: dict[str, Any], tokenizer: Any) -> dict[str, torch.Tensor]:
    from framework.cli import instantiate_data

    data = instantiate_data(recipe["data"])
    data.tokenizer = tokenizer
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def step(module: Any, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    loss, _ = module.task.step(module.model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "bench" / "cpu-minilm.yaml")
    parser.add_argument("--methods", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--steps", type=int, default=15, help="timed rounds (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="then profile 3 steps of each method")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    recipe = load_recipe(args.recipe)
    built = {name: build(recipe, name) for name in args.methods}
    batch = first_batch(recipe, next(iter(built.values()))[0].tokenizer)
    times: dict[str, list[float]] = {name: [] for name in built}
    for round_ in range(args.warmup + args.steps):
        for name, (module, optimizer) in built.items():
            t0 = time.perf_counter()
            step(module, optimizer, batch)
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(v) for name, v in times.items()}
    result: dict[str, Any] = {"batch": list(batch["input_ids"].shape), "median_step_seconds": medians, "fw_over_peft": {}}
    print(f"batch {tuple(batch['input_ids'].shape)}, {args.steps} round-robin steps after {args.warmup} warm-up")
    for name, median in medians.items():
        print(f"  {name:14s} median {median * 1000:8.1f} ms   min {min(times[name]) * 1000:8.1f} ms")
    for name in medians:
        if f"peft_{name}" in medians:
            ratio = medians[name] / medians[f"peft_{name}"]
            result["fw_over_peft"][name] = ratio
            print(f"  fw/PEFT {name}: {ratio:.3f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, (module, optimizer) in built.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step(module, optimizer, batch)
            print(f"\n== {name}: top operators by self CPU time over 3 steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
