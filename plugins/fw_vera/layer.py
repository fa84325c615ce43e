"""The VeRA layer: a frozen Linear (or GPT-2 Conv1D) plus a branch through shared frozen random
matrices scaled by two trained vectors."""

from __future__ import annotations

import math

import torch
from torch import nn

from framework.layers import AdditiveUpdate, linear_dims


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt(2), fan_in = ``shape[1]``) drawn from ``generator``: PEFT's
    ``peft.tuners.vera.model._kaiming_init``, so the same key gives the same matrices."""
    tensor = torch.empty(shape)
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def projections(r: int, in_features: int, out_features: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared ``A`` (r × in_features) and ``B`` (out_features × r), float32 on the CPU,
    generated as PEFT's ``VeraModel._init_vera_A_vera_B`` does: one CPU generator seeded with
    ``key``, A drawn first, then B."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    a = _kaiming_uniform((r, in_features), generator)
    b = _kaiming_uniform((out_features, r), generator)
    return a, b


class VeRALinear(AdditiveUpdate):
    """``y = base(x) + λ_b ⊙ (B_s (λ_d ⊙ (A_s dropout(x))))``.

    ``A_s``/``B_s``: the first ``in``/``out`` columns/rows of the shared matrices, which are
    non-persistent buffers (regenerated from the key, never stored). ``λ_d`` (r) starts at
    ``d_initial``, ``λ_b`` (out) at zero, so the layer starts equal to the base.
    """

    def __init__(self, base_layer: nn.Module, vera_A: torch.Tensor, vera_B: torch.Tensor, dropout: float,
                 d_initial: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = linear_dims(base_layer)
        r = vera_A.shape[0]
        if vera_A.shape[1] < self.in_features or vera_B.shape[0] < self.out_features or vera_B.shape[1] != r:
            raise ValueError(f"VeRA: shared matrices {tuple(vera_A.shape)}/{tuple(vera_B.shape)} do not cover "
                             f"a layer of {self.in_features} -> {self.out_features}")
        self.base_layer = base_layer
        self.r = r
        device = base_layer.weight.device
        # the same tensors in every layer (named_buffers lists them once); not in state_dict()
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device, dtype=dtype))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vera_A[:, : self.in_features], self.vera_B[: self.out_features, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        a, b = self._sliced()
        dtype = self.vera_lambda_d.dtype
        h = torch.nn.functional.linear(self.dropout(x.to(dtype)), a.to(dtype))
        delta = self.vera_lambda_b * torch.nn.functional.linear(self.vera_lambda_d * h, b.to(dtype))
        return (out + delta).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``diag(λ_b) B_s diag(λ_d) A_s`` in float32, in the base weight's layout."""
        a, b = self._sliced()
        delta = (self.vera_lambda_b.float()[:, None] * b.float()) @ (self.vera_lambda_d.float()[:, None] * a.float())
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_features}, out={self.out_features}, merged={self.merged}"
