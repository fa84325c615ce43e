"""Prefix tuning on encoder-decoders (T5, BART): the flat layout and its counts, the prefix
computed exactly as virtual tokens would be, padding, generation with the cache equal to the
full forward, gradients and training, parity with Hugging Face PEFT's SEQ_2_SEQ_LM prefix
both ways, and the refusals.

Training, round trips and generation of prefix, MAM and UniPELT on T5 and BART through the
Seq2SeqLM task are also in test_seq2seq.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import TINY_BART, TINY_BERT, TINY_T5, TOKENIZER, seq2seq_batch
from fw_prefix import STORED_KEY, PrefixTuning, add_prefix
from helpers import adam_losses

from framework.errors import RecipeError
from framework.method import ExportNotSupportedError
from framework.validation import InvalidArgument

BACKBONES = {"t5": TINY_T5, "bart": TINY_BART}
P = 3
KV = 32  # both tiny models: 4 heads x 8
#: (encoder_prefix, cross_prefix): Li & Liang's full layout, and PEFT's (decoder self-attention only)
FULL, PEFT_LAYOUT = (True, True), (False, False)


def recipe(arch: str, layout: tuple[bool, bool] = FULL, **args: Any) -> dict[str, Any]:
    encoder_prefix, cross_prefix = layout
    init = {"prefix_length": P, "bottleneck": 8, "encoder_prefix": encoder_prefix, "cross_prefix": cross_prefix, **args}
    return {
        "backbone": {"config": BACKBONES[arch], "tokenizer": TOKENIZER},
        "task": {"class_path": "Seq2SeqLM"},
        "method": {"class_path": "prefix", "init_args": init},
    }


def perturbed(module, scale: float = 0.5):
    """The module in eval mode, its prefix moved off its initialisation (seeded)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.model.prefix_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return module.eval()


def forward(model, batch: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
    decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_ids, **extra).logits


# -- layout and counts -----------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "layout", "blocks"), [
    ("t5", FULL, 2 + 2 * 2), ("bart", FULL, 2 + 2 * 2), ("t5", PEFT_LAYOUT, 2), ("t5", (True, False), 2 + 2),
    ("t5", (False, True), 2 * 2),
])
def test_stored_prefix_is_encoder_then_decoder_self_and_cross_blocks(build, arch, layout, blocks):
    """Per position: 2 encoder layers x (k, v) + 2 decoder layers x (self k, v, cross k, v), x kv width."""
    module = build(recipe(arch, layout))
    counts = module.param_counts()
    flat_width = blocks * 2 * KV
    assert counts.stored_params == P * flat_width
    assert counts.method_params == P * 32 + (32 * 8 + 8) + (8 * flat_width + flat_width)  # embedding + MLP
    assert module.method.stored_state_dict(module.model)[STORED_KEY].shape == (P, flat_width)
    assert module.method.modified_modules["prefix_encoder"].startswith(f"prefix tuning: 3 positions x {blocks} attention blocks (")
    flat = build(recipe(arch, layout, reparameterize=False)).param_counts()
    assert flat.method_params == flat.stored_params == P * flat_width


def test_t5_small_shape_counts_match_the_docstring():
    from fw_prefix import PrefixTuning
    from transformers import AutoModelForSeq2SeqLM, T5Config

    with torch.device("meta"):  # the shapes only
        model = AutoModelForSeq2SeqLM.from_config(T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8))
        method = PrefixTuning(prefix_length=30, bottleneck=512)
        method.attach(model)
    assert sum(p.numel() for p in model.prefix_encoder.parameters()) == 30 * 512 + (512 * 512 + 512) + (512 * 18_432 + 18_432) == 9_733_632
    assert model.prefix_encoder.shape.flat_width * 30 == 30 * (6 * 2 + 6 * 4) * 512 == 552_960
    assert method.modified_modules["prefix_encoder"] == (
        "prefix tuning: 30 positions x 18 attention blocks (encoder 6 + decoder self 6 + cross 6) x 2 x 512 "
        "(MLP bottleneck 512; +9,733,632 trained, 552,960 stored)"
    )


