"""QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers et al., 2023, arXiv:2305.14314).

LoRA on a frozen base whose Linear weights are stored in 4 bits::

         x ───────────────┬──────────────────┐
                          │                  │
          ┌───────────────▼──────────────┐  ┌▼──────┐  A: r × in   (fp32 by default)
          │ W: 4-bit NF4 codes, frozen   │  │   A   │
          │ + a scale per 64 values      │  └┬──────┘
          │   (scales 8-bit: double      │  ┌▼──────┐  B: out × r  (zeros at start)
          │    quantization)             │  │   B   │
          │ de-quantized to the compute  │  └┬──────┘
          │ dtype, then x @ Wᵀ           │   │ × alpha / r
          └───────────────┬──────────────┘   │
                          └──────(+)◄────────┘
                                  │
                                  y = dequant(W) x + (alpha / r) · B A x

What QLoRA adds to LoRA (this plugin reuses fw_lora's layer for the B·A branch):

1. **4-bit NormalFloat weights** for every Linear layer of the backbone but the task head
   (``quantize``, default ``all-linear``), with **double quantization** of the scales;
   embeddings, norms and the head keep their precision.
2. **A compute dtype** (``compute_dtype``): each 4-bit layer de-quantizes to it and runs a
   normal matmul; gradients flow through the frozen 4-bit weights to the adapters.
3. **Preparation for k-bit training**: norms, biases and a small task head in float32,
   gradient checkpointing on, and input gradients enabled on the embeddings so
   checkpointed layers behind a frozen embedding still pass gradients.
4. **Paged optimizers** (``model.optimizer: paged_adamw``, a core option, see framework/optim.py)
   absorb memory spikes by paging optimizer state to CPU RAM.

Quantization happens in :meth:`QLoRA.attach`, layer by layer, where the backbone's weights
are (fw builds the backbone on the CPU and Lightning moves it to the accelerator). The core
stays method-agnostic: any backbone fw can load (a folder, a package, a GGUF file, a
random-init config) can be quantized, and no loader flag is needed.

Merging ``B·A`` back into 4-bit codes would round it away; :meth:`QLoRA.merge` instead
de-quantizes each layer, adds the delta and leaves a 16-bit model (``merge_dtype``), and
:func:`merged_model` returns it as a plain transformers model (no bitsandbytes, no LoRA).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from fw_lora import LoRA, LoRALinear
from fw_lora.layer import BASE_CHANGING, LoRAInit
from torch import nn

from framework.backbone import DTYPES
from framework.method import MergeNotSupportedError, PeftAdapter
from framework.targeting import ALL_LINEAR, find_modules, head_module_names, linear_types, set_submodule
from framework.validation import InvalidArgument, one_of
from fw_qlora.quant import QuantizationError, dequantize_weight, is_4bit, is_quantized_layer, probe, quantize_linear, to_plain

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_compute_dtype(name: str) -> torch.dtype:
    """``auto``: bfloat16 on a CUDA machine (float16 where the GPU lacks bf16), float32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class QLoRALinear(LoRALinear):
    """fw_lora's LoRA layer on a (usually 4-bit) base; merging de-quantizes to 16 bits first."""

    merge_dtype: torch.dtype = torch.bfloat16

    @property
    def quantized(self) -> bool:
        return is_4bit(self.base_layer)

    @torch.no_grad()
    def merge(self) -> None:
        """De-quantize W, add ``scaling·B·A`` in float32, and replace the 4-bit base by a plain
        layer in ``merge_dtype``. The 4-bit codes are not kept (see :meth:`unmerge`)."""
        if self.merged:
            return
        if not self.quantized:
            return super().merge()
        weight = dequantize_weight(self.base_layer) + self.delta_weight()
        self.base_layer = to_plain(self.base_layer, weight, self.merge_dtype)
        self.merged = True
        self.merged_from_4bit = True

    def unmerge(self) -> None:
        if self.merged and getattr(self, "merged_from_4bit", False):
            raise MergeNotSupportedError(
                "QLoRA: merging replaced the 4-bit weights by 16-bit merged ones and did not keep the "
                "4-bit codes, so it cannot be undone. Rebuild the model from the recipe and load the "
                "adapter checkpoint (e.g. fw test --ckpt_path ...) to get the 4-bit model with its adapter back."
            )
        super().unmerge()


