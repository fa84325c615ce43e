"""Per-architecture module *names* for the roles methods target.

fw finds targets by name, and names differ across families (``query`` in BERT, ``q_proj`` in
Llama, ``c_attn`` in GPT-2). Plugins state their defaults as roles (``query``, ``value``,
``ffn_down``, ...) and this table turns a role into name patterns for the backbone's
``model_type``. A recipe can always bypass it by naming modules directly.

Roles:
  query, key, value   attention projections (fused ``qkv`` where the model fuses them)
  attn_out            attention output projection
  ffn_up              feed-forward input projection(s) (gate and up in gated MLPs)
  ffn_down            feed-forward output projection (its *input* is the inner activation)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from framework.validation import InvalidArgument

_BERT = {
    "query": ["attention.self.query"],
    "key": ["attention.self.key"],
    "value": ["attention.self.value"],
    "attn_out": ["attention.output.dense"],
    "ffn_up": ["intermediate.dense"],
    # a bare "output.dense" would also match attention.output.dense
    "ffn_down": [r"re:.*\.layer\.\d+\.output\.dense"],
}
_LLAMA = {
    "query": ["q_proj"],
    "key": ["k_proj"],
    "value": ["v_proj"],
    "attn_out": ["o_proj"],
    "ffn_up": ["gate_proj", "up_proj"],
    "ffn_down": ["down_proj"],
}
_GPT2 = {
    "query": ["attn.c_attn"],
    "key": ["attn.c_attn"],
    "value": ["attn.c_attn"],
    "attn_out": ["attn.c_proj"],
    "ffn_up": ["mlp.c_fc"],
    "ffn_down": ["mlp.c_proj"],
}
_NEOX = {
    "query": ["query_key_value"],
    "key": ["query_key_value"],
    "value": ["query_key_value"],
    "attn_out": ["attention.dense", "self_attention.dense"],
    "ffn_up": ["dense_h_to_4h"],
    "ffn_down": ["dense_4h_to_h"],
}

# encoder-decoders: the names cover encoder self-attention, decoder self-attention and
# cross-attention alike (T5: SelfAttention / EncDecAttention; BART: self_attn / encoder_attn)
_T5 = {
    "query": ["SelfAttention.q", "EncDecAttention.q"],
    "key": ["SelfAttention.k", "EncDecAttention.k"],
    "value": ["SelfAttention.v", "EncDecAttention.v"],
    "attn_out": ["SelfAttention.o", "EncDecAttention.o"],
    "ffn_up": ["DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1"],
    "ffn_down": ["DenseReluDense.wo"],
}
_BART = {
    "query": ["q_proj"],
    "key": ["k_proj"],
    "value": ["v_proj"],
    "attn_out": ["self_attn.out_proj", "encoder_attn.out_proj"],
    "ffn_up": ["fc1"],
    "ffn_down": ["fc2"],
}

ROLES: dict[str, dict[str, list[str]]] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "megatron-bert"], _BERT),
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "mixtral", "olmo", "olmo2"], _LLAMA),
    "gpt2": _GPT2,
    **dict.fromkeys(["gpt_neox", "bloom", "falcon"], _NEOX),
    "deberta-v2": {
        **_BERT,
        "query": ["attention.self.query_proj"],
        "key": ["attention.self.key_proj"],
        "value": ["attention.self.value_proj"],
    },
    "distilbert": {
        "query": ["q_lin"],
        "key": ["k_lin"],
        "value": ["v_lin"],
        "attn_out": ["out_lin"],
        "ffn_up": ["ffn.lin1"],
        "ffn_down": ["ffn.lin2"],
    },
    **dict.fromkeys(["t5", "mt5", "umt5"], _T5),
    **dict.fromkeys(["bart", "mbart", "marian", "pegasus"], _BART),
    "opt": {
        "query": ["q_proj"],
        "key": ["k_proj"],
        "value": ["v_proj"],
        "attn_out": ["self_attn.out_proj"],
        "ffn_up": ["fc1"],
        "ffn_down": ["fc2"],
    },
    "phi": {
        "query": ["q_proj"],
        "key": ["k_proj"],
        "value": ["v_proj"],
        "attn_out": ["self_attn.dense"],
        "ffn_up": ["mlp.fc1"],
        "ffn_down": ["mlp.fc2"],
    },
}


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def role_patterns(model: nn.Module, roles: Sequence[str], field: str = "targets") -> list[str]:
    """Name patterns for ``roles`` on this backbone's architecture.

    Raises an :class:`InvalidArgument` naming ``field`` (the method's argument) when the architecture is not in the table, so the
    user knows to list module names explicitly.
    """
    mtype = model_type(model)
    table = ROLES.get(mtype)
    if table is None:
        raise InvalidArgument(
            field, f"fw has no default targets for model_type '{mtype or type(model).__name__}'. "
            f"Name the modules in the recipe (e.g. {field}: [q_proj, v_proj]); known architectures: "
            f"{', '.join(sorted(ROLES))}"
        )
    patterns: list[str] = []
    for role in roles:
        for pattern in table[role]:
            if pattern not in patterns:
                patterns.append(pattern)
    return patterns
