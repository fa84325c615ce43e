"""4-bit quantization with bitsandbytes: Linear layers in, ``bnb.nn.Linear4bit`` out, and back.

QLoRA stores each frozen weight matrix as 4-bit codes in blocks of 64 values, each block
with its own absolute maximum (the scale). NF4 ("4-bit NormalFloat") places its 16 code
values at the quantiles of a normal distribution, which is how trained weights are
distributed. Double quantization stores the per-block scales themselves in 8 bits (blocks
of 256), saving about 0.37 bits per parameter. In the forward pass each layer de-quantizes
its weight to the *compute dtype* and runs an ordinary matmul; nothing 4-bit is trained.

This module does the conversions only; :mod:`fw_qlora.method` decides what to convert.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

#: Where bitsandbytes was asked to quantize, and what happened (probed once per device type).
_PROBED: dict[str, str | None] = {}


class QuantizationError(ValueError):
    """4-bit quantization cannot work for this backbone on this machine (raised before training)."""


def bnb() -> Any:
    """The bitsandbytes module, or a :class:`QuantizationError` saying why it cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
    except Exception as err:  # ImportError, or a broken native library raising at import
        raise QuantizationError(
            f"QLoRA quantizes the backbone with bitsandbytes, which cannot be imported "
            f"here ({type(err).__name__}: {err}); install it (pip install bitsandbytes) or use lora"
        ) from err
    return bitsandbytes


def is_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer."""
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception:  # pragma: no cover - no bitsandbytes, so nothing is 4-bit
        return False
    return isinstance(module, Linear4bit)


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` is any bitsandbytes quantized linear layer (4- or 8-bit)."""
    return type(module).__module__.startswith("bitsandbytes")


def _quantize_weight(
    layer: nn.Linear, weight: torch.Tensor, quant_type: str, double_quant: bool, compute_dtype: torch.dtype
) -> nn.Module:
    lib = bnb()
    out_features, in_features = weight.shape
    # built on the meta device: no throw-away full-precision weight, no random init
    new = lib.nn.Linear4bit(
        in_features,
        out_features,
        bias=layer.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    new.weight = lib.nn.Params4bit(
        weight.detach(), requires_grad=False, compress_statistics=double_quant, quant_type=quant_type, module=new
    )
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    # bitsandbytes' CPU inference fast path (eval mode, no grad, CPUs with AVX512-BF16) repacks
    # the 4-bit weight in place, computes in bf16 whatever the compute dtype, and asserts on
    # layers whose width is not a multiple of 32/64. fw keeps one layout and one numeric path.
    new.support_avx512bf16_for_cpu = False
    new.train(layer.training)
    return new.to(weight.device)  # quantization happens here, where the weights are


def quantize_linear(
    layer: nn.Module, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A ``bnb.nn.Linear4bit`` holding ``layer``'s weight as 4-bit codes (bias kept as is).

    ``layer`` is an ``nn.Linear`` or GPT-2's ``Conv1D`` (whose (in, out) weight is transposed
    to Linear's (out, in); :func:`to_plain` turns it back into a Conv1D).
    """
    conv1d = type(layer).__name__ == "Conv1D"
    if not (isinstance(layer, nn.Linear) or conv1d):
        raise TypeError(f"4-bit quantization converts nn.Linear or Conv1D layers, not {type(layer).__name__}")
    weight = layer.weight.T.contiguous() if conv1d else layer.weight
    if not weight.is_floating_point():
        raise QuantizationError(
            f"QLoRA cannot quantize a {weight.dtype} weight to 4-bit (expected float32/bfloat16/float16)"
        )
    new = _quantize_weight(layer, weight, quant_type, double_quant, compute_dtype)
    new.fw_conv1d = conv1d
    return new


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a 4-bit layer computes with, de-quantized to float32."""
    import bitsandbytes.functional as F

    weight = layer.weight
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # repacked by bnb's CPU inference path
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    return F.dequantize_4bit(data, state).float().reshape(layer.out_features, layer.in_features)


def to_plain(layer: nn.Module, weight: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A plain ``nn.Linear`` (or ``Conv1D``, if the layer was one) with ``weight`` (default:
    the de-quantized weight), in ``dtype``."""
    weight = dequantize_weight(layer) if weight is None else weight
    bias = layer.bias
    if getattr(layer, "fw_conv1d", False):
        from transformers.pytorch_utils import Conv1D

        plain: nn.Module = Conv1D(layer.out_features, layer.in_features)
        plain.weight = nn.Parameter(weight.T.contiguous().to(dtype), requires_grad=False)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
        plain.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return plain.to(weight.device).train(layer.training)


def probe(device: torch.device, quant_type: str, compute_dtype: torch.dtype) -> None:
    """Quantize a small layer on ``device`` and run forward and backward through it; raise a
    :class:`QuantizationError` with bitsandbytes' reason when that fails."""
    lib = bnb()
    key = f"{device.type}:{quant_type}:{compute_dtype}"
    if key not in _PROBED:
        try:
            layer = quantize_linear(nn.Linear(64, 64).to(device), quant_type, True, compute_dtype)
            x = torch.randn(2, 64, device=device, requires_grad=True)
            layer(x).float().sum().backward()
            _PROBED[key] = None if x.grad is not None else "no gradient reached the layer input"
        except Exception as err:  # bitsandbytes has no backend for this device, a broken library, ...
            _PROBED[key] = f"{type(err).__name__}: {err}"
        if _PROBED[key] is not None:
            _PROBED[key] = f"bitsandbytes {lib.__version__} cannot quantize to 4-bit on {device.type} ({_PROBED[key]})"
    if _PROBED[key] is not None:
        raise QuantizationError(f"QLoRA: {_PROBED[key]}; use lora, or run on a machine bitsandbytes supports")