class QLoRA(LoRA):
    """QLoRA: LoRA on a 4-bit NF4 (double-quantized) frozen backbone; merges into a 16-bit model.

    Args:
        r: rank of the update (> 0).
        alpha: scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).
        targets: where LoRA goes: module name patterns (suffix, glob, ``re:`` regex) or
            ``all-linear``; None: ``all-linear`` (every Linear but the task head), as in the paper.
        dropout: dropout on the LoRA branch's input.
        rslora: rank-stabilized scaling alpha / sqrt(r).
        dtype: dtype of A and B: float32 (default), bfloat16, float16, or ``compute`` (the compute dtype).
        quantize: which Linear layers are stored in 4 bits (patterns as for ``targets``); None:
            ``all-linear``. Task heads, embeddings and norms are never quantized.
        quant_type: ``nf4`` (4-bit NormalFloat, the paper's) or ``fp4``.
        double_quant: also quantize the per-block scales (8-bit, blocks of 256).
        compute_dtype: dtype the 4-bit weights are de-quantized to for each matmul: ``auto``
            (bfloat16 where CUDA is available, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        upcast: ``norms``: 1-D parameters (norms, biases) and a classification head to float32;
            ``all``: every parameter that is not 4-bit, embeddings included (like PEFT's
            ``prepare_model_for_kbit_training``); ``none``: leave dtypes as loaded.
        gradient_checkpointing: recompute activations in the backward pass (and let the frozen
            embeddings' outputs require grad so checkpointed layers pass gradients on).
        merge_dtype: dtype of the model :meth:`merge` and :func:`merged_model` produce.
        init: how A and B start: ``kaiming`` or ``gaussian`` (as LoRA's); ``pissa``/``olora`` are
            refused: they move part of W into A and B, and a 4-bit W cannot take the residual
            exactly (PEFT refuses PiSSA on a quantized base too).
    """

    description = "QLoRA: LoRA on a 4-bit NF4 double-quantized frozen backbone (merges to 16-bit)"
    layer_type = QLoRALinear
    supports_sharding = False
    sharding_refusal = "bitsandbytes' 4-bit weights cannot be sharded (Lightning does not shard them either); DDP replicates them"

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        targets: list[str] | None = None,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: Literal["float32", "bfloat16", "float16", "compute"] = "float32",
        quantize: list[str] | None = None,
        quant_type: Literal["nf4", "fp4"] = "nf4",
        double_quant: bool = True,
        compute_dtype: str = "auto",
        upcast: Literal["norms", "all", "none"] = "norms",
        gradient_checkpointing: bool = True,
        merge_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        loraplus_lr_ratio: float | None = None,
        init: LoRAInit = "kaiming",
    ) -> None:
        super().__init__(r=r, alpha=alpha, targets=targets, dropout=dropout, rslora=rslora,
                         loraplus_lr_ratio=loraplus_lr_ratio, init=init)
        if init in BASE_CHANGING:
            raise InvalidArgument("init", f"{init} leaves the residual W - s·B·A in the base, which QLoRA stores in 4 bits "
                                  "(not exactly); use kaiming or gaussian, or LoRA on the full-precision base")
        checks = {
            "dtype": (dtype, ("float32", "bfloat16", "float16", "compute")),
            "quant_type": (quant_type, ("nf4", "fp4")),
            "compute_dtype": (compute_dtype, COMPUTE_DTYPES),
            "upcast": (upcast, ("norms", "all", "none")),
            "merge_dtype": (merge_dtype, ("bfloat16", "float16", "float32")),
        }
        for field, (value, allowed) in checks.items():
            one_of(value, allowed, field)
        self.dtype = dtype
        self.quantize = quantize
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.upcast = upcast
        self.gradient_checkpointing = gradient_checkpointing
        self.merge_dtype = merge_dtype

    # -- attach ---------------------------------------------------------------------------

    def target_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        targets = [ALL_LINEAR] if self.targets is None else self.targets
        return find_modules(model, targets, field="targets")

    def _check_backbone(self, model: nn.Module) -> torch.device:
        already = [n for n, m in model.named_modules() if is_quantized_layer(m)]
        if already or getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
            raise QuantizationError(
                f"model.backbone: {type(model).__name__} is already quantized "
                f"({', '.join(already[:3]) or 'hf_quantizer set'}); QLoRA quantizes a full-precision "
                "backbone itself: load it unquantized"
            )
        devices = {p.device for p in model.parameters()}
        if len(devices) != 1:
            raise QuantizationError(f"model.backbone: its weights are spread over {sorted(map(str, devices))}")
        device = next(iter(devices))
        if device.type == "meta":
            raise QuantizationError("model.backbone: the weights are on the meta device (not loaded); nothing to quantize")
        return device

    def attach(self, model: nn.Module) -> None:
        compute = resolve_compute_dtype(self.compute_dtype)
        device = self._check_backbone(model)
        if device.type == "cpu" and compute == torch.float16:
            warnings.warn(
                "QLoRA compute_dtype: float16 4-bit matmuls are very slow on CPU (no "
                "float16 GEMM; ~30x slower than bfloat16 measured here); prefer float32 or bfloat16",
                UserWarning,
                stacklevel=2,
            )
        probe(device, self.quant_type, compute)

        # 1. quantize: every chosen Linear (never the task head) -> bnb Linear4bit
        field = "quantize"
        patterns = [ALL_LINEAR] if self.quantize is None else self.quantize
        quantized = [name for name, _ in find_modules(model, patterns, field=field)]
        for name in quantized:  # one layer at a time: each full-precision weight is freed when replaced
            layer = model.get_submodule(name)
            set_submodule(model, name, quantize_linear(layer, self.quant_type, self.double_quant, compute))
            del layer
            self.record(name, self._quantization())

        # 2. prepare for k-bit training
        self._upcast(model)
        if self.gradient_checkpointing:
            self._enable_checkpointing(model)

        # 3. LoRA on the targets (4-bit or not): fw_lora's attach, with QLoRA's layer and dtypes
        self.__dict__["_quantized"], self.__dict__["_compute"] = set(quantized), compute
        super().attach(model)

    def _quantization(self) -> str:
        return f"{self.quant_type.upper()} 4-bit{' (double quant)' if self.double_quant else ''}"

    def adapter_dtype(self, layer: nn.Module) -> torch.dtype:
        return self.__dict__["_compute"] if self.dtype == "compute" else DTYPES[self.dtype]

    def on_wrapped(self, name: str, wrapped: LoRALinear) -> None:
        wrapped.merge_dtype = DTYPES[self.merge_dtype]
        added = wrapped.lora_A.numel() + wrapped.lora_B.numel()
        quantized = f"{self._quantization()} + " if name in self.__dict__["_quantized"] else ""
        self.record(name, f"{quantized}LoRA r={self.r} (+{added:,})")

    def _upcast(self, model: nn.Module) -> None:
        if self.upcast == "none":
            return
        heads = head_module_names(model)
        out_embedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        small_heads = [h for h in heads if model.get_submodule(h) is not out_embedding]
        for name, param in model.named_parameters():
            if not param.is_floating_point() or param.dtype == torch.float32 or type(param).__name__ == "Params4bit":
                continue
            in_small_head = any(name.startswith(h + ".") for h in small_heads)
            if self.upcast == "all" or param.ndim <= 1 or in_small_head:
                param.data = param.data.float()
        # A Linear still in 16 bits (an output embedding, a layer left unquantized) may now get
        # float32 activations from an upcast norm: cast its input, as autocast would.
        for module in model.modules():
            if isinstance(module, linear_types()) and not is_4bit(module) and module.weight.dtype != torch.float32:
                if getattr(module, "fw_cast_input", None) is None:
                    module.fw_cast_input = module.register_forward_pre_hook(_cast_input_to_weight_dtype)

    @staticmethod
    def _enable_checkpointing(model: nn.Module) -> None:
        if not getattr(model, "supports_gradient_checkpointing", False):
            warnings.warn(
                f"QLoRA gradient_checkpointing: {type(model).__name__} does not support "
                "gradient checkpointing; training without it",
                UserWarning,
                stacklevel=3,
            )
            return
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # pragma: no cover - older transformers
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # the frozen embeddings' outputs must require grad for (reentrant) checkpointed layers to
        # pass gradients back; transformers does this for input_ids models, fw makes sure
        if hasattr(model, "enable_input_require_grads") and not getattr(model, "_require_grads_hooks", None):
            model.enable_input_require_grads()

    # -- merging --------------------------------------------------------------------------

    def merge(self, model: nn.Module) -> None:
        """De-quantize every adapted 4-bit layer, fold ``scaling·B·A`` into it and cast the whole
        model to ``merge_dtype``: a 16-bit model in place (LoRA modules kept, marked merged).

        The 4-bit codes are dropped, so :meth:`unmerge` cannot undo this; rebuild from the
        recipe and the adapter checkpoint instead. Merging back into 4 bits is not offered: it
        would round the update away.
        """
        super().merge(model)
        _dequantize_rest(model)
        model.to(DTYPES[self.merge_dtype])

    def unload(self, model: nn.Module) -> nn.Module:
        """:func:`merged_model` in this method's ``merge_dtype``."""
        return merged_model(model, DTYPES[self.merge_dtype])

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        """LoRA's A and B, to load on the 16-bit base (PEFT's LoRA); the note says how to
        reproduce the 4-bit base the adapter was trained on."""
        adapter = super().to_peft(model)
        adapter.notes.append(
            f"trained as QLoRA on a {self.quant_type.upper()} 4-bit base (double quantization: "
            f"{str(self.double_quant).lower()}); exported as LoRA for the 16-bit base. To evaluate it as trained, load "
            f"the base with transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='{self.quant_type}', "
            f"bnb_4bit_use_double_quant={self.double_quant}) and skip the task head (llm_int8_skip_modules)"
        )
        return adapter


