"""The end-of-run summary: parameters, peak memory, time, final metrics.

:class:`RunSummary` is a callback that every ``fw`` run carries; after each subcommand the
CLI prints its table and writes ``summary.json`` into the run's log directory.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from framework.measure import current_rss_bytes, human_bytes, peak_memory_bytes


class RunSummary(Callback):
    """Collects timings and metrics while the Trainer runs."""

    def __init__(self) -> None:
        self.fit_seconds: float | None = None
        self.step_seconds: list[float] = []
        self.examples = 0
        self.metrics: dict[str, float] = {}
        self._t0 = 0.0
        self._step_t0 = 0.0
        self.rss_at_fit_start: int | None = None
        self.peak_after_fit: tuple[int, str] | None = None
        self.adapter_dir: str | None = None  # where a finished fit wrote its adapter (fw format)
        self.seconds_before = 0.0  # fit time of the run this one resumed (from its checkpoint)
        self.resumed_at_step: int | None = None

    # -- a resumed run's summary covers the whole run ------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds_before + time.perf_counter() - self._t0,
                "step_seconds": list(self.step_seconds), "examples": self.examples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds_before = float(state.get("seconds", 0.0))
        self.step_seconds = list(state.get("step_seconds", []))
        self.examples = int(state.get("examples", 0))
        self.resumed_at_step = len(self.step_seconds)

    # -- timing ---------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self.rss_at_fit_start = current_rss_bytes()
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.step_seconds.append(time.perf_counter() - self._step_t0)
        self.examples += len(batch["input_ids"])

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.fit_seconds = self.seconds_before + time.perf_counter() - self._t0
        self.peak_after_fit = peak_memory_bytes(pl_module.device)

    # -- metrics --------------------------------------------------------------------------

    def _collect(self, trainer: Trainer, prefix: str) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix):
                self.metrics[key] = float(value)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._collect(trainer, "val/")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._collect(trainer, "test/")

    # -- the report -----------------------------------------------------------------------

    def _training_memory(self) -> dict[str, Any]:
        """The peak while fitting; on CPU also its rise above the RSS at fit start (the model
        and data already loaded), i.e. what training itself added."""
        if self.peak_after_fit is None:
            return {}
        peak, how = self.peak_after_fit
        out: dict[str, Any] = {"train_peak_memory_bytes": peak}
        if how == "process_peak_rss" and self.rss_at_fit_start is not None:
            out["train_memory_above_start_bytes"] = max(0, peak - self.rss_at_fit_start)
        return out

    def report(self, trainer: Trainer, module: LightningModule) -> dict[str, Any]:
        peak, how = peak_memory_bytes(module.device)
        out: dict[str, Any] = {
            "method": type(module.method).__name__ if module.method is not None else "full fine-tuning",
            "backbone": module.backbone.name_or_path or module.backbone.config,
            "params": module.param_counts().as_dict(),
            "peak_memory_bytes": peak,
            "peak_memory_measure": how,
            **self._training_memory(),
            "train_seconds": round(self.fit_seconds, 3) if self.fit_seconds is not None else None,
            "train_steps": len(self.step_seconds),
            "train_examples": self.examples,
            "metrics": dict(sorted(self.metrics.items())),
        }
        if self.adapter_dir is not None:
            out["adapter_dir"] = self.adapter_dir
        if self.resumed_at_step is not None:
            out["resumed_at_step"] = self.resumed_at_step
        if len(self.step_seconds) > 2:
            timed = self.step_seconds[2:]  # skip warm-up steps
            out["median_step_seconds"] = round(statistics.median(timed), 5)
            out["train_examples_per_second"] = round(self.examples / max(sum(self.step_seconds), 1e-9), 2)
        return out

    def write(self, trainer: Trainer, module: LightningModule) -> Path | None:
        """Print the table and write ``summary.json`` into the log directory (on rank 0).
        Every rank calls this: ``trainer.log_dir`` and, on a sharded model, some parameter
        counts (a prefix computed from sharded weights) are collectives."""
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        report = self.report(trainer, module)
        if not trainer.is_global_zero:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "summary.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(format_table(report) + f"\nsummary written to {path}")
        return path


def format_table(report: dict[str, Any]) -> str:
    params = report["params"]
    rows = [
        ("method", str(report["method"])),
        ("trainable parameters", f"{params['trainable_params']:,} ({params['trainable_percent']:.3f} % of the backbone)"),
        ("method parameters", f"{params['method_params']:,} ({params['method_percent']:.3f} %)"),
        ("stored parameters", f"{params['stored_params']:,} ({params['stored_percent']:.3f} %)"),
        ("peak memory", f"{human_bytes(report['peak_memory_bytes'])} ({report['peak_memory_measure']})"),
    ]
    if report["train_seconds"] is not None:
        rows.append(("training time", f"{report['train_seconds']:.1f} s ({report['train_steps']} steps)"))
    for key, value in report["metrics"].items():
        rows.append((key, f"{value:.4f}"))
    if report.get("adapter_dir"):
        rows.append(("adapter (fw format)", report["adapter_dir"]))
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([rule, *(f"{k:<{width}} | {v}" for k, v in rows), rule])
