"""Language-model loss only where it is read: the LM head applied to labelled positions only,
the cross-entropy computed in chunks of positions.

The standard causal-LM loss projects every position onto the whole vocabulary (``B x T x V``
logits, upcast to float32 by the loss) though only the response tokens carry a label. Here:

- :func:`headless` runs the top-level model with its output embeddings (the LM head)
  replaced by an identity, so ``output.logits`` carries the final hidden states. Hooks on
  the top-level model (fw's prompt tuning and P-tuning drop their virtual positions from
  token-level logits after ``forward``) see a tensor of the same ``B x T`` shape and work
  unchanged;
- :func:`lm_head_of` returns the head when the architecture computes its logits as a plain
  ``lm_head(hidden)`` (no softcapping or scaling after it; BART's ``final_logits_bias`` is
  folded into the head's bias) and the head is a plain
  ``nn.Linear`` without forward hooks, with a full, unsharded weight; otherwise ``None`` (the caller falls back to
  the standard path);
- :class:`ChunkedCrossEntropy` computes the summed cross-entropy of the labelled positions
  ``chunk_size`` rows at a time: forward keeps only each row's log-sum-exp (float32, one
  number per position), backward recomputes each chunk's logits and produces the gradients of
  the hidden states, of the head's weight and of its bias. No float32 tensor larger than
  ``chunk_size x V`` is alive at any time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from framework.validation import positive_int

#: model types whose causal-LM forward is ``logits = lm_head(hidden_states)`` and nothing more
#: (checked against transformers' modeling code; Gemma 2/3, Cohere, Granite, ... transform the
#: logits after the head and take the standard path)
PLAIN_HEAD_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gemma",
    "smollm3", "olmo", "olmo2", "gpt2", "gpt_bigcode", "gpt_neox", "gptj", "opt", "bloom", "falcon",
    "stablelm", "starcoder2",
})
#: encoder-decoders whose forward is ``lm_head(decoder_hidden)`` (T5 scales the hidden states
#: before the head, which the headless forward keeps), possibly ``+ final_logits_bias`` (BART)
PLAIN_HEAD_SEQ2SEQ_TYPES = frozenset({"t5", "mt5", "bart"})
#: a buffer some encoder-decoders add to the logits after the head
LOGITS_BIAS = "final_logits_bias"
#: config fields that, when set, mean the logits are transformed after the head
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def check_loss_options(chunked_loss: Any, loss_chunk_size: Any) -> None:
    """The language-model tasks' ``chunked_loss`` (a bool) and ``loss_chunk_size`` (> 0)."""
    if not isinstance(chunked_loss, bool):
        raise ValueError(f"model.task.chunked_loss: expected true or false, got {chunked_loss!r}")
    positive_int(loss_chunk_size, "model.task.loss_chunk_size")


class HiddenStates(nn.Identity):
    """Stands in for the LM head during a headless forward: returns the hidden states."""


@dataclass
class LMHead:
    """What turns final hidden states into logits: ``linear(hidden) + logits_bias``."""

    linear: nn.Linear
    #: the module holding a ``final_logits_bias`` buffer added after the head (BART), or None
    bias_owner: nn.Module | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The head's bias plus the logits bias (either may be absent)."""
        bias = self.linear.bias
        if self.bias_owner is not None:
            extra = getattr(self.bias_owner, LOGITS_BIAS).reshape(-1).to(self.weight.dtype)
            bias = extra if bias is None else bias + extra
        return bias


def lm_head_of(model: nn.Module) -> LMHead | None:
    """The model's LM head if the loss may apply it itself (see the module docstring), else None."""
    config = getattr(model, "config", None)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    known = PLAIN_HEAD_SEQ2SEQ_TYPES if seq2seq else PLAIN_HEAD_MODEL_TYPES
    if getattr(config, "model_type", None) not in known:
        return None
    if any(getattr(config, field, None) is not None for field in LOGIT_TRANSFORMS):
        return None
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if type(head) is not nn.Linear:  # adapter-wrapped, quantised, ...: its forward is not F.linear
        return None
    if head._forward_hooks or head._forward_pre_hooks:  # something changes or reads its output
        return None
    weight = head.weight
    if type(weight.data) is not torch.Tensor or weight.dim() != 2 or weight.numel() == 0:  # sharded
        return None
    owners = [m for m in model.modules() if isinstance(m._buffers.get(LOGITS_BIAS), torch.Tensor)] if seq2seq else []
    return LMHead(head, owners[0] if owners else None)