# -- what the prefix computes ------------------------------------------------------------------


def as_columns(states: torch.Tensor) -> torch.Tensor:
    """A cache layer's (1, heads, P, head_dim) keys or values as P rows of heads x head_dim."""
    return states[0].transpose(0, 1).reshape(states.shape[2], -1)


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_the_prefix_is_what_virtual_tokens_would_put_in_every_attention(arch):
    """With one layer per stack, a prefix equal to the keys and values of some tokens gives the
    outputs those tokens give as real positions: in the decoder, ``y`` in front of the decoder
    input (self-attention) and ``c`` in front of the encoder output (cross-attention); in T5's
    encoder, ``x`` behind tokens ``u`` (relative positions: the prefix sits at ``0 .. P-1``; BART's
    learned absolute positions would move the tokens, so its encoder is checked elsewhere).
    Masks cover a padded source row."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    fields = {k: v for k, v in BACKBONES[arch].items() if k != "model_type"}
    fields |= {"num_layers": 1, "num_decoder_layers": 1} if arch == "t5" else {"encoder_layers": 1, "decoder_layers": 1}
    torch.manual_seed(0)
    base = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(arch, **fields)).eval()
    model = copy.deepcopy(base)
    encoder_prefix = arch == "t5"
    prefix = add_prefix(model, P, bottleneck=None, encoder_prefix=encoder_prefix, cross_prefix=True)
    batch = seq2seq_batch()
    x, mask = batch["input_ids"], batch["attention_mask"]
    z = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    u, y = torch.randint(1000, 2000, (1, P)), torch.randint(1000, 2000, (1, P))
    c = torch.randn(1, P, base.config.d_model)
    ones = torch.ones(len(x), P, dtype=mask.dtype)
    with torch.no_grad():
        kv = base.get_decoder()(input_ids=y, encoder_hidden_states=c, use_cache=True).cache  # y's and c's keys, values
        self_kv, cross_kv = kv.self_attention_cache.layers[0], kv.cross_attention_cache.layers[0]
        columns = [as_columns(t) for t in (self_kv.keys, self_kv.values, cross_kv.keys, cross_kv.values)]
        if encoder_prefix:
            block = base.get_encoder().block[0].layer[0]
            hidden = block.layer_norm(base.get_input_embeddings()(u[0]))
            columns = [block.SelfAttention.k(hidden), block.SelfAttention.v(hidden), *columns]
        prefix.use_stored(torch.cat(columns, dim=1))  # the documented column order

        ours = model(input_ids=x, attention_mask=mask, decoder_input_ids=z).logits
        source = base.get_encoder()(input_ids=x, attention_mask=mask).last_hidden_state
        if encoder_prefix:
            encoded = model.get_encoder()(input_ids=x, attention_mask=mask).last_hidden_state
            expected = base.get_encoder()(input_ids=torch.cat([u.expand(len(x), -1), x], 1), attention_mask=torch.cat([ones, mask], 1))
            torch.testing.assert_close(encoded, expected.last_hidden_state[:, P:], rtol=0, atol=1e-5)
            source = encoded
        theirs = base(encoder_outputs=(torch.cat([c.expand(len(x), -1, -1), source], 1),),
                      attention_mask=torch.cat([ones, mask], 1), decoder_input_ids=torch.cat([y.expand(len(x), -1), z], 1)).logits
    torch.testing.assert_close(ours, theirs[:, P:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_padding_does_not_change_a_rows_outputs(build, arch):
    """Encoder and decoder padding: the mask columns the prefix adds are in front of the right
    ones (a misplaced column moves the logits by 1e-2 and more; 1e-4 is float32 noise at the
    logits' scale, ~10, across the padded and unpadded attention paths)."""
    module = perturbed(build(recipe(arch), seed=1))
    batch = seq2seq_batch()
    decoder_mask = (batch["labels"] != -100).long()
    with torch.no_grad():
        padded = forward(module.model, batch, decoder_attention_mask=decoder_mask)
        short = int(batch["attention_mask"][1].sum())
        alone = {"input_ids": batch["input_ids"][1:2, :short], "attention_mask": batch["attention_mask"][1:2, :short],
                 "labels": batch["labels"][1:2]}
        torch.testing.assert_close(forward(module.model, alone)[0], padded[1], rtol=0, atol=1e-4)
        target = int(decoder_mask[0].sum())  # row 0's target is padded: its real positions are unchanged
        first = {k: v[0:1] for k, v in batch.items()}
        first["labels"] = first["labels"][:, :target]
        torch.testing.assert_close(forward(module.model, first)[0], padded[0, :target], rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", list(BACKBONES))
@pytest.mark.parametrize("layout", [FULL, PEFT_LAYOUT], ids=["full", "peft-layout"])
def test_generation_with_the_cache_gives_the_full_forward_scores(build, arch, layout):
    """Greedy decoding (prefix in the marked cache, the cross prefix reused after step 1) has,
    at every step, the logits of the teacher-forced forward over the generated sequence; so
    does decoding without a cache (BART hands back the cache it was given even then)."""
    module = perturbed(build(recipe(arch, layout), seed=1))
    batch = seq2seq_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        out = module.model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=1, eos_token_id=None,
                                    output_logits=True, return_dict_in_generate=True)
        steps = torch.stack(out.logits, dim=1)
        full = module.model(**inputs, decoder_input_ids=out.sequences[:, :-1]).logits
        uncached = module.model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None, use_cache=False)
    torch.testing.assert_close(steps, full, rtol=1e-6, atol=1e-5)  # T5's logits reach ~10: float32 rounding
    assert torch.equal(out.sequences[:, 1:], full.argmax(-1))
    assert torch.equal(uncached, out.sequences)


