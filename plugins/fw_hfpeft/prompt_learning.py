"""Hugging Face PEFT's prompt-learning methods (prompt tuning, P-tuning, prefix tuning), run by
PEFT's own ``PeftModel.forward`` inside fw's training loop.

PEFT does not inject these into layers: a ``PeftModel`` wraps the backbone and, on every
call, builds the virtual tokens (or the prefix key/values) and calls the backbone with them.
fw's tasks call the backbone itself, so attaching here

1. wraps the backbone in PEFT's ``PeftModelForFeatureExtraction`` (the task-agnostic wrapper:
   virtual tokens, extended attention mask, prefix cache; no head of its own);
2. registers PEFT's prompt encoder in the backbone as ``peft_prompt_encoder`` (so fw's
   optimizer, checkpoints and parameter counts see it);
3. sends the backbone's calls through the wrapper: the backbone's ``forward`` becomes a
   :class:`_ThroughPeft`, which hands an outside call to the ``PeftModel`` and the
   ``PeftModel``'s own inner call to the original ``forward``.

What trains and runs is PEFT's code; fw only routes the call. A benchmark reference for
sequence-classification backbones (fw's ``prompt``, ``ptuning`` and ``prefix`` cover every
task): token-level logits would still hold PEFT's virtual positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from framework.method import PeftMethod, check_state_dict, copy_parameters
from framework.validation import InvalidArgument, one_of

#: where PEFT's prompt encoder is registered in the backbone
MODULE_NAME = "peft_prompt_encoder"
#: PEFT's saved prompt in the stored state dict
STORED_KEY = f"{MODULE_NAME}.prompt_embeddings"


class _ThroughPeft:
    """The backbone's ``forward`` while a PEFT prompt-learning wrapper is attached."""

    def __init__(self, peft_model: nn.Module, original: Any) -> None:
        self.peft_model = peft_model
        self.original = original
        self.inside = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.inside:  # PEFT calling the backbone with the virtual tokens in place
            return self.original(*args, **kwargs)
        self.inside = True
        try:
            return self.peft_model(*args, **kwargs)
        finally:
            self.inside = False


class _PromptLearning(PeftMethod):
    """Common part: wrap, register the encoder, route the calls; store what PEFT saves."""

    def peft_config(self, model: nn.Module) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        try:
            from peft import PeftModelForFeatureExtraction
        except ImportError as e:
            raise ImportError(f"{type(self).__name__} needs Hugging Face PEFT: pip install peft") from e
        if not type(model).__name__.endswith("ForSequenceClassification"):
            raise InvalidArgument(
                "", f"{type(self).__name__} is a benchmark reference for sequence classification; "
                f"got a {type(model).__name__}. Use fw's own method (prompt, ptuning, prefix) for other tasks"
            )
        if hasattr(model, MODULE_NAME):
            raise InvalidArgument("", f"the model already has a '{MODULE_NAME}'; attach one PEFT prompt method only")
        peft_model = PeftModelForFeatureExtraction(model, self.peft_config(model))
        model.add_module(MODULE_NAME, peft_model.prompt_encoder)
        model.forward = _ThroughPeft(peft_model, model.forward)
        added = sum(p.numel() for p in peft_model.prompt_encoder.parameters())
        stored = self._saved_prompt(model).numel()
        self.record(MODULE_NAME, f"PEFT {type(self).__name__}: {self.num_virtual_tokens} virtual tokens "
                                 f"(+{added:,} trained, {stored:,} stored)")

    @staticmethod
    def _peft_model(model: nn.Module) -> Any:
        forward = model.forward
        if not isinstance(forward, _ThroughPeft):
            raise RuntimeError("the model has no PEFT prompt-learning wrapper attached")
        return forward.peft_model

    def _saved_prompt(self, model: nn.Module) -> torch.Tensor:
        """What PEFT's ``save_pretrained`` keeps: the encoder's output for the virtual tokens."""
        peft_model = self._peft_model(model)
        with torch.no_grad():
            return peft_model.get_prompt_embedding_to_save(peft_model.active_adapter)

    def stored_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """PEFT's saved prompt (``prompt_embeddings``) plus the trainable head."""
        prefix = MODULE_NAME + "."
        stored = {n: t for n, t in self.trainable_state_dict(model).items() if not n.startswith(prefix)}
        loaded = self.__dict__.get("_loaded_prompt")
        stored[STORED_KEY] = loaded if loaded is not None else self._saved_prompt(model)
        return stored

    def load_stored_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Serve a stored prompt as PEFT does after ``from_pretrained``: inference mode, the
        saved tensor as the encoder's embedding table (no MLP or LSTM in the way)."""
        if strict:
            check_state_dict(self.stored_state_dict(model), state_dict, type(self).__name__)
        state = dict(state_dict)
        prompt = state.pop(STORED_KEY).detach()
        peft_model = self._peft_model(model)
        adapter = peft_model.active_adapter
        encoder = peft_model.prompt_encoder[adapter]
        encoder.embedding = nn.Embedding.from_pretrained(prompt.to(encoder.embedding.weight.device).clone(), freeze=True)
        encoder.requires_grad_(False)
        peft_model.peft_config[adapter].inference_mode = True
        self.__dict__["_loaded_prompt"] = prompt
        copy_parameters(model, state, type(self).__name__)


