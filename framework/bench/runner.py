"""The benchmark matrix: every method x seed as a `fw fit` subprocess of one base recipe.

A bench config (``recipes/bench/*.yaml``)::

    recipe: recipes/quickstart.yaml      # backbone, task, data, trainer (relative to the config)
    output_dir: docs/bench/cpu-minilm    # results.json, results.md, plots, runs/
    seeds: [1, 2, 3]
    max_steps: 60                        # per run; the base recipe's trainer otherwise
    overrides: {data: {init_args: {max_train_examples: 1000}}}   # merged into the recipe
    methods:                             # name -> model.method (null = full fine-tuning)
      full: {method: null, learning_rate: 5.0e-5}
      lora: {method: {class_path: lora, init_args: {r: 8}}}
      peft_lora: {method: {class_path: peft_lora, init_args: {r: 8}}, reference_of: lora}

Each run is its own process, so its peak memory is its own (CPU: peak RSS, and its rise
above the RSS at fit start; GPU: CUDA peak allocated). Inference latency is measured in
another process, on each method's first seed. A run whose ``bench.json`` exists is
skipped: an interrupted matrix resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from framework.bench import claims
from framework.config import deep_update


@dataclass
class BenchConfig:
    recipe: str
    output_dir: str
    methods: dict[str, dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    max_steps: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    #: WandbLogger arguments (e.g. ``{project: fw-bench}``): every run and the final table go to W&B
    wandb: dict[str, Any] | None = None
    #: qualitative claims checked on the aggregated rows (framework/bench/claims.py)
    claims: list[dict[str, Any]] = field(default_factory=list)
    #: measure inference latency (base, unmerged, merged) on each method's first seed
    latency: bool = True

    @classmethod
    def load(cls, path: str | Path) -> BenchConfig:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown bench fields {unknown}; expected {sorted(cls.__dataclass_fields__)}")
        for key in ("recipe", "output_dir", "methods"):
            if key not in raw:
                raise ValueError(f"{path}: `{key}` is required")
        for name, spec in raw["methods"].items():
            if not isinstance(spec, dict) or "method" not in spec:
                raise ValueError(f"{path}: methods.{name}: expected a mapping with `method` (null = full fine-tuning)")
        claims.validate(raw.get("claims", []), str(path))
        base = Path(path).parent
        raw["recipe"] = str((base / raw["recipe"]).resolve()) if not Path(raw["recipe"]).is_file() else raw["recipe"]
        return cls(**raw)


def run_recipe(config: BenchConfig, name: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """The full recipe of one run: the base recipe, the overrides, the method, the seed."""
    recipe = yaml.safe_load(Path(config.recipe).read_text())
    deep_update(recipe, copy.deepcopy(config.overrides))
    spec = config.methods[name]
    recipe["seed_everything"] = seed
    recipe["model"]["method"] = spec["method"]
    for key, value in spec.items():
        if key == "data":  # a method's own data settings (e.g. group_by_length)
            deep_update(recipe["data"], copy.deepcopy(value))
        elif key not in ("method", "reference_of"):
            recipe["model"][key] = value
    trainer = recipe.setdefault("trainer", {})
    if config.max_steps is not None:
        trainer["max_steps"], trainer["max_epochs"] = config.max_steps, -1
        trainer.pop("val_check_interval", None)
        trainer["limit_val_batches"] = 0
    trainer["default_root_dir"] = str(run_dir)
    trainer["enable_progress_bar"] = False
    trainer["log_every_n_steps"] = 1  # every step's loss: the loss curve across seeds
    trainer["logger"] = [{"class_path": "CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "", "version": ""}}]
    if config.wandb is not None:
        group = Path(config.output_dir).name
        trainer["logger"].append({"class_path": "WandbLogger", "init_args": {
            "save_dir": str(run_dir), "group": group, "name": f"{group}/{name}/seed{seed}", **config.wandb}})
    trainer["callbacks"] = [{"class_path": "ModelCheckpoint", "init_args": {"dirpath": str(run_dir), "save_top_k": 0, "save_last": True}}]
    return recipe


def run_fw(*args: str, cwd: Path) -> None:
    """`fw ARGS` in a subprocess in ``cwd``; on failure its output goes to ``cwd/error.log``."""
    fw = Path(sys.executable).with_name("fw")
    command = [str(fw) if fw.exists() else sys.executable, *([] if fw.exists() else ["-m", "framework.cli"]), *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        (cwd / "error.log").write_text(done.stdout + done.stderr)
        raise RuntimeError(f"bench run in {cwd} failed (exit {done.returncode}); see {cwd / 'error.log'}:\n{done.stderr[-2000:]}")


def run_one(config: BenchConfig, name: str, seed: int, run_dir: Path, latency: bool = True) -> dict[str, Any]:
    """Fit, save the adapter, measure checkpoint size and (``latency``) inference latency;
    returns the run's record."""
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = run_recipe(config, name, seed, run_dir)
    recipe_path = run_dir / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_fw("fit", "--config", str(recipe_path), cwd=run_dir)
    ckpt = run_dir / "last.ckpt"
    if not ckpt.is_file():
        raise RuntimeError(f"bench run {name}/seed {seed}: no checkpoint was written in {run_dir}")
    latency_path = run_dir / "latency.json"
    if latency:
        done = subprocess.run([sys.executable, "-m", "framework.bench.latency", str(recipe_path), str(ckpt), str(latency_path)],
                              cwd=run_dir, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"latency of {name}/seed {seed} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = train_losses(run_dir / "metrics.csv")
    record = {
        **summary, "method_class": summary["method"], "method": name, "seed": seed,
        "reference_of": config.methods[name].get("reference_of"),
        **(json.loads(latency_path.read_text()) if latency else {}),
        "checkpoint_bytes": ckpt.stat().st_size, "train_losses": losses,
    }
    (run_dir / "bench.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def train_losses(metrics_csv: Path) -> list[float]:
    import csv

    with metrics_csv.open() as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def run_matrix(config: BenchConfig, log: Any = print) -> list[dict[str, Any]]:
    """Every method x seed, skipping runs already done (resume); returns every record."""
    out = Path(config.output_dir).resolve()
    # seed-major: a method and its PEFT reference run minutes apart, not an hour apart, so a
    # slow spell of a shared machine does not land on one side of a fw/PEFT ratio only
    jobs = [(name, seed) for seed in config.seeds for name in config.methods]
    records = []
    for index, (name, seed) in enumerate(jobs, 1):
        run_dir = out / "runs" / name / f"seed{seed}"
        done = run_dir / "bench.json"
        if done.is_file():
            log(f"[{index}/{len(jobs)}] {name} seed {seed}: done earlier, kept")
            records.append(json.loads(done.read_text()))
            continue
        log(f"[{index}/{len(jobs)}] {name} seed {seed} ...")
        # latency depends on the method, not on the seed's weights: measured on the first seed
        records.append(run_one(config, name, seed, run_dir, latency=config.latency and seed == config.seeds[0]))
    return records