# -- training ----------------------------------------------------------------------------------


def test_every_block_gets_a_gradient_and_the_t5_loss_falls(build):
    flat = build(recipe("t5", reparameterize=False))
    loss, _ = flat.task.step(flat.model, seq2seq_batch())
    loss.backward()
    grad = flat.model.prefix_encoder.embedding.weight.grad.view(P, 6, 2, KV)  # 6 blocks: enc 0, 1, (self, cross) x 2
    assert (grad.abs().sum(dim=(0, 3)) > 0).all()  # every block's keys and values

    module = build(recipe("t5"))
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    losses = adam_losses(module, seq2seq_batch(), steps=6)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in module.model.named_parameters() if n in frozen)


# -- Hugging Face PEFT -------------------------------------------------------------------------


def peft_twin(build, arch: str, config: dict[str, Any]):
    """PEFT's PeftModelForSeq2SeqLM on the same random backbone (seed 1), its prefix zero."""
    peft = pytest.importorskip("peft")
    base = build({k: v for k, v in recipe(arch).items() if k != "method"}, seed=1).model
    return peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", **config)).eval()


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_peft_computes_fws_logits_from_fws_exported_prefix(build, arch):
    """fw's export (num_layers = 2 x decoder layers, cross blocks zero) in PEFT's prompt encoder:
    PEFT's logits are fw's on padded sources, with and without a decoder mask."""
    module = perturbed(build(recipe(arch, PEFT_LAYOUT), seed=1))
    adapter = module.method.to_peft(module.model)
    assert adapter.config | {"num_layers": 4, "num_transformer_submodules": 2, "token_dim": KV} == adapter.config
    config = {k: v for k, v in adapter.config.items() if k not in ("peft_type", "prefix_projection", "encoder_hidden_size")}
    theirs = peft_twin(build, arch, config)
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(adapter.weights["prompt_embeddings"])
    batch = seq2seq_batch()
    with torch.no_grad():
        for decoder_mask in (None, (batch["labels"] != -100).long()):
            ours, expected = forward(module.model, batch, decoder_attention_mask=decoder_mask), forward(
                theirs, batch, decoder_attention_mask=decoder_mask)
            diff = (ours - expected).abs().max().item()
            print(f"max |fw - PEFT| logits, {arch}, decoder mask {decoder_mask is not None}: {diff:.3g}")
            assert diff <= 1e-5


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_a_peft_seq2seq_prefix_adapter_loads_into_fw_with_peft_logits(build, arch, tmp_path):
    """PEFT's own layout (num_layers = encoder layers: decoder layers 0 and 1 read the same
    blocks, the cross blocks are dropped) read from its folder by fw gives PEFT's logits."""
    from framework.formats.source import read_adapter, updated

    theirs = peft_twin(build, arch, {"num_virtual_tokens": P})
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_(generator=torch.Generator().manual_seed(2))
    theirs.save_pretrained(str(tmp_path))
    adapter = read_adapter(tmp_path)
    config = {k: v for k, v in recipe(arch).items() if k != "method"}
    assert adapter.model_update(config)["method"]["init_args"] == {
        "prefix_length": P, "reparameterize": False, "bottleneck": KV, "encoder_prefix": False, "cross_prefix": False}
    ours = build(updated(config, adapter.model_update(config)), seed=1).eval()
    adapter.load_into(ours)
    batch = seq2seq_batch()
    with torch.no_grad():
        diff = (forward(ours.model, batch) - forward(theirs, batch)).abs().max().item()
    print(f"max |fw - PEFT| logits, {arch}, PEFT's adapter in fw: {diff:.3g}")
    assert diff <= 1e-5


