"""One target layer holding several named adapters, and the router that says which adapter
each example of the current forward call uses.

Every named adapter is its own method's wrapper (a ``LoRALinear``, an ``IA3Linear``, a
``SerialAdapter``, ...) around the *same* frozen base layer; :class:`MultiAdapterLayer` keeps
them side by side and computes, in one forward call,

- no routing (the method's ``active`` adapters for every example): none -> the base layer;
  one -> that adapter's own wrapper (bit for bit the single-method layer); several -> IA³
  input scales multiply the input, the base layer runs once, IA³ output scales multiply its
  output and LoRA updates are added (other wrappers cannot be stacked and refuse);
- routing (one adapter per example, :class:`Router`): the base layer runs once on the whole
  batch (its input scaled per example by the gathered IA³ input vectors), its output is
  scaled per example by the gathered IA³ output vectors, and each LoRA adapter present adds
  its update to its own rows (``index_add``). Other wrappers (VeRA, serial bottleneck
  adapters, LoRA variants with their own forward) run on their rows only and replace them.
  The work per layer grows with the number of distinct adapters in the batch, not with the
  batch size, and an adapter with no example in the batch gets no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from fw_ia3.layer import IA3Linear
from fw_lora.layer import LoRALinear
from torch import nn

from framework.errors import FieldError
from framework.layers import WrappedLayer

#: the routing value of an example that uses no adapter (the base model)
BASE = "__base__"


class Router:
    """The adapter choice of the current forward call, shared by every :class:`MultiAdapterLayer`.

    ``active``: the adapters applied to every example when no routing is set. ``groups``: set
    by :meth:`route` for a mixed batch: ``(adapter name or None for the base, row indices)``
    for every distinct value, and ``group_of_row``: each row's position in ``groups``.
    """

    def __init__(self, names: list[str], active: list[str]) -> None:
        self.names = list(names)
        self.active = list(active)
        self.groups: list[tuple[str | None, torch.Tensor]] | None = None
        self.group_of_row: torch.Tensor | None = None
        self.batch: int | None = None

    def ids(self, values: Any, device: torch.device | None = None) -> torch.Tensor:
        """Routing values (names, ``__base__``, indices into :attr:`names` with -1 for the
        base) as a long tensor of indices."""
        if isinstance(values, torch.Tensor):
            ids = values.to(torch.long).flatten()
        else:
            values = list(values)
            index = {name: i for i, name in enumerate(self.names)}
            out = []
            for value in values:
                if isinstance(value, str):
                    if value == BASE:
                        out.append(-1)
                    elif value in index:
                        out.append(index[value])
                    else:
                        raise FieldError(self._unknown(value))
                elif isinstance(value, int) and not isinstance(value, bool):
                    out.append(value)
                else:
                    raise FieldError(f"multi: a routing value must be an adapter name or index, got {value!r}")
            ids = torch.as_tensor(out, dtype=torch.long)
        bad = ids[(ids < -1) | (ids >= len(self.names))]
        if bad.numel():
            raise FieldError(self._unknown(int(bad[0])))
        return ids.to(device) if device is not None else ids

    def _unknown(self, value: Any) -> str:
        return (
            f"multi: unknown adapter {value!r} in the routing column; adapters: {', '.join(self.names)} "
            f"(indices 0..{len(self.names) - 1}), or {BASE} / -1 for the base model"
        )

    def route(self, ids: torch.Tensor) -> None:
        """Route row ``i`` of the next forward calls to adapter ``ids[i]`` (-1: the base)."""
        values, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        self.batch = int(ids.shape[0])
        self.group_of_row = inverse
        self.groups = [
            (None if int(v) < 0 else self.names[int(v)], torch.nonzero(inverse == g).squeeze(1))
            for g, v in enumerate(values.tolist())
        ]

    def clear(self) -> None:
        self.groups = self.group_of_row = self.batch = None

    def uniform(self) -> list[str] | None:
        """The adapters every example uses when that is one set (no routing, or a batch routed
        to a single value); None for a mixed batch."""
        if self.groups is None:
            return self.active
        if len(self.groups) == 1:
            name = self.groups[0][0]
            return [] if name is None else [name]
        return None


def is_plain_lora(layer: nn.Module) -> bool:
    """A LoRA wrapper whose output is exactly ``base(x) + lora_update(x)``."""
    return isinstance(layer, LoRALinear) and type(layer).forward is LoRALinear.forward and not layer.merged


def is_plain_ia3(layer: nn.Module) -> bool:
    return isinstance(layer, IA3Linear) and type(layer).forward is IA3Linear.forward and not layer.merged


class MultiAdapterLayer(WrappedLayer):
    """A frozen base layer with several named adapters (each its method's wrapper around it)."""

    def __init__(self, base_layer: nn.Module, router: Router) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        object.__setattr__(self, "router", router)  # shared, not a submodule

    def add(self, name: str, wrapper: nn.Module) -> None:
        if getattr(wrapper, "base_layer", None) is not self.base_layer:
            raise ValueError(f"multi: adapter '{name}' wraps another layer than this one's base")
        self.adapters[name] = wrapper

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        router: Router = self.router  # type: ignore[assignment]
        uniform = router.uniform()
        if uniform is not None:
            return self._stacked([n for n in uniform if n in self.adapters], x, *args, **kwargs)
        if args or kwargs:
            raise RuntimeError("multi: a mixed-adapter batch reached a layer called with more than its input tensor")
        if x.shape[0] != router.batch:
            raise RuntimeError(
                f"multi: the layer sees {x.shape[0]} rows but the batch routes {router.batch} examples; "
                "mixed-adapter batches need the layers to see the batch in their first dimension"
            )
        return self._routed(router, x)

    # -- every example alike ---------------------------------------------------------------

    def _stacked(self, names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if len(names) == 1:
            return self.adapters[names[0]](x, *args, **kwargs)
        wrappers = [self.adapters[n] for n in names]
        other = [n for n, w in zip(names, wrappers) if not (is_plain_lora(w) or is_plain_ia3(w))]
        if other:
            raise RuntimeError(
                f"multi: adapters {names} are active together, but {other[0]} ({type(self.adapters[other[0]]).__name__}) "
                "cannot be stacked with others on one layer (only LoRA and IA³ can); activate one at a time"
            )
        inputs = x
        for w in wrappers:
            if is_plain_ia3(w) and w.scale == "input":
                inputs = inputs * w.ia3_l.to(inputs.dtype)
        out = self.base_layer(inputs, *args, **kwargs)
        for w in wrappers:
            if is_plain_ia3(w) and w.scale == "output":
                out = out * w.ia3_l.to(out.dtype)
        for w in wrappers:
            if is_plain_lora(w):
                out = out + w.lora_update(x).to(out.dtype)
        return out

    # -- one adapter per example -----------------------------------------------------------

    def _routed(self, router: Router, x: torch.Tensor) -> torch.Tensor:
        assert router.groups is not None and router.group_of_row is not None
        lora, ia3_in, ia3_out, other = [], [], [], []
        for g, (name, rows) in enumerate(router.groups):
            w = self.adapters[name] if name is not None and name in self.adapters else None
            if w is None:
                continue
            if is_plain_lora(w):
                lora.append((w, rows))
            elif is_plain_ia3(w):
                (ia3_in if w.scale == "input" else ia3_out).append((g, w))
            else:
                other.append((w, rows))
        n_groups = len(router.groups)
        inputs = x
        if ia3_in:
            inputs = x * self._gathered(ia3_in, n_groups, router.group_of_row, x)
        out = self.base_layer(inputs)
        if ia3_out:
            out = out * self._gathered(ia3_out, n_groups, router.group_of_row, out)
        for w, rows in lora:
            out = out.index_add(0, rows, w.lora_update(x.index_select(0, rows)).to(out.dtype))
        for w, rows in other:
            out = out.index_copy(0, rows, w(x.index_select(0, rows)).to(out.dtype))
        return out

    @staticmethod
    def _gathered(found: list[tuple[int, IA3Linear]], n_groups: int, group_of_row: torch.Tensor,
                  like: torch.Tensor) -> torch.Tensor:
        """Each row's IA³ vector (ones for rows of other adapters), shaped to broadcast over ``like``."""
        size = found[0][1].ia3_l.shape[0]
        table = torch.cat([like.new_ones(1, size), *[w.ia3_l.to(like.dtype)[None] for _, w in found]])
        lookup = torch.zeros(n_groups, dtype=torch.long, device=group_of_row.device)
        lookup[torch.tensor([g for g, _ in found], device=lookup.device)] = torch.arange(
            1, len(found) + 1, device=lookup.device)
        scale = table[lookup[group_of_row]]  # (batch, size)
        return scale.view(scale.shape[0], *([1] * (like.dim() - 2)), size)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"


__all__ = ["BASE", "MultiAdapterLayer", "Router", "is_plain_ia3", "is_plain_lora"]
