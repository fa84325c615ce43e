"""FISH: Fisher-Induced Sparse uncHanging — training a fixed sparse mask.

Sung, Nair & Raffel 2021, "Training Neural Networks with Fixed Sparse Masks"
(arXiv:2111.09839). Before training, a calibration pass estimates how much each parameter
entry matters with the empirical Fisher information, and only the top-k entries train::

    F_θ ≈ Σ_i (∂ loss(x_i, y_i) / ∂θ)²       over N training examples with their true labels
    mask = top-k of F over ALL backbone entries (global, not per tensor), k = fraction · |θ|
    θ' = θ outside the mask (bitwise), trained values inside it

Choices made here:

- **Estimator.** ``per_example: true`` (default) is the paper's empirical Fisher: one
  backward per example. ``false`` squares per-batch mean gradients (one backward per
  batch): faster, an approximation.
- **Sparse training.** Each masked tensor gets a ``torch.nn.utils.parametrize``
  parametrization holding a trainable vector of exactly its masked entries, scattered into
  the frozen original at every forward. The optimizer sees only those k values: entries
  outside the mask cannot move under weight decay or momentum, and AdamW's state is 2·k
  numbers instead of 2·|θ|. The cost is one scatter (a copy of each masked tensor) per
  forward.
- **Checkpoint.** The flat indices (int64) and the k values of each masked tensor, plus the
  task head; no dense backbone weights. ``merge()`` writes the values into the weights.
- **Head.** The task head always trains (it is not part of the mask). Parameters shared
  with the head (a tied output embedding) are left out of the mask.
- **Calibration** runs in eval mode (no dropout), on the training split, with a progress
  bar; it is the ``prepare`` hook of the PeftMethod contract. A run resumed from a
  checkpoint restores the mask from it instead of recalibrating.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.method import MergeNotSupportedError, PeftMethod
from framework.targeting import head_module_names
from framework.validation import InvalidArgument, nonzero_fraction, positive_int
from fw_fisher.fisher import empirical_fisher, top_k_indices
from fw_fisher.mask import add_sparse_update, remove_sparse_update, sparse_updates

if TYPE_CHECKING:  # pragma: no cover
    from framework.prepare import PrepareContext

INDICES = ".fisher_indices"


def candidate_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every backbone parameter the mask may choose from (not the head, not tied to it)."""
    heads = head_module_names(model)
    head_tensors = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
    out = {}
    for name, p in model.named_parameters():
        if any(name.startswith(h + ".") for h in heads) or id(p) in head_tensors:
            continue
        out[name] = p
    return out


