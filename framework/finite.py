"""Non-finite training stops the run (or skips a step, when the recipe allows a few).

A NaN or infinite loss, or gradient norm, means every later step trains on garbage: Lightning
would run to the end and write a checkpoint full of NaN with exit code 0. fw checks the loss
before backward and the gradients before the optimizer step, so nothing of a bad step is
applied: the weights (and every checkpoint) stay those of the last finite step.

``model.max_nonfinite_steps: N`` lets up to N bad steps be skipped (no update; their
gradients are dropped) before the run stops. Under ``16-mixed`` precision, non-finite
gradients are the loss scaler's business (it skips those steps and lowers the scale), so only
the loss is checked there.
"""

from __future__ import annotations

from typing import Any

import torch


class NonFiniteTrainingError(RuntimeError):
    """Training produced a NaN/inf loss or gradient: the run stops before applying it."""


def is_finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


def grad_norm(parameters: Any) -> torch.Tensor:
    """The 2-norm of all gradients (NaN/inf when any entry is; a DTensor under FSDP)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def explain(what: str, value: float, step: int, module: Any) -> str:
    trainer = module.trainer
    precision = str(getattr(trainer, "precision", ""))
    causes = [f"a learning rate too high for this method (model.learning_rate: {module.learning_rate:g})"]
    dtype = getattr(module.backbone, "dtype", "float32")
    if dtype == "float16" or precision.startswith("16"):
        causes.append("float16 overflow (use bf16-mixed, or backbone dtype float32/bfloat16)")
    causes.append("inputs or labels the model cannot represent")
    last = [cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks]
    kept = next((p for p in last if p), None)
    where = f"the last checkpoint, written before it, is {kept}" if kept else "no checkpoint was written"
    return (
        f"training stopped at step {step}: the {what} is {value} (nothing of this step was applied; {where}). "
        f"Likely causes: {'; '.join(causes)}. To skip a few such steps instead, set model.max_nonfinite_steps"
    )