def test_export_to_peft_is_refused_for_an_encoder_or_cross_prefix(build):
    for layout in (FULL, (True, False), (False, True)):
        module = build(recipe("t5", layout))
        with pytest.raises(ExportNotSupportedError, match="PEFT's SEQ_2_SEQ_LM prefix reaches decoder self-attention only"):
            module.method.to_peft(module.model)


# -- refusals and hybrids ----------------------------------------------------------------------


def test_block_choices_are_refused_where_they_mean_nothing(build):
    bert = {"backbone": {"config": TINY_BERT, "tokenizer": TOKENIZER},
            "method": {"class_path": "prefix", "init_args": {"prefix_length": 2, "encoder_prefix": False}}}
    with pytest.raises(RecipeError, match="model.method.init_args.encoder_prefix: chooses blocks of encoder-decoder backbones"):
        build(bert)
    with pytest.raises(InvalidArgument, match="cross_prefix: expected true or false, got 'no'"):
        PrefixTuning(cross_prefix="no")
    uneven = {**TINY_BART, "decoder_attention_heads": 2}
    with pytest.raises(RecipeError, match="encoder_prefix: the encoder has 4 attention heads and the decoder 2"):
        build({**recipe("bart"), "backbone": {"config": uneven, "tokenizer": TOKENIZER}})
    build({**recipe("bart", PEFT_LAYOUT), "backbone": {"config": uneven, "tokenizer": TOKENIZER}})  # decoder heads only


def test_unipelt_gates_every_block_and_reads_each_stacks_mask(build):
    """One prefix gate per block (encoder, decoder self, cross); a decoder longer than the
    source, and generate's direct encoder call, read their own stack's mask."""
    module = build({**recipe("t5"), "method": {"class_path": "unipelt", "init_args": {"prefix_length": 2, "prefix_bottleneck": 8}}})
    assert len(module.model.prefix_gates) == 6
    model = module.model.eval()
    source = torch.randint(1000, 2000, (2, 4))
    with torch.no_grad():
        model(input_ids=source, attention_mask=torch.ones_like(source), decoder_input_ids=torch.randint(1000, 2000, (2, 8)))
        longer = torch.randint(1000, 2000, (2, 9))
        model.generate(input_ids=longer, attention_mask=torch.ones_like(longer), max_new_tokens=2)
