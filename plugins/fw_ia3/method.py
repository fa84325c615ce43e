"""IA³: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (arXiv:2205.05638). Three learned vectors per layer rescale
activations element-wise; nothing else trains::

    attention:  K = (W_k x) ⊙ l_k        V = (W_v x) ⊙ l_v        (l_k, l_v: d_kv entries)
    feed-forward:  y = W_down ((act(W_up x)) ⊙ l_ff)                 (l_ff: d_ff entries)

The vectors start at ones (the model starts equal to the base). Per layer of BERT-base that
is 768 + 768 + 3072 = 4,608 parameters (55,296 for 12 layers). ``merge()`` folds each vector
into its weight: rows of W_k and W_v (and their biases), columns of W_down.

Defaults by architecture role: the key and value projections, and the feed-forward's down
(output) projection, whose *input* is the inner activation. (A bare ``output.dense`` on BERT
would also match ``attention.output.dense``; the role table uses a regex that does not.)
GPT-2 fuses q, k and v in ``c_attn``: there the whole fused output is scaled, as Hugging Face
PEFT does.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from framework.architectures import role_patterns
from framework.backbone import DTYPES
from framework.method import MergeableLayers, PeftMethod
from framework.targeting import find_modules, set_submodule
from fw_ia3.layer import IA3Linear

FIELD = "model.method.init_args"


class IA3(MergeableLayers, PeftMethod):
    """IA³: learned vectors rescaling keys, values and feed-forward inner activations (mergeable).

    Args:
        targets: modules whose *output* is rescaled (None: the architecture's key and value).
        feedforward_targets: modules whose *input* is rescaled (None: the feed-forward's down
            projection). Both lists take name patterns (suffix, glob, ``re:`` regex).
        dtype: dtype of the vectors (``base``: the base weight's dtype).
    """

    description = "IA³: learned vectors rescaling keys, values and feed-forward activations (mergeable)"
    layer_type = IA3Linear

    def __init__(
        self,
        targets: list[str] | None = None,
        feedforward_targets: list[str] | None = None,
        dtype: Literal["float32", "bfloat16", "float16", "base"] = "float32",
    ) -> None:
        if targets == [] and feedforward_targets == []:
            raise ValueError(f"{FIELD}.targets: both target lists are empty; IA³ would train nothing")
        self.targets = targets
        self.feedforward_targets = feedforward_targets
        self.dtype = dtype

    def _find(self, model: nn.Module, given: list[str] | None, roles: list[str], field: str) -> list[tuple[str, nn.Module]]:
        if given is not None:
            return find_modules(model, given, field=f"{FIELD}.{field}") if given else []
        return find_modules(model, role_patterns(model, roles, field=f"{FIELD}.{field}"), field=f"{FIELD}.{field}", require_each=False)

    def attach(self, model: nn.Module) -> None:
        dtype = None if self.dtype == "base" else DTYPES[self.dtype]
        scaled_out = self._find(model, self.targets, ["key", "value"], "targets")
        scaled_in = self._find(model, self.feedforward_targets, ["ffn_down"], "feedforward_targets")
        both = {n for n, _ in scaled_out} & {n for n, _ in scaled_in}
        if both:
            raise ValueError(
                f"{FIELD}.feedforward_targets: {sorted(both)[:3]} also match targets; a module is scaled "
                "either at its output (targets) or at its input (feedforward_targets)"
            )
        for scale, found in (("output", scaled_out), ("input", scaled_in)):
            for name, layer in found:
                wrapped = IA3Linear(layer, scale, dtype)
                set_submodule(model, name, wrapped)
                self.record(name, f"IA³ {scale} scale (+{wrapped.ia3_l.numel():,})")



__all__ = ["IA3"]
