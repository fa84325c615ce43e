#!/usr/bin/env python
"""Validation score of bench methods at other learning rates: how a bench's learning rates are
chosen on the validation split, never on the test split the bench reports.

Each ``METHOD@LR`` is that method's bench run (recipe, overrides, step budget, one seed) at
learning rate LR, validated once at the end of training; the table lists the validation
metrics and the mean training loss of the first and last ten steps.

    python tools/lr_sweep.py ptuning@1e-2 ptuning@3e-2 prefix@1e-3 prefix@5e-3
    python tools/lr_sweep.py --bench recipes/bench/tiny.yaml lora@1e-3 --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def sweep_one(config: Any, name: str, lr: float, seed: int, run_dir: Path) -> dict[str, Any]:
    from framework.bench.runner import run_fw, run_recipe, train_losses

    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = run_recipe(config, name, seed, run_dir)
    recipe["model"]["learning_rate"] = lr
    recipe["trainer"].pop("limit_val_batches", None)
    recipe["trainer"]["val_check_interval"] = config.max_steps  # one validation, after the last step
    recipe["trainer"]["check_val_every_n_epoch"] = None
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_fw("fit", "--config", str(run_dir / "recipe.yaml"), cwd=run_dir)
    with (run_dir / "metrics.csv").open() as f:
        val = {k: float(v) for row in csv.DictReader(f) for k, v in row.items() if k.startswith("val/") and v}
    losses = train_losses(run_dir / "metrics.csv")
    if not val:
        raise RuntimeError(f"{name}@{lr:g}: no validation metric in {run_dir / 'metrics.csv'}")
    return {"method": name, "learning_rate": lr, "seed": seed, **val,
            "first_losses": sum(losses[:10]) / len(losses[:10]), "last_losses": sum(losses[-10:]) / len(losses[-10:])}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from framework.bench.runner import BenchConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="METHOD@LR")
    parser.add_argument("--bench", type=Path, default=ROOT / "recipes" / "bench" / "cpu-minilm.yaml")
    parser.add_argument("--seed", type=int, help="default: the bench's first seed")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lr-sweep")
    args = parser.parse_args(argv)
    config = BenchConfig.load(args.bench)
    if config.max_steps is None:
        parser.error(f"{args.bench}: set max_steps; the sweep validates once after the last step")
    specs = []
    for run in args.runs:
        name, _, lr = run.partition("@")
        if name not in config.methods or not lr:
            parser.error(f"{run!r}: expected METHOD@LR with METHOD one of {sorted(config.methods)}")
        specs.append((name, float(lr)))
    seed = config.seeds[0] if args.seed is None else args.seed
    results = []
    for name, lr in specs:
        results.append(sweep_one(config, name, lr, seed, args.out / f"{name}_lr{lr:g}_seed{seed}"))
        r = results[-1]
        scores = ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("val/"))
        print(f"{name}@{lr:g} seed {seed}: {scores}; train loss {r['first_losses']:.3f} -> {r['last_losses']:.3f}", flush=True)
    (args.out / "sweep.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
