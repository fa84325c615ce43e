"""ToyScale: a learned scalar gain on the output of chosen Linear layers (a third-party plugin)."""

from __future__ import annotations

import torch
from torch import nn

from framework.method import PeftMethod
from framework.targeting import find_modules


class ToyScale(PeftMethod):
    """ToyScale: one trainable gain per chosen Linear layer, initialised to 1."""

    def __init__(self, targets: list[str] = ["value"], init: float = 1.0) -> None:  # noqa: B006
        self.targets = targets
        self.init = init

    def attach(self, model: nn.Module) -> None:
        for name, layer in find_modules(model, self.targets, field="model.method.init_args.targets"):
            layer.toy_gain = nn.Parameter(torch.tensor(self.init))
            layer.register_forward_hook(lambda mod, args, out: out * mod.toy_gain)
            self.record(name, "ToyScale gain (+1)")
