"""Exact resume: a run continued from a checkpoint computes what the uninterrupted run computes.

Lightning restores the weights, the optimizer, the scheduler and the step counters. Two more
things decide the next steps, and a checkpoint written by fw carries both (``fw_resume``):

- **where the epoch stood**: the epoch and how many of its batches were done. The training
  order is a function of (seed, epoch) (:class:`framework.data.sampler.EpochSampler`), so the
  resumed run skips the batches already trained on and sees the rest in the same order;
- **the random states** (Python, NumPy, torch CPU and CUDA) when the checkpoint was written:
  dropout masks and anything else random continue as they would have.

They are restored when training starts again, before the first batch is drawn.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from framework.data.sampler import EpochSampler
from framework.errors import FieldError

KEY = "fw_resume"


def random_states() -> dict[str, Any]:
    """Every random state as plain data (a checkpoint loads with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": _plain(random.getstate()),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    random.setstate(_tuples(states["python"]))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def train_sampler(trainer: Trainer) -> EpochSampler | None:
    loader = trainer.train_dataloader
    sampler = getattr(loader, "sampler", None)
    return sampler if isinstance(sampler, EpochSampler) else None


class ExactResume(Callback):
    """Writes ``fw_resume`` into every checkpoint and applies it when a run resumes from one."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        checkpoint[KEY] = {
            "epoch": trainer.current_epoch,
            "batches": progress.processed,  # batches of this epoch trained on (the current one included)
            "random": random_states(),
        }

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(KEY)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Once, after Lightning restored the checkpoint and before the first batch is drawn (a
        run resumed mid-epoch gets no ``on_train_epoch_start``)."""
        state, self._pending = self._pending, None
        if state is None:
            return
        sampler = train_sampler(trainer)
        done = state["batches"] if state["epoch"] == trainer.current_epoch else 0
        if done and sampler is not None:
            loader = trainer.train_dataloader
            sampler.skip(done * loader.batch_size)
        set_random_states(state["random"])


def last_checkpoint(trainer: Any) -> Path:
    """``--ckpt_path last``: the ``last.ckpt`` of the newest run under the recipe's logger folder
    (every run writes a new ``version_N``, so Lightning's own lookup, in the new run's folder,
    would find nothing and silently start from scratch)."""
    loggers = trainer.get("logger")
    roots = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        args = getattr(logger, "init_args", None)
        if args is not None and args.get("save_dir") is not None:
            roots.append(Path(args.get("save_dir")) / str(args.get("name") or "lightning_logs"))
    roots.append(Path(trainer.get("default_root_dir") or "."))
    found = [p for root in roots for p in root.glob("version_*/checkpoints/last.ckpt")]
    found += [p for root in roots for p in [root / "checkpoints" / "last.ckpt"] if p.is_file()]
    if not found:
        raise FieldError(f"--ckpt_path last: no last.ckpt under {', '.join(str(r) for r in roots)}; give the checkpoint's path")

    def version(path: Path) -> int:
        match = re.fullmatch(r"version_(\d+)", path.parent.parent.name)
        return int(match.group(1)) if match else -1
    return max(found, key=lambda p: (version(p), p.stat().st_mtime))
