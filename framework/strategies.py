"""FSDP for PEFT: FSDP2 (``fully_shard``, per-parameter sharding) through Lightning's
``ModelParallelStrategy``, with adapter-only checkpoints.

Why FSDP2 and not Lightning's ``FSDPStrategy`` (FSDP1): FSDP1 flattens each wrapped unit
into one flat parameter, which needs uniform ``requires_grad`` and dtype inside a unit (or
``use_orig_params``, which still allocates flat gradients), and Lightning 2.6 refuses it on
CPU. FSDP2 shards every parameter on its own: a frozen weight is sharded and never gets a
gradient, a trainable fp32 adapter can sit next to a bf16 base weight, and the same code runs
on CPU (gloo) and GPU (NCCL).

Recipe::

    trainer:
      strategy: {class_path: framework.strategies.FSDP}
      devices: 2          # and num_nodes: N on a cluster

:meth:`framework.module.PeftModule.configure_model` shards each transformer block and then
the whole model over the strategy's mesh. Checkpoints hold only what the method trains, as
full tensors gathered from every rank (``PeftModule.adapter_state_dict``), written by rank 0
to one file that a single-device run loads as it is; a single-device checkpoint loads into
a sharded run the same way (each rank keeps its shard).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over all devices and nodes, adapter-only checkpoints.

    Args:
        data_parallel_size: ranks that shard the model (``auto``: every rank).
        reshard_after_forward: free the gathered weights after each block's forward (saves
            memory, costs a second all-gather in the backward pass).
    """

    def __init__(self, data_parallel_size: int | Literal["auto"] = "auto", reshard_after_forward: bool = True) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1, save_distributed_checkpoint=False)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Nothing of the backbone: ``PeftModule.on_save_checkpoint`` puts in the gathered adapter."""
        return {}

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """fw's checkpoints are plain data: they load with ``weights_only=True`` always, so a
        crafted file's pickle payload is refused rather than run."""
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            raise IsADirectoryError(f"{path}: fw's FSDP checkpoints are single files (adapter-only), not folders")
        return torch.load(path, map_location="cpu", weights_only=True)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        self.lightning_module.load_state_dict(checkpoint["state_dict"])

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