def _cast_input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    if args and torch.is_tensor(args[0]) and args[0].is_floating_point() and args[0].dtype != module.weight.dtype:
        return (args[0].to(module.weight.dtype), *args[1:])
    return args


def _dequantize_rest(model: nn.Module) -> None:
    """Replace 4-bit layers outside LoRA (``quantize`` wider than ``targets``) by plain ones."""
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            set_submodule(model, name, to_plain(module, dtype=torch.float32))


def merged_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The QLoRA model as a plain transformers model in ``dtype``, the LoRA delta folded in.

    Works in place (returns ``model``, no second copy): every adapted 4-bit layer is
    de-quantized, gets ``scaling·B·A`` added in float32 and becomes an ``nn.Linear`` (or
    ``Conv1D``) again; other 4-bit layers are de-quantized; LoRA wrappers, fw's input-cast
    hooks, gradient checkpointing and input-gradient hooks are removed. The result has the
    state-dict keys of the architecture itself, so ``save_pretrained`` writes a model any
    transformers user can load.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            if isinstance(module, QLoRALinear):
                module.merge_dtype = torch.float32  # cast once, at the end
            module.merge()
            set_submodule(model, name, module.base_layer)
    _dequantize_rest(model)
    for module in model.modules():
        handle = getattr(module, "fw_cast_input", None)
        if handle is not None:
            handle.remove()
            del module.fw_cast_input
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):  # pragma: no cover - older transformers
        model.gradient_checkpointing_disable()
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
        model.disable_input_require_grads()
    return model.to(dtype)


__all__ = ["COMPUTE_DTYPES", "QLoRA", "QLoRALinear", "QuantizationError", "merged_model", "resolve_compute_dtype"]