class PeftPromptTuning(_PromptLearning):
    """Hugging Face PEFT's prompt tuning (for comparison with fw's ``prompt``).

    Args:
        num_virtual_tokens: length of the soft prompt.
        init: ``vocab`` (PEFT's SAMPLE_VOCAB, as fw's default) or ``random``.
    """

    description = "Hugging Face PEFT's prompt tuning, run by PeftModel (benchmark reference)"

    def __init__(self, num_virtual_tokens: int = 20, init: str = "vocab") -> None:
        one_of(init, ("vocab", "random"), "init")
        self.num_virtual_tokens, self.init = num_virtual_tokens, init

    def peft_config(self, model: nn.Module) -> Any:
        from peft import PromptTuningConfig, PromptTuningInit

        init = PromptTuningInit.SAMPLE_VOCAB if self.init == "vocab" else PromptTuningInit.RANDOM
        return PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=self.num_virtual_tokens,
                                  prompt_tuning_init=init)


class PeftPTuning(_PromptLearning):
    """Hugging Face PEFT's P-tuning (for comparison with fw's ``ptuning``). PEFT's MLP encoder
    has three linear layers (fw's two, as Liu et al.'s head after the LSTM).

    Args:
        num_virtual_tokens: length of the prompt.
        encoder: ``mlp`` or ``lstm``.
        encoder_hidden_size: the encoder's width (None: the backbone's hidden size).
    """

    description = "Hugging Face PEFT's P-tuning, run by PeftModel (benchmark reference)"

    def __init__(self, num_virtual_tokens: int = 20, encoder: str = "mlp", encoder_hidden_size: int | None = None) -> None:
        one_of(encoder, ("mlp", "lstm"), "encoder")
        self.num_virtual_tokens, self.encoder, self.encoder_hidden_size = num_virtual_tokens, encoder, encoder_hidden_size

    def peft_config(self, model: nn.Module) -> Any:
        from peft import PromptEncoderConfig

        hidden = model.get_input_embeddings().weight.shape[1]
        return PromptEncoderConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=self.num_virtual_tokens,
                                   encoder_reparameterization_type=self.encoder.upper(),
                                   encoder_hidden_size=self.encoder_hidden_size or hidden)


class PeftPrefixTuning(_PromptLearning):
    """Hugging Face PEFT's prefix tuning (for comparison with fw's ``prefix``).

    Args:
        prefix_length: prefix positions per layer.
        reparameterize: train through PEFT's MLP (``prefix_projection``).
        bottleneck: the MLP's hidden width (PEFT's ``encoder_hidden_size``).
    """

    description = "Hugging Face PEFT's prefix tuning, run by PeftModel (benchmark reference)"

    def __init__(self, prefix_length: int = 30, reparameterize: bool = True, bottleneck: int = 512) -> None:
        self.prefix_length, self.reparameterize, self.bottleneck = prefix_length, reparameterize, bottleneck

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix_length

    def peft_config(self, model: nn.Module) -> Any:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=self.prefix_length,
                                  prefix_projection=self.reparameterize, encoder_hidden_size=self.bottleneck)
