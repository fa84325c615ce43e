"""MAM adapter: "Mix-And-Match" of He et al. 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning" (arXiv:2110.04366).

Their unified view finds prefix tuning best used on attention and a (scaled) parallel
adapter best used on the feed-forward block; MAM is the two together::

    attention:  keys/values  [ prefix (30 positions) | tokens ]      <- fw_prefix.PrefixTuning
    FFN:        y = FFN(x) + 4.0 · up(relu(down(x)))                 <- fw_adapters.Parallel
                (bottleneck = hidden / 2)

Both parts are the other plugins' own classes (:class:`fw_prefix.PrefixTuning` with a
reparameterization MLP of width 800, :class:`fw_adapters.Parallel` with reduction factor 2),
composed by :class:`fw_compose.Compose`. On a random-init BERT-base (12 layers, hidden 768,
FFN 3072) the trained method parameters decompose as:

    prefix:   embedding 30·768 = 23,040
              + Linear(768 → 800) 615,200 + Linear(800 → 12·2·768) 14,764,032  = 15,402,272
    adapters: 12 × (768·384 + 384 + 384·768 + 768 = 590,976)                  =  7,091,712
    total trained                                                             = 22,493,984

and a finished run stores the flat prefix (30 × 18,432 = 552,960) plus the adapters:
7,644,672. Neither part can be merged into the weights, so neither can MAM.
"""

from __future__ import annotations

from fw_adapters import Parallel
from fw_compose import Compose
from fw_prefix import PrefixTuning


class MAM(Compose):
    """MAM adapter: prefix tuning on attention + a scaled parallel adapter on the FFN.

    Args:
        prefix_length: prefix positions per layer.
        prefix_bottleneck: width of the prefix's reparameterization MLP.
        reduction_factor: FFN adapter bottleneck = hidden / reduction_factor.
        scaling: multiplies the parallel adapter's output.
    """

    description = "MAM adapter (He et al. 2022): prefix tuning on attention + parallel adapter on the FFN"

    def __init__(
        self, prefix_length: int = 30, prefix_bottleneck: int = 800, reduction_factor: float = 2.0, scaling: float = 4.0
    ) -> None:
        super().__init__([
            PrefixTuning(prefix_length=prefix_length, bottleneck=prefix_bottleneck),
            Parallel(placements=["ffn"], reduction_factor=reduction_factor, scaling=scaling),
        ])
        self.prefix_length = prefix_length
        self.prefix_bottleneck = prefix_bottleneck
        self.reduction_factor = reduction_factor
        self.scaling = scaling


__all__ = ["MAM"]
