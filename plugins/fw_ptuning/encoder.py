"""The P-tuning prompt encoder: virtual-token embeddings produced by an MLP or a bi-LSTM + MLP."""

from __future__ import annotations

import torch
from torch import nn


class PromptEncoder(nn.Module):
    """``forward()`` -> the ``(P, hidden)`` virtual-token embeddings.

    ``P`` trainable input embeddings go through

    - ``mlp``: Linear(hidden, h) -> ReLU -> Linear(h, hidden), or
    - ``lstm``: a bidirectional LSTM (``num_layers``, ``h`` units per direction) and then
      Linear(2h, h) -> ReLU -> Linear(h, hidden) (Liu et al. 2021).

    The encoder couples the virtual tokens during training. After training its output is
    all that inference needs: :meth:`use_stored` replaces the computation by a fixed tensor.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        hidden_size: int,
        kind: str = "mlp",
        num_layers: int = 2,
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("mlp", "lstm"):
            raise ValueError(f"unknown prompt encoder {kind!r}")
        self.num_virtual_tokens = num_virtual_tokens
        self.kind = kind
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device)
        mlp_in = token_dim
        if kind == "lstm":
            self.lstm = nn.LSTM(
                token_dim, hidden_size, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
                bidirectional=True, batch_first=True, device=device,
            )
            mlp_in = 2 * hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(mlp_in, hidden_size, device=device), nn.ReLU(), nn.Linear(hidden_size, token_dim, device=device)
        )
        self.stored: torch.Tensor | None
        self.register_buffer("stored", None, persistent=False)  # set by use_stored

    def forward(self) -> torch.Tensor:
        if self.stored is not None:
            return self.stored
        x = self.embedding.weight
        if self.kind == "lstm":
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp(x)

    @torch.no_grad()
    def use_stored(self, embeddings: torch.Tensor) -> None:
        """Serve ``embeddings`` (a stored encoder output) instead of computing them (inference)."""
        if embeddings.shape != (self.num_virtual_tokens, self.embedding.embedding_dim):
            raise ValueError(
                f"stored prompt embeddings have shape {tuple(embeddings.shape)}, expected "
                f"{(self.num_virtual_tokens, self.embedding.embedding_dim)}"
            )
        self.stored = embeddings.detach().to(self.embedding.weight.device, torch.float32).clone()

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, kind={self.kind}"