def _parent_of(model: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    """The module that holds ``child`` as a direct submodule, and the attribute name."""
    for module in model.modules():
        for name, sub in module.named_children():
            if sub is child:
                return module, name
    raise ValueError(f"{type(child).__name__} is not a submodule of {type(model).__name__}")


@contextmanager
def headless(model: nn.Module, head: LMHead) -> Iterator[None]:
    """Within the block, ``model(...)`` returns the final hidden states as ``logits`` (the
    head is an identity, a logits bias is a broadcast zero)."""
    parent, name = _parent_of(model, head.linear)
    owner = head.bias_owner
    saved_bias = getattr(owner, LOGITS_BIAS) if owner is not None else None
    setattr(parent, name, HiddenStates())
    if owner is not None:
        setattr(owner, LOGITS_BIAS, saved_bias.new_zeros(1, 1))
    try:
        yield
    finally:
        setattr(parent, name, head.linear)
        if owner is not None:
            setattr(owner, LOGITS_BIAS, saved_bias)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The head's logits for a chunk of positions, in the model's dtype then float32 (as the
    standard path: ``lm_head(hidden)`` then ``.float()`` in the loss; float64 stays float64)."""
    return nn.functional.linear(hidden, weight, bias).to(_loss_dtype(hidden))


def _loss_dtype(hidden: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs."""
    return torch.promote_types(hidden.dtype, torch.float32)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``linear(hidden, weight, bias)`` against ``targets``, chunk by chunk.

    ``hidden``: ``(N, H)``; ``weight``: ``(V, H)``; ``bias``: ``(V,)`` or None; ``targets``:
    ``(N,)`` class indices (no ignore index: pass only the labelled positions). Returns a
    float32 scalar (float64 for float64 inputs).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=_loss_dtype(hidden), device=hidden.device)
        total = torch.zeros((), dtype=lse.dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = _chunk_logits(hidden[start:end], weight, bias)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[start:end, None]).squeeze(1)
            total += (lse[start:end] - picked).sum()
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        acc = lse.dtype  # the head's gradients accumulate over the chunks in float32 (at least)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            h = hidden[start:end]
            # d(lse - logit[target]) / d logits = softmax - onehot(target)
            grad = _chunk_logits(h, weight, bias).sub_(lse[start:end, None]).exp_()
            grad[torch.arange(end - start, device=grad.device), targets[start:end]] -= 1.0
            grad.mul_(grad_total)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad.to(hidden.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h.to(acc))
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            del grad
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
        )


def chunked_lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk_size: int
) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` (``linear(hidden, weight, bias)``) against ``labels`` over the positions whose label
    is not -100: what ``cross_entropy(head(hidden).flatten(0, 1).float(), labels.flatten(),
    ignore_index=-100)`` computes (NaN when no position is labelled), with the head applied to
    the labelled positions only, ``chunk_size`` at a time.

    ``hidden``: ``(..., H)``; ``labels``: the same leading shape.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"chunked_lm_loss: hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}"
        )
    keep = labels != -100
    targets = labels[keep]
    total = ChunkedCrossEntropy.apply(hidden[keep], weight, bias, targets, chunk_size)
    return total / targets.numel()


def token_loss(
    model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, chunk_size: int | None, shift: bool = False
) -> torch.Tensor:
    """Mean cross-entropy of the model's token predictions against ``labels`` (-100 ignored).

    ``shift``: position ``t`` predicts ``labels[:, t]`` of the next token (a causal LM, whose
    ``labels`` the caller has already cut to ``[:, 1:]``), so the last position is dropped.
    With ``chunk_size`` the head is applied to labelled positions only (:func:`chunked_lm_loss`)
    where :func:`lm_head_of` allows it; otherwise (or with ``None``) over the full logits.
    """
    head = lm_head_of(model) if chunk_size is not None else None
    if head is None:
        logits = model(**inputs).logits
        logits = logits[:, :-1] if shift else logits
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    with headless(model, head):
        hidden = model(**inputs).logits  # the final hidden states (B x T x H)
    hidden = hidden[:, :-1] if shift else hidden
    return chunked_lm_loss(hidden, labels, head.weight, head.bias, chunk_size)
