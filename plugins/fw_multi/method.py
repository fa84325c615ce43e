"""Several named adapters on one frozen backbone, and batches that mix them.

A recipe names each adapter and gives its method as a recipe's method::

    method:
      class_path: multi
      init_args:
        adapters:
          sst:  {class_path: lora, init_args: {r: 8}}
          news: {class_path: ia3}
        active: [sst]        # applied when a batch says nothing (default: the first adapter)
        column: adapter      # the batch column that routes each example (default: adapter)

Each adapter's method attaches on its own (same targets as alone, same initialisation); its
wrappers are then collected into one :class:`~fw_multi.layer.MultiAdapterLayer` per target,
beside the other adapters' wrappers of that layer. Methods that wrap layers work (LoRA,
IA³, VeRA, serial bottleneck adapters, ...); so do prompt tuning and P-tuning, whose sources
live in ``prompt_encoder.<adapter>`` and whose virtual tokens are gathered per example
(:mod:`fw_multi.prompts`: one ``num_virtual_tokens`` for all of them; rows without a prompt
adapter get masked-out filler positions that leave their outputs unchanged). Other methods
that add modules or inputs (prefix tuning, BitFit, Fisher masks, parallel adapters) are
refused.

**Routing.** A batch column ``adapter`` (adapter names, ``__base__`` for the base model, or
indices into the adapter list with -1 for the base) is taken out of the batch by the core
(:attr:`PeftMethod.routing_column`) and handed to :meth:`MultiAdapter.routed` around the
forward call; outside fw, ``model(..., adapter_names=[...])`` routes a call the same way (as
Hugging Face PEFT's mixed-batch inference does), and ``with method.routed(model, names):``
too. Without routing, the :attr:`active` adapters apply to every example.

**Weights.** Training checkpoints hold every adapter (one model). Each adapter is also saved
on its own in fw's adapter format, or PEFT's where its method has one
(:meth:`MultiAdapter.save_adapter`), named exactly as its method alone names them, so a
saved adapter loads into a single-method run, and :meth:`MultiAdapter.load_adapter` adds an
adapter read from an fw or PEFT folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from framework.errors import FieldError
from framework.forward_context import install as install_forward_context
from framework.method import ExportNotSupportedError, PeftAdapter, PeftMethod, check_state_dict, copy_parameters
from framework.targeting import head_module_names, set_submodule
from framework.validation import InvalidArgument
from fw_multi.layer import BASE, MultiAdapterLayer, Router
from fw_multi.prompts import RoutedVirtualTokens

#: run-time hooks multi does not forward to its adapters (a part overriding one is refused)
RUN_HOOKS = ("prepare", "on_after_backward", "loss_term", "on_after_optimizer_step", "method_state", "routed")
#: the keyword a direct model call routes with (Hugging Face PEFT's name for it)
CALL_KEYWORD = "adapter_names"
#: where the virtual-token adapters' sources live (``prompt_encoder.<adapter>.*``), and what
#: each alone names its source (``prompt_encoder.*``)
PROMPTS = "prompt_encoder"


def is_virtual_token_method(method: PeftMethod) -> bool:
    """Prompt tuning or P-tuning: virtual tokens in front of the input, from a source module."""
    from fw_prompt import PromptTuning
    from fw_ptuning import PTuning

    return isinstance(method, (PromptTuning, PTuning))


class MultiAdapter(PeftMethod):
    """Several named adapters on one backbone; a batch column routes each example to its adapter.

    Args:
        adapters: name -> method (each as a recipe's method: ``class_path`` + ``init_args``).
        active: the adapters applied when a batch carries no routing column (several: LoRA
            updates add up and IA³ scales multiply); None: the first adapter; []: none.
        column: the batch column naming each example's adapter (a name, ``__base__`` for the
            base model, or an index into ``adapters``, -1 for the base).
        head_classes: adapter -> the task head's outputs (class ids) it predicts: one head over
            the union of several tasks' label spaces acts as one head per adapter (the other
            outputs are masked to the dtype's lowest value on its examples, so they get no
            probability and no gradient). None: every adapter reads every output.
    """

    description = "Multi: several named adapters on one backbone; mixed-adapter batches route each example"

    def __init__(
        self,
        adapters: dict[str, PeftMethod],
        active: list[str] | None = None,
        column: str = "adapter",
        head_classes: dict[str, list[int]] | None = None,
    ) -> None:
        if not adapters:
            raise InvalidArgument("adapters", "expected at least one named adapter")
        for name, method in adapters.items():
            self._check_part(name, method)
        if not isinstance(column, str) or not column:
            raise InvalidArgument("column", f"expected a batch column name, got {column!r}")
        for name, classes in (head_classes or {}).items():
            if name not in adapters:
                raise InvalidArgument("head_classes", f"no adapter named {name!r}; adapters: {', '.join(adapters)}")
            if not classes or any(not isinstance(c, int) or c < 0 for c in classes):
                raise InvalidArgument(f"head_classes.{name}", f"expected a non-empty list of class ids >= 0, got {classes!r}")
        self.adapters = dict(adapters)
        self.head_classes = None if head_classes is None else {k: list(v) for k, v in head_classes.items()}
        self.column = column
        self.router = Router(list(self.adapters), [])
        self.set_active(active)

    @staticmethod
    def _check_part(name: Any, method: Any) -> None:
        if not isinstance(name, str) or not name or name == BASE or "." in name:
            raise InvalidArgument("adapters", f"adapter names must be non-empty, without '.', and not {BASE}; got {name!r}")
        if not isinstance(method, PeftMethod):
            raise InvalidArgument(f"adapters.{name}", f"expected a PeftMethod, got {type(method).__name__}")
        if isinstance(method, MultiAdapter):
            raise InvalidArgument(f"adapters.{name}", "a multi method cannot be one of multi's adapters")
        if not method.has_plain_checkpoints():
            raise InvalidArgument(
                f"adapters.{name}", f"{type(method).__name__} writes its own checkpoint format (its weights are not "
                "plain parameters), so it cannot be one of several named adapters; train it on its own"
            )
        hooks = [h for h in RUN_HOOKS if getattr(type(method), h, None) is not getattr(PeftMethod, h, None)]
        if is_virtual_token_method(method):  # multi runs their prepare (init: text) on their own view
            hooks = [h for h in hooks if h != "prepare"]
        if hooks:
            raise InvalidArgument(
                f"adapters.{name}", f"{type(method).__name__} takes part in the run through {hooks[0]}(), which multi "
                "does not hand to its adapters; train it on its own"
            )
        if getattr(method, "parallel", False) is True:
            raise InvalidArgument(
                f"adapters.{name}", f"{type(method).__name__} with parallel=true reads another module's input "
                "through a hook, so examples cannot be routed to it; use a serial adapter, LoRA or IA³"
            )

    # -- which adapters run -----------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def set_active(self, active: list[str] | str | None) -> None:
        """Apply ``active`` (one name, several, [] for none; None: the first adapter) to every
        example of batches that carry no routing column."""
        names = [self.names[0]] if active is None else [active] if isinstance(active, str) else list(active)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise InvalidArgument("active", f"unknown adapter {unknown[0]!r}; adapters: {', '.join(self.names)}")
        self.router.active = names
        self.active = None if active is None else names  # what the run's config records

    @property
    def num_virtual_tokens(self) -> int:
        """The virtual tokens its prompt adapters put in front of every row (0: none), as the
        data side asks of virtual-token methods (packing is refused with them)."""
        return max((int(m.num_virtual_tokens) for m in self.adapters.values() if is_virtual_token_method(m)), default=0)  # type: ignore[attr-defined]

    @property
    def active_adapters(self) -> list[str]:
        return list(self.router.active)

    @property
    def routing_column(self) -> str:  # type: ignore[override]
        return self.column

    @contextmanager
    def routed(self, model: nn.Module, values: Any) -> Iterator[None]:
        """Route example ``i`` of the forward calls inside the block to adapter ``values[i]``."""
        self._route(model, values)
        try:
            yield
        finally:
            self.router.clear()

    def _route(self, model: nn.Module, values: Any) -> None:
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing and torch.is_grad_enabled():
            raise FieldError(
                "model.gradient_checkpointing: multi's mixed-adapter batches cannot be trained with gradient checkpointing (the recomputed "
                "forward runs after the batch's routing ended); set model.gradient_checkpointing: false"
            )
        param = next(model.parameters(), None)
        self.router.route(self.router.ids(values, param.device if param is not None else None))

    # -- attaching --------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        self._install_call_keyword(model)
        for name, method in self.adapters.items():
            self._attach_one(model, name, method)
        if self.head_classes:
            self._install_head_mask(model)

    def layers(self, model: nn.Module) -> dict[str, MultiAdapterLayer]:
        return {n: m for n, m in model.named_modules() if isinstance(m, MultiAdapterLayer) and m.router is self.router}

    @staticmethod
    def prompts(model: nn.Module) -> nn.ModuleDict | None:
        """The virtual-token adapters' sources (adapter name -> module), None when there is none."""
        found = model._modules.get(PROMPTS)
        return found if isinstance(found, nn.ModuleDict) else None

    def _attach_prompt(self, model: nn.Module, name: str, method: PeftMethod) -> None:
        """A prompt-tuning or P-tuning adapter: its source joins ``model.prompt_encoder`` (a
        ModuleDict); one :class:`~fw_multi.prompts.RoutedVirtualTokens` serves them all."""
        from fw_prompt.inject import is_encoder_decoder

        p = int(method.num_virtual_tokens)  # type: ignore[attr-defined]
        if is_encoder_decoder(model):
            raise InvalidArgument(
                f"adapters.{name}", f"{type(method).__name__} inside multi needs a decoder-only or encoder-only "
                "backbone (on an encoder-decoder train it on its own)"
            )
        prompts = self.prompts(model)
        if prompts is None:
            if hasattr(model, PROMPTS):
                raise InvalidArgument(f"adapters.{name}", f"the model already has a '{PROMPTS}' of another method")
            prompts = nn.ModuleDict()
            model.add_module(PROMPTS, prompts)
            install_forward_context(model)
            RoutedVirtualTokens(prompts, self.router).install(model)
        others = {n: int(s.num_virtual_tokens) for n, s in prompts.items()}
        if others and set(others.values()) != {p}:
            first = next(iter(others))
            raise InvalidArgument(
                f"adapters.{name}.num_virtual_tokens", f"{p} here but {others[first]} for prompt adapter {first!r}: "
                "the prompt adapters of one multi need the same number of virtual tokens (a batch's rows share one length)"
            )
        try:
            source = method.virtual_token_source(model)  # type: ignore[attr-defined]
        except InvalidArgument as err:
            raise err.under(f"adapters.{name}") from err
        prompts[name] = source

    def _attach_one(self, model: nn.Module, name: str, method: PeftMethod) -> None:
        """Let ``method`` attach to the plain backbone, then move its wrappers into the
        target layers' :class:`MultiAdapterLayer` (created where missing)."""
        if is_virtual_token_method(method):
            self._attach_prompt(model, name, method)
            return
        layers = self.layers(model)
        prompts = self.prompts(model)
        if prompts is not None:  # out of reach of the method's targeting
            delattr(model, PROMPTS)
        for layer_name, layer in layers.items():
            set_submodule(model, layer_name, layer.base_layer)
        harvested: dict[str, nn.Module] = {}
        try:
            before = {id(p) for p in model.parameters() if p.requires_grad}
            try:
                method.attach(model)
            except InvalidArgument as err:
                raise err.under(f"adapters.{name}") from err
            for module_name in method.modified_modules:
                wrapper = model.get_submodule(module_name)
                base = getattr(wrapper, "base_layer", None)
                if not isinstance(base, nn.Module) or isinstance(base, MultiAdapterLayer):
                    raise InvalidArgument(
                        f"adapters.{name}", f"{type(method).__name__} changes '{module_name or type(model).__name__}' "
                        "without wrapping it (it adds modules or inputs, or trains the backbone's own weights), so examples "
                        "cannot be routed to it; "
                        "named adapters must wrap layers (LoRA, IA³, VeRA, serial bottleneck adapters)"
                    )
                set_submodule(model, module_name, base)
                harvested[module_name] = wrapper
            left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in before]
            if left:
                raise InvalidArgument(
                    f"adapters.{name}", f"{type(method).__name__} trains '{left[0]}' outside the layers it wraps, "
                    "which the other adapters would share; it cannot be one of several named adapters"
                )
        finally:
            for layer_name, layer in layers.items():
                set_submodule(model, layer_name, layer)
            if prompts is not None:
                model.add_module(PROMPTS, prompts)
        for module_name, wrapper in harvested.items():
            layer = layers.get(module_name)
            if layer is None:
                layer = MultiAdapterLayer(wrapper.base_layer, self.router)
                set_submodule(model, module_name, layer)
            layer.add(name, wrapper)

    def _install_call_keyword(self, model: nn.Module) -> None:
        """``model(..., adapter_names=[...])`` routes that call (Hugging Face PEFT's keyword)."""
        if getattr(model, "_fw_multi_keyword", False):
            return
        install_forward_context(model)  # its recording hook first, then routing, then virtual tokens
        routed_here: list[bool] = []

        def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
            if CALL_KEYWORD not in kwargs:
                return None
            self._route(module, kwargs.pop(CALL_KEYWORD))
            routed_here.append(True)
            return args, kwargs

        def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if routed_here:
                routed_here.pop()
                self.router.clear()

        model.register_forward_pre_hook(before, with_kwargs=True, prepend=True)
        model.register_forward_hook(after, with_kwargs=True, always_call=True)
        object.__setattr__(model, "_fw_multi_keyword", True)

    def _install_head_mask(self, model: nn.Module) -> None:
        """On each adapter's examples, the head outputs of other adapters' classes get the
        dtype's lowest value (:attr:`head_classes`)."""
        heads = [n for n in head_module_names(model) if n in dict(model.named_children())]
        if not heads:
            raise InvalidArgument("head_classes", f"{type(model).__name__} has no task head (classifier, score) to mask")

        def mask(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            allowed = self.allowed_classes(out.shape[-1], out.device)
            if allowed is None:
                return None
            allowed = allowed.view(allowed.shape[0], *([1] * (out.dim() - 2)), out.shape[-1])
            return out.masked_fill(~allowed, torch.finfo(out.dtype).min)

        model.get_submodule(heads[0]).register_forward_hook(mask)
        self.record(heads[0], "head outputs masked per adapter: " + ", ".join(
            f"{name} {classes}" for name, classes in (self.head_classes or {}).items()))

    def allowed_classes(self, num_classes: int, device: torch.device) -> torch.Tensor | None:
        """``(rows or 1, num_classes)``: which head outputs each example may read; None: all."""
        classes = self.head_classes or {}
        bad = [c for v in classes.values() for c in v if c >= num_classes]
        if bad:
            raise InvalidArgument("head_classes", f"class {bad[0]} is past the head's {num_classes} outputs")

        def row(names: list[str]) -> torch.Tensor:
            out = torch.zeros(num_classes, dtype=torch.bool, device=device)
            if not names or any(n not in classes for n in names):
                return ~out  # the base model, or an adapter without its own classes: every output
            for n in names:
                out[classes[n]] = True
            return out

        uniform = self.router.uniform()
        if uniform is not None:
            return row(uniform)[None]
        assert self.router.groups is not None and self.router.group_of_row is not None
        table = torch.stack([row([] if name is None else [name]) for name, _ in self.router.groups])
        return table[self.router.group_of_row]

    @property
    def modified_modules(self) -> dict[str, str]:
        out: dict[str, list[str]] = {}
        for name, method in self.adapters.items():
            for module_name, what in method.modified_modules.items():
                out.setdefault(module_name, []).append(f"{name}: {what}")
        for module_name, what in PeftMethod.modified_modules.fget(self).items():  # type: ignore[attr-defined]
            out.setdefault(module_name, []).append(what)
        return {k: "; ".join(v) for k, v in out.items()}

    def adapter(self, name: str) -> PeftMethod:
        if name not in self.adapters:
            raise KeyError(f"multi: no adapter named {name!r}; adapters: {', '.join(self.names)}")
        return self.adapters[name]

    # -- one adapter as its method alone sees it ----------------------------------------------

    @contextmanager
    def view(self, model: nn.Module, name: str) -> Iterator[PeftMethod]:
        """Inside the block ``model`` is the backbone with adapter ``name`` alone attached (its
        wrappers in place of the multi layers; the other adapters' layers show their base):
        the method's own hooks (stored form, PEFT form, loading) work on it unchanged."""
        method = self.adapter(name)
        layers = self.layers(model)
        prompts = self.prompts(model)
        try:
            for layer_name, layer in layers.items():
                set_submodule(model, layer_name, layer.adapters[name] if name in layer.adapters else layer.base_layer)
            if prompts is not None:  # the adapter's own source as prompt_encoder, or none
                delattr(model, PROMPTS)
                if name in prompts:
                    model.add_module(PROMPTS, prompts[name])
            yield method
        finally:
            for layer_name, layer in layers.items():
                set_submodule(model, layer_name, layer)
            if prompts is not None:
                if hasattr(model, PROMPTS):
                    delattr(model, PROMPTS)
                model.add_module(PROMPTS, prompts)

    def adapter_state_dict(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s stored form, named as its method alone names it (task head included
        when it trains)."""
        with self.view(model, name) as method:
            return method.stored_state_dict(model)

    @contextmanager
    def _as_single(self, module: Any, name: str) -> Iterator[PeftMethod]:
        """``module`` (a PeftModule) as a run of adapter ``name``'s method alone."""
        with self.view(module.model, name) as method:
            own = module.method
            module.method = method
            try:
                yield method
            finally:
                module.method = own

    def save_adapter(self, module: Any, name: str, directory: str | Path, format: str = "fw") -> Path:
        """Write adapter ``name`` of ``module`` (a PeftModule) as a single-method adapter folder:
        fw's format (``fw``) or Hugging Face PEFT's (``peft``, where the method has a PEFT form)."""
        from framework.formats.fw import write_fw_adapter
        from framework.formats.peft import write_peft_adapter

        if format not in ("fw", "peft"):
            raise ValueError(f"multi: format must be fw or peft, got {format!r}")
        with self._as_single(module, name):
            return (write_fw_adapter if format == "fw" else write_peft_adapter)(module, directory)

    def load_adapter(self, module: Any, name: str, path: str | Path) -> PeftMethod:
        """Read an fw or PEFT adapter folder into adapter ``name`` of ``module`` (a PeftModule):
        an existing adapter of the same method gets the weights; a new name attaches the
        folder's method first. A trained head in the folder is loaded into the model's head."""
        from framework.cli import build_method
        from framework.formats.fw import AdapterError
        from framework.formats.source import read_adapter

        adapter = read_adapter(path)
        if adapter.kind == "checkpoint":
            raise AdapterError(f"multi: {path} is a training checkpoint; load_adapter reads fw or PEFT adapter folders")
        config = adapter.method_config(None)
        if config is None:
            raise AdapterError(f"multi: {path} holds full fine-tuning, not an adapter")
        adapter._check_task(module)
        adapter._check_architecture(module)
        method = build_method(config)
        if name in self.adapters:
            if type(self.adapters[name]) is not type(method):
                raise AdapterError(
                    f"multi: {path} holds a {type(method).__name__} adapter but adapter {name!r} is a "
                    f"{type(self.adapters[name]).__name__}; load it under a new name"
                )
        else:
            self._check_part(name, method)
            self.adapters[name] = method
            self.router.names.append(name)
            try:
                self._attach_one(module.model, name, method)
            except Exception:
                del self.adapters[name]
                self.router.names.remove(name)
                raise
        heads = tuple(h + "." for h in module.head_names)
        head = {k: v for k, v in adapter.state.items() if k.startswith(heads)}
        rest = {k: v for k, v in adapter.state.items() if k not in head}
        with self.view(module.model, name) as own:
            if adapter.kind == "peft":
                rest = own.from_peft_weights(module.model, rest)
            expected = {k: v for k, v in own.stored_state_dict(module.model).items() if not k.startswith(heads)}
            try:
                check_state_dict(expected, rest, f"multi adapter {name!r}")
                own.load_stored_state_dict(module.model, rest, strict=False)
            except (KeyError, ValueError) as err:
                message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                raise AdapterError(f"{adapter.label}: {message}") from err
        if head:
            copy_parameters(module.model, head, f"multi adapter {name!r} (task head)")
        return self.adapters[name]

    def prepare(self, context: Any) -> None:
        """Each adapter's own preparation (prompt tuning's ``init: text``), on its view."""
        for name, method in self.adapters.items():
            if type(method).prepare is not PeftMethod.prepare:
                with self.view(context.model, name):
                    method.prepare(context)

    # -- forms this method has not -----------------------------------------------------------

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        raise ExportNotSupportedError(
            "multi: a PEFT adapter folder holds one adapter; save each named adapter on its own "
            "(MultiAdapter.save_adapter(module, name, folder, format='peft'))"
        )

    # -- hooks of the parts -------------------------------------------------------------------

    @property  # type: ignore[override]
    def supports_sharding(self) -> bool:
        return all(m.supports_sharding for m in self.adapters.values())

    @property  # type: ignore[override]
    def sharding_refusal(self) -> str:
        return next((f"adapters.{n}: {m.sharding_refusal}" for n, m in self.adapters.items() if not m.supports_sharding), "")

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """The adapters' own groups (e.g. LoRA+), each asked on its view; None when none asks."""
        groups: list[dict[str, Any]] = []
        for name in self.names:
            with self.view(model, name) as method:
                groups.extend(method.param_groups(model, lr) or [])
        if not groups:
            return None
        listed = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in listed]
        return [*groups, {"params": rest}] if rest else groups


__all__ = ["CALL_KEYWORD", "MultiAdapter"]
