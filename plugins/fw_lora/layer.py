"""The LoRA layer: a frozen Linear (or GPT-2 Conv1D) plus a trainable low-rank update.

How A and B start (``init``, as Hugging Face PEFT's ``init_lora_weights``):

- ``kaiming`` (default): A kaiming-uniform (a=sqrt(5)), B zero (Hu et al., 2021).
- ``gaussian``: A ~ N(0, (1/r)²) (std 1/r, as PEFT), B zero.
- ``pissa``: PiSSA (Meng et al., 2024, arXiv:2404.02948): the top-r singular triplets of W,
  ``A = diag(sqrt(S_r / s)) Vhᵀ_r``, ``B = U_r diag(sqrt(S_r / s))`` (s: the scaling), and the
  base keeps the residual ``W - s·B·A``; ``pissa_niter`` uses torch's randomized
  ``svd_lowrank`` with that many subspace iterations (PEFT's ``pissa_niter_[k]``).
- ``olora``: OLoRA (Büyükakyüz, 2024, arXiv:2406.01775): ``W = QR``, ``A = R[:r]``,
  ``B = Q[:, :r]`` and the base keeps ``W - s·B·A``. (W is (out, in) for GPT-2's Conv1D too;
  PEFT 0.21.2 factors Conv1D's stored (in, out) weight, which gives A and B swapped shapes.)

The factors are computed in float32; a 16-bit base keeps the residual rounded to its dtype, so
there the model starts equal to the base up to that rounding (as in PEFT).

PiSSA and OLoRA leave the model equal to the base (up to float rounding) but change the base
weight; the layer keeps the initial factors as buffers ``lora_A0``/``lora_B0`` (the trained
update relative to the original W is ``s·(B·A - B0·A0)``, what a PEFT export stores).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from framework.layers import AdditiveUpdate, linear_dims, weight_dtype
from framework.validation import InvalidArgument
from fw_lora.branch import lora_branch

#: how A and B start (see the module's docstring)
LoRAInit = Literal["kaiming", "gaussian", "pissa", "olora"]
#: the inits that move part of W into A and B (the base weight changes)
BASE_CHANGING: tuple[str, ...] = ("pissa", "olora")


class LoRALinear(AdditiveUpdate):
    """``y = base(x) + (dropout(x) @ A^T) * scaling @ B^T`` with A (r, in), B (out, r).

    A starts kaiming-uniform (a=sqrt(5)) and B at zero, so the wrapped layer starts equal to
    the base; ``init`` chooses another start (:meth:`initialize`, the module's docstring).
    The scaling multiplies the rank-r activations, the cheapest place for it.
    The branch is one autograd Function (:mod:`fw_lora.branch`) that keeps ``x``, the rank-r
    activations and the random generator's state for backward, not a dropped-out copy of ``x``
    and its mask; outputs, gradients and the random stream are the plain ops'.
    """

    lora_A0: torch.Tensor | None
    lora_B0: torch.Tensor | None

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype | None = None,
        init: LoRAInit = "kaiming",
        pissa_niter: int | None = None,
    ) -> None:
        super().__init__()
        in_features, out_features, self.fan_in_fan_out = linear_dims(base_layer)
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        device = base_layer.weight.device
        dtype = dtype or weight_dtype("base", base_layer.weight)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.init: str = "kaiming"
        self.register_buffer("lora_A0", None, persistent=False)
        self.register_buffer("lora_B0", None, persistent=False)
        if init != "kaiming":
            self.initialize(init, pissa_niter)

    # -- initializations other than the default -----------------------------------------------

    @torch.no_grad()
    def initialize(self, init: LoRAInit, pissa_niter: int | None = None) -> None:
        """Start A and B as ``init`` says, right after construction (the constructor drew A
        kaiming-uniform). Random draws follow Hugging Face PEFT's order for a layer (its
        ``nn.Linear`` A and B are drawn kaiming-uniform, then ``init`` runs), so the same seed
        gives PEFT's tensors. ``pissa``/``olora`` also change the base weight (to the residual)."""
        if init == "kaiming":
            return
        if init not in ("gaussian", *BASE_CHANGING):
            raise InvalidArgument("init", f"{init!r} is not supported; supported: kaiming, gaussian, pissa, olora")
        if self.merged:
            raise RuntimeError("LoRALinear.initialize: unmerge first")
        nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))  # PEFT's nn.Linear(r, out) draw, overwritten below
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
            nn.init.zeros_(self.lora_B)
        else:
            weight = self.base_layer.weight
            if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise InvalidArgument(
                    "init", f"{init} moves part of the base weight into A and B, and this layer's weight is "
                    f"{weight.dtype} ({type(self.base_layer).__name__}, e.g. 4-bit codes): use kaiming or gaussian"
                )
            if self.r > min(self.lora_A.shape[1], self.lora_B.shape[0]):
                raise InvalidArgument(
                    "r", f"{init} takes r singular/QR directions of W, at most min(in, out) = "
                    f"{min(self.lora_A.shape[1], self.lora_B.shape[0])}; got r={self.r}"
                )
            w = weight.to(torch.float32)
            w = w.T if self.fan_in_fan_out else w  # (out, in) for GPT-2's Conv1D too
            lora_a, lora_b = pissa_factors(w, self.r, self.scaling, pissa_niter) if init == "pissa" else olora_factors(w, self.r)
            residual = w - self.scaling * lora_b @ lora_a  # PEFT's expression, op for op
            residual = residual.T if self.fan_in_fan_out else residual
            weight.data = residual.to(weight.dtype).contiguous()
            self.lora_A.copy_(lora_a)
            self.lora_B.copy_(lora_b)
            self.lora_A0 = self.lora_A.detach().clone()
            self.lora_B0 = self.lora_B.detach().clone()
        self.init = init

    @torch.no_grad()
    def rebase(self, lora_a0: torch.Tensor, lora_b0: torch.Tensor) -> None:
        """Make the base ``W - s·B0·A0`` for the initial factors ``lora_a0``/``lora_b0`` (read back
        from a stored adapter) instead of this layer's own (computed from W at construction):
        nothing changes where they are equal (the same W, the same SVD or QR), otherwise W is
        recovered as ``base + s·B0'·A0'`` and the other residual taken (float32, ~1e-7 relative)."""
        if self.lora_A0 is None or self.lora_B0 is None:
            raise RuntimeError(f"LoRALinear.rebase: this layer was initialized with {self.init}, not pissa/olora")
        if torch.equal(lora_a0, self.lora_A0) and torch.equal(lora_b0, self.lora_B0):
            return
        if self.merged:
            raise RuntimeError("LoRALinear.rebase: unmerge first")
        weight = self.base_layer.weight
        ours = (self.lora_B0.float() @ self.lora_A0.float()) * self.scaling
        theirs = (lora_b0.float() @ lora_a0.float()) * self.scaling
        change = ours - theirs
        weight.copy_((weight.float() + (change.T if self.fan_in_fan_out else change)).to(weight.dtype))
        self.lora_A0.copy_(lora_a0)
        self.lora_B0.copy_(lora_b0)

    # -- the layer --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        update = self.lora_update(x).to(out.dtype)
        if type(self.base_layer) is nn.Linear and not self.base_layer._forward_hooks:
            return out.add_(update)  # its fresh output, which nothing else holds: one buffer less
        return out + update

    @property
    def dropout_p(self) -> float:
        """The dropout probability the branch applies now (0 in eval mode or without dropout)."""
        dropout = self.lora_dropout
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """``(dropout(x) @ A^T) * scaling @ B^T`` in A and B's dtype (or the autocast dtype)."""
        return lora_branch(x, self.lora_A, self.lora_B, self.scaling, self.dropout_p)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout (transposed for Conv1D), in fp32."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        init = "" if self.init == "kaiming" else f", init={self.init}"
        return f"r={self.r}, scaling={self.scaling:g}{init}, merged={self.merged}"


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's (A, B) of a float32 (out, in) ``weight``, so that ``scaling·B·A`` is its best rank-r
    approximation, computed as PEFT's ``pissa_init`` does (full SVD, or ``svd_lowrank`` with
    ``niter`` iterations, which draws from the global random generator)."""
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        ur, sr, vhr = u[:, :r], s[:r], vh[:r]
    else:
        ur, sr, v = torch.svd_lowrank(weight, r, niter=niter)
        vhr = v.t()
    sr /= scaling
    lora_a = torch.diag(torch.sqrt(sr)) @ vhr
    lora_b = ur @ torch.diag(torch.sqrt(sr))
    return lora_a, lora_b


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's (A, B) of a float32 (out, in) ``weight``: ``R[:r]`` and ``Q[:, :r]`` of its reduced QR
    (PEFT's ``olora_init``)."""
    q, rr = torch.linalg.qr(weight)
    return rr[:r].contiguous(), q[:, :r].contiguous()


__all__ = ["BASE_CHANGING", "LoRAInit", "LoRALinear", "olora_factors", "pissa_factors"]
