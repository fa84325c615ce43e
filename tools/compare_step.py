#!/usr/bin/env python
"""fw vs Hugging Face PEFT, one training step at a time, in one process, on one batch.

`fw bench` times each method in its own process, minutes apart; on a shared machine a slow
spell can land on one side of a fw/PEFT ratio. This tool builds methods of a bench config
(its recipe, overrides, method arguments and learning rates) on the same backbone, takes one
real training batch from the recipe's data, and times full training steps (forward, loss,
backward, AdamW step) *round-robin*: method A, method B, ..., A, B, ... so drift hits all
alike. By default it takes every fw method with a PEFT reference (``reference_of``), the
references, and the linear probe (the frozen-backbone floor) where the config has one.

``--memory`` adds what decides training memory besides the weights, measured exactly rather
than from RSS: the bytes of the tensors autograd saves for backward in one step (activations;
the parameters they reference are not counted). ``--profile`` shows, per method, the
operators that took the most CPU time in a few profiled steps: where a difference comes from.
``--plain-lora-branch`` adds a row ``<method>/plain`` for each fw method with LoRA layers: the
same module with the LoRA branch as plain ops (fw's layer before ``fw_lora.branch``'s autograd
Function, saving a dropped-out copy of each layer's input and its mask), timed in the same
rounds: what the Function saves and costs.

    python tools/compare_step.py                                    # the CPU bench's pairs
    python tools/compare_step.py --methods lora peft_lora --steps 30 --profile
    python tools/compare_step.py --bench recipes/bench/tiny.yaml --memory
    python tools/compare_step.py --methods lora peft_lora --memory --plain-lora-branch
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]


def default_methods(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Each fw method that has a PEFT reference, then the reference; the linear probe first."""
    chosen = ["linear_probe"] if "linear_probe" in methods else []
    for name, spec in methods.items():
        if spec.get("reference_of") in methods:
            chosen += [spec["reference_of"], name]
    return chosen


def build(model: dict[str, Any]) -> tuple[Any, torch.optim.Optimizer]:
    """The module of a bench run's ``model`` section, in training mode, with AdamW at the
    run's learning rate."""
    from framework.cli import build_module

    torch.manual_seed(0)
    module = build_module(model)
    module.model.train()
    return module, torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=module.learning_rate)


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


def plain_lora_branch(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """Within it (when ``enabled``), fw's LoRA layers compute their branch as plain ops."""
    if not enabled:
        return contextlib.nullcontext()
    from fw_lora import layer
    from fw_lora.branch import plain_lora_branch as plain

    return mock.patch.object(layer, "lora_branch", plain)


def has_lora_layers(module: Any) -> bool:
    from fw_lora import LoRALinear

    return any(isinstance(m, LoRALinear) for m in module.modules())


def saved_activation_bytes(module: Any, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward (the weights
    they point into excluded): a training step's activation memory, without RSS's noise."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = module.task.step(module.model, batch)
    loss.backward()
    module.zero_grad(set_to_none=True)
    return sum(saved.values())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from framework.bench.runner import BenchConfig, run_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=Path, default=ROOT / "recipes" / "bench" / "cpu-minilm.yaml",
                        help="bench config whose recipe, overrides and methods to use")
    parser.add_argument("--methods", nargs="+", help="names under the config's `methods` (default: the PEFT pairs)")
    parser.add_argument("--steps", type=int, default=15, help="timed rounds (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also measure each step's saved activations")
    parser.add_argument("--profile", action="store_true", help="then profile 3 steps of each method")
    parser.add_argument("--plain-lora-branch", action="store_true",
                        help="also run each method with LoRA layers with the branch as plain ops (rows <name>/plain)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    config = BenchConfig.load(args.bench)
    names = args.methods or default_methods(config.methods)
    unknown = sorted(set(names) - set(config.methods))
    if unknown:
        parser.error(f"--methods {unknown} are not in {args.bench}; it has {sorted(config.methods)}")
    with tempfile.TemporaryDirectory() as run_dir:  # the runs' recipes, as `fw bench` writes them
        recipes = {name: run_recipe(config, name, seed=0, run_dir=Path(run_dir)) for name in names}
    built = {name: build(recipe["model"]) for name, recipe in recipes.items()}
    batch = first_batch(recipes[names[0]], built[names[0]][0].tokenizer)
    # each row: (module, optimizer, plain LoRA branch?); the /plain rows share their method's module
    rows = {name: (module, optimizer, False) for name, (module, optimizer) in built.items()}
    if args.plain_lora_branch:
        rows |= {f"{name}/plain": (module, optimizer, True) for name, (module, optimizer) in built.items()
                 if has_lora_layers(module)}
    times: dict[str, list[float]] = {name: [] for name in rows}
    for round_ in range(args.warmup + args.steps):
        for name, (module, optimizer, plain) in rows.items():
            t0 = time.perf_counter()
            with plain_lora_branch(plain):
                step(module, optimizer, batch)
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(v) for name, v in times.items()}
    result: dict[str, Any] = {"batch": list(batch["input_ids"].shape), "median_step_seconds": medians, "fw_over_peft": {}}
    print(f"batch {tuple(batch['input_ids'].shape)}, {args.steps} round-robin steps after {args.warmup} warm-up")
    for name, median in medians.items():
        print(f"  {name:14s} median {median * 1000:8.1f} ms   min {min(times[name]) * 1000:8.1f} ms")
    if args.memory:
        result["saved_activation_bytes"] = {}
        for name, (module, _, plain) in rows.items():
            with plain_lora_branch(plain):
                result["saved_activation_bytes"][name] = saved_activation_bytes(module, batch)
        for name, nbytes in result["saved_activation_bytes"].items():
            print(f"  {name:14s} saved for backward {nbytes / 2**20:8.1f} MiB")
    for name, spec in config.methods.items():
        fw_name = spec.get("reference_of")
        if name in medians and fw_name in medians:
            result["fw_over_peft"][fw_name] = ratios = {"step": medians[fw_name] / medians[name]}
            if args.memory:
                saved = result["saved_activation_bytes"]
                ratios["saved_activations"] = saved[fw_name] / saved[name]
            print(f"  fw/PEFT {fw_name}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    for name in medians:
        if name.endswith("/plain"):
            fw_name = name.removesuffix("/plain")
            result.setdefault("fw_over_plain_branch", {})[fw_name] = ratios = {"step": medians[fw_name] / medians[name]}
            if args.memory:
                saved = result["saved_activation_bytes"]
                ratios["saved_activations"] = saved[fw_name] / saved[name]
            print(f"  {fw_name} over its plain LoRA branch: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
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
