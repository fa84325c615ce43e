"""fw_probe: the linear probe (entry point ``linear_probe``): the whole backbone frozen, only
the task head trains. The cost floor of training on a frozen network, and the baseline every
PEFT method should beat."""

from torch import nn

from framework.method import PeftMethod


class LinearProbe(PeftMethod):
    """Linear probe: no backbone parameter trains, only the task head."""

    description = "Linear probe: the backbone frozen, only the task head trains (cost floor, baseline)"

    def attach(self, model: nn.Module) -> None:
        """Nothing: the core has frozen the backbone and unfreezes the head."""

    def merge(self, model: nn.Module) -> None:
        """Nothing to fold: only the head trained (a merged model is the model as it is)."""

    def unmerge(self, model: nn.Module) -> None:
        """Nothing to undo (see :meth:`merge`)."""


__all__ = ["LinearProbe"]
