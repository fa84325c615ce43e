"""The prompt-tuning table: ``P`` trainable virtual-token embeddings and their initialisations."""

from __future__ import annotations

import math

import torch
from torch import nn


class PromptEmbedding(nn.Module):
    """``num_virtual_tokens`` trainable embeddings of the backbone's width; ``forward()`` returns
    them as a ``(P, hidden)`` tensor.

    Initialisation (Lester et al. 2021 compare the three):

    - ``random``: normal with the standard deviation of the backbone's vocabulary embeddings
      (so the virtual tokens start at the scale the model expects);
    - ``vocab``: the embeddings of ``P`` tokens sampled uniformly from the vocabulary;
    - ``text``: the embeddings of a text's tokens (:meth:`init_from_token_ids`), repeated or
      cut to ``P`` tokens.
    """

    def __init__(self, num_virtual_tokens: int, word_embeddings: nn.Embedding, init: str = "vocab") -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        vocab = word_embeddings.weight
        self.embedding = nn.Embedding(num_virtual_tokens, vocab.shape[1], device=vocab.device, dtype=torch.float32)
        with torch.no_grad():
            if init == "random":
                self.embedding.weight.normal_(0.0, vocab.float().std().item())
            elif init in ("vocab", "text"):  # "text" is refined once a tokenizer is at hand
                ids = torch.randint(0, vocab.shape[0], (num_virtual_tokens,), device=vocab.device)
                self.embedding.weight.copy_(vocab[ids].float())
            else:
                raise ValueError(f"unknown prompt initialisation {init!r}")

    @torch.no_grad()
    def init_from_token_ids(self, token_ids: list[int], word_embeddings: nn.Embedding) -> None:
        """Copy the embeddings of ``token_ids`` (repeated or cut to ``P`` tokens)."""
        if not token_ids:
            raise ValueError("the initialisation text has no tokens")
        reps = math.ceil(self.num_virtual_tokens / len(token_ids))
        ids = torch.as_tensor((token_ids * reps)[: self.num_virtual_tokens], device=word_embeddings.weight.device)
        self.embedding.weight.copy_(word_embeddings.weight[ids].float())

    def forward(self) -> torch.Tensor:
        return self.embedding.weight

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, dim={self.embedding.embedding_dim}"