class FisherMask(PeftMethod):
    """FISH: train the top-k backbone entries by empirical Fisher information (fixed sparse mask).

    Args:
        fraction: share of all backbone entries that train (0.005 = 0.5 %).
        num_samples: training examples in the calibration pass.
        per_example: the exact empirical Fisher (one backward per example); false squares
            per-batch gradients instead (faster approximation).
    """

    description = "FISH: train a fixed sparse mask of the top-k entries by empirical Fisher information"
    supports_sharding = False
    sharding_refusal = "its k values scatter into dense weights, which FSDP shards; DDP trains the same mask on every rank"

    def __init__(self, fraction: float = 0.005, num_samples: int = 1024, per_example: bool = True) -> None:
        nonzero_fraction(fraction, "fraction")
        positive_int(num_samples, "num_samples")
        self.fraction = fraction
        self.num_samples = num_samples
        self.per_example = per_example
        self.calibrated_on = 0

    def attach(self, model: nn.Module) -> None:
        """Nothing trains until :meth:`prepare` has chosen the mask (or a checkpoint restores it)."""
        k = self.k(model)
        self.record("", f"FISH mask of k = {k:,} entries ({self.fraction:.2%}), chosen by calibration at fit start")

    def k(self, model: nn.Module) -> int:
        """How many entries the mask keeps on this (not yet masked) model."""
        return max(1, round(self.fraction * sum(p.numel() for p in candidate_params(model).values())))

    # -- calibration ----------------------------------------------------------------------

    def prepare(self, context: PrepareContext) -> None:
        if sparse_updates(context.model):
            return  # already masked (e.g. prepare called twice)
        if context.resuming:
            return  # the checkpoint restores the mask and its values
        if context.train_batches is None:
            raise InvalidArgument("", "FISH needs training data for its calibration pass (data: ... in the recipe)")
        # under DDP every rank calibrates on the same examples, then all install rank 0's mask:
        # one mask everywhere, the same as a single-process run's
        share = context.broadcast if context.world_size > 1 else None
        self.select(context.model, context.loss, context.train_batches(), context.device, context.progress, share)

    def select(self, model: nn.Module, loss_fn: Any, batches: Any, device: torch.device | None = None,
               progress: bool = True, share: Any = None) -> dict[str, torch.Tensor]:
        """Calibrate on ``batches`` and install the mask; returns the chosen indices.
        ``share`` (e.g. a strategy's ``broadcast``) makes every process install rank 0's."""
        params = candidate_params(model)
        was_training, flags = model.training, {n: p.requires_grad for n, p in params.items()}
        if device is not None:
            model.to(device)
        model.eval()
        for p in params.values():
            p.requires_grad_(True)
        try:
            scores, self.calibrated_on = empirical_fisher(
                params, loss_fn, batches, self.num_samples, self.per_example, device, progress
            )
        finally:
            for name, p in params.items():
                p.requires_grad_(flags[name])
            model.train(was_training)
        indices = top_k_indices(scores, self.k(model))
        if share is not None:
            indices = {name: idx.to(device) for name, idx in share({n: i.cpu() for n, i in indices.items()}).items()}
        self.install(model, indices)
        return indices

    def install(self, model: nn.Module, indices: dict[str, torch.Tensor]) -> None:
        """Make exactly ``indices`` (flat, per parameter name) trainable."""
        for name, idx in indices.items():
            module_name, _, tensor_name = name.rpartition(".")
            note = f"FISH {tensor_name} {idx.numel():,}/{model.get_parameter(name).numel():,} (+{idx.numel():,})"
            earlier = self.modified_modules.get(module_name)
            self.record(module_name, f"{earlier}; {note}" if earlier else note)
            add_sparse_update(model, name, idx)

    # -- merging --------------------------------------------------------------------------

    def merge(self, model: nn.Module) -> None:
        """Write the trained values into the weights and drop the parametrizations."""
        for name in sparse_updates(model):
            remove_sparse_update(model, name, keep_values=True)

    def unmerge(self, model: nn.Module) -> None:
        raise MergeNotSupportedError(
            "FISH's merge overwrites the masked entries of the base weights; reload the backbone "
            "and the checkpoint to get the separate form back"
        )

    # -- weights --------------------------------------------------------------------------

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The head, and per masked tensor its indices and trained values (no dense weights)."""
        updates = sparse_updates(model)
        out = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and ".parametrizations." not in n}
        for name, update in updates.items():
            out[name + INDICES] = update.indices
            out[name + ".fisher_values"] = update.values.detach()
        return out

    def load_stored_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """The stored form is the checkpoint's (indices + values, the head): install that mask."""
        self.load_trainable_state_dict(model, state_dict)

    def load_trainable_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
        state = dict(state_dict)
        wanted = {k[: -len(INDICES)]: state.pop(k) for k in list(state) if k.endswith(INDICES)}
        values = {name: state.pop(name + ".fisher_values") for name in wanted}
        for name in list(sparse_updates(model)):
            remove_sparse_update(model, name, keep_values=False)
        self.install(model, wanted)
        updates = sparse_updates(model)
        param_names = {id(p): n for n, p in model.named_parameters()}
        values = {param_names[id(updates[name].values)]: value for name, value in values.items()}
        super().load_trainable_state_dict(model, {**state, **values})
