"""The prefix encoder: ``P`` positions of keys and values for every attention block (every
layer; an encoder-decoder's encoder, decoder self- and cross-attention blocks), optionally
through the reparameterization MLP of Li & Liang (2021)."""

from __future__ import annotations

import torch
from torch import nn

from fw_prefix.shapes import KVShape, Seq2SeqLayout


class PrefixEncoder(nn.Module):
    """Computes the flat prefix ``(P, blocks · 2 · kv_width)`` and splits it per block.

    With a ``bottleneck`` (reparameterization)::

        P × token_dim embedding ─► Linear(token_dim, bottleneck) ─► tanh ─► Linear(bottleneck, layers·2·kv_width)

    without one, the flat prefix itself is the trainable embedding. Column layout of the
    flat prefix (as in Hugging Face PEFT's ``prompt_embeddings``): block-major (a block is a
    layer; on an encoder-decoder, the blocks of ``layout``, :class:`fw_prefix.shapes.Seq2SeqLayout`),
    then key before value, then heads, then head dimension.

    After training the flat prefix is all inference needs: :meth:`use_stored` replaces the
    computation by a fixed tensor.
    """

    def __init__(
        self,
        shape: KVShape,
        prefix_length: int,
        token_dim: int,
        bottleneck: int | None = 512,
        device: torch.device | None = None,
        layout: Seq2SeqLayout | None = None,
    ) -> None:
        super().__init__()
        self.shape = shape
        self.layout = layout
        self.prefix_length = prefix_length
        self.bottleneck = bottleneck
        if bottleneck:
            self.embedding = nn.Embedding(prefix_length, token_dim, device=device)
            self.mlp: nn.Module | None = nn.Sequential(
                nn.Linear(token_dim, bottleneck, device=device),
                nn.Tanh(),
                nn.Linear(bottleneck, shape.flat_width, device=device),
            )
        else:
            self.embedding = nn.Embedding(prefix_length, shape.flat_width, device=device)
            self.mlp = None
        self.stored: torch.Tensor | None
        self.register_buffer("stored", None, persistent=False)  # set by use_stored

    def flat(self) -> torch.Tensor:
        """The prefix as stored after training: ``(P, blocks · 2 · kv_width)``."""
        if self.stored is not None:
            return self.stored
        weight = self.embedding.weight
        return self.mlp(weight) if self.mlp is not None else weight

    def forward(self) -> torch.Tensor:
        return self.flat()

    def key_values(
        self, batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, the prefix keys and values, each ``(batch, kv_heads, P, head_dim)``."""
        s = self.shape
        flat = self.flat().to(device=device, dtype=dtype)
        # (P, layers, 2, kv_heads, head_dim) -> (layers, 2, kv_heads, P, head_dim)
        kv = flat.view(self.prefix_length, s.num_layers, 2, s.num_kv_heads, s.head_dim).permute(1, 2, 3, 0, 4)
        size = (batch_size, s.num_kv_heads, self.prefix_length, s.head_dim)
        return [(kv[i, 0].expand(size), kv[i, 1].expand(size)) for i in range(s.num_layers)]

    @torch.no_grad()
    def use_stored(self, flat: torch.Tensor) -> None:
        """Serve ``flat`` (a stored prefix) instead of computing it (inference)."""
        expected = (self.prefix_length, self.shape.flat_width)
        if tuple(flat.shape) != expected:
            raise ValueError(f"stored prefix has shape {tuple(flat.shape)}, expected {expected}")
        self.stored = flat.detach().to(self.embedding.weight.device, torch.float32).clone()

    def extra_repr(self) -> str:
        s = self.shape
        mlp = f"bottleneck={self.bottleneck}" if self.mlp is not None else "no reparameterization"
        blocks = f"blocks={s.num_layers} ({self.layout.describe()})" if self.layout else f"layers={s.num_layers}"
        return f"prefix_length={self.prefix_length}, {blocks}, kv_heads={s.num_kv_heads}, head_dim={s.head_dim}, {mlp}"
