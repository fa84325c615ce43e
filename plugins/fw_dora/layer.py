"""The DoRA layer: a LoRA layer whose output rows are rescaled to a trained magnitude."""

from __future__ import annotations

import torch
from fw_lora.branch import lora_branch
from fw_lora.layer import LoRALinear
from torch import nn
from torch.nn import functional as F


class DoRALinear(LoRALinear):
    """``y = (m / ‖W + s·BA‖) ⊙ (W x + s·B A x) + bias``, the norm per output row and detached.

    ``m`` (``magnitude``, one entry per output feature) starts at that norm, so a fresh layer
    (B = 0) computes the base layer's output. As Hugging Face PEFT (``use_dora=True``), the
    norm is a constant to autograd (the paper's section 4.3): A and B get their gradient
    through ``s·B A x`` only, ``m`` through the scale. With dropout (training mode) PEFT
    drops the input of the whole DoRA correction, not only of the LoRA branch::

        y = W x + bias + (m/n - 1) ⊙ W·drop(x) + (m/n) ⊙ s·B A drop(x)

    which this layer reproduces, dropout mask and random stream included.

    The norm never forms ``W + s·BA`` (out × in): row by row,
    ``‖W + s·BA‖² = ‖W‖² + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B (A Aᵀ)) ⊙ B)``, which needs only
    out × r and r × r temporaries (PEFT forms ``B A`` through an in × in identity, then
    ``W + s·BA``: 26× slower at 4096 × 4096, r=16, on one CPU thread). It is computed in A's
    dtype (float32 for 16-bit A) with autocast off, and cached
    while ``W``, ``A`` and ``B`` stay as they are (their version counters: an optimizer step, a
    merge or a loaded state dict invalidates it), so generation and recomputation under
    activation checkpointing do not redo it.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(base_layer, r, alpha, dropout, rslora, dtype)
        self._norm_cache: tuple[tuple, torch.Tensor] | None = None
        self._merge_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # ‖W + s·BA‖ of the weights as they start (B = 0 for plain LoRA init: ‖W‖)
        self.magnitude = nn.Parameter(self.weight_norm().to(self.lora_A.dtype).clone())

    # -- the norm ------------------------------------------------------------------------------

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in) (a view: transposed for GPT-2's Conv1D)."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def _cache_key(self) -> tuple | None:
        try:
            return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (self.base_layer.weight, self.lora_A, self.lora_B))
        except RuntimeError:  # inference tensors track no version: no cache
            return None

    def weight_norm(self) -> torch.Tensor:
        """``‖W + scaling·B A‖`` per output row (shape: out), detached, in A's dtype (float32 for
        16-bit A: a bfloat16 sum of squares keeps ~3 digits)."""
        key = self._cache_key()
        if key is not None and self._norm_cache is not None and self._norm_cache[0] == key:
            return self._norm_cache[1]
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        a, b = self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype)
        s = self.scaling
        with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
            w = self.base_weight().detach().to(dtype)
            wa = F.linear(w, a)  # W Aᵀ: out × r
            bg = b @ (a @ a.T)  # B (A Aᵀ): out × r
            squared = torch.linalg.vector_norm(w, dim=1).square()
            squared = squared + (2 * s) * (b * wa).sum(1) + (s * s) * (bg * b).sum(1)
            norm = squared.clamp_min(0).sqrt()
        if key is not None and not torch.is_inference_mode_enabled():  # an inference tensor cannot serve autograd later
            self._norm_cache = (key, norm)
        return norm

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._norm_cache = None  # .to(), .half(), ...: new tensors (possibly at the old addresses)
        return super()._apply(fn, *args, **kwargs)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        scale = self.magnitude / self.weight_norm()  # the gradient reaches m, not the norm
        p = self.dropout_p
        if p == 0:
            bias = self.bias
            plain = out if bias is None else out - bias
            result = scale * (plain + self.lora_update(x))
            return (result if bias is None else result + bias).to(out.dtype)
        # training with dropout: the correction of the dropped-out input, as PEFT computes it
        dropped = F.dropout(x.to(self.lora_A.dtype), p, training=True)
        base_dropped = F.linear(dropped, self.base_weight().to(dropped.dtype))
        lora = lora_branch(dropped, self.lora_A, self.lora_B, self.scaling, 0.0)
        return (out + (scale - 1) * base_dropped + scale * lora).to(out.dtype)

    # -- merging ---------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """``W ← (m/n) ⊙ (W + s·BA)`` per output row (n: the unmerged norm)."""
        if self.merged:
            return
        weight = self.base_layer.weight
        factor = (self.magnitude.float() / self.weight_norm().float()).to(weight.device)
        delta = self.delta_weight().to(weight.device)
        # rows whose factor cannot be divided out again are kept as they were
        lost = torch.nonzero((factor == 0) | ~torch.isfinite(factor)).flatten()
        kept = (weight[:, lost] if self.fan_in_fan_out else weight[lost]).clone()
        shaped = factor[None, :] if self.fan_in_fan_out else factor[:, None]
        weight.copy_(((weight.float() + delta) * shaped).to(weight.dtype))
        self._merge_state = (factor, lost, kept)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W ← W / (m/n) - s·BA`` with the factor the merge used (rows it zeroed: restored)."""
        if not self.merged:
            return
        assert self._merge_state is not None
        weight = self.base_layer.weight
        factor, lost, kept = (t.to(weight.device) for t in self._merge_state)
        safe = factor.clone()
        safe[lost] = 1.0
        shaped = safe[None, :] if self.fan_in_fan_out else safe[:, None]
        weight.copy_((weight.float() / shaped - self.delta_weight().to(weight.device)).to(weight.dtype))
        if lost.numel():
            if self.fan_in_fan_out:
                weight[:, lost] = kept
            else:
                weight[lost] = kept
        self._merge_state = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, magnitude={tuple(self.magnitude.shape)}, merged={self.merged}"
